"""Coming from moshi-finetune: its schedule, embedding training, configs and checkpoints."""

import json
import math
import shutil
import warnings

import pytest
import torch

from finetune.optim import OneCycleSchedule, onecycle_factor

# ---------------------------------------------------------------- the one-cycle schedule


@pytest.mark.parametrize("total, pct_start", [(100, 0.05), (37, 0.3), (20, 0.1), (7, 0.05)])
def test_onecycle_matches_torch_onecycle_lr_and_beta1(total, pct_start):
    """Reference: torch's own OneCycleLR, as moshi-finetune builds it (max_lr, total_steps, pct_start)."""

    def opt():
        ps = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]
        return torch.optim.AdamW(
            [{"params": [ps[0]], "lr": 1e-3}, {"params": [ps[1]], "lr": 5e-3}], betas=(0.9, 0.95)
        )

    ref_opt, our_opt = opt(), opt()
    ref = torch.optim.lr_scheduler.OneCycleLR(
        ref_opt, max_lr=[1e-3, 5e-3], total_steps=total, pct_start=pct_start
    )
    ours = OneCycleSchedule(our_opt, total, pct_start)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scheduler.step() without optimizer.step(): on purpose here
        for step in range(total):
            for g_ref, g_our in zip(ref_opt.param_groups, our_opt.param_groups):
                assert g_our["lr"] == pytest.approx(g_ref["lr"], rel=1e-12), step
                assert g_our["betas"][0] == pytest.approx(g_ref["betas"][0], rel=1e-12), step
                assert g_our["betas"][1] == g_ref["betas"][1] == 0.95
            ref.step()
            ours.step()


def test_onecycle_where_torch_divides_by_zero_starts_at_the_peak():
    # 20 steps, pct_start 0.05: the rise ends at step 0.05 * 20 - 1 = 0 (torch raises ZeroDivisionError).
    assert onecycle_factor(0, 20, 0.05) == 1.0
    assert onecycle_factor(19, 20, 0.05) == pytest.approx(1 / 25 / 1e4)
    assert onecycle_factor(1, 20, 0.05) < 1.0


@pytest.mark.numerics
def test_onecycle_schedule_resumes_exactly(tmp_path):
    from test_train import losses, tiny_cfg

    from finetune.checkpointing import list_checkpoints
    from finetune.trainer import train

    over = {"optim.schedule": "onecycle", "optim.pct_start": 0.3}
    train(tiny_cfg(tmp_path / "a", **over))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_000006")
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "b" / "metrics.jsonl").write_text(
        "".join(x + "\n" for x in lines if json.loads(x)["step"] <= 3)
    )
    train(tiny_cfg(tmp_path / "b", **over))
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    for s in range(4, 7):
        assert b[s] == pytest.approx(a[s], rel=1e-6, abs=1e-6)
    state = torch.load(list_checkpoints(tmp_path / "b")[-1][1] / "trainer_state.pt", weights_only=True)
    betas = {g["betas"][0] for g in state["optimizer"]["param_groups"]}
    assert betas != {0.9}  # beta1 follows the cycle, not optim.betas[0]


# ---------------------------------------------------------------- lora.train_embeddings (ft_embed)


def test_train_embeddings_trains_the_tables_and_exports_them_beside_the_adapters(tmp_path):
    from moshi.models import loaders
    from safetensors.torch import load_file
    from test_train import final_weights, tiny_cfg

    from finetune.checkpointing import list_checkpoints
    from finetune.trainer import train

    train(tiny_cfg(tmp_path / "e", max_steps=2, finetune="lora", **{"lora.train_embeddings": True}))
    trained = final_weights(tmp_path / "e")
    tables = {"text_emb.weight", "emb.0.weight", "depformer_text_emb.weight", "depformer_emb.0.weight"}
    assert tables <= trained.keys()
    assert not any(".frozen_W." in k for k in trained)  # the Linears themselves stay frozen
    moshi_dir = list_checkpoints(tmp_path / "e")[-1][1] / "moshi"
    lora = load_file(str(moshi_dir / "lora.safetensors"))
    for k in tables:
        torch.testing.assert_close(lora[k], trained[k])
    info = loaders.CheckpointInfo.from_hf_repo(
        "local/none",
        moshi_weights=moshi_dir / "model.safetensors",
        mimi_weights=moshi_dir / "model.safetensors",
        tokenizer=moshi_dir / "config.json",
        config_path=moshi_dir / "config.json",
        lora_weights=moshi_dir / "lora.safetensors",
    )
    loaded = info.get_moshi(device="cpu", dtype=torch.float32)
    torch.testing.assert_close(loaded.text_emb.weight, trained["text_emb.weight"])


# ---------------------------------------------------------------- moshi-finetune keys and YAML files

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
TINY = {"dim": 32, "num_layers": 2, "num_heads": 2, "context": 16, "n_q": 8, "dep_q": 4}


def _tiny_base(d):
    """A base Moshi on disk (model.safetensors + config.json) of the tiny dataset's shape (4 codebooks)."""
    from safetensors.torch import save_file

    from moshi_ttt.tiny import build_tiny_lm, tiny_lm_kwargs

    model = build_tiny_lm(seed=3, **TINY)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(tiny_lm_kwargs(**TINY)))
    return model


@pytest.mark.parametrize(
    "over, match",
    [
        ({"data.train_data": "x.jsonl"}, r"data.train_data is moshi-finetune's key; here it is data.train"),
        ({"duration_sec": 10}, r"duration_sec is moshi-finetune's key; here it is data.duration_sec"),
        (
            {"lora.enable": True},
            r"lora.enable is moshi-finetune's key; here it is finetune \(finetune: lora\)",
        ),
        ({"first_codebook_weight_multiplier": 100}, r"here it is loss.first_codebook_weight"),
        (
            {"wandb.key": "abc"},
            r"wandb.key .* no equivalent here: the API key is read only from the WANDB_API_KEY",
        ),
    ],
)
def test_a_moshi_finetune_key_names_this_projects_key(over, match):
    from finetune.args import load_config
    from finetune.schema import ConfigError

    with pytest.raises(ConfigError, match=match):
        load_config(None, over)


def test_train_py_given_a_moshi_finetune_yaml_names_the_converter(tmp_path):
    import subprocess
    import sys

    mf = tmp_path / "moshi_7B.yaml"
    mf.write_text(
        "data:\n  train_data: data/train.jsonl\n  shuffle: true\nmoshi_paths:\n  hf_repo_id: kyutai/moshiko-pytorch-bf16\n"
        "full_finetuning: false\nlora:\n  enable: true\n  rank: 128\nrun_dir: runs/x\n"
    )
    res = subprocess.run([sys.executable, "train.py", str(mf)], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2
    assert "is a moshi-finetune config" in res.stderr
    assert f"python scripts/from_moshi_finetune.py {mf} -o configs/moshi_7B_ttt.yaml" in res.stderr


def _mf_yaml(tmp_path, ds, **extra):
    """A moshi-finetune config (its example/moshi_7B.yaml's keys) for the tiny dataset; model paths relative
    to tmp_path, as moshi-finetune resolves them from where it runs."""
    cfg = {
        "data": {"train_data": str(ds / "train.jsonl"), "eval_data": str(ds / "eval.jsonl"), "shuffle": True},
        "moshi_paths": {
            "hf_repo_id": None,
            "moshi_path": "base/model.safetensors",
            "config_path": "base/config.json",
            "mimi_path": str(ds / "mimi.safetensors"),
            "tokenizer_path": str(ds / "tokenizer.model"),
        },
        "full_finetuning": False,
        "lora": {"enable": True, "rank": 8, "scaling": 2.0, "ft_embed": False},
        "first_codebook_weight_multiplier": 100.0,
        "text_padding_weight": 0.5,
        "duration_sec": 4,
        "batch_size": 2,
        "max_steps": 3,
        "gradient_checkpointing": False,
        "optim": {"lr": 1e-3, "weight_decay": 0.1, "pct_start": 0.3},
        "seed": 0,
        "log_freq": 1,
        "eval_freq": 3,
        "do_eval": True,
        "do_ckpt": True,
        "ckpt_freq": 3,
        "save_adapters": True,
        "run_dir": str(tmp_path / "run"),
        "wandb": {"project": None, "offline": False},
    }
    cfg.update(extra)
    p = tmp_path / "mf.yaml"
    p.write_text(__import__("yaml").safe_dump(cfg))
    return p


def _convert(tmp_path, mf, *flags, capsys):
    """scripts/from_moshi_finetune.py, run in this process: (exit code, stdout, stderr)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("from_mf", ROOT / "scripts" / "from_moshi_finetune.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = [str(mf), "-o", str(tmp_path / "ours.yaml"), "--mf-root", str(tmp_path), *flags]
    rc = script.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_a_moshi_finetune_yaml_converts_and_trains_on_the_tiny_setup(tmp_path, tiny_ds, capsys):
    import subprocess
    import sys

    from finetune.args import load_config
    from finetune.checkpointing import list_checkpoints
    from finetune.trainer import train

    _tiny_base(tmp_path / "base")
    mf = _mf_yaml(tmp_path, tiny_ds)
    flags = [f"--data.mimi_config={tiny_ds / 'mimi_config.json'}", "--ttt.layers=[1]", "--ttt.chunk_size=8"]
    rc, out, err = _convert(tmp_path, mf, "--cache-dir", str(tmp_path / "codes"), *flags, capsys=capsys)
    assert rc == 0, err
    for line in (
        "data.train_data -> data.train",
        "moshi_paths.hf_repo_id -> model.source: 'local'",
        "lora.enable -> finetune: 'lora'",
        "optim.pct_start -> optim.pct_start: 0.3",
        "eval batches: moshi-finetune evaluates 40 // processes batches",
        "data.shuffle: the windows are reshuffled every epoch",
        "ttt: enabled",
    ):
        assert line in out, line
    cfg = load_config(tmp_path / "ours.yaml")
    assert cfg.model.source == "local" and cfg.model.moshi_weights == str(
        tmp_path / "base" / "model.safetensors"
    )
    assert (cfg.finetune, cfg.lora.rank, cfg.lora.scaling, cfg.lora.train_embeddings) == (
        "lora",
        8,
        2.0,
        False,
    )
    assert (cfg.optim.schedule, cfg.optim.pct_start, cfg.optim.lr) == ("onecycle", 0.3, 1e-3)
    assert (cfg.loss.first_codebook_weight, cfg.loss.text_padding_weight) == (100.0, 0.5)
    assert (cfg.data.duration_sec, cfg.data.num_frames, cfg.data.text_overlap) == (4.0, 50, "drop")
    assert (cfg.batch_size, cfg.grad_accum, cfg.max_steps, cfg.log_interval) == (2, 1, 3, 1)
    assert (cfg.eval.interval, cfg.checkpoint.interval, cfg.checkpoint.keep_last) == (3, 3, 3)
    assert cfg.ttt.enabled and cfg.ttt.layers == [1]
    # The separate encoding step, from the converted config alone (the model's codebook count included).
    enc = subprocess.run(
        [sys.executable, "scripts/encode_codes.py", str(tmp_path / "ours.yaml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert enc.returncode == 0 and "encoded 4 files" in enc.stdout, enc.stdout + enc.stderr
    summary = train(cfg)
    assert summary["step"] == 3 and math.isfinite(summary["loss"]) and math.isfinite(summary["eval_loss"])
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [3]


def test_converter_uses_moshi_finetune_defaults_and_reports_what_it_cannot_map(tmp_path, tiny_ds):
    from finetune.mf_compat import convert

    mf = {
        "data": {"train_data": str(tiny_ds / "train.jsonl"), "eval_data": str(tiny_ds / "eval.jsonl")},
        "lora": {"enable": True},
        "run_dir": "runs/x",
        "do_ckpt": False,
        "overwrite_run_dir": True,
        "duration_sec": 8.03,
        "no_eval": True,  # the README of moshi-finetune documents this key; its code has none
    }
    conv = convert(mf, mf_root=tmp_path)
    c = conv.config
    # Left out of the file: moshi-finetune's code defaults, not this project's.
    assert c["loss"]["first_codebook_weight"] == 1.0
    assert c["log_interval"] == 1 and c["model"]["gradient_checkpointing"] is True
    assert c["data"]["shuffle"] is False and c["data"]["eval"] is None  # do_eval defaults to false
    assert (
        c["lora"]["rank"] == 64
        and c["optim"]["pct_start"] == 0.05
        and c["model"]["hf_repo"] == ("kyutai/moshiko-pytorch-bf16")
    )
    assert c["data"]["duration_sec"] == 101 / 12.5  # ceil(8.03 * 12.5) = 101 frames
    report = conv.report()
    for text in (
        "no_eval: not a moshi-finetune key",
        "do_ckpt: false: checkpoints are always written",
        "overwrite_run_dir: a run directory is never deleted",
        "data.eval_data: not used, do_eval is false",
        "first_codebook_weight_multiplier -> loss.first_codebook_weight: 1.0 (moshi-finetune's default)",
        "duration_sec: 8.03 s is not a whole number of 80 ms frames",
    ):
        assert text in report, text


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"wandb": {"project": "p", "key": "secret123"}}, "export WANDB_API_KEY in the environment instead"),
        ({"data": {"train_data": "a.jsonl:0.7,b.jsonl:0.3"}}, "mixes 2 sources"),
        ({"full_finetuning": True}, "exactly one of them true"),
    ],
)
def test_converter_refuses_what_it_cannot_convert_and_writes_nothing(tmp_path, tiny_ds, extra, match, capsys):
    rc, out, err = _convert(tmp_path, _mf_yaml(tmp_path, tiny_ds, **extra), capsys=capsys)
    assert rc == 2
    assert match in err and "nothing was written" in err
    assert "secret123" not in err + out
    assert not (tmp_path / "ours.yaml").exists()


# ---------------------------------------------------------------- moshi-finetune checkpoints as a start


def _mf_lora_checkpoint(base, run_dir, rank=4, scaling=2.0) -> "tuple":
    """moshi-finetune's LoRA output: checkpoint_NNNNNN/consolidated/{lora.safetensors, config.json}, keys
    as its Checkpointer names them (X.lora_A.weight, X.lora_B.weight for every Linear; with ft_embed, the
    embedding tables), tensors in bf16 (its param_dtype), config.json = the base config + its LoRA keys."""
    from safetensors.torch import save_file

    from moshi_ttt.tiny import tiny_lm_kwargs

    g = torch.Generator().manual_seed(5)
    state = {}
    for name, m in base.named_modules():
        if isinstance(m, torch.nn.Linear):
            state[f"{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.2
            state[f"{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.2
    state["text_emb.weight"] = base.text_emb.weight.detach() + torch.randn(
        base.text_emb.weight.shape, generator=g
    )
    out = run_dir / "checkpoints" / "checkpoint_000010" / "consolidated"
    out.mkdir(parents=True)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}, str(out / "lora.safetensors"))
    config = dict(tiny_lm_kwargs(**TINY), lora=True, lora_rank=rank, lora_scaling=scaling)
    (out / "config.json").write_text(json.dumps(config))
    return out


def _moshi_loads(config_json, weights, lora=None):
    """The reference: the model moshi itself builds from these files (as moshi.server does)."""
    from moshi.models import loaders

    info = loaders.CheckpointInfo.from_hf_repo(
        "local/none",
        moshi_weights=weights,
        mimi_weights=weights,
        tokenizer=config_json,
        config_path=config_json,
        lora_weights=lora,
    )
    return info.get_moshi(device="cpu", dtype=torch.float32, fuse_lora=True)


def _codes(n=24):
    g = torch.Generator().manual_seed(9)
    return torch.cat(
        [torch.randint(0, 100, (2, 1, n), generator=g), torch.randint(0, 64, (2, 8, n), generator=g)], 1
    )


def _local(tmp_path, run, **over):
    from test_train import tiny_cfg

    base = {
        "model.source": "local",
        "model.tiny": {},
        "model.config_path": str(tmp_path / "base" / "config.json"),
        "model.moshi_weights": str(tmp_path / "base" / "model.safetensors"),
    }
    base.update(over)
    return tiny_cfg(tmp_path / run, **base)


def test_a_moshi_finetune_lora_checkpoint_starts_a_ttt_run(tmp_path):
    from finetune.checkpointing import list_checkpoints
    from finetune.model import build_model
    from finetune.trainer import train
    from moshi_ttt import ttt_gatings

    base = _tiny_base(tmp_path / "base")
    ckpt = _mf_lora_checkpoint(base, tmp_path / "mf")
    ref = _moshi_loads(
        ckpt / "config.json", tmp_path / "base" / "model.safetensors", ckpt / "lora.safetensors"
    )
    cfg = _local(tmp_path, "ttt", finetune="lora", **{"model.init_from": str(ckpt)})
    model = build_model(cfg, torch.device("cpu")).model
    # w_down of the TTT layer is the merged fine-tuned linear_out; the ft_embed table is the trained one.
    w_down = ttt_gatings(model)[1].w_down
    torch.testing.assert_close(
        w_down, ref.transformer.layers[1].gating.linear_out.weight, rtol=1e-6, atol=1e-6
    )
    assert not torch.allclose(w_down, base.transformer.layers[1].gating.linear_out.weight, atol=1e-3)
    torch.testing.assert_close(model.text_emb.weight, ref.text_emb.weight)
    # At the start the TTT model computes what moshi-finetune's model computes.
    model.eval()
    with torch.no_grad():
        a, b = model(_codes()), ref(_codes())
    torch.testing.assert_close(a.text_logits, b.text_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.logits[a.mask], b.logits[b.mask], rtol=1e-4, atol=1e-4)
    # And it trains; the moshi export carries the merged start (model.safetensors) beside the new adapters.
    train(cfg)
    moshi_dir = list_checkpoints(tmp_path / "ttt")[-1][1] / "moshi"
    assert {"model.safetensors", "lora.safetensors", "config.json"} <= {p.name for p in moshi_dir.iterdir()}
    exported = _moshi_loads(
        moshi_dir / "config.json", moshi_dir / "model.safetensors", moshi_dir / "lora.safetensors"
    )
    assert exported.text_emb.weight.shape == ref.text_emb.weight.shape


def test_a_moshi_finetune_full_checkpoint_starts_a_ttt_run(tmp_path):
    from safetensors.torch import save_file

    from finetune.model import build_model
    from finetune.trainer import train
    from moshi_ttt import ttt_gatings
    from moshi_ttt.tiny import tiny_lm_kwargs

    base = _tiny_base(tmp_path / "base")
    lora_ckpt = _mf_lora_checkpoint(base, tmp_path / "mf_lora")
    merged = _moshi_loads(
        lora_ckpt / "config.json", tmp_path / "base" / "model.safetensors", lora_ckpt / "lora.safetensors"
    )
    # moshi-finetune's full fine-tune output: consolidated.safetensors (bf16) + config.json (lora: false).
    out = tmp_path / "mf" / "checkpoints" / "checkpoint_000020" / "consolidated"
    out.mkdir(parents=True)
    save_file(
        {k: v.to(torch.bfloat16).contiguous() for k, v in merged.state_dict().items()},
        str(out / "consolidated.safetensors"),
    )
    (out / "config.json").write_text(
        json.dumps(dict(tiny_lm_kwargs(**TINY), lora=False, lora_rank=64, lora_scaling=2.0))
    )
    ref = _moshi_loads(out / "config.json", out / "consolidated.safetensors")
    # The checkpoint_NNNNNN directory (above consolidated/) is accepted too; no base paths are needed.
    cfg = _local(
        tmp_path,
        "ttt",
        **{"model.init_from": str(out.parent), "model.config_path": None, "model.moshi_weights": None},
    )
    model = build_model(cfg, torch.device("cpu")).model
    torch.testing.assert_close(
        ttt_gatings(model)[1].w_down, ref.transformer.layers[1].gating.linear_out.weight
    )
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model(_codes()).text_logits, ref(_codes()).text_logits, rtol=1e-4, atol=1e-4
        )
    summary = train(cfg)
    assert summary["step"] == 6 and math.isfinite(summary["loss"])


def test_bad_init_from_is_a_clear_error(tmp_path):
    from test_train import tiny_cfg

    from finetune.model import build_model
    from finetune.schema import ConfigError

    base = _tiny_base(tmp_path / "base")
    ckpt = _mf_lora_checkpoint(base, tmp_path / "mf")
    with pytest.raises(ConfigError, match="model.init_from: set model.source to hf or local"):
        tiny_cfg(tmp_path / "a", **{"model.init_from": str(ckpt)})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        build_model(
            _local(tmp_path, "b", **{"model.init_from": str(tmp_path / "empty")}), torch.device("cpu")
        )
    # Adapters trained on another architecture.
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["dim"] = 48
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ConfigError, match="describes another architecture than the base model .*dim: 48 vs 32"
    ):
        build_model(_local(tmp_path, "c", **{"model.init_from": str(ckpt)}), torch.device("cpu"))


def test_readme_key_table_lists_every_moshi_finetune_key():
    from finetune.mf_compat import KEYS, MF_DEFAULTS

    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("**Key mapping**") : readme.index("**The same:**")]
    rows = [r for r in table.splitlines() if r.startswith("| `")]
    assert set(KEYS) == set(MF_DEFAULTS)  # every key of moshi-finetune's TrainArgs has an entry
    for key, (ours, _) in KEYS.items():
        prefix, _, last = key.rpartition(".")
        row = [r for r in rows if f"`{key}`" in r or (prefix and f"`{prefix}." in r and f"`{last}`" in r)]
        assert row, f"{key} is missing from the README's key table"
        if ours is not None:
            assert ours in row[0], f"{key}: the README row does not name {ours}"
