"""AdamW and the learning-rate schedule: linear warmup, then cosine decay to ``min_lr_ratio``."""

from __future__ import annotations

import math

import torch
from torch import nn

from .args import TrainConfig
from .model import optimizer_groups


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the base lr at 0-based optimizer step ``step``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: TrainConfig):
    groups = optimizer_groups(model, cfg)
    opt = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    o = cfg.optim
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, o.warmup_steps, cfg.max_steps, o.min_lr_ratio)
    )
    return opt, sched
