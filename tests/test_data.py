"""Data pipeline: tiny dataset round trip, code cache, bad input, resumable loading (the text stream
rule is tested in test_interleave.py)."""

import json
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune.data import BatchPlan, ResumableLoader
from finetune.data.audio import CodeCache, load_mimi
from finetune.data.check import check_manifest
from finetune.data.dataset import CodeSource, ConversationDataset, read_manifest
from finetune.data.interleave import Interleaver

ROOT = Path(__file__).resolve().parents[1]
PAD, EPAD = 3, 0


# ---------------------------------------------------------------- tiny dataset round trip


def _dataset(ds: Path, cache_dir=None, num_frames=50):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(ds / "tokenizer.model"))
    source = CodeSource(ds / "mimi.safetensors", ds / "mimi_config.json", 4, cache_dir)
    return ConversationDataset(read_manifest(ds / "train.jsonl"), num_frames, Interleaver(sp), source)


def test_generated_dataset_is_clean_and_in_the_real_format(tiny_ds):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tiny_ds / "tokenizer.model"))
    assert check_manifest(tiny_ds / "train.jsonl", sp) == []
    entry = read_manifest(tiny_ds / "train.jsonl")[0]
    with wave.open(str(entry.path)) as f:
        assert f.getnchannels() == 2 and f.getframerate() == 24000
    words = json.loads(entry.path.with_suffix(".json").read_text())["alignments"]
    assert {w[2] for w in words} == {"SPEAKER_MAIN", "SPEAKER_OTHER"}
    assert sp.vocab_size() <= 100 and sp.id_to_piece(PAD) == "<pad>"


def test_cache_then_batches_of_expected_shapes_and_ids(tiny_ds, tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "scripts/encode_codes.py",
            "configs/tiny.yaml",  # its model reads 4 codebooks; the same overrides as train.py
            f"--data.train={tiny_ds / 'train.jsonl'}",
            "--data.eval=null",
            f"--data.cache_dir={tmp_path / 'c'}",
            f"--data.tokenizer={tiny_ds / 'tokenizer.model'}",
            f"--data.mimi_weights={tiny_ds / 'mimi.safetensors'}",
            f"--data.mimi_config={tiny_ds / 'mimi_config.json'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert "encoded 3 files" in res.stdout
    cached = _dataset(tiny_ds, tmp_path / "c")
    fresh = _dataset(tiny_ds, None)
    assert len(cached) == 3 * 2  # 7 s = 87.5 frames -> two windows of 50 per file
    for i in range(len(cached)):
        a, b = cached[i], fresh[i]
        assert a.shape == (9, 50) and a.dtype == torch.long
        assert torch.equal(a, b)  # cached and on-the-fly agree exactly
        audio, text = a[1:], a[0]
        valid = audio[0] >= 0
        assert ((audio[:, valid] >= 0) & (audio[:, valid] < 64)).all()
        assert (text[valid] >= 0).all() and (text[valid] < 100).all() and (text[~valid] == -1).all()
    assert (cached[1][1:, 38:] == -1).all() and (
        cached[1][1:, :38] >= 0
    ).all()  # 88 frames: last window has 38
    assert len({int(t) for i in range(len(cached)) for t in cached[i][0] if t > 3}) > 5  # real words present
    # Re-running skips what is cached.
    again = subprocess.run(res.args, cwd=ROOT, capture_output=True, text=True)
    assert "3 already cached" in again.stdout


def test_cache_key_follows_file_content_and_mimi(tiny_ds, tmp_path):
    audio = read_manifest(tiny_ds / "train.jsonl")[0].path
    copy = tmp_path / "a.wav"
    shutil.copy(audio, copy)
    cache = CodeCache(tmp_path / "c", tiny_ds / "mimi.safetensors", 4)
    assert cache.path_for(copy).name == cache.path_for(audio).name
    data = bytearray(copy.read_bytes())
    data[-2] ^= 0xFF
    copy.write_bytes(bytes(data))
    assert cache.path_for(copy).name != cache.path_for(audio).name
    assert CodeCache(tmp_path / "c", tiny_ds / "mimi.safetensors", 8).dir != cache.dir


def test_mimi_weights_must_be_safetensors(tmp_path):
    p = tmp_path / "mimi.pt"
    p.write_bytes(b"x")
    with pytest.raises(ValueError, match="must be a safetensors file"):
        load_mimi(p, None, 4)


# ---------------------------------------------------------------- bad input


def _copy_ds(tiny_ds, tmp_path) -> Path:
    ds = tmp_path / "ds"
    shutil.copytree(tiny_ds, ds)
    return ds


def _write_mono(path: Path, seconds=2.0):
    pcm = (np.zeros(int(24000 * seconds))).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(24000)
        f.writeframes(pcm.tobytes())


def test_check_dataset_reports_every_problem(tiny_ds, tmp_path):
    import sentencepiece

    ds = _copy_ds(tiny_ds, tmp_path)
    audio = ds / "audio"
    _write_mono(audio / "mono.wav")
    (audio / "mono.json").write_text(json.dumps({"alignments": [["hello", [0.1, 0.4], "SPEAKER_MAIN"]]}))
    (audio / "broken.wav").write_bytes(b"RIFF not really a wav")
    shutil.copy(audio / "conv_000.wav", audio / "outside.wav")
    (audio / "outside.json").write_text(json.dumps({"alignments": [["hello", [6.5, 9.0], "SPEAKER_MAIN"]]}))
    shutil.copy(audio / "conv_000.wav", audio / "empty.wav")
    (audio / "empty.json").write_text(json.dumps({"alignments": [["hello", [0.5, 0.9], "SPEAKER_OTHER"]]}))
    shutil.copy(audio / "conv_000.wav", audio / "oov.wav")
    (audio / "oov.json").write_text(json.dumps({"alignments": [["", [0.5, 0.9], "SPEAKER_MAIN"]]}))
    shutil.copy(audio / "conv_000.wav", audio / "noalign.wav")
    lines = [
        '{"path": "audio/conv_000.wav", "duration": 7.0}',
        "not json at all",
        '{"path": "audio/missing.wav", "duration": 3.0}',
        '{"path": "audio/mono.wav", "duration": 2.0}',
        '{"path": "audio/broken.wav", "duration": 1.0}',
        '{"path": "audio/conv_000.wav", "duration": 9.5}',
        '{"path": "audio/outside.wav", "duration": 7.0}',
        '{"path": "audio/empty.wav", "duration": 7.0}',
        '{"path": "audio/oov.wav", "duration": 7.0}',
        '{"path": "audio/noalign.wav", "duration": 7.0}',
    ]
    (ds / "bad.jsonl").write_text("\n".join(lines) + "\n")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(ds / "tokenizer.model"))
    text = "\n".join(check_manifest(ds / "bad.jsonl", sp))
    expected = [
        r"bad.jsonl:2: malformed line",
        r"bad.jsonl:3: audio file not found: .*missing.wav",
        r"mono.wav: 1 channel\(s\), expected stereo",
        r"broken.wav: unreadable audio",
        r"bad.jsonl:6: manifest duration 9.5 s but the audio lasts 7.00 s",
        r"outside.json: 1 word\(s\) end after the audio \(7.00 s\), first 'hello' at \[6.5, 9.0\]",
        r"empty.json: empty transcript \(no SPEAKER_MAIN word\)",
        r"oov.json: the tokenizer maps 1 word\(s\) to no token",
        r"noalign.wav: alignment file noalign.json not found",
    ]
    import re

    for pattern in expected:
        assert re.search(pattern, text), pattern
    assert len(text.splitlines()) == len(expected)
    cli = [sys.executable, "scripts/check_dataset.py"]
    assert subprocess.run(cli + [str(ds / "bad.jsonl")], cwd=ROOT, capture_output=True).returncode == 1
    assert subprocess.run(cli + [str(ds / "train.jsonl")], cwd=ROOT, capture_output=True).returncode == 0


def _train_cfg(ds: Path, run_dir: Path, manifest: str, **over):
    from finetune.args import load_config

    base = {
        "run_dir": str(run_dir),
        "device": "cpu",
        "finetune": "full",
        "batch_size": 2,
        "max_steps": 3,
        "log_interval": 1,
        "model": {
            "source": "tiny",
            "tiny": {"dim": 32, "num_layers": 2, "num_heads": 2, "context": 8, "n_q": 8, "dep_q": 4},
        },
        "ttt": {"layers": [1], "chunk_size": 8},
        "data": {
            "source": "manifest",
            "train": str(ds / manifest),
            "tokenizer": str(ds / "tokenizer.model"),
            "mimi_weights": str(ds / "mimi.safetensors"),
            "mimi_config": str(ds / "mimi_config.json"),
            "duration_sec": 4.0,
        },
        "checkpoint": {"interval": 0},
    }
    from finetune.schema import apply_overrides

    return load_config(None, apply_overrides(base, over))


def test_training_skips_bad_items_with_a_warning_and_counts_them(tiny_ds, tmp_path, capsys):
    from finetune.training.trainer import train

    ds = _copy_ds(tiny_ds, tmp_path)
    _write_mono(ds / "audio" / "mono.wav", 7.0)
    (ds / "audio" / "mono.json").write_text(json.dumps({"alignments": [["hello", [0.1, 0.4]]]}))
    rows = (ds / "train.jsonl").read_text() + '{"path": "audio/mono.wav", "duration": 7.0}\n'
    (ds / "mixed.jsonl").write_text(rows)
    before = {p: p.stat().st_mtime_ns for p in ds.rglob("*")}
    train(_train_cfg(ds, tmp_path / "run", "mixed.jsonl", max_steps=6))
    out = capsys.readouterr().out
    assert "skipping a bad data item" in out and "mono.wav: has 1 channel(s), expected stereo" in out
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("data/skipped_items", 0) for r in recs if r["kind"] == "train") > 0
    assert {p: p.stat().st_mtime_ns for p in ds.rglob("*")} == before  # nothing written into the data


def test_training_stops_clearly_when_no_item_is_valid(tiny_ds, tmp_path):
    from finetune.training.trainer import train

    ds = _copy_ds(tiny_ds, tmp_path)
    for p in (ds / "audio").glob("*.json"):
        p.unlink()
    with pytest.raises(RuntimeError, match="no valid item in a whole epoch"):
        train(_train_cfg(ds, tmp_path / "run", "train.jsonl"))


def test_manifest_training_fills_the_cache_and_reads_it(tiny_ds, tmp_path):
    from finetune.training.trainer import train

    cache = tmp_path / "codes"
    summary = train(_train_cfg(tiny_ds, tmp_path / "run", "train.jsonl", **{"data.cache_dir": str(cache)}))
    assert len(list(cache.rglob("*.safetensors"))) == 3
    assert summary["loss"] > 0


# ---------------------------------------------------------------- resumable loading


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resumes_at_the_saved_position(tiny_ds, tmp_path, num_workers):
    ds = _dataset(tiny_ds, tmp_path / "c", num_frames=25)  # 4 windows per file, 12 items
    plan = BatchPlan(len(ds), batch_size=2, rank=0, world_size=1, seed=3)
    straight = ResumableLoader(ds, plan, num_workers=num_workers)
    it = iter(straight)
    first = [next(it) for _ in range(4)]  # 12 items, 6 batches per epoch
    state = straight.state_dict()
    rest = [next(it) for _ in range(5)]  # crosses the epoch boundary
    resumed = ResumableLoader(ds, plan, num_workers=num_workers)
    resumed.load_state_dict(state)
    it2 = iter(resumed)
    again = [next(it2) for _ in range(5)]
    assert len(first) == 4 and state["step"] == 4
    for a, b in zip(rest, again):
        assert torch.equal(a, b)


def test_sharding_splits_each_global_batch_between_ranks():
    plans = [BatchPlan(20, 2, rank=r, world_size=2, seed=1) for r in range(2)]
    single = BatchPlan(20, 4, rank=0, world_size=1, seed=1)
    for step in range(single.batches_per_epoch):
        assert plans[0].indices(0, step) + plans[1].indices(0, step) == single.indices(0, step)


def test_annotate_writes_alignments_with_a_given_recognizer(tiny_ds, tmp_path):
    from finetune.commands.annotate import annotate_file

    audio = tmp_path / "a.wav"
    shutil.copy(read_manifest(tiny_ds / "train.jsonl")[0].path, audio)

    def fake(mono):
        assert mono.ndim == 1
        yield " hello", 0.5, 0.9
        yield "world ", 1.0, 1.4

    out = annotate_file(audio, fake, both_channels=True)
    data = json.loads(out.read_text())["alignments"]
    assert data[0] == ["hello", [0.5, 0.9], "SPEAKER_MAIN"] and len(data) == 4
    assert {w[2] for w in data} == {"SPEAKER_MAIN", "SPEAKER_OTHER"}


def test_tiny_dataset_is_a_function_of_the_seed(tiny_ds, tmp_path):
    subprocess.run(
        [
            sys.executable,
            "scripts/make_tiny_dataset.py",
            str(tmp_path / "again"),
            "--num-train",
            "3",
            "--num-eval",
            "1",
            "--seconds",
            "7",
            "--speech",
            "synthetic",
            "--vocab-size",
            "60",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    for f in (
        "train.jsonl",
        "eval.jsonl",
        "tokenizer.model",
        "mimi.safetensors",
        "audio/conv_002.wav",
        "audio/conv_002.json",
    ):
        assert (tmp_path / "again" / f).read_bytes() == (tiny_ds / f).read_bytes(), f


def test_other_sample_rates_are_resampled_to_24k(tmp_path):
    from finetune.data.audio import read_stereo

    sr, seconds = 16000, 1.5
    t = np.arange(int(sr * seconds)) / sr
    pcm = (np.stack([np.sin(2 * np.pi * 440 * t), np.zeros_like(t)], 1) * 16000).astype("<i2")
    path = tmp_path / "x.wav"
    with wave.open(str(path), "wb") as f:
        f.setnchannels(2)
        f.setsampwidth(2)
        f.setframerate(sr)
        f.writeframes(pcm.tobytes())
    wav = read_stereo(path)
    # sphn's resampler pads a little (under one 1920-sample Mimi frame).
    assert wav.shape[0] == 2 and 0 <= wav.shape[1] - 24000 * seconds < 1920
    assert np.abs(wav[1]).max() < 1e-3 < np.abs(wav[0]).max()  # left stays left


def test_embedded_default_config_trains_through_the_cli(tiny_ds, tmp_path):
    """`train.py configs/tiny.yaml` as the README runs it, on a generated dataset (fewer steps)."""
    run = tmp_path / "run"
    data = {k: tiny_ds / v for k, v in _TINY_FILES.items()}
    res = subprocess.run(
        [
            sys.executable,
            "train.py",
            "configs/tiny.yaml",
            f"--run_dir={run}",
            "--max_steps=4",
            "--batch_size=2",
        ]
        + ["--log_interval=1", "--eval.interval=4", "--eval.num_batches=1", "--checkpoint.interval=4"]
        + [f"--data.{k}={p}" for k, p in data.items()]
        + [f"--data.cache_dir={tmp_path / 'codes'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4]
    assert any(r["kind"] == "eval" for r in recs)
    assert (run / "checkpoints").is_dir() and any((tmp_path / "codes").rglob("*"))


_TINY_FILES = {
    "train": "train.jsonl",
    "eval": "eval.jsonl",
    "tokenizer": "tokenizer.model",
    "mimi_weights": "mimi.safetensors",
    "mimi_config": "mimi_config.json",
}


def test_a_small_evaluation_set_gets_smaller_batches_and_too_small_is_refused():
    from finetune.data.loader import eval_plan

    plan = eval_plan(3, 4, rank=1, world_size=2)
    assert plan.batch_size == 1 and plan.batches_per_epoch == 1 and plan.indices(0, 0) == [1]
    assert eval_plan(10, 4, 0, 1).batch_size == 4
    with pytest.raises(ValueError, match="evaluation set has 1 items, fewer than the 2 processes"):
        eval_plan(1, 4, 0, 2)
