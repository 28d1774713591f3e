"""Inference: a tiny fine-tuned TTT checkpoint streamed through scripts/infer.py and LMGen."""

import json
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune.inference import load_checkpoint_model, read_user_audio, stream_conversations

ROOT = Path(__file__).resolve().parents[1]


def _inputs(tiny_ds, n=2, seconds=4.0):
    files = sorted((tiny_ds / "audio").glob("conv_*.wav"))[:n]
    return [read_user_audio(f)[: int(24000 * seconds)] for f in files]


@pytest.mark.numerics
def test_greedy_stream_matches_teacher_forced_forward(tiny_ckpt, tiny_ds):
    loaded = load_checkpoint_model(tiny_ckpt)
    audio = _inputs(tiny_ds)
    res = stream_conversations(loaded, audio, greedy=True)
    lm = loaded.lm
    B, T = res.text_tokens.shape
    # moshi's LMGen feeds the user's frame s at the step that generates Moshi's frame s, which in
    # LMModel's training layout is the user code one step later: user[t] = frame t + 1 (frame 0 is
    # replaced by the initial token). The user codes are the ones Mimi produced while streaming.
    user = torch.from_numpy(res.user_tokens[:, :, 1 : T + 1])
    codes = torch.cat(
        [torch.from_numpy(res.text_tokens)[:, None], torch.from_numpy(res.audio_tokens), user], 1
    )
    with torch.no_grad():
        out = lm(codes.long())
    pred_text = out.text_logits[:, 0].argmax(-1)
    mask = out.text_mask[:, 0]
    assert mask.sum() > 0.9 * B * T
    assert torch.equal(pred_text[mask], torch.from_numpy(res.text_tokens)[mask])
    pred_audio = out.logits.argmax(-1)
    assert torch.equal(pred_audio[out.mask], torch.from_numpy(res.audio_tokens)[out.mask])
    # The stream really crossed chunk boundaries (chunk_size 8): TTT updates were applied.
    assert T > 3 * loaded.lm.transformer.layers[1].gating.config.chunk_size


@pytest.mark.numerics
def test_batch_of_two_equals_two_separate_runs(tiny_ckpt, tiny_ds):
    loaded = load_checkpoint_model(tiny_ckpt)
    audio = _inputs(tiny_ds)
    # Each conversation encoded alone (Mimi's streaming codes are not bit-stable across batch sizes).
    codes = [torch.from_numpy(stream_conversations(loaded, [a]).user_tokens) for a in audio]
    both = stream_conversations(loaded, user_codes=torch.cat(codes, 0))
    for b in range(2):
        one = stream_conversations(loaded, user_codes=codes[b])
        assert np.array_equal(one.text_tokens[0], both.text_tokens[b])
        assert np.array_equal(one.audio_tokens[0], both.audio_tokens[b])


@pytest.mark.numerics
def test_frozen_updates_equal_the_exported_model_without_ttt(tiny_ckpt, tiny_ds):
    from moshi_ttt import ttt_gatings

    loaded = load_checkpoint_model(tiny_ckpt)
    audio = _inputs(tiny_ds, n=1)
    frozen = stream_conversations(loaded, audio, ttt_updates=False)
    live = stream_conversations(loaded, audio, ttt_updates=True)
    # Same checkpoint, updates off in every TTT layer: the plain (W^(0)) model.
    for g in ttt_gatings(loaded.lm).values():
        g.config.eta = 0.0
    eta0 = stream_conversations(loaded, audio, ttt_updates=True)
    assert np.array_equal(frozen.text_tokens, eta0.text_tokens)
    assert np.array_equal(frozen.audio_tokens, eta0.audio_tokens)
    assert not np.array_equal(live.audio_tokens, frozen.audio_tokens)


def _run_cli(*args):
    return subprocess.run(
        [sys.executable, "scripts/infer.py", *map(str, args), "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )


def test_cli_writes_audio_text_and_tokens(tiny_ckpt, tiny_ds, tmp_path):
    wavs = sorted((tiny_ds / "audio").glob("conv_*.wav"))[:2]
    res = _run_cli(tiny_ckpt, *wavs, "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    assert "LM step per 80 ms frame: mean" in res.stdout
    for w in wavs:
        with wave.open(str(tmp_path / "out" / f"{w.stem}.wav")) as f:
            assert f.getnchannels() == 2 and f.getframerate() == 24000
            assert f.getnframes() == 7.0 * 24000  # same length as the input
        tokens = json.loads((tmp_path / "out" / f"{w.stem}.json").read_text())
        # 88 input frames; LMGen's output lags by the largest codebook delay (1 frame).
        assert len(tokens["text_tokens"]) == 87 and len(tokens["audio_tokens"]) == 4
        assert (tmp_path / "out" / f"{w.stem}.txt").is_file()


def test_cli_errors_are_clear(tiny_ckpt, tiny_ds, tmp_path):
    wav = sorted((tiny_ds / "audio").glob("conv_*.wav"))[0]
    res = _run_cli(tmp_path / "nope", wav)
    assert (
        res.returncode == 2
        and "does not exist (expected a run directory or a checkpoint directory)" in res.stderr
    )
    broken = tmp_path / "broken_run"
    shutil.copytree(tiny_ckpt, broken)
    for p in (broken / "checkpoints").rglob("ttt.safetensors"):
        p.unlink()
    res = _run_cli(broken, wav)
    assert res.returncode == 2 and "ttt.safetensors is missing" in res.stderr
    three = tmp_path / "three.wav"
    with wave.open(str(three), "wb") as f:
        f.setnchannels(3)
        f.setsampwidth(2)
        f.setframerate(24000)
        f.writeframes(np.zeros((24000, 3), dtype="<i2").tobytes())
    res = _run_cli(tiny_ckpt, three)
    assert res.returncode == 2 and "has 3 channel(s): expected mono user speech" in res.stderr
