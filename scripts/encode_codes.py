#!/usr/bin/env python
"""Encode a dataset's audio with Mimi once, into the code cache training reads.

    python scripts/encode_codes.py --config configs/tiny.yaml          # data.train / data.eval / data.cache_dir
    python scripts/encode_codes.py data/train.jsonl --cache codes/ --mimi-weights mimi.safetensors \\
        [--mimi-config mimi_config.json] [--num-codebooks 8] [--device cuda]

Entries are keyed by the audio file's content, the Mimi weights' content and the number of
codebooks, so a changed file or a different Mimi is encoded again and nothing stale is read. Files
already cached are skipped; unreadable files are reported and skipped.
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm  # noqa: E402

from finetune.data.audio import BadItem, CodeCache, encode_stereo, load_mimi, read_stereo  # noqa: E402
from finetune.data.dataset import read_manifest  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifests", nargs="*", type=Path)
    p.add_argument("--config", type=Path, help="take manifests, Mimi and cache_dir from a training config")
    p.add_argument("--cache", type=Path)
    p.add_argument("--mimi-weights", type=Path)
    p.add_argument("--mimi-config", type=Path)
    p.add_argument("--num-codebooks", type=int, default=8)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.config is not None:
        from finetune.args import load_config

        cfg = load_config(args.config)
        d = cfg.data
        args.manifests = args.manifests or [Path(m) for m in (d.train, d.eval) if m]
        args.cache = args.cache or (Path(d.cache_dir) if d.cache_dir else None)
        args.mimi_weights = args.mimi_weights or (Path(d.mimi_weights) if d.mimi_weights else None)
        args.mimi_config = args.mimi_config or (Path(d.mimi_config) if d.mimi_config else None)
        if cfg.model.source == "tiny":
            from moshi_ttt.tiny import tiny_lm_kwargs

            kw = tiny_lm_kwargs(**cfg.model.tiny)
            args.num_codebooks = max(kw["dep_q"], kw["n_q"] - kw["dep_q"])
    if not args.manifests or args.cache is None or args.mimi_weights is None:
        p.error("need manifests, --cache and --mimi-weights (or a --config that sets data.cache_dir)")
    entries = [e for m in args.manifests for e in read_manifest(m)]
    cache = CodeCache(args.cache, args.mimi_weights, args.num_codebooks)
    todo = [e for e in entries if not cache.path_for(e.path).is_file()] if entries else []
    print(f"{len(entries)} files, {len(entries) - len(todo)} already cached in {cache.dir}")
    if not todo:
        return
    mimi = load_mimi(args.mimi_weights, args.mimi_config, args.num_codebooks, args.device)
    t0, seconds, failed = time.time(), 0.0, 0
    for e in tqdm(todo, unit="file", disable=None):
        try:
            codes = encode_stereo(mimi, read_stereo(e.path))
        except BadItem as err:
            failed += 1
            print(f"skipped: {err}", file=sys.stderr)
            continue
        cache.put(e.path, codes)
        seconds += codes.shape[1] / 12.5
    dt = time.time() - t0
    print(
        f"encoded {len(todo) - failed} files ({seconds:.0f} s of audio) in {dt:.1f} s "
        f"({seconds / max(dt, 1e-9):.0f}x real time); {failed} failed"
    )
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
