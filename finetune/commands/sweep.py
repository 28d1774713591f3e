"""Run a grid of training settings, then collect the results into a table and a plot.

Run from the repository root. Every way of running a sweep trains point I (0..N-1, in file order) in
its own run directory, out_dir/<name from its values>; a relaunched point resumes, a finished one is
skipped, and a directory holding another point's run is refused.

    python scripts/sweep.py configs/sweeps/recall_tiny.yaml --dry-run        # list the points and their state
    python scripts/sweep.py configs/sweeps/recall_tiny.yaml                  # run them here, one after another
    python scripts/sweep.py configs/sweeps/recall_tiny.yaml --count          # the number of points N
    python scripts/sweep.py configs/sweeps/recall_tiny.yaml --array-index 3  # point 3 only (a job array's task)
    python scripts/sweep.py configs/sweeps/recall_tiny.yaml --print-commands --nproc 8   # line I+1: point I
    python scripts/sweep.py configs/sweeps/recall_tiny.yaml --wandb-sweep sweep_wandb.yaml [--nproc 8]
    python scripts/sweep.py configs/sweeps/recall_tiny.yaml --collect        # results.csv / .md / .png only
    python scripts/sweep.py SWEEP.yaml --shard 0/2 & python scripts/sweep.py SWEEP.yaml --shard 1/2   # two at a time

``touch OUT_DIR/STOP`` makes running launchers stop after their current point (to change the grid or
the order, then launch again).

A job array (SLURM): ``#SBATCH --array=0-<N-1>`` and
``python scripts/sweep.py SWEEP.yaml --array-index $SLURM_ARRAY_TASK_ID --nproc 8``.

The wandb export names ``scripts/sweep_point.py`` as its program: the agent's ``--key=value``
arguments (or ``--point=I`` for a union of grids) select the point, which trains in the same run
directory as here. ``--wandb-split`` writes one sweep per grid of a union instead (OUT.01.yaml, ...).
The file format is described in ``finetune/research/sweep.py``.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

from finetune.research.sweep import Sweep, exit_status, markdown_table, shell_line, subprocess_runner
from finetune.schema import ConfigError

ROOT = Path(__file__).resolve().parents[2]  # the repository


def split_paths(out: Path, n: int) -> list[Path]:
    """``OUT.yaml`` -> ``OUT.01.yaml``, ``OUT.02.yaml``, ... (zero-padded, so they sort)."""
    width = max(2, len(str(n)))
    return [out.with_name(f"{out.stem}.{i:0{width}d}{out.suffix}") for i in range(1, n + 1)]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", type=Path)
    p.add_argument("--dry-run", action="store_true", help="list the points and whether they are done")
    p.add_argument("--count", action="store_true", help="print the number of points")
    p.add_argument(
        "--print-commands",
        action="store_true",
        help="print one training command per point, line I+1 for point I",
    )
    p.add_argument("--unfinished", action="store_true", help="with --print-commands: only unfinished points")
    p.add_argument(
        "--array-index", type=int, metavar="I", help="run point I only (0-based: a job array task)"
    )
    p.add_argument("--collect", action="store_true", help="only collect the results table and plot")
    p.add_argument("--wandb-sweep", type=Path, metavar="OUT", help="write a wandb sweep definition")
    p.add_argument(
        "--wandb-split", action="store_true", help="a union of grids: one wandb sweep file per grid"
    )
    p.add_argument("--nproc", type=int, default=1, help="processes per point (torchrun when > 1)")
    p.add_argument(
        "--shard",
        default="0/1",
        metavar="K/N",
        help="run only points K, K+N, K+2N, ... (0-based): N launchers with K = 0..N-1 share the grid",
    )
    return p


def _error(message: str) -> int:
    print(f"sweep error: {message}", file=sys.stderr)
    return 2


def _write_wandb_sweeps(sweep: Sweep, args: argparse.Namespace, points: int) -> int:
    try:
        definitions = sweep.wandb_sweeps(args.sweep, args.nproc, split=args.wandb_split)
    except ConfigError as e:
        return _error(str(e))
    paths = [args.wandb_sweep] if len(definitions) == 1 else split_paths(args.wandb_sweep, len(definitions))
    for path, definition in zip(paths, definitions):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(definition, sort_keys=False))
    print(f"wrote {', '.join(map(str, paths))} ({points} points)")
    print(
        "from the repository root: `wandb sweep FILE` for each, then `wandb agent <sweep id>` (on any number of machines)"
    )
    return 0


def _run_one(sweep: Sweep, runs: list, args: argparse.Namespace) -> int:
    """One point of a job array (``--array-index``)."""
    if not 0 <= args.array_index < len(runs):
        return _error(f"--array-index {args.array_index}: this sweep has points 0..{len(runs) - 1}")
    runner = subprocess_runner(sweep, args.nproc, program=ROOT / "train.py", echo=True)
    try:
        result = sweep.run_point(runs[args.array_index], runner)
    except ConfigError as e:
        return _error(str(e))
    return exit_status(result)


def _list(sweep: Sweep, runs: list, args: argparse.Namespace) -> int:
    """``--dry-run`` (the points and their state) or ``--print-commands`` (one command per point)."""
    for r in runs:
        state = sweep.status(r)
        if args.print_commands:
            if not (args.unfinished and state == "done"):
                print(shell_line(sweep.command(r, args.nproc, python="python")))
        else:
            print(f"{r.index:3d} {state:8s} {r.name}  ->  {r.run_dir}")
    if args.dry_run:
        print(f"{len(runs)} runs in {sweep.out_dir}; metric {sweep.metric} ({sweep.goal or 'goal unknown'})")
    return 0


def _run_and_collect(sweep: Sweep, args: argparse.Namespace, shard: tuple[int, int]) -> int:
    failed = []
    if not args.collect:
        runner = subprocess_runner(sweep, args.nproc, program=ROOT / "train.py")
        results = sweep.run_all(runner, shard=shard)
        failed = [n for n, s in results.items() if s.startswith("failed") or s == "refused"]
    rows = sweep.collect()
    paths = sweep.write_results(rows)
    print(markdown_table(rows, list(rows[0])))
    best = sweep.best(rows)
    if best is not None:
        print(f"best {sweep.metric} ({sweep.goal}): {best['run']} = {best[sweep.metric]:.4g}")
    print("wrote " + ", ".join(map(str, paths)))
    return 1 if failed else 0


def main() -> int:
    p = _parser()
    args = p.parse_args()
    if args.nproc < 1:
        p.error("--nproc must be >= 1")
    m = re.fullmatch(r"(\d+)/(\d+)", args.shard)
    if not m or not int(m[1]) < int(m[2]):
        p.error(f"--shard {args.shard}: expected K/N with 0 <= K < N, e.g. 0/2")
    shard = (int(m[1]), int(m[2]))
    try:
        sweep = Sweep.load(args.sweep)
    except (ConfigError, ValueError) as e:
        return _error(str(e))
    runs = sweep.runs()
    if args.count:
        print(len(runs))
        return 0
    if args.wandb_sweep:
        return _write_wandb_sweeps(sweep, args, len(runs))
    if args.array_index is not None:
        return _run_one(sweep, runs, args)
    if args.dry_run or args.print_commands:
        return _list(sweep, runs, args)
    return _run_and_collect(sweep, args, shard)


if __name__ == "__main__":
    sys.exit(main())
