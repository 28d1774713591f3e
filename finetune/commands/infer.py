"""Stream conversations through a fine-tuned (TTT) Moshi and write what it says.

    python scripts/infer.py runs/tiny user.wav [other.wav ...] [--out infer_out] [--sample] [--no-ttt-updates]

RUN_OR_CHECKPOINT is a run directory (its newest checkpoint is used) or a checkpoint directory. Each
input is the user's side of a conversation: mono speech, or a stereo file in the dataset layout (the
right channel, the user, is fed; ``--channel`` picks another). All inputs run as one batch through
moshi's LMGen, each with its own TTT fast weights, starting from W^(0). For each input, OUT gets

- ``NAME.wav``: stereo 24 kHz, left = Moshi's generated voice (decoded by Mimi), right = the input;
- ``NAME.txt``: Moshi's text stream as ``[seconds] word`` lines; ``NAME.json``: token ids per frame.

``--no-ttt-updates`` keeps the fast weights frozen at W^(0) (the model without test-time training)
for comparison. The summary gives the per-frame latency (ms per 80 ms frame).
"""

from __future__ import annotations

import argparse
import json
import sys
import wave
from pathlib import Path

import numpy as np
import torch

from finetune.data.audio import FRAME_SIZE, SAMPLE_RATE
from finetune.serving.inference import (
    Sampling,
    load_checkpoint_model,
    read_user_audio,
    stream_conversations,
    text_with_timestamps,
)


def _write_wav(path: Path, channels: np.ndarray, sr: int = SAMPLE_RATE) -> None:
    pcm = (np.clip(channels.T, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels.shape[0])
        f.setsampwidth(2)
        f.setframerate(sr)
        f.writeframes(pcm.tobytes())


def _stats(ms: list[float]) -> str:
    a = np.array(ms[3:] if len(ms) > 6 else ms)  # the first frames include warm-up
    return f"mean {a.mean():.1f} ms, p50 {np.percentile(a, 50):.1f}, p95 {np.percentile(a, 95):.1f}, max {a.max():.1f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("inputs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path("infer_out"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--sample", action="store_true", help="sample (temperatures, top-k) instead of greedy decoding"
    )
    p.add_argument("--temp", type=float, default=Sampling.temp)
    p.add_argument("--temp-text", type=float, default=Sampling.temp_text)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ttt-updates", action="store_true", help="freeze the fast weights at W^(0)")
    p.add_argument("--channel", choices=["auto", "left", "right"], default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args()
    try:
        loaded = load_checkpoint_model(args.checkpoint, args.device)
        audio = [read_user_audio(path, args.channel) for path in args.inputs]
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"checkpoint {loaded.checkpoint} | TTT {'on' if loaded.ttt else 'absent'}"
        f"{' (updates frozen)' if loaded.ttt and args.no_ttt_updates else ''} | {len(audio)} input(s)"
    )
    res = stream_conversations(
        loaded,
        audio,
        sampling=Sampling(greedy=not args.sample, temp=args.temp, temp_text=args.temp_text),
        seed=args.seed,
        ttt_updates=not args.no_ttt_updates,
        progress=not args.quiet,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    for b, (path, user) in enumerate(zip(args.inputs, audio)):
        n = min(int(np.ceil(len(user) / FRAME_SIZE)), res.text_tokens.shape[1])
        both = np.zeros((2, len(user)), dtype=np.float32)  # Moshi lags max_delay frames: its tail is silent
        voice = res.audio[b, : len(user)]
        both[0, : len(voice)] = voice
        both[1] = user
        _write_wav(args.out / f"{path.stem}.wav", both)
        words = text_with_timestamps(loaded.tokenizer, res.text_tokens[b, :n])
        (args.out / f"{path.stem}.txt").write_text("".join(f"[{t:7.2f}s] {w}\n" for t, w in words))
        (args.out / f"{path.stem}.json").write_text(
            json.dumps(
                {
                    "text_tokens": res.text_tokens[b, :n].tolist(),
                    "audio_tokens": res.audio_tokens[b, :, :n].tolist(),
                }
            )
        )
        print(f"{path.name}: {len(words)} words -> {args.out / path.stem}.{{wav,txt,json}}")
    print(f"LM step per 80 ms frame: {_stats(res.step_ms)}")
    print(f"whole frame (Mimi encode + LM + Mimi decode): {_stats(res.frame_ms)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
