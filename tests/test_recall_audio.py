"""The recall task with live audio (``data.recall.audio``) and filler words."""

from __future__ import annotations

import pytest
import torch

from finetune.args import load_config
from finetune.data.recall import _MARKOV_BRANCHING, RecallTask, recall_datasets
from finetune.schema import ConfigError
from moshi_ttt.tiny import build_tiny_lm

KW = dict(num_frames=160, context=16, far_min=62, n_q=4, card=64, text_card=100)


@pytest.mark.parametrize("audio", ["silent", "uniform", "markov"])
def test_audio_mode_leaves_the_text_and_queries_unchanged(audio):
    silent, live = RecallTask(8, seed=3, **KW), RecallTask(8, seed=3, audio=audio, **KW)
    for i in range(8):
        a, b = silent[i], live[i]
        assert b.shape == (1 + KW["n_q"], KW["num_frames"])
        assert torch.equal(a[0], b[0])
        assert silent.queries(i) == live.queries(i)
        assert torch.equal(b, live[i])  # a function of (seed, index)
        assert b[1:].min() >= 0 and b[1:].max() < KW["card"]


def test_live_audio_changes_on_every_frame_and_differs_between_items():
    for audio in ("uniform", "markov"):
        ds = RecallTask(4, seed=0, audio=audio, **KW)
        x, y = ds[0][1:], ds[1][1:]
        changes = (x[:, 1:] != x[:, :-1]).float().mean()
        assert changes > 0.7, (audio, changes)  # 64 codes: repeats are rare
        assert (x != y).float().mean() > 0.7
    silent = RecallTask(2, seed=0, **KW)[0][1:]
    assert (silent == 0).all()


def test_markov_audio_follows_one_sparse_transition_table():
    succ: dict[tuple[int, int], set[int]] = {}
    # Two seeds (train and eval splits): one table for both, the audio "language" is shared.
    for seed in (0, 7):
        ds = RecallTask(16, seed=seed, audio="markov", **KW)
        for i in range(16):
            a = ds[i][1:]
            for k in range(a.shape[0]):
                for t in range(1, a.shape[1]):
                    succ.setdefault((k, int(a[k, t - 1])), set()).add(int(a[k, t]))
    # Over 2 x 16 x 160 frames each (codebook, code) is seen ~80 times, followed by at most its 4
    # successors (uniform codes would show ~50 distinct ones).
    assert max(len(s) for s in succ.values()) <= _MARKOV_BRANCHING
    assert sum(len(s) for s in succ.values()) / len(succ) > 3


def test_bank_audio_takes_crops_of_the_bank_streams():
    bank = [torch.randint(0, 64, (4, n)) for n in (160, 200, 333)]
    ds = RecallTask(12, seed=1, audio="bank", audio_bank=bank, **KW)
    starts = set()
    for i in range(12):
        a = ds[i][1:]
        hits = [
            (w, s)
            for w, x in enumerate(bank)
            for s in range(x.shape[1] - 159)
            if torch.equal(x[:, s : s + 160], a)
        ]
        assert hits, "an item's audio must be a crop of a bank stream"
        starts.add(hits[0])
    assert len(starts) > 6  # varied crops, not one window per stream
    with pytest.raises(ValueError, match="audio_bank"):
        RecallTask(2, audio="bank", **KW)
    with pytest.raises(ValueError, match="at least 160"):
        RecallTask(2, audio="bank", audio_bank=[b[:, :100] for b in bank], **KW)


def test_fillers_only_replace_pad_and_keep_every_event():
    plain = RecallTask(8, seed=2, **KW)
    filled = RecallTask(8, seed=2, filler_rate=0.5, **KW)
    first_filler = filled.first_filler
    rates = []
    for i in range(8):
        a, b = plain[i][0], filled[i][0]
        changed = a != b
        assert (a[changed] == plain.pad).all()  # only PAD frames change
        assert ((b[changed] >= first_filler) & (b[changed] < first_filler + filled.num_fillers)).all()
        assert plain.queries(i) == filled.queries(i)
        rates.append(changed.sum() / (a == plain.pad).sum())
    assert 0.35 < float(torch.stack(rates).mean()) < 0.65
    with pytest.raises(ValueError, match="filler_rate"):
        RecallTask(2, filler_rate=1.5, **KW)
    dense = RecallTask(2, seed=2, filler_rate=1.0, **KW)  # text on every frame
    assert (dense[0][0] != dense.pad).all() and dense.queries(0) == plain.queries(0)


def test_recall_config_bank_needs_a_manifest_and_builds_from_the_tiny_dataset(tiny_ds, tmp_path):
    with pytest.raises(ConfigError, match="data.train"):
        load_config(None, {"data.source": "recall", "data.recall.audio": "bank"})
    with pytest.raises(ConfigError, match="filler_rate"):
        load_config(None, {"data.recall.filler_rate": 1.5})
    tiny = {"dim": 32, "num_layers": 2, "context": 8, "n_q": 8, "dep_q": 4}
    overrides = {
        "model.tiny": tiny,
        "data.source": "recall",
        "data.duration_sec": 4.0,
        "data.recall": {"num_train": 4, "num_eval": 2, "audio": "bank", "pairs": 2},
        "data.train": str(tiny_ds / "train.jsonl"),
        "data.eval": str(tiny_ds / "eval.jsonl"),
        "data.tokenizer": str(tiny_ds / "tokenizer.model"),
        "data.mimi_weights": str(tiny_ds / "mimi.safetensors"),
        "data.mimi_config": str(tiny_ds / "mimi_config.json"),
    }
    cfg = load_config(None, overrides)
    model = build_tiny_lm(**tiny)
    train, evals = recall_datasets(cfg, model)
    x = train[0]
    assert x.shape == (1 + 8, 50)
    assert (x[1:, 1:] != x[1:, :-1]).any()  # speech codes vary
    assert len(train.audio_bank) == 3 and len(evals.audio_bank) == 1  # eval audio: the eval manifest
    assert all(s.shape[0] == 8 and s.shape[1] >= 80 for s in train.audio_bank)  # whole 7 s files
    with pytest.raises(ConfigError, match="at least 100 frames"):
        recall_datasets(load_config(None, {**overrides, "data.duration_sec": 8.0}), model)
