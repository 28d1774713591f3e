"""Precision of In-Place TTT's update math under bf16, against a float64 reference.

Prints three tables of relative-RMS errors (``||a - ref|| / ||ref||``, as flash-linear-attention
reports low-precision kernels) and exits non-zero when a bf16 error exceeds its bound:

1. **The TTT term** alone: ``ttt_chunked`` with ``w0 = 0``, so its output is ``eta (M * Z Z^T) V``, on
   the bf16 ``z`` and ``v`` a gating computes under autocast, against ``ttt_reference`` in float64 on
   the same bf16 values (the error the update math adds), per ``update_precision`` and form: output,
   final state ``w_final``, ``dZ``, ``dV``. A last row gives how far those bf16 inputs already are from
   the float64 gating's ``z`` and ``v`` (what any bf16 run starts from).
2. **One InPlaceTTT** with float32 weights under bf16 autocast (how training runs on GPU) against the
   same gating in float64 with ``ttt_reference`` as its update math: the whole output and the
   gradients of the input, ``w_down``, the target path and ``linear_in``, per ``update_precision``,
   with ``eta`` set so that ``||TTT term|| / ||base term||`` (float64) takes each ``--ratio``.
3. **Streaming** (one step at a time, float32 ``delta`` state, bf16 autocast) against the training
   forward under bf16 autocast (``update_precision: bf16``) and against the float64 forward.

    python scripts/check_precision.py               # CPU: Moshi-7B's ratios at 1/4 scale
    python scripts/check_precision.py --device cuda --d 4096 --h 11264 --T 3000 --C 512

Defaults: d=1024, h=2816, T=750, C=128, B=1 (Moshi-7B's d, h, T = 3000 and C = 512 divided by 4, so
T / C, h / d and the number of tiles are Moshi-7B's). On CPU the bf16 products are emulated exactly
(bf16-rounded operands, float32 products and sums: what a tensor-core GEMM computes, up to summation
order); on CUDA they are native.

Bounds (bf16 unit roundoff u = 2^-8): table 1, every error <= 2u (a result is at most three bf16
roundings deep: a score or operand, ``eta dO``, the bf16 output; each <= u, independent); table 2,
``update_precision: bf16`` within 25% (+ u/8) of ``fp32`` on every column (the bf16 autocast gating's
own error, from ``linear_in`` and the bf16 output, is the baseline); table 3, streaming within 25%
(+ u/8) of the training forward's error, and the two within 2u of each other.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
from moshi.modules.gating import ActivationGating
from torch.nn import functional as F

from moshi_ttt import InPlaceTTT, TTTConfig
from moshi_ttt import inplace as inplace_mod
from moshi_ttt.ops import ttt_chunked, ttt_reference

U = 2.0**-8  # bf16 unit roundoff
FAILED: list[str] = []


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def bound(name: str, err: float, tol: float) -> str:
    if err > tol:
        FAILED.append(f"{name}: {err:.2e} > {tol:.1e}")
        return f"{err:9.2e}!"
    return f"{err:9.2e} "


def make_gating(d: int, h: int, C: int, device: torch.device, seed: int = 0) -> InPlaceTTT:
    """A TTT gating at the given shape with random weights of Moshi's scale and a nonzero target path."""
    torch.manual_seed(seed)
    plain = ActivationGating(d, int(1.5 * h), F.silu, device=device)
    with torch.no_grad():
        plain.linear_in.weight.normal_(std=d**-0.5)
        plain.linear_out.weight.normal_(std=h**-0.5)
    g = InPlaceTTT.from_gating(plain, TTTConfig(chunk_size=C, eta=1.0, target_source="hidden"))
    with torch.no_grad():
        g.target_conv.normal_(std=0.3)
        g.target_proj.add_(torch.randn_like(g.target_proj) * d**-0.5)
    return g


def _reference_op(z, v, w0, eta, chunk_size, **_):
    return ttt_reference(z, v, w0, eta, chunk_size)


def forward64(g64: InPlaceTTT, x: torch.Tensor, update: bool = True) -> torch.Tensor:
    """The float64 gating with the sequential specification as its update math."""
    orig, inplace_mod.ttt_chunked = inplace_mod.ttt_chunked, _reference_op
    try:
        g64.updates_enabled = update
        return g64(x)
    finally:
        g64.updates_enabled = True
        inplace_mod.ttt_chunked = orig


def _grads(out: torch.Tensor, gout: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad((out.to(gout.dtype) * gout).sum(), tensors))


def table_term(g: InPlaceTTT, g64: InPlaceTTT, x: torch.Tensor, eta: float) -> None:
    C = g.config.chunk_size
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16):
        z, v = g.activations(x), g.target(x)  # bf16, as the gating computes them in training
    with torch.no_grad():
        x64 = x.double()
        z64, v64 = g64.activations(x64), g64.target(x64)
    B, T, h = z.shape
    d = v.shape[2]
    w0 = torch.zeros(d, h, device=x.device)
    gen = torch.Generator(device=x.device).manual_seed(1)
    gout = torch.randn(B, T, d, generator=gen, device=x.device, dtype=torch.float64)
    zr, vr = (t.double().requires_grad_() for t in (z, v))
    ref_out, ref_w = ttt_reference(zr, vr, w0.double(), eta, C)
    ref = [ref_out, ref_w, *_grads(ref_out, gout, [zr, vr])]
    print(
        f"\n1. TTT term eta (M * Z Z^T) V alone (w0 = 0), bf16 z and v, vs ttt_reference (float64) on the "
        f"same values; bound 2u = {2 * U:.1e}"
    )
    print(f"{'update_precision':>16} {'form':>5} | {'output':>10} {'w_final':>10} {'dZ':>10} {'dV':>10}")
    for prec in ("fp32", "bf16"):
        for form in ("dual", "scan"):
            zc, vc = z.clone().requires_grad_(), v.clone().requires_grad_()
            out, wf = ttt_chunked(zc, vc, w0, eta, C, form=form, precision=prec)
            errs = [rel(a, b) for a, b in zip([out, wf, *_grads(out, gout, [zc, vc])], ref)]
            name = f"term {prec} {form}"
            cells = [bound(f"{name} {c}", e, 2 * U) for c, e in zip(("out", "w_final", "dZ", "dV"), errs)]
            print(f"{prec:>16} {form:>5} | " + " ".join(cells))
    print(
        f"{'bf16 inputs':>16} {'':>5} | {'':>10} {'':>10} {rel(z, z64):9.2e}  {rel(v, v64):9.2e}   (z, v vs float64)"
    )


GRAD_NAMES = ("dx", "w_down", "target_conv", "target_proj", "linear_in")


def _gating_grads(
    g: InPlaceTTT, x: torch.Tensor, out: torch.Tensor, gout: torch.Tensor
) -> list[torch.Tensor]:
    params = [g.w_down, g.target_conv, g.target_proj, g.linear_in.weight]
    return _grads(out, gout, [x, *params])


def etas_for(g64: InPlaceTTT, x: torch.Tensor, ratios: list[float]) -> list[float]:
    """The eta that gives each ``||TTT term|| / ||base term||`` (float64; the term is linear in eta)."""
    with torch.no_grad():
        g64.config.eta = 1.0
        base = forward64(g64, x.double(), update=False)
        unit = ((forward64(g64, x.double()) - base).norm() / base.norm()).item()
    return [r / unit for r in ratios]


def table_gating(
    g: InPlaceTTT, g64: InPlaceTTT, x: torch.Tensor, ratios: list[float], etas: list[float]
) -> None:
    x64 = x.double()
    gen = torch.Generator(device=x.device).manual_seed(2)
    gout = torch.randn(*x.shape, generator=gen, device=x.device, dtype=torch.float64)
    print(
        "\n2. one InPlaceTTT, float32 weights under bf16 autocast, vs the float64 gating (ttt_reference); "
        "bound on bf16 rows: 1.25 x fp32's + u/8"
    )
    print(
        f"{'TTT/base':>8} {'eta':>9} {'update_precision':>16} | {'output':>10} "
        + " ".join(f"{n:>10}" for n in GRAD_NAMES)
    )
    for ratio, eta in zip(ratios, etas):
        g.config.eta = g64.config.eta = eta
        xr = x64.clone().requires_grad_()
        out64 = forward64(g64, xr)
        ref = [out64, *_gating_grads(g64, xr, out64, gout)]
        rows = {}
        for prec in ("fp32", "bf16"):
            g.config.update_precision = prec
            xc = x.clone().requires_grad_()
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                out = g(xc)
            rows[prec] = [rel(a, b) for a, b in zip([out, *_gating_grads(g, xc, out, gout)], ref)]
        for prec, errs in rows.items():
            cells = []
            for col, e, e32 in zip(("output", *GRAD_NAMES), errs, rows["fp32"]):
                if prec == "fp32":  # the bf16 autocast gating as it was: the baseline of this table
                    cells.append(f"{e:9.2e} ")
                else:
                    cells.append(bound(f"gating ratio {ratio} {prec} {col}", e, 1.25 * e32 + U / 8))
            print(f"{ratio:8.2f} {eta:9.2e} {prec:>16} | " + " ".join(cells))
    g.config.update_precision = "bf16"


def table_streaming(g: InPlaceTTT, g64: InPlaceTTT, x: torch.Tensor, eta: float) -> None:
    g.config.eta = g64.config.eta = eta
    g.config.update_precision = "bf16"
    B, T, _ = x.shape
    with torch.no_grad():
        ref = forward64(g64, x.double())
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            train = g(x)
            with g.streaming(B):
                stream = torch.cat([g(x[:, t : t + 1]) for t in range(T)], 1)
    print(f"\n3. streaming, {T} steps one at a time (float32 delta, bf16 autocast), eta {eta:.2e}")
    e_train = rel(train, ref)
    print(f"  training forward (bf16 update math) vs float64: {e_train:9.2e}")
    e = rel(stream, ref)
    print(
        f"  streaming vs float64:                           {bound('stream vs fp64', e, 1.25 * e_train + U / 8)}"
    )
    print(
        f"  streaming vs training forward:                  {bound('stream vs train', rel(stream, train), 2 * U)}"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--h", type=int, default=2816)
    p.add_argument("--T", type=int, default=750)
    p.add_argument("--C", type=int, default=128)
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--ratio", type=float, nargs="+", default=[0.1, 1.0], help="||TTT term|| / ||base term||")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 rows mean float32
    where = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    )
    print(
        f"torch {torch.__version__}, {device.type} ({where}); d={args.d}, h={args.h}, T={args.T}, "
        f"C={args.C}, B={args.B}; relative RMS errors"
    )
    g = make_gating(args.d, args.h, args.C, device)
    g64 = copy.deepcopy(g).double()
    x = torch.randn(args.B, args.T, args.d, device=device)
    etas = etas_for(g64, x, args.ratio)
    table_term(g, g64, x, etas[0])
    table_gating(g, g64, x, args.ratio, etas)
    table_streaming(g, g64, x, etas[0])
    if FAILED:
        sys.exit(f"\n{len(FAILED)} error(s) above their bound: " + "; ".join(FAILED))
    print("\nall errors within their bounds")


if __name__ == "__main__":
    main()
