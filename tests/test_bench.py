"""The benchmark scripts' code paths on CPU (the numbers they print on a GPU are their purpose)."""

import torch
from conftest import ROOT

from finetune.commands import bench_model, bench_ttt


def test_bench_model_runs_every_row_on_a_tiny_model(capsys):
    rows = bench_model.main(
        ["--tiny", "--device", "cpu", "--T", "40", "--chunk", "8", "--steps", "1", "--warmup", "1"]
    )
    assert [r["label"] for r in rows] == ["no TTT", "fp32", "tf32", "bf16", "bf16, w_down frozen"]
    assert all(r["time"] > 0 for r in rows)
    frozen, bf16 = rows[-1]["train"], rows[-2]["train"]
    assert frozen < bf16  # w_down left the optimizer
    out = capsys.readouterr().out
    assert "TTT layers [0, 2], chunk 8" in out and "targets: step time <= 1.10x" in out
    assert not torch.backends.cuda.matmul.allow_tf32  # the tf32 row does not leak


def test_bench_model_builds_moshi_7b_as_the_lora_ttt_config_says():
    """The GPU run's model, on the meta device: 7.69 B parameters, TTT on 0, 6, ..., 30 at chunk 512,
    LoRA rank 128, gradient checkpointing, trainable weights float32 and frozen ones bf16."""
    path = ROOT / "configs/moshi7b_lora_ttt.yaml"
    cfg = bench_model.bench_config(path, tiny=False, chunk=None, device=torch.device("cpu"), ttt=True)
    model = bench_model.build(cfg, torch.device("meta"))
    base = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n and "target_" not in n)
    assert round(base / 1e9, 2) == 7.69
    assert model.transformer.checkpointing and cfg.lora.rank == 128 and cfg.ttt.chunk_size == 512
    assert sorted(bench_model.ttt_layers(model)) == [0, 6, 12, 18, 24, 30]
    for p in model.parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16)
    assert bench_model.bench_config(path, False, None, torch.device("cpu"), ttt=False).ttt.enabled is False


def test_bench_ttt_prints_a_row_per_update_math(capsys):
    bench_ttt.main(
        ["--d", "16", "--h", "44", "--T", "40", "--C", "8", "--reps", "1", "--amp", "bf16"]
        + ["--update", "fp32", "tf32", "bf16", "--no-forms", "--no-chunk-w"]
    )
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[2] for ln in lines if ln.strip().startswith("40")] == ["fp32", "tf32", "bf16"]
    assert any("bf16 update" in ln for ln in lines)  # the meta-device memory at Moshi-7B's shape


def test_gpu_checks_script_parses_and_names_existing_scripts():
    import re
    import subprocess

    path = ROOT / "scripts/gpu_checks.sh"
    subprocess.run(["bash", "-n", str(path)], check=True)
    scripts = re.findall(r"scripts/(\w+\.py)", path.read_text())
    assert len(scripts) >= 5 and all((ROOT / "scripts" / s).is_file() for s in scripts)
