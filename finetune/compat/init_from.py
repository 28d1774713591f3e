"""Start a run from a fine-tuned checkpoint in moshi's layout (``model.init_from``): moshi-finetune's
``checkpoints/checkpoint_NNNNNN/consolidated/`` (``lora.safetensors`` or ``consolidated.safetensors``,
with ``config.json``) or this project's own ``moshi/`` export. LoRA adapters are merged into the base
weights, so TTT layers take ``w_down`` from the fine-tuned ``linear_out``.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..schema import ConfigError

# File names of a fine-tuned checkpoint in moshi's layout: moshi-finetune's consolidated/ directory,
# or this project's own moshi/ export.
FULL_NAMES = ("consolidated.safetensors", "model.safetensors")
LORA_NAME = "lora.safetensors"
_LORA_CONFIG_KEYS = ("lora", "lora_rank", "lora_scaling", "lora_name")


@dataclass
class InitFrom:
    directory: Path
    config: dict[str, Any]  # its config.json
    full: Path | None  # a whole fine-tuned model
    lora: Path | None  # adapters (and possibly embedding tables) to merge into the base


def init_from_files(path: str | Path) -> InitFrom:
    """The files of the checkpoint ``model.init_from`` points at (its directory or a file in it)."""
    p = Path(path).expanduser()
    d = p.parent if p.is_file() else p
    if not d.is_dir():
        raise ConfigError(f"model.init_from: {path} does not exist")
    if (d / "consolidated").is_dir() and not (d / "config.json").is_file():
        d = d / "consolidated"  # moshi-finetune's checkpoint_NNNNNN/ given instead of its consolidated/
    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(
            f"model.init_from: {d} has no config.json; point it at moshi-finetune's "
            "checkpoints/checkpoint_NNNNNN/consolidated/ directory"
        )
    full = next((d / n for n in FULL_NAMES if (d / n).is_file()), None)
    if p.is_file() and p.name in FULL_NAMES:
        full = p
    lora = d / LORA_NAME if (d / LORA_NAME).is_file() and not (p.is_file() and p.name in FULL_NAMES) else None
    if full is None and lora is None:
        raise ConfigError(f"model.init_from: {d} holds neither {' nor '.join(FULL_NAMES)} nor {LORA_NAME}")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"model.init_from: {cfg_file} is not valid JSON ({e})") from e
    return InitFrom(d, config, full, lora)


def architecture(config: dict[str, Any], meta_keys: Collection[str]) -> dict[str, Any]:
    """The LMModel arguments of a moshi config.json (file names, generation and LoRA keys left out)."""
    return {k: v for k, v in config.items() if k not in meta_keys and k not in _LORA_CONFIG_KEYS}


def merged_config(init: InitFrom) -> dict[str, Any]:
    """The checkpoint's config.json as the base config of the new run: its adapters are merged, so the
    LoRA keys that described them go."""
    return {k: v for k, v in init.config.items() if k not in _LORA_CONFIG_KEYS}


def merge_lora(
    state: dict[str, torch.Tensor], lora_file: Path, config: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """``state`` with moshi-finetune's adapters merged: ``W + lora_scaling * B @ A`` for each Linear
    (``X.lora_A.weight`` / ``X.lora_B.weight`` -> ``X.weight``, computed in float32); other tensors in
    the file (its ``ft_embed`` embedding tables) replace the base's. Keys the base does not have are
    an error."""
    adapters = load_file(str(lora_file))
    if "lora_scaling" not in config:
        raise ConfigError(
            f"model.init_from: {lora_file.parent / 'config.json'} has no lora_scaling for {lora_file.name}"
        )
    scaling = float(config["lora_scaling"])
    out = dict(state)
    bad: list[str] = []
    done: set[str] = set()
    for key, tensor in adapters.items():
        if key.endswith((".lora_A.weight", ".lora_B.weight")):
            prefix = key.rsplit(".lora_", 1)[0]
            if prefix in done:
                continue
            a, b = adapters.get(f"{prefix}.lora_A.weight"), adapters.get(f"{prefix}.lora_B.weight")
            target = f"{prefix}.weight"
            if a is None or b is None or target not in out:
                bad.append(key)
                continue
            w = out[target]
            delta = scaling * (b.float() @ a.float())  # [out, rank] @ [rank, in]
            if delta.shape != w.shape:
                bad.append(key)
                continue
            out[target] = w.float() + delta  # the model's dtype is applied when loading
            done.add(prefix)
        elif key in out and out[key].shape == tensor.shape:
            out[key] = tensor.to(out[key].dtype)
        else:
            bad.append(key)
    if bad:
        raise ConfigError(
            f"model.init_from: {lora_file} does not fit the base model (tensors {bad[:5]} have no matching "
            "base weight); the base must be the one the adapters were trained on (moshi_paths in the "
            "moshi-finetune config: model.hf_repo / model.moshi_weights here)"
        )
    return out


def init_state(
    init_from: str | Path,
    base_config: dict[str, Any],
    state: dict[str, torch.Tensor],
    meta_keys: Collection[str],
) -> dict[str, torch.Tensor]:
    """The weights to start from: ``state`` (the base, or the checkpoint's whole model) with the
    checkpoint's adapters merged, after checking they were trained on this architecture."""
    init = init_from_files(init_from)
    if init.lora is None:
        return state
    ours, theirs = architecture(base_config, meta_keys), architecture(init.config, meta_keys)
    differ = sorted(k for k in ours.keys() & theirs.keys() if ours[k] != theirs[k])
    if differ:
        raise ConfigError(
            f"model.init_from: {init.directory / 'config.json'} describes another architecture than the base "
            f"model ({', '.join(f'{k}: {theirs[k]!r} vs {ours[k]!r}' for k in differ[:4])}); the base must be "
            "the model the adapters were trained on"
        )
    return merge_lora(state, init.lora, init.config)
