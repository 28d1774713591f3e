"""Chunk size against the attention window: when far recall leaves the half-right plateau, per
window and chunk (configs/sweeps/chunk_window.yaml and configs/sweeps/chunk_decouple.yaml).

    python scripts/chunk_window.py runs/sweeps/chunk_window [runs/sweeps/chunk_decouple ...] \\
        [--threshold 0.8] [--out DIR] [--png docs/chunk_window.png]

For every finished or running run directory under the given sweep directories: its window
(``model.tiny.context``), chunk, audio, seed, near-query span and far share (from its config.yaml)
and its evaluation curve (metrics.jsonl). A run has *bound* at the first evaluation where far
accuracy reaches ``--threshold`` (0.8: well above the plateau's one half, where every wrong far
answer is the sequence's other value); a run that has not is censored at its last evaluation.
Writes ``chunk_window.md`` (one table per audio kind and near span: bound step per window x chunk,
mean over the seeds that bound and how many did, final far and near accuracy with their seed range,
the share of near queries whose definition is in an earlier chunk) and a plot of the bound step
against chunk / window and against chunk in steps (``--png``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import yaml

from finetune.research.sweep import metric_curve


def read_run(run_dir: Path, threshold: float) -> dict | None:
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file() or not (run_dir / "metrics.jsonl").is_file():
        return None
    cfg = yaml.safe_load(cfg_path.read_text())
    far = metric_curve(run_dir, "eval_recall_acc_far")
    if not far:
        return None
    near = metric_curve(run_dir, "eval_recall_acc_near")
    other = metric_curve(run_dir, "eval_recall_far_other")
    share = metric_curve(run_dir, "eval_recall_near_cross_share")
    bound = next((s for s, v in far if v >= threshold), None)
    r = cfg["data"]["recall"]
    W = cfg["model"]["tiny"]["context"]
    return {
        "name": run_dir.name,
        "window": W,
        "layers": cfg["model"]["tiny"].get("num_layers", 4),
        "frames": int(round(cfg["data"].get("duration_sec", 8.0) * 12.5)),
        # far distances start here (the receptive field + 2 unless data.recall.far_min moves them)
        "far_min": r.get("far_min") or cfg["model"]["tiny"].get("num_layers", 4) * (W - 1) + 2,
        "chunk": cfg["ttt"]["chunk_size"],
        "audio": r.get("audio", "silent"),
        "near_max": r.get("near_max") or W - 5,
        "far_pairs": r.get("far_pairs") or (r.get("pairs", 4) + 1) // 2,
        "seed": cfg["seed"],
        "max_steps": cfg["max_steps"],
        "last_step": far[-1][0],
        "finished": far[-1][0] >= cfg["max_steps"],
        "bound": bound,
        "far": far[-1][1],
        "far_max": max(v for _, v in far),
        "near": near[-1][1] if near else None,
        "far_other": other[-1][1] if other else None,
        "cross_share": share[-1][1] if share else None,
        "curve": far,
    }


def load(dirs: list[Path], threshold: float) -> list[dict]:
    runs = []
    for d in dirs:
        for sub in sorted(p for p in d.iterdir() if p.is_dir()):
            r = read_run(sub, threshold)
            if r is not None:
                r["sweep"] = d.name
                runs.append(r)
    return runs


def _spread(vals: list[float]) -> str:
    m = statistics.fmean(vals)
    return f"{m:.2f}" if len(vals) == 1 else f"{m:.2f} ({min(vals):.2f}-{max(vals):.2f})"


def cell_text(rs: list[dict]) -> str:
    """``bound step (range) {each seed's} [k/n bound] | far | near``: the mean step over the runs that
    bound (a run still running and not bound is not counted in n)."""
    done = [r for r in rs if r["finished"] or r["bound"] is not None]
    if not done:  # running, or stopped before its budget without binding
        last = max(rs, key=lambda r: r["last_step"])
        return f"unfinished: not bound by step {last['last_step']} of {last['max_steps']} (far {last['far']:.2f})"
    steps = [r["bound"] for r in done if r["bound"] is not None]
    budget = max(r["max_steps"] for r in done)
    if steps:
        b = f"{statistics.fmean(steps):.0f}" + (f" ({min(steps)}-{max(steps)})" if len(steps) > 1 else "")
    else:
        b = f"> {budget}"
    if len(done) > 1:  # every seed's own step, in seed order (> budget: not bound)
        per = sorted(done, key=lambda r: r["seed"])
        b += (
            " {"
            + ", ".join(
                f"s{r['seed']} " + (str(r["bound"]) if r["bound"] else f">{r['max_steps']}") for r in per
            )
            + "}"
        )
    fin = [r for r in done if r["finished"]]
    far = _spread([r["far"] for r in fin]) if fin else "-"
    near = _spread([r["near"] for r in fin if r["near"] is not None]) if fin else "-"
    return f"{b} [{len(steps)}/{len(done)}]; far {far}; near {near}"


def groups(runs: list[dict]) -> dict[tuple, dict[tuple[int, int], list[dict]]]:
    """(layers, audio, near span kind, far pairs, budget) -> (window, sequence, chunk) -> runs."""
    out: dict[tuple, dict[tuple[int, int], list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        span = "window - 5" if r["near_max"] == r["window"] - 5 else f"{r['near_max']}"
        key = r["layers"], r["audio"], span, r["far_pairs"], r["max_steps"]
        out[key][r["window"], r["frames"], r["far_min"], r["chunk"]].append(r)
    return out


def tables(runs: list[dict], threshold: float) -> str:
    lines = [
        f"Bound step: first evaluation with far accuracy >= {threshold} (mean over the seeds that bound, "
        "their range, {each seed's step}; [bound/finished runs]); far and near: final accuracy, mean (seed range).",
        "",
    ]
    for (layers, audio, span, far_pairs, budget), cells in sorted(
        groups(runs).items(), key=lambda kv: str(kv[0])
    ):
        windows = sorted({(w, t, f) for w, t, f, _ in cells})
        chunks = sorted({c for *_, c in cells})
        lines += [
            f"### {layers} layers, audio {audio}, near distances 3 to {span}, {far_pairs} far pair(s) of 4, "
            f"{budget} steps",
            "",
        ]
        lines += ["| window (sequence, far distances) | " + " | ".join(f"chunk {c}" for c in chunks) + " |"]
        lines += ["|---|" + "---|" * len(chunks)]
        for w, t, f in windows:
            row = []
            for c in chunks:
                rs = cells.get((w, t, f, c))
                if not rs:
                    row.append("")
                    continue
                share = [r["cross_share"] for r in rs if r["cross_share"] is not None]
                s = f"; near across chunks {statistics.fmean(share):.2f}" if share else ""
                row.append(f"{c / w:g} W: " + cell_text(rs) + s)
            lines.append(f"| {w} ({t} steps, far from {f}) | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path, audio: str = "markov", layers: int = 4) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [
        r for r in runs if r["audio"] == audio and r["near_max"] == r["window"] - 5 and r["far_pairs"] == 2
    ]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    series = sorted({(r["window"], r["frames"], r["far_min"]) for r in sel})
    colors = {k: plt.cm.viridis(i / max(1, len(series) - 1)) for i, k in enumerate(series)}
    for w, t, f in series:
        by_chunk: dict[int, list[dict]] = defaultdict(list)
        for r in sel:
            if (r["window"], r["frames"], r["far_min"]) == (w, t, f) and (
                r["finished"] or r["bound"] is not None
            ):
                by_chunk[r["chunk"]].append(r)
        for ax, x_of in ((axes[0], lambda c, w=w: c / w), (axes[1], lambda c: c)):
            xs, ys, lo, hi = [], [], [], []
            for c in sorted(by_chunk):
                steps = [r["bound"] if r["bound"] is not None else r["max_steps"] for r in by_chunk[c]]
                xs.append(x_of(c))
                ys.append(statistics.fmean(steps))
                lo.append(ys[-1] - min(steps))
                hi.append(max(steps) - ys[-1])
                censored = [r for r in by_chunk[c] if r["bound"] is None]
                if censored:
                    ax.scatter(
                        [x_of(c)],
                        [max(r["max_steps"] for r in censored)],
                        marker="^",
                        s=70,
                        facecolors="none",
                        edgecolors=colors[w, t, f],
                    )
            ax.errorbar(
                xs,
                ys,
                yerr=[lo, hi],
                marker="o",
                capsize=3,
                color=colors[w, t, f],
                ls="-" if t == 6 * w else "--",
                label=f"window {w}, sequences {t} steps ({t // w} W), far >= {f}",
            )
    axes[0].set_xlabel("chunk / attention window")
    axes[1].set_xlabel("chunk (steps)")
    axes[0].set_ylabel("step where far recall leaves the plateau (>= threshold)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"Recall, {audio} audio: plateau end vs chunk (triangles: not left within the budget; bars: seed range)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dirs", type=Path, nargs="+")
    p.add_argument("--threshold", type=float, default=0.8)
    p.add_argument("--out", type=Path)
    p.add_argument("--png", type=Path)
    p.add_argument("--json", type=Path, help="also write every run's summary and curve as JSON")
    a = p.parse_args()
    runs = load(a.sweep_dirs, a.threshold)
    if not runs:
        print(f"error: no run with evaluations under {', '.join(map(str, a.sweep_dirs))}", file=sys.stderr)
        return 2
    out = a.out or a.sweep_dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    text = tables(runs, a.threshold)
    (out / "chunk_window.md").write_text(text)
    print(text)
    if a.json:
        a.json.write_text(json.dumps(runs, indent=1))
    print(f"wrote {out / 'chunk_window.md'}, {plot(runs, a.png or out / 'chunk_window.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
