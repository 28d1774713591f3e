#!/usr/bin/env python
"""Run a grid of training settings, then collect the results into a table and a plot.

    python scripts/sweep.py configs/sweeps/recall_tiny.yaml --dry-run        # list the runs and their state
    python scripts/sweep.py configs/sweeps/recall_tiny.yaml                  # run them here, one after another
    python scripts/sweep.py configs/sweeps/recall_tiny.yaml --print-commands --nproc 8   # torchrun lines for a cluster
    python scripts/sweep.py configs/sweeps/recall_tiny.yaml --collect        # results.csv / .md / .png only
    python scripts/sweep.py SWEEP.yaml --shard 0/2 & python scripts/sweep.py SWEEP.yaml --shard 1/2   # two at a time
    python scripts/sweep.py configs/sweeps/recall_tiny.yaml --wandb-sweep sweep_wandb.yaml

Re-running skips finished runs and resumes interrupted ones. ``touch OUT_DIR/STOP`` makes running
launchers stop after their current run (to change the grid or the order, then launch again). The file format is described in
``finetune/sweep.py``.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("NO_TORCH_COMPILE", "1")

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from finetune.schema import ConfigError  # noqa: E402
from finetune.sweep import Sweep, markdown_table, shell_line, subprocess_runner  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", type=Path)
    p.add_argument("--dry-run", action="store_true", help="list the runs and whether they are done")
    p.add_argument(
        "--print-commands", action="store_true", help="print one launch command per unfinished run"
    )
    p.add_argument("--collect", action="store_true", help="only collect the results table and plot")
    p.add_argument("--wandb-sweep", type=Path, help="write a wandb sweep definition of this grid")
    p.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun when > 1)")
    p.add_argument(
        "--shard",
        default="0/1",
        metavar="K/N",
        help="run only runs K, K+N, K+2N, ... (0-based): N launchers with K = 0..N-1 share the grid",
    )
    args = p.parse_args()
    try:
        sweep = Sweep.load(args.sweep)
    except (ConfigError, ValueError) as e:
        print(f"sweep error: {e}", file=sys.stderr)
        return 2
    runs = sweep.runs()
    if args.wandb_sweep:
        try:
            definition = sweep.wandb_sweep()
        except ConfigError as e:
            print(f"sweep error: {e}", file=sys.stderr)
            return 2
        args.wandb_sweep.write_text(yaml.safe_dump(definition, sort_keys=False))
        print(f"wrote {args.wandb_sweep}: `wandb sweep {args.wandb_sweep}` then `wandb agent <id>`")
        return 0
    if args.dry_run or args.print_commands:
        for r in runs:
            state = sweep.status(r)
            if args.print_commands:
                if state != "done":
                    print(shell_line(sweep.command(r, args.nproc, python="python")))
            else:
                print(f"{state:8s} {r.name}  ->  {r.run_dir}")
        if args.dry_run:
            print(f"{len(runs)} runs in {sweep.out_dir}")
        return 0
    if not args.collect:
        try:
            k, n = (int(x) for x in args.shard.split("/"))
            results = sweep.run_all(subprocess_runner(sweep, args.nproc, cwd=ROOT), shard=(k, n))
        except (ConfigError, ValueError) as e:
            print(f"sweep error: --shard {args.shard}: {e}", file=sys.stderr)
            return 2
        failed = [n for n, s in results.items() if s.startswith("failed")]
    else:
        failed = []
    rows = sweep.collect()
    paths = sweep.write_results(rows)
    print(markdown_table(rows, list(rows[0])))
    print("wrote " + ", ".join(map(str, paths)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
