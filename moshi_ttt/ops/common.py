"""What the fast-weight ops of every variant share."""

from __future__ import annotations

import contextlib

import torch


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Fast-weight math stays float32 under bf16 autocast too (the ops cast explicitly)."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()
