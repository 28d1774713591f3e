import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


def random_codes(model, B: int, T: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random token grid ``[B, 1 + n_q, T]`` for a moshi ``LMModel`` (text stream first)."""
    text = torch.randint(0, model.text_card, (B, 1, T), generator=generator)
    audio = torch.randint(0, model.card, (B, model.n_q, T), generator=generator)
    return torch.cat([text, audio], dim=1)


def stream_text_logits(model, seq: torch.Tensor, pieces: list[int]) -> torch.Tensor:
    """Text logits of ``model.forward_text`` in streaming mode over ``seq`` [B, K, T] cut into ``pieces``."""
    outs, t = [], 0
    for n in pieces:
        outs.append(model.forward_text(seq[:, :, t : t + n])[1])
        t += n
    return torch.cat(outs, 2)


def randomize_ttt(model, std: float = 0.3, seed: int = 0) -> None:
    """Give every TTT gating's target path (and w_down) random nonzero values."""
    from moshi_ttt import ttt_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gating in ttt_layers(model).values():
            gating.target_conv.copy_(torch.randn(gating.target_conv.shape, generator=g) * std)
            gating.target_proj.add_(torch.randn(gating.target_proj.shape, generator=g) * std / 4)
            gating.w_down.add_(torch.randn(gating.w_down.shape, generator=g) * 0.01)


@pytest.fixture(scope="session")
def tiny_ds(tmp_path_factory):
    """A small generated conversation dataset (3 train + 1 eval files of 7 s), tokenizer and tiny Mimi."""
    out = tmp_path_factory.mktemp("tinyds")
    subprocess.run(
        [
            sys.executable,
            "scripts/make_tiny_dataset.py",
            str(out / "ds"),
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
    return out / "ds"


def manifest_data(ds: Path, **extra) -> dict:
    """The ``data`` section of a training config reading the ``tiny_ds`` dataset."""
    files = {"train": "train.jsonl", "eval": "eval.jsonl", "tokenizer": "tokenizer.model"}
    files |= {"mimi_weights": "mimi.safetensors", "mimi_config": "mimi_config.json"}
    return {"source": "manifest", **{k: str(ds / v) for k, v in files.items()}, **extra}


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_ds, tmp_path_factory):
    """A tiny LoRA + TTT run (8 steps on tiny_ds; TTT on layer 1, chunk 8) with its checkpoint."""
    from finetune.args import load_config
    from finetune.schema import apply_overrides
    from finetune.training.trainer import train

    run = tmp_path_factory.mktemp("infer") / "run"
    base = {
        "run_dir": str(run),
        "device": "cpu",
        "finetune": "lora",
        "batch_size": 2,
        "max_steps": 8,
        "log_interval": 4,
        "lora": {"rank": 4},
        "model": {
            "source": "tiny",
            "tiny": {"dim": 32, "num_layers": 2, "num_heads": 2, "context": 16, "n_q": 8, "dep_q": 4},
        },
        "ttt": {"layers": [1], "chunk_size": 8, "eta": 0.5},
        "optim": {"lr": 3e-3, "ttt_params_lr": 3e-2},
        "data": manifest_data(tiny_ds, duration_sec=4.0),
    }
    train(load_config(None, apply_overrides(base, {})))
    return run
