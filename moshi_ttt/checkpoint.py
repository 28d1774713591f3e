"""Saving and loading the TTT weights of a model, beside a base Moshi checkpoint.

A TTT file is a safetensors file with the TTT weights of every TTT layer
(:meth:`TTTLayer.ttt_param_names`; for In-Place TTT ``w_down``, the fast weight's initial state, and
the target path ``target_conv`` / ``target_proj``), keyed by their names in the ``LMModel``, and the
:class:`TTTConfig` as JSON in the file's metadata. Rebuilding a TTT model is::

    model = <base Moshi, e.g. CheckpointInfo.get_moshi(...)>   # linear_out weights = pretrained W_down
    apply_ttt(model, load_ttt_config(path))                    # w_down_pretrained <- linear_out
    load_ttt_weights(model, path)                              # trained w_down and target path

``to_moshi_state_dict`` maps a TTT model back to the key layout moshi's ``get_moshi_lm`` loads
(:attr:`TTTLayer.MOSHI_KEYS`: ``w_down`` -> ``linear_out.weight``; TTT-only tensors dropped).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from .config import TTTConfig
from .files import save_safetensors_atomic
from .layer import named_ttt_layers
from .patch import ttt_info

FORMAT = "moshi_ttt.v1"


def _require_ttt(model: nn.Module) -> TTTConfig:
    info = ttt_info(model)
    if info is None:
        raise ValueError("this model has no TTT layers: call moshi_ttt.apply_ttt(model, config) first")
    return info.config


def ttt_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The trainable TTT tensors of a patched model, keyed by their full parameter names.

    ``state_dict``: take the values from this (e.g. gathered from a sharded model) instead.
    """
    _require_ttt(model)
    out = {}
    for name, layer in named_ttt_layers(model):
        for t in layer.ttt_param_names():
            key = f"{name}.{t}"
            out[key] = (state_dict[key] if state_dict is not None else getattr(layer, t)).detach()
    return out


def save_ttt_weights(
    model: nn.Module, path: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write the TTT tensors and config of ``model`` to ``path`` (safetensors, atomically)."""
    config = _require_ttt(model)
    path = Path(path)
    save_safetensors_atomic(
        ttt_state_dict(model, state_dict), path, {"format": FORMAT, "ttt_config": config.to_json()}
    )
    return path


def _metadata(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise ValueError(f"TTT weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from e
    if meta.get("format") != FORMAT or "ttt_config" not in meta:
        raise ValueError(
            f"{path} is not a moshi_ttt TTT weights file (metadata format={meta.get('format')!r}); "
            "write one with moshi_ttt.save_ttt_weights"
        )
    return meta


def load_ttt_config(path: str | os.PathLike) -> TTTConfig:
    """The :class:`TTTConfig` stored in a TTT weights file."""
    return TTTConfig.from_json(_metadata(Path(path))["ttt_config"])


def load_ttt_weights(model: nn.Module, path: str | os.PathLike, *, check_config: bool = True) -> None:
    """Load a TTT weights file into a model patched with the same TTT layout.

    Raises ``ValueError`` naming the mismatch when the file's layers, shapes or (with
    ``check_config``) settings differ from the model's; nothing is loaded in that case.
    """
    path = Path(path)
    config = _require_ttt(model)
    saved = TTTConfig.from_json(_metadata(path)["ttt_config"])
    if check_config and saved != config:
        diff = {k: (v, getattr(config, k)) for k, v in saved.to_dict().items() if getattr(config, k) != v}
        raise ValueError(
            f"{path} was saved with different TTT settings (file vs model: {diff}); build the model "
            "with load_ttt_config(path), or pass check_config=False to load anyway"
        )
    tensors = load_file(str(path))
    expected = ttt_state_dict(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match this model's TTT layers: missing {missing[:6]}, unexpected "
            f"{unexpected[:6]}; the TTT layers or the base architecture differ"
        )
    for k, t in tensors.items():
        if t.shape != expected[k].shape:
            raise ValueError(
                f"{path}: {k} has shape {tuple(t.shape)}, the model expects {tuple(expected[k].shape)}"
            )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, t in tensors.items():
            params[k].copy_(t.to(params[k].dtype))


def to_moshi_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None, *, lora_rank: int | None = None
) -> dict[str, torch.Tensor]:
    """A state dict in moshi's own layout: a TTT layer keeps its slow weights, its
    :attr:`~TTTLayer.MOSHI_KEYS` are renamed (``w_down`` becomes ``linear_out.weight``) and its other
    tensors are dropped.

    Loaded into a vanilla ``LMModel`` it gives the In-Place TTT model with its fast weights frozen at
    ``W^(0)`` (no TTT updates); the TTT file restores the rest. ``lora_rank``: for a moshi LoRA
    export, whose loading wraps every ``Linear``: the renamed weights also get zero ``lora_A`` /
    ``lora_B`` adapters of that rank.
    """
    out = {}
    layers = {name + ".": m for name, m in named_ttt_layers(model)}
    for k, v in (model.state_dict() if state_dict is None else state_dict).items():
        prefix = next((p for p in layers if k.startswith(p)), None)
        if prefix is None:
            out[k] = v
            continue
        rest, layer = k[len(prefix) :], layers[prefix]
        if rest in layer.MOSHI_KEYS:
            key = prefix + layer.MOSHI_KEYS[rest]
            out[key] = v
            if lora_rank is not None:  # [d_out, d_in] weight: A [rank, d_in], B [d_out, rank]
                stem = key.removesuffix("weight")
                out[stem + "lora_A.weight"] = torch.zeros(lora_rank, v.shape[1])
                out[stem + "lora_B.weight"] = torch.zeros(v.shape[0], lora_rank)
        elif rest.startswith(layer.SLOW_PARAMS):
            out[k] = v
    return out
