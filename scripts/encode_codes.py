#!/usr/bin/env python
"""Encode a dataset's audio with Mimi once, into the code cache training reads.

    python scripts/encode_codes.py configs/tiny.yaml
    python scripts/encode_codes.py configs/my_run.yaml --data.train=data/mine.jsonl --data.cache_dir=codes

Takes the training config and the same ``--section.key=value`` overrides as ``train.py``, so it
encodes exactly what the run reads: ``data.train`` and ``data.eval`` with ``data.mimi_weights`` (and
``data.mimi_config``) into ``data.cache_dir``, with the model's number of codebooks; ``device`` picks
where Mimi runs. Entries are keyed by the audio file's content, the Mimi weights' content and the
number of codebooks, so a changed file or a different Mimi is encoded again and nothing stale is read.
Files already cached are skipped; bad manifest lines and unreadable files are reported and skipped
(exit status 1 if any file failed, 2 for a configuration error).
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune.cli import parse_cli, run_main  # noqa: E402
from finetune.schema import ConfigError  # noqa: E402


def main(argv: list[str]) -> int:
    import logging

    import torch
    from tqdm import tqdm

    from finetune.args import load_config
    from finetune.data.audio import FRAME_RATE, BadItem, CodeCache, encode_stereo, load_mimi, read_stereo
    from finetune.data.build import config_num_codebooks, resolve_assets
    from finetune.data.dataset import read_manifest
    from finetune.preflight import check_config_paths

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    config, overrides = parse_cli(argv)
    if config is None:
        raise ConfigError("usage: encode_codes.py CONFIG [--section.key=value ...] (the training config)")
    cfg = load_config(config, overrides)
    d = cfg.data
    if not (d.source == "manifest" or (d.source == "recall" and d.recall.reads_manifests)):
        raise ConfigError(
            f"data.source is {d.source!r}: only manifest data (or a recall task reading manifests: "
            "data.recall.audio bank, data.recall.conversations) has audio to encode"
        )
    if not d.cache_dir:
        raise ConfigError("data.cache_dir: set the cache directory to fill (--data.cache_dir=PATH)")
    check_config_paths(cfg)
    _, mimi_weights, mimi_config = resolve_assets(cfg)
    codebooks = config_num_codebooks(cfg)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    entries = [e for m in (d.train, d.eval) if m for e in read_manifest(m)]
    cache = CodeCache(d.cache_dir, mimi_weights, codebooks)
    todo = [e for e in entries if not cache.path_for(e.path).is_file()] if entries else []
    print(
        f"{len(entries)} files, {len(entries) - len(todo)} already cached in {cache.dir} ({codebooks} codebooks)"
    )
    if not todo:
        return 0
    mimi = load_mimi(mimi_weights, mimi_config, codebooks, device)
    t0, seconds, failed = time.time(), 0.0, 0
    for e in tqdm(todo, unit="file", disable=None):
        try:
            codes = encode_stereo(mimi, read_stereo(e.path))
        except BadItem as err:
            failed += 1
            print(f"skipped: {err}", file=sys.stderr)
            continue
        cache.put(e.path, codes)
        seconds += codes.shape[1] / FRAME_RATE
    dt = time.time() - t0
    print(
        f"encoded {len(todo) - failed} files ({seconds:.0f} s of audio) in {dt:.1f} s "
        f"({seconds / max(dt, 1e-9):.0f}x real time); {failed} failed"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    run_main(main, __doc__)
