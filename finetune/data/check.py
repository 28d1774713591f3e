"""Every problem of a dataset, found before training (``scripts/check_dataset.py``)."""

from __future__ import annotations

import json
import wave
from pathlib import Path

from .audio import BadItem
from .dataset import parse_manifest_line
from .interleave import MAIN_SPEAKER, parse_alignments

DURATION_TOLERANCE = 0.1  # seconds between the manifest's duration and the audio's
MAX_EXAMPLES = 8  # distinct unknown-id words quoted


def _wav_header_seconds(path: Path) -> float | None:
    if path.suffix.lower() != ".wav":
        return None
    try:
        with wave.open(str(path), "rb") as f:
            return f.getnframes() / f.getframerate()
    except (wave.Error, EOFError):
        return None  # e.g. float wavs, which the wave module does not parse


def _audio_info(path: Path, decode: bool = True) -> tuple[int, float, float | None]:
    """(channels, seconds of audio, seconds the wav header announces or None).

    ``decode``: read every sample (catches truncated and corrupt files); else only a wav header."""
    header = _wav_header_seconds(path)
    if not decode and header is not None:
        with wave.open(str(path), "rb") as f:
            return f.getnchannels(), header, header
    import sphn

    wav, sr = sphn.read(str(path))
    return (1 if wav.ndim == 1 else wav.shape[0]), wav.shape[-1] / sr, header


class UnknownWords:
    """Main-speaker words whose tokens include the tokenizer's unknown id, over a whole manifest."""

    def __init__(self, tokenizer) -> None:
        self.unk = tokenizer.unk_id() if hasattr(tokenizer, "unk_id") else None
        self.total, self.hits, self.examples = 0, 0, {}

    def add(self, word: str, tokens: list[int]) -> None:
        self.total += 1
        if self.unk is not None and self.unk in tokens:
            self.hits += 1
            self.examples[word] = self.examples.get(word, 0) + 1

    def problem(self, manifest: Path) -> str | None:
        if not self.hits:
            return None
        common = sorted(self.examples, key=lambda w: -self.examples[w])[:MAX_EXAMPLES]
        return (
            f"{manifest}: {self.hits} of {self.total} main-speaker words ({len(self.examples)} distinct) hold "
            f"characters the tokenizer maps to its unknown id {self.unk}, which the model would learn to emit; "
            f"most frequent: {common}. Write the transcripts as the tokenizer expects (case, punctuation) "
            "or use the checkpoint's own tokenizer"
        )


def check_manifest(manifest: str | Path, tokenizer=None, decode: bool = True) -> list[str]:
    """Human-readable problems ("<where>: <what>"); empty when the dataset is clean.

    ``decode``: decode every audio file (slower; finds truncated and corrupt audio), else read only
    wav headers. With a ``tokenizer``: words that map to no token or to its unknown id."""
    manifest = Path(manifest)
    if not manifest.is_file():
        return [f"{manifest}: manifest not found"]
    problems: list[str] = []
    unknown = UnknownWords(tokenizer) if tokenizer is not None else None
    n_entries = 0
    for n, raw in enumerate(manifest.read_bytes().splitlines(), 1):
        if not raw.strip():
            continue
        where = f"{manifest}:{n}"
        try:
            entry = parse_manifest_line(raw, where, manifest.parent)
        except BadItem as e:
            problems.append(str(e))
            continue
        n_entries += 1
        path = entry.path
        if not path.is_file():
            problems.append(f"{where}: audio file not found: {path}")
            continue
        try:
            channels, seconds, header = _audio_info(path, decode)
        except Exception as e:  # any decoder error
            problems.append(f"{path}: unreadable audio ({e})")
            continue
        if channels != 2:
            problems.append(
                f"{path}: {channels} channel(s), expected stereo (left: Moshi speaker, right: user)"
            )
        if header is not None and header - seconds > DURATION_TOLERANCE:
            problems.append(
                f"{path}: truncated: its header announces {header:.2f} s, it holds {seconds:.2f} s"
            )
        elif abs(entry.duration - seconds) > DURATION_TOLERANCE:
            problems.append(
                f"{where}: manifest duration {entry.duration:g} s but the audio lasts {seconds:.2f} s"
            )
        problems.extend(_check_alignments(path, seconds, tokenizer, unknown))
    if n_entries == 0 and not problems:
        problems.append(f"{manifest}: no entries")
    if unknown is not None and (line := unknown.problem(manifest)):
        problems.append(line)
    return problems


def _check_alignments(audio: Path, seconds: float, tokenizer, unknown: UnknownWords | None) -> list[str]:
    p = audio.with_suffix(".json")
    if not p.is_file():
        return [f"{audio}: alignment file {p.name} not found (scripts/annotate.py writes it)"]
    try:
        words = parse_alignments(json.loads(p.read_bytes()), str(p))
    except UnicodeDecodeError as e:
        return [f"{p}: not valid UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start})"]
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
    backwards = [w for w in words if w.end <= w.start]
    if backwards:
        w = backwards[0]
        out.append(
            f"{p}: {len(backwards)} word(s) end at or before their start (dropped from the text stream, as "
            f"moshi-finetune drops them), first {w.text!r} at [{w.start}, {w.end}]"
        )
    main = [w for w in words if w.speaker == MAIN_SPEAKER]
    if not main:
        out.append(f"{p}: empty transcript (no {MAIN_SPEAKER} word): the text stream would be all padding")
    if tokenizer is not None:
        tokens = {w.text: list(tokenizer.encode(w.text)) for w in main}
        empty = sorted(t for t, toks in tokens.items() if not toks)
        if empty:
            out.append(f"{p}: the tokenizer maps {len(empty)} word(s) to no token: {empty[:5]}")
        for w in main:
            unknown.add(w.text, tokens[w.text])
    return out
