"""FSDP2 (``fully_shard``) for moshi models.

``fully_shard`` turns each sharded module's class into ``type("FSDP<cls>", (FSDPModule, cls), ...)``
and assigns it to ``module.__class__``. For moshi's modules that assignment fails ("object layout
differs"): ``StreamingModule``'s first base is ``abc.ABC``, and CPython refuses a new class whose
first base has a different base chain. :func:`register_moshi_classes` pre-registers, in FSDP's own
class cache, an equivalent class with the moshi class first and ``FSDPModule`` second, copying the two
methods ``FSDPModule`` overrides on ``nn.Module`` (``__new__``, ``_apply``) so they keep priority,
exactly as FSDP's leftmost placement intends.
"""

from __future__ import annotations

import torch
from moshi.modules.streaming import StreamingModule
from torch import nn


def register_moshi_classes(model: nn.Module) -> None:
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.fsdp._fully_shard import _fully_shard as impl
    except ImportError as e:  # pragma: no cover - depends on the torch version
        raise RuntimeError(f"FSDP2 is not available in torch {torch.__version__}: {e}") from e
    cache = getattr(impl, "cls_to_fsdp_cls", None)
    if cache is None:  # pragma: no cover - depends on the torch version
        raise RuntimeError(
            f"torch {torch.__version__} changed FSDP2 internals this shim relies on; use distributed.strategy: ddp"
        )
    for module in model.modules():
        cls = type(module)
        if not isinstance(module, StreamingModule) or cls in cache:
            continue
        dct = {
            "__deepcopy__": impl._unimplemented_deepcopy,
            "__new__": FSDPModule.__new__,
            "_apply": FSDPModule._apply,
        }
        cache[cls] = type(f"FSDP{cls.__name__}", (cls, FSDPModule), dct)


def shard_model(model: nn.Module, mp_policy) -> None:
    """One FSDP unit per transformer layer (main and depformer), then the root."""
    from torch.distributed.fsdp import fully_shard

    register_moshi_classes(model)
    for layer in model.transformer.layers:
        fully_shard(layer, mp_policy=mp_policy)
    if getattr(model, "depformer", None) is not None:
        for layer in model.depformer.layers:
            fully_shard(layer, mp_policy=mp_policy)
    fully_shard(model, mp_policy=mp_policy)
