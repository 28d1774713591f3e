"""Process group set-up for torchrun (NCCL on GPU, gloo on CPU), small collective helpers, and the
model's DDP / FSDP wrapping and mixed precision.

One process (plain ``python train.py``) needs no torchrun and no process group.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto", backend: str = "auto") -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device: cuda was requested but no GPU is visible; use device: cpu or auto")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank, world, local_rank, dev)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` without a process group)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def use_bf16(cfg, dist_info: DistInfo) -> bool:
    """Whether training config ``cfg`` computes in bf16 (``precision``; ``auto``: on GPU)."""
    if cfg.precision == "bf16":
        return True
    return cfg.precision == "auto" and dist_info.device.type == "cuda"


def autocast(cfg, dist_info: DistInfo):
    """bf16 autocast on GPU (FSDP casts through its mixed-precision policy instead)."""
    fsdp = dist_info.distributed and cfg.distributed.strategy == "fsdp"
    if use_bf16(cfg, dist_info) and not fsdp:
        return torch.autocast(device_type=dist_info.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def wrap_model(model: nn.Module, cfg, dist_info: DistInfo) -> nn.Module:
    """``model`` under DDP or FSDP2 (``distributed.strategy``) when several processes train it."""
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
        param_dtype=torch.bfloat16 if use_bf16(cfg, dist_info) else None, reduce_dtype=torch.float32
    )
    for p in model.parameters():  # FSDP shards uniform float32 parameters; bf16 compute via the policy
        p.data = p.data.float()
    shard_model(model, mp)
    return model
