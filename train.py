#!/usr/bin/env python
"""Fine-tune Moshi with In-Place TTT.

    python train.py configs/tiny.yaml                                  # one process (CPU or one GPU)
    torchrun --nproc-per-node 8 train.py configs/moshi7b_lora_ttt.yaml # several GPUs (DDP or FSDP)
    python train.py configs/tiny.yaml --optim.lr=3e-4 --ttt.chunk_size=16 --run_dir=runs/try

Overrides are ``--section.key=value`` (YAML syntax for the value: ``--ttt.layers=[0,2]``,
``--lora.enable=true``). An interrupted run continues from its newest complete checkpoint when
launched again with the same run_dir (``resume: auto``).
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("NO_TORCH_COMPILE", "1")  # before moshi is imported

import fire  # noqa: E402

from finetune.args import load_config  # noqa: E402
from finetune.schema import ConfigError  # noqa: E402


def main(config: str | None = None, **overrides) -> None:
    """CONFIG is a YAML file; every other flag is a dotted override of it."""
    try:
        cfg = load_config(config, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    from finetune.trainer import train

    train(cfg)


if __name__ == "__main__":
    fire.Fire(main)
