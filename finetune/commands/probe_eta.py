"""Choose the TTT learning rate before a long run: per TTT layer, the TTT term relative to the base
term and one chunk's update relative to ||W0||, for a list of eta values, raw and normalised.

    python scripts/probe_eta.py configs/recall_tiny.yaml                    # a config: its model, new TTT layers
    python scripts/probe_eta.py configs/moshi7b_lora_ttt.yaml --device cuda --data.train=/data/train.jsonl
    python scripts/probe_eta.py runs/my_run --etas 0.01 0.1 1                # a run's newest checkpoint
    python scripts/probe_eta.py runs/my_run/checkpoints/step_000200 --json probe.json

The model runs over the first ``--batches`` batches of the config's training data (no training).
A new TTT layer's target path gives V = 0 (its ratios are all 0), so the probe sets its conv to the
identity tap (V = X_src) and says so; the ratios are linear in ||V||, which training grows from 0:
probe the run's checkpoint after a few hundred steps to see the trained target path. Extra
``--section.key=value`` flags override the config as in train.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from finetune.research.eta_probe import load_probe_model, probe, probe_batches, to_text
from finetune.schema import ConfigError


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="a training config (YAML), a run directory or a checkpoint")
    p.add_argument("--etas", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1, 1.0, 10.0])
    p.add_argument("--eta-norms", nargs="+", default=["none", "zsq"], help="ttt.eta_norm values to probe")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=None, help="default: the config's batch_size")
    p.add_argument("--chunk-size", type=int, default=None, help="default: the config's ttt.chunk_size")
    p.add_argument("--keep-target", action="store_true", help="do not open a zero-initialised target path")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    args, rest = p.parse_known_args()
    overrides = {}
    for flag in rest:
        key, sep, value = flag.removeprefix("--").partition("=")
        if not flag.startswith("--") or not sep:
            p.error(f"unrecognised argument {flag!r} (config overrides are --section.key=value)")
        overrides[key] = value
    try:
        lm, cfg, label = load_probe_model(args.source, overrides, torch.device(args.device))
        batches = probe_batches(cfg, lm, args.batches, args.batch_size or cfg.batch_size)
        res = probe(
            lm,
            batches,
            args.etas,
            args.eta_norms,
            chunk_size=args.chunk_size,
            open_target=not args.keep_target,
            source=label,
        )
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(to_text(res))
    if args.json:
        args.json.write_text(json.dumps(dataclasses.asdict(res), indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
