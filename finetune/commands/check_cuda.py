"""Correctness of the TTT layers on a GPU: fast forms, whole model, streaming, bf16.

The test suite runs on CPU; this script checks on a CUDA device what only a GPU can show, and exits
non-zero when a check fails:

1. ``ttt_chunked`` (dual and scan forms) on CUDA against ``ttt_reference`` in float64 on the CPU:
   outputs, final state and gradients, with float32 and bf16 inputs, and with bf16 inputs under
   ``update_precision`` fp32 (differs from the reference by input rounding only) and bf16 (within
   two bf16 roundings); then the native bf16 products (``bmm(..., out_dtype=float32)``) against their
   exact CPU emulation, which the CPU test suite checks;
2. a tiny TTT Moshi (both variants) on CUDA equals the unpatched model at init, and streaming it frame by frame
   (``model.streaming``) equals the full forward, in float32 and in bf16;
3. ``TTTLMGen`` with moshi's CUDA graphs generates the same greedy tokens as ``LMGen`` without
   graphs, and ends with the same fast weights;
4. a forward+backward under bf16 autocast (how training runs on GPU) leaves parameters unchanged and
   gives finite gradients to ``w_down`` and the target path.

    python scripts/check_cuda.py                  # needs a CUDA device
    python scripts/check_cuda.py --device cpu     # the same checks on the CPU (to debug the script)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys

import torch

from moshi_ttt import TTTConfig, apply_ttt, ttt_layers
from moshi_ttt.ops import ttt_chunked, ttt_reference
from moshi_ttt.tiny import build_tiny_lm

FAILED: list[str] = []


def check(name: str, err: float, tol: float) -> None:
    ok = err <= tol
    print(f"  {'ok  ' if ok else 'FAIL'} {name}: {err:.2e} (tolerance {tol:.0e})")
    if not ok:
        FAILED.append(name)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_ops(device: torch.device) -> None:
    print(f"ttt_chunked on {device.type} vs ttt_reference (float64, CPU), relative errors:")
    B, d, h, C, eta = 2, 64, 96, 16, 0.05
    T = 3 * C + 5
    g = torch.Generator().manual_seed(0)
    z64 = torch.randn(B, T, h, generator=g, dtype=torch.float64)
    v64 = torch.randn(B, T, d, generator=g, dtype=torch.float64)
    w64 = torch.randn(d, h, generator=g, dtype=torch.float64) * h**-0.5
    gout = torch.randn(B, T, d, generator=g, dtype=torch.float64)
    # bf16 inputs, update_precision fp32: input rounding only (the reference sees the same rounded
    # inputs); bf16: within two bf16 roundings (2u = 2^-7) of it, as tests/test_precision.py bounds on CPU.
    cases = ((torch.float32, "fp32", 1e-5), (torch.bfloat16, "fp32", 2e-2), (torch.bfloat16, "bf16", 2**-7))
    for dtype, precision, tol in cases:
        zr, vr, wr = (t.to(dtype).double().requires_grad_() for t in (z64, v64, w64))
        ref_out, ref_w = ttt_reference(zr, vr, wr, eta, C)
        ref_grads = torch.autograd.grad((ref_out * gout).sum(), (zr, vr, wr))
        for form in ("dual", "scan"):
            zc, vc, wc = (t.to(device=device, dtype=dtype).requires_grad_() for t in (z64, v64, w64))
            out, w_final = ttt_chunked(zc, vc, wc, eta, C, form=form, precision=precision)
            assert out.dtype == dtype, out.dtype
            grads = torch.autograd.grad((out.float() * gout.to(device, torch.float32)).sum(), (zc, vc, wc))
            name = f"{form} {str(dtype).removeprefix('torch.')} inputs, {precision} update"
            check(f"{name} output", rel(out, ref_out), tol)
            check(f"{name} final state", rel(w_final, ref_w), 1e-5)
            for n, a, b in zip(("z", "v", "w0"), grads, ref_grads):
                check(f"{name} grad {n}", rel(a, b), tol)


def check_native_bf16_products(device: torch.device) -> None:
    """bf16 update math on the device (``bmm(..., out_dtype=float32)``) vs its exact CPU emulation."""
    print(f"bf16 update math on {device.type} vs its emulation on the CPU, relative differences:")
    B, T, d, h, C = 2, 700, 256, 704, 128  # several tiles and a partial one, Moshi's h / d
    g = torch.Generator().manual_seed(3)
    z = (
        torch.nn.functional.silu(torch.randn(B, T, h, generator=g)) * torch.randn(B, T, h, generator=g)
    ).bfloat16()
    v = (torch.randn(B, T, d, generator=g) * 0.5).bfloat16()
    w0 = torch.randn(d, h, generator=g) * h**-0.5
    gout = torch.randn(B, T, d, generator=g)
    for form in ("dual", "scan"):
        res = []
        for dev in (torch.device("cpu"), device):
            zc, vc, wc = (t.to(dev).requires_grad_() for t in (z, v, w0))
            out, wf = ttt_chunked(zc, vc, wc, 0.01, C, form=form, precision="bf16")
            res.append(
                [out, wf, *torch.autograd.grad((out.float() * gout.to(dev)).sum() + wf.sum(), (zc, vc, wc))]
            )
        for n, a, b in zip(("output", "final state", "grad z", "grad v", "grad w0"), res[1], res[0]):
            check(f"{form} {n}", rel(a, b), 2**-10)


def _stream(model, seq):
    outs, logits = [], []
    for t in range(seq.shape[-1]):
        o, lg = model.forward_text(seq[:, :, t : t + 1])
        outs.append(o)
        logits.append(lg)
    return torch.cat(outs, 1), torch.cat(logits, 2)


def check_model(device: torch.device) -> None:
    print(f"tiny TTT Moshi on {device.type}:")
    B, T = 2, 45
    for variant, dtype, tol, precision in (
        ("inplace", torch.float32, 1e-4, "bf16"),
        ("inplace", torch.bfloat16, 3e-2, "fp32"),
        ("inplace", torch.bfloat16, 3e-2, "bf16"),
        ("mlp", torch.float32, 1e-4, "bf16"),
        ("mlp", torch.bfloat16, 3e-2, "bf16"),
    ):
        cfg = TTTConfig(chunk_size=8, eta=0.05, layers=[0, 2], variant=variant, update_precision=precision)
        name = f"{variant} {str(dtype).removeprefix('torch.')}"
        name += f" ({precision} update)" if variant == "inplace" else ""
        base = build_tiny_lm(seed=0, context=16, device=device, dtype=dtype).eval()
        model = apply_ttt(copy.deepcopy(base), cfg).eval()
        g = torch.Generator().manual_seed(1)
        text = torch.randint(0, model.text_card, (B, 1, T), generator=g)
        audio = torch.randint(0, model.card, (B, model.n_q, T), generator=g)
        seq = torch.cat([text, audio], 1).to(device)
        with torch.no_grad():
            at_init = rel(model.forward_text(seq)[1], base.forward_text(seq)[1])
            check(f"{name} equals the base model at init (text logits)", at_init, 0.0)
            gen = torch.Generator().manual_seed(2)
            for gating in ttt_layers(model).values():
                if variant == "mlp":  # open the residual gate, make the fast MLP's biases nonzero
                    gating.alpha.fill_(0.5)
                    gating.b1.copy_(torch.randn(gating.b1.shape, generator=gen).to(device) * 0.3)
                else:
                    gating.target_conv.copy_(
                        torch.randn(gating.target_conv.shape, generator=gen).to(device) * 0.3
                    )
                    gating.target_proj.add_(
                        torch.randn(gating.target_proj.shape, generator=gen).to(device) * 0.05
                    )
            full_out, full_logits = model.forward_text(seq)
            with model.streaming(B):
                out, logits = _stream(model, seq)
            moved = rel(full_logits, base.forward_text(seq)[1])
        print(f"  ({name}: the TTT layers move the text logits by {moved:.2e} relative)")
        if moved < 1e-3:
            FAILED.append(f"{name} TTT has no effect")
        check(f"{name} streaming == full forward (hidden)", rel(out, full_out), tol)
        check(f"{name} streaming == full forward (text logits)", rel(logits, full_logits), tol)


def check_graphs(device: torch.device) -> None:
    from moshi.models import LMGen
    from moshi.utils.compile import no_cuda_graph

    from moshi_ttt import TTTLMGen

    print(f"TTTLMGen with CUDA graphs vs LMGen without, greedy, 60 frames, batch 2 ({device.type}):")
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        model = apply_ttt(
            build_tiny_lm(seed=0, context=16, device=device, dtype=dtype),
            TTTConfig(chunk_size=8, eta=0.05, layers=[0, 2]),
        ).eval()
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for gating in ttt_layers(model).values():
                gating.target_conv.copy_(
                    torch.randn(gating.target_conv.shape, generator=gen).to(device) * 0.3
                )
        n_user = model.num_codebooks - model.dep_q - 1
        user = torch.randint(0, model.card, (60, 2, n_user, 1), generator=gen).to(device)
        runs = []
        for cls, graphs in ((LMGen, False), (TTTLMGen, True)):
            lm_gen = cls(model, use_sampling=False)
            outs = []
            with (
                torch.no_grad(),
                contextlib.nullcontext() if graphs else no_cuda_graph(),
                lm_gen.streaming(2),
            ):
                for t in range(60):
                    o = lm_gen.step(user[t])
                    if o is not None:
                        outs.append(o)
                gating = ttt_layers(model)[0]
                gating.prepare_graph_step()
                runs.append((torch.cat(outs, -1).cpu(), gating._streaming_state.delta.clone()))
        same = torch.equal(runs[0][0], runs[1][0])
        print(f"  {'ok  ' if same else 'FAIL'} {name} tokens identical ({runs[0][0].numel()} tokens)")
        if not same:
            FAILED.append(f"{name} TTTLMGen tokens")
        check(f"{name} final fast weight", rel(runs[1][1], runs[0][1]), 1e-5)


def check_autocast_step(device: torch.device) -> None:
    print(f"bf16 autocast forward+backward on {device.type} (float32 weights):")
    model = apply_ttt(
        build_tiny_lm(seed=0, context=16, device=device), TTTConfig(chunk_size=8, layers=[0, 2])
    )
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seq = torch.randint(0, model.card, (2, 1 + model.n_q, 40), device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = model(seq)
    loss = torch.nn.functional.cross_entropy(
        out.text_logits[out.text_mask].float(), seq[:, 0][out.text_mask[:, 0]].clamp_max(model.text_card - 1)
    )
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    check("parameters changed by the forward (count)", float(len(changed)), 0.0)
    loss.backward()
    for i, gating in ttt_layers(model).items():
        # At init the conv is zero, so W_target's gradient is zero too; the conv's is not.
        for pname, nonzero in (("w_down", True), ("target_conv", True), ("target_proj", False)):
            grad = getattr(gating, pname).grad
            ok = (
                grad is not None
                and bool(torch.isfinite(grad).all())
                and (not nonzero or grad.abs().sum() > 0)
            )
            print(f"  {'ok  ' if ok else 'FAIL'} layer {i} {pname} gradient finite{' and nonzero' * nonzero}")
            if not ok:
                FAILED.append(f"layer {i} {pname} gradient")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    device = torch.device(p.parse_args().device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("check_cuda.py needs a CUDA device (torch.cuda.is_available() is False); try --device cpu")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, {where}")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    check_ops(device)
    if device.type != "cpu":
        check_native_bf16_products(device)
    check_model(device)
    check_graphs(device)
    check_autocast_step(device)
    if FAILED:
        sys.exit(f"{len(FAILED)} check(s) failed: {', '.join(FAILED)}")
    print("all CUDA checks passed")


if __name__ == "__main__":
    main()
