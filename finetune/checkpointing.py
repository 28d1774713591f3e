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
any moment never leaves a directory that looks complete. Nothing that might hold a complete checkpoint
is ever deleted except by rotation (``checkpoint.keep_last``): at the next start a ``.tmp.*``
directory without ``meta.json`` (an interrupted save) is removed, and anything else that is in the
way is moved aside to ``checkpoints/.<why>.<name>.<time>`` with a warning:

- ``.incomplete.``: a ``step_*`` directory without ``meta.json``, or a ``.tmp.*`` one with it;
- ``.unloadable.``: a checkpoint that failed to load when resuming (the warning names the file);
- ``.superseded.``: checkpoints newer than the one a run resumes from (``resume: PATH`` to an older
  checkpoint, or after falling back past an unloadable one): the resumed run writes its own;
- ``.suspect.``: the newest checkpoint of a diverged run when the step right after it was already
  non-finite (see :class:`SaveSchedule`).

``resume: auto`` takes the newest checkpoint that loads, falling back past those that do not;
an explicit ``resume: PATH`` that does not load is refused (:class:`ConfigError`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pickle
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from moshi_ttt import save_ttt_weights, to_moshi_state_dict, ttt_info, ttt_state_dict

from .distributed import DistInfo, all_reduce_sum, barrier, broadcast_object
from .model import embedding_params
from .schema import ConfigError

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


def _aside_name(path: Path, why: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = path.parent / f".{why}.{path.name.removeprefix('.tmp.')}.{stamp}"
    n = 1
    while dest.exists():
        n += 1
        dest = path.parent / f".{why}.{path.name.removeprefix('.tmp.')}.{stamp}-{n}"
    return dest


def move_aside(path: Path, why: str, reason: str) -> Path:
    """Rename ``path`` to ``.<why>.<name>.<time>`` beside it (never delete it), with a warning."""
    dest = _aside_name(path, why)
    os.replace(path, dest)
    logger.warning("moved %s aside to %s: %s", path, dest.name, reason)
    return dest


def tidy_checkpoints(run_dir: str | Path) -> None:
    """Clear what an interrupted save or a hand edit left in ``checkpoints/`` (rank 0, under the run lock).

    A ``.tmp.*`` directory without ``meta.json`` is an interrupted save (``meta.json`` is written last):
    removed. Anything that might be complete but is not where a complete checkpoint belongs is moved
    aside, so it can never block a later save of the same step.
    """
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return
    for p in sorted(root.glob(".tmp.step_*")):
        if (p / "meta.json").is_file():
            move_aside(p, "incomplete", "a save was interrupted after writing meta.json (it may be complete)")
        else:
            logger.warning("removing incomplete checkpoint %s (left by an interrupted save)", p)
            shutil.rmtree(p, ignore_errors=True)
    for p in sorted(root.iterdir()):
        if _STEP_DIR.match(p.name) and not (p / "meta.json").is_file():
            move_aside(
                p,
                "incomplete",
                "it has no meta.json (written last by every save), so it is not a complete checkpoint",
            )


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
    """Write the checkpoint of ``step`` atomically (rotation is :class:`SaveSchedule`'s)."""
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
    barrier()  # every rank's files are written before rank 0 commits (meta.json, rename)
    full_sd = _gather_for_export(model, cfg) if fsdp else None
    if dist_info.is_main:
        if not fsdp:
            # The names of the model itself, not DDP's ``module.`` ones: resumable with any process count's wrapper.
            save_file(_trainable_state(_unwrap(model)), str(tmp / "trainable.safetensors"))
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
        if final.exists():  # tidy_checkpoints and the resume rules keep this from happening; never overwrite
            move_aside(final, "replaced", f"a new checkpoint of step {step} was written")
        os.replace(tmp, final)
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


def rotate_checkpoints(run_dir: str | Path, keep_last: int, keep: set[int]) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (0: keep all) and the steps in ``keep``."""
    if keep_last <= 0:
        return
    for step, p in list_checkpoints(run_dir)[:-keep_last]:
        if step not in keep:
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


# ---------------------------------------------------------------- the run directory


def lock_run_dir(run_dir: Path):
    """An exclusive lock on ``run_dir`` for this run's lifetime: two trainings writing one run directory
    (a sweep launched twice, a relaunch while the first is alive) would corrupt its checkpoints."""
    import fcntl

    f = open(run_dir / ".lock", "a+")  # noqa: SIM115 - held open until the run ends
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        owner = f.read().strip() or "?"
        f.close()
        raise ConfigError(
            f"{run_dir} is in use by another training process (pid {owner}); nothing was changed"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


# What a failed write at start means, and what to do about it (errno -> advice).
_WRITE_ADVICE = {
    errno.EROFS: "its filesystem is read-only",
    errno.ENOSPC: "its disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EACCES: "no permission to write there",
    errno.EPERM: "the filesystem does not allow it",
    errno.EEXIST: "a file of that name is in the way",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
}
_PROBE_BYTES = 4096  # one page: a disk without a free block fails here


def prepare_run_dir(run_dir: Path) -> list[Path]:
    """Create ``run_dir`` (and missing parents) and prove that it takes a write; returns the directories
    it created, deepest first.

    The probe writes and fsyncs a small file and removes it, so a read-only filesystem or a full disk is
    found before any model is built rather than at the first checkpoint. On failure everything created
    here is removed again and :class:`ConfigError` names the directory, the reason and the fix. A disk
    that fills up later is the "disk full during a save" case (the save fails, earlier checkpoints stay).
    """
    created, p = [], run_dir
    while not p.exists() and not p.is_symlink() and p != p.parent:
        created.append(p)
        p = p.parent
    probe = run_dir / f".write_test.{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            if os.write(fd, bytes(_PROBE_BYTES)) < _PROBE_BYTES:  # a partial write: the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fsync(fd)
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as e:
        with contextlib.suppress(OSError):
            probe.unlink()
        for d in created:
            with contextlib.suppress(OSError):
                d.rmdir()
        why = _WRITE_ADVICE.get(e.errno, e.strerror or str(e))
        code = errno.errorcode.get(e.errno or 0, type(e).__name__)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            fix = "free some space there"
        elif e.errno in (errno.EEXIST, errno.ENOTDIR):
            fix = "move that file away"
        else:
            fix = "make it writable"
        raise ConfigError(
            f"run_dir {run_dir}: cannot write there ({why}, {code}); {fix} or choose another run_dir "
            "(--run_dir=...). Nothing was created or changed"
        ) from None
    return created


@contextlib.contextmanager
def claimed_run_dir(run_dir: Path, is_main: bool) -> Iterator[None]:
    """``run_dir`` created if needed, checked writable (:func:`prepare_run_dir`), locked and tidied
    (:func:`tidy_checkpoints`) by rank 0 for the block.

    The lock comes first, so a second launch is told the directory is in use before anything else is
    compared. A refusal on rank 0 (not writable, in use) is sent to every rank, so all of them stop with
    the same :class:`ConfigError` instead of waiting for rank 0. A run refused by a ConfigError inside
    the block leaves a directory it created as it was (no ``.lock``, no empty directory).
    """
    created: list[Path] = []
    lock = None
    try:
        refusal = None
        if is_main:
            try:
                created = prepare_run_dir(run_dir)
                lock = lock_run_dir(run_dir)
                tidy_checkpoints(run_dir)
            except ConfigError as e:
                refusal = str(e)
        refusal = broadcast_object(refusal)  # every rank waits for rank 0 here
        if refusal is not None:
            raise ConfigError(refusal)
        yield
    except ConfigError:
        if lock is not None and created:
            (run_dir / ".lock").unlink(missing_ok=True)
            for d in created:  # only if nothing else was written
                with contextlib.suppress(OSError):
                    d.rmdir()
        raise
    finally:
        if lock is not None:
            lock.close()


# ---------------------------------------------------------------- resume


class CheckpointError(Exception):
    """A checkpoint file that cannot be read; the message names the file and the reason."""

    def __init__(self, file: Path, reason: str) -> None:
        super().__init__(f"{file}: {reason}")
        self.file, self.reason = file, reason


def _reason(e: BaseException) -> str:
    """A one-line reason for a failed read. Never torch's advice to retry with ``weights_only=False``:
    everything this trainer writes loads with ``weights_only=True``; a file that does not is corrupt or
    foreign, and unpickling it could run code."""
    text = str(e).strip()
    if isinstance(e, pickle.UnpicklingError) or "weights_only" in text:
        return "unreadable: corrupt, or holds objects other than tensors and plain values"
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def _torch_read(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(path, "missing")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # corrupt files raise anything from zip, pickle or storage errors
        raise CheckpointError(path, _reason(e)) from None


def _check_safetensors(path: Path) -> None:
    """The header parses and the file is as long as the header says (a truncated file fails here)."""
    if not path.is_file():
        raise CheckpointError(path, "missing")
    try:
        with safe_open(str(path), "pt"):
            pass
    except Exception as e:  # SafetensorError, OSError
        raise CheckpointError(path, _reason(e)) from None


@dataclass
class ResumePoint:
    """A checkpoint's files that are needed before the model exists, read and checked."""

    path: Path
    config: dict[str, Any]  # its training config
    state: dict[str, Any]  # trainer_state.pt
    rng: dict[str, Any] | None  # this process's rng/rank_R.pt (None: the rank did not exist then)

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def data_state(self) -> dict[str, Any]:
        return (self.rng or {}).get("data", self.state["data"])


def read_resume_point(path: Path, rank: int) -> ResumePoint:
    """Read checkpoint ``path``'s small files and check its weight files; CheckpointError names the file."""
    meta_file, config_file = path / "meta.json", path / "config.yaml"
    try:
        meta = json.loads(meta_file.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise CheckpointError(meta_file, _reason(e)) from None
    try:
        config = yaml.safe_load(config_file.read_text())
        if not isinstance(config, dict):
            raise ValueError("not a mapping")
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise CheckpointError(config_file, _reason(e)) from None
    state = _torch_read(path / "trainer_state.pt")
    needed = ("step", "scheduler", "world_size", "data") + (() if meta.get("fsdp") else ("optimizer",))
    missing = [k for k in needed if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(path / "trainer_state.pt", f"incomplete (no {', '.join(missing)})")
    rng = None
    if rank < int(state["world_size"]):  # else the world size changed: refused by the compatibility check
        rng_file = path / "rng" / f"rank_{rank}.pt"
        rng = _torch_read(rng_file)
        if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor):
            raise CheckpointError(rng_file, "incomplete (no torch RNG state)")
    if meta.get("fsdp"):
        if not (path / "dcp" / ".metadata").is_file():
            raise CheckpointError(path / "dcp" / ".metadata", "missing")
    else:
        _check_safetensors(path / "trainable.safetensors")
    return ResumePoint(path, config, state, rng)


def resume_candidates(cfg) -> list[Path]:
    """Checkpoints to try per ``cfg.resume``, newest first; refuses to overwrite an existing run."""
    if cfg.resume == "never":
        if list_checkpoints(cfg.run_dir):
            raise ConfigError(
                f"run_dir {cfg.run_dir} already has checkpoints and resume is 'never'; choose a new "
                "run_dir or resume=auto (nothing was deleted)"
            )
        return []
    if cfg.resume == "auto":
        return [p for _, p in reversed(list_checkpoints(cfg.run_dir))]
    path = Path(cfg.resume)
    if not (path / "meta.json").is_file():
        raise ConfigError(f"resume: {path} is not a complete checkpoint directory (no meta.json)")
    return [path]


def _restore(point: ResumePoint, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> None:
    """Model, optimizer, scheduler and RNG from ``point``; CheckpointError names a file that fails."""
    path, state = point.path, point.state
    if _fsdp(model):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(model, optimizer)
        box = {"model": msd, "optim": osd}
        try:
            dcp.load(box, checkpoint_id=str(path / "dcp"))  # reads dcp/.metadata with pickle (DCP's format)
        except Exception as e:
            raise CheckpointError(path / "dcp", _reason(e)) from None
        set_state_dict(model, optimizer, model_state_dict=box["model"], optim_state_dict=box["optim"])
    else:
        weights = path / "trainable.safetensors"
        try:
            saved = load_file(str(weights))
        except Exception as e:
            raise CheckpointError(weights, _reason(e)) from None
        if saved and all(k.startswith("module.") for k in saved):  # written under DDP by an earlier version
            saved = {k.removeprefix("module."): v for k, v in saved.items()}
        params = dict(_unwrap(model).named_parameters())
        expected = {n for n, p in params.items() if p.requires_grad}
        if set(saved) != expected:
            missing, extra = sorted(expected - set(saved)), sorted(set(saved) - expected)
            raise ConfigError(
                f"{path} holds a different set of trainable parameters (missing {missing[:5]}, extra "
                f"{extra[:5]}): the finetune mode or freezing changed; start a new run_dir"
            )
        changed = [
            (n, list(t.shape), list(params[n].shape)) for n, t in saved.items() if t.shape != params[n].shape
        ]
        if changed:  # a setting that shapes a parameter differs: a config mismatch, not a damaged file
            n, was, now = changed[0]
            raise ConfigError(
                f"{weights}: {len(changed)} trainable parameters changed shape, e.g. {n} {was} -> {now}: a "
                "setting that shapes the model differs from the checkpoint's (for TTT-MLP, ttt.chunk_size "
                "shapes token_offset); resume with the checkpoint's settings or start a new run_dir"
            )
        with torch.no_grad():
            for n, t in saved.items():
                params[n].copy_(t.to(params[n].dtype))
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise CheckpointError(path / "trainer_state.pt", f"optimizer state: {_reason(e)}") from None
    try:
        scheduler.load_state_dict(state["scheduler"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(path / "trainer_state.pt", f"scheduler state: {_reason(e)}") from None
    rng = point.rng or {}
    try:
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(path / "rng", _reason(e)) from None


class Resumer:
    """Chooses the checkpoint a run continues from (``cfg.resume``) and restores it.

    ``auto``: the newest complete checkpoint that loads. One that fails (a truncated weight file, a
    corrupt ``trainer_state.pt`` or RNG file) is reported with the file and the reason, the next older
    one is tried, and the failed one is moved aside (``.unloadable.``) once the run has resumed. If none
    loads the run is refused. An explicit ``resume: PATH`` that fails is refused (ConfigError). Every
    process reads its own files; all agree on the choice.
    """

    def __init__(self, cfg, dist_info: DistInfo) -> None:
        self.cfg, self.dist_info = cfg, dist_info
        self.explicit = cfg.resume not in ("auto", "never")
        self.candidates = resume_candidates(cfg)
        self.rejected: list[tuple[Path, str]] = []
        self.point: ResumePoint | None = None

    def _everyone_ok(self, ok: bool) -> bool:
        flag = torch.tensor([0.0 if ok else 1.0], device=self.dist_info.device)
        return float(all_reduce_sum(flag)[0]) == 0.0

    def _reject(self, path: Path, err: Exception | None) -> None:
        why = str(err) if err is not None else "another process could not read its files (see its log)"
        if self.explicit:
            raise ConfigError(f"resume: cannot load checkpoint {path}: {why}")
        logger.warning("cannot resume from %s: %s; trying the previous checkpoint", path, why)
        self.rejected.append((path, why))

    def pick(self) -> ResumePoint | None:
        """The next checkpoint whose files read (None: start from scratch)."""
        self.point = None
        while self.candidates:
            path = self.candidates.pop(0)
            point, err = None, None
            try:
                point = read_resume_point(path, self.dist_info.rank)
            except CheckpointError as e:
                err = e
            if self._everyone_ok(err is None):
                self.point = point
                return point
            self._reject(path, err)
        if self.rejected:
            raise ConfigError(
                f"no checkpoint in {checkpoint_root(self.cfg.run_dir)} can be loaded (reasons above); "
                "move them away to start over, or choose a new run_dir (nothing was deleted)"
            )
        return None

    def restore(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler,
        check: Callable[[ResumePoint], None],
    ) -> ResumePoint | None:
        """Restore the picked checkpoint, falling back (``auto``) past one whose weights fail to load;
        ``check`` vets each fallback's config before it is used."""
        while self.point is not None:
            err = None
            try:
                _restore(self.point, model, optimizer, scheduler)
            except CheckpointError as e:
                err = e
            if self._everyone_ok(err is None):
                return self.point
            self._reject(self.point.path, err)
            if self.pick() is not None:
                check(self.point)
        return None

    def set_aside_newer(self) -> None:
        """Rank 0, once resumed: move aside the checkpoints that failed to load and those newer than the
        resumed one, so the run's checkpoints stay one history and its own saves are never blocked."""
        for path, why in self.rejected:
            if path.is_dir():
                move_aside(path, "unloadable", why)
        if self.point is None:
            return
        for step, path in list_checkpoints(self.cfg.run_dir):
            if step > self.point.step:
                move_aside(path, "superseded", f"newer than {self.point.path}, which this run continues from")


# ---------------------------------------------------------------- when to save


class SaveSchedule:
    """When the trainer writes and rotates checkpoints, and what a diverged run resumes from.

    A checkpoint is due every ``checkpoint.interval`` steps (0: none) and at ``max_steps``, but never
    written while the run is in a streak of non-finite (skipped) steps: the weights are those that
    produced it. A save that falls due in a streak waits for the next finite step (one due at
    ``max_steps`` is not written: :attr:`pending` stays set and the trainer fails).

    A checkpoint is *vouched for* once the step after it was finite (its weights gave a finite loss); the
    final one counts as vouched for. Rotation to ``checkpoint.keep_last`` runs then, never deleting the
    newest vouched checkpoint nor the *protected* one: the newest vouched checkpoint when a streak starts, kept
    until another streak protects a newer one (saved in each checkpoint as ``protected_step``). When a run
    diverges, a newest checkpoint that was not vouched for (the streak began right after it) is moved
    aside (``.suspect.``), so a relaunch with a lower learning rate resumes from weights that worked.
    """

    def __init__(self, cfg, is_main: bool, resumed: ResumePoint | None = None) -> None:
        self.interval, self.max_steps = cfg.checkpoint.interval, cfg.max_steps
        self.keep_last, self.run_dir, self.is_main = cfg.checkpoint.keep_last, cfg.run_dir, is_main
        self.last_saved = resumed.step if resumed is not None else None
        self.protected = resumed.state.get("protected_step") if resumed is not None else None
        self.vouched: int | None = None
        self.pending = False

    def due(self, step: int, nonfinite_run: int) -> bool:
        """Called once per step, after the optimizer step or the skip; True: save now."""
        if nonfinite_run == 0 and self.last_saved == step - 1 and self.vouched != self.last_saved:
            self.vouched = self.last_saved
            self._rotate()
        if nonfinite_run == 1 and self.vouched is not None:
            self.protected = self.vouched
        was_pending = self.pending
        self.pending = (
            was_pending or bool(self.interval and step % self.interval == 0) or step == self.max_steps
        )
        if self.pending and nonfinite_run > 0:
            if not was_pending:
                logger.warning(
                    "step %d: not saving a checkpoint in a run of non-finite steps (the weights produced "
                    "them); the save waits for the next finite step",
                    step,
                )
            return False
        return self.pending

    def saved(self, step: int) -> None:
        self.last_saved, self.pending = step, False
        if step == self.max_steps:  # the run's result: rotate to keep_last (the protected one stays)
            self.vouched = step
            self._rotate()

    def state(self) -> dict[str, Any]:
        return {"protected_step": self.protected}

    def _rotate(self) -> None:
        if self.is_main:
            keep = {s for s in (self.vouched, self.protected) if s is not None}
            rotate_checkpoints(self.run_dir, self.keep_last, keep)

    def diverged(self) -> str:
        """Set aside an unvouched newest checkpoint (rank 0); a line saying how to continue."""
        if self.last_saved is not None and self.last_saved != self.vouched:
            path = checkpoint_root(self.run_dir) / f"step_{self.last_saved:06d}"
            if self.is_main and path.is_dir():
                move_aside(
                    path, "suspect", f"the step after it ({self.last_saved + 1}) was already non-finite"
                )
            self.last_saved = None
        good = self.vouched if self.vouched is not None else self.last_saved
        if good is None:
            good = max((s for s, _ in list_checkpoints(self.run_dir)), default=None)
        if good is None:
            return (
                "No checkpoint to resume from: lower optim.lr or ttt.eta (or check the data) and start again."
            )
        return (
            "Lower optim.lr or ttt.eta (or check the data) and launch again: it resumes from checkpoint "
            f"step_{good:06d}, whose weights still gave finite steps (kept by rotation)."
        )
