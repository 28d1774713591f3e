#!/usr/bin/env python
"""Spoken symbols for the conversational-memory benchmark (``data.recall.facts: speech``).

    python scripts/make_word_codes.py configs/convmem_speech.yaml [--out data/recall_speech/words.safetensors]

Each word the benchmark speaks (the definition marker, the query marker, the keys, the values) is
said by espeak-ng in the user's voice of ``make_tiny_dataset.py`` and encoded, alone, by the Mimi the
config's data uses (``data.mimi_weights`` / ``data.mimi_config``), keeping the codebooks of one
channel (``n_q - dep_q`` of the model). The result is one safetensors file: ``word_NNN`` tensors
``[codebooks, frames]`` in the order the task reads them, and the words in its metadata. The same
word is therefore the same code pattern wherever it is said, and words differ in length.
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune.args import load_config  # noqa: E402
from finetune.data.audio import FRAME_SIZE, SAMPLE_RATE, load_mimi  # noqa: E402

MARKERS = ("note", "what")  # "note KEY VALUE" defines, "what KEY" asks
KEYS = (
    "apple bread chair door eagle field garden horse island jacket kettle lemon mirror needle ocean pencil "
    "rabbit saddle table umbrella violin window yacht zebra"
).split()
VALUES = (
    "one two three four five six seven eight nine ten red blue green black white pink gold grey brown tan"
).split()


def speak(word: str, voice: str, speed: int) -> np.ndarray:
    """espeak-ng's ``word`` at 24 kHz, mono float32, leading and trailing silence trimmed."""
    import sphn

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "w.wav"
        cmd = ["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(out), word]
        subprocess.run(cmd, check=True, capture_output=True)
        wav, _ = sphn.read(str(out), sample_rate=SAMPLE_RATE)
    wav = wav[0]
    nz = np.nonzero(np.abs(wav) > 1e-3)[0]
    return (wav[nz[0] : nz[-1] + 1] if len(nz) else wav).astype(np.float32)


@torch.no_grad()
def encode_word(mimi, wav: np.ndarray, lead: int = 6) -> torch.Tensor:
    """Mimi codes ``[codebooks, frames]`` of the frames that cover one word, encoded after ``lead``
    frames of silence: a Mimi's first frames are its start-up transient, the same for every word (seen
    with the tiny Mimi: three identical frames, and some words identical altogether), while after
    silence each word gets codes of its own, as inside a conversation."""
    n = -(-len(wav) // FRAME_SIZE)
    x = torch.zeros(1, 1, (lead + n) * FRAME_SIZE)
    x[0, 0, lead * FRAME_SIZE : lead * FRAME_SIZE + len(wav)] = torch.from_numpy(wav)
    return mimi.encode(x)[0, :, lead:].long()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="a training config with data.mimi_weights (+ mimi_config) and its model")
    p.add_argument("--out", type=Path, default=None, help="default: the config's data.recall.word_codes")
    p.add_argument("--voice", default="en+f3", help="espeak-ng voice (make_tiny_dataset's user voice)")
    p.add_argument(
        "--speed", type=int, default=260, help="espeak-ng words per minute (short words fit the window)"
    )
    args = p.parse_args()
    cfg = load_config(args.config)
    out = args.out or (Path(cfg.data.recall.word_codes) if cfg.data.recall.word_codes else None)
    if out is None:
        p.error("give --out or set data.recall.word_codes in the config")
    if not shutil.which("espeak-ng"):
        p.error("espeak-ng is not on PATH (apt-get install espeak-ng)")
    if not cfg.data.mimi_weights:
        p.error("the config names no data.mimi_weights")
    from finetune.model import resolve_base

    kw, _ = resolve_base(cfg)
    n_user = int(kw["n_q"]) - int(kw["dep_q"])
    r = cfg.data.recall
    if r.num_keys > len(KEYS) or r.num_values > len(VALUES):
        p.error(
            f"at most {len(KEYS)} keys and {len(VALUES)} values are spoken (config: {r.num_keys}, {r.num_values})"
        )
    words = [*MARKERS, *KEYS[: r.num_keys], *VALUES[: r.num_values]]
    mimi = load_mimi(cfg.data.mimi_weights, cfg.data.mimi_config, num_codebooks=max(n_user, int(kw["dep_q"])))
    from safetensors.torch import save_file

    tensors, lengths = {}, []
    for i, w in enumerate(words):
        codes = encode_word(mimi, speak(w, args.voice, args.speed))[:n_user].contiguous()
        tensors[f"word_{i:03d}"] = codes
        lengths.append(codes.shape[1])
    meta = {
        "words": json.dumps(words),
        "voice": args.voice,
        "speed": str(args.speed),
        "mimi": str(cfg.data.mimi_weights),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, out)
    print(
        f"wrote {len(words)} words ({n_user} codebooks, {min(lengths)}-{max(lengths)} frames each) to {out}"
    )
    for w, n in zip(words, lengths):
        print(f"  {w}: {n} frames")


if __name__ == "__main__":
    main()
