"""The width x chunk x eta grid of configs/sweeps/eta_transfer.yaml: best eta per cell, and whether one
normalised value is near-best everywhere.

    python scripts/eta_grid.py runs/sweeps/eta_transfer [--metric recall_nll_far] [--out DIR] [--png PATH]
    python scripts/eta_grid.py runs/sweeps/eta_transfer --png docs/eta_transfer.png   # docs/long_context.md's plot

For every run directory under the sweep (any seed): its width, chunk size, eta_norm and eta (from
its config.yaml), its final eval metrics and the mean ``||z||^2`` its TTT layers logged over training
(``ttt/layer*/z_sq_mean``, mean over layers and over the second half of the logged steps). A raw run
at ``eta`` is placed on the normalised axis at ``eta x mean ||z||^2`` (what ``eta_norm: zsq`` would
need for the same update size). Writes ``eta_grid.md`` (tables) and ``eta_grid.png`` (the metric
against raw eta and against normalised eta; ``--png`` puts it elsewhere) into ``--out`` (default: the
sweep directory). ``--metric`` is an eval metric without its ``eval_`` prefix.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from finetune.research.sweep import finished_run

LOWER_IS_BETTER = ("nll", "loss")


def read_run(run_dir: Path) -> dict | None:
    run = finished_run(run_dir)
    if run is None:
        return None  # no run, or unfinished
    cfg, recs = run
    evals = [r for r in recs if r["kind"] == "eval" and r["step"] == cfg["max_steps"]]
    train = [r for r in recs if r["kind"] == "train"]
    half = [r for r in train if r["step"] > cfg["max_steps"] // 2] or train
    zs = [v for r in half for k, v in r.items() if k.endswith("/z_sq_mean")]
    terms = [v for k, v in train[-1].items() if k.endswith("/term_ratio")] if train else []
    ttt = cfg["ttt"]
    return {
        "dim": cfg["model"]["tiny"]["dim"],
        "chunk": ttt["chunk_size"],
        "norm": ttt.get("eta_norm", "none"),
        "eta": float(ttt["eta"]),
        "seed": cfg["seed"],
        "z_sq": statistics.fmean(zs) if zs else math.nan,
        "term_ratio": statistics.fmean(terms) if terms else math.nan,
        **{k.removeprefix("eval_"): v for k, v in evals[-1].items() if isinstance(v, (int, float))},
        "name": run_dir.name,
    }


def load(sweep_dir: Path) -> list[dict]:
    return [r for d in sorted(sweep_dir.iterdir()) if d.is_dir() and (r := read_run(d)) is not None]


def cells(runs: list[dict], metric: str) -> dict[tuple, dict[float, list[float]]]:
    """(dim, chunk, norm) -> eta -> metric values (one per seed)."""
    out: dict[tuple, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if metric in r:
            out[r["dim"], r["chunk"], r["norm"]][r["eta"]].append(r[metric])
    return out


def best(points: dict[float, list[float]], lower: bool) -> float:
    mean = {e: statistics.fmean(v) for e, v in points.items()}
    return (min if lower else max)(mean, key=mean.get)


def fmt_cell(vals: list[float]) -> str:
    m = statistics.fmean(vals)
    return f"{m:.3f}" if len(vals) == 1 else f"{m:.3f} ±{(max(vals) - min(vals)) / 2:.3f} (n={len(vals)})"


def tables(runs: list[dict], metric: str) -> str:
    lower = any(s in metric for s in LOWER_IS_BETTER)
    by_cell = cells(runs, metric)
    z_by_cell: dict[tuple, list[float]] = defaultdict(list)
    for r in runs:
        if math.isfinite(r["z_sq"]):
            z_by_cell[r["dim"], r["chunk"], r["norm"]].append(r["z_sq"])
    lines = [f"`{metric}` ({'lower' if lower else 'higher'} is better; ± half the range over seeds)", ""]
    for norm in sorted({k[2] for k in by_cell}):
        keys = sorted(k for k in by_cell if k[2] == norm)
        etas = sorted({e for k in keys for e in by_cell[k]})
        lines += [f"eta_norm: {norm}", ""]
        lines += ["| dim | chunk | " + " | ".join(f"{e:g}" for e in etas) + " | best eta | mean z_sq |"]
        lines += ["|---|---|" + "---|" * len(etas) + "---|---|"]
        for k in keys:
            pts = by_cell[k]
            row = [fmt_cell(pts[e]) if e in pts else "" for e in etas]
            b = best(pts, lower)
            z = statistics.fmean(z_by_cell[k]) if z_by_cell[k] else math.nan
            lines.append(f"| {k[0]} | {k[1]} | " + " | ".join(row) + f" | {b:g} | {z:.3g} |")
        lines.append("")
    # Raw best eta on the normalised axis: eta x mean ||z||^2 of the runs at that eta.
    lines += ["Best raw eta per cell on the normalised axis (eta x mean ||z||^2 of the TTT layers):", ""]
    lines += ["| dim | chunk | best raw eta | its mean z_sq | = normalised eta |", "|---|---|---|---|---|"]
    for k in sorted(k for k in by_cell if k[2] == "none"):
        b = best(by_cell[k], lower)
        zs = [r["z_sq"] for r in runs if (r["dim"], r["chunk"], r["norm"], r["eta"]) == (*k, b)]
        z = statistics.fmean(zs)
        lines.append(f"| {k[0]} | {k[1]} | {b:g} | {z:.3g} | {b * z:.3g} |")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], metric: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    dims = sorted({r["dim"] for r in runs})
    colors = {d: plt.cm.viridis(i / max(1, len(dims) - 1)) for i, d in enumerate(dims)}
    style = {8: "-", 32: "--"}
    for (dim, chunk, norm), pts in sorted(cells(runs, metric).items()):
        etas = sorted(pts)
        ys = [statistics.fmean(pts[e]) for e in etas]
        # Seed repeats: a bar over their range (single runs have none).
        err = [(max(pts[e]) - min(pts[e])) / 2 for e in etas]
        kw = dict(color=colors[dim], ls=style.get(chunk, ":"), marker="o" if norm == "none" else "s")
        label = f"dim {dim}, chunk {chunk}"
        if norm == "none":
            axes[0].errorbar(etas, ys, yerr=err, capsize=3, label=label, **kw)
            z = {
                e: statistics.fmean(
                    r["z_sq"]
                    for r in runs
                    if (r["dim"], r["chunk"], r["norm"], r["eta"]) == (dim, chunk, norm, e)
                )
                for e in etas
            }
            axes[1].plot([e * z[e] for e in etas], ys, alpha=0.5, label=label + " (raw eta x z_sq)", **kw)
        else:
            axes[1].errorbar(etas, ys, yerr=err, capsize=3, label=label + " (zsq)", mfc="none", ms=8, **kw)
    axes[0].set_xlabel("raw eta")
    axes[1].set_xlabel("normalised eta (eta_norm zsq; raw runs at eta x mean ||z||^2)")
    axes[0].set_ylabel(metric)
    for ax in axes:
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Recall task: eta across widths (colour) and chunk sizes (line style); bars: seed range")
    fig.tight_layout()
    fig.savefig(path, dpi=80)  # small enough to commit under docs/
    plt.close(fig)
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("--metric", default="recall_nll_far")
    p.add_argument("--out", type=Path)
    p.add_argument("--png", type=Path, help="where the plot goes (default: OUT/eta_grid.png)")
    args = p.parse_args()
    runs = load(args.sweep_dir)
    if not runs:
        print(f"error: no finished run under {args.sweep_dir}", file=sys.stderr)
        return 2
    out = args.out or args.sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    text = "\n".join(tables(runs, m) for m in (args.metric, "recall_acc_far", "recall_acc_near"))
    (out / "eta_grid.md").write_text(text)
    print(text)
    print(f"wrote {out / 'eta_grid.md'}, {plot(runs, args.metric, args.png or out / 'eta_grid.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
