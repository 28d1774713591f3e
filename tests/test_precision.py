"""bf16 update math (``TTTConfig.update_precision``, ``ttt_chunked(precision=...)``) against the float64
reference: the op, one gating, a streaming model, and the precision script.

Tolerances are in bf16's unit roundoff u = 2^-8. Against the reference on the *same* bf16 inputs, a
result of the bf16 update math is at most three bf16 roundings deep (a score tile or operand, ``eta dO``,
the bf16 output), each at most u and independent, so its relative RMS error stays below 2u (measured
0.6u for outputs, 0.9u for gradients). The float32 state never meets a bf16 accumulator: it matches to float32 rounding.
Against float64 *weights* (a whole gating or model under bf16 autocast), every bf16 product of the
layer counts, whatever ``update_precision``; there the bf16 setting must stay within 25% (+ u/8) of the
float32 setting's error (measured: within 12%).
"""

import copy
import sys

import pytest
import torch
from conftest import ROOT, random_codes, randomize_ttt
from torch.nn import functional as F

from moshi_ttt import TTTConfig, apply_ttt
from moshi_ttt.ops import ttt_chunked, ttt_reference
from moshi_ttt.tiny import build_tiny_lm

pytestmark = pytest.mark.numerics  # precision modes against each other and a float64 reference

U = 2.0**-8


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _bf16_inputs(B, T, d, h, shared=True, seed=0):
    """bf16 activations shaped like Moshi's (silu(a) * b), bf16 targets, a float32 w0."""
    g = torch.Generator().manual_seed(seed)
    z = (F.silu(torch.randn(B, T, h, generator=g)) * torch.randn(B, T, h, generator=g)).bfloat16()
    v = (torch.randn(B, T, d, generator=g) * 0.5).bfloat16()
    w0 = torch.randn(*(() if shared else (B,)), d, h, generator=g) * h**-0.5
    return z, v, w0


def _run(z, v, w0, eta, C, go, gw, **kw):
    """Output, final state and the gradients of z, v, w0 for ``<out, go> + <w_final, gw>``."""
    z, v, w0 = (t.detach().clone().requires_grad_() for t in (z, v, w0))
    fn = ttt_reference if kw.pop("reference", False) else ttt_chunked
    out, wf = fn(z, v, w0, eta, C, **kw)
    loss = (out.to(go.dtype) * go).sum() + (wf.to(gw.dtype) * gw).sum()
    return (out, wf, *torch.autograd.grad(loss, [z, v, w0]))


def _errors(z, v, w0, eta, C, precision, form, seed=1):
    g = torch.Generator().manual_seed(seed)
    B, T, h = z.shape
    d = v.shape[2]
    go = torch.randn(B, T, d, generator=g, dtype=torch.float64)
    gw = torch.randn(B, d, h, generator=g, dtype=torch.float64)
    ref = _run(z.double(), v.double(), w0.double(), eta, C, go, gw, reference=True)
    fast = _run(z, v, w0, eta, C, go.float(), gw.float(), form=form, precision=precision)
    return [_rel(a, b) for a, b in zip(fast, ref)], fast


@pytest.mark.parametrize("form", ["dual", "scan"])
@pytest.mark.parametrize("C, T", [(16, 300), (64, 200), (48, 37)])  # tiles of 4 chunks, of 1, one partial
@pytest.mark.parametrize("shared", [True, False])
def test_bf16_ttt_term_within_two_roundings_of_the_reference(form, C, T, shared):
    """The TTT term alone (w0 = 0, so the output is eta (M * Z Z^T) V) on bf16 inputs."""
    z, v, w0 = _bf16_inputs(2, T, 24, 66, shared)
    w0 = torch.zeros_like(w0)
    errs, fast = _errors(z, v, w0, 0.02, C, "bf16", form)
    names = ("out", "w_final", "dz", "dv", "dw0")
    for name, e in zip(names, errs):
        tol = 1e-5 if name == "w_final" else 2 * U  # the state: float32 sums of exact products
        assert e < tol, (name, e)
    assert fast[0].dtype == torch.bfloat16 and fast[1].dtype == torch.float32
    # The setting is in effect: float32 operands give other values (rounded scores are not exact).
    errs32, fast32 = _errors(z, v, w0, 0.02, C, "fp32", form)
    if T > C:  # with one chunk there is no TTT term and both are exact zeros
        assert not torch.equal(fast[0], fast32[0]) and not torch.equal(fast[2], fast32[2])
        assert errs[2] > errs32[2]  # dz: the rounded scores and dO add error...
    assert errs[2] < 2 * errs32[2] + U / 8  # ...of the size of the roundings fp32 mode has too


@pytest.mark.parametrize("form", ["dual", "scan"])
def test_bf16_leaves_the_base_term_and_the_state_alone(form):
    """With a real w0: the base term and its gradients are the bf16 linear_out in both settings, the
    state and dw0 (base term + dLoss/dw_final) are identical, the output within 2u of the reference."""
    z, v, w0 = _bf16_inputs(2, 150, 24, 66, shared=True)
    errs, fast = _errors(z, v, w0, 0.02, 16, "bf16", form)
    _, fast32 = _errors(z, v, w0, 0.02, 16, "fp32", form)
    assert max(errs[0], errs[2], errs[3]) < 2 * U and errs[1] < 1e-5
    assert torch.equal(fast[4], fast32[4])  # dw0
    torch.testing.assert_close(fast[1], fast32[1], atol=0, rtol=1e-6)  # w_final, float32


def test_bf16_error_does_not_grow_with_the_number_of_chunks():
    """Nothing rounded accumulates across chunks: 24 tiles are as precise as 2."""
    z, v, w0 = _bf16_inputs(1, 1536, 8, 22, seed=3)
    w0 = torch.zeros_like(w0)
    short, _ = _errors(z[:, :128], v[:, :128], w0, 0.05, 64, "bf16", "dual")
    long, _ = _errors(z, v, w0, 0.05, 64, "bf16", "dual")
    for name, a, b in zip(("out", "w_final", "dz", "dv"), short, long):
        assert b < 1.5 * a + U / 16, (name, a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_wide_inputs_compute_the_same_in_both_settings(dtype):
    z, v, w0 = (t.to(dtype) for t in _bf16_inputs(2, 90, 6, 10))
    g = torch.Generator().manual_seed(0)
    go, gw = torch.randn(2, 90, 6, generator=g, dtype=dtype), torch.randn(2, 6, 10, generator=g, dtype=dtype)
    for form in ("dual", "scan"):
        a = _run(z, v, w0, 0.1, 8, go, gw, form=form, precision="fp32")
        b = _run(z, v, w0, 0.1, 8, go, gw, form=form, precision="bf16")
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_bf16_on_meta_runs_forward_and_backward():
    """The native path (``bmm(..., out_dtype=float32)``, what CUDA runs) keeps shapes and dtypes."""
    z = torch.empty(2, 130, 16, device="meta", dtype=torch.bfloat16, requires_grad=True)
    v = torch.empty(2, 130, 8, device="meta", dtype=torch.bfloat16, requires_grad=True)
    w0 = torch.empty(8, 16, device="meta", requires_grad=True)
    for form in ("dual", "scan"):
        out, wf = ttt_chunked(z, v, w0, 0.1, 16, form=form, precision="bf16")
        assert out.dtype == torch.bfloat16 and wf.dtype == torch.float32 and wf.shape == (2, 8, 16)
        dz, dv, dw = torch.autograd.grad(out.float().sum() + wf.sum(), [z, v, w0])
        assert (dz.dtype, dv.dtype, dw.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)


def test_rejects_unknown_precision():
    z, v, w0 = torch.randn(1, 3, 6), torch.randn(1, 3, 4), torch.randn(4, 6)
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16"):
        ttt_chunked(z, v, w0, 0.1, 2, precision="fp16")
    with pytest.raises(ValueError, match="TTTConfig.update_precision"):
        TTTConfig(update_precision="tf32")


def test_update_precision_under_cpu_autocast_rounds_only_the_ttt_term_operands():
    """What ``update_precision`` changes on a CPU, native bf16 or not: under bf16 autocast the
    gating's ``z`` and ``v`` are bf16; the op turns autocast off and multiplies in float32 (MKL), the
    ``bf16`` setting first rounding its intermediate operands (score tiles ``Z Z^T``, the scan state)
    to bf16. So the CPU's own bf16 matmuls never run the update math, and the two settings differ by
    at most that rounding, derived here element by element:

    - the TTT term is ``eta sum_j A_ij V_j`` with ``A = Z_i . Z_j`` (chunk(j) < chunk(i)); rounding
      ``A`` (or the scan state ``sum_j V_j^T Z_j``) to bf16 moves it by at most ``u`` relative, so
      the term moves by at most ``u eta ((M * |Z| |Z|^T) |V|)``, plus float32 summation error in
      either setting (``n eps``, ``n = T + h`` terms, ``eps = 2^-24``);
    - the base term ``Z W0^T`` is the same bf16 linear in both settings;
    - each output is rounded once to bf16: ``|out - y| <= u |y| <= u / (1 - u) |out|``.
    """
    base = build_tiny_lm(seed=0, context=16)
    model = apply_ttt(base, TTTConfig(chunk_size=8, eta=0.2, layers=[1]))
    randomize_ttt(model)
    gating = model.transformer.layers[1].gating
    g = torch.Generator().manual_seed(3)
    B, T = 2, 40
    x = torch.randn(B, T, gating.dim, generator=g)
    src = torch.randn(B, T, gating.dim, generator=g)
    outs = {}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        z = gating.activations(x)
        v = gating.update_target(src, z)
        for prec in ("fp32", "bf16"):
            gating.config.update_precision = prec
            outs[prec] = gating(x, src)
    assert z.dtype == v.dtype == outs["bf16"].dtype == torch.bfloat16  # the emulation is in effect
    a, b = outs["fp32"].double(), outs["bf16"].double()
    assert not torch.equal(a, b)  # the setting reaches the layer (and the TTT term is not negligible)
    zd, vd = z.double(), v.double()
    cid = torch.arange(T) // gating.config.chunk_size
    M = (cid[None, :] < cid[:, None]).double()  # [T, T]: chunk(j) strictly before chunk(i)
    reach = gating.config.eta * (M * (zd.abs() @ zd.abs().transpose(1, 2))) @ vd.abs()  # [B, T, d]
    eps = 2.0**-24
    bound = (U + 2 * (T + z.shape[-1]) * eps) * reach + (U + 2 * eps) / (1 - U) * (a.abs() + b.abs())
    assert ((a - b).abs() <= bound).all(), ((a - b).abs() / bound).max()


def _gating_errors(model64, model, codes, precision):
    """Relative errors of the text logits and of every TTT gradient vs the float64 model."""
    from moshi_ttt import gating as gating_mod

    out64 = model64.forward_text(codes)[1]
    names = [n for n, _ in model.named_parameters() if "target_" in n or "w_down" in n]
    go = torch.randn(out64.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    orig = gating_mod.ttt_chunked
    gating_mod.ttt_chunked = lambda z, v, w0, eta, C, **_: ttt_reference(z, v, w0, eta, C)
    try:  # the float64 model runs the sequential specification
        ref = torch.autograd.grad(
            (model64.forward_text(codes)[1] * go).sum(), [model64.get_parameter(n) for n in names]
        )
    finally:
        gating_mod.ttt_chunked = orig
    for g in model.transformer.layers:
        if hasattr(g.gating, "config"):
            g.gating.config.update_precision = precision
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.forward_text(codes)[1]
    grads = torch.autograd.grad((out.double() * go).sum(), [model.get_parameter(n) for n in names])
    return [_rel(out, out64.detach())] + [_rel(a, b) for a, b in zip(grads, ref)], out


def test_model_under_bf16_autocast_is_as_precise_with_bf16_update_math():
    """A tiny TTT Moshi, float32 weights under bf16 autocast (how training runs on GPU), vs the same
    model in float64: logits and the gradients of every TTT weight, bf16 setting vs fp32 setting."""
    base = build_tiny_lm(seed=0, context=16)
    model = apply_ttt(base, TTTConfig(chunk_size=8, eta=0.2, layers=[0, 2]))
    randomize_ttt(model)
    model.train()
    model64 = copy.deepcopy(model).double()
    codes = random_codes(model, 2, 90)
    e32, out32 = _gating_errors(model64, model, codes, "fp32")
    e16, out16 = _gating_errors(model64, model, codes, "bf16")
    assert not torch.equal(out16, out32)  # the setting reaches the layers
    for i, (a, b) in enumerate(zip(e32, e16)):
        assert b < 1.25 * a + U / 8, (i, a, b)


def test_streaming_float32_state_agrees_with_the_bf16_training_forward():
    """A bf16 model: streaming frame by frame (float32 delta) vs the full forward with bf16 update
    math, both against the same model in float64."""
    base = build_tiny_lm(seed=0, context=16)
    model = apply_ttt(base, TTTConfig(chunk_size=8, eta=0.2, layers=[0, 2], update_precision="bf16"))
    randomize_ttt(model)
    model.eval()
    model64 = copy.deepcopy(model).double()
    model16 = copy.deepcopy(model).bfloat16()
    codes = random_codes(model, 2, 61)
    with torch.no_grad():
        ref = model64.forward_text(codes)[1]
        full = model16.forward_text(codes)[1]
        with model16.streaming(2):
            stream = torch.cat([model16.forward_text(codes[:, :, t : t + 1])[1] for t in range(61)], 2)
    e_full, e_stream = _rel(full, ref), _rel(stream, ref)
    assert e_stream < 1.25 * e_full + U / 8, (e_full, e_stream)
    assert _rel(stream, full) < 2 * e_full, (_rel(stream, full), e_full)


def test_precision_script_prints_its_tables_and_passes(capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    import check_precision

    check_precision.main(["--d", "32", "--h", "88", "--T", "96", "--C", "16"])
    out = capsys.readouterr().out
    assert "1. TTT term" in out and "2. one TTTGating" in out and "3. streaming" in out
    assert "all errors within their bounds" in out and not check_precision.FAILED


def test_a_refused_native_product_falls_back_to_the_same_numbers(monkeypatch, caplog):
    """If a torch build refuses ``bmm(..., out_dtype=float32)`` the op emulates it, with a warning."""
    from moshi_ttt.ops import inplace

    z, v, w0 = _bf16_inputs(2, 150, 8, 22)
    expected = _run(z, v, w0, 0.05, 16, torch.ones(2, 150, 8), torch.ones(2, 8, 22), precision="bf16")
    init = inplace._Products.__init__

    def native_on_cpu(self, precision, z, cdt):  # the CPU has no out_dtype kernel: it raises
        init(self, precision, z, cdt)
        self.native = self.low

    monkeypatch.setattr(inplace._Products, "__init__", native_on_cpu)
    monkeypatch.setattr(inplace._Products, "native_failed", False)
    got = _run(z, v, w0, 0.05, 16, torch.ones(2, 150, 8), torch.ones(2, 8, 22), precision="bf16")
    assert inplace._Products.native_failed and "emulating them in float32" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
