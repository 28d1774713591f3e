"""What the chunk-vs-window study needs: recall data whose near distances and far share are set
(``data.recall.near_max`` / ``far_pairs``), the evaluation's far-answer and chunk-crossing metrics,
and sweeps shared between launchers (``--shard``)."""

from types import SimpleNamespace

import pytest
import torch
from test_longcontext import _sweep_file, fake_trainer

from finetune.args import load_config
from finetune.data.recall import RecallTask
from finetune.research.sweep import Sweep
from finetune.schema import ConfigError
from finetune.training import distributed as D
from finetune.training.evaluation import crosses_chunk, recall_metrics

KW = dict(num_frames=96, context=16, far_min=32, n_q=2)


def test_defaults_are_half_far_and_near_distances_up_to_the_window():
    plain = RecallTask(32, seed=5, **KW)
    spelled = RecallTask(32, seed=5, far_pairs=2, near_max=11, **KW)
    for i in range(32):
        assert torch.equal(plain[i], spelled[i]) and plain.queries(i) == spelled.queries(i)
    near = [q.distance for i in range(32) for q in plain.queries(i) if not q.far]
    assert min(near) >= 3 and max(near) == 11  # the whole window less the markers


def test_near_max_and_far_pairs_change_the_queries():
    short = RecallTask(64, seed=1, near_max=5, **KW)
    near = [q.distance for i in range(64) for q in short.queries(i) if not q.far]
    assert len(near) == 128 and set(near) == {3, 4, 5}
    far_only = RecallTask(16, seed=1, far_pairs=4, **KW)
    for i in range(16):
        qs = far_only.queries(i)
        assert len(qs) == 4 and all(q.far and q.distance >= 32 for q in qs)
    with pytest.raises(ValueError, match="near_max must be in"):
        RecallTask(2, near_max=12, **KW)  # beyond the window
    with pytest.raises(ValueError, match="far_pairs must be in"):
        RecallTask(2, far_pairs=5, **KW)
    with pytest.raises(ConfigError, match="data.recall.far_pairs"):
        load_config(None, {"data.recall.far_pairs": -1})
    with pytest.raises(ConfigError, match="data.recall.far_pairs"):
        load_config(None, {"data.recall.far_pairs": 5})  # more than pairs (4)
    assert load_config(None, {"data.recall.far_pairs": 0}).data.recall.far_pairs == 0  # in-window part alone
    with pytest.raises(ValueError, match="near_max applies to facts in text only"):
        RecallTask(2, near_max=5, facts="audio", **KW)
    with pytest.raises(ConfigError, match="data.recall.near_max"):
        load_config(None, {"data.recall.near_max": 2})


def test_crosses_chunk_compares_the_chunks_of_definition_and_query():
    q = SimpleNamespace(value_pos=17, distance=3)  # definition's value at step 14
    assert crosses_chunk(q, 16) and not crosses_chunk(q, 32) and crosses_chunk(q, 4)
    assert not crosses_chunk(SimpleNamespace(value_pos=15, distance=3), 16)


class _Scripted(torch.nn.Module):
    """Answers a near query right when its definition is in an earlier chunk, else a value not in
    the sequence; a far query with the value of another pair of the sequence."""

    def __init__(self, data: RecallTask, chunk: int):
        super().__init__()
        self.data, self.chunk = data, chunk
        self.items = {tuple(data[i][0].tolist()): i for i in range(len(data))}
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, codes):
        B, _, T = codes.shape
        logits = torch.zeros(B, 1, T, 100)
        for b in range(B):
            qs = self.data.queries(self.items[tuple(codes[b, 0].tolist())])
            for q in qs:
                if q.far:
                    pred = next(x.value for x in qs if x.value != q.value)
                elif crosses_chunk(q, self.chunk):
                    pred = q.value
                else:
                    values = range(self.data.first_value, self.data.first_value + self.data.num_values)
                    pred = next(v for v in values if v not in {x.value for x in qs})
                logits[b, 0, q.value_pos, pred] = 1.0
        return SimpleNamespace(text_logits=logits)


def test_recall_metrics_split_near_by_chunk_and_count_far_answers_of_another_value():
    cfg = load_config(None, {"batch_size": 4, "eval.num_batches": 4, "ttt.chunk_size": 8})
    tasks = (RecallTask(16, seed=s, num_values=64, **KW) for s in range(100))
    data = next(d for d in tasks if _distinct(d))
    dist = D.DistInfo(0, 1, 0, torch.device("cpu"))
    m = recall_metrics(_Scripted(data, 8), data, cfg, dist)
    near = [q for i in range(16) for q in data.queries(i) if not q.far]
    share = sum(crosses_chunk(q, 8) for q in near) / len(near)
    assert 0 < share < 1
    assert m["recall_near_cross_share"] == pytest.approx(share)
    assert m["recall_acc_near_cross"] == 1.0 and m["recall_acc_near_within"] == 0.0
    assert m["recall_acc_near"] == pytest.approx(share)
    assert m["recall_acc_far"] == 0.0 and m["recall_far_other"] == 1.0
    off = load_config(None, {"batch_size": 4, "eval.num_batches": 4, "ttt.enabled": False})
    assert "recall_acc_near_cross" not in recall_metrics(_Scripted(data, 8), data, off, dist)


def _distinct(data: RecallTask) -> bool:
    """Every item's pairs have distinct values (so 'another value' is never the right one)."""
    return all(len({q.value for q in data.queries(i)}) == len(data.queries(i)) for i in range(len(data)))


def test_shards_split_a_sweep_without_overlap(tmp_path):
    sweep = Sweep.load(_sweep_file(tmp_path))
    calls: list[str] = []
    runner = fake_trainer(sweep, calls, set())
    sweep.run_all(runner, log=lambda s: None, shard=(1, 3))
    names = [r.name for r in sweep.runs()]
    assert calls == names[1::3]
    sweep.run_all(runner, log=lambda s: None, shard=(0, 3))
    sweep.run_all(runner, log=lambda s: None, shard=(2, 3))
    assert sorted(calls) == sorted(names)  # each run once
    with pytest.raises(ConfigError, match="shard 3/3"):
        sweep.run_all(runner, shard=(3, 3))


def test_a_stop_file_ends_the_launcher_before_its_next_run(tmp_path):
    sweep = Sweep.load(_sweep_file(tmp_path))
    calls: list[str] = []
    runner = fake_trainer(sweep, calls, set())

    def stop_after_first(run):
        code = runner(run)
        (sweep.out_dir / Sweep.STOP_FILE).touch()
        return code

    sweep.run_all(stop_after_first, log=lambda s: None)
    assert len(calls) == 1
    (sweep.out_dir / Sweep.STOP_FILE).unlink()
    sweep.run_all(runner, log=lambda s: None)
    assert set(calls) == {r.name for r in sweep.runs()}


def _fake_run(path, cfg: dict, records: list[dict]) -> None:
    import json

    import yaml

    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_chunk_window_report_times_the_plateau_end(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    def cfg(window, chunk, seed):
        return {
            "seed": seed,
            "max_steps": 300,
            "model": {"tiny": {"context": window, "num_layers": 4}},
            "ttt": {"chunk_size": chunk},
            "data": {"recall": {"audio": "markov", "pairs": 4}},
        }

    def evals(fars):
        return [
            {"kind": "eval", "step": 100 * (i + 1), "recall_acc_far": f, "recall_acc_near": 0.5}
            for i, f in enumerate(fars)
        ]

    sweep = tmp_path / "sw"
    _fake_run(sweep / "a", cfg(16, 8, 0), evals([0.5, 0.85, 1.0]))
    _fake_run(sweep / "b", cfg(16, 8, 1), evals([0.5, 0.5, 0.9]))
    _fake_run(sweep / "c", cfg(32, 64, 0), evals([0.5, 0.5, 0.5]))
    _fake_run(sweep / "d", cfg(64, 32, 0), evals([0.45]))  # stopped (or still running) at step 100
    out = subprocess.run(
        [sys.executable, "scripts/chunk_window.py", str(sweep), "--out", str(tmp_path / "o")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    text = (tmp_path / "o" / "chunk_window.md").read_text()
    # mean of the seeds' bound steps, then each seed's own
    assert "0.5 W: 250 (200-300) {s0 200, s1 300} [2/2]; far 0.95 (0.90-1.00)" in text
    assert "2 W: > 300 [0/1]; far 0.50" in text  # censored at the budget
    assert "0.5 W: unfinished: not bound by step 100 of 300 (far 0.45)" in text
    assert (tmp_path / "o" / "chunk_window.png").is_file()


def test_eta_auto_report_compares_auto_with_the_best_hand_picked_eta(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    sweep = tmp_path / "sw"
    nll = {"auto": [0.5, 0.7, 0.6], 0.1: [1.5, 1.6, 1.7], 10.0: [0.3, 0.4, 0.8]}
    near = {"auto": 0.9, 0.1: 0.95, 10.0: 0.5}
    for eta, vals in nll.items():
        for seed, v in enumerate(vals):
            cfg = {
                "seed": seed,
                "max_steps": 400,
                "model": {"tiny": {"dim": 64}},
                "ttt": {"chunk_size": 8, "eta": eta},
            }
            recs = [
                {"kind": "train", "step": 50, "ttt/layer1/term_ratio": 1.0},
                {
                    "kind": "eval",
                    "step": 400,
                    "recall_nll_far": v,
                    "recall_acc_far": 1 - v / 3,
                    "recall_acc_near": near[eta],
                },
            ]
            if eta == "auto":
                recs.append({"kind": "eta_auto", "step": 50, "eta/L1": 0.2 + seed / 10})
            _fake_run(sweep / f"{eta}_{seed}", cfg, recs)
    out = subprocess.run(
        [sys.executable, "scripts/eta_auto_report.py", str(sweep)], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    row = next(x for x in (sweep / "eta_auto.md").read_text().splitlines() if x.startswith("| 64, 8 |"))
    # best far: eta 10 (mean 0.50, worst seed 0.80): auto's mean 0.60 is within; best keeping near: 0.1.
    assert "| 64, 8 | 1 | 0.60 [0.50, 0.70] | 10: 0.50 [0.30, 0.80] | yes (0.60 <= 0.80) | 0.1: 1.60" in row
    assert "L1 0.2-0.4" in row


def test_far_min_moves_far_queries_further_but_never_within_reach():
    from finetune.data.recall import recall_datasets
    from moshi_ttt.tiny import build_tiny_lm

    over = {
        "data.source": "recall",
        "model.tiny": {"dim": 32, "num_layers": 2, "context": 8, "num_heads": 2},
        "data.duration_sec": 8.0,
        "data.recall.num_train": 16,
    }
    model = build_tiny_lm(dim=32, num_layers=2, context=8, num_heads=2)
    train, _ = recall_datasets(load_config(None, over), model)
    assert train.far_min == 2 * 7 + 2  # the receptive field + 2
    train, _ = recall_datasets(load_config(None, {**over, "data.recall.far_min": 40}), model)
    far = [q.distance for i in range(16) for q in train.queries(i) if q.far]
    assert train.far_min == 40 and min(far) >= 40
    with pytest.raises(ConfigError, match="far_min: 15 steps is within reach of attention"):
        recall_datasets(load_config(None, {**over, "data.recall.far_min": 15}), model)
