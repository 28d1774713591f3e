"""Benchmark one TTT gating against Moshi's plain gating and the per-chunk-weight form.

Prints, for each (T, C): forward+backward time and activation bytes saved for backward of

- ``plain``: moshi's ``ActivationGating`` (the MLP a TTT layer replaces),
- ``ttt``: :class:`moshi_ttt.InPlaceTTT` with ``fast_form=auto`` (plus ``dual`` / ``scan`` forced), once
  per update math in ``--update``: ``fp32`` (float32 products), ``tf32`` (the same with TF32 matmuls
  allowed) and ``bf16`` (``ttt.update_precision: bf16``: bf16 operands, float32 sums; it only differs
  from ``fp32`` under ``--amp bf16``, and on CPU it is emulated in float32, so time it on a GPU),
- ``per-chunk``: the same TTT gating computed the way an earlier attempt did, materialising one
  ``[d, h]`` weight per chunk (``einsum`` deltas, ``cumsum``, batched matmul),

as ratios, then the saved-activation figure at Moshi-7B's real shape computed on the meta device.
Saved bytes are counted with ``torch.autograd.graph.saved_tensors_hooks`` (each storage once,
parameters excluded). Timings are medians; these machines are shared, so read ratios, not absolutes.

    python scripts/bench_ttt.py                 # the default grid (d=1024, h=2816, B=1, fp32)
    python scripts/bench_ttt.py --T 768 --C 128 --reps 5
    python scripts/bench_ttt.py --device cuda --amp bf16 --d 4096 --h 11264 --T 3000 --C 128 512 \
        --update fp32 tf32 bf16

On CUDA, ``--amp bf16`` runs the forward under bf16 autocast with float32 weights (how training runs),
and a column gives the peak CUDA memory of forward+backward above the inputs and weights.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from contextlib import contextmanager, nullcontext

import torch
from moshi.modules.gating import ActivationGating
from torch.nn import functional as F

from moshi_ttt import InPlaceTTT, TTTConfig
from moshi_ttt import inplace as inplace_mod
from moshi_ttt.ops import choose_form


def ttt_per_chunk_weights(z, v, w0, eta, chunk_size, *, form=None, return_final=False, precision=None):
    """The earlier attempt's parallel form: one fast weight per chunk, all held at once."""
    B, T, h = z.shape
    d = v.shape[2]
    n = math.ceil(T / chunk_size)
    pad = n * chunk_size - T
    zf, vf = F.pad(z.float(), (0, 0, 0, pad)), F.pad(v.float(), (0, 0, 0, pad))
    zc = zf.view(B, n, chunk_size, h)
    vc = vf.view(B, n, chunk_size, d)
    deltas = torch.einsum("bncd,bnch->nbdh", vc, zc)  # [n, B, d, h]
    prefix = torch.cat([torch.zeros_like(deltas[:1]), deltas.cumsum(0)[:-1]], 0)
    w = w0.float() + eta * prefix  # [n, B, d, h]
    out = torch.einsum("bnch,nbdh->bncd", zc, w).reshape(B, n * chunk_size, d)[:, :T]
    return out.to(z.dtype), None


@contextmanager
def count_saved(params):
    """Bytes of the distinct non-parameter storages autograd saves for backward."""
    param_ids = {id(p) for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        base = t if t._base is None else t._base
        if id(base) not in param_ids and id(t) not in param_ids:
            seen[id(base)] = base.numel() * base.element_size()
        return t

    box = {}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield box
    box["bytes"] = sum(seen.values())


def make_modules(d, h, C, eta, device="cpu", form="auto"):
    device = str(device)
    plain = ActivationGating(d, int(1.5 * h), F.silu, device=device)  # hidden = 2/3 * dim_ff = h
    assert plain.linear_out.weight.shape == (d, h), plain.linear_out.weight.shape
    if device != "meta":
        torch.nn.init.normal_(plain.linear_in.weight, std=d**-0.5)
        torch.nn.init.normal_(plain.linear_out.weight, std=h**-0.5)
    cfg = TTTConfig(chunk_size=C, eta=eta, fast_form=form, target_source="hidden")
    ttt = InPlaceTTT.from_gating(plain, cfg)
    if device != "meta":
        with torch.no_grad():
            ttt.target_conv.normal_(std=0.1)
    return plain, ttt


def run_once(module, x, op=None, amp=None):
    """One forward+backward; returns saved bytes."""
    params = list(module.parameters())
    if op is not None:
        orig = inplace_mod.ttt_chunked
        inplace_mod.ttt_chunked = op
    try:
        autocast = torch.autocast(x.device.type, dtype=amp) if amp is not None else nullcontext()
        with count_saved(params) as box, autocast:
            y = module(x)
    finally:
        if op is not None:
            inplace_mod.ttt_chunked = orig
    if x.device.type != "meta":
        y.backward(torch.ones_like(y))
    return box["bytes"]


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(module, x, reps, op=None, amp=None):
    """Median seconds of forward+backward, saved bytes, and (CUDA) peak bytes above the start."""
    run_once(module, x, op, amp)  # warm-up
    times, peak = [], 0
    for _ in range(reps):
        module.zero_grad(set_to_none=True)
        sync(x.device)
        if x.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(x.device)
            start = torch.cuda.memory_allocated(x.device)
        t0 = time.perf_counter()
        saved = run_once(module, x, op, amp)
        sync(x.device)
        times.append(time.perf_counter() - t0)
        if x.device.type == "cuda":
            peak = max(peak, torch.cuda.max_memory_allocated(x.device) - start)
    return statistics.median(times), saved, peak


def set_update_math(module: InPlaceTTT, math: str) -> None:
    """``fp32`` / ``tf32`` / ``bf16`` update math (tf32: the global matmul flag, as ``tf32: true`` sets)."""
    torch.backends.cuda.matmul.allow_tf32 = math == "tf32"
    module.config.update_precision = "bf16" if math == "bf16" else "fp32"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--h", type=int, default=2816)
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--T", type=int, nargs="+", default=[768, 2048])
    p.add_argument("--C", type=int, nargs="+", default=[128, 512])
    p.add_argument("--eta", type=float, default=1e-3)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-forms", action="store_true", help="skip the forced dual / scan rows")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--amp", choices=["bf16"], default=None, help="bf16 autocast (float32 weights)")
    p.add_argument("--no-chunk-w", action="store_true", help="skip the per-chunk-weight form")
    p.add_argument(
        "--update",
        nargs="+",
        choices=["fp32", "tf32", "bf16"],
        default=None,
        help="TTT update math (default: fp32, and bf16 with --amp bf16; without it they compute the same)",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    args.update = args.update or (["fp32", "bf16"] if args.amp else ["fp32"])
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device(args.device)
    amp = torch.bfloat16 if args.amp == "bf16" else None
    torch.manual_seed(0)
    where = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"threads {torch.get_num_threads()}"
    )
    print(
        f"torch {torch.__version__}, {device.type} ({where}), {args.amp or 'fp32'}, "
        f"d={args.d}, h={args.h}, B={args.B}"
    )
    cuda = device.type == "cuda"
    header = (
        f"{'T':>5} {'C':>4} {'math':>4} {'form':>5} | {'plain ms':>8} {'ttt ms':>8} {'chunk-W ms':>10} | "
        f"{'ttt/plain t':>11} {'chunk-W/ttt t':>13} | {'plain MB':>8} {'ttt MB':>7} {'chunk-W MB':>10} "
        f"{'ttt/plain mem':>13}"
        + (f" | {'peak plain':>10} {'peak ttt':>8} {'peak chunk-W':>12}" if cuda else "")
    )
    print(header)
    print("-" * len(header))
    for T in args.T:
        for C in args.C:
            plain, ttt = make_modules(args.d, args.h, C, args.eta, device=device)
            x = torch.randn(args.B, T, args.d, device=device)
            tp, mp, pp = timed(plain, x, args.reps, amp=amp)
            nan = float("nan")
            tn, mn, pn = (
                (nan, nan, nan)
                if args.no_chunk_w
                else timed(ttt, x, max(2, args.reps // 2), op=ttt_per_chunk_weights, amp=amp)
            )
            forms = ["auto"] if args.no_forms else ["auto", "dual", "scan"]
            for upd in args.update:
                set_update_math(ttt, upd)
                for form in forms:
                    ttt.config.fast_form = form
                    tt, mt, pt = timed(ttt, x, args.reps, amp=amp)
                    shown = form if form != "auto" else "auto:" + choose_form(T, args.d, args.h)[0]
                    print(
                        f"{T:>5} {C:>4} {upd:>4} {shown:>5} | {tp * 1e3:8.1f} {tt * 1e3:8.1f} {tn * 1e3:10.1f} | "
                        f"{tt / tp:11.2f} {tn / tt:13.2f} | {mp / 2**20:8.1f} {mt / 2**20:7.1f} {mn / 2**20:10.1f} "
                        f"{mt / mp:13.2f}"
                        + (f" | {pp / 2**20:10.1f} {pt / 2**20:8.1f} {pn / 2**20:12.1f}" if cuda else "")
                    )
            torch.backends.cuda.matmul.allow_tf32 = False
            del plain, ttt, x
    _print_moshi7b_activations(args.eta)


def _print_moshi7b_activations(eta: float) -> None:
    """Moshi-7B's real MLP shape, on the meta device: no memory is allocated, no time is measured."""
    d, h, T = 4096, 11264, 3000
    print(f"\nMoshi-7B layer shape on meta (d={d}, h={h}, T={T}, B=1), activation bytes saved for backward:")
    for dtype in (torch.float32, torch.bfloat16):  # a bf16 model stands for bf16 autocast here
        for C in (256, 512):
            plain, ttt = make_modules(d, h, C, eta, device="meta")
            plain, ttt = plain.to(dtype), ttt.to(dtype)
            x = torch.empty(1, T, d, device="meta", dtype=dtype)
            mp = run_once(plain, x)
            mn = run_once(ttt, x, op=ttt_per_chunk_weights)
            cells = []
            for prec in ("fp32", "bf16") if dtype == torch.bfloat16 else ("fp32",):
                ttt.config.update_precision = prec
                mt = run_once(ttt, x)
                cells.append(f"ttt ({prec} update) {mt / 2**20:8.1f} MB ({mt / mp:.2f}x)")
            print(
                f"  {str(dtype).removeprefix('torch.'):>8} C={C:4d}: plain {mp / 2**20:8.1f} MB | "
                + " | ".join(cells)
                + f" | per-chunk weights {mn / 2**20:9.1f} MB ({mn / mp:.1f}x)"
            )


if __name__ == "__main__":
    main()
