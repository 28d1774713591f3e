"""AdamW and the learning-rate schedule: linear warmup then cosine decay (``cosine``), or
moshi-finetune's one-cycle schedule (``onecycle``, torch's ``OneCycleLR`` with its defaults)."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ..args import TrainConfig
from .model import optimizer_groups

logger = logging.getLogger("finetune")

# torch.optim.lr_scheduler.OneCycleLR's defaults, which moshi-finetune uses unchanged.
ONECYCLE_DIV_FACTOR = 25.0  # the first lr is lr / 25
ONECYCLE_FINAL_DIV_FACTOR = 1e4  # the last lr is lr / 25 / 1e4
ONECYCLE_BETA1 = (0.85, 0.95)  # beta1 falls to 0.85 while the lr rises, then returns to 0.95


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the base lr at 0-based optimizer step ``step``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _cos_anneal(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2 * (math.cos(math.pi * pct) + 1)


def _onecycle_phase(step: int, total: int, pct_start: float) -> tuple[bool, float]:
    """(rising?, fraction of the phase done) at 0-based step ``step``, as torch computes it: the rise
    ends at step ``pct_start * total - 1`` (a float), the fall at ``total - 1``. Where the rise ends
    at step 0 exactly torch divides zero by zero (moshi-finetune stops there); here step 0 is the peak."""
    end_rise = pct_start * total - 1
    if step <= end_rise:
        return True, step / end_rise if end_rise > 0 else 1.0
    return False, (step - end_rise) / (total - 1 - end_rise)


def onecycle_factor(step: int, total: int, pct_start: float) -> float:
    """torch ``OneCycleLR`` (cosine, two phases, default factors) as a multiplier of the peak lr."""
    first = 1 / ONECYCLE_DIV_FACTOR
    rising, pct = _onecycle_phase(step, total, pct_start)
    if rising:
        return _cos_anneal(first, 1.0, pct)
    return _cos_anneal(1.0, first / ONECYCLE_FINAL_DIV_FACTOR, pct)


def onecycle_beta1(step: int, total: int, pct_start: float) -> float:
    """The beta1 ``OneCycleLR`` gives Adam at ``step`` (its ``cycle_momentum``)."""
    low, high = ONECYCLE_BETA1
    rising, pct = _onecycle_phase(step, total, pct_start)
    return _cos_anneal(high, low, pct) if rising else _cos_anneal(low, high, pct)


class OneCycleSchedule(torch.optim.lr_scheduler.LambdaLR):
    """moshi-finetune's schedule: the one-cycle lr as a ``LambdaLR`` (so per-group base lrs and the
    trainer's resume logic work unchanged), plus the beta1 cycling torch's ``OneCycleLR`` does."""

    def __init__(self, optimizer: torch.optim.Optimizer, total: int, pct_start: float) -> None:
        self.total, self.pct_start = total, pct_start
        super().__init__(optimizer, lambda s: onecycle_factor(s, total, pct_start))

    def step(self, epoch: int | None = None) -> None:
        super().step(epoch)
        beta1 = onecycle_beta1(self.last_epoch, self.total, self.pct_start)
        for group in self.optimizer.param_groups:
            group["betas"] = (beta1, group["betas"][1])


def build_optimizer(model: nn.Module, cfg: TrainConfig):
    groups = optimizer_groups(model, cfg)
    opt = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    o = cfg.optim
    if o.schedule == "onecycle":
        return opt, OneCycleSchedule(opt, cfg.max_steps, o.pct_start)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, o.warmup_steps, cfg.max_steps, o.min_lr_ratio)
    )
    return opt, sched


def apply_new_lrs(optimizer: torch.optim.Optimizer, scheduler, cfg: TrainConfig) -> None:
    """A changed optim.lr / optim.ttt_params_lr takes effect on resume (the scheduler keeps its position)."""
    for i, group in enumerate(optimizer.param_groups):
        lr = cfg.optim.group_lr(group.get("name", "").startswith("ttt"))
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
