"""The write gate of In-Place TTT (``ttt.write_gate``): a learned per-token write strength.

The contract's own suite (tests/test_layer_contract.py, case ``inplace+write_gate``) covers identity at
init, streaming == training, the off-switch, new-parameter materialisation and the weights file. Here:
the gated layer against an independent float64 reference (outputs, final state, every gradient), a
closed gate, per-element resets, no parameter written by a forward, and bf16.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_codes, stream_text_logits
from moshi.modules.gating import ActivationGating
from torch.nn import functional as F

from moshi_ttt import TTTConfig, apply_ttt, ttt_gatings
from moshi_ttt.gating import TTTGating
from moshi_ttt.ops import ttt_reference
from moshi_ttt.tiny import build_tiny_lm

D, H, C, K = 8, 12, 4, 2


def _gating(dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    mlp = ActivationGating(D, 2 * H, activation=F.silu).to(dtype)  # moshi's gated MLP: linear_in [2h, d]
    cfg = TTTConfig(chunk_size=C, eta=0.3, conv_kernel_size=K, write_gate=True, **kw)
    g = TTTGating.from_gating(mlp, cfg)
    with torch.no_grad():
        g.target_conv.normal_(std=0.5)
        g.target_proj.add_(torch.randn_like(g.target_proj) * 0.2)
        g.write_gate_w.normal_()
        g.write_gate_b.fill_(-0.4)
    return g


def _reference(g: TTTGating, x: torch.Tensor, src: torch.Tensor):
    """Loop reference: Z, then per chunk and step the conv over the chunk, W_target, the gate (of the
    source step, or of the key ``z_t`` with ``write_gate_input: key``); then the sequential fast-weight
    recurrence (``ttt_reference``)."""
    y = x @ g.linear_in.weight.T  # [B, T, 2h]
    h = y.shape[-1] // 2
    z = F.silu(y[..., :h]) * y[..., h:]
    B, T, Dd = src.shape
    v = torch.zeros(B, T, Dd, dtype=src.dtype)
    for s in range(0, T, C):
        e = min(T, s + C)
        for t in range(s, e):
            acc = torch.zeros(B, Dd, dtype=src.dtype)
            for k in range(K):
                if t + k < e:  # the conv never reads past its chunk
                    acc = acc + src[:, t + k] * g.target_conv[:, 0, k]
            gate_in = z[:, t] if g.config.write_gate_input == "key" else src[:, t]
            gate = 2 * torch.sigmoid(gate_in @ g.write_gate_w + g.write_gate_b)  # [B]
            v[:, t] = gate[:, None] * (acc @ g.target_proj.T)
    return ttt_reference(z, v, g.w_down, g.config.eta, C)


@pytest.mark.parametrize("gate_input", ["source", "key"])
@pytest.mark.parametrize("form", ["dual", "scan"])
def test_gated_layer_equals_the_reference_with_every_gradient(form, gate_input):
    g = _gating(fast_form=form, write_gate_input=gate_input)
    B, T = 2, 3 * C + 1
    x = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    src = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    out = g(x, src)
    ref, _ = _reference(g, x, src)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    params = [g.write_gate_w, g.write_gate_b, g.target_conv, g.target_proj, g.w_down, g.linear_in.weight]
    probe = torch.randn_like(out)
    grads = torch.autograd.grad((out * probe).sum(), [x, src, *params])
    ref_grads = torch.autograd.grad((ref * probe).sum(), [x, src, *params])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert g.write_gate_w.grad is None  # autograd.grad leaves .grad alone
    assert grads[2].abs().sum() > 0 and grads[3].abs().sum() > 0  # the gate learns


@pytest.mark.numerics
@pytest.mark.parametrize("gate_input", ["source", "key"])
@pytest.mark.parametrize("form", ["dual", "scan"])
def test_streamed_final_state_of_the_gated_layer_equals_the_reference(form, gate_input):
    """Token by token, the fast weight after 3 chunks equals the reference's final state."""
    g = _gating(fast_form=form, write_gate_input=gate_input).eval()
    B, T = 2, 3 * C
    x = torch.randn(B, T, D, dtype=torch.float64)
    src = torch.randn(B, T, D, dtype=torch.float64)
    ref, w_final = _reference(g, x, src)
    with torch.no_grad(), g.streaming(B):
        outs = [g(x[:, t : t + 1], src[:, t : t + 1]) for t in range(T)]
        state = g._streaming_state
        streamed = state.w0 + state.delta  # delta is float32 by design
    torch.testing.assert_close(torch.cat(outs, 1), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(streamed.to(torch.float64), w_final, rtol=1e-5, atol=1e-5)
    assert (w_final - g.w_down).abs().max() > 1e-3  # the gated updates did move the fast weight


def test_a_closed_gate_writes_nothing_and_an_open_one_only_where_open():
    g = _gating()
    B, T = 1, 2 * C
    x = torch.randn(B, T, D, dtype=torch.float64)
    src = torch.randn(B, T, D, dtype=torch.float64)
    with torch.no_grad():
        g.write_gate_b.fill_(-1e4)  # closed on every step: the layer is the base MLP
        closed = g(x, src)
        g.updates_enabled = False
        off = g(x, src)
        g.updates_enabled = True
        torch.testing.assert_close(closed, off, rtol=0, atol=1e-12)
        # Open on step 1 only (gate 2 there, 0 elsewhere): chunk 1 reads that one association.
        g.write_gate_w.zero_()
        g.write_gate_w[0] = 1.0
        g.write_gate_b.zero_()
        src[..., 0] = -1e4
        src[:, 1, 0] = 1e4
        out = g(x, src)
        z, v = g.activations(x), g.target(src)
        assert not v[:, 1].eq(0).all() and v[:, [0, *range(2, T)]].eq(0).all()
        expect = F.linear(z, g.w_down)
        expect[:, C:] += g.config.eta * (z[:, C:] @ z[:, 1:2].transpose(1, 2)) * v[:, 1:2]
    torch.testing.assert_close(out, expect, rtol=1e-10, atol=1e-8)


def _model(**kw):
    base = build_tiny_lm(context=16)
    model = apply_ttt(base, TTTConfig(chunk_size=C, eta=0.5, layers=[0, 2], write_gate=True, **kw))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in ttt_gatings(model).values():
            layer.target_conv.copy_(torch.randn(layer.target_conv.shape, generator=g) * 0.3)
            layer.write_gate_w.copy_(torch.randn(layer.write_gate_w.shape, generator=g))
    return model.eval()


@pytest.mark.numerics
def test_reset_of_one_element_with_the_gate_equals_a_fresh_stream():
    model = _model()
    a, b = random_codes(model, 2, 11), random_codes(model, 2, 13)
    with torch.no_grad():
        with model.streaming(2):
            stream_text_logits(model, a, [1] * 11)
            model.reset_streaming(torch.tensor([True, False]))
            after = stream_text_logits(model, b, [1] * 13)
        with model.streaming(2):
            fresh = stream_text_logits(model, b, [1] * 13)
    torch.testing.assert_close(after[0], fresh[0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(after[1], fresh[1])  # element 1 kept its fast weights


def test_training_forward_writes_no_parameter():
    model = _model()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = model(random_codes(model, 2, 3 * C + 2))
    out.text_logits[out.text_mask].float().square().mean().backward()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    gates = [layer.write_gate_w.grad for layer in ttt_gatings(model).values()]
    assert all(gr is not None and gr.abs().sum() > 0 for gr in gates)


@pytest.mark.numerics
def test_bf16_model_keeps_float32_fast_weights_and_matches_float32():
    model = _model()
    codes = random_codes(model, 2, 3 * C + 1)
    with torch.no_grad():
        ref = model.forward_text(codes)[1].float()
        model16 = model.to(torch.bfloat16)
        out = model16.forward_text(codes)[1].float()
        with model16.streaming(2):
            stream_text_logits(model16, codes, [1] * codes.shape[-1])
            deltas = [layer._streaming_state.delta for layer in ttt_gatings(model16).values()]
            assert all(dl.dtype == torch.float32 and dl.abs().sum() > 0 for dl in deltas)
    rel = (out - ref).norm() / ref.norm()
    assert math.isfinite(float(rel)) and rel < 5e-2, rel


def test_write_gate_is_an_inplace_option():
    with pytest.raises(ValueError, match="TTTConfig.write_gate: is an In-Place TTT option"):
        TTTConfig(variant="mlp", write_gate=True)


def test_the_key_gate_reads_the_layers_own_activations():
    """``write_gate_input: key``: one gate weight per hidden unit; chunk 1 reads chunk 0's writes, each
    scaled by ``2 sigmoid(z_s . w + b)`` of its own key, whatever the source holds."""
    g = _gating(write_gate_input="key")
    assert g.write_gate_w.shape == (g.hidden,) and g.hidden != g.dim
    B, T = 2, 2 * C
    x = torch.randn(B, T, D, dtype=torch.float64)
    src = torch.randn(B, T, D, dtype=torch.float64)
    with torch.no_grad():
        out = g(x, src)
        z, v = g.activations(x), g.target(src)  # target(): the source's target, ungated
        gates = 2 * torch.sigmoid(z @ g.write_gate_w + g.write_gate_b)  # [B, T]
        assert gates.std() > 0.1  # the gates differ from step to step
        expect = F.linear(z, g.w_down)
        written = gates[:, :C, None] * v[:, :C]
        expect[:, C:] += g.config.eta * (z[:, C:] @ z[:, :C].transpose(1, 2)) @ written
        torch.testing.assert_close(out, expect, rtol=1e-10, atol=1e-10)
        # The source does not enter the gate: another source changes V, not the gates.
        assert torch.equal(g.gate(z), 2 * torch.sigmoid(z @ g.write_gate_w + g.write_gate_b)[..., None])
