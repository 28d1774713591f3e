"""Building the model to fine-tune: base Moshi, TTT layers, LoRA, freezing, parameter groups.

Order: build the base architecture (random tiny, or on the meta device for real checkpoints) ->
``apply_ttt`` -> moshi LoRA (``lora_B`` zeroed so the start is the base model) -> load the
checkpoint (only the TTT layers' new parameters and LoRA keys may be missing; anything else is an error) ->
materialise what is still on meta -> freeze per ``finetune`` mode -> dtypes (trainable parameters in
float32, frozen ones in the checkpoint's dtype on GPU).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from moshi.models import LMModel, loaders
from moshi.modules.lora import LoRALinear, replace_all_linear_with_lora
from safetensors.torch import load_file
from torch import nn

from moshi_ttt import apply_ttt, named_ttt_layers
from moshi_ttt.tiny import tiny_lm_kwargs
from moshi_ttt.variants import param_groups as ttt_param_groups

from ..args import TrainConfig
from ..compat.init_from import init_from_files, init_state, merged_config
from ..schema import ConfigError

logger = logging.getLogger(__name__)

# Keys of a moshi config.json that describe files and generation, not LMModel arguments.
CONFIG_META_KEYS = (
    "moshi_name",
    "mimi_name",
    "mimi_config_name",
    "tokenizer_name",
    "lora_name",
    "model_type",
    "lm_gen_config",
    "tts_config",
    "stt_config",
    "model_id",
    "lora",
    "lora_rank",
    "lora_scaling",
)


@dataclass
class BuiltModel:
    model: LMModel
    raw_config: dict[str, Any]  # the moshi config.json of the base model (written into exports)
    base_weights: str | None  # where the base weights came from (None for tiny)


def resolve_base(cfg: TrainConfig) -> tuple[dict[str, Any], str | None]:
    """(moshi config.json dict, path of the base safetensors) for the configured model source."""
    m = cfg.model
    if m.source == "tiny":
        return tiny_lm_kwargs(**m.tiny), None
    if m.init_from is not None:  # a whole fine-tuned model replaces the base (architecture included)
        init = init_from_files(m.init_from)
        if init.full is not None:
            return merged_config(init), str(init.full)
        if m.source == "local" and not (m.config_path and m.moshi_weights):
            raise ConfigError(
                f"model.init_from: {init.directory} holds LoRA adapters only; give the base they were trained "
                "on (model.config_path and model.moshi_weights, or model.source: hf)"
            )
    if m.source == "local":
        config_path, weights = Path(m.config_path), m.moshi_weights
    else:
        from huggingface_hub import hf_hub_download

        config_path = Path(m.config_path or hf_hub_download(m.hf_repo, "config.json"))
        weights = None if m.moshi_weights is None else str(loaders.hf_get(m.moshi_weights))
    if not config_path.is_file():
        raise ConfigError(f"model.config_path: {config_path} does not exist")
    raw = json.loads(config_path.read_text())
    if weights is None:
        weights = str(loaders.hf_get(raw.get("moshi_name", "model.safetensors"), m.hf_repo))
    if not Path(weights).is_file():
        raise ConfigError(f"model.moshi_weights: {weights} does not exist")
    return raw, weights


def lm_kwargs_of(raw_config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in raw_config.items() if k not in CONFIG_META_KEYS}


def _init_lora(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, LoRALinear):
            nn.init.kaiming_uniform_(m.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(m.lora_B.weight)


def _materialise(model: nn.Module, device: torch.device) -> None:
    """Allocate and initialise parameters still on meta after loading (new TTT / LoRA tensors)."""
    ttt_layers = dict(named_ttt_layers(model))
    for mod_name, module in model.named_modules():
        if mod_name in ttt_layers:  # its new parameters, by the TTT layer contract
            ttt_layers[mod_name].materialise_new_parameters(device)
        for name, p in list(module.named_parameters(recurse=False)):
            if not p.is_meta:
                continue
            full = f"{mod_name}.{name}" if mod_name else name
            new = torch.empty(p.shape, dtype=p.dtype, device=device)
            if "lora_A" in full:
                nn.init.kaiming_uniform_(new, a=math.sqrt(5))
            elif "lora_B" in full:
                new.zero_()
            else:
                raise ValueError(f"{full} is missing from the checkpoint and has no initialisation rule")
            setattr(module, name, nn.Parameter(new, requires_grad=p.requires_grad))
        for name, b in list(module.named_buffers(recurse=False)):
            if b is not None and b.is_meta:
                full = f"{mod_name}.{name}" if mod_name else name
                raise ValueError(f"buffer {full} is missing from the checkpoint")


def build_model(
    cfg: TrainConfig, device: torch.device, base: tuple[dict[str, Any], str | None] | None = None
) -> BuiltModel:
    """The model ``cfg`` trains. ``base``: ``(moshi config.json dict, weights path or None)`` instead of
    ``cfg.model``'s source; with no weights a non-tiny model stays on the meta device (shapes only)."""
    raw_config, weights = base if base is not None else resolve_base(cfg)
    if cfg.model.context is not None:  # a shorter attention window for fine-tuning, kept in exports
        raw_config = {**raw_config, "context": cfg.model.context}
    kwargs = lm_kwargs_of(raw_config)
    if cfg.model.source == "tiny":
        torch.manual_seed(cfg.seed)
        model = LMModel(device=device, dtype=torch.float32, **kwargs)
    else:
        model = LMModel(
            device="meta", dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, **kwargs
        )
    if cfg.model.gradient_checkpointing:
        model.transformer.checkpointing = True
        if model.depformer is not None:
            model.depformer.checkpointing = True
    if cfg.ttt.enabled:
        apply_ttt(model, cfg.ttt.to_ttt_config())
    if cfg.finetune == "lora":
        replace_all_linear_with_lora(model, cfg.lora.rank, cfg.lora.scaling)
        if cfg.model.source == "tiny":
            _init_lora(model)
    if weights is not None:
        state = read_moshi_weights(weights, cfg.model.allow_pickle)
        if cfg.model.init_from is not None:
            state = init_state(cfg.model.init_from, raw_config, state, CONFIG_META_KEYS)
        dtype = next(p for p in model.parameters()).dtype
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        try:
            res = model.load_state_dict(state, strict=False, assign=True)
        except RuntimeError as e:
            raise ConfigError(
                f"{weights} does not match the architecture in the model config (check model.config_path): {e}"
            ) from e
        new_ttt = {f"{n}.{p}" for n, layer in named_ttt_layers(model) for p in layer.new_param_names()}
        lora = ("lora_A.weight", "lora_B.weight")
        bad_missing = [k for k in res.missing_keys if k not in new_ttt and not k.endswith(lora)]
        if res.unexpected_keys or bad_missing:
            raise ConfigError(
                f"{weights} does not match the configured architecture: missing {bad_missing[:8]}, "
                f"unexpected {res.unexpected_keys[:8]}; check model.config_path"
            )
        _materialise(model, device)
        model.to(device)
    set_trainable(model, cfg)
    if device.type == "cuda":
        for p in model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()  # trainable weights in fp32; bf16 autocast in forward
    return BuiltModel(model, raw_config, weights)


def param_groups(model: nn.Module) -> dict[str, str]:
    """``{parameter name: group}``: the TTT weights in their layers' own groups
    (``moshi_ttt.ParamGroup``: ``ttt_target``, ``w_down``, ``ttt_mlp``, ...), then slow (the TTT
    layers' own MLP weights, LoRA-wrapped or not), lora and rest."""
    slow: list[str] = []
    ttt: dict[str, str] = {}
    for n, layer in named_ttt_layers(model):
        slow += [f"{n}.{p}" for p in layer.SLOW_PARAMS]
        ttt.update({f"{n}.{p}": g.name for g in layer.param_groups() for p in g.params})
    slow_prefixes = tuple(slow)
    out = {}
    for name, _ in model.named_parameters():
        if name in ttt:
            out[name] = ttt[name]
        elif slow_prefixes and name.startswith(slow_prefixes):
            out[name] = "slow"
        elif "lora_A" in name or "lora_B" in name:
            out[name] = "lora"
        else:
            out[name] = "rest"
    return out


def embedding_params(model: nn.Module) -> set[str]:
    """Names of the embedding tables' weights (text and audio, main model and depformer)."""
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Embedding)}


def set_trainable(model: nn.Module, cfg: TrainConfig) -> None:
    """requires_grad per ``finetune`` mode, ``ttt.freeze_slow_weights`` and ``ttt.train_w_down``
    (which applies to the TTT weights taken from the base checkpoint: In-Place TTT's ``w_down``)."""
    freeze_slow = cfg.freeze_slow_weights
    groups = param_groups(model)
    ttt_groups = ttt_param_groups()
    embeddings = embedding_params(model) if cfg.lora.train_embeddings else set()
    for name, p in model.named_parameters():
        group = groups[name]
        if group in ttt_groups:
            train = cfg.ttt.train_w_down if ttt_groups[group].pretrained else True
        elif group == "slow":
            if freeze_slow:
                train = False
            elif cfg.finetune == "lora":
                train = "lora_" in name
            else:
                train = True  # full, or ttt_only with the slow weights left trainable
        elif cfg.finetune == "full":
            train = True
        elif cfg.finetune == "lora":
            train = group == "lora" or name in embeddings
        else:  # ttt_only
            train = False
        p.requires_grad_(train)


def param_table(model: nn.Module) -> str:
    """A table of parameter counts per group, total and trainable, for the start-of-run log."""
    labels = {
        "lora": "LoRA adapters",
        **{name: g.label for name, g in ttt_param_groups().items()},
        "slow": "TTT layers' slow MLP weights",
        "rest": "rest of Moshi",
    }
    total = {k: 0 for k in labels}
    train = {k: 0 for k in labels}
    groups = param_groups(model)
    for name, p in model.named_parameters():
        g = groups[name]
        total[g] += p.numel()
        if p.requires_grad:
            train[g] += p.numel()
    w = max(map(len, labels.values()))  # the TTT variants name their own rows
    rows = [f"{'group':<{w}} {'params':>14} {'trainable':>14}"]
    for k, label in labels.items():
        rows.append(f"{label:<{w}} {total[k]:>14,} {train[k]:>14,}")
    rows.append(f"{'total':<{w}} {sum(total.values()):>14,} {sum(train.values()):>14,}")
    return "\n".join(rows)


def optimizer_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: TTT parameters may have their own lr; no weight decay on norms and embeddings."""
    kinds = param_groups(model)
    ttt_groups = ttt_param_groups()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_ttt = kinds[name] in ttt_groups
        decay = p.dim() >= 2 and "emb" not in name
        groups.setdefault((is_ttt, decay), []).append(p)
    out = []
    for (is_ttt, decay), params in sorted(groups.items()):
        lr = cfg.optim.group_lr(is_ttt)
        name = ("ttt" if is_ttt else "model") + ("" if decay else "_no_decay")
        out.append(
            {
                "params": params,
                "lr": lr,
                "weight_decay": cfg.optim.weight_decay if decay else 0.0,
                "name": name,
            }
        )
    if not out:
        raise ValueError(
            "no parameter is trainable with this configuration (check finetune and ttt settings)"
        )
    return out


def read_moshi_weights(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A base Moshi state dict: safetensors, or (only with ``allow_pickle``) moshi's pickled ``.pt``
    package, read the way moshi reads it (``torch.load`` without ``weights_only``: it can run code)."""
    from ..preflight import SAFETENSORS_SUFFIXES, check_moshi_weights

    if Path(path).suffix in SAFETENSORS_SUFFIXES:
        return load_file(str(path))
    check_moshi_weights(str(path), allow_pickle)
    pkg = torch.load(path, map_location="cpu", weights_only=False)  # opted in: model.allow_pickle
    if isinstance(pkg, dict) and "fsdp_best_state" in pkg:  # moshi's training package
        pkg = pkg["fsdp_best_state"]["model"]
    if not isinstance(pkg, dict):
        raise ConfigError(f"model.moshi_weights: {path} does not hold a state dict")
    return pkg
