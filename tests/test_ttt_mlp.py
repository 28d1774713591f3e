"""The TTT-MLP variant: the dual form vs the token-by-token specification (float64), the inner model's
pieces, updates inside a mini-batch, streaming with per-element resets, stability, model integration."""

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
from moshi_ttt.ops.mlp import (
    InnerParams,
    gelu_grad,
    ln_l2_grad,
    token_weights,
    ttt_mlp_chunked,
    ttt_mlp_reference,
)
from moshi_ttt.tiny import build_tiny_lm


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _inputs(B=2, H=2, T=11, D=4, E=8, C=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def t(*s, std=1.0, mean=0.0):
        return (torch.randn(*s, generator=g, dtype=dtype) * std + mean).requires_grad_()

    xq, xk, xv = t(B, H, T, D), t(B, H, T, D), t(B, H, T, D)
    lr = (torch.rand(B, H, T, generator=g, dtype=dtype) * 0.5).requires_grad_()
    offset = t(C, std=0.2)
    init = (t(H, D, E, std=0.3), t(H, E, std=0.1), t(H, E, D, std=0.3), t(H, D, std=0.1))
    lnw, lnb = t(H, D, std=0.1, mean=1.0), t(H, D, std=0.1)
    return xq, xk, xv, lr, offset, init, lnw, lnb


def _run_with_grads(fn, args, C):
    """Outputs, final weights and the gradient of a random functional of both w.r.t. every input."""
    xq, xk, xv, lr, offset, init, lnw, lnb = args
    leaves = [xq, xk, xv, lr, offset, *init, lnw, lnb]
    out, final = fn(xq, xk, xv, lr, InnerParams(init, lnw, lnb, offset), C)
    g = torch.Generator().manual_seed(1)

    def rand(t):  # the same numbers in float32 and float64
        return torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)

    loss = (out * rand(out)).sum() + sum((w * rand(w)).sum() for w in final.tuple())
    return out, final.tuple(), torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("C, T", [(1, 1), (4, 3), (4, 4), (4, 17), (1, 6), (5, 11)])
@pytest.mark.parametrize("B", [1, 2])
def test_dual_form_matches_the_token_by_token_specification_in_float64(C, T, B):
    args = _inputs(B=B, T=T, C=C)
    (o1, f1, g1), (o2, f2, g2) = (_run_with_grads(fn, args, C) for fn in (ttt_mlp_reference, ttt_mlp_chunked))
    assert o2.dtype == torch.float64
    assert _rel(o2, o1) < 1e-10
    for a, b in zip(f2, f1):
        assert _rel(a, b) < 1e-10
    for a, b in zip(g2, g1):
        assert _rel(a, b) < 1e-9


def test_float32_dual_form_against_the_float64_specification():
    args64 = _inputs(T=19, C=4)
    args32 = tuple(
        tuple(t.detach().float().requires_grad_() for t in a)
        if isinstance(a, tuple)
        else a.detach().float().requires_grad_()
        for a in args64
    )
    (o1, f1, g1), (o2, f2, g2) = (
        _run_with_grads(ttt_mlp_reference, args64, 4),
        _run_with_grads(ttt_mlp_chunked, args32, 4),
    )
    assert o2.dtype == torch.float32 and all(f.dtype == torch.float32 for f in f2)
    assert _rel(o2.double(), o1) < 1e-5
    for a, b in zip(f2, f1):
        assert _rel(a.double(), b) < 1e-5
    for a, b in zip(g2, g1):
        assert _rel(a.double(), b) < 1e-4


def test_inner_pieces_match_autograd():
    g = torch.Generator().manual_seed(0)
    z = (
        torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64) * 0.05
    ).requires_grad_()  # small: LN's 1/std
    target = torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64)
    w, b = (
        torch.randn(3, 8, generator=g, dtype=torch.float64),
        torch.randn(3, 8, generator=g, dtype=torch.float64),
    )
    ln = torch.stack([F.layer_norm(z[:, h], (8,), w[h], b[h], 1e-6) for h in range(3)], 1)
    (want,) = torch.autograd.grad(0.5 * ((ln - target) ** 2).sum(), z)
    torch.testing.assert_close(ln_l2_grad(z, target, w, b), want, rtol=1e-10, atol=1e-10)
    a = torch.linspace(-6, 6, 101, dtype=torch.float64, requires_grad=True)
    (want,) = torch.autograd.grad(F.gelu(a, approximate="tanh").sum(), a)
    torch.testing.assert_close(gelu_grad(a), want, rtol=1e-12, atol=1e-12)
    # tau_i = max(1/(i+1) + offset_i, 0): the running mean of a chunk's gradients at init.
    torch.testing.assert_close(token_weights(torch.zeros(4)), torch.tensor([1, 1 / 2, 1 / 3, 1 / 4]))
    assert (
        token_weights(torch.tensor([-2.0, 0.5]))[0] == 0 and token_weights(torch.tensor([-2.0, 0.5]))[1] == 1
    )


def test_tokens_read_updates_from_earlier_tokens_of_their_own_chunk_and_nothing_later():
    xq, xk, xv, lr, offset, init, lnw, lnb = (
        tuple(t.detach() for t in a) if isinstance(a, tuple) else a.detach() for a in _inputs(B=1, T=8, C=8)
    )
    out, _ = ttt_mlp_chunked(xq, xk, xv, lr, InnerParams(init, lnw, lnb, offset), 8)
    xv2 = xv.clone()
    xv2[:, :, 3] += 1.0  # token 3's value: changes what tokens 3.. of the same chunk read, not 0..2
    out2, _ = ttt_mlp_chunked(xq, xk, xv2, lr, InnerParams(init, lnw, lnb, offset), 8)
    assert torch.equal(out[:, :, :3], out2[:, :, :3])
    assert all((out[:, :, t] - out2[:, :, t]).abs().max() > 1e-4 for t in range(3, 8))


def test_with_zero_rates_every_token_reads_the_initial_weights():
    xq, xk, xv, lr, offset, init, lnw, lnb = (
        tuple(t.detach() for t in a) if isinstance(a, tuple) else a.detach() for a in _inputs(T=9, C=4)
    )
    out, final = ttt_mlp_chunked(xq, xk, xv, torch.zeros_like(lr), InnerParams(init, lnw, lnb, offset), 4)
    pred = F.gelu(xq @ init[0] + init[1][:, None], approximate="tanh") @ init[2] + init[3][:, None]
    ln = torch.stack([F.layer_norm(pred[:, h], (4,), lnw[h], lnb[h], 1e-6) for h in range(2)], 1)
    torch.testing.assert_close(out, xq + ln)
    assert torch.equal(final.w1, init[0].expand_as(final.w1))


# ---------------------------------------------------------------- the layer
def _layer(eta=0.5, C=4, qk_norm=False, seed=0):
    torch.manual_seed(seed)
    model = build_tiny_lm(seed=seed, context=16)
    cfg = TTTConfig(variant="mlp", chunk_size=C, eta=eta, layers=[0], mlp_heads=4, mlp_qk_norm=qk_norm)
    layer = ttt_gatings(apply_ttt(model, cfg))[0]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # off the initial values (open gate, non-trivial rates and norms)
        for name in layer.ttt_param_names():
            p = getattr(layer, name)
            p.add_(torch.randn(p.shape, generator=g) * (0.3 if name == "alpha" else 0.05))
    return layer.eval()


@pytest.mark.numerics
@pytest.mark.parametrize("qk_norm", [False, True])
def test_layer_streaming_equals_the_training_forward_with_per_element_resets_and_exec_mask(qk_norm):
    # Batch of 3 streamed token by token (C = 4). Element 0 is reset mid-chunk at step 6, element 2 at
    # step 9; element 1 skips steps 2-4 (exec_mask False). Each element's outputs must equal the training
    # forward over what that element saw since its last reset.
    C, T = 4, 23
    layer = _layer(C=C, qk_norm=qk_norm)
    x = torch.randn(3, T, layer.dim)
    resets = {6: torch.tensor([True, False, False]), 9: torch.tensor([False, False, True])}
    skipped = {2, 3, 4}
    outs = {b: [] for b in range(3)}
    with torch.no_grad(), layer.streaming(3):
        for t in range(T):
            if t in resets:
                layer.reset_streaming(resets[t])
                for b in resets[t].nonzero().flatten().tolist():
                    outs[b] = []  # what came before belongs to an earlier stream
            layer._streaming_state.set_exec_mask(torch.tensor([True, t not in skipped, True]))
            y = layer(x[:, t : t + 1])
            for b in range(3):
                if b != 1 or t not in skipped:
                    outs[b].append(y[b, 0])
    seen = {0: x[0, 6:], 1: torch.cat([x[1, :2], x[1, 5:]]), 2: x[2, 9:]}
    for b in range(3):
        with torch.no_grad():
            want = layer(seen[b][None])[0]
        torch.testing.assert_close(torch.stack(outs[b]), want, atol=2e-5, rtol=1e-4)
    # A check that the streamed run learned inside chunks (not only at chunk ends): without updates the
    # outputs differ.
    layer.updates_enabled = False
    with torch.no_grad():
        frozen = layer(x[2:, 9:])[0]
    assert (frozen - torch.stack(outs[2])).abs().max() > 1e-3


@pytest.mark.numerics
def test_layer_streaming_in_uneven_pieces_equals_the_training_forward():
    layer = _layer(C=4)
    x = torch.randn(2, 21, layer.dim)
    with torch.no_grad():
        want = layer(x)
        with layer.streaming(2):
            got = torch.cat([layer(x[:, a:b]) for a, b in [(0, 3), (3, 4), (4, 11), (11, 12), (12, 21)]], 1)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.numerics
def test_layer_streaming_in_pieces_with_elements_at_different_chunk_positions():
    # Element 0 is reset after 3 steps, so the two elements sit at different positions of their chunks;
    # then element 1 skips a 6-step piece (exec_mask False), running past its chunk's end meanwhile.
    layer = _layer(C=4)
    x = torch.randn(2, 30, layer.dim)
    outs = []
    with torch.no_grad(), layer.streaming(2):
        outs.append(layer(x[:, 0:3]))
        layer.reset_streaming(torch.tensor([True, False]))
        outs += [layer(x[:, 3:10]), layer(x[:, 10:11])]
        layer._streaming_state.set_exec_mask(torch.tensor([True, False]))
        outs.append(layer(x[:, 11:17]))
        layer._streaming_state.set_exec_mask(torch.tensor([True, True]))
        outs.append(layer(x[:, 17:30]))
    got = torch.cat(outs, 1)
    with torch.no_grad():
        want0 = layer(x[:1, 3:])[0]
        want1 = layer(torch.cat([x[1:, :11], x[1:, 17:]], 1))[0]
    torch.testing.assert_close(got[0, 3:], want0, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat([got[1, :11], got[1, 17:]]), want1, atol=2e-5, rtol=1e-4)


def test_state_and_inner_math_stay_float32_under_a_bfloat16_model():
    layer = _layer(C=4).to(torch.bfloat16)
    x = torch.randn(2, 9, layer.dim, dtype=torch.bfloat16)
    with torch.no_grad(), layer.streaming(2):
        y = layer(x)
        st = layer._streaming_state
        assert y.dtype == torch.bfloat16
        assert all(t.dtype == torch.float32 for t in (*st.fast.tuple(), *st.acc.tuple()))
        assert st.acc.w1.abs().sum() > 0  # step 9 is inside the third chunk: a running gradient sum
    xq, xk, xv, lr = layer.projections(x)
    assert all(t.dtype == torch.float32 for t in (xq, xk, xv, lr))


def test_inner_rate_is_eta_sigmoid_over_head_dim():
    layer = _layer(eta=0.7)
    x = torch.randn(1, 5, layer.dim)
    _, _, _, lr = layer.projections(x)
    want = 0.7 * torch.sigmoid(x @ layer.lr_proj.T + layer.lr_bias).transpose(1, 2) / layer.head_dim
    torch.testing.assert_close(lr, want)


def test_qk_norm_gives_unit_queries_and_keys():
    layer = _layer(qk_norm=True)
    xq, xk, xv, _ = layer.projections(torch.randn(2, 5, layer.dim) * 30)
    for t in (xq, xk):
        torch.testing.assert_close(t.norm(dim=-1), torch.ones(t.shape[:-1]))
    assert not torch.allclose(xv.norm(dim=-1), torch.ones(xv.shape[:-1]))


@pytest.mark.parametrize("eta", [0.01, 1.0, 10.0])
def test_long_sequences_with_large_inputs_keep_outputs_and_gradients_finite_and_bounded(eta):
    # The old TTT-MLP (bare fast MLP, no LayerNorm in the inner loss, rate not divided by the head dim)
    # ran away here: the inner step grows with ||XK||^2 and the weights blow up chunk after chunk, to inf
    # and NaN in the outer gradient. The inner LayerNorm makes the inner loss scale-invariant in the
    # fast MLP's output and the post-norm bounds the branch output.
    layer = _layer(eta=eta, C=8).train()
    with torch.no_grad():
        for p in (layer.q_proj, layer.k_proj, layer.v_proj, layer.w1, layer.w2):
            p.mul_(20)
        layer.lr_bias.fill_(5.0)  # sigmoid ~ 1: the full base rate
    x = torch.randn(2, 512, layer.dim, requires_grad=True) * 10
    branch = layer(x) - layer.base(x)
    bound = layer.post_norm_weight.abs().max() * (layer.dim**0.5) + layer.post_norm_bias.abs().max()
    bound = bound * torch.linalg.matrix_norm(layer.o_proj, ord=2)
    assert torch.isfinite(branch).all() and branch.norm(dim=-1).max() <= bound * 1.001
    branch.pow(2).mean().backward()
    for name in layer.ttt_param_names():
        grad = getattr(layer, name).grad
        assert grad is not None and torch.isfinite(grad).all(), name


def test_telemetry_term_ratio_is_what_the_updates_add_over_the_output_at_the_initial_weights():
    # term_ratio = ||TTT term|| / ||output at W^(0)||, the TTT term being what the updates add: the
    # layer's output with updates on minus with them off (the public switch, an independent path).
    layer = _layer(C=4)
    x = torch.randn(2, 13, layer.dim)
    with torch.no_grad():
        layer.updates_enabled = False
        off = layer(x)
        layer.updates_enabled = True
        layer.record_stats = True
        on = layer(x)
    t = layer.telemetry()
    assert t["term_ratio"] == pytest.approx(((on - off).norm() / off.norm()).item(), rel=1e-4)
    assert t["update_norm"] > 0 and not layer.record_stats and "term_ratio" not in layer.telemetry()


# ---------------------------------------------------------------- in the model
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
        assert g.alpha.grad is not None and g.alpha.grad.abs().sum() > 0
    _open_gate(model)
    model.zero_grad()
    out = model(random_codes(model, 2, 40))
    out.text_logits[out.text_mask].logsumexp(-1).mean().backward()
    for g in ttt_gatings(model).values():
        for n in g.ttt_param_names():
            assert getattr(g, n).grad.abs().sum() > 0, n


# Streaming == full forward in the model: tests/test_layer_contract.py, for every variant.


@pytest.mark.numerics
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
            assert g0._streaming_state.acc.w1.abs().sum() > 0  # and three steps of the third
            model.reset_streaming(torch.tensor([True, False]))
            assert torch.equal(g0._streaming_state.fast.w1[0], g0.w1.float())
            assert not g0._streaming_state.acc.w1[0].any()
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
    with pytest.raises(ValueError, match="TTTConfig.mlp_qk_norm"):
        TTTConfig(variant="mlp", mlp_qk_norm="yes")
    with pytest.raises(ValueError, match="does not divide"):
        apply_ttt(build_tiny_lm(), TTTConfig(variant="mlp", mlp_heads=7, layers=[0]))
