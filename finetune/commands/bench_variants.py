"""Training cost of the TTT variants and the no-TTT baseline, measured the same way.

    python scripts/bench_variants.py [--config configs/recall_tiny.yaml] [--reps 10]

Builds the config's model once without TTT and once per registered variant (``moshi_ttt.VARIANTS``;
same seed, same TTT layers, chunk size and eta), runs forward+backward on one batch of the config's
training data, and prints the median step time and the activation bytes saved for backward (each
storage once, parameters excluded), with ratios to the baseline.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from finetune.args import load_config
from finetune.data.build import build_datasets
from finetune.data.loader import collate_codes
from finetune.training.loss import loss_weights, training_loss
from finetune.training.model import build_model
from moshi_ttt import VARIANTS

from .bench_ttt import count_saved


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
