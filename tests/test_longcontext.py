"""Recall task generator, sweep expansion / skip / resume / collection, long-context evaluation."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import manifest_data

from finetune.data.recall import DEF, FIRST_KEY, QRY, RecallTask, receptive_field
from finetune.research.sweep import Sweep, last_metrics, metric_curve

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- recall data


def test_recall_queries_are_where_they_claim_and_beyond_the_window_when_far():
    task = RecallTask(50, 160, context=16, far_min=62, pairs=4)
    n_far = n_near = 0
    for i in range(len(task)):
        text, queries = task.layout(i)
        item = task[i]
        assert item.shape == (1 + task.n_q, 160) and torch.equal(item[0], text)
        assert (item[1:] == 0).all()  # silence in the audio codebooks
        defs = {int(text[p + 1]): (p + 2, int(text[p + 2])) for p in range(158) if text[p] == DEF}
        assert len(defs) == 4  # keys are distinct within a sequence
        for q in queries:
            assert text[q.value_pos - 2] == QRY and text[q.value_pos] == q.value
            key = int(text[q.value_pos - 1])
            def_pos, def_value = defs[key]
            assert def_value == q.value and q.value_pos - def_pos == q.distance
            if q.far:
                n_far += 1
                assert q.distance >= 62  # beyond 4 layers x 15 steps of stacked attention
            else:
                n_near += 1
                assert 0 < q.distance < 16  # inside one attention window
    assert n_far >= 80 and n_near >= 80


def test_recall_values_are_only_recoverable_from_the_same_sequence():
    task = RecallTask(400, 160, context=16, far_min=62, pairs=4)
    mapping: dict[int, set[int]] = {}
    for i in range(len(task)):
        text, queries = task.layout(i)
        for q in queries:
            mapping.setdefault(int(text[q.value_pos - 1]), set()).add(q.value)
    # Across sequences a key takes many values: no fixed key -> value rule to memorise.
    assert all(len(v) >= 8 for v in mapping.values()) and len(mapping) == 16
    assert min(mapping) >= FIRST_KEY
    assert torch.equal(RecallTask(3, 160, 16, far_min=62)[2], task[2])  # a function of (seed, index)


def test_receptive_field_is_how_far_back_attention_reaches():
    """The recall task puts far queries beyond receptive_field(model): check that the text logits at
    the last position depend on the transformer's input exactly that far back, and no further."""
    from moshi.models import LMModel

    from moshi_ttt.tiny import tiny_lm_kwargs

    torch.manual_seed(0)
    lm = LMModel(**tiny_lm_kwargs(dim=32, num_layers=3, num_heads=2, context=5)).float()
    T = 30
    box = {}

    def leaf_input(module, args, kwargs):  # the transformer's input [B, T, d] as a leaf with a gradient
        box["x"] = args[0].detach().requires_grad_(True)
        return (box["x"], *args[1:]), kwargs

    lm.transformer.register_forward_pre_hook(leaf_input, with_kwargs=True)
    lm(torch.randint(0, 20, (1, 1 + lm.n_q, T))).text_logits[0, 0, T - 1].sum().backward()
    reached = box["x"].grad[0].abs().sum(-1) > 0  # [T]
    first = int(reached.nonzero().min())
    assert receptive_field(lm) == T - 1 - first == 12
    assert reached[first:].all()


def test_recall_task_rejects_impossible_layouts():
    with pytest.raises(ValueError, match="cannot hold"):
        RecallTask(4, 40, context=16, far_min=62)
    with pytest.raises(ValueError, match="text ids"):
        RecallTask(4, 160, context=16, num_keys=60, num_values=60, text_card=100)


# ---------------------------------------------------------------- sweeps


def _sweep_file(tmp_path, grid=None, **extra):
    data = {
        "base": str(ROOT / "configs" / "tiny_synthetic.yaml"),
        "out_dir": str(tmp_path / "sweep"),
        "overrides": {"max_steps": 4},
        "grid": grid
        or {"ttt.chunk_size": [8, 16], "ttt.eta": [0.001, 1.0], "ttt.target_source": ["text_emb", "hidden"]},
        "metrics": ["eval_recall_acc_far", "loss"],
        **extra,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def fake_trainer(sweep, calls, fail):
    """Writes what the real trainer writes (checkpoints, metrics) without training. The eta=0.001 runs
    stop after step 2 on their first attempt (an interruption); runs named in ``fail`` exit with 3."""
    from finetune.args import load_config

    attempts: dict[str, int] = {}

    def run(r):
        calls.append(r.name)
        attempts[r.name] = attempts.get(r.name, 0) + 1
        if r.name in fail:
            return 3
        cfg = load_config(sweep.base, r.overrides)
        ckdir = r.run_dir / "checkpoints"
        start = (
            max((int(p.name.split("_")[1]) for p in ckdir.glob("step_*")), default=0) if ckdir.exists() else 0
        )
        end = 2 if "eta=0.001" in r.name and attempts[r.name] == 1 else cfg.max_steps
        for step in range(start + 1, end + 1):
            ck = ckdir / f"step_{step:06d}"
            ck.mkdir(parents=True)
            (ck / "meta.json").write_text("{}")
            with (r.run_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps({"kind": "train", "step": step, "loss": 1.0 / step}) + "\n")
                acc = cfg.ttt.eta * cfg.ttt.chunk_size / (1 + cfg.ttt.eta * cfg.ttt.chunk_size)
                f.write(json.dumps({"kind": "eval", "step": step, "recall_acc_far": acc}) + "\n")
        return 0

    return run


def test_sweep_expansion_and_naming(tmp_path):
    sweep = Sweep.load(_sweep_file(tmp_path))
    runs = sweep.runs()
    assert len(runs) == 8
    assert runs[0].name == "chunk_size=8,eta=0.001,target_source=text_emb"
    assert runs[-1].name == "chunk_size=16,eta=1,target_source=hidden"
    assert len({r.run_dir for r in runs}) == 8
    assert runs[0].overrides == {
        "max_steps": 4,
        "ttt.chunk_size": 8,
        "ttt.eta": 0.001,
        "ttt.target_source": "text_emb",
        "run_dir": str(runs[0].run_dir),
    }
    cmd = sweep.command(runs[0], nproc=8, python="python")
    assert cmd[:5] == ["python", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=8"]
    assert "--ttt.eta=0.001" in cmd and f"--run_dir={runs[0].run_dir}" in cmd


def test_sweep_rejects_bad_grids(tmp_path):
    with pytest.raises(ValueError, match="TTTConfig.chunk_size"):
        Sweep.load(_sweep_file(tmp_path, grid={"ttt.chunk_size": [0, 8]}))
    with pytest.raises(ValueError, match="unknown key ttt.etaa"):
        Sweep.load(_sweep_file(tmp_path, grid={"ttt.etaa": [1.0]}))
    with pytest.raises(ValueError, match="non-empty list"):
        Sweep.load(_sweep_file(tmp_path, grid={"ttt.eta": 1.0}))


def test_sweep_skips_finished_resumes_interrupted_and_collects(tmp_path):
    sweep = Sweep.load(_sweep_file(tmp_path))
    calls: list[str] = []
    fail = {"chunk_size=16,eta=1,target_source=hidden"}
    runner = fake_trainer(sweep, calls, fail)
    first = sweep.run_all(runner, log=lambda s: None)
    assert first["chunk_size=16,eta=1,target_source=hidden"] == "failed (3)"
    assert sweep.status(sweep.runs()[-1]) == "failed (exit 3)"
    assert [r["status"] for r in sweep.collect()][-1] == "failed (exit 3)"
    assert sweep.status(sweep.runs()[0]) == "partial"  # the eta=0.001 runs stopped at step 2 of 4
    calls.clear()
    fail.clear()
    second = sweep.run_all(runner, log=lambda s: None)
    assert sorted(calls) == sorted(
        [r.name for r in sweep.runs() if "eta=0.001" in r.name] + ["chunk_size=16,eta=1,target_source=hidden"]
    )
    assert sum(v == "skipped" for v in second.values()) == 3  # 8 runs: 4 interrupted, 1 failed, 3 finished
    assert all(sweep.status(r) == "done" for r in sweep.runs())
    # Resumed runs continued at step 3, not from scratch.
    lines = (sweep.runs()[0].run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines if '"train"' in x] == [1, 2, 3, 4]
    rows = sweep.collect()
    assert len(rows) == 8 and rows[0]["eval_recall_acc_far"] == pytest.approx(0.008 / 1.008)
    assert rows[0]["loss"] == 0.25
    paths = sweep.write_results(rows)
    assert [p.name for p in paths] == ["results.csv", "results.md", "results.png"]
    assert "| chunk_size=8,eta=0.001,target_source=text_emb |" in (sweep.out_dir / "results.md").read_text()
    (wb,) = sweep.wandb_sweeps("sweep.yaml")
    assert wb["method"] == "grid" and wb["parameters"]["ttt.eta"] == {"values": [0.001, 1.0]}
    assert wb["metric"] == {"name": "eval/recall_acc_far", "goal": "maximize"}


def test_a_list_of_grids_runs_their_union_and_collects_one_table(tmp_path):
    grid = [
        {"ttt.variant": ["inplace"], "ttt.eta": [0.001, 1.0], "ttt.target_source": ["text_emb", "hidden"]},
        {"ttt.variant": ["mlp"], "ttt.eta": [0.001, 1.0]},
    ]
    sweep = Sweep.load(_sweep_file(tmp_path, grid=grid))
    names = [r.name for r in sweep.runs()]
    assert len(names) == 6 and names[-1] == "variant=mlp,eta=1"
    assert "variant=inplace,eta=0.001,target_source=hidden" in names
    assert sweep.runs()[-1].overrides["ttt.variant"] == "mlp"
    assert "ttt.target_source" not in sweep.runs()[-1].overrides
    runner = fake_trainer(sweep, [], set())
    sweep.run_all(runner, log=lambda s: None)
    sweep.run_all(runner, log=lambda s: None)  # the interrupted ones resume
    rows = sweep.collect()
    assert [r["status"] for r in rows] == ["done"] * 6
    assert rows[-1]["ttt.target_source"] is None and rows[-1]["ttt.variant"] == "mlp"
    paths = sweep.write_results(rows)
    assert [p.name for p in paths] == ["results.csv", "results.md", "results.png"]
    assert "| variant=mlp,eta=1 | mlp | 1 | - | done |" in (sweep.out_dir / "results.md").read_text()
    (wb,) = sweep.wandb_sweeps("sweep.yaml")  # a union: one sweep over the point index
    assert wb["parameters"] == {"point": {"values": list(range(6))}}
    with pytest.raises(ValueError, match="more than once: eta=1"):
        Sweep.load(_sweep_file(tmp_path, grid=[{"ttt.eta": [1.0]}, {"ttt.eta": [1.0, 0.1]}]))
    with pytest.raises(ValueError, match="list of such maps"):
        Sweep.load(_sweep_file(tmp_path, grid=[{"ttt.eta": [1.0]}, []]))


def test_last_metrics_survives_a_cut_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"kind": "eval", "step": 1, "loss": 2.0}\n{"kind": "tr')
    assert last_metrics(tmp_path) == {"eval_step": 1, "eval_loss": 2.0}


def test_sweep_cli_dry_run_and_commands(tmp_path):
    path = _sweep_file(tmp_path)
    out = subprocess.run(
        [sys.executable, "scripts/sweep.py", str(path), "--dry-run"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0 and "8 runs in" in out.stdout and out.stdout.count("new ") == 8
    out = subprocess.run(
        [sys.executable, "scripts/sweep.py", str(path), "--print-commands", "--nproc", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.stdout.count("torch.distributed.run") == 8
    assert [line.rsplit("--run_dir=", 1)[1] for line in out.stdout.splitlines()] == [
        str(r.run_dir) for r in Sweep.load(path).runs()
    ]


# ---------------------------------------------------------------- long-context evaluation


@pytest.fixture(scope="module")
def recall_runs(tmp_path_factory):
    from finetune.args import load_config
    from finetune.schema import apply_overrides
    from finetune.training.trainer import train

    root = tmp_path_factory.mktemp("recall")
    base = yaml.safe_load((ROOT / "configs" / "recall_tiny.yaml").read_text())
    small = {
        "max_steps": 3,
        "batch_size": 2,
        "model.tiny.dim": 32,
        "model.tiny.num_layers": 2,
        "data.recall.num_train": 16,
        "data.recall.num_eval": 8,
        "eval.interval": 0,
        "checkpoint.interval": 0,
    }
    for name, ttt in (("ttt", True), ("base", False)):
        train(
            load_config(
                None,
                apply_overrides(
                    base, {**small, "run_dir": str(root / name), "ttt.enabled": ttt, "ttt.layers": [1]}
                ),
            )
        )
    return root


def test_eval_script_writes_json_table_and_plot(recall_runs, tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "scripts/eval_long_context.py",
            str(recall_runs / "ttt"),
            str(recall_runs / "base"),
            "--out",
            str(tmp_path / "rep"),
            "--max-items",
            "8",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((tmp_path / "rep" / "long_context.json").read_text())
    names = [r["name"] for r in report["results"]]
    assert names == ["ttt (TTT)", "ttt (TTT updates off)", "base"]
    assert report["info"]["context"] == 16 and report["info"]["receptive_field"] == 30
    for r in report["results"]:
        assert len(r["text_loss"]) == len(r["position_edges"]) - 1 == 20  # 160 steps in buckets of 8
        assert all(v is None or v > 0 for v in r["text_loss"])
        assert r["distance_edges"] == [0, 16, 31, 10**9] and sum(r["recall_count"]) > 0
        assert r["far_count"] == r["recall_count"][-1] > 0  # every far query classified once
        assert abs(sum(r["far_answers"].values()) - 1) < 1e-9
        assert abs(r["far_answers"]["right"] - r["recall_acc"][-1]) < 1e-9
    md = (tmp_path / "rep" / "long_context.md").read_text()
    assert "Recall: value accuracy" in md and "| ttt (TTT updates off) |" in md
    assert "Far queries: share of the answers" in md and "another value of the sequence" in md
    png = (tmp_path / "rep" / "long_context.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_eval_set_overrides_change_the_data_section_only(recall_runs):
    """--data.KEY=VALUE picks another eval set for the same checkpoints (the run's own data section,
    changed); any other section is refused: the model is the checkpoint's."""
    from finetune.research.long_context import evaluate_runs

    own = evaluate_runs([recall_runs / "base"], max_items=None, batch_size=4)
    fewer = evaluate_runs(
        [recall_runs / "base"], max_items=None, batch_size=4, data_overrides={"data.recall.num_eval": 3}
    )
    assert own["info"]["eval_items"] == 8 and fewer["info"]["eval_items"] == 3
    with pytest.raises(ValueError, match="only data.. settings choose the eval set; not model.tiny.dim"):
        evaluate_runs([recall_runs / "base"], data_overrides={"model.tiny.dim": 8})
    res = subprocess.run(
        [sys.executable, "scripts/eval_long_context.py", str(recall_runs / "base"), "--ttt.eta=2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and "eval set overrides are --data.KEY=VALUE" in res.stderr


def test_windows_longer_than_the_context_and_conversations_shorter_than_the_window(tiny_ds, tmp_path, capsys):
    """A tiny Moshi-7B-style recipe: windows (10 s, 125 steps) far beyond a reduced attention
    context (model.context: 8 steps), on 7 s conversations, so the last 3 s of every window is
    padding. Training reports it; the eval tools show loss by position beyond the window and leave
    the padded positions out."""
    from finetune.args import load_config
    from finetune.research.long_context import evaluate_runs
    from finetune.schema import apply_overrides
    from finetune.training.trainer import train

    run = tmp_path / "run"
    cfg = {
        "run_dir": str(run),
        "device": "cpu",
        "finetune": "lora",
        "batch_size": 1,
        "max_steps": 2,
        "lora": {"rank": 4},
        "model": {
            "source": "tiny",
            "tiny": {"dim": 32, "num_layers": 2, "num_heads": 2, "context": 64, "n_q": 8, "dep_q": 4},
            "context": 8,
        },
        "ttt": {"layers": [1], "chunk_size": 16, "eta": 0.5},
        "data": manifest_data(tiny_ds, duration_sec=10.0),
        "eval": {"num_batches": 1},
    }
    train(load_config(None, apply_overrides(cfg, {})))
    log = capsys.readouterr().out
    assert "data: 3 windows of 125 steps (10 s); 30% of their frames are padding" in log
    assert "30% of the training frames are padding" in log  # the warning, with what to do
    exported = json.loads(next(run.glob("checkpoints/*/moshi/config.json")).read_text())
    assert exported["context"] == 8  # inference runs with the context the model was tuned with
    report = evaluate_runs([run], max_items=1, batch_size=1, bucket=8)
    assert report["info"]["context"] == 8 and report["info"]["receptive_field"] == 14
    for r in report["results"]:
        edges, loss = r["position_edges"], r["text_loss"]
        assert edges[-1] == 125 and len(loss) == 16
        # Positions beyond the window and the receptive field are reported ...
        assert all(v is not None and v > 0 for a, v in zip(edges, loss) if 8 <= a < 80)
        # ... and the padded tail (7 s = 87.5 steps of conversation) is not.
        assert all(v is None for a, v in zip(edges, loss) if a >= 88)


def test_eta_grid_finds_the_best_eta_per_cell_and_its_normalised_value(tmp_path):
    # Fake finished runs: far NLL with a minimum at raw eta 1 (dim 64) and 0.1 (dim 128), whose
    # TTT layers logged mean ||z||^2 of 100 and 1000: both optima sit at normalised eta 100.
    sweep = tmp_path / "sweep"
    for dim, best, zsq in ((64, 1.0, 100.0), (128, 0.1, 1000.0)):
        for eta in (0.01, 0.1, 1.0, 10.0):
            run = sweep / f"dim={dim},eta={eta}"
            run.mkdir(parents=True)
            cfg = {
                "max_steps": 4,
                "seed": 0,
                "model": {"tiny": {"dim": dim}},
                "ttt": {"chunk_size": 8, "eta": eta},
            }
            (run / "config.yaml").write_text(yaml.safe_dump(cfg))
            nll = 1.0 + abs(np.log10(eta / best))
            recs = [{"kind": "train", "step": s, "ttt/layer1/z_sq_mean": zsq} for s in (1, 3, 4)]
            recs.append({"kind": "eval", "step": 4, "recall_nll_far": nll, "recall_acc_far": 1 / nll})
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (sweep / "unfinished").mkdir()
    out = subprocess.run(
        [sys.executable, "scripts/eta_grid.py", str(sweep)], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "| 64 | 8 | 1 | 100 | 100 |" in out.stdout and "| 128 | 8 | 0.1 | 1e+03 | 100 |" in out.stdout
    assert (sweep / "eta_grid.png").read_bytes()[:4] == b"\x89PNG"


def _fake_metrics(run: Path, records: list[dict]) -> None:
    run.mkdir(parents=True)
    lines = [json.dumps(r) for r in records] + ['{"kind": "eval", "step": 9']  # a line cut by a crash
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_metric_curves_and_their_plot(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _fake_metrics(
        a,
        [
            {"kind": "train", "step": 1, "time": 0.0, "loss": 3.0},
            {"kind": "eval", "step": 2, "time": 0.0, "recall_acc_far": 0.1},
            {"kind": "train", "step": 2, "time": 0.0, "loss": None},  # non-finite, logged as null
            {"kind": "eval", "step": 4, "time": 0.0, "recall_acc_far": 0.4},
            {"kind": "eval", "step": 4, "time": 1.0, "recall_acc_far": 0.5},  # the resumed run's record
        ],
    )
    _fake_metrics(b, [{"kind": "eval", "step": 2, "time": 0.0, "recall_acc_far": 0.07}])
    assert metric_curve(a, "eval_recall_acc_far") == [(2, 0.1), (4, 0.5)]
    assert metric_curve(a, "loss") == [(1, 3.0)]
    assert metric_curve(b, "loss") == []
    assert last_metrics(a)["eval_recall_acc_far"] == 0.5 and last_metrics(a)["step"] == 2
    script = [sys.executable, str(ROOT / "scripts/plot_curves.py")]
    out = tmp_path / "c.png"
    r = subprocess.run(
        [*script, f"TTT={a}", str(b), "--metrics", "eval_recall_acc_far", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 1000 and "TTT" in r.stdout and "step       4: 0.5" in r.stdout
    r = subprocess.run(
        [*script, str(a), "--metrics", "recall_acc_far", "--out", str(out)], capture_output=True, text=True
    )
    assert r.returncode == 2 and "no run logged 'recall_acc_far'" in r.stderr and "eval_<name>" in r.stderr
    r = subprocess.run([*script, str(tmp_path / "none"), "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 2 and "metrics.jsonl does not exist" in r.stderr


def test_far_answer_kinds():
    from finetune.data.recall import Query
    from finetune.research.long_context import answer_kind

    values = range(20, 36)
    a, b = Query(50, 60, 21, True), Query(70, 70, 30, True)
    near = Query(20, 5, 25, False)
    qs = [near, a, b]
    assert answer_kind(21, a, qs, values) == "right"
    assert answer_kind(30, a, qs, values) == "another value of the sequence"  # the other far value
    assert answer_kind(25, a, qs, values) == "another value of the sequence"  # a near pair's value
    assert answer_kind(33, a, qs, values) == "a value not in the sequence"
    assert answer_kind(3, a, qs, values) == "not a value"
