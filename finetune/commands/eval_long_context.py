"""Loss by position and recall by distance for one or more runs, TTT and baselines side by side.

    python scripts/eval_long_context.py runs/recall_tiny runs/recall_tiny_baseline --out reports/recall
    python scripts/eval_long_context.py runs/my_ttt_run --eval-config configs/long_conversations.yaml

Each argument is a run directory (its newest checkpoint) or a checkpoint directory. The eval set is
the first run's own eval split, or the ``data`` section of ``--eval-config``. TTT runs are also
evaluated with their fast-weight updates off (same weights, no test-time training) unless
``--no-frozen``. Writes ``long_context.json`` (the numbers), ``long_context.md`` (tables) and
``long_context.png`` (loss by position with the attention window marked; recall accuracy by
distance) into ``--out``. ``--free-text`` adds rows scored on each model's own greedy text stream
(streamed step by step, audio from the data). ``--data.KEY=VALUE`` overrides change the eval set's
``data`` section (the first run's own, or ``--eval-config``'s) as in ``train.py``, e.g. another
dataset's ``--data.eval=... --data.cache_dir=...``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from finetune.cli import parse_cli
from finetune.research.long_context import evaluate_runs, to_markdown, write_report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path("reports/long_context"))
    p.add_argument("--eval-config", type=Path, help="take the eval set from this config's data section")
    p.add_argument("--max-items", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--bucket", type=int, default=None, help="position bucket size (default: half the window)")
    p.add_argument("--no-frozen", action="store_true", help="skip the TTT-updates-off evaluation of TTT runs")
    p.add_argument(
        "--free-text",
        action="store_true",
        help="also evaluate each run on its own greedy text stream (audio from the data), streamed step by "
        "step: recall scored on what Moshi writes itself, e.g. the echo of a fact it heard",
    )
    args, rest = p.parse_known_args()
    try:
        _, data_overrides = parse_cli(rest)  # train.py's --section.key=value, read the same way
        report = evaluate_runs(
            args.runs,
            eval_config=args.eval_config,
            frozen_too=not args.no_frozen,
            max_items=args.max_items,
            batch_size=args.batch_size,
            bucket=args.bucket,
            free_text=args.free_text,
            data_overrides=data_overrides,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(to_markdown(report))
    print("wrote " + ", ".join(map(str, write_report(report, args.out))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
