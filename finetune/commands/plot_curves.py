"""Learning curves of logged metrics for several runs, side by side (from each run's metrics.jsonl).

    python scripts/plot_curves.py runs/recall_live runs/recall_live_baseline --out reports/curves.png
    python scripts/plot_curves.py "TTT=runs/a" "no TTT=runs/b" --metrics eval_recall_acc_far eval_audio_nll

A run is a directory or ``LABEL=DIRECTORY``. Metrics are named as in the sweep results: ``eval_<name>``
for evaluation records (``eval_recall_acc_far``, ``eval_text_nll``, ...), ``<name>`` for training
records (``loss``, ``grad_norm``, ``ttt/layer1/update_norm``, ...). Prints each curve's last point.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from finetune.research.sweep import metric_curve


def _run(arg: str) -> tuple[str, Path]:
    label, sep, path = arg.partition("=")
    return (label, Path(path)) if sep else (Path(arg).name, Path(arg))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directory, or LABEL=DIRECTORY")
    p.add_argument("--metrics", nargs="+", default=["eval_recall_acc_far", "eval_recall_acc_near"])
    p.add_argument("--out", type=Path, default=Path("reports/curves.png"))
    p.add_argument("--title", default=None)
    a = p.parse_args(argv)
    runs = [_run(r) for r in a.runs]
    for label, path in runs:
        if not (path / "metrics.jsonl").is_file():
            p.error(f"{label}: {path / 'metrics.jsonl'} does not exist (pass a training run directory)")
    curves = {(label, m): metric_curve(path, m) for label, path in runs for m in a.metrics}
    for m in a.metrics:
        if not any(curves[(label, m)] for label, _ in runs):
            p.error(f"no run logged {m!r} (eval metrics are named eval_<name>, e.g. eval_recall_acc_far)")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(a.metrics), figsize=(5.5 * len(a.metrics), 4), squeeze=False)
    for ax, m in zip(axes[0], a.metrics):
        for label, _ in runs:
            pts = curves[(label, m)]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, label=label)
                print(f"{m:28s} {label:40s} step {pts[-1][0]:>7d}: {pts[-1][1]:.4g}")
        ax.set_xlabel("step")
        ax.set_title(m)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    if a.title:
        fig.suptitle(a.title)
    fig.tight_layout()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
