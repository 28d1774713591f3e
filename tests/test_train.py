"""Training: configs, exact resume, crash safety, distributed equivalence, moshi-loadable exports."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from finetune.args import TrainConfig, load_config
from finetune.checkpointing import list_checkpoints
from finetune.schema import ConfigError, from_dict
from finetune.trainer import train

ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(run_dir, **over) -> TrainConfig:
    base = {
        "run_dir": str(run_dir),
        "device": "cpu",
        "finetune": "full",
        "batch_size": 2,
        "max_steps": 6,
        "log_interval": 1,
        "model": {"source": "tiny", "tiny": {"dim": 32, "num_layers": 2, "context": 8, "num_heads": 2}},
        "ttt": {"layers": [1], "chunk_size": 4, "eta": 0.05},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "data": {"duration_sec": 2.0, "synthetic": {"num_train": 64, "num_eval": 4}},
        "eval": {"interval": 0, "num_batches": 2},
        "checkpoint": {"interval": 3, "keep_last": 0},
    }
    return load_config(None, _flatten(over, base))


def _flatten(over, base):
    from finetune.schema import apply_overrides

    return apply_overrides(base, over)


def losses(run_dir) -> dict[int, float]:
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == "train":
            out[r["step"]] = r["loss"]
    return out


def evals(run_dir) -> dict[int, dict]:
    recs = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in recs if r["kind"] == "eval"}


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(list_checkpoints(run_dir)[-1][1] / "trainable.safetensors"))


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    data = yaml.safe_load(path.read_text())
    if "base" in data and "grid" in data:  # a sweep file: every point's config must validate
        from finetune.sweep import Sweep

        Sweep.load(path)
        return
    load_config(path)


@pytest.mark.parametrize(
    "over, match",
    [
        ({"optim.lrr": 1}, r"unknown key optim.lrr; allowed in optim: .*lr"),
        ({"batch_size": "four"}, r"batch_size: expected an integer, got 'four'"),
        (
            {"finetune": "partial"},
            r"finetune: 'partial' is not allowed; choose one of 'lora', 'full', 'ttt_only'",
        ),
        ({"ttt.target_source": "audio"}, r"TTTConfig.target_source"),
        ({"ttt.chunk_size": 0}, r"TTTConfig.chunk_size"),
        ({"finetune": "ttt_only", "ttt.enabled": False}, r"ttt_only .* ttt.enabled is false"),
        ({"data.source": "manifest"}, r"data.train: the path of a .jsonl manifest is required"),
        ({"model.source": "local"}, r"model.source local needs model.config_path"),
        ({"max_steps": 0}, r"max_steps: must be >= 1"),
        ({"optim.betas": [0.9]}, r"optim.betas"),
        ({"model.context": 0}, r"model.context: must be >= 1"),
        ({"ttt.eta_norm": "l2"}, r"TTTConfig.eta_norm"),
    ],
)
def test_bad_config_is_refused_with_the_key(tmp_path, over, match):
    with pytest.raises(ConfigError, match=match):
        tiny_cfg(tmp_path, **over)


def test_overrides_parse_strings_by_type(tmp_path):
    cfg = tiny_cfg(
        tmp_path, **{"ttt.layers": "[0, 1]", "ttt.eta": "3e-2", "model.gradient_checkpointing": "true"}
    )
    assert cfg.ttt.layers == [0, 1] and cfg.ttt.eta == 0.03 and cfg.model.gradient_checkpointing is True
    assert from_dict(TrainConfig, {}).ttt.chunk_size == 512


def test_cli_reports_config_errors_and_saves_resolved_config(tmp_path):
    env = dict(os.environ, NO_TORCH_COMPILE="1")
    bad = subprocess.run(
        [sys.executable, "train.py", "configs/tiny_synthetic.yaml", "--optim.lrr=1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad.returncode == 2 and "unknown key optim.lrr" in bad.stderr


def test_the_old_name_of_ttt_params_lr_is_read_with_a_warning(tmp_path, caplog):
    old = tmp_path / "old.yaml"
    old.write_text("optim:\n  lr: 1.0e-3\n  ttt_lr: 2.0e-2\n")
    with caplog.at_level("WARNING", logger="finetune"):
        assert load_config(old).optim.ttt_params_lr == 0.02
        assert load_config(None, {"optim.ttt_lr": "3e-2"}).optim.ttt_params_lr == 0.03
    assert f"{old}: optim.ttt_lr is now called optim.ttt_params_lr" in caplog.text
    assert "the command line: optim.ttt_lr is now called optim.ttt_params_lr" in caplog.text
    assert load_config(old, {"optim.ttt_params_lr": "1e-2"}).optim.ttt_params_lr == 0.01  # the override wins
    old.write_text("optim:\n  ttt_params_lr: 1.0e-2\n  ttt_lr: 2.0e-2\n")
    with pytest.raises(ConfigError, match="optim.ttt_lr is the old name of optim.ttt_params_lr; give only"):
        load_config(old)


def test_keys_fixed_on_resume_are_marked_where_they_are_declared(caplog):
    from finetune.args import check_resume_compatible
    from finetune.schema import fixed_on_resume_keys, to_dict

    fixed = set(fixed_on_resume_keys(TrainConfig))
    # Shapes, the trained parameter set, the training data and its order: refused.
    assert {"model.tiny", "lora.rank", "finetune", "ttt.layers", "ttt.variant", "ttt.train_w_down"} <= fixed
    assert {"seed", "batch_size", "data.train", "data.text_overlap", "data.recall.pairs"} <= fixed
    # How the same parameters train or run, where the assets are, the held-out set: a warning.
    allowed = {"optim.lr", "optim.ttt_params_lr", "ttt.eta", "ttt.chunk_size", "max_steps", "precision"}
    allowed |= {"model.gradient_checkpointing", "data.eval", "data.cache_dir", "data.recall.num_eval"}
    assert not fixed & allowed

    def config(**over) -> dict:
        return to_dict(from_dict(TrainConfig, _flatten({"data.source": "recall", **over}, {})))

    saved = config()
    for key, value in (("data.recall.pairs", 2), ("data.text_overlap", "delay"), ("ttt.mlp_heads", 2)):
        with pytest.raises(
            ConfigError, match=f"cannot resume: the checkpoint was trained with different {key};"
        ):
            check_resume_compatible(saved, config(**{key: value}), 1, 1)
    with caplog.at_level("WARNING", logger="finetune"):
        check_resume_compatible(saved, config(**{"model.gradient_checkpointing": True}), 1, 1)
    assert "resuming with changed settings: model.gradient_checkpointing: False -> True" in caplog.text
    # Without TTT layers their settings shape nothing: a run without TTT resumes under a config whose
    # TTT section changed since (a warning), but turning TTT on or off is still refused.
    off = {"ttt.enabled": False}
    caplog.clear()
    with caplog.at_level("WARNING", logger="finetune"):
        check_resume_compatible(config(**off), config(**off, **{"ttt.conv_kernel_size": 4}), 1, 1)
    assert "ttt.conv_kernel_size: 2 -> 4" in caplog.text
    with pytest.raises(ConfigError, match="different ttt.enabled"):
        check_resume_compatible(config(**off), config(), 1, 1)


# ---------------------------------------------------------------- training and resume


def test_loss_decreases_and_checkpoint_layout(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path / "run", max_steps=30, **{"optim.lr": 3e-3, "checkpoint.interval": 0})
    summary = train(cfg)
    ls = losses(tmp_path / "run")
    assert sum(ls[s] for s in range(26, 31)) < sum(ls[s] for s in range(1, 6)) - 1.0
    ckpt = list_checkpoints(tmp_path / "run")[-1][1]
    for f in (
        "trainable.safetensors",
        "trainer_state.pt",
        "ttt.safetensors",
        "config.yaml",
        "meta.json",
        "moshi/config.json",
        "moshi/model.safetensors",
    ):
        assert (ckpt / f).is_file(), f
    assert summary["eval_ppl"] == pytest.approx(torch.tensor(summary["eval_ppl"]).item())
    rec = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ev = [r for r in rec if r["kind"] == "eval"][-1]
    nll = (ev["text_nll"], ev["audio_nll"])
    assert ev["text_ppl"] == pytest.approx(torch.tensor(nll[0]).exp().item(), rel=1e-6)  # exp, not 2**
    tr = [r for r in rec if r["kind"] == "train"][-1]
    assert tr["ttt/layer1/update_norm"] > 0 and tr["ttt/layer1/w_down_drift"] > 0
    # The diagnostics a user reads to choose eta, per TTT layer, in metrics.jsonl and on the console.
    assert 0 < tr["ttt/layer1/term_ratio"] < 10 and 0 < tr["ttt/layer1/chunk_update_ratio"] < 10
    assert tr["ttt/layer1/z_sq_mean"] > 0
    assert re.search(r"step 30 \| ttt/base L1 \d\.\de[-+]\d\d .*\| dW/W0 L1 ", capsys.readouterr().out)


@pytest.mark.numerics
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_resume_equals_straight_run(tmp_path, mode):
    over = {"finetune": mode, "grad_accum": 2}
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(tiny_cfg(straight, **over))  # 6 steps, checkpoints at 3 and 6
    # The same run interrupted after step 3: only the step-3 checkpoint and the first 3 log lines exist.
    shutil.copytree(straight, split)
    shutil.rmtree(split / "checkpoints" / "step_000006")
    lines = (split / "metrics.jsonl").read_text().splitlines()
    (split / "metrics.jsonl").write_text("".join(x + "\n" for x in lines if json.loads(x)["step"] <= 3))
    train(tiny_cfg(split, **over))  # resume: auto, from step 3
    a, b = losses(straight), losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for s in range(4, 7):
        assert b[s] == pytest.approx(a[s], rel=1e-6, abs=1e-6), s
    wa, wb = final_weights(straight), final_weights(split)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def test_resume_refuses_shape_changes_and_warns_on_lr(tmp_path, capsys):
    train(tiny_cfg(tmp_path / "r", max_steps=3))
    with pytest.raises(ConfigError, match="ttt.layers"):
        train(tiny_cfg(tmp_path / "r", **{"ttt.layers": [0]}))
    with pytest.raises(ConfigError, match="model"):
        train(tiny_cfg(tmp_path / "r", **{"model.tiny.dim": 64}))
    train(tiny_cfg(tmp_path / "r", max_steps=4, **{"optim.lr": 5e-4}))
    assert "learning rate of group ttt changed on resume: 0.001 -> 0.0005" in capsys.readouterr().out
    with pytest.raises(ValueError, match="already has checkpoints and resume is 'never'"):
        train(tiny_cfg(tmp_path / "r", resume="never"))


def test_a_run_saved_with_the_old_ttt_lr_key_loads_and_resumes(tmp_path, capsys):
    from finetune.inference import load_checkpoint_model

    run = tmp_path / "r"
    train(tiny_cfg(run, max_steps=3, **{"optim.ttt_params_lr": 2e-3}))
    # The files as an earlier version wrote them: optim.ttt_lr in the run's and the checkpoint's config.
    for f in [run / "config.yaml", *run.glob("checkpoints/step_*/config.yaml")]:
        d = yaml.safe_load(f.read_text())
        d["optim"] = {("ttt_lr" if k == "ttt_params_lr" else k): v for k, v in d["optim"].items()}
        f.write_text(yaml.safe_dump(d, sort_keys=False))
    ckpt = list_checkpoints(run)[-1][1]
    assert load_checkpoint_model(ckpt, with_codec=False).cfg.optim.ttt_params_lr == 2e-3
    train(load_config(run / "config.yaml", {"max_steps": "4"}))  # what `train.py run/config.yaml` does
    out = "".join(capsys.readouterr())
    assert "optim.ttt_lr is now called optim.ttt_params_lr" in out
    assert f"resumed from {ckpt} at step 3" in out
    assert "resuming with changed settings: max_steps: 3 -> 4\n" in out  # the lrs read as unchanged
    assert "learning rate of group" not in out
    assert sorted(losses(run)) == [1, 2, 3, 4]


def test_sigkill_mid_training_resumes_with_checkpoints_intact(tmp_path):
    run = tmp_path / "killed"
    args = [
        sys.executable,
        "train.py",
        "configs/tiny_synthetic.yaml",
        f"--run_dir={run}",
        "--max_steps=400",
        "--checkpoint.interval=5",
        "--checkpoint.keep_last=0",
        "--eval.interval=0",
        "--log_interval=1",
    ]
    env = dict(os.environ, NO_TORCH_COMPILE="1")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list_checkpoints(run)) < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = list_checkpoints(run)
    assert len(before) >= 2
    snapshot = {p: (p / "trainable.safetensors").read_bytes() for _, p in before}
    last_step = before[-1][0]
    done = subprocess.run(
        args[:4] + [f"--max_steps={last_step + 3}"] + args[5:],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    after = list_checkpoints(run)
    assert after[-1][0] == last_step + 3
    assert not list((run / "checkpoints").glob(".tmp.*"))
    for p, content in snapshot.items():
        assert (p / "trainable.safetensors").read_bytes() == content
    assert f"resumed from {before[-1][1]}" in done.stdout


def test_nonfinite_steps_are_skipped_then_stop(tmp_path):
    cfg = tiny_cfg(tmp_path / "nan", max_steps=8, max_nonfinite_steps=3, **{"ttt.eta": 1e30})
    with pytest.raises(RuntimeError, match="3 consecutive steps had a non-finite loss"):
        train(cfg)
    rec = [json.loads(x) for x in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert [r["in_a_row"] for r in rec if r["kind"] == "skip"] == [1, 2, 3]


@pytest.mark.numerics
def test_bf16_autocast_on_cpu_trains_with_either_update_precision(tmp_path):
    """precision: bf16 runs CPU autocast (how the recall task checks bf16 update math on CPU), with
    either update precision. What the setting changes is tested on one gating, where its effect is
    bounded (test_precision.py); here the TTT term is tiny (eta 0.05, a target path trained from zero
    for 3 steps), so whether its one bf16 rounding survives the rounding of the layer's bf16 output
    and moves the loss depends on the CPU's kernels: the loss is not compared after step 1."""
    from moshi_ttt import load_ttt_config

    runs = {}
    for prec in ("fp32", "bf16"):
        train(tiny_cfg(tmp_path / prec, max_steps=4, precision="bf16", **{"ttt.update_precision": prec}))
        runs[prec] = losses(tmp_path / prec)
        ckpt = list_checkpoints(tmp_path / prec)[-1][1]
        assert load_ttt_config(ckpt / "ttt.safetensors").update_precision == prec
    assert all(torch.isfinite(torch.tensor(list(r.values()))).all() for r in runs.values())
    assert sorted(runs["fp32"]) == sorted(runs["bf16"]) == [1, 2, 3, 4]
    assert runs["fp32"][1] == runs["bf16"][1]  # the target path starts at zero: no TTT term yet


# ---------------------------------------------------------------- modes and exports


def _trainable_groups(run_dir):
    ckpt = list_checkpoints(run_dir)[-1][1]
    return set(load_file(str(ckpt / "trainable.safetensors")))


def test_finetune_modes_train_the_right_parameters(tmp_path):
    train(tiny_cfg(tmp_path / "t", max_steps=1, finetune="ttt_only"))
    keys = _trainable_groups(tmp_path / "t")
    assert keys == {f"transformer.layers.1.gating.{n}" for n in ("w_down", "target_conv", "target_proj")}
    train(
        tiny_cfg(
            tmp_path / "l",
            max_steps=1,
            finetune="lora",
            **{"ttt.freeze_slow_weights": True, "ttt.train_w_down": False},
        )
    )
    keys = _trainable_groups(tmp_path / "l")
    assert all("lora_" in k or k.endswith(("target_conv", "target_proj")) for k in keys)
    assert not any(k.startswith("transformer.layers.1.gating.linear_in") for k in keys)
    assert "transformer.layers.1.gating.w_down" not in keys


@pytest.mark.parametrize("mode, variant", [("full", "inplace"), ("lora", "inplace"), ("lora", "mlp")])
def test_moshi_export_loads_in_moshi_and_matches_without_updates(tmp_path, mode, variant):
    from moshi.models import loaders

    from moshi_ttt import apply_ttt, load_ttt_config, load_ttt_weights, set_ttt_updates, ttt_gatings

    over = {"ttt.variant": variant, "ttt.mlp_heads": 2}
    train(tiny_cfg(tmp_path / "e", max_steps=2, finetune=mode, **over))
    ckpt = list_checkpoints(tmp_path / "e")[-1][1]
    raw = json.loads((ckpt / "moshi" / "config.json").read_text())
    assert not any(k.startswith("ttt") for k in raw)
    info = loaders.CheckpointInfo.from_hf_repo(
        "local/none",
        moshi_weights=ckpt / "moshi" / "model.safetensors",
        mimi_weights=ckpt / "moshi" / "model.safetensors",
        tokenizer=ckpt / "moshi" / "config.json",
        config_path=ckpt / "moshi" / "config.json",
        lora_weights=(ckpt / "moshi" / "lora.safetensors") if mode == "lora" else None,
    )
    vanilla = info.get_moshi(device="cpu", dtype=torch.float32)
    ttt = info.get_moshi(device="cpu", dtype=torch.float32)
    apply_ttt(ttt, load_ttt_config(ckpt / "ttt.safetensors"))
    load_ttt_weights(ttt, ckpt / "ttt.safetensors")
    codes = torch.cat([torch.randint(0, 100, (1, 1, 20)), torch.randint(0, 64, (1, 4, 20))], 1)
    with torch.no_grad():
        a = vanilla(codes).text_logits
        set_ttt_updates(ttt, False)
        if variant == "mlp":  # the export is the layer's own MLP: the branch with its gate closed
            for g in ttt_gatings(ttt).values():
                g.alpha.zero_()
        b = ttt(codes).text_logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- distributed


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_DIST_ARGS = [
    "--max_steps=4",
    "--log_interval=1",
    "--model.tiny.dim=32",
    "--model.tiny.num_layers=2",
    "--model.tiny.context=8",
    "--model.tiny.num_heads=2",
    "--data.duration_sec=2",
    "--checkpoint.interval=2",
    "--eval.num_batches=2",
    "--ttt.layers=[1]",
    "--ttt.chunk_size=4",
    "--grad_accum=2",
]


def _run(args, nproc=1):
    env = dict(os.environ, NO_TORCH_COMPILE="1", OMP_NUM_THREADS="1")
    launcher = [sys.executable]
    if nproc > 1:
        launcher += [
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={nproc}",
            f"--master-port={_free_port()}",
        ]
    res = subprocess.run(
        launcher + ["train.py", "configs/tiny_synthetic.yaml"] + args,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.mark.numerics
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path, strategy):
    one, two = tmp_path / "one", tmp_path / "two"
    _run([f"--run_dir={one}", "--batch_size=2"] + _DIST_ARGS)
    _run([f"--run_dir={two}", "--batch_size=1", f"--distributed.strategy={strategy}"] + _DIST_ARGS, nproc=2)
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-5), s
    grad = {
        json.loads(x)["step"]: json.loads(x)["grad_norm"]
        for x in (one / "metrics.jsonl").read_text().splitlines()
        if json.loads(x)["kind"] == "train"
    }
    grad2 = {
        json.loads(x)["step"]: json.loads(x)["grad_norm"]
        for x in (two / "metrics.jsonl").read_text().splitlines()
        if json.loads(x)["kind"] == "train"
    }
    for s in grad:  # clipping uses the global norm over all ranks
        assert grad2[s] == pytest.approx(grad[s], rel=1e-4), s
    ev1, ev2 = evals(one), evals(two)  # the final evaluation: the same 4 items, split 1 x 2x2 or 2 x 2x1
    assert sorted(ev1) == sorted(ev2) == [4]
    for k in ("loss", "text_nll", "audio_nll", "ppl"):
        assert ev2[4][k] == pytest.approx(ev1[4][k], rel=1e-5), k
    ck = list_checkpoints(two)[-1][1]
    assert (ck / "ttt.safetensors").is_file() and (ck / "moshi" / "model.safetensors").is_file()
    if strategy == "fsdp":
        assert (ck / "dcp").is_dir()
        # Resume the sharded run from step 2: steps 3-4 repeat exactly.
        shutil.rmtree(ck)
        lines = (two / "metrics.jsonl").read_text().splitlines()
        (two / "metrics.jsonl").write_text("".join(x + "\n" for x in lines if json.loads(x)["step"] <= 2))
        _run(
            [f"--run_dir={two}", "--batch_size=1", f"--distributed.strategy={strategy}"] + _DIST_ARGS, nproc=2
        )
        c = losses(two)
        for s in (3, 4):
            assert c[s] == pytest.approx(a[s], rel=1e-5), s


def test_wandb_offline_logs_without_network_and_keeps_run_id_on_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run = tmp_path / "w"
    over = {
        "wandb.project": "moshi-ttt-test",
        "wandb.mode": "offline",
        "max_steps": 2,
        "checkpoint.interval": 1,
    }
    train(tiny_cfg(run, **over))
    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    state = torch.load(list_checkpoints(run)[-1][1] / "trainer_state.pt", weights_only=True)
    assert runs[0].name.endswith(state["wandb_id"])
    train(tiny_cfg(run, **{**over, "max_steps": 3}))
    # The resumed run logs under the same id (its directory name gets a "-1" suffix when both runs
    # start within the same second, so read the id from the run file, not the directory name).
    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    assert all((p / f"run-{state['wandb_id']}.wandb").exists() for p in runs)
    with pytest.raises(ConfigError, match="unknown key wandb.key"):
        tiny_cfg(run, **{"wandb.key": "secret"})


def test_local_checkpoint_source_loads_base_weights_then_trains_lora(tmp_path):
    # A base Moshi on disk (config.json + model.safetensors), as moshi's own loaders expect it.
    train(tiny_cfg(tmp_path / "base", max_steps=1, **{"ttt.enabled": False}))
    base_dir = list_checkpoints(tmp_path / "base")[-1][1] / "moshi"
    over = {
        "finetune": "lora",
        "max_steps": 2,
        "model.source": "local",
        "model.tiny": {},
        "model.config_path": str(base_dir / "config.json"),
        "model.moshi_weights": str(base_dir / "model.safetensors"),
    }
    cfg = tiny_cfg(tmp_path / "lora", **over)
    from finetune.model import build_model

    built = build_model(cfg, torch.device("cpu"))
    base_sd = load_file(str(base_dir / "model.safetensors"))
    sd = built.model.state_dict()
    # Base weights loaded (LoRA's frozen_W, TTT's w_down and pretrained copy), new tensors initialised.
    w = base_sd["transformer.layers.1.gating.linear_out.weight"]
    assert torch.equal(sd["transformer.layers.1.gating.w_down"], w)
    assert torch.equal(sd["transformer.layers.1.gating.w_down_pretrained"], w.float())
    assert torch.equal(
        sd["transformer.layers.0.gating.linear_in.frozen_W.weight"],
        base_sd["transformer.layers.0.gating.linear_in.weight"],
    )
    assert sd["transformer.layers.0.gating.linear_in.lora_B.weight"].abs().sum() == 0
    assert sd["transformer.layers.1.gating.target_conv"].abs().sum() == 0
    train(cfg)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses(tmp_path / "lora").values())


def test_bad_local_checkpoint_is_a_clear_error(tmp_path):
    train(tiny_cfg(tmp_path / "base", max_steps=1, **{"ttt.enabled": False}))
    base_dir = list_checkpoints(tmp_path / "base")[-1][1] / "moshi"
    over = {
        "model.source": "local",
        "model.tiny": {},
        "model.config_path": str(base_dir / "config.json"),
        "model.moshi_weights": str(tmp_path / "nope.safetensors"),
    }
    with pytest.raises(ConfigError, match="model.moshi_weights: .*nope.safetensors does not exist"):
        train(tiny_cfg(tmp_path / "x", **over))
    raw = json.loads((base_dir / "config.json").read_text())
    raw["dim"] = 48  # a config that does not match the weights
    (tmp_path / "wrong.json").write_text(json.dumps(raw))
    over.update(
        {
            "model.config_path": str(tmp_path / "wrong.json"),
            "model.moshi_weights": str(base_dir / "model.safetensors"),
        }
    )
    with pytest.raises(ValueError, match="does not match the architecture in the model config"):
        train(tiny_cfg(tmp_path / "y", **over))


def test_a_run_directory_in_use_is_refused(tmp_path):
    from finetune.checkpointing import lock_run_dir

    run = tmp_path / "busy"
    run.mkdir()
    held = lock_run_dir(run)
    try:
        with pytest.raises(ConfigError, match="is in use by another training process"):
            train(tiny_cfg(run, max_steps=1))
        assert not (run / "checkpoints").exists()
    finally:
        held.close()
    train(tiny_cfg(run, max_steps=1))  # free again


def test_ttt_mlp_variant_trains_resumes_and_exports(tmp_path):
    over = {"ttt.variant": "mlp", "ttt.mlp_heads": 2, "finetune": "ttt_only"}
    train(tiny_cfg(tmp_path / "m", **over))
    keys = _trainable_groups(tmp_path / "m")
    from moshi_ttt import TTTMLPGating

    assert keys == {f"transformer.layers.1.gating.{n}" for n in TTTMLPGating.ttt_param_names()}
    recs = [json.loads(x) for x in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    tr = [r for r in recs if r["kind"] == "train"][-1]
    assert tr["ttt/layer1/gate"] != 0.0 and "ttt/layer1/update_norm" in tr  # the gate moved off 0
    with pytest.raises(ConfigError, match="ttt.variant"):
        train(tiny_cfg(tmp_path / "m", **{**over, "ttt.variant": "inplace"}))
    # TTT-MLP's per-position rate offsets have one entry per chunk position: a clear error, not a crash,
    # and no checkpoint set aside as unloadable.
    before = sorted(p.name for p in (tmp_path / "m" / "checkpoints").iterdir())
    with pytest.raises(ConfigError, match=r"changed shape, e.g. .*token_offset \[4\] -> \[2\]"):
        train(tiny_cfg(tmp_path / "m", max_steps=8, **{**over, "ttt.chunk_size": 2}))
    assert sorted(p.name for p in (tmp_path / "m" / "checkpoints").iterdir()) == before


def test_readme_parameter_table_is_what_the_code_prints():
    from finetune.model import build_model, param_table

    table = param_table(build_model(load_config(ROOT / "configs/tiny.yaml"), torch.device("cpu")).model)
    readme = (ROOT / "README.md").read_text()
    assert f"```\n{table}\n```" in readme, "regenerate the README's table from finetune.model.param_table"
