"""The training loop: one function, :func:`train`, used by ``train.py`` under torchrun or alone."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from moshi_ttt import ttt_gatings

from . import distributed as D
from .args import TrainConfig, config_to_yaml
from .checkpointing import clean_stale_tmp, load_checkpoint, resolve_resume, save_checkpoint
from .data import BatchPlan, ResumableLoader, SyntheticCodes, eval_batches
from .data.loader import eval_plan
from .loss import compute_loss, target_weights
from .model import build_model, param_table
from .monitoring import Metrics, fmt_duration, init_wandb, setup_logging
from .optim import build_optimizer
from .schema import ConfigError, to_dict

logger = logging.getLogger("finetune")

# Changing these between a checkpoint and its resume changes shapes, the trained parameter set or the
# meaning of the saved data position: refused. Anything else that differs is allowed with a warning.
_FIXED_KEYS = (
    "model",
    "lora",
    "finetune",
    "ttt.enabled",
    "ttt.layers",
    "ttt.start_layer",
    "ttt.layer_frequency",
    "ttt.conv_kernel_size",
    "ttt.conv_depthwise",
    "ttt.target_source",
    "ttt.variant",
    "ttt.mlp_heads",
    "ttt.mlp_expansion",
    "ttt.freeze_slow_weights",
    "ttt.train_w_down",
    "batch_size",
    "data.source",
    "data.train",
    "data.duration_sec",
    "data.synthetic",
    "seed",
)


def _get(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part, {}) if isinstance(d, dict) else {}
    return d


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def check_resume_compatible(
    saved: dict[str, Any], current: dict[str, Any], saved_world: int, world: int
) -> None:
    bad = [k for k in _FIXED_KEYS if _get(saved, k) != _get(current, k)]
    if saved_world != world:
        bad.append(f"world size ({saved_world} -> {world} processes)")
    if bad:
        raise ConfigError(
            f"cannot resume: the checkpoint was trained with different {', '.join(bad)}; these change shapes, "
            "the trained parameters or the data order. Use the original settings, or start a new run_dir"
        )
    fs, fc = _flatten(saved), _flatten(current)
    changed = sorted(k for k in set(fs) | set(fc) if fs.get(k) != fc.get(k) and k not in ("resume",))
    if changed:
        logger.warning(
            "resuming with changed settings: %s",
            ", ".join(f"{k}: {fs.get(k)!r} -> {fc.get(k)!r}" for k in changed),
        )


def build_datasets(cfg: TrainConfig, model) -> tuple[Any, Any]:
    if cfg.data.source == "synthetic":
        common = dict(
            num_frames=cfg.data.num_frames,
            n_q=model.n_q,
            card=model.card,
            text_card=model.text_card,
            text_padding_id=model.text_padding_token_id,
        )
        train = SyntheticCodes(cfg.data.synthetic.num_train, seed=cfg.seed, **common)
        evals = SyntheticCodes(cfg.data.synthetic.num_eval, seed=cfg.seed + 7919, **common)
        return train, evals
    if cfg.data.source == "recall":
        from .data.recall import RecallTask

        r = cfg.data.recall
        context = model.transformer.layers[0].self_attn.context
        receptive = len(model.transformer.layers) * (context - 1)  # stacked windows reach this far
        common = dict(
            num_frames=cfg.data.num_frames,
            context=context,
            far_min=receptive + 2,
            num_keys=r.num_keys,
            num_values=r.num_values,
            pairs=r.pairs,
            text_card=model.text_card,
            text_padding_id=model.text_padding_token_id,
            n_q=model.n_q,
        )
        return RecallTask(r.num_train, seed=cfg.seed, **common), RecallTask(
            r.num_eval, seed=cfg.seed + 7919, **common
        )
    from .data.build import conversation_datasets

    return conversation_datasets(cfg, model)


def _wrap(model: nn.Module, cfg: TrainConfig, dist_info: D.DistInfo) -> nn.Module:
    if not dist_info.distributed:
        return model
    if cfg.distributed.strategy == "ddp":
        return nn.parallel.DistributedDataParallel(
            model,
            device_ids=[dist_info.local_rank] if dist_info.device.type == "cuda" else None,
            broadcast_buffers=False,
        )
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from .fsdp import shard_model

    mp = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if _use_bf16(cfg, dist_info) else None, reduce_dtype=torch.float32
    )
    for p in model.parameters():  # FSDP shards uniform float32 parameters; bf16 compute via the policy
        p.data = p.data.float()
    shard_model(model, mp)
    return model


def _use_bf16(cfg: TrainConfig, dist_info: D.DistInfo) -> bool:
    if cfg.precision == "bf16":
        return True
    return cfg.precision == "auto" and dist_info.device.type == "cuda"


def _autocast(cfg: TrainConfig, dist_info: D.DistInfo):
    """bf16 autocast on GPU (FSDP casts through its mixed-precision policy instead)."""
    fsdp = dist_info.distributed and cfg.distributed.strategy == "fsdp"
    if _use_bf16(cfg, dist_info) and not fsdp:
        return torch.autocast(device_type=dist_info.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _weights(cfg: TrainConfig, model, codes: torch.Tensor):
    return target_weights(
        codes,
        list(model.delays),
        model.dep_q,
        text_padding_ids=(model.text_padding_token_id, model.end_of_text_padding_id),
        first_codebook_weight=cfg.loss.first_codebook_weight,
        text_padding_weight=cfg.loss.text_padding_weight,
        zero_token_id=model.zero_token_id,
    )


def _loss(cfg: TrainConfig, out, codes, weights, norms=None):
    return compute_loss(
        out, codes, weights, norms=norms, text_weight=cfg.loss.text_weight, audio_weight=cfg.loss.audio_weight
    )


@torch.no_grad()
def evaluate(model, base, dataset, cfg: TrainConfig, dist_info: D.DistInfo) -> dict[str, float]:
    """Held-out loss and unweighted NLL / perplexity (exp of the per-token NLL in nats)."""
    model.eval()
    sums = torch.zeros(6, device=dist_info.device, dtype=torch.float64)  # loss, text, n, audio, n, batches
    for codes in eval_batches(
        dataset, cfg.batch_size, cfg.eval.num_batches, dist_info.rank, dist_info.world_size
    ):
        codes = codes.to(dist_info.device)
        with _autocast(cfg, dist_info):
            out = model(codes)
        p = _loss(cfg, out, codes, _weights(cfg, base, codes))
        one = torch.ones((), device=sums.device)
        sums += torch.stack(
            [p.loss.detach(), p.text_nll_sum, p.text_count, p.audio_nll_sum, p.audio_count, one]
        )
    sums = D.all_reduce_sum(sums)
    recall = recall_metrics(model, dataset, cfg, dist_info) if hasattr(dataset, "queries") else {}
    model.train()
    text_nll = (sums[1] / sums[2]).item()
    audio_nll = (sums[3] / sums[4]).item()
    nll = ((sums[1] + sums[3]) / (sums[2] + sums[4])).item()
    return {
        "loss": (sums[0] / sums[5]).item(),
        "text_nll": text_nll,
        "audio_nll": audio_nll,
        "text_ppl": math.exp(min(text_nll, 50)),
        "audio_ppl": math.exp(min(audio_nll, 50)),
        "ppl": math.exp(min(nll, 50)),
        **recall,
    }


@torch.no_grad()
def recall_metrics(model, dataset, cfg: TrainConfig, dist_info: D.DistInfo) -> dict[str, float]:
    """Value accuracy and NLL at recall queries, within (near) and beyond (far) the attention window."""
    from torch.nn import functional as F

    plan = eval_plan(len(dataset), cfg.batch_size, dist_info.rank, dist_info.world_size)
    n = (
        min(cfg.eval.num_batches, plan.batches_per_epoch)
        if cfg.eval.num_batches > 0
        else plan.batches_per_epoch
    )
    sums = torch.zeros(6, dtype=torch.float64)  # near: hits, nll, count; far: hits, nll, count
    for step in range(n):
        idx = plan.indices(0, step)
        codes = torch.stack([dataset[i] for i in idx]).to(dist_info.device)
        with _autocast(cfg, dist_info):
            logits = model(codes).text_logits[:, 0].float()  # [B, T, V]
        for b, i in enumerate(idx):
            for q in dataset.queries(i):
                lg = logits[b, q.value_pos]
                k = 3 if q.far else 0
                sums[k] += float(lg.argmax() == q.value)
                sums[k + 1] += float(F.cross_entropy(lg[None], torch.tensor([q.value], device=lg.device)))
                sums[k + 2] += 1
    sums = D.all_reduce_sum(sums.to(dist_info.device)).cpu()
    out = {}
    for k, name in ((0, "near"), (3, "far")):
        if sums[k + 2] > 0:
            out[f"recall_acc_{name}"] = (sums[k] / sums[k + 2]).item()
            out[f"recall_nll_{name}"] = (sums[k + 1] / sums[k + 2]).item()
    return out


def ttt_telemetry(base) -> dict[str, float]:
    """Per TTT layer: what its variant reports (``moshi_ttt.layer.TELEMETRY``, e.g. In-Place TTT's
    ``||w_down - w_down_pretrained||``, the TTT term relative to the base term, one chunk's update
    relative to ``||W^(0)||``)."""
    return {f"ttt/layer{i}/{k}": v for i, g in ttt_gatings(base).items() for k, v in g.telemetry().items()}


# Console names of the telemetry a user reads to see whether TTT is off (~1e-6) or swamping (> 1).
_CONSOLE_TTT = {"term_ratio": "ttt/base", "chunk_update_ratio": "dW/W0"}


def ttt_console_line(values: dict[str, Any]) -> str | None:
    """``ttt/base L1 3.1e-03 L3 8.0e-03 | dW/W0 L1 ...`` from the logged telemetry, or None."""
    parts = []
    for key, label in _CONSOLE_TTT.items():
        cells = [
            f"L{name.split('/')[1].removeprefix('layer')} {v:.1e}"
            for name, v in values.items()
            if name.startswith("ttt/layer") and name.endswith("/" + key)
        ]
        if cells:
            parts.append(f"{label} " + " ".join(cells))
    return " | ".join(parts) or None


def _report_windows(cfg: TrainConfig, base, train_set) -> None:
    """How the training windows compare with the attention window (conversation datasets)."""
    stats_of = getattr(train_set, "window_stats", None)
    if stats_of is None:
        return
    context = base.transformer.layers[0].self_attn.context or cfg.data.num_frames
    s = stats_of(context)
    logger.info(
        "data: %d windows of %d steps (%.0f s); %.0f%% of their frames are padding; %.0f%% hold more "
        "than the attention window (%d steps)",
        s["windows"],
        cfg.data.num_frames,
        cfg.data.duration_sec,
        100 * s["padding"],
        100 * s["beyond_context"],
        context,
    )
    if s["padding"] > 0.25:
        logger.warning(
            "%.0f%% of the training frames are padding: the loss ignores them but every layer still "
            "computes them. Conversations are shorter than data.duration_sec; shorten the windows, or "
            "train on longer conversations (see the README's long-context recipes)",
            100 * s["padding"],
        )
    if cfg.ttt.enabled and s["beyond_context"] < 0.5:
        logger.warning(
            "only %.0f%% of the windows hold more than the attention window (%d steps): elsewhere "
            "attention already sees everything a TTT fast weight could carry; use longer windows "
            "(data.duration_sec) and conversations, or a shorter model.context",
            100 * s["beyond_context"],
            context,
        )


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Fine-tune per ``cfg``; returns a summary (final step, last losses, run directory)."""
    dist_info = D.init_distributed(cfg.device, cfg.distributed.backend)
    if dist_info.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
    setup_logging(dist_info.is_main)
    try:
        return _train(cfg, dist_info)
    finally:
        D.destroy()


def _absolute_paths(cfg: TrainConfig) -> None:
    """Existing relative file paths become absolute, so a saved config works from any directory."""
    for section, keys in (
        (cfg.data, ("train", "eval", "tokenizer", "mimi_weights", "mimi_config", "cache_dir")),
        (cfg.model, ("config_path", "moshi_weights")),
    ):
        for key in keys:
            value = getattr(section, key)
            if value and not value.startswith("hf://") and Path(value).exists():
                setattr(section, key, str(Path(value).resolve()))


def _train(cfg: TrainConfig, dist_info: D.DistInfo) -> dict[str, Any]:
    _absolute_paths(cfg)
    run_dir = Path(cfg.run_dir)
    resume_path = resolve_resume(cfg)
    cfg_dict = to_dict(cfg)
    trainer_state: dict[str, Any] = {}
    if resume_path is not None:
        saved_cfg = yaml.safe_load((resume_path / "config.yaml").read_text())
        trainer_state = torch.load(resume_path / "trainer_state.pt", weights_only=True, map_location="cpu")
        check_resume_compatible(saved_cfg, cfg_dict, trainer_state["world_size"], dist_info.world_size)
    lock = None
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = _lock_run_dir(run_dir)
        clean_stale_tmp(run_dir)
        (run_dir / "config.yaml").write_text(config_to_yaml(cfg))
    D.barrier()

    built = build_model(cfg, dist_info.device)
    base = built.model
    base.train()
    logger.info("trainable parameters (finetune=%s):\n%s", cfg.finetune, param_table(base))
    train_set, eval_set = build_datasets(cfg, base)
    _report_windows(cfg, base, train_set)
    plan = BatchPlan(len(train_set), cfg.batch_size, dist_info.rank, dist_info.world_size, seed=cfg.seed)
    if eval_set is not None:  # a too-small held-out set fails now, not at the first evaluation
        eval_plan(len(eval_set), cfg.batch_size, dist_info.rank, dist_info.world_size)
    loader = ResumableLoader(train_set, plan, num_workers=cfg.data.num_workers)

    model = _wrap(base, cfg, dist_info)
    optimizer, scheduler = build_optimizer(model, cfg)
    start_step = 0
    nonfinite_run = 0
    wandb_id = uuid.uuid4().hex[:12]
    if resume_path is not None:
        state = load_checkpoint(
            resume_path, model=model, optimizer=optimizer, scheduler=scheduler, dist_info=dist_info
        )
        start_step = int(state["step"])
        loader.load_state_dict(state["data"])
        nonfinite_run = int(state.get("nonfinite_run", 0))
        wandb_id = state.get("wandb_id") or wandb_id
        _apply_new_lrs(optimizer, scheduler, cfg)
        logger.info("resumed from %s at step %d", resume_path, start_step)
    wandb_run = init_wandb(cfg, run_dir, wandb_id, cfg_dict) if dist_info.is_main else None
    metrics = Metrics(run_dir, dist_info.is_main, wandb_run)
    gatings = list(ttt_gatings(base).values()) if cfg.ttt.enabled else []

    frames_per_step = cfg.batch_size * cfg.grad_accum * dist_info.world_size * cfg.data.num_frames
    it = iter(loader)
    last: dict[str, Any] = {}
    if start_step >= cfg.max_steps:
        logger.info(
            "%s is already at step %d of %d: nothing to do (raise max_steps to continue)",
            run_dir,
            start_step,
            cfg.max_steps,
        )
    t_start, steps_timed = time.time(), 0
    params = [p for p in model.parameters() if p.requires_grad]
    for step in range(start_step + 1, cfg.max_steps + 1):
        t0 = time.time()
        log_now = step % cfg.log_interval == 0 or step == cfg.max_steps or step == start_step + 1
        optimizer.zero_grad(set_to_none=True)
        acc = torch.zeros(5, device=dist_info.device, dtype=torch.float64)
        micro_batches = [next(it).to(dist_info.device) for _ in range(cfg.grad_accum)]
        data_time = time.time() - t0
        weights = [_weights(cfg, base, codes) for codes in micro_batches]
        # Normalise by the global batch's weight sums (all micro-batches, all ranks); DDP and FSDP average
        # gradients over ranks, hence the division by the world size.
        local = torch.stack([torch.stack([tw.sum(), aw.sum()]) for tw, aw in weights]).sum(0).double()
        norms = (D.all_reduce_sum(local) / dist_info.world_size).tolist()
        for micro, (codes, w) in enumerate(zip(micro_batches, weights)):
            for g in gatings:
                g.record_stats = log_now and micro == 0
            sync = micro == cfg.grad_accum - 1 or not isinstance(model, nn.parallel.DistributedDataParallel)
            with model.no_sync() if not sync else contextlib.nullcontext(), _autocast(cfg, dist_info):
                out = model(codes)
                parts = _loss(cfg, out, codes, w, norms)
                parts.loss.backward()
            acc += torch.stack(
                [
                    parts.loss.detach(),
                    parts.text_nll_sum,
                    parts.text_count,
                    parts.audio_nll_sum,
                    parts.audio_count,
                ]
            ).double()
        max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        acc = D.all_reduce_sum(acc)
        loss = (acc[0] / dist_info.world_size).item()
        finite = math.isfinite(loss) and math.isfinite(float(grad_norm))
        if finite:
            optimizer.step()
            nonfinite_run = 0
        else:
            nonfinite_run += 1
            optimizer.zero_grad(set_to_none=True)
            logger.warning(
                "step %d: non-finite loss (%s) or gradient norm (%s); step skipped (%d in a row)",
                step,
                loss,
                float(grad_norm),
                nonfinite_run,
            )
            metrics.log(
                "skip", step, {"loss": loss, "grad_norm": float(grad_norm), "in_a_row": nonfinite_run}
            )
            if nonfinite_run >= cfg.max_nonfinite_steps:
                raise RuntimeError(
                    f"{nonfinite_run} consecutive steps had a non-finite loss or gradient (last at step {step}); "
                    "stopping. Lower optim.lr or ttt.eta, or check the data; the last checkpoint is intact"
                )
        with warnings.catch_warnings():  # a skipped step still advances the schedule, on purpose
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            scheduler.step()
        if step > start_step + 1:
            steps_timed += 1
        dt = time.time() - t0
        last = {
            "loss": loss,
            "text_nll": (acc[1] / acc[2]).item(),
            "audio_nll": (acc[3] / acc[4]).item(),
            "grad_norm": float(grad_norm),
            "lr": scheduler.get_last_lr()[0],
        }
        if log_now:
            elapsed = time.time() - t_start
            per_step = elapsed / max(1, step - start_step)
            values = dict(
                last, tokens_per_s=frames_per_step / max(dt, 1e-9), step_time=dt, data_time=data_time
            )
            values["data/skipped_items"] = loader.skipped
            for group in optimizer.param_groups:
                values[f"lr/{group.get('name', 'group')}"] = group["lr"]
            if gatings:
                values.update(ttt_telemetry(base))
            metrics.log("train", step, values)
            logger.info(
                "step %d/%d | loss %.4f (text %.3f, audio %.3f) | grad %.2f | lr %.2e | %.0f tok/s | eta %s",
                step,
                cfg.max_steps,
                loss,
                last["text_nll"],
                last["audio_nll"],
                last["grad_norm"],
                last["lr"],
                values["tokens_per_s"],
                fmt_duration(per_step * (cfg.max_steps - step)),
            )
            ttt_line = ttt_console_line(values)
            if ttt_line:
                logger.info("step %d | %s", step, ttt_line)
        is_last = step == cfg.max_steps
        if eval_set is not None and ((cfg.eval.interval and step % cfg.eval.interval == 0) or is_last):
            ev = evaluate(model, base, eval_set, cfg, dist_info)
            metrics.log("eval", step, ev)
            last.update({f"eval_{k}": v for k, v in ev.items()})
            logger.info(
                "eval step %d | loss %.4f | text nll %.3f (ppl %.2f) | audio nll %.3f (ppl %.2f)%s",
                step,
                ev["loss"],
                ev["text_nll"],
                ev["text_ppl"],
                ev["audio_nll"],
                ev["audio_ppl"],
                "".join(f" | {k} {ev[k]:.3f}" for k in ("recall_acc_near", "recall_acc_far") if k in ev),
            )
        if (cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0) or is_last:
            save_checkpoint(
                step=step,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                data_state=loader.state_dict(),
                extra={"nonfinite_run": nonfinite_run, "wandb_id": wandb_id},
                config_yaml=config_to_yaml(cfg),
                raw_config=built.raw_config,
                cfg=cfg,
                dist_info=dist_info,
            )
    if wandb_run is not None:
        wandb_run.finish()
    if lock is not None:
        lock.close()
    logger.info(
        "done: %d steps in %s, run directory %s",
        cfg.max_steps - start_step,
        fmt_duration(time.time() - t_start),
        run_dir,
    )
    return {"step": cfg.max_steps, "run_dir": str(run_dir), **last}


def _lock_run_dir(run_dir: Path):
    """An exclusive lock on ``run_dir`` for this run's lifetime: two trainings writing one run directory
    (a sweep launched twice, a relaunch while the first is alive) would corrupt its checkpoints."""
    import fcntl

    f = open(run_dir / ".lock", "a+")  # noqa: SIM115 - held open until the process exits
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        f.seek(0)
        owner = f.read().strip() or "?"
        f.close()
        raise RuntimeError(
            f"{run_dir} is in use by another training process (pid {owner}); nothing was changed"
        ) from e
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def _apply_new_lrs(optimizer, scheduler, cfg: TrainConfig) -> None:
    """A changed optim.lr / optim.ttt_lr takes effect on resume (the scheduler keeps its position)."""
    for i, group in enumerate(optimizer.param_groups):
        is_ttt = group.get("name", "").startswith("ttt")
        lr = cfg.optim.ttt_lr if (is_ttt and cfg.optim.ttt_lr is not None) else cfg.optim.lr
        if not math.isclose(scheduler.base_lrs[i], lr):
            logger.warning(
                "learning rate of group %s changed on resume: %g -> %g",
                group.get("name"),
                scheduler.base_lrs[i],
                lr,
            )
            scheduler.base_lrs[i] = lr
            group["initial_lr"] = lr
            group["lr"] = lr * scheduler.lr_lambdas[i](scheduler.last_epoch)
