"""scripts/probe_eta.py: the TTT diagnostics for a list of eta values, before any training."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from finetune.args import load_config
from finetune.research.eta_probe import load_probe_model, probe, probe_batches, to_text
from finetune.training.model import build_model
from finetune.training.trainer import train

OVER = {
    "model.tiny": {"dim": 32, "num_layers": 2, "context": 8, "num_heads": 2},
    "ttt.layers": [0, 1],
    "ttt.chunk_size": 4,
    "data.duration_sec": 2.0,
    "data.synthetic.num_train": 8,
    "batch_size": 2,
}


def _setup():
    cfg = load_config(ROOT / "configs/tiny_synthetic.yaml", OVER)
    lm = build_model(cfg, torch.device("cpu")).model
    return lm, probe_batches(cfg, lm, 2, 2)


def test_probe_opens_a_zero_target_and_scales_with_eta():
    lm, batches = _setup()
    res = probe(lm, batches, [0.0, 0.01, 0.1], ["none", "zsq"])
    assert "identity tap" in res.target and res.layers == ["L0", "L1"]
    rows = {(r["eta_norm"], r["eta"]): r for r in res.rows}
    assert len(rows) == 6
    assert rows["none", 0.0]["term_ratio"]["L0"] == 0.0
    # The first TTT layer's input does not depend on eta: its TTT term is linear in eta.
    for norm in ("none", "zsq"):
        a, b = rows[norm, 0.01], rows[norm, 0.1]
        for k in ("term_ratio", "chunk_update_ratio"):
            assert b[k]["L0"] == pytest.approx(10 * a[k]["L0"], rel=1e-4)
    # zsq divides by the chunk's mean ||z||^2: about the sequence mean the probe reports.
    zsq = res.z_sq_mean["L0"]
    ratio = rows["none", 0.01]["chunk_update_ratio"]["L0"] / rows["zsq", 0.01]["chunk_update_ratio"]["L0"]
    assert ratio == pytest.approx(zsq, rel=0.5)
    # The model is left as it was, apart from the opened target path.
    for g in (m for m in lm.modules() if hasattr(m, "record_stats")):
        assert g.config.eta == 0.01 and g.config.eta_norm == "none" and not g.record_stats
    text = to_text(res)
    assert "identity tap" in text and "mean ||z||^2 per layer: L0" in text and "zsq" in text


def test_probe_keeps_a_trained_target_and_warns_on_short_windows():
    lm, batches = _setup()
    for g in (m for m in lm.modules() if hasattr(m, "target_conv")):
        with torch.no_grad():
            g.target_conv.fill_(0.01)
    res = probe(lm, batches, [0.1], ["none"], chunk_size=64)
    assert res.target == "as loaded"
    assert res.rows[0]["chunk_update_ratio"] == {}  # 25 steps hold no complete chunk of 64
    assert "warning: fewer than 2 complete chunks" in to_text(res)


def test_cli_on_a_run_and_config_errors(tmp_path):
    run = tmp_path / "run"
    over = {**OVER, "run_dir": str(run), "max_steps": 2, "log_interval": 1, "eval.interval": 0}
    train(load_config(ROOT / "configs/tiny_synthetic.yaml", {**over, "data.synthetic.num_eval": 2}))
    out = subprocess.run(
        [sys.executable, "scripts/probe_eta.py", str(run), "--etas", "0.01", "1", "--batches", "1"]
        + ["--batch-size", "2", "--json", str(tmp_path / "p.json"), "--data.synthetic.num_train=4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"probe of checkpoint {run}" in out.stdout and "ttt/base" in out.stdout
    rows = json.loads((tmp_path / "p.json").read_text())["rows"]
    assert [(r["eta_norm"], r["eta"]) for r in rows] == [
        ("none", 0.01),
        ("none", 1),
        ("zsq", 0.01),
        ("zsq", 1),
    ]
    assert all(r["term_ratio"]["L0"] > 0 for r in rows)
    with pytest.raises(ValueError, match="ttt.enabled is false"):
        load_probe_model(ROOT / "configs/tiny_synthetic.yaml", {"ttt.enabled": "false"}, torch.device("cpu"))
