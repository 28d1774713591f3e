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

from ..schema import ConfigError
from .audio import FRAME_RATE, BadItem, CodeCache, encode_stereo, load_mimi, read_stereo
from .interleave import Interleaver, parse_alignments

logger = logging.getLogger(__name__)

_MAX_WARNED = 10  # bad manifest lines warned about one by one


@dataclass(frozen=True)
class Entry:
    path: Path
    duration: float


def parse_manifest_line(raw: bytes, where: str, base: Path) -> Entry:
    """One manifest line (bytes) as an Entry; BadItem naming ``where`` (``file:line``) and the reason."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadItem(
            f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
            "manifests are UTF-8 text"
        ) from None
    try:
        item = json.loads(line)
        path, duration = item["path"], item["duration"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise BadItem(
            f'{where}: malformed line, expected {{"path": ..., "duration": seconds}}: {line[:80]!r}'
        ) from None
    if not isinstance(path, str) or not path:
        raise BadItem(f"{where}: path must be a non-empty string, got {path!r}")
    if (
        not isinstance(duration, (int, float))
        or isinstance(duration, bool)
        or not math.isfinite(duration)
        or duration <= 0
    ):
        raise BadItem(f"{where}: duration must be a positive number of seconds, got {duration!r}")
    p = Path(path)
    return Entry(p if p.is_absolute() else base / p, float(duration))


def scan_manifest(manifest: str | Path) -> tuple[list[Entry], list[str]]:
    """(usable entries, problems of the other lines) of a jsonl manifest; ConfigError if it is missing."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise ConfigError(f"manifest not found: {manifest}")
    entries, problems = [], []
    for n, raw in enumerate(manifest.read_bytes().splitlines(), 1):
        if not raw.strip():
            continue
        try:
            entries.append(parse_manifest_line(raw, f"{manifest}:{n}", manifest.parent))
        except BadItem as e:
            problems.append(str(e))
    return entries, problems


def read_manifest(manifest: str | Path, warn: bool = True) -> list[Entry]:
    """The usable entries of a jsonl manifest; bad lines (not UTF-8, malformed, bad duration) are skipped,
    with a warning naming the line when ``warn``. ConfigError if the file is missing or no line is usable."""
    entries, problems = scan_manifest(manifest)
    if warn:
        for p in problems[:_MAX_WARNED]:
            logger.warning("skipping a bad manifest line: %s", p)
        if len(problems) > _MAX_WARNED:
            logger.warning(
                "%s: %d more bad lines skipped (scripts/check_dataset.py lists every one)",
                manifest,
                len(problems) - _MAX_WARNED,
            )
    if not entries:
        first = f" (first problem: {problems[0]})" if problems else ""
        raise ConfigError(f"{manifest}: no usable entries{first}")
    return entries


def alignment_path(audio: Path) -> Path:
    return audio.with_suffix(".json")


def load_words(audio: Path):
    p = alignment_path(audio)
    if not p.is_file():
        raise BadItem(f"{audio}: alignment file {p.name} not found (run scripts/annotate.py)")
    try:
        data = json.loads(p.read_bytes())
    except UnicodeDecodeError as e:
        raise BadItem(f"{p}: not valid UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
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
        self._miss_reported = False

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
            if self.cache is not None and not self._miss_reported:
                self._miss_reported = True  # once: every later miss has the same cause
                logger.warning(
                    "%s is not in the code cache %s: %s. Encoding while reading (Mimi on every new file is "
                    "slow); fill the cache once with: python scripts/encode_codes.py CONFIG [the same "
                    "--key=value overrides as train.py]",
                    audio,
                    self.cache.dir,
                    self.cache.explain_miss(audio),
                )
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
