"""``ttt.eta: auto`` against hand-picked etas, cell by cell (configs/sweeps/eta_auto.yaml).

    python scripts/eta_auto_report.py runs/sweeps/eta_auto [--out DIR]

For every finished run under the sweep directory: its width, chunk, eta (a number or ``auto``),
seed, final evaluation (far-recall NLL and accuracy, near accuracy), ``ttt/base`` at step 50 (mean
over the TTT layers) and, for ``auto`` runs, the etas chosen per layer. Per cell (width x chunk) and
eta: mean and seed range. Two references per cell: the hand-picked eta with the best mean far NLL,
and the best far NLL among the etas that keep near recall (mean near accuracy within 0.05 of the
cell's best). ``auto`` is *within the seed spread* of a reference when its mean far NLL is at most
the reference's worst seed (lower is better). Writes ``eta_auto.md`` into ``--out`` (default: the
sweep directory) and prints it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from finetune.research.sweep import finished_run

NEAR_SLACK = 0.05


def read_run(run_dir: Path) -> dict | None:
    run = finished_run(run_dir)
    if run is None:
        return None
    cfg, recs = run
    final = [r for r in recs if r["kind"] == "eval" and r["step"] == cfg["max_steps"]]
    at50 = [r for r in recs if r["kind"] == "train" and r["step"] == 50]
    base50 = [v for k, v in at50[-1].items() if k.endswith("/term_ratio")] if at50 else []
    cal = [r for r in recs if r["kind"] == "eta_auto"]
    eta = cfg["ttt"]["eta"]
    target = float((cfg["ttt"].get("eta_auto") or {}).get("target", 1.0))
    label = ("auto" if target == 1.0 else f"auto {target:g}") if eta == "auto" else float(eta)
    return {
        "dim": cfg["model"]["tiny"]["dim"],
        "chunk": cfg["ttt"]["chunk_size"],
        "eta": label,
        "seed": cfg["seed"],
        "far_nll": final[-1]["recall_nll_far"],
        "far": final[-1]["recall_acc_far"],
        "near": final[-1]["recall_acc_near"],
        "base50": statistics.fmean(base50) if base50 else None,
        "chosen": {k.removeprefix("eta/"): v for k, v in cal[-1].items() if k.startswith("eta/")}
        if cal
        else {},
    }


def _stat(vals: list[float]) -> str:
    m = statistics.fmean(vals)
    return f"{m:.2f}" if len(vals) == 1 else f"{m:.2f} [{min(vals):.2f}, {max(vals):.2f}]"


def report(runs: list[dict]) -> str:
    cells: dict[tuple[int, int], dict] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        cells[r["dim"], r["chunk"]][r["eta"]].append(r)
    lines = [
        "Per cell and eta: mean [min, max] over seeds (n). Far NLL: lower is better (guessing: ln 16 = 2.77).",
        "",
    ]
    summary = [
        "| dim, chunk | auto (ttt/base target) | its far NLL | best far (hand) | within? | best keeping near "
        "(hand) | within? | auto's eta per layer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (dim, chunk), by_eta in sorted(cells.items()):
        lines += [f"### dim {dim}, chunk {chunk}", ""]
        lines += [
            "| eta | n | far NLL | far acc | near acc | ttt/base at step 50 |",
            "|---|---|---|---|---|---|",
        ]
        order = sorted(by_eta, key=lambda e: (isinstance(e, float), e if isinstance(e, float) else e))
        for e in order:
            rs = by_eta[e]
            b50 = [r["base50"] for r in rs if r["base50"] is not None]
            lines.append(
                f"| {e if isinstance(e, str) else f'{e:g}'} | {len(rs)} | {_stat([r['far_nll'] for r in rs])} | "
                f"{_stat([r['far'] for r in rs])} | {_stat([r['near'] for r in rs])} | "
                f"{_stat(b50) if b50 else '-'} |"
            )
        lines.append("")
        hand = {e: rs for e, rs in by_eta.items() if isinstance(e, float)}
        if not hand:
            continue
        mean_nll = {e: statistics.fmean(r["far_nll"] for r in rs) for e, rs in hand.items()}
        mean_near = {e: statistics.fmean(r["near"] for r in rs) for e, rs in hand.items()}
        best = min(mean_nll, key=mean_nll.get)
        keep = [e for e in hand if mean_near[e] >= max(mean_near.values()) - NEAR_SLACK]
        best_keep = min(keep, key=mean_nll.get)
        for label in (e for e in order if isinstance(e, str)):
            auto = by_eta[label]
            a = statistics.fmean(r["far_nll"] for r in auto)

            def within(e: float, hand: dict = hand, a: float = a) -> str:
                worst = max(r["far_nll"] for r in hand[e])
                return f"yes ({a:.2f} <= {worst:.2f})" if a <= worst else f"no ({a:.2f} > {worst:.2f})"

            chosen = defaultdict(list)
            for r in auto:
                for layer, v in r["chosen"].items():
                    chosen[layer].append(v)
            etas = ", ".join(f"{k} {min(v):.2g}-{max(v):.2g}" for k, v in sorted(chosen.items()))
            target = label.removeprefix("auto").strip() or "1"
            summary.append(
                f"| {dim}, {chunk} | {target} | {_stat([r['far_nll'] for r in auto])} | "
                f"{best:g}: {_stat([r['far_nll'] for r in hand[best]])} | {within(best)} | "
                f"{best_keep:g}: {_stat([r['far_nll'] for r in hand[best_keep]])} | {within(best_keep)} | {etas} |"
            )
    return "\n".join(summary + [""] + lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    runs = [r for d in sorted(a.sweep_dir.iterdir()) if d.is_dir() and (r := read_run(d)) is not None]
    if not runs:
        print(f"error: no finished run under {a.sweep_dir}", file=sys.stderr)
        return 2
    text = report(runs)
    out = a.out or a.sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "eta_auto.md").write_text(text)
    print(text)
    print(f"wrote {out / 'eta_auto.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
