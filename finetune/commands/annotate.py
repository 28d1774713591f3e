"""Write word alignments (``x.json`` next to each ``x.wav``) with a speech recognizer.

    pip install -e ".[annotate]"                     # faster-whisper
    python scripts/annotate.py data/train.jsonl [--model medium] [--language en] [--device cuda] [--both-channels]

Transcribes the left channel (the Moshi speaker, ``SPEAKER_MAIN``) with word timestamps; with
``--both-channels`` the right channel too (``SPEAKER_OTHER``, not used for the text stream but useful
for checks). Paths in the manifest are relative to the manifest. Files that already have an alignment
file are skipped, so an interrupted run resumes; each file is written atomically. Runs locally.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from moshi_ttt.files import write_text_atomic

# A transcriber takes mono 16 kHz float32 audio and yields (word, start_seconds, end_seconds).
Transcriber = Callable[["object"], Iterable[tuple[str, float, float]]]


def annotate_file(audio: Path, transcribe: Transcriber, both_channels: bool = False) -> Path:
    import sphn

    wav, _ = sphn.read(str(audio), sample_rate=16_000)
    if wav.ndim != 2 or wav.shape[0] != 2:
        raise ValueError(f"{audio}: expected stereo audio (left: Moshi speaker, right: user)")
    words = []
    channels = [(0, "SPEAKER_MAIN")] + ([(1, "SPEAKER_OTHER")] if both_channels else [])
    for ch, speaker in channels:
        for text, start, end in transcribe(wav[ch]):
            text = text.strip()
            if text:
                words.append([text, [round(float(start), 3), round(float(end), 3)], speaker])
    words.sort(key=lambda w: w[1][0])
    out = audio.with_suffix(".json")
    write_text_atomic(out, json.dumps({"alignments": words}))
    return out


def faster_whisper_transcriber(model: str, language: str | None, device: str) -> Transcriber:
    try:
        from faster_whisper import WhisperModel
    except ImportError:
        sys.exit('annotate.py needs faster-whisper: pip install -e ".[annotate]"')
    asr = WhisperModel(model, device=device, compute_type="float16" if device == "cuda" else "int8")

    def transcribe(mono):
        segments, _ = asr.transcribe(mono, language=language, word_timestamps=True, vad_filter=True)
        for seg in segments:
            for w in seg.words or []:
                yield w.word, w.start, w.end

    return transcribe


def main() -> None:
    from finetune.data.dataset import read_manifest

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", type=Path)
    p.add_argument("--model", default="medium")
    p.add_argument("--language", default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--both-channels", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args()
    entries = read_manifest(args.manifest)
    todo = [e for e in entries if args.overwrite or not e.path.with_suffix(".json").is_file()]
    print(f"{len(entries)} files, {len(entries) - len(todo)} already annotated")
    if not todo:
        return
    transcribe = faster_whisper_transcriber(args.model, args.language, args.device)
    failed = 0
    for i, e in enumerate(todo, 1):
        try:
            annotate_file(e.path, transcribe, args.both_channels)
        except Exception as err:  # keep going: report and count
            failed += 1
            print(f"failed: {e.path}: {err}", file=sys.stderr)
        print(f"{i}/{len(todo)} {e.path.name}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
