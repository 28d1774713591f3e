"""Per-frame streaming latency of Moshi's LMGen with and without In-Place TTT layers.

    python scripts/bench_streaming.py                  # tiny model, then a layer-realistic one
    python scripts/bench_streaming.py --only tiny --steps 300
    python scripts/bench_streaming.py --device cuda --dtype bf16 --only layer --only moshi7b

For each model: the plain model streams ``--steps`` frames through ``LMGen.step`` (random user
codes, greedy), then the same weights with TTT layers (``apply_ttt``, random target path so updates
are non-trivial) stream the same frames. Printed: ms per 80 ms frame (mean, p50, p95, max) and the
TTT / plain ratio of means. A chunk's fast-weight update runs at its last frame, so ``max`` shows
that frame's extra cost (``C x d x h`` multiply-adds per TTT layer), which the mean spreads.

Models (random weights, fp32, CPU):
- ``tiny``: configs/tiny.yaml's model (d=128, 4 layers, TTT on 1 and 3, chunk 16);
- ``layer``: Moshi-7B's real layer shape (d=4096, h=11264, 32 heads, text vocabulary 32000) with 2
  transformer layers, TTT on layer 0 (half the layers, against 6 of 32 in the real configs), chunk 64
  so the run crosses several chunk ends;
- ``moshi7b``: the whole Moshi-7B architecture (32 layers, depformer 6 x 1024, 17 codebooks), TTT on
  layers 0, 6, ..., 30 as in ``configs/moshi7b_*.yaml``, chunk 64; about 7.7 B parameters, so for a
  GPU (``--device cuda --dtype bf16``, 16 GB).

The TTT model streams through :class:`moshi_ttt.TTTLMGen` (what ``scripts/infer.py`` uses). On
CUDA, frames are timed after a synchronisation, and both models are also streamed with moshi's CUDA
graphs (its default on GPU; TTTLMGen applies chunk-end updates between graph replays).
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import numpy as np
import torch
from moshi.models import LMGen, LMModel, loaders
from moshi.utils.compile import no_cuda_graph

from moshi_ttt import TTTConfig, TTTLMGen, apply_ttt, ttt_layers
from moshi_ttt.tiny import tiny_lm_kwargs

MODELS = {
    "tiny": dict(
        kwargs=dict(dim=128, num_layers=4, context=32, n_q=8, dep_q=4),
        ttt=dict(layers=[1, 3], chunk_size=16, eta=0.01),
    ),
    "layer": dict(
        kwargs=dict(
            dim=4096,
            num_layers=2,
            num_heads=32,
            context=3000,
            n_q=16,
            dep_q=8,
            card=2048,
            text_card=32000,
            depformer_dim=1024,
            depformer_num_layers=1,
        ),
        ttt=dict(layers=[0], chunk_size=64, eta=0.01),
    ),
    "moshi7b": dict(
        kwargs="moshi",  # moshi.models.loaders._lm_kwargs: Moshi-7B's own architecture
        ttt=dict(start_layer=0, layer_frequency=6, chunk_size=64, eta=0.01),
    ),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def stream(model, steps: int, warmup: int, seed: int = 0, cuda_graph: bool = False) -> np.ndarray:
    device = next(model.parameters()).device
    gen = TTTLMGen(model, use_sampling=False) if ttt_layers(model) else LMGen(model, use_sampling=False)
    n_user = model.n_q - model.dep_q
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, model.card, (steps + warmup, 1, n_user, 1), generator=g).to(device)
    times = []
    graphs = nullcontext() if cuda_graph else no_cuda_graph()
    with torch.no_grad(), graphs, gen.streaming(1):
        for i in range(steps + warmup):
            t0 = time.perf_counter()
            gen.step(codes[i])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append((time.perf_counter() - t0) * 1e3)
    return np.array(times[warmup:])


def fmt(t: np.ndarray) -> str:
    return (
        f"mean {t.mean():8.2f} | p50 {np.percentile(t, 50):8.2f} | p95 {np.percentile(t, 95):8.2f} | "
        f"max {t.max():8.2f}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=sorted(MODELS), action="append")
    p.add_argument("--steps", type=int, default=None, help="frames per run (default: 400 tiny, 200 layer)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    where = torch.cuda.get_device_name(device) if cuda else f"{torch.get_num_threads()} threads"
    print(
        f"torch {torch.__version__}, {device.type} ({where}), {args.dtype}, batch 1, greedy; ms per 80 ms frame"
    )
    for name in args.only or ["tiny", "layer"]:
        spec = MODELS[name]
        steps = args.steps or (400 if name == "tiny" else 200)
        torch.manual_seed(0)
        kwargs = dict(loaders._lm_kwargs) if spec["kwargs"] == "moshi" else tiny_lm_kwargs(**spec["kwargs"])
        model = LMModel(device=device, dtype=DTYPES[args.dtype], **kwargs).eval()
        n_params = sum(p.numel() for p in model.parameters())
        graphed = stream(model, steps, args.warmup, cuda_graph=True) if cuda else None
        plain = stream(model, steps, args.warmup)
        apply_ttt(model, TTTConfig(**spec["ttt"]))
        with torch.no_grad():
            for g in ttt_layers(model).values():
                g.target_conv.normal_(std=0.1)
        ttt_graphed = stream(model, steps, args.warmup, cuda_graph=True) if cuda else None
        ttt = stream(model, steps, args.warmup)
        print(f"\n{name}: {n_params / 1e6:.1f} M parameters, {steps} frames, TTT {spec['ttt']}")
        if graphed is not None:
            print(f"  plain, CUDA graphs {fmt(graphed)}")
            print(f"  TTT,   CUDA graphs {fmt(ttt_graphed)}")
        print(f"  plain {fmt(plain)}")
        print(f"  TTT   {fmt(ttt)}")
        if graphed is not None:
            print(
                f"  TTT / plain with CUDA graphs: mean {ttt_graphed.mean() / graphed.mean():.3f}x, "
                f"p50 {np.median(ttt_graphed) / np.median(graphed):.3f}x"
            )
        print(
            f"  TTT / plain: mean {ttt.mean() / plain.mean():.3f}x, p50 {np.median(ttt) / np.median(plain):.3f}x"
        )
        del model


if __name__ == "__main__":
    main()
