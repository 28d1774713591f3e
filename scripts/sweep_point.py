#!/usr/bin/env python
"""Train one point of a sweep in its own run directory: the program of the wandb sweeps that
``scripts/sweep.py SWEEP.yaml --wandb-sweep OUT`` writes.

    python scripts/sweep_point.py SWEEP.yaml --ttt.eta=0.01 --ttt.chunk_size=8   # the point with these values
    python scripts/sweep_point.py SWEEP.yaml --point=3                           # point 3 (0-based, file order)
    python scripts/sweep_point.py SWEEP.yaml --nproc=8 --point=3                 # under torchrun, 8 processes

The wandb agent appends the sweep's parameters as ``--key=value``: a point's grid values (exactly the
keys of its grid), or ``--point=I`` for a sweep over the point index. The point is rebuilt from the
sweep file (base config, fixed overrides, grid) and trained in the run directory the local runner
gives it (``scripts/sweep.py``): a finished point is skipped, an interrupted one resumes, and a
directory that holds another point's run is refused (exit 2). Under an agent the trainer logs to the
agent's wandb run even if the config sets no ``wandb.project``. Exit status: the trainer's.
Run from the repository root (where ``wandb agent`` is started).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("NO_TORCH_COMPILE", "1")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from finetune.cli import parse_cli, run_main  # noqa: E402
from finetune.schema import ConfigError  # noqa: E402
from finetune.sweep import Sweep, exit_status, subprocess_runner  # noqa: E402


def main(argv: list[str]) -> int:
    sweep_file, args = parse_cli(argv)
    if sweep_file is None:
        raise ConfigError("give the sweep file first: sweep_point.py SWEEP.yaml --key=value ...")
    nproc = args.pop("nproc", 1)
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ConfigError(f"--nproc={nproc!r}: expected a number of processes >= 1")
    sweep = Sweep.load(sweep_file)
    run = sweep.point(args)
    result = sweep.run_point(run, subprocess_runner(sweep, nproc, program=ROOT / "train.py", echo=True))
    return exit_status(result)


if __name__ == "__main__":
    run_main(main, __doc__)
