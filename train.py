#!/usr/bin/env python
"""Fine-tune Moshi with In-Place TTT.

    python train.py configs/tiny.yaml                                  # one process (CPU or one GPU)
    torchrun --nproc-per-node 8 train.py configs/moshi7b_lora_ttt.yaml # several GPUs (DDP or FSDP)
    python train.py configs/tiny.yaml --optim.lr=3e-4 --ttt.chunk_size=16 --run_dir=runs/try

Overrides are ``--section.key=value`` (YAML syntax for the value: ``--ttt.layers=[0,2]``,
``--model.gradient_checkpointing=true``); anything else on the command line is refused before any
work. An interrupted run continues from its newest complete checkpoint when launched again with the
same run_dir (``resume: auto``). Exit status: 0 done, 2 configuration refused (one ``config error:``
line), 1 the run diverged (non-finite steps; checkpoints intact) or failed; with several processes, a
process that fails, dies or hangs ends the others within distributed.timeout_sec, naming its rank.
"""

import os
import sys

import torch
from torch.distributed.elastic.multiprocessing.errors import record

if not torch.cuda.is_available():
    os.environ.setdefault("NO_TORCH_COMPILE", "1")  # before moshi is imported

from finetune.args import load_config  # noqa: E402
from finetune.cli import parse_cli, run_main  # noqa: E402


@record  # under torchrun, a process's own uncaught error heads torchrun's summary, with its traceback
def main(argv: list[str]) -> int:
    config, overrides = parse_cli(argv)
    cfg = load_config(config, overrides)
    from finetune.distributed import PeerFailure
    from finetune.trainer import Diverged, train

    try:
        train(cfg)
    except (Diverged, PeerFailure) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_main(main, __doc__)
