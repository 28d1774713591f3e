"""The TTT-MLP variant: fast form vs specification, the normalised target, model integration, streaming."""

import copy

import pytest
import torch
from conftest import random_codes, stream_text_logits
from torch.nn import functional as F

from moshi_ttt import (
    TTTConfig,
    TTTMLPGating,
    apply_ttt,
    load_ttt_config,
    load_ttt_weights,
    save_ttt_weights,
    ttt_gatings,
    ttt_state_dict,
)
from moshi_ttt.ops.mlp import ln_target, ttt_mlp_chunked, ttt_mlp_reference
from moshi_ttt.tiny import build_tiny_lm


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _inputs(B=2, H=2, T=11, D=4, E=8):
    g = torch.Generator().manual_seed(0)
    t = lambda *s, std=1.0: (torch.randn(*s, generator=g) * std).requires_grad_()  # noqa: E731
    xq, xk, xv = t(B, H, T, D), t(B, H, T, D), t(B, H, T, D)
    lr = (torch.rand(B, H, T, generator=g) * 0.5).requires_grad_()
    init = (t(H, D, E, std=0.3), t(H, E, std=0.1), t(H, E, D, std=0.3), t(H, D, std=0.1))
    lnw, lnb = (1 + 0.1 * torch.randn(H, D, generator=g)).requires_grad_(), t(H, D, std=0.1)
    return xq, xk, xv, lr, init, lnw, lnb


@pytest.mark.parametrize("C, T", [(1, 1), (4, 3), (4, 4), (4, 17), (1, 6)])
@pytest.mark.parametrize("B", [1, 2])
def test_chunked_matches_reference_outputs_state_and_gradients(C, T, B):
    xq, xk, xv, lr, init, lnw, lnb = _inputs(B=B, T=T)
    leaves = [xq, xk, xv, lr, *init, lnw, lnb]
    results = []
    for fn in (ttt_mlp_reference, ttt_mlp_chunked):
        out, final = fn(xq, xk, xv, lr, init, lnw, lnb, C)
        g = torch.Generator().manual_seed(1)
        loss = (out * torch.randn(out.shape, generator=g)).sum()
        loss = loss + sum((w * torch.randn(w.shape, generator=g)).sum() for w in final.tuple())
        results.append((out, final.tuple(), torch.autograd.grad(loss, leaves)))
    (o1, f1, g1), (o2, f2, g2) = results
    assert _rel(o2, o1) < 1e-5
    for a, b in zip(f2, f1):
        assert _rel(a, b) < 1e-5
    for a, b in zip(g2, g1):
        assert _rel(a, b) < 1e-4


def test_reconstruction_target_normalises_the_difference():
    g = torch.Generator().manual_seed(0)
    xv, xk = torch.randn(2, 3, 5, 8, generator=g) * 3 + 1, torch.randn(2, 3, 5, 8, generator=g)
    w, b = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    # From the definition: LayerNorm over the head dimension of XV - XK, then each head's scale and shift.
    want = torch.stack([F.layer_norm((xv - xk)[:, h], (8,), w[h], b[h], eps=1e-6) for h in range(3)], 1)
    got = ln_target(xv, xk, w, b)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    buggy = torch.stack([F.layer_norm(xv[:, h], (8,), w[h], b[h], eps=1e-6) for h in range(3)], 1) - xk
    assert not torch.allclose(got, buggy, atol=1e-2)


def make(layers=(0, 2), seed=0, context=16, **kw):
    base = build_tiny_lm(seed=seed, context=context)
    cfg = TTTConfig(variant="mlp", chunk_size=8, eta=0.5, layers=list(layers), mlp_heads=4, **kw)
    return base, apply_ttt(copy.deepcopy(base), cfg)


def _open_gate(model, value=0.8):
    with torch.no_grad():
        for g in ttt_gatings(model).values():
            g.alpha.fill_(value)
            g.lr_proj.normal_(std=0.1)


def test_equals_base_at_init_and_differs_once_the_gate_opens():
    base, model = make()
    codes = random_codes(base, 2, 40)
    base.train(), model.train()
    a, b = base(codes), model(codes)
    assert torch.equal(a.text_logits[a.text_mask], b.text_logits[b.text_mask])
    assert torch.equal(a.logits[a.mask], b.logits[b.mask])
    assert all(isinstance(g, TTTMLPGating) for g in ttt_gatings(model).values())
    _open_gate(model)
    c = model(codes)
    assert not torch.allclose(a.text_logits[a.text_mask], c.text_logits[c.text_mask])


def test_gate_gets_gradient_at_init_and_forward_never_mutates_parameters():
    _, model = make()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = model(random_codes(model, 2, 40))
    out.text_logits[out.text_mask].logsumexp(-1).mean().backward()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    for g in ttt_gatings(model).values():
        assert g.alpha.grad is not None and g.alpha.grad.abs() > 0
    _open_gate(model)
    model.zero_grad()
    out = model(random_codes(model, 2, 40))
    out.text_logits[out.text_mask].logsumexp(-1).mean().backward()
    for g in ttt_gatings(model).values():
        for n in ("w1", "b1", "w2", "q_proj", "k_proj", "v_proj", "ln_weight", "lr_proj", "o_proj"):
            assert getattr(g, n).grad.abs().sum() > 0, n


# Streaming == full forward: tests/test_layer_contract.py, for every variant.


def test_reset_one_element_and_reset_equals_fresh():
    _, model = make()
    _open_gate(model)
    model.eval()
    a, b = random_codes(model, 2, 19), random_codes(model, 2, 23)
    g0 = ttt_gatings(model)[0]
    with torch.no_grad():
        with model.streaming(2):
            stream_text_logits(model, a, [1] * 19)
            kept = g0._streaming_state.fast.w1[1].clone()
            assert not torch.equal(kept, g0.w1.float())  # two chunks were learned
            model.reset_streaming(torch.tensor([True, False]))
            assert torch.equal(g0._streaming_state.fast.w1[0], g0.w1.float())
            assert torch.equal(g0._streaming_state.fast.w1[1], kept)
            model.reset_streaming()
            after = stream_text_logits(model, b, [1] * 23)
        with model.streaming(2):
            fresh = stream_text_logits(model, b, [1] * 23)
    torch.testing.assert_close(after, fresh, atol=1e-6, rtol=1e-6)


def test_vanilla_checkpoint_loads_and_ttt_file_round_trips(tmp_path):
    base, model = make()
    fresh = apply_ttt(
        build_tiny_lm(seed=5, context=16), TTTConfig(variant="mlp", chunk_size=8, layers=[0, 2])
    )
    res = fresh.load_state_dict(base.state_dict(), strict=False)
    assert res.unexpected_keys == []
    assert sorted(res.missing_keys) == sorted(
        f"transformer.layers.{i}.gating.{n}" for i in (0, 2) for n in TTTMLPGating.ttt_param_names()
    )
    _open_gate(model)
    path = save_ttt_weights(model, tmp_path / "ttt.safetensors")
    assert set(ttt_state_dict(model)) == {
        f"transformer.layers.{i}.gating.{n}" for i in (0, 2) for n in TTTMLPGating.ttt_param_names()
    }
    rebuilt = apply_ttt(copy.deepcopy(base), load_ttt_config(path))
    load_ttt_weights(rebuilt, path)
    codes = random_codes(base, 1, 30)
    rebuilt.eval(), model.eval()
    assert torch.equal(rebuilt(codes).text_logits, model(codes).text_logits)


def test_config_validation():
    with pytest.raises(ValueError, match="TTTConfig.variant"):
        TTTConfig(variant="linear")
    with pytest.raises(ValueError, match="TTTConfig.mlp_heads"):
        TTTConfig(variant="mlp", mlp_heads=0)
    with pytest.raises(ValueError, match="does not divide"):
        apply_ttt(build_tiny_lm(), TTTConfig(variant="mlp", mlp_heads=7, layers=[0]))
