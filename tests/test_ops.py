"""The fast TTT forms against the sequential specification (outputs, final state, every gradient)."""

import pytest
import torch

from moshi_ttt.ops import choose_form, ttt_chunked, ttt_reference


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _inputs(B, T, d, h, shared, dtype=torch.float32, scale=0.5):
    z = (torch.randn(B, T, h, dtype=dtype) * scale).requires_grad_()
    v = (torch.randn(B, T, d, dtype=dtype) * scale).requires_grad_()
    w0 = torch.randn(*(() if shared else (B,)), d, h, dtype=dtype).requires_grad_()
    return z, v, w0


def _run(fn, z, v, w0, eta, C, go, gw, **kw):
    out, wf = fn(z, v, w0, eta, C, **kw)
    loss = (out * go).sum() + (wf * gw).sum()
    grads = torch.autograd.grad(loss, [z, v, w0])
    return out, wf, grads


# T in {1, C-1, C, 3C+5}; for C = 1, T = C-1 = 0 is the empty sequence (test_rejects_empty_sequence).
_CT = [(C, T) for C in (1, 4, 16) for T in sorted({1, C - 1, C, 3 * C + 5}) if T >= 1]


@pytest.mark.parametrize("form", ["dual", "scan", "auto"])
@pytest.mark.parametrize("C, T", _CT)
@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("shared", [True, False])
def test_chunked_matches_reference(form, C, T, B, shared):
    d, h = 12, 20
    z, v, w0 = _inputs(B, T, d, h, shared)
    out_r, wf_r = ttt_reference(z, v, w0, 0.37, C)
    go, gw = torch.randn_like(out_r), torch.randn_like(wf_r)
    ref = _run(ttt_reference, z, v, w0, 0.37, C, go, gw)
    fast = _run(ttt_chunked, z, v, w0, 0.37, C, go, gw, form=form)
    assert fast[0].shape == (B, T, d) and fast[1].shape == (B, d, h)
    assert _rel(fast[0], ref[0]) < 1e-5
    assert _rel(fast[1], ref[1]) < 1e-5
    for name, gf, gr in zip(("z", "v", "w0"), fast[2], ref[2]):
        assert gf.shape == gr.shape, name
        assert _rel(gf, gr) < 1e-5, name


@pytest.mark.parametrize("form", ["dual", "scan"])
def test_long_sequence_spans_many_tiles(form):
    # Several tiles of several chunks each (C = 24 -> 72-token tiles), and a partial last chunk.
    z, v, w0 = _inputs(2, 301, 8, 16, shared=True)
    out_r, wf_r = ttt_reference(z, v, w0, 0.05, 24)
    out_f, wf_f = ttt_chunked(z, v, w0, 0.05, 24, form=form)
    assert _rel(out_f, out_r) < 1e-5 and _rel(wf_f, wf_r) < 1e-5


@pytest.mark.parametrize("form", ["dual", "scan"])
@pytest.mark.parametrize("shared", [True, False])
def test_gradcheck_float64(form, shared):
    z, v, w0 = _inputs(2, 11, 3, 5, shared, dtype=torch.float64)

    def f(z, v, w0):
        return ttt_chunked(z, v, w0, 0.7, 2, form=form)

    assert torch.autograd.gradcheck(f, (z, v, w0), eps=1e-6, atol=1e-7)

    def f_out_only(z, v, w0):
        return ttt_chunked(z, v, w0, 0.7, 3, form=form, return_final=False)[0]

    assert torch.autograd.gradcheck(f_out_only, (z, v, w0), eps=1e-6, atol=1e-7)


def test_causality_chunks_after_i_do_not_change_earlier_outputs():
    C, T = 4, 23
    z, v, w0 = _inputs(1, T, 6, 10, shared=True)
    out, _ = ttt_chunked(z, v, w0, 0.5, C)
    for i in range(T // C):
        z2, v2 = z.detach().clone(), v.detach().clone()
        s = (i + 1) * C  # first token of chunk i+1
        z2[:, s:] += torch.randn_like(z2[:, s:])
        v2[:, s:] += torch.randn_like(v2[:, s:])
        out2, _ = ttt_chunked(z2, v2, w0, 0.5, C)
        assert torch.equal(out2[:, :s], out[:, :s])
        # Chunk i+1's targets only reach chunks i+2 and later.
        v3 = v.detach().clone()
        v3[:, s:] += 1.0
        out3, _ = ttt_chunked(z, v3, w0, 0.5, C)
        assert torch.allclose(out3[:, : s + C], out[:, : s + C], atol=0, rtol=0)


@pytest.mark.numerics
@pytest.mark.parametrize("form", ["dual", "scan"])
def test_batch_of_two_equals_two_single_runs(form):
    z, v, w0 = _inputs(2, 19, 5, 9, shared=False)
    out, wf = ttt_chunked(z, v, w0, 0.3, 4, form=form)
    for b in range(2):
        ob, wb = ttt_chunked(z[b : b + 1], v[b : b + 1], w0[b], 0.3, 4, form=form)
        assert torch.allclose(ob, out[b : b + 1], atol=1e-6, rtol=1e-5)
        assert torch.allclose(wb, wf[b : b + 1], atol=1e-6, rtol=1e-5)


@pytest.mark.numerics
def test_low_precision_inputs_use_float32_math():
    z, v, w0 = _inputs(2, 40, 8, 16, shared=True)
    zb, vb, wb = z.detach().bfloat16(), v.detach().bfloat16(), w0.detach().bfloat16()
    out, wf = ttt_chunked(zb, vb, wb, 0.2, 8)
    assert out.dtype == torch.bfloat16 and wf.dtype == torch.float32
    ref_out, ref_wf = ttt_reference(zb.float(), vb.float(), wb.float(), 0.2, 8)
    # Only the final rounding of the output to bf16 separates the two.
    assert _rel(out.float(), ref_out) < 1e-2
    assert _rel(wf, ref_wf) < 1e-5


@pytest.mark.numerics
@pytest.mark.parametrize("form", ["dual", "scan"])
def test_bf16_base_term_is_moshis_linear_out_and_the_update_stays_float32(form):
    """Under bf16 autocast (float32 w0, bf16 z) the base term is exactly the autocast nn.Linear, in
    value and in gradients; the update term is float32 (the reference on the same rounded inputs)."""
    z, _, w0 = _inputs(2, 40, 8, 16, shared=True)
    zb = z.detach().bfloat16().requires_grad_()
    w0 = w0.detach().requires_grad_()
    g = torch.randn(2, 40, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = torch.nn.functional.linear(zb, w0)
    (plain.float() * g).sum().backward()
    plain_dz, plain_dw = zb.grad.clone(), w0.grad.clone()
    zb.grad = w0.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = ttt_chunked(zb, torch.zeros(2, 40, 8, dtype=torch.bfloat16), w0, 0.3, 8, form=form)
    (out.float() * g).sum().backward()
    assert out.dtype == torch.bfloat16 and torch.equal(out, plain)
    assert torch.equal(w0.grad, plain_dw)
    torch.testing.assert_close(zb.grad, plain_dz, atol=0, rtol=0)
    # With a nonzero target the difference to the plain projection is the float32 update term.
    vb = (torch.randn(2, 40, 8) * 0.5).bfloat16()
    out, wf = ttt_chunked(zb.detach(), vb, w0.detach(), 0.3, 8, form=form)
    ref_out, ref_wf = ttt_reference(zb.detach().float(), vb.float(), w0.detach(), 0.3, 8)
    ref_update = ref_out - torch.nn.functional.linear(zb.detach().float(), w0.detach())
    assert _rel(out.float() - plain.detach().float(), ref_update) < 2e-2  # bf16 rounding of out only
    assert _rel(wf, ref_wf) < 1e-5  # the state is float32 (from the float32 w0)


def test_eta_zero_is_the_plain_projection():
    z, v, w0 = _inputs(2, 17, 4, 6, shared=True)
    out, wf = ttt_chunked(z, v, w0, 0.0, 4)
    assert torch.equal(out, torch.nn.functional.linear(z, w0))
    assert torch.equal(wf, w0.expand(2, 4, 6))


def test_choose_form_by_length():
    assert choose_form(512, 1024, 2816) == "dual"
    assert choose_form(24000, 4096, 11264) == "scan"


@pytest.mark.parametrize(
    "shapes, match",
    [
        (((2, 5, 6), (2, 5, 4), (4, 7)), r"w0 must have shape"),
        (((2, 5, 6), (2, 4, 4), (4, 6)), r"must agree on \[B, T\]"),
        (((2, 5), (2, 5, 4), (4, 6)), r"z must have shape \[B, T, h\]"),
        (((2, 5, 6), (2, 5, 4), (3, 4, 6)), r"w0 must have shape"),
    ],
)
@pytest.mark.parametrize("fn", [ttt_reference, ttt_chunked])
def test_rejects_bad_shapes(fn, shapes, match):
    z, v, w0 = (torch.randn(*s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        fn(z, v, w0, 0.1, 2)


@pytest.mark.parametrize("fn", [ttt_reference, ttt_chunked])
def test_rejects_empty_sequence(fn):
    with pytest.raises(ValueError, match="T = 0"):
        fn(torch.randn(1, 0, 6), torch.randn(1, 0, 4), torch.randn(4, 6), 0.1, 2)


@pytest.mark.parametrize("fn", [ttt_reference, ttt_chunked])
def test_rejects_bad_chunk_size_and_dtype(fn):
    z, v, w0 = torch.randn(1, 3, 6), torch.randn(1, 3, 4), torch.randn(4, 6)
    with pytest.raises(ValueError, match="chunk_size"):
        fn(z, v, w0, 0.1, 0)
    with pytest.raises(ValueError, match="floating-point"):
        fn(z.long(), v, w0, 0.1, 2)


def test_rejects_device_mismatch():
    z, v, w0 = torch.randn(1, 3, 6), torch.randn(1, 3, 4), torch.randn(4, 6, device="meta")
    with pytest.raises(ValueError, match="one device"):
        ttt_chunked(z, v, w0, 0.1, 2)


def test_rejects_unknown_form():
    z, v, w0 = torch.randn(1, 3, 6), torch.randn(1, 3, 4), torch.randn(4, 6)
    with pytest.raises(ValueError, match="form"):
        ttt_chunked(z, v, w0, 0.1, 2, form="fast")


@pytest.mark.numerics
def test_autocast_does_not_lower_the_fast_weight_math():
    z, v, w0 = _inputs(2, 40, 8, 16, shared=True)
    ref_out, _ = ttt_reference(z, v, w0, 0.2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, wf = ttt_chunked(z, v, w0, 0.2, 8)
        out.sum().backward()
    assert out.dtype == torch.float32 and wf.dtype == torch.float32
    assert _rel(out, ref_out) < 1e-5
    assert z.grad.dtype == torch.float32


def test_meta_tensors_pass_through():
    z, v, w0 = (torch.empty(*s, device="meta") for s in ((1, 30, 16), (1, 30, 8), (8, 16)))
    out, wf = ttt_chunked(z, v, w0, 0.1, 8)
    assert out.shape == (1, 30, 8) and out.device.type == "meta" and wf.shape == (1, 8, 16)


@pytest.mark.parametrize("form", ["dual", "scan"])
def test_frozen_w0_gets_no_gradient_and_the_others_are_unchanged(form):
    z, v, w0 = _inputs(2, 30, 5, 9, shared=True)
    out, wf = ttt_chunked(z, v, w0, 0.3, 4, form=form)
    full = torch.autograd.grad(out.sum() + wf.sum(), [z, v])
    out, wf = ttt_chunked(z, v, w0.detach(), 0.3, 4, form=form)
    frozen = torch.autograd.grad(out.sum() + wf.sum(), [z, v])
    assert all(torch.equal(a, b) for a, b in zip(full, frozen))
