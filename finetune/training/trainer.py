"""The training loop: :func:`train`, used by ``train.py`` under torchrun or alone.

:class:`Trainer` reads top to bottom: set-up (model, data, optimizer, resume, monitoring), then for
every step one optimisation step, logging, evaluation and checkpointing. What the steps use has its
own module: the objective in ``loss``, held-out metrics in ``evaluation``, datasets in ``data``,
saving and resuming in ``checkpointing``, DDP / FSDP and precision in ``distributed``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moshi_ttt import set_ttt_eta, ttt_layers

from ..args import TrainConfig, check_resume_compatible, config_to_yaml
from ..data import BatchPlan, ResumableLoader
from ..data.build import build_datasets, report_windows
from ..data.loader import eval_plan
from ..preflight import absolute_paths, check_config_paths
from ..schema import ConfigError, to_dict
from . import distributed as D
from .checkpointing import ResumePoint, Resumer, SaveSchedule, claimed_run_dir, save_checkpoint
from .eta_auto import EtaCalibration, calibrate_eta, dataset_batches
from .evaluation import evaluate
from .loss import loss_weights, training_loss
from .model import build_model, param_table
from .monitoring import (
    Metrics,
    fmt_duration,
    init_wandb,
    setup_logging,
    sweep_agent_run_id,
    ttt_console_line,
    ttt_telemetry,
)
from .optim import apply_new_lrs, build_optimizer

logger = logging.getLogger("finetune")


class Diverged(RuntimeError):
    """The run stopped in a streak of non-finite steps (its checkpoints are intact)."""


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Fine-tune per ``cfg``; returns a summary (final step, last losses, run directory).

    With several processes, a process that dies, hangs or fails ends the others too, within
    ``distributed.timeout_sec``, with a message naming its rank
    (:class:`~finetune.training.distributed.PeerWatch`; raised here as
    :class:`~finetune.training.distributed.PeerFailure`)."""
    dist_info = D.init_distributed(cfg.device, cfg.distributed.backend, cfg.distributed.timeout_sec)
    if dist_info.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
    setup_logging(dist_info.is_main)
    watch = (
        D.PeerWatch(dist_info.rank, dist_info.world_size, cfg.distributed.timeout_sec)
        if dist_info.distributed
        else None
    )
    group_broken = False
    try:
        absolute_paths(cfg)
        check_config_paths(cfg)  # before run_dir or the model exists: a refused run leaves nothing behind
        run_dir = Path(cfg.run_dir)
        with claimed_run_dir(run_dir, dist_info.is_main):
            return Trainer(cfg, dist_info, run_dir).run()
    except Exception as e:
        if watch is None:
            raise
        group_broken = D.is_comms_error(e)
        err = watch.on_error(e)
        if err is e:
            raise
        raise err from e
    finally:
        if watch is not None:
            watch.finish()
        if not group_broken:  # tearing down a group whose peer is gone can block (NCCL): exiting frees it
            D.destroy()


@dataclass
class StepResult:
    """What one optimisation step measured over the global batch."""

    loss: float  # the weighted objective
    text_nll: float  # per-token NLL (nats)
    audio_nll: float
    grad_norm: float  # before clipping
    data_time: float  # seconds spent waiting for the batch


class Trainer:
    """One training run in ``run_dir``: set up (and resumed) by the constructor, trained by :meth:`run`."""

    def __init__(self, cfg: TrainConfig, dist_info: D.DistInfo, run_dir: Path) -> None:
        self.cfg, self.dist, self.run_dir = cfg, dist_info, run_dir
        self.cfg_dict = to_dict(cfg)
        self.resumer = Resumer(cfg, dist_info)
        self.eta_calibration: EtaCalibration | None = None  # ttt.eta: auto, once chosen
        if self.resumer.pick() is not None:  # an incompatible checkpoint is refused before any build
            self._vet(self.resumer.point)
        self._setup_model()
        self._setup_data()
        self._setup_optimizer()
        self._resume()
        self._setup_monitoring()

    # ---------------------------------------------------------------- set-up

    def _vet(self, point: ResumePoint) -> None:
        saved_world = int(point.state["world_size"])
        check_resume_compatible(point.config, self.cfg_dict, saved_world, self.dist.world_size)

    def _setup_model(self) -> None:
        self.built = build_model(self.cfg, self.dist.device)
        self.base = self.built.model  # the model itself, without a DDP / FSDP wrapper
        self.base.train()
        logger.info("trainable parameters (finetune=%s):\n%s", self.cfg.finetune, param_table(self.base))
        if D.use_bf16(self.cfg, self.dist) and self.dist.device.type == "cpu":
            logger.warning("precision bf16 on CPU: bf16 autocast on the CPU, usually slower than fp32")

    def _setup_data(self) -> None:
        cfg, rank, world = self.cfg, self.dist.rank, self.dist.world_size
        self.train_set, self.eval_set = build_datasets(cfg, self.base)
        report_windows(cfg, self.base, self.train_set)
        plan = BatchPlan(
            len(self.train_set), cfg.batch_size, rank, world, seed=cfg.seed, shuffle=cfg.data.shuffle
        )
        if self.eval_set is not None:  # a too-small held-out set fails now, not at the first evaluation
            eval_plan(len(self.eval_set), cfg.batch_size, rank, world)
        self.loader = ResumableLoader(self.train_set, plan, num_workers=cfg.data.num_workers)

    def _setup_optimizer(self) -> None:
        self.model = D.wrap_model(self.base, self.cfg, self.dist)
        self.optimizer, self.scheduler = build_optimizer(self.model, self.cfg)
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def _resume(self) -> None:
        """Restore the chosen checkpoint, if any (weights, optimizer, schedule, data position), and
        write the run's config.yaml."""
        point = self.resumer.restore(self.model, self.optimizer, self.scheduler, self._vet)
        self.schedule = SaveSchedule(self.cfg, self.dist.is_main, point)
        self.start_step, self.nonfinite_run = 0, 0
        self.wandb_id = uuid.uuid4().hex[:12]
        self.resumed_from = str(point.path) if point is not None else None
        if point is not None:
            self.start_step = point.step
            self.loader.load_state_dict(point.data_state)
            self.wandb_id = point.state.get("wandb_id") or self.wandb_id
            apply_new_lrs(self.optimizer, self.scheduler, self.cfg)
            logger.info("resumed from %s at step %d", point.path, self.start_step)
            if point.state.get("eta_auto") is not None and self._eta_auto:
                # The etas chosen before the checkpoint, not a new calibration on trained weights.
                self.eta_calibration = EtaCalibration.from_state_dict(point.state["eta_auto"])
                set_ttt_eta(self.base, self.eta_calibration.etas)
                logger.info(
                    "ttt.eta: auto: the etas chosen at step %d (from the checkpoint): %s",
                    self.eta_calibration.step,
                    self.eta_calibration.describe(),
                )
        # A wandb sweep agent launched this run (scripts/sweep_point.py): log to the run it assigned,
        # which its sweep tracks, also when this point resumes an interrupted run.
        self.wandb_id = sweep_agent_run_id() or self.wandb_id
        if self.dist.is_main:
            self.resumer.set_aside_newer()
            (self.run_dir / "config.yaml").write_text(config_to_yaml(self.cfg))
        D.barrier()

    def _setup_monitoring(self) -> None:
        cfg, main = self.cfg, self.dist.is_main
        self.wandb_run = init_wandb(cfg, self.run_dir, self.wandb_id, self.cfg_dict) if main else None
        self.metrics = Metrics(self.run_dir, main, self.wandb_run)
        self.metrics.start(self.start_step, self.resumed_from)
        self.ttt_layers = list(ttt_layers(self.base).values()) if cfg.ttt.enabled else []
        # Moshi's 12.5 Hz time steps (one text token + n_q audio tokens each) per optimisation step.
        self.frames_per_step = cfg.batch_size * cfg.grad_accum * self.dist.world_size * cfg.data.num_frames

    # ---------------------------------------------------------------- the loop

    def run(self) -> dict[str, Any]:
        """Train from the start (or resumed) step to ``max_steps``; returns the last step's values."""
        cfg = self.cfg
        if self.start_step >= cfg.max_steps:
            logger.info(
                "%s is already at step %d of %d: nothing to do (raise max_steps to continue)",
                self.run_dir,
                self.start_step,
                cfg.max_steps,
            )
        self.batches = iter(self.loader)
        self.t_start = time.time()
        last: dict[str, Any] = {}
        for step in range(self.start_step + 1, cfg.max_steps + 1):
            t0 = time.time()
            D.set_phase(f"step {step}")
            log_now = step % cfg.log_interval == 0 or step == cfg.max_steps or step == self.start_step + 1
            result = self._optimisation_step(step, log_now)
            step_time = time.time() - t0
            last = {
                "loss": result.loss,
                "text_nll": result.text_nll,
                "audio_nll": result.audio_nll,
                "grad_norm": result.grad_norm,
                "lr": self.scheduler.get_last_lr()[0],
            }
            if log_now:
                self._log(step, last, step_time, result.data_time)
            if self._eta_auto and self.eta_calibration is None and step >= cfg.ttt.eta_auto.steps:
                self._calibrate_eta(step)
            if self.eval_set is not None and (
                (cfg.eval.interval and step % cfg.eval.interval == 0) or step == cfg.max_steps
            ):
                last.update({f"eval_{k}": v for k, v in self._evaluate(step).items()})
            if self.schedule.due(step, self.nonfinite_run):
                self._save(step)
        return self._finish(last)

    # ---------------------------------------------------------------- one optimisation step

    def _optimisation_step(self, step: int, log_now: bool) -> StepResult:
        """Forward and backward over ``grad_accum`` micro-batches, gradient clipping, and the optimizer
        step (skipped when the loss or the gradient is not finite); the lr schedule always advances."""
        t0 = time.time()
        self.optimizer.zero_grad(set_to_none=True)
        micro_batches = [next(self.batches).to(self.dist.device) for _ in range(self.cfg.grad_accum)]
        data_time = time.time() - t0
        acc = self._forward_backward(micro_batches, log_now)
        max_norm = self.cfg.optim.max_grad_norm if self.cfg.optim.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        acc = D.all_reduce_sum(acc)
        loss = (acc[0] / self.dist.world_size).item()
        if math.isfinite(loss) and math.isfinite(float(grad_norm)):
            self.optimizer.step()
            self.nonfinite_run = 0
        else:
            self._skip(step, loss, float(grad_norm))
        with warnings.catch_warnings():  # a skipped step still advances the schedule, on purpose
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            self.scheduler.step()
        return StepResult(
            loss, (acc[1] / acc[2]).item(), (acc[3] / acc[4]).item(), float(grad_norm), data_time
        )

    def _forward_backward(self, micro_batches: list[torch.Tensor], log_now: bool) -> torch.Tensor:
        """Accumulate the gradients of the micro-batches; returns this process's sums ``[5]``: loss, text
        NLL sum and count, audio NLL sum and count."""
        cfg, model = self.cfg, self.model
        weights = [loss_weights(cfg.loss, self.base, codes) for codes in micro_batches]
        # Normalise by the global batch's weight sums (all micro-batches, all ranks); DDP and FSDP average
        # gradients over ranks, hence the division by the world size.
        local = torch.stack([torch.stack([tw.sum(), aw.sum()]) for tw, aw in weights]).sum(0).double()
        norms = (D.all_reduce_sum(local) / self.dist.world_size).tolist()
        acc = torch.zeros(5, device=self.dist.device, dtype=torch.float64)
        for micro, (codes, w) in enumerate(zip(micro_batches, weights)):
            for g in self.ttt_layers:
                g.record_stats = log_now and micro == 0
            sync = micro == cfg.grad_accum - 1 or not isinstance(model, nn.parallel.DistributedDataParallel)
            with model.no_sync() if not sync else contextlib.nullcontext(), D.autocast(cfg, self.dist):
                out = model(codes)
                parts = training_loss(cfg.loss, out, codes, w, norms)
                parts.loss.backward()
            sums = [parts.loss.detach(), parts.text_nll_sum, parts.text_count]
            acc += torch.stack(sums + [parts.audio_nll_sum, parts.audio_count]).double()
        return acc

    def _skip(self, step: int, loss: float, grad_norm: float) -> None:
        """A non-finite step: no update; too many in a row stop the run."""
        self.nonfinite_run += 1
        self.optimizer.zero_grad(set_to_none=True)
        logger.warning(
            "step %d: non-finite loss (%s) or gradient norm (%s); step skipped (%d in a row)",
            step,
            loss,
            grad_norm,
            self.nonfinite_run,
        )
        self.metrics.log("skip", step, {"loss": loss, "grad_norm": grad_norm, "in_a_row": self.nonfinite_run})
        if self.nonfinite_run >= self.cfg.max_nonfinite_steps:
            raise Diverged(
                f"{self.nonfinite_run} consecutive steps had a non-finite loss or gradient (last at step {step}); "
                f"stopping. {self.schedule.diverged()}"
            )

    # ---------------------------------------------------------------- logging, evaluation, checkpoints

    def _log(self, step: int, last: dict[str, Any], step_time: float, data_time: float) -> None:
        elapsed = time.time() - self.t_start
        per_step = elapsed / max(1, step - self.start_step)
        values = dict(
            last,
            frames_per_s=self.frames_per_step / max(step_time, 1e-9),
            step_time=step_time,
            data_time=data_time,
        )
        values["data/skipped_items"] = self.loader.skipped_all_ranks()
        for group in self.optimizer.param_groups:
            values[f"lr/{group.get('name', 'group')}"] = group["lr"]
        if self.ttt_layers:
            values.update(ttt_telemetry(self.base))
        self.metrics.log("train", step, values)
        logger.info(
            "step %d/%d | loss %.4f (text %.3f, audio %.3f) | grad %.2f | lr %.2e | %.0f frames/s | left %s",
            step,
            self.cfg.max_steps,
            last["loss"],
            last["text_nll"],
            last["audio_nll"],
            last["grad_norm"],
            last["lr"],
            values["frames_per_s"],
            fmt_duration(per_step * (self.cfg.max_steps - step)),
        )
        ttt_line = ttt_console_line(values)
        if ttt_line:
            logger.info("step %d | %s", step, ttt_line)

    @property
    def _eta_auto(self) -> bool:
        return self.cfg.ttt.enabled and self.cfg.ttt.auto

    def _calibrate_eta(self, step: int) -> None:
        """``ttt.eta: auto``: rescale every TTT layer's eta so that its ``ttt/base`` on the first
        training batches lands on the target (:func:`finetune.training.eta_auto.calibrate_eta`)."""
        a = self.cfg.ttt.eta_auto
        batches = dataset_batches(self.train_set, a.batches, self.cfg.batch_size)
        try:
            cal = calibrate_eta(
                self.base,
                batches,
                a.start_eta(self.cfg.ttt.eta_norm),
                a.target,
                per_layer=a.per_layer,
                step=step,
                autocast=lambda: D.autocast(self.cfg, self.dist),
            )
        except ValueError as e:  # a setting to change (one "config error:" line from train.py)
            raise ConfigError(str(e)) from None
        self.eta_calibration = cal
        logger.info("ttt.eta: auto at step %d: %s", step, cal.describe())
        values = {"start": cal.start, "target": cal.target}
        for name, m in (("ratio", cal.ratios), ("eta", cal.etas), ("final_ratio", cal.final_ratios)):
            values.update({f"{name}/L{i}": v for i, v in m.items()})
        self.metrics.log("eta_auto", step, values)

    def _evaluate(self, step: int) -> dict[str, float]:
        D.set_phase(f"evaluating at step {step}")
        ev = evaluate(self.model, self.base, self.eval_set, self.cfg, self.dist)
        self.metrics.log("eval", step, ev)
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
        return ev

    def _save(self, step: int) -> None:
        D.set_phase(f"saving checkpoint step {step}")
        save_checkpoint(
            step=step,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            data_state=self.loader.state_dict(),
            extra={
                "wandb_id": self.wandb_id,
                **self.schedule.state(),
                **({"eta_auto": self.eta_calibration.state_dict()} if self.eta_calibration else {}),
            },
            config_yaml=config_to_yaml(self.cfg),
            raw_config=self.built.raw_config,
            cfg=self.cfg,
            dist_info=self.dist,
        )
        self.schedule.saved(step)

    def _finish(self, last: dict[str, Any]) -> dict[str, Any]:
        if self.schedule.pending:
            raise Diverged(
                f"the run ended in {self.nonfinite_run} non-finite step(s) in a row, so its final checkpoint "
                f"was not written. {self.schedule.diverged()}"
            )
        if self.wandb_run is not None:
            self.wandb_run.finish()
        logger.info(
            "done: %d steps in %s, run directory %s",
            self.cfg.max_steps - self.start_step,
            fmt_duration(time.time() - self.t_start),
            self.run_dir,
        )
        return {"step": self.cfg.max_steps, "run_dir": str(self.run_dir), **last}
