#!/usr/bin/env python
"""Training cost of the TTT variants and the no-TTT baseline, measured the same way.

    python scripts/bench_variants.py [--config configs/recall_tiny.yaml] [--reps 10]

Builds the config's model once without TTT and once per registered variant (``moshi_ttt.VARIANTS``;
same seed, same TTT layers, chunk size and eta), runs forward+backward on one batch of the config's
training data, and prints the median step time and the activation bytes saved for backward (each
storage once, parameters excluded), with ratios to the baseline.
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ttt import count_saved  # noqa: E402

from finetune.args import load_config  # noqa: E402
from finetune.data.build import build_datasets  # noqa: E402
from finetune.data.loader import collate_codes  # noqa: E402
from finetune.loss import loss_weights, training_loss  # noqa: E402
from finetune.model import build_model  # noqa: E402
from moshi_ttt import VARIANTS  # noqa: E402


def train_step(model, cfg, codes, params) -> int:
    """One forward+backward; returns the activation bytes saved for backward."""
    model.zero_grad(set_to_none=True)
    with count_saved(params) as box:
        out = model(codes)
        loss = training_loss(cfg.loss, out, codes, loss_weights(cfg.loss, model, codes)).loss
    loss.backward()
    return box["bytes"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=Path("configs/recall_tiny.yaml"))
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args()
    base_cfg = load_config(args.config)
    rows = []
    runs = [("no TTT", {"enabled": False})]
    runs += [(f"TTT {name}", {"variant": name}) for name in VARIANTS]  # every registered variant
    for label, over in runs:
        cfg = copy.deepcopy(base_cfg)
        for k, v in over.items():
            setattr(cfg.ttt, k, v)
        model = build_model(cfg, torch.device("cpu")).model.train()
        data, _ = build_datasets(cfg, model)
        codes = collate_codes([data[i] for i in range(cfg.batch_size)]).codes
        params = [p for p in model.parameters()]
        n_params = sum(p.numel() for p in params if p.requires_grad)

        train_step(model, cfg, codes, params)
        times, saved = [], 0
        for _ in range(args.reps):
            t0 = time.perf_counter()
            saved = train_step(model, cfg, codes, params)
            times.append(time.perf_counter() - t0)
        rows.append((label, n_params, statistics.median(times), saved))
    b = rows[0]
    print(
        f"{args.config}: batch {base_cfg.batch_size} x {base_cfg.data.num_frames} steps, TTT layers "
        f"{base_cfg.ttt.layers}, chunk {base_cfg.ttt.chunk_size}; fwd+bwd, {torch.get_num_threads()} threads"
    )
    print(f"{'model':<14} {'trainable':>10} {'step ms':>9} {'x base':>7} {'saved MB':>9} {'x base':>7}")
    for label, n, t, m in rows:
        print(f"{label:<14} {n:>10,} {t * 1e3:>9.1f} {t / b[2]:>7.2f} {m / 2**20:>9.1f} {m / b[3]:>7.2f}")


if __name__ == "__main__":
    main()
