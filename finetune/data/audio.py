"""Audio I/O, Mimi encoding and the code cache.

Audio is read with ``sphn`` (Kyutai's audio I/O) and resampled to Mimi's 24 kHz. A conversation is a
stereo file: channel 0 (left) is the speaker Moshi learns to be, channel 1 (right) the user. Both
channels are encoded by Mimi in one batch of 2; the codes are ``[2 * num_codebooks, frames]`` with
Moshi's codebooks first, as ``LMModel`` expects them after the text stream.

The cache stores the codes of a whole file, so every window sliced from it is the same whether it
comes from the cache or from an on-the-fly encoding. Entries are keyed by the file's content
(SHA-256), the Mimi weights' content and the number of codebooks, and written atomically.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from moshi_ttt.files import save_safetensors_atomic

SAMPLE_RATE = 24_000
FRAME_RATE = 12.5
FRAME_SIZE = 1920  # samples per Mimi frame at 24 kHz


class BadItem(ValueError):
    """A data item that cannot be used (the message names the file and the problem)."""


def read_stereo(path: str | Path) -> np.ndarray:
    """``[2, samples]`` float32 at 24 kHz; BadItem if unreadable or not stereo."""
    import sphn

    path = Path(path)
    if not path.is_file():
        raise BadItem(f"{path}: file not found")
    try:
        wav, _ = sphn.read(str(path), sample_rate=SAMPLE_RATE)
    except Exception as e:  # sphn raises plain exceptions for undecodable files
        raise BadItem(f"{path}: cannot read audio ({e})") from e
    if wav.ndim != 2 or wav.shape[0] != 2:
        channels = 1 if wav.ndim == 1 else wav.shape[0]
        raise BadItem(
            f"{path}: has {channels} channel(s), expected stereo (left: the Moshi speaker, right: the user)"
        )
    return wav.astype(np.float32, copy=False)


def tiny_mimi_config() -> dict[str, Any]:
    """A Mimi of ~0.5 M parameters with moshi's real structure (for tests and the CPU default)."""
    from moshi.models import loaders

    cfg = copy.deepcopy(loaders._mimi_config)
    cfg["seanet"].update(dimension=64, n_filters=8)
    cfg["quantizer"].update(dimension=32, n_q=8, bins=64, input_dimension=64, output_dimension=64)
    cfg["transformer"].update(
        d_model=64, num_heads=4, num_layers=1, dim_feedforward=128, input_dimension=64, output_dimensions=[64]
    )
    return cfg


def load_mimi(weights: str | Path, config: str | Path | None, num_codebooks: int, device="cpu"):
    """moshi's Mimi from safetensors weights (and an optional JSON config for a non-default Mimi)."""
    from moshi.models import loaders

    weights = Path(weights)
    if weights.suffix not in (".safetensors", ".sft", ".sfts"):
        raise ValueError(f"{weights}: Mimi weights must be a safetensors file")
    if not weights.is_file():
        raise FileNotFoundError(f"Mimi weights not found: {weights}")
    cfg = None
    if config is not None:
        cfg = json.loads(Path(config).read_text())
    mimi = loaders.get_mimi(str(weights), mimi_config=cfg, device=device, num_codebooks=num_codebooks)
    return mimi.eval()


@torch.no_grad()
def encode_stereo(mimi, wav: np.ndarray) -> torch.Tensor:
    """Mimi codes of both channels: ``[2 * num_codebooks, ceil(samples / 1920)]`` int64."""
    device = next(mimi.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(wav))[:, None].to(device)  # [2, 1, samples]
    codes = mimi.encode(x)  # [2, num_codebooks, frames]
    return codes.reshape(-1, codes.shape[-1]).cpu().long()


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@lru_cache(maxsize=16)
def _digest_cached(path: str, mtime_ns: int, size: int) -> str:
    return file_digest(path)


def cached_digest(path: str | Path) -> str:
    st = os.stat(path)
    return _digest_cached(str(path), st.st_mtime_ns, st.st_size)


class CodeCache:
    """``root/<mimi digest>-q<num_codebooks>/<audio digest>.safetensors`` holding one file's codes."""

    def __init__(self, root: str | Path, mimi_weights: str | Path, num_codebooks: int) -> None:
        self.root = Path(root)
        self.dir = self.root / f"{cached_digest(mimi_weights)[:16]}-q{num_codebooks}"

    def path_for(self, audio: str | Path) -> Path:
        return self.dir / f"{cached_digest(audio)[:32]}.safetensors"

    def get(self, audio: str | Path) -> torch.Tensor | None:
        p = self.path_for(audio)
        if not p.is_file():
            return None
        return load_file(str(p))["codes"].long()

    def explain_miss(self, audio: str | Path) -> str:
        """Why ``audio`` is not in the cache: encoded with other settings, or not encoded at all."""
        name = self.path_for(audio).name
        mimi, _, q = self.dir.name.rpartition("-q")
        for other in sorted(self.root.glob("*-q*")) if self.root.is_dir() else []:
            if other == self.dir or not (other / name).is_file():
                continue
            other_mimi, _, other_q = other.name.rpartition("-q")
            why = []
            if other_q != q:
                why.append(f"{other_q} codebooks, this model reads {q}")
            if other_mimi != mimi:
                why.append("other Mimi weights than data.mimi_weights")
            return f"the cache holds its codes for other settings ({'; '.join(why)}) in {other}"
        if self.dir.is_dir() and any(self.dir.iterdir()):
            return "the cache has other files' codes only (or this file changed since it was encoded)"
        return "the cache holds nothing for this Mimi and codebook count yet"

    def put(self, audio: str | Path, codes: torch.Tensor) -> Path:
        p = self.path_for(audio)
        return save_safetensors_atomic({"codes": codes.to(torch.int32)}, p, metadata={"source": str(audio)})
