"""Checkpoints: atomic, resumable, loadable by moshi.

``run_dir/checkpoints/step_NNNNNN/`` holds

- ``trainable.safetensors``: every trainable parameter, float32, in the training model's own layout
  (exact resume). Under FSDP the model and optimizer go to ``dcp/`` through
  ``torch.distributed.checkpoint`` instead (sharded: no rank gathers the full model);
- ``trainer_state.pt``: optimizer, scheduler, step, data position, wandb run id (tensors and
  plain Python values only; read back with ``torch.load(weights_only=True)``), and
  ``rng/rank_R.pt`` per process;
- ``ttt.safetensors``: the TTT weights and TTT config (``moshi_ttt.load_ttt_weights``);
- ``moshi/``: ``config.json`` + ``model.safetensors`` and/or ``lora.safetensors`` that
  ``moshi.models.loaders.CheckpointInfo`` loads directly (``checkpoint.export_moshi``);
- ``config.yaml`` (the resolved training config) and, written last, ``meta.json``.

Everything is written into ``.tmp.step_NNNNNN`` and renamed into place once complete, so a crash at
any moment never leaves a directory that looks complete; stale temporary directories are removed
at the next start.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moshi_ttt import save_ttt_weights, to_moshi_state_dict, ttt_info, ttt_state_dict

from .distributed import DistInfo, barrier
from .model import embedding_params

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (``meta.json`` present), oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / "meta.json").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def clean_stale_tmp(run_dir: str | Path) -> None:
    root = checkpoint_root(run_dir)
    if root.is_dir():
        for p in root.glob(".tmp.step_*"):
            logger.warning("removing incomplete checkpoint %s (left by an interrupted save)", p)
            shutil.rmtree(p, ignore_errors=True)


def _fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def export_moshi(
    model: nn.Module,
    raw_config: dict[str, Any],
    cfg,
    out_dir: Path,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write ``config.json`` + weights in moshi's own layout (``CheckpointInfo`` loads them).

    LoRA runs write ``lora.safetensors`` (and, when the base is not a Hub checkpoint's own weights: the
    tiny random-weight base or a ``model.init_from`` start, the base weights as ``model.safetensors``);
    full fine-tuning writes the whole model. TTT layers export ``w_down`` as
    ``linear_out.weight`` (the model with updates off; ``ttt.safetensors`` restores TTT).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if ttt_info(model) is not None:
        # moshi's LoRA loading wraps every Linear, the TTT layers' linear_out too: zero adapters for those.
        sd = to_moshi_state_dict(
            model, state_dict, lora_rank=cfg.lora.rank if cfg.finetune == "lora" else None
        )
    else:
        sd = model.state_dict() if state_dict is None else state_dict
    lora = {k: v for k, v in sd.items() if ".lora_A." in k or ".lora_B." in k}
    base = {k.replace(".frozen_W.", "."): v for k, v in sd.items() if k not in lora}
    if cfg.finetune == "lora" and cfg.lora.train_embeddings:  # trained tables go with the adapters
        lora.update({k: base[k] for k in embedding_params(model) if k in base})
    config = dict(raw_config)
    dtype = torch.bfloat16 if cfg.model.source != "tiny" else torch.float32
    if cfg.finetune == "lora":
        config.update(
            lora=True, lora_rank=cfg.lora.rank, lora_scaling=cfg.lora.scaling, lora_name="lora.safetensors"
        )
        save_file(
            {k: v.to(dtype).contiguous().cpu() for k, v in lora.items()}, str(out_dir / "lora.safetensors")
        )
    if cfg.finetune != "lora" or cfg.model.source == "tiny" or cfg.model.init_from is not None:
        config["moshi_name"] = "model.safetensors"
        save_file(
            {k: v.to(dtype).contiguous().cpu() for k, v in base.items()}, str(out_dir / "model.safetensors")
        )
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))


def save_checkpoint(
    *,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    data_state: dict[str, int],
    extra: dict[str, Any],
    config_yaml: str,
    raw_config: dict[str, Any],
    cfg,
    dist_info: DistInfo,
) -> Path | None:
    root = checkpoint_root(cfg.run_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp.step_{step:06d}"
    t0 = time.time()
    if dist_info.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "rng").mkdir(parents=True)
    barrier()
    fsdp = _fsdp(model)
    if fsdp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(model, optimizer)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "dcp"))
    # Per process: RNG and data position (ranks skip bad items independently).
    torch.save({**_rng_state(), "data": data_state}, tmp / "rng" / f"rank_{dist_info.rank}.pt")
    full_sd = _gather_for_export(model, cfg) if fsdp else None
    if dist_info.is_main:
        if not fsdp:
            save_file(_trainable_state(model), str(tmp / "trainable.safetensors"))
            state = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
            }
        else:
            state = {"scheduler": scheduler.state_dict()}
        state.update(step=step, data=data_state, world_size=dist_info.world_size, **extra)
        torch.save(state, tmp / "trainer_state.pt")
        (tmp / "config.yaml").write_text(config_yaml)
        target = _unwrap(model)
        if ttt_info(target) is not None:
            save_ttt_weights(target, tmp / "ttt.safetensors", full_sd)
        if cfg.checkpoint.export_moshi:
            export_moshi(target, raw_config, cfg, tmp / "moshi", full_sd)
        (tmp / "meta.json").write_text(json.dumps({"step": step, "time": time.time(), "fsdp": fsdp}))
        _fsync_tree(tmp)
        os.replace(tmp, final)
        _rotate(cfg, root)
        logger.info("saved checkpoint %s in %.1fs", final, time.time() - t0)
    barrier()
    return final


def _gather_for_export(model: nn.Module, cfg) -> dict[str, torch.Tensor]:
    """Full tensors (on rank 0's CPU) of what rank 0 writes: everything for the moshi export,
    else only the TTT parameters. A collective: every rank calls it."""
    from torch.distributed.tensor import DTensor

    if cfg.checkpoint.export_moshi:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    sd = ttt_state_dict(model) if ttt_info(model) is not None else {}
    return {k: (t.full_tensor() if isinstance(t, DTensor) else t).cpu() for k, t in sd.items()}


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _rotate(cfg, root: Path) -> None:
    keep = cfg.checkpoint.keep_last
    if keep <= 0:
        return
    ckpts = list_checkpoints(cfg.run_dir)
    for _, p in ckpts[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def _fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def load_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    dist_info: DistInfo,
) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG from ``path``; returns the trainer state dict."""
    state = torch.load(path / "trainer_state.pt", weights_only=True, map_location="cpu")
    if _fsdp(model):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(model, optimizer)
        box = {"model": msd, "optim": osd}
        dcp.load(box, checkpoint_id=str(path / "dcp"))
        set_state_dict(model, optimizer, model_state_dict=box["model"], optim_state_dict=box["optim"])
    else:
        saved = load_file(str(path / "trainable.safetensors"))
        params = dict(_unwrap(model).named_parameters())
        expected = {n for n, p in params.items() if p.requires_grad}
        if set(saved) != expected:
            missing, extra = sorted(expected - set(saved)), sorted(set(saved) - expected)
            raise ValueError(
                f"{path} holds a different set of trainable parameters (missing {missing[:5]}, extra "
                f"{extra[:5]}): the finetune mode or freezing changed; start a new run_dir"
            )
        with torch.no_grad():
            for n, t in saved.items():
                params[n].copy_(t.to(params[n].dtype))
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng_file = path / "rng" / f"rank_{dist_info.rank}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        if "data" in rng:
            state["data"] = rng["data"]
    return state


def resolve_resume(cfg) -> Path | None:
    """The checkpoint to resume from, per ``cfg.resume``; refuses to overwrite an existing run."""
    if cfg.resume == "never":
        if list_checkpoints(cfg.run_dir):
            raise ValueError(
                f"run_dir {cfg.run_dir} already has checkpoints and resume is 'never'; choose a new "
                "run_dir or resume=auto (nothing was deleted)"
            )
        return None
    if cfg.resume == "auto":
        ckpts = list_checkpoints(cfg.run_dir)
        return ckpts[-1][1] if ckpts else None
    path = Path(cfg.resume)
    if not (path / "meta.json").is_file():
        raise ValueError(f"resume: {path} is not a complete checkpoint directory (no meta.json)")
    return path
