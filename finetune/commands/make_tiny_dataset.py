"""Write a small conversation dataset in the real (moshi-finetune) format, with everything to use it.

    python scripts/make_tiny_dataset.py data/tiny [--num-train 32 --num-eval 4 --seconds 16]

Writes, under OUT:

- ``audio/conv_NNN.wav``: stereo 24 kHz 16-bit; left = the Moshi speaker, right = the user, taking
  turns. Words are spoken by espeak-ng when it is installed (``--speech auto``), otherwise each word
  is a synthetic sound of its own (a few harmonics whose pitch and rhythm derive from the word);
- ``audio/conv_NNN.json``: exact word alignments ``{"alignments": [[word, [start, end], speaker]]}``
  (``SPEAKER_MAIN`` for the left channel);
- ``train.jsonl`` / ``eval.jsonl``: manifests ``{"path": ..., "duration": ...}`` with relative paths;
- ``tokenizer.model``: a sentencepiece model trained on the transcripts (ids 0-3 reserved as in
  Moshi: 0 end-of-padding, 3 padding);
- ``mimi.safetensors`` + ``mimi_config.json``: a tiny random-weight Mimi (moshi's architecture at
  ~0.5 M parameters) whose codebooks are k-means initialised on this audio, so codes vary.

Deterministic for a given ``--seed``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import wave
from pathlib import Path

import numpy as np

from finetune.data.audio import SAMPLE_RATE as SR
from finetune.data.audio import tiny_mimi_config

_MIMI_FIT_CONVERSATIONS = 36
VOCAB = (
    "hello yes no maybe today tomorrow morning evening coffee tea music movie weather rain sun "
    "train station ticket city river mountain friend family dinner lunch book story game play "
    "seven three twelve blue green red small large quick slow happy tired ready sure thanks"
).split()


def _word_sound_synthetic(word: str, rng: np.random.Generator) -> np.ndarray:
    h = int(hashlib.sha256(word.encode()).hexdigest()[:8], 16)
    f0 = 110 + (h % 180)
    n_syll = max(1, len(word) // 3)
    dur = 0.18 * n_syll + 0.08 * ((h >> 8) % 3)
    t = np.arange(int(dur * SR)) / SR
    env = np.sin(np.pi * np.clip(t * n_syll / dur % 1.0, 0, 1)) ** 2
    sig = sum(
        np.sin(2 * np.pi * f0 * k * t * (1 + 0.05 * np.sin(2 * np.pi * 3 * t))) / k for k in (1, 2, 3, 5)
    )
    return (0.3 * env * sig + 0.003 * rng.standard_normal(len(t))).astype(np.float32)


@functools.cache
def _word_sound_espeak(word: str, voice: str) -> np.ndarray:
    """espeak-ng's rendering of one word, trimmed; cached (espeak is deterministic: the same data, one
    espeak call per word and voice instead of one per word per conversation)."""
    import sphn

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "w.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-w", str(out), word], check=True, capture_output=True)
        wav, _ = sphn.read(str(out), sample_rate=SR)
    wav = wav[0]
    nz = np.nonzero(np.abs(wav) > 1e-3)[0]  # trim espeak's leading/trailing silence: exact alignments
    return wav[nz[0] : nz[-1] + 1].astype(np.float32) if len(nz) else wav.astype(np.float32)


def make_conversation(rng, seconds: float, speech: str):
    """Stereo audio [2, samples] and alignments of a conversation with alternating turns."""
    total = int(seconds * SR)
    audio = np.zeros((2, total), dtype=np.float32)
    words = []
    t = 0.3 + rng.uniform(0, 0.5)
    speaker = 0
    sounds: dict[tuple[str, int], np.ndarray] = {}
    while t < seconds - 1.0:
        n_words = int(rng.integers(2, 7))
        for _ in range(n_words):
            w = str(rng.choice(VOCAB))
            key = (w, speaker)
            if key not in sounds:
                if speech == "espeak":
                    sounds[key] = _word_sound_espeak(w, "en" if speaker == 0 else "en+f3")
                else:
                    sounds[key] = _word_sound_synthetic(w + ("" if speaker == 0 else "#user"), rng)
            s = sounds[key]
            start = int(t * SR)
            if start + len(s) >= total:
                break
            audio[speaker, start : start + len(s)] += s
            words.append(
                [
                    w,
                    [round(t, 4), round(t + len(s) / SR, 4)],
                    "SPEAKER_MAIN" if speaker == 0 else "SPEAKER_OTHER",
                ]
            )
            t += len(s) / SR + rng.uniform(0.05, 0.25)
        t += rng.uniform(0.4, 1.2)
        speaker = 1 - speaker
    return audio, words


def write_stereo_wav(path: Path, audio: np.ndarray) -> None:
    pcm = (np.clip(audio.T, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(2)
        f.setsampwidth(2)
        f.setframerate(SR)
        f.writeframes(pcm.tobytes())


def train_tokenizer(texts: list[str], out: Path, vocab_size: int) -> None:
    import sentencepiece as spm

    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(texts))
        corpus = f.name
    try:
        spm.SentencePieceTrainer.train(
            input=corpus,
            model_prefix=str(out.with_suffix("")),
            vocab_size=vocab_size,
            model_type="unigram",
            eos_id=0,
            bos_id=1,
            unk_id=2,
            pad_id=3,
            character_coverage=1.0,
            hard_vocab_limit=False,
            minloglevel=2,
            num_threads=1,
        )
    finally:
        os.unlink(corpus)
        out.with_suffix(".vocab").unlink(missing_ok=True)
    # The model records the corpus path and output prefix: drop them so the file is a function of the seed.
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(out.read_bytes())
    del proto.trainer_spec.input[:]
    proto.trainer_spec.model_prefix = ""
    out.write_bytes(proto.SerializeToString())


def make_mimi(out_dir: Path, audios: list[np.ndarray], num_codebooks: int, seed: int) -> None:
    import torch
    from moshi.models import loaders
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    cfg = tiny_mimi_config()
    mimi = loaders.get_mimi(None, mimi_config=cfg, num_codebooks=num_codebooks)
    # moshi's codebooks k-means-initialise themselves on the first training-mode forwards, one level
    # per call: run the quantizer on this audio's latents until every level is initialised.
    # At most _MIMI_FIT_CONVERSATIONS conversations (the default dataset's 36): encoding them all at
    # once holds every latent in memory, and 144 conversations of 25 s took more than 20 GB.
    audios = audios[:_MIMI_FIT_CONVERSATIONS]
    clip = min(len(a[0]) for a in audios)
    x = torch.from_numpy(np.concatenate([a[:, :clip] for a in audios], 0))[:, None]  # [2N, 1, S]
    with torch.no_grad():
        latent = mimi.encode_to_latent(x, quantize=False)
        mimi.quantizer.train()
        for _ in range(2 * cfg["quantizer"]["n_q"] + 2):
            mimi.quantizer(latent, mimi.frame_rate)
        mimi.quantizer.eval()
    save_file({k: v.contiguous() for k, v in mimi.state_dict().items()}, str(out_dir / "mimi.safetensors"))
    (out_dir / "mimi_config.json").write_text(json.dumps(cfg, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--num-train", type=int, default=32)
    p.add_argument("--num-eval", type=int, default=4)
    p.add_argument("--seconds", type=float, default=16.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-codebooks", type=int, default=4, help="Mimi codebooks per channel (model n_q / 2)")
    p.add_argument(
        "--vocab-size", type=int, default=96, help="sentencepiece pieces (<= the model's text_card)"
    )
    p.add_argument("--speech", choices=["auto", "espeak", "synthetic"], default="auto")
    p.add_argument("--force", action="store_true", help="overwrite an existing dataset directory")
    args = p.parse_args()

    speech = args.speech
    if speech == "auto":
        speech = "espeak" if shutil.which("espeak-ng") else "synthetic"
    elif speech == "espeak" and not shutil.which("espeak-ng"):
        p.error("--speech espeak needs espeak-ng on PATH (apt-get install espeak-ng)")
    if args.out.exists() and any(args.out.iterdir()) and not args.force:
        p.error(f"{args.out} exists and is not empty; pass --force to overwrite it")
    (args.out / "audio").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    texts, audios = [], []
    manifests = {"train": [], "eval": []}
    n_total = args.num_train + args.num_eval
    for i in range(n_total):
        audio, words = make_conversation(rng, args.seconds, speech)
        wav = args.out / "audio" / f"conv_{i:03d}.wav"
        write_stereo_wav(wav, audio)
        wav.with_suffix(".json").write_text(json.dumps({"alignments": words}))
        split = "train" if i < args.num_train else "eval"
        manifests[split].append({"path": f"audio/{wav.name}", "duration": round(audio.shape[1] / SR, 4)})
        texts.append(" ".join(w[0] for w in words))
        audios.append(audio)
        if sys.stdout.isatty() or i + 1 == n_total:
            print(f"\r{speech} speech: {i + 1}/{n_total} conversations", end="", flush=True)
    print()
    for split, rows in manifests.items():
        (args.out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train_tokenizer(texts + VOCAB, args.out / "tokenizer.model", args.vocab_size)
    make_mimi(args.out, audios, args.num_codebooks, args.seed)
    print(f"wrote {n_total} conversations ({args.seconds:.0f} s each), tokenizer and tiny Mimi to {args.out}")


if __name__ == "__main__":
    main()
