"""moshi-finetune-compatible conversations: a jsonl manifest of stereo wavs with word alignments.

- Manifest: one ``{"path": "...wav", "duration": seconds}`` per line; relative paths are relative to
  the manifest's directory.
- Next to each ``x.wav`` an ``x.json`` with ``{"alignments": [[word, [start, end], speaker], ...]}``.

Each file is cut into windows of ``num_frames`` frames at ``0, T, 2T, ...`` (the last one padded with
the zero token ``-1``, which the loss ignores). An item is the token grid ``[1 + 2 * num_codebooks, T]``:
the text stream (see :mod:`finetune.data.interleave`), then the Moshi channel's codebooks, then the
user's. A bad item (unreadable audio, mono file, broken alignments) is skipped with a warning naming
the file; the loader counts skipped items.
"""

from __future__ import annotations

import json
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .audio import FRAME_RATE, BadItem, CodeCache, encode_stereo, load_mimi, read_stereo
from .interleave import Interleaver, parse_alignments

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    path: Path
    duration: float


def read_manifest(manifest: str | Path) -> list[Entry]:
    """Entries of a jsonl manifest; ValueError naming the line for malformed ones."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest not found: {manifest}")
    entries = []
    for n, line in enumerate(manifest.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            path, duration = item["path"], float(item["duration"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f'{manifest}:{n}: expected a JSON object {{"path": ..., "duration": seconds}}, got {line[:80]!r}'
            ) from e
        if not math.isfinite(duration) or duration <= 0:
            raise ValueError(f"{manifest}:{n}: duration must be a positive number of seconds, got {duration}")
        p = Path(path)
        entries.append(Entry(p if p.is_absolute() else manifest.parent / p, duration))
    if not entries:
        raise ValueError(f"{manifest}: no entries")
    return entries


def alignment_path(audio: Path) -> Path:
    return audio.with_suffix(".json")


def load_words(audio: Path):
    p = alignment_path(audio)
    if not p.is_file():
        raise BadItem(f"{audio}: alignment file {p.name} not found (run scripts/annotate.py)")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise BadItem(f"{p}: not valid JSON ({e})") from e
    try:
        return parse_alignments(data, str(p))
    except ValueError as e:
        raise BadItem(str(e)) from e


class CodeSource:
    """Whole-file Mimi codes from the cache, or encoded now (and written to the cache if there is one)."""

    def __init__(
        self,
        mimi_weights: str | Path,
        mimi_config: str | Path | None,
        num_codebooks: int,
        cache_dir: str | Path | None = None,
        device: str = "cpu",
    ) -> None:
        self.mimi_weights, self.mimi_config = mimi_weights, mimi_config
        self.num_codebooks, self.device = num_codebooks, device
        self.cache = CodeCache(cache_dir, mimi_weights, num_codebooks) if cache_dir else None
        self._mimi = None
        self._recent: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __getstate__(self):  # DataLoader workers load their own Mimi
        state = dict(self.__dict__)
        state["_mimi"] = None
        state["_recent"] = OrderedDict()
        return state

    @property
    def mimi(self):
        if self._mimi is None:
            self._mimi = load_mimi(self.mimi_weights, self.mimi_config, self.num_codebooks, self.device)
        return self._mimi

    def encode(self, audio: Path) -> torch.Tensor:
        return encode_stereo(self.mimi, read_stereo(audio))

    def codes(self, audio: Path) -> torch.Tensor:
        key = str(audio)
        if key in self._recent:
            self._recent.move_to_end(key)
            return self._recent[key]
        codes = self.cache.get(audio) if self.cache is not None else None
        if codes is None:
            codes = self.encode(audio)
            if self.cache is not None:
                self.cache.put(audio, codes)
        self._recent[key] = codes
        if len(self._recent) > 4:
            self._recent.popitem(last=False)
        return codes


class ConversationDataset(Dataset):
    def __init__(
        self,
        entries: list[Entry],
        num_frames: int,
        interleaver: Interleaver,
        codes: CodeSource,
    ) -> None:
        self.entries, self.num_frames = entries, num_frames
        self.interleaver, self.source = interleaver, codes
        self.windows: list[tuple[int, int]] = []
        for i, e in enumerate(entries):
            n = max(1, math.ceil(e.duration * FRAME_RATE / num_frames - 1e-6))
            self.windows.extend((i, w) for w in range(n))
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.windows)

    def window_stats(self, context: int) -> dict[str, float]:
        """From the manifest's durations: how much of the windows is padding (loss-masked, but
        computed like real frames) and what share of windows holds more conversation than the
        attention ``context`` (steps), the only ones where a TTT fast weight can carry something
        attention cannot."""
        T = self.num_frames
        valid = [min(T, self.entries[i].duration * FRAME_RATE - w * T) for i, w in self.windows]
        return {
            "windows": len(valid),
            "padding": 1.0 - sum(valid) / (T * len(valid)) if valid else 0.0,
            "beyond_context": sum(v > context for v in valid) / len(valid) if valid else 0.0,
        }

    def item(self, index: int) -> torch.Tensor:
        """The token grid of window ``index``; BadItem if its file is unusable."""
        i, w = self.windows[index]
        entry = self.entries[i]
        codes = self.source.codes(entry.path)  # [2 * nq, frames of the whole file]
        words = load_words(entry.path)
        T = self.num_frames
        start = w * T
        audio = codes[:, start : start + T]
        valid = audio.shape[1]
        if valid == 0:
            raise BadItem(
                f"{entry.path}: window {w} starts after the end of the audio (manifest duration too long?)"
            )
        grid = torch.full((1 + codes.shape[0], T), -1, dtype=torch.long)
        grid[1:, :valid] = audio
        grid[0] = self.interleaver.build(words, T, offset=start / FRAME_RATE, valid_frames=valid)
        return grid

    def __getitem__(self, index: int) -> torch.Tensor | None:
        try:
            return self.item(index)
        except BadItem as e:
            key = str(e)
            if key not in self._warned:
                self._warned.add(key)
                logger.warning("skipping a bad data item: %s", e)
            return None
