#!/usr/bin/env python
"""Encode a dataset's audio with Mimi once, into the code cache training reads.

    python scripts/encode_codes.py --config configs/tiny.yaml          # data.train / data.eval / data.cache_dir
    python scripts/encode_codes.py --config configs/my_run.yaml --device cuda   # the model's own Mimi
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


def _model_config(cfg) -> dict | None:
    """The model's config.json (or tiny kwargs), without fetching its weights; None if unknown."""
    import json

    m = cfg.model
    if m.source == "tiny":
        from moshi_ttt.tiny import tiny_lm_kwargs

        return tiny_lm_kwargs(**m.tiny)
    if m.init_from:
        from finetune.mf_compat import init_from_files

        init = init_from_files(m.init_from)
        if init.full is not None:
            return init.config
    if m.config_path and not m.config_path.startswith("hf://"):
        return json.loads(Path(m.config_path).read_text())
    if m.source == "hf":
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(m.hf_repo, "config.json")).read_text())
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifests", nargs="*", type=Path)
    p.add_argument("--config", type=Path, help="take manifests, Mimi and cache_dir from a training config")
    p.add_argument("--cache", type=Path)
    p.add_argument("--mimi-weights", type=Path)
    p.add_argument("--mimi-config", type=Path)
    p.add_argument(
        "--num-codebooks", type=int, help="Mimi codebooks per channel (default: the model's, else 8)"
    )
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.config is not None:
        from finetune.args import load_config

        cfg = load_config(args.config)
        d = cfg.data
        args.manifests = args.manifests or [Path(m) for m in (d.train, d.eval) if m]
        args.cache = args.cache or (Path(d.cache_dir) if d.cache_dir else None)
        if args.mimi_weights is None:
            from finetune.data.build import resolve_assets

            _, mimi, mimi_config = resolve_assets(cfg)  # model.source hf: the checkpoint's own Mimi
            args.mimi_weights = Path(mimi) if mimi else None
            args.mimi_config = args.mimi_config or (Path(mimi_config) if mimi_config else None)
        kw = _model_config(cfg)
        if args.num_codebooks is None and kw is not None:
            args.num_codebooks = max(kw["dep_q"], kw["n_q"] - kw["dep_q"])  # what training will look up
    args.num_codebooks = args.num_codebooks or 8
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
