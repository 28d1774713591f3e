"""Sweeps across machines: the wandb agent's command, job-array indices and the local runner train every
point in its own run directory; every shipped sweep file exports; the metric and its goal.

The agent is reproduced without network: the exported definition's command has its macros filled in by
wandb's own argument formatting (``create_sweep_command_args``, what ``wandb agent`` uses), then runs.
"""

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune.args import load_config
from finetune.checkpointing import list_checkpoints
from finetune.cli import parse_cli
from finetune.schema import ConfigError
from finetune.sweep import WANDB_PROGRAM, Sweep, default_goal

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))

TINY_BASE = {
    "run_dir": "BASE_RUN_DIR",  # the old export trained every point here
    "device": "cpu",
    "finetune": "full",
    "batch_size": 2,
    "max_steps": 100,
    "log_interval": 1,
    "model": {"source": "tiny", "tiny": {"dim": 32, "num_layers": 2, "context": 8, "num_heads": 2}},
    "ttt": {"layers": [1], "chunk_size": 4, "eta": 0.05},
    "optim": {"lr": 1e-3, "warmup_steps": 1},
    "data": {"source": "synthetic", "duration_sec": 2.0, "synthetic": {"num_train": 16, "num_eval": 2}},
    "eval": {"interval": 0, "num_batches": 1},
    "checkpoint": {"interval": 1, "keep_last": 0, "export_moshi": False},
}


def write_sweep(tmp_path, grid, **extra) -> Path:
    base = dict(TINY_BASE, run_dir=str(tmp_path / "base_run"))
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    data = {
        "base": "base.yaml",
        "out_dir": str(tmp_path / "sweep"),
        "overrides": {"max_steps": 3},
        "grid": grid,
        "metrics": ["eval_loss"],
        **extra,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def env() -> dict[str, str]:
    e = dict(os.environ, PYTHONPATH=str(ROOT), NO_TORCH_COMPILE="1", HF_HUB_OFFLINE="1")
    for k in ("WANDB_SWEEP_ID", "WANDB_RUN_ID"):  # not under an agent: no wandb run
        e.pop(k, None)
    return e


def agent_args(values: dict) -> list[str]:
    """``${args}`` for one point, formatted by wandb's agent code."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    return create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})["args"]


def agent_command(definition: dict, values: dict) -> list[str]:
    """The command ``wandb agent`` runs for one point (wandb_agent.py: each ``${macro}`` element is
    replaced by its list; ``${interpreter}`` is "python" there, this interpreter here)."""
    macros = {
        "env": ["/usr/bin/env"],
        "interpreter": [sys.executable],
        "program": [definition["program"]],
        "args": agent_args(values),
    }
    out = []
    for c in map(str, definition["command"]):
        out += macros[c[2:-1]] if c.startswith("${") and c.endswith("}") else [c]
    return out


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)


def train_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r["kind"] == "train"]


def assert_trained(run_dir: Path, expect: dict, steps: int = 3) -> None:
    saved = load_config(run_dir / "config.yaml")
    for key, value in expect.items():
        section, name = key.split(".") if "." in key else (None, key)
        got = getattr(getattr(saved, section), name) if section else getattr(saved, name)
        assert got == value, f"{run_dir}: {key} = {got!r}, expected {value!r}"
    assert saved.run_dir == str(run_dir)
    assert list_checkpoints(run_dir)[-1][0] == steps
    assert train_steps(run_dir) == list(range(1, steps + 1))


def test_wandb_agent_trains_each_point_in_its_own_run_dir(tmp_path):
    """The reported bug: the agent's command for two points trained both in the base config's run_dir,
    so the second resumed the first's checkpoint and did nothing."""
    path = write_sweep(tmp_path, {"ttt.eta": [0.01, 0.1], "ttt.chunk_size": [4, 8]})
    sweep = Sweep.load(path)
    (definition,) = sweep.wandb_sweeps(path)  # what --wandb-sweep writes (its CLI: the split test)
    assert definition["program"] == WANDB_PROGRAM and (ROOT / WANDB_PROGRAM).is_file()
    assert definition["metric"] == {"name": "eval/loss", "goal": "minimize"}
    assert definition["parameters"] == {
        "ttt.eta": {"values": [0.01, 0.1]},
        "ttt.chunk_size": {"values": [4, 8]},
    }

    points = {(r.params["ttt.eta"], r.params["ttt.chunk_size"]): r for r in sweep.runs()}
    a, b = points[(0.01, 4)], points[(0.1, 8)]
    for point in (a, b):
        res = run(agent_command(definition, point.params))
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert "nothing to do" not in res.stdout
    assert a.run_dir != b.run_dir
    assert_trained(a.run_dir, {"ttt.eta": 0.01, "ttt.chunk_size": 4, "max_steps": 3})
    assert_trained(b.run_dir, {"ttt.eta": 0.1, "ttt.chunk_size": 8, "max_steps": 3})
    assert not (tmp_path / "base_run").exists()
    assert sorted(p.name for p in sweep.out_dir.iterdir()) == sorted([a.run_dir.name, b.run_dir.name])

    # The same point again (an agent rerun): finished, skipped, nothing trained.
    res = run(agent_command(definition, a.params))
    assert res.returncode == 0 and "finished, skipped" in res.stdout
    assert train_steps(a.run_dir) == [1, 2, 3]

    # A directory holding another point's run is refused, never resumed.
    c = points[(0.1, 4)]
    shutil.copytree(a.run_dir, c.run_dir)
    assert sweep.status(c) == "foreign"
    with pytest.raises(
        ConfigError, match="ttt.eta=0.01 where this point has 0.1: a sweep point never continues"
    ):
        sweep.run_point(c, runner=lambda r: pytest.fail("the refused point was launched"))
    assert sweep.run_all(lambda r: 0, log=lambda s: None)[c.name] == "refused"
    assert train_steps(c.run_dir) == [1, 2, 3] and load_config(c.run_dir / "config.yaml").ttt.eta == 0.01

    # A value that is not a point, a key the sweep does not sweep: refused before any work.
    with pytest.raises(ConfigError, match="no point of this sweep has ttt.eta=0.5"):
        sweep.point({"ttt.eta": 0.5, "ttt.chunk_size": 4})
    with pytest.raises(ConfigError, match="optim.lr: not swept by this file"):
        sweep.point({"optim.lr": 0.1})


def test_job_array_indices_run_their_points(tmp_path):
    grid = [{"ttt.eta": [0.01], "ttt.chunk_size": [4, 8]}, {"ttt.enabled": [False]}]
    path = write_sweep(tmp_path, grid)
    sweep = Sweep.load(path)
    res = run([sys.executable, "scripts/sweep.py", str(path), "--count"])
    assert res.returncode == 0 and res.stdout.strip() == "3"
    p1, p2 = sweep.runs()[1], sweep.runs()[2]
    for i in (1, 2):
        res = run([sys.executable, "scripts/sweep.py", str(path), "--array-index", str(i)])
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert "done: 3 steps" in res.stdout  # the trainer's output reaches the array task's log
    assert_trained(p1.run_dir, {"ttt.eta": 0.01, "ttt.chunk_size": 8})
    assert_trained(p2.run_dir, {"ttt.enabled": False})
    assert "done: 3 steps" in (p1.run_dir / "train.log").read_text()
    assert [sweep.status(r) for r in sweep.runs()] == ["new", "done", "done"]


@pytest.mark.slow
def test_a_relaunched_array_task_resumes_its_point(tmp_path):
    path = write_sweep(tmp_path, {"ttt.eta": [0.01, 0.1]})
    sweep = Sweep.load(path)
    point = sweep.runs()[1]
    cmd = [sys.executable, "scripts/sweep.py", str(path), "--array-index", "1"]
    assert run(cmd).returncode == 0
    shutil.rmtree(list_checkpoints(point.run_dir)[-1][1])  # interrupted after step 2
    assert sweep.status(point) == "partial"
    res = run(cmd)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "resuming" in res.stdout and "resumed from" in res.stdout and "done: 1 steps" in res.stdout
    assert_trained(point.run_dir, {"ttt.eta": 0.1})
    assert not sweep.runs()[0].run_dir.exists()
    res = run([sys.executable, "scripts/sweep.py", str(path), "--array-index", "2"])
    assert res.returncode == 2 and "points 0..1" in res.stderr


def exported_points(sweep: Sweep, sweep_file: Path, definitions: list[dict]) -> list[int]:
    """The point index the agent's entry point picks for every parameter combination of every
    definition, its ``${args}`` formatted by wandb and parsed as the entry point parses them."""
    picked = []
    for d in definitions:
        keys = list(d["parameters"])
        for values in itertools.product(*(d["parameters"][k]["values"] for k in keys)):
            argv = [str(sweep_file), *[c for c in d["command"] if not c.startswith("${")][1:]]
            argv += agent_args(dict(zip(keys, values)))
            _, args = parse_cli(argv)
            args.pop("nproc", None)
            picked.append(sweep.point(args).index)
    return picked


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_sweep_exports_every_point_once(path):
    sweep = Sweep.load(path)
    n = len(sweep.runs())
    rel = path.relative_to(ROOT)
    for split in (False, True):
        definitions = sweep.wandb_sweeps(rel, nproc=8, split=split)
        assert len(definitions) == (len(sweep.grids) if split else 1)
        for d in definitions:
            assert d["program"] == WANDB_PROGRAM and d["method"] == "grid"
            assert d["command"] == [
                "${env}",
                "${interpreter}",
                "${program}",
                str(rel),
                "--nproc=8",
                "${args}",
            ]
            assert d["metric"]["name"].startswith("eval/") and d["metric"]["goal"] in ("minimize", "maximize")
        assert sorted(exported_points(sweep, rel, definitions)) == list(range(n))
    assert len({d["name"] for d in sweep.wandb_sweeps(rel, split=True)}) == len(sweep.grids)


def test_split_export_files_sort_and_cover_the_union(tmp_path):
    grid = [{"ttt.eta": [0.01, 0.1]}, {"ttt.chunk_size": [8]}, {"ttt.enabled": [False]}]
    path = write_sweep(tmp_path, grid)
    out = tmp_path / "exports" / "w.yaml"
    res = run([sys.executable, "scripts/sweep.py", str(path), "--wandb-sweep", str(out), "--wandb-split"])
    assert res.returncode == 0, res.stderr
    files = sorted((tmp_path / "exports").iterdir())
    assert [f.name for f in files] == ["w.01.yaml", "w.02.yaml", "w.03.yaml"]
    definitions = [yaml.safe_load(f.read_text()) for f in files]
    assert [d["name"] for d in definitions] == ["sweep.01", "sweep.02", "sweep.03"]
    sweep = Sweep.load(path)
    assert exported_points(sweep, path, definitions) == [0, 1, 2, 3]
    # Without --wandb-split a union is one sweep over the point index.
    (d,) = sweep.wandb_sweeps(path)
    assert d["parameters"] == {"point": {"values": [0, 1, 2, 3]}}
    assert exported_points(sweep, path, [d]) == [0, 1, 2, 3]


def test_print_commands_one_line_per_point_and_torchrun(tmp_path):
    path = write_sweep(tmp_path, [{"ttt.eta": [0.01, 0.1]}, {"ttt.enabled": [False]}])
    sweep = Sweep.load(path)
    res = run([sys.executable, "scripts/sweep.py", str(path), "--print-commands", "--nproc", "4"])
    lines = res.stdout.splitlines()
    assert res.returncode == 0 and len(lines) == 3
    for line, r in zip(lines, sweep.runs()):
        assert line.startswith("python -m torch.distributed.run --standalone --nproc-per-node=4 train.py ")
        assert line.endswith(f"--run_dir={r.run_dir}")
    (d,) = sweep.wandb_sweeps(path, nproc=4)
    assert agent_command(d, {"point": 2})[3:] == [str(path), "--nproc=4", "--point=2"]


def test_metric_and_goal(tmp_path):
    assert default_goal("eval_loss") == "minimize" and default_goal("eval/recall_nll_far") == "minimize"
    assert default_goal("eval_text_ppl") == "minimize" and default_goal("recall_acc_far") == "maximize"
    assert default_goal("grad_norm") is None
    grid = {"ttt.eta": [0.01]}
    sweep = Sweep.load(write_sweep(tmp_path, grid, metrics=["eval_recall_acc_far", "eval_loss"]))
    assert (sweep.metric, sweep.goal) == ("eval_recall_acc_far", "maximize")
    assert sweep.wandb_sweeps("s.yaml")[0]["metric"] == {"name": "eval/recall_acc_far", "goal": "maximize"}
    sweep = Sweep.load(write_sweep(tmp_path, grid, metric="eval/recall_nll_far"))
    assert sweep.goal == "minimize" and "eval_recall_nll_far" in sweep.metrics  # collected too
    sweep = Sweep.load(write_sweep(tmp_path, grid, metric="train/grad_norm", goal="minimize"))
    assert sweep.wandb_sweeps("s.yaml")[0]["metric"] == {"name": "train/grad_norm", "goal": "minimize"}
    rows = [{"run": "a", "grad_norm": 2.0}, {"run": "b", "grad_norm": 1.0}, {"run": "c", "grad_norm": None}]
    assert sweep.best(rows)["run"] == "b"
    sweep = Sweep.load(write_sweep(tmp_path, grid, metric="grad_norm"))  # runs locally; no export
    assert sweep.goal == "" and sweep.best(rows) is None
    with pytest.raises(ConfigError, match="add `goal: minimize` or `goal: maximize`"):
        sweep.wandb_sweeps("s.yaml")
    with pytest.raises(ConfigError, match="'metric' must name one metric"):
        Sweep.load(write_sweep(tmp_path, grid, metric="eval/"))
    with pytest.raises(ConfigError, match="goal: 'up' is not allowed"):
        Sweep.load(write_sweep(tmp_path, grid, metric="eval/loss", goal="up"))


def test_points_that_would_share_a_run_dir_or_a_config_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="map to the same run directory"):
        Sweep.load(write_sweep(tmp_path, {"wandb.run_name": ["a/b", "a_b"]}))
    with pytest.raises(ConfigError, match="train the same configuration"):  # chunk_size 4 is the base's
        Sweep.load(write_sweep(tmp_path, [{"ttt.eta": [0.01]}, {"ttt.eta": [0.01], "ttt.chunk_size": [4]}]))
    sweep = Sweep.load(write_sweep(tmp_path, {"ttt.eta": [0.01, 0.1]}))
    with pytest.raises(ConfigError, match="either --point or the swept values"):
        sweep.point({"point": 0, "ttt.eta": 0.01})
    with pytest.raises(ConfigError, match="points 0..1"):
        sweep.point({"point": 2})
    assert sweep.point({"ttt.eta": 0.1}).index == 1 and sweep.point({"ttt.eta": "0.1"}).index == 1


def test_the_trainer_joins_a_sweep_agents_run(tmp_path, monkeypatch):
    """Under ``wandb agent`` (WANDB_SWEEP_ID, WANDB_RUN_ID set) the run logs to the agent's run id and
    starts even without wandb.project; outside an agent, no project means no wandb."""
    import wandb

    import finetune.trainer as T
    from finetune.monitoring import init_wandb

    calls = []
    monkeypatch.setattr(wandb, "init", lambda **kw: calls.append(kw) or "RUN")
    cfg = load_config(None, {"run_dir": str(tmp_path)})
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    assert init_wandb(cfg, tmp_path, "abc", {}) is None and not calls
    monkeypatch.setenv("WANDB_SWEEP_ID", "sw1")
    monkeypatch.setenv("WANDB_RUN_ID", "agentrun1")
    assert init_wandb(cfg, tmp_path, "agentrun1", {}) == "RUN"
    assert calls[0]["id"] == "agentrun1" and calls[0]["project"] is None  # wandb reads WANDB_PROJECT

    seen = []
    monkeypatch.setattr(T, "init_wandb", lambda cfg, run_dir, run_id, d: seen.append(run_id))
    base = dict(TINY_BASE, run_dir=str(tmp_path / "run"), max_steps=1)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(base))
    T.train(load_config(tmp_path / "c.yaml"))
    assert seen == ["agentrun1"]


@pytest.mark.slow
def test_an_array_task_runs_its_point_under_torchrun(tmp_path):
    path = write_sweep(tmp_path, {"ttt.eta": [0.01, 0.1]})
    point = Sweep.load(path).runs()[0]
    res = run([sys.executable, "scripts/sweep.py", str(path), "--array-index", "0", "--nproc", "2"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "Rank 1 is connected" in res.stdout  # two processes (gloo on CPU)
    assert_trained(point.run_dir, {"ttt.eta": 0.01})


@pytest.mark.slow
def test_stopping_an_agent_run_stops_its_trainer(tmp_path):
    """``wandb agent`` stops a run with SIGTERM to its program only: the trainer must stop too (no
    orphan training on) and the point shows as failed (a relaunch resumes it)."""
    import signal
    import time

    path = write_sweep(tmp_path, {"ttt.eta": [0.01, 0.1]}, overrides={"max_steps": 2000})
    sweep = Sweep.load(path)
    point = sweep.runs()[1]
    proc = subprocess.Popen(
        [sys.executable, WANDB_PROGRAM, str(path), "--ttt.eta=0.1"],
        cwd=ROOT,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 300
        while not list_checkpoints(point.run_dir) and time.time() < deadline:
            time.sleep(0.5)
        assert list_checkpoints(point.run_dir), "no checkpoint within 300 s"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    assert sweep.status(point) == f"failed (exit {-signal.SIGTERM})"
    steps = train_steps(point.run_dir)
    time.sleep(3)
    assert train_steps(point.run_dir) == steps  # the trainer stopped with its program
