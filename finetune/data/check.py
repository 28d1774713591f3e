"""Every problem of a dataset, found before training (``scripts/check_dataset.py``)."""

from __future__ import annotations

import json
import math
import wave
from pathlib import Path

from .interleave import MAIN_SPEAKER, parse_alignments

DURATION_TOLERANCE = 0.1  # seconds between the manifest's duration and the audio's


def _audio_info(path: Path) -> tuple[int, float]:
    """(channels, seconds); reads only the header of wav files."""
    if path.suffix.lower() == ".wav":
        try:
            with wave.open(str(path), "rb") as f:
                return f.getnchannels(), f.getnframes() / f.getframerate()
        except (wave.Error, EOFError):
            pass  # e.g. float wavs, which the wave module does not parse: decode them
    import sphn

    wav, sr = sphn.read(str(path))
    return (1 if wav.ndim == 1 else wav.shape[0]), wav.shape[-1] / sr


def check_manifest(manifest: str | Path, tokenizer=None) -> list[str]:
    """Human-readable problems ("<where>: <what>"); empty when the dataset is clean."""
    manifest = Path(manifest)
    if not manifest.is_file():
        return [f"{manifest}: manifest not found"]
    problems: list[str] = []
    lines = manifest.read_text().splitlines()
    n_entries = 0
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{manifest}:{n}"
        try:
            item = json.loads(line)
            rel, duration = item["path"], float(item["duration"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            problems.append(
                f'{where}: malformed line, expected {{"path": ..., "duration": seconds}}: {line[:80]!r}'
            )
            continue
        n_entries += 1
        path = Path(rel) if Path(rel).is_absolute() else manifest.parent / rel
        if not path.is_file():
            problems.append(f"{where}: audio file not found: {path}")
            continue
        try:
            channels, seconds = _audio_info(path)
        except Exception as e:  # any decoder error
            problems.append(f"{path}: unreadable audio ({e})")
            continue
        if channels != 2:
            problems.append(
                f"{path}: {channels} channel(s), expected stereo (left: Moshi speaker, right: user)"
            )
        if not math.isfinite(duration) or abs(duration - seconds) > DURATION_TOLERANCE:
            problems.append(f"{where}: manifest duration {duration} s but the audio lasts {seconds:.2f} s")
        problems.extend(_check_alignments(path, seconds, tokenizer))
    if n_entries == 0 and not problems:
        problems.append(f"{manifest}: no entries")
    return problems


def _check_alignments(audio: Path, seconds: float, tokenizer) -> list[str]:
    p = audio.with_suffix(".json")
    if not p.is_file():
        return [f"{audio}: alignment file {p.name} not found (scripts/annotate.py writes it)"]
    try:
        words = parse_alignments(json.loads(p.read_text()), str(p))
    except json.JSONDecodeError as e:
        return [f"{p}: not valid JSON ({e})"]
    except ValueError as e:
        return [str(e)]
    out = []
    outside = [w for w in words if w.end > seconds + DURATION_TOLERANCE]
    if outside:
        w = outside[0]
        out.append(
            f"{p}: {len(outside)} word(s) end after the audio ({seconds:.2f} s), first {w.text!r} at "
            f"[{w.start}, {w.end}]"
        )
    main = [w for w in words if w.speaker == MAIN_SPEAKER]
    if not main:
        out.append(f"{p}: empty transcript (no {MAIN_SPEAKER} word): the text stream would be all padding")
    if tokenizer is not None:
        empty = sorted({w.text for w in main if not tokenizer.encode(w.text)})
        if empty:
            out.append(f"{p}: the tokenizer maps {len(empty)} word(s) to no token: {empty[:5]}")
    return out
