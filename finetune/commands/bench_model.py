"""The cost of TTT in a whole fine-tuning step: time and peak memory, TTT vs the same model without TTT.

    python scripts/bench_model.py                                   # on a GPU: Moshi-7B, T = 3000 and 6000
    python scripts/bench_model.py --tiny --device cpu --T 48 --chunk 16 --steps 1   # the code path, on CPU

The model is built by finetune's own ``build_model`` from a training config (default
``configs/moshi7b_lora_ttt.yaml``: LoRA rank 128 on every Linear, In-Place TTT on layers 0, 6, ..., 30,
chunk 512, gradient checkpointing) with Moshi-7B's architecture (``moshi.models.loaders._lm_kwargs``,
7.69 B parameters) and random weights; the frozen weights are then cast to bf16 and the trainable
ones are float32, as when finetune loads the bf16 checkpoint. A step is the trainer's: bf16 autocast
forward, the trainer's loss, backward, gradient clipping, AdamW, on random tokens (B x T).

Rows, per T: ``no TTT`` (the same config with ``ttt.enabled: false``: the LoRA-only fine-tune), then the
TTT model with its update math in ``fp32``, ``tf32`` (fp32 with TF32 matmuls) and ``bf16``
(``ttt.update_precision``), and ``bf16, w_down frozen`` (``ttt.train_w_down: false``: no optimizer
state for the six 4096 x 11264 fast-weight inits). Columns: median step time over ``--steps`` after
``--warmup`` steps, peak memory allocated during the steps (weights, gradients, optimizer state and
activations) and its part above the memory held between steps, each with its ratio to ``no TTT``.
The issue's targets: step time <= 1.10x and peak memory <= 1.10x the LoRA-only step.

``--tiny`` swaps in a small architecture (``moshi_ttt.tiny``) so the same code runs on CPU in
seconds (the tests run it); CPU timings say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path

import torch
from moshi.models import loaders

from finetune.args import TrainConfig, load_config
from finetune.training.loss import loss_weights, training_loss
from finetune.training.model import build_model
from finetune.training.optim import build_optimizer
from moshi_ttt import ttt_layers

ROOT = Path(__file__).resolve().parents[2]  # the repository
TARGET_TIME, TARGET_MEM = 1.10, 1.10
GB = 2**30


def bench_config(path: Path, tiny: bool, chunk: int | None, device: torch.device, ttt: bool) -> TrainConfig:
    """The training config with a random-weight model of Moshi-7B's architecture (or a tiny one)."""
    arch = {"context": 16} if tiny else dict(loaders._lm_kwargs)
    over = {
        "device": device.type,
        "precision": "bf16",
        "model": {"source": "tiny", "tiny": arch, "gradient_checkpointing": True},
        "data": {"source": "synthetic"},
        "ttt": {"enabled": ttt},
        "wandb": {"project": None},
    }
    if chunk is not None:
        over["ttt"]["chunk_size"] = chunk
    if tiny:
        over["ttt"]["layer_frequency"] = 2
    raw = __import__("yaml").safe_load(path.read_text())
    # The config's checkpoint source goes; the architecture comes from `arch`, with the config's
    # fine-tuning attention context (model.context) if it sets one.
    context = (raw.pop("model", None) or {}).get("context")
    if context is not None:
        over["model"]["context"] = context
    return load_config(None, _merge(raw, over))


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out.get(k) or {}, v) if isinstance(v, dict) and v else v
    return out


def build(cfg: TrainConfig, device: torch.device):
    model = build_model(cfg, device).model
    for p in model.parameters():  # frozen weights as a bf16 checkpoint holds them
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    model.train()
    return model


def random_codes(model, B: int, T: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, model.text_card, (B, 1, T), generator=g)
    audio = torch.randint(0, model.card, (B, model.n_q, T), generator=g)
    return torch.cat([text, audio], 1).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(model, cfg: TrainConfig, optimizer, params, codes: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(codes.device.type, dtype=torch.bfloat16):
        out = model(codes)
        loss = training_loss(cfg.loss, out, codes, loss_weights(cfg.loss, model, codes)).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
    optimizer.step()


def measure(model, cfg, optimizer, codes, steps: int, warmup: int) -> tuple[float, float, float]:
    """Median step seconds, peak bytes during the steps, and the peak above the memory held before."""
    device = codes.device
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(warmup):  # also creates AdamW's state
        step(model, cfg, optimizer, params, codes)
    sync(device)
    cuda = device.type == "cuda"
    if cuda:
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        held = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step(model, cfg, optimizer, params, codes)
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if cuda else float("nan")
    return statistics.median(times), peak, peak - held if cuda else float("nan")


def set_update_math(model, math: str) -> None:
    """``fp32`` / ``tf32`` / ``bf16`` update math on every TTT layer (tf32: the global matmul flag)."""
    torch.backends.cuda.matmul.allow_tf32 = math == "tf32"
    for g in ttt_layers(model).values():
        g.config.update_precision = "bf16" if math == "bf16" else "fp32"


def free() -> None:
    """Return what the caller just deleted to the device (the next row's memory starts clean)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "configs/moshi7b_lora_ttt.yaml")
    p.add_argument("--T", type=int, nargs="+", default=[3000, 6000])
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--update", nargs="+", default=["fp32", "tf32", "bf16"], choices=["fp32", "tf32", "bf16"])
    p.add_argument("--no-frozen-w-down", action="store_true", help="skip the 'bf16, w_down frozen' row")
    p.add_argument("--tiny", action="store_true", help="a tiny architecture (CPU check of the code path)")
    p.add_argument("--chunk", type=int, default=None, help="override ttt.chunk_size")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    """Measure every row and print the table; returns the rows."""
    args = _parser().parse_args(argv)
    device = torch.device(args.device)
    rows: list[dict] = []

    def run(label: str, model, cfg, optimizer) -> None:
        for T in args.T:
            codes = random_codes(model, args.B, T, device)
            t, peak, act = measure(model, cfg, optimizer, codes, args.steps, args.warmup)
            n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
            rows.append({"T": T, "label": label, "time": t, "peak": peak, "act": act, "train": n_train})
            print(f"  measured {label:<22} T={T}: {t * 1e3:.0f} ms, peak {peak / GB:.2f} GB", flush=True)
            del codes

    cfg0 = bench_config(args.config, args.tiny, args.chunk, device, ttt=False)
    model = build(cfg0, device)
    n_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    optimizer, _ = build_optimizer(model, cfg0)
    run("no TTT", model, cfg0, optimizer)
    del model, optimizer
    free()

    cfg = bench_config(args.config, args.tiny, args.chunk, device, ttt=True)
    model = build(cfg, device)
    layers = sorted(ttt_layers(model))
    optimizer, _ = build_optimizer(model, cfg)
    for math in args.update:
        set_update_math(model, math)
        run(math, model, cfg, optimizer)
    if not args.no_frozen_w_down:
        del optimizer
        free()
        for g in ttt_layers(model).values():  # as build_model leaves a frozen w_down: bf16
            g.w_down.requires_grad_(False)
            g.w_down.grad = None
            g.w_down.data = g.w_down.data.to(torch.bfloat16)
        optimizer, _ = build_optimizer(model, cfg)
        set_update_math(model, "bf16")
        run("bf16, w_down frozen", model, cfg, optimizer)
    torch.backends.cuda.matmul.allow_tf32 = False
    del model, optimizer
    free()

    _print_table(rows, args, cfg, layers, n_params, device)
    return rows


def _print_table(
    rows: list[dict], args: argparse.Namespace, cfg, layers: list[int], n_params: int, device
) -> None:
    """The measured rows as a table, each as a multiple of the no-TTT row of its window."""
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"\n{'tiny' if args.tiny else 'Moshi-7B'} architecture, {n_params / 1e6:,.1f} M parameters + LoRA (random weights), "
        f"{args.config.name}: LoRA rank {cfg.lora.rank}, TTT layers {layers}, chunk {cfg.ttt.chunk_size}, "
        f"gradient checkpointing, bf16 autocast, B={args.B}, AdamW; torch {torch.__version__}, {where}"
    )
    header = (
        f"{'T':>6} {'update math':<22} | {'step ms':>9} {'x no TTT':>8} | {'peak GB':>8} {'x no TTT':>8} | "
        f"{'above held GB':>13} {'x no TTT':>8} | {'trainable M':>11}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        b = next(x for x in rows if x["T"] == r["T"] and x["label"] == "no TTT")
        mem = (
            f"{r['peak'] / GB:8.2f} {r['peak'] / b['peak']:8.3f} | {r['act'] / GB:13.2f} {r['act'] / b['act']:8.3f}"
            if device.type == "cuda"
            else f"{'-':>8} {'-':>8} | {'-':>13} {'-':>8}"
        )
        print(
            f"{r['T']:>6} {r['label']:<22} | {r['time'] * 1e3:9.1f} {r['time'] / b['time']:8.3f} | {mem} | "
            f"{r['train'] / 1e6:11.1f}"
        )
    print(
        f"targets: step time <= {TARGET_TIME:.2f}x and peak memory <= {TARGET_MEM:.2f}x the no-TTT (LoRA-only) step"
    )
    if device.type != "cuda":
        print(
            "(CPU: no memory figures; the bf16 update math is emulated in float32 on CPU, so its time is no guide)"
        )


def cli() -> None:
    """The command line (the table is printed; the rows :func:`main` returns are for tests)."""
    main()


if __name__ == "__main__":
    cli()
