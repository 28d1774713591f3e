"""`apply_ttt`: turn selected MLPs of a moshi ``LMModel`` into TTT layers, in place.

No moshi source is edited. Three things happen:

1. Every main-transformer layer gets a subclass of its own class (``TTT<Class>``) whose ``forward``
   accepts a ``ttt_src`` keyword and hands it to a TTT gating. The depformer (which restarts every
   frame and has no long context) and Mimi are never touched.
2. The gating of each selected layer becomes the configured variant's
   :class:`~moshi_ttt.layer.TTTLayer` (:data:`moshi_ttt.variants.VARIANTS`), built from it: for
   In-Place TTT, ``w_down`` is taken from the layer's ``linear_out`` (merged first when it is a
   moshi ``LoRALinear``).
3. For a layer that reads ``text_emb`` / ``input_emb`` / ``user_audio_emb`` (:meth:`TTTLayer.source`),
   hooks on ``model.text_emb`` (or the user's audio embeddings ``model.emb[dep_q:]``) and
   ``model.transformer`` capture the source and pass it to the layers as the ``ttt_src`` keyword,
   which ``torch.utils.checkpoint`` keeps for recomputation under gradient checkpointing.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from moshi.modules.streaming import StreamingModule
from moshi.modules.transformer import StreamingTransformerLayer
from torch import nn

from .config import TTTConfig
from .deprecation import moved_attributes
from .layer import TTTLayer, named_ttt_layers
from .variants import variant_class

logger = logging.getLogger(__name__)

_ATTR = "_moshi_ttt"


_LAYER_CLASSES: dict[type, type] = {}


def _ttt_layer_class(cls: type) -> type:
    """``TTT<cls>``: ``cls`` whose forward accepts ``ttt_src`` and hands it to a TTT gating.

    Built as a direct subclass with no layout of its own, so an existing layer's ``__class__`` can be
    swapped in place (weights, hooks and FSDP wrapping stay). Parent methods are called by name rather
    than through ``super()`` so further dynamic subclassing (FSDP2 does it) stays correct.
    """
    if getattr(cls, "_moshi_ttt_layer", False):
        return cls
    if cls in _LAYER_CLASSES:
        return _LAYER_CLASSES[cls]

    def forward(self, x, cross_attention_src=None, ttt_src=None):
        self.__dict__["_ttt_src"] = ttt_src
        try:
            return cls.forward(self, x, cross_attention_src)
        finally:
            self.__dict__.pop("_ttt_src", None)

    def _ff_block(self, x: torch.Tensor) -> torch.Tensor:
        gating = self.gating
        if not isinstance(gating, TTTLayer):
            return cls._ff_block(self, x)
        x_orig = x
        x = self.norm2(x)
        update = gating(x, self.__dict__.get("_ttt_src"))
        return x_orig.to(update) + self.layer_scale_2(update)

    new = type(
        f"TTT{cls.__name__}",
        (cls,),
        {"__module__": __name__, "_moshi_ttt_layer": True, "forward": forward, "_ff_block": _ff_block},
    )
    _LAYER_CLASSES[cls] = new
    return new


@dataclass
class TTTModelInfo:
    """What :func:`apply_ttt` did to a model; stored on it as ``model._moshi_ttt``."""

    config: TTTConfig
    layers: list[int]
    handles: list[Any] = field(default_factory=list, repr=False)
    slot: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


def ttt_info(model: nn.Module) -> TTTModelInfo | None:
    """The TTT settings of a model patched by :func:`apply_ttt`, or None."""
    return getattr(model, _ATTR, None)


def ttt_layers(model: nn.Module) -> dict[int, TTTLayer]:
    """``{layer index: TTT layer}`` of a patched model."""
    out = {}
    for i, layer in enumerate(model.transformer.layers):
        if isinstance(layer.gating, TTTLayer):
            out[i] = layer.gating
    return out


def set_ttt_updates(model: nn.Module, enabled: bool) -> None:
    """Turn the test-time updates of every TTT layer on or off (:attr:`TTTLayer.updates_enabled`):
    off, the fast weights stay at ``W^(0)`` in training forwards, streaming and graph-mode steps
    alike: the same weights without test-time training."""
    for _, layer in named_ttt_layers(model):
        layer.updates_enabled = enabled


def set_ttt_eta(model: nn.Module, etas: dict[int, float]) -> None:
    """Set the eta of TTT layers (``{layer index: eta}``, in the units of the model's ``eta_norm``):
    each layer's config and the model's ``TTTConfig.eta_layers``, which the TTT file saves, so an
    export runs with the same etas. Layers not listed keep theirs."""
    info = ttt_info(model)
    if info is None:
        raise ValueError("this model has no TTT layers: call moshi_ttt.apply_ttt(model, config) first")
    stray = sorted(set(etas) - set(info.layers))
    if stray:
        raise ValueError(f"set_ttt_eta: layers {stray} are not TTT layers (the TTT layers are {info.layers})")
    info.config = dataclasses.replace(info.config, eta_layers={**(info.config.eta_layers or {}), **etas})
    layers = ttt_layers(model)
    for i in etas:
        layers[i].config = info.config.layer_config(i)


def apply_ttt(lm_model: nn.Module, config: TTTConfig) -> nn.Module:
    """Make the selected main-transformer layers of a moshi ``LMModel`` TTT layers (``config.variant``).

    Works before or after moshi's LoRA (``replace_all_linear_with_lora``), with gradient
    checkpointing, on any device or dtype (meta included). Must be called before the model is
    first put in streaming mode. Returns the same model, patched in place.
    """
    if not isinstance(config, TTTConfig):
        raise ValueError(f"config must be a moshi_ttt.TTTConfig, got {type(config).__name__}")
    config.validate()
    transformer = getattr(lm_model, "transformer", None)
    layers = getattr(transformer, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(lm_model, "text_emb"):
        raise ValueError(
            f"apply_ttt expects a moshi.models.LMModel (with .transformer.layers and .text_emb), "
            f"got {type(lm_model).__name__}"
        )
    if ttt_info(lm_model) is not None:
        raise ValueError("apply_ttt was already applied to this model; build a fresh model to change it")
    if any(isinstance(m, StreamingModule) and m.is_streaming for m in lm_model.modules()):
        raise ValueError("apply_ttt must be called before the model enters streaming mode")
    selected = config.resolve_layers(len(layers))
    stray = sorted(set(config.eta_layers or {}) - set(selected))
    if stray:
        raise ValueError(
            f"TTTConfig.eta_layers: layers {stray} are not TTT layers (the TTT layers are {selected}); "
            "list only TTT layers"
        )
    for i in selected:
        layer = layers[i]
        if not isinstance(layer, StreamingTransformerLayer):
            raise ValueError(f"layer {i} is a {type(layer).__name__}, not a moshi StreamingTransformerLayer")
        if layer.gating is None or isinstance(layer.gating, nn.ModuleList):
            kind = "no gated MLP (gating='none')" if layer.gating is None else "per-step MLP weights"
            raise ValueError(
                f"layer {i} has {kind}; TTT needs moshi's gated MLP (gating='silu', "
                "no weights_per_step), as in the main transformer of every Moshi checkpoint"
            )
    layer_cls = variant_class(config.variant)
    if not isinstance(config, layer_cls.SETTINGS):
        raise ValueError(
            f"variant {config.variant!r} was registered after TTTConfig was built, so this config lacks "
            "its settings; build it with moshi_ttt.config.config_class()(...)"
        )
    for layer in layers:
        layer.__class__ = _ttt_layer_class(type(layer))
    for i in selected:
        layers[i].gating = layer_cls.from_gating(layers[i].gating, config.layer_config(i))

    info = TTTModelInfo(config=config, layers=selected)
    _hand_over_source(lm_model, info, layer_cls.source(config))
    setattr(lm_model, _ATTR, info)
    # moshi caches the list of streaming children at the first streaming() call: drop stale caches.
    for m in lm_model.modules():
        if isinstance(m, StreamingModule):
            m._cached_children = None
    logger.info("TTT (%s) on layers %s (%s)", config.variant, selected, config.to_json())
    return lm_model


def _hand_over_source(lm_model: nn.Module, info: TTTModelInfo, source: str) -> None:
    """Hooks that capture the TTT layers' ``source`` (``text_emb``, ``input_emb``, ``user_audio_emb``;
    ``hidden`` needs none) and pass it to the transformer's layers as ``ttt_src``."""
    transformer = lm_model.transformer
    if source == "text_emb":

        def capture(_module, _inputs, output):
            info.slot["src"] = output

        info.handles.append(lm_model.text_emb.register_forward_hook(capture))

    if source == "user_audio_emb":
        _capture_user_audio(lm_model, info)

    if source in ("text_emb", "input_emb", "user_audio_emb"):

        def inject(_module, args, kwargs):
            if kwargs.get("ttt_src") is not None:
                info.slot.pop("src", None)
                return None
            if source == "input_emb":
                src = args[0] if args else kwargs["x"]
            else:
                src = info.slot.pop("src", None)
                if src is None:
                    raise ValueError(
                        f"TTT target source {source!r} was not captured: call the model through "
                        "LMModel.forward / forward_text or LMGen, or pass ttt_src=... to model.transformer"
                    )
            return args, {**kwargs, "ttt_src": src}

        info.handles.append(transformer.register_forward_pre_hook(inject, with_kwargs=True))


def _capture_user_audio(lm_model: nn.Module, info: TTTModelInfo) -> None:
    """Hooks summing the embeddings of the other speaker's codebooks (``emb[dep_q:]``, called in
    order by ``LMModel.forward_text``) into ``info.slot["src"]``."""
    dep_q, n_q = int(getattr(lm_model, "dep_q", 0)), int(getattr(lm_model, "n_q", 0))
    if n_q <= dep_q:
        raise ValueError(
            f"TTT target source 'user_audio_emb' needs the other speaker's audio codebooks, but this model "
            f"has n_q={n_q}, dep_q={dep_q} (none beyond Moshi's own); use text_emb, input_emb or hidden"
        )
    first = dep_q

    def capture(k: int):
        def hook(_module, _inputs, output):
            info.slot["src"] = output if k == first else info.slot["src"] + output

        return hook

    for k in range(dep_q, n_q):
        info.handles.append(lm_model.emb[k].register_forward_hook(capture(k)))


# Old names (issue 24), with a DeprecationWarning until the next release.
__getattr__ = moved_attributes(__name__, {"ttt_gatings": "moshi_ttt.patch:ttt_layers"})
