"""``ttt.eta: auto``: eta calibrated once after a short warm-up so that ``ttt/base`` lands on a
target; per-layer etas in the library (``TTTConfig.eta_layers``), saved in checkpoints and TTT files,
reused (not recalibrated) on resume; bad settings refused with the key named."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_train import final_weights, losses, tiny_cfg

from finetune.args import load_config
from finetune.research.eta_probe import probe_batches
from finetune.schema import ConfigError
from finetune.training.checkpointing import list_checkpoints
from finetune.training.eta_auto import EtaCalibration, calibrate_eta, eta_from_ratios, measure_term_ratio
from finetune.training.model import build_model
from finetune.training.trainer import train
from moshi_ttt import TTTConfig, apply_ttt, load_ttt_config, save_ttt_weights, set_ttt_eta, ttt_layers
from moshi_ttt.tiny import build_tiny_lm

AUTO = {
    "ttt.eta": "auto",
    "ttt.eta_auto.target": 1.0,
    "ttt.eta_auto.steps": 2,
    "ttt.layers": [0, 1],
    "max_steps": 6,
    "checkpoint.interval": 1,  # every step: a resume from before and from after the calibration
}


def _records(run_dir: Path, kind: str) -> list[dict]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["kind"] == kind]


@pytest.mark.parametrize(
    "over, match",
    [
        ({"ttt.eta": "fast"}, r"ttt.eta: expected float \| 'auto'"),
        ({"ttt.eta": "auto", "ttt.eta_layers": {1: 0.1}}, "give ttt.eta: auto or ttt.eta_layers, not both"),
        ({"ttt.eta": "auto", "ttt.eta_auto.target": 0.0}, "ttt.eta_auto.target: must be"),
        ({"ttt.eta": "auto", "ttt.eta_auto.start": -1.0}, "ttt.eta_auto.start: must be"),
        ({"ttt.eta": "auto", "ttt.eta_auto.steps": 0}, "ttt.eta_auto.steps: must be >= 1"),
        ({"ttt.eta": "auto", "ttt.eta_auto.steps": 6}, "lower ttt.eta_auto.steps or set ttt.eta"),
        ({"ttt.eta": "auto", "ttt.eta_auto.tagret": 1.0}, "unknown key ttt.eta_auto.tagret"),
        ({"ttt.eta_layers": {0: -1.0}}, "layer 0: eta must be a finite number >= 0"),
        ({"ttt.eta_layers": {"x": 1.0}}, "key 'x' is not a layer index"),
    ],
)
def test_bad_eta_settings_are_refused_with_the_key(tmp_path, over, match):
    with pytest.raises(ConfigError, match=match):
        tiny_cfg(tmp_path, **over)


def test_auto_builds_the_model_at_the_warm_up_eta(tmp_path):
    short = {"ttt.eta": "auto", "ttt.eta_auto.steps": 2}
    cfg = tiny_cfg(tmp_path, **short)
    assert cfg.ttt.eta == "auto" and cfg.ttt.to_ttt_config().eta == 0.1  # eta_norm none
    cfg = tiny_cfg(tmp_path, **short, **{"ttt.eta_norm": "zsq"})
    assert cfg.ttt.to_ttt_config().eta == 100.0
    cfg = tiny_cfg(tmp_path, **short, **{"ttt.eta_auto.start": 0.3})
    assert cfg.ttt.to_ttt_config().eta == 0.3
    assert tiny_cfg(tmp_path, **{"ttt.eta": 0.2}).ttt.eta == 0.2  # a number stays a number


def test_eta_layers_give_each_layer_its_eta_and_survive_the_ttt_file(tmp_path):
    lm = build_tiny_lm(dim=32, num_layers=3, context=8, num_heads=2)
    apply_ttt(lm, TTTConfig(layers=[0, 2], eta=0.1, eta_layers={2: 0.7}, chunk_size=4))
    g = ttt_layers(lm)
    assert g[0].config.eta == 0.1 and g[2].config.eta == 0.7
    set_ttt_eta(lm, {0: 0.25})
    assert g[0].config.eta == 0.25 and g[2].config.eta == 0.7
    save_ttt_weights(lm, tmp_path / "ttt.safetensors")
    saved = load_ttt_config(tmp_path / "ttt.safetensors")  # JSON keys are strings: read back as ints
    assert saved.eta_layers == {0: 0.25, 2: 0.7} and saved.layer_config(2).eta == 0.7
    with pytest.raises(ValueError, match=r"layers \[1\] are not TTT layers"):
        set_ttt_eta(lm, {1: 0.5})
    with pytest.raises(ValueError, match=r"eta_layers: layers \[1\] are not TTT layers"):
        apply_ttt(
            build_tiny_lm(dim=32, num_layers=3, context=8, num_heads=2),
            TTTConfig(layers=[0], eta_layers={1: 1.0}),
        )


def test_eta_from_ratios_is_the_linear_rescale_and_refuses_a_closed_target():
    assert eta_from_ratios({1: 0.5, 3: 2.0}, {1: 0.1, 3: 0.1}, 1.0) == pytest.approx({1: 0.2, 3: 0.05})
    shared = eta_from_ratios({1: 0.5, 3: 2.0}, {1: 0.1, 3: 0.1}, 1.0, per_layer=False)
    assert shared == pytest.approx({1: 0.08, 3: 0.08})  # mean ratio 1.25
    with pytest.raises(ValueError, match="L3 0.0.*target path has not opened"):
        eta_from_ratios({1: 0.5, 3: 0.0}, {1: 0.1, 3: 0.1}, 1.0)
    with pytest.raises(ValueError, match="L1 nan"):
        eta_from_ratios({1: float("nan")}, {1: 0.1}, 1.0)


def test_calibration_puts_every_layer_on_the_target():
    """Two TTT layers, the second reading the first's output: after the rounds of rescaling, both
    ratios are on the target, measured again from scratch on the same batches."""
    cfg = load_config(
        Path(__file__).resolve().parents[1] / "configs/tiny_synthetic.yaml",
        {
            "model.tiny": {"dim": 32, "num_layers": 2, "context": 8, "num_heads": 2},
            "ttt.layers": [0, 1],
            "ttt.chunk_size": 4,
            "data.duration_sec": 2.0,
            "data.synthetic.num_train": 8,
            "batch_size": 2,
        },
    )
    lm = build_model(cfg, torch.device("cpu")).model
    for g in ttt_layers(lm).values():
        g.probe_init()  # V = X_src: a nonzero TTT term, as after some training
    batches = probe_batches(cfg, lm, 2, 2)
    cal = calibrate_eta(lm, batches, 0.01, 1.5)
    assert set(cal.etas) == {0, 1} and cal.etas[0] != cal.etas[1]
    again = measure_term_ratio(lm, batches)
    assert again == pytest.approx({0: 1.5, 1: 1.5}, rel=1e-3)
    assert cal.final_ratios == pytest.approx(again, rel=1e-6)
    assert EtaCalibration.from_state_dict(json.loads(json.dumps(cal.state_dict()))) == cal
    with pytest.raises(ValueError, match="beyond 10000x"):
        calibrate_eta(lm, batches, 1e-9, 1.5)


def test_auto_calibrates_once_saves_the_etas_and_resume_reuses_them(tmp_path):
    straight = tmp_path / "straight"
    train(tiny_cfg(straight, **AUTO))  # 6 steps, a checkpoint each, the calibration at step 2
    (cal,) = _records(straight, "eta_auto")
    assert cal["step"] == 2 and cal["start"] == 0.1
    assert cal["final_ratio/L0"] == pytest.approx(1.0, rel=1e-3)
    assert cal["final_ratio/L1"] == pytest.approx(1.0, rel=1e-3)
    ckpt = straight / "checkpoints" / "step_000006"
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    etas = state["eta_auto"]["etas"]
    assert etas == {0: cal["eta/L0"], 1: cal["eta/L1"]} and etas[0] != 0.1
    assert load_ttt_config(ckpt / "ttt.safetensors").eta_layers == etas  # the export runs with them
    # The trained TTT term is in the band the target names (after warm-up it stays near it).
    tr = {r["step"]: r for r in _records(straight, "train")}
    assert 0.2 < tr[3]["ttt/layer0/term_ratio"] < 5

    # Resume after the calibration (cut 3): the saved etas, no new calibration, the same training;
    # from before it (cut 1): the calibration happens at step 2 as in the straight run.
    for cut in (3, 1):
        split = tmp_path / f"split{cut}"
        shutil.copytree(straight, split)
        for step, path in list_checkpoints(split):
            if step > cut:
                shutil.rmtree(path)
        lines = (split / "metrics.jsonl").read_text().splitlines()
        (split / "metrics.jsonl").write_text("".join(x + "\n" for x in lines if json.loads(x)["step"] <= cut))
        train(tiny_cfg(split, **AUTO))
        a, b = losses(straight), losses(split)
        for s in range(cut + 1, 7):
            assert b[s] == pytest.approx(a[s], rel=1e-6, abs=1e-6), (cut, s)
        wa, wb = final_weights(straight), final_weights(split)
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
        assert [r["step"] for r in _records(split, "eta_auto")] == [2]
        saved = torch.load(split / "checkpoints" / "step_000006" / "trainer_state.pt", weights_only=True)
        assert saved["eta_auto"]["etas"] == etas


def test_a_target_path_that_never_opens_is_a_clear_error(tmp_path):
    # The TTT parameters at lr ~0: their target path stays at its zero init, ttt/base 0.
    over = {**AUTO, "optim.ttt_params_lr": 1e-30}
    with pytest.raises(ConfigError, match="ttt.eta: auto cannot calibrate: ttt/base is L0 0.0"):
        train(tiny_cfg(tmp_path / "r", **over))
