"""Per-frame cost of the conversation server's batch step, by number of slots.

    python scripts/bench_serve.py --random tiny --batch-sizes 1 4            # CPU, no checkpoint needed
    python scripts/bench_serve.py runs/tiny --batch-sizes 1 4                # a run or checkpoint
    python scripts/bench_serve.py --random moshi7b --device cuda --dtype bf16 --batch-sizes 1 4 8

Times what the server's worker does for every 80 ms frame (``finetune.serving.server``): Mimi encode of every
slot's frame, the TTTLMGen step (CUDA graphs on GPU), Mimi decode, and the Opus encoding of each slot's
reply, with every slot talking (noise input, sampling as served). Printed per batch size: ms per step
(mean, p50, p95, max) and frames per second per slot against the 12.5 Hz real-time rate; the step
must stay under 80 ms for every slot to be served in real time (p95 and max show chunk-end frames).

``--random``: random weights, no download: ``tiny`` is configs/tiny.yaml's model (TTT on layers 1
and 3, chunk 16) with the tiny Mimi of the generated dataset; ``moshi7b`` is Moshi-7B's architecture
with TTT on layers 0, 6, ..., 30 (chunk 512, as configs/moshi7b_*.yaml) and Mimi's real architecture
(about 7.7 B parameters: a GPU job).

``--check-graphs`` (GPU): first streams the same scenario (slots joining at different frames, random
exec masks, one slot reset mid-way for a new caller, greedy) with and without CUDA graphs and checks
that every slot gets the same text tokens and voice; exit status 1 if not.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from finetune.data.audio import FRAME_RATE
from finetune.serving.inference import GREEDY
from finetune.serving.server import DTYPES, SlotBatch

RANDOM = {
    "tiny": dict(
        lm=dict(dim=128, num_layers=4, context=32, n_q=8, dep_q=4), ttt=dict(layers=[1, 3], chunk_size=16)
    ),
    "moshi7b": dict(lm="moshi", ttt=dict(start_layer=0, layer_frequency=6, chunk_size=512)),
}


def random_model(name: str, device: torch.device, dtype: torch.dtype):
    from moshi.models import LMModel, loaders

    from finetune.data.audio import tiny_mimi_config
    from moshi_ttt import TTTConfig, apply_ttt, ttt_layers
    from moshi_ttt.tiny import tiny_lm_kwargs

    spec = RANDOM[name]
    torch.manual_seed(0)
    kwargs = dict(loaders._lm_kwargs) if spec["lm"] == "moshi" else tiny_lm_kwargs(**spec["lm"])
    lm = LMModel(device=device, dtype=dtype, **kwargs).eval()
    apply_ttt(lm, TTTConfig(eta=0.01, **spec["ttt"]))
    with torch.no_grad():
        for g in ttt_layers(lm).values():  # a non-zero target path: updates are real work
            g.target_conv.normal_(std=0.1)
    codebooks = max(lm.dep_q, lm.n_q - lm.dep_q)
    mimi_cfg = tiny_mimi_config() if name == "tiny" else None
    mimi = loaders.get_mimi(None, mimi_cfg, device=device, num_codebooks=codebooks).eval()
    return lm, mimi


def bench(lm, mimi, batch_size: int, frames: int, warmup: int, cuda_graphs: bool, seed: int):
    """Wall-clock and this thread's CPU time (ms) of each step."""
    import sphn

    batch = SlotBatch(lm, mimi, batch_size, cuda_graphs=cuda_graphs)
    try:
        batch.warmup(warmup)
        writers = [sphn.OpusStreamWriter(batch.sample_rate) for _ in range(batch_size)]
        rng = np.random.default_rng(seed)
        active = np.ones(batch_size, dtype=bool)
        first = active.copy()
        times, cpu = [], []
        for f in range(frames):
            pcm = (0.1 * rng.standard_normal((batch_size, batch.frame_size))).astype(np.float32)
            t0, c0 = time.perf_counter(), time.thread_time()
            out = batch.step(pcm, active, first if f == 0 else None)  # ends with a device-to-host copy
            for b in np.flatnonzero(out.valid):
                writers[b].append_pcm(out.pcm[b])
            times.append((time.perf_counter() - t0) * 1e3)
            cpu.append((time.thread_time() - c0) * 1e3)
        skip = batch.max_delay + 1
        return np.array(times[skip:]), np.array(cpu[skip:])
    finally:
        batch.close()


def graphs_scenario(lm, mimi, batch_size: int, frames: int, cuda_graphs: bool, seed: int):
    """Greedy text tokens ([frames, B], -1 where no output) and voice of a masked, staggered scenario."""
    batch = SlotBatch(lm, mimi, batch_size, GREEDY, cuda_graphs=cuda_graphs)
    try:
        batch.warmup()
        rng = np.random.default_rng(seed)
        F = batch.frame_size
        started = np.zeros(batch_size, dtype=bool)
        texts, voices = [], []
        for f in range(frames):
            if f == frames // 2:  # slot 0's caller leaves, a new one takes the slot
                batch.reset(np.arange(batch_size) == 0)
                started[0] = False
            active = (rng.random(batch_size) < 0.7) & (np.arange(batch_size) * 3 <= f)
            pcm = (0.1 * rng.standard_normal((batch_size, F))).astype(np.float32)
            out = batch.step(pcm, active, active & ~started)
            started |= active
            texts.append(np.where(out.valid, out.text, -1))
            voices.append(out.pcm)
        return np.stack(texts), np.stack(voices)
    finally:
        batch.close()


def check_graphs(lm, mimi, batch_size: int, frames: int, seed: int) -> bool:
    plain_text, plain_voice = graphs_scenario(lm, mimi, batch_size, frames, False, seed)
    graph_text, graph_voice = graphs_scenario(lm, mimi, batch_size, frames, True, seed)
    same_text = np.array_equal(plain_text, graph_text)
    diff = float(np.abs(plain_voice - graph_voice).max())
    ok = same_text and diff < 1e-3
    if lm.device.type != "cuda":
        print("(not a GPU: both runs below are without CUDA graphs)")
    print(
        f"CUDA graphs vs none, {batch_size} slots, {frames} frames (staggered joins, random masks, a reset): "
        f"text tokens {'equal' if same_text else 'DIFFER'}, max voice difference {diff:.2e} -> "
        f"{'OK' if ok else 'FAIL'}"
    )
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="a run or checkpoint directory (or use --random)")
    p.add_argument("--random", choices=sorted(RANDOM), help="random weights instead of a checkpoint")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    p.add_argument("--frames", type=int, default=200, help="timed steps per batch size")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="LM dtype (default: bf16 on GPU, fp32 on CPU)"
    )
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check-graphs", action="store_true", help="first check CUDA graphs against none (GPU)")
    args = p.parse_args()
    if (args.checkpoint is None) == (args.random is None):
        p.error("give a checkpoint or --random, not both")
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.random:
        lm, mimi = random_model(args.random, device, dtype)
        what = f"random {args.random}"
    else:
        from finetune.serving.inference import load_checkpoint_model

        loaded = load_checkpoint_model(args.checkpoint, device, dtype=dtype)
        lm, mimi, what = loaded.lm, loaded.mimi, str(loaded.checkpoint)
    graphs = device.type == "cuda" and not args.no_cuda_graphs
    where = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    )
    n_params = sum(p.numel() for p in lm.parameters())
    print(
        f"{what}: {n_params / 1e6:.1f} M LM parameters | torch {torch.__version__}, {device.type} ({where}), "
        f"{str(dtype).removeprefix('torch.')}, CUDA graphs {'on' if graphs else 'off'} | {args.frames} frames"
    )
    if args.check_graphs and not check_graphs(lm, mimi, max(args.batch_sizes), 60, args.seed):
        return 1
    cpu_col = device.type == "cpu"  # CPU time per step: less sensitive than wall time to a shared machine
    print(
        f"slots | ms per step: mean    p50    p95    max | frames/s per slot (real time {FRAME_RATE:g}) | x real time"
        + (" | CPU ms per step" if cpu_col else "")
    )
    for B in args.batch_sizes:
        t, c = bench(lm, mimi, B, args.frames, args.warmup, graphs, args.seed)
        fps = 1e3 / t.mean()
        print(
            f"{B:5d} | {t.mean():18.2f} {np.percentile(t, 50):6.2f} {np.percentile(t, 95):6.2f} {t.max():6.2f} | "
            f"{fps:34.1f} | {fps / FRAME_RATE:11.2f}" + (f" | {c.mean():15.2f}" if cpu_col else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
