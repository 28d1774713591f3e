"""``eta_norm`` (the TTT learning rate's parameterisation) and the TTT telemetry, against an
independent float64 reference of the whole In-Place TTT gating; ``eta_norm: zsq`` together with
``write_gate`` (both rescale the update target: the gate per token, zsq per chunk)."""

import copy

import pytest
import torch
from conftest import random_codes, randomize_ttt
from torch.nn import functional as F

from moshi_ttt import TTTConfig, apply_ttt, ttt_gatings
from moshi_ttt.gating import chunk_mean_sq
from moshi_ttt.tiny import build_tiny_lm

C = 8


def _gating(eta_norm, seed=0, fast_form="auto", kernel=3, depthwise=True, write_gate=False):
    """A float64 TTT gating of a tiny Moshi (dim 64) with a random target path (and write gate)."""
    base = build_tiny_lm(seed=seed, dtype=torch.float64)
    cfg = TTTConfig(
        chunk_size=C,
        eta=0.3,
        eta_norm=eta_norm,
        layers=[0],
        target_source="hidden",
        fast_form=fast_form,
        conv_kernel_size=kernel,
        conv_depthwise=depthwise,
        write_gate=write_gate,
    )
    g = ttt_gatings(apply_ttt(base, cfg))[0]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        g.target_conv.copy_(torch.randn(g.target_conv.shape, generator=gen, dtype=torch.float64) * 0.3)
        g.target_proj.add_(torch.randn(g.target_proj.shape, generator=gen, dtype=torch.float64) * 0.05)
        g.w_down.add_(torch.randn(g.w_down.shape, generator=gen, dtype=torch.float64) * 0.01)
        if write_gate:  # gates spread over (0, 2), not all at their init value 1
            g.write_gate_w.copy_(torch.randn(g.write_gate_w.shape, generator=gen, dtype=torch.float64) * 0.3)
            g.write_gate_b.fill_(-0.4)
    return g


def reference_gating(g, x, src):
    """The In-Place TTT gating written out, step by step: z from the slow weights, the target
    convolution tap by tap inside each chunk, each step's target times its write gate
    ``2 sigmoid(src_t . w + b)`` (with ``write_gate``), one explicit weight per chunk, and under ``zsq``
    each chunk's update divided by the chunk's mean ||z_t||^2. Shares no code with moshi_ttt."""
    cfg = g.config
    h = g.hidden
    w_in = g.linear_in.weight  # [2h, d]: W_gate rows, then W_up
    conv, proj = g.target_conv, g.target_proj  # [d, 1 or d, K], [d, d]
    K = conv.shape[-1]
    B, T, d = x.shape
    outs = []
    for b in range(B):
        w = g.w_down
        rows = []
        for s in range(0, T, cfg.chunk_size):
            e = min(T, s + cfg.chunk_size)
            zc = torch.stack([F.silu(w_in[:h] @ x[b, t]) * (w_in[h:] @ x[b, t]) for t in range(s, e)])
            rows.append(zc @ w.T)
            vc = []
            for t in range(s, e):
                acc = torch.zeros(d, dtype=x.dtype)
                for k in range(K):
                    if t + k < e:  # never past the chunk's end
                        xs = src[b, t + k]
                        acc = acc + (conv[:, 0, k] * xs if conv.shape[1] == 1 else conv[:, :, k] @ xs)
                gate = 1.0
                if cfg.write_gate:
                    gate = 2 * torch.sigmoid(src[b, t] @ g.write_gate_w + g.write_gate_b[0])
                vc.append(gate * (proj @ acc))
            vc = torch.stack(vc)  # [c, d]
            scale = 1.0
            if cfg.eta_norm == "zsq":
                scale = 1.0 / (zc * zc).sum(-1).mean()
            w = w + cfg.eta * scale * (vc.T @ zc)
        outs.append(torch.cat(rows))
    return torch.stack(outs)


@pytest.mark.parametrize(("eta_norm", "write_gate"), [("none", False), ("zsq", False), ("zsq", True)])
@pytest.mark.parametrize("T", [C - 1, C, 3 * C + 5])
@pytest.mark.parametrize("fast_form", ["dual", "scan"])
def test_gating_matches_the_reference_with_gradients(eta_norm, write_gate, T, fast_form):
    g = _gating(eta_norm, fast_form=fast_form, depthwise=T != C, write_gate=write_gate)
    x = torch.randn(2, T, g.dim, dtype=torch.float64, requires_grad=True)
    src = torch.randn(2, T, g.dim, dtype=torch.float64, requires_grad=True)
    params = [g.target_conv, g.target_proj, g.w_down, g.linear_in.weight]
    params += [g.write_gate_w, g.write_gate_b] if write_gate else []
    inputs = [x, src, *params]
    out = g(x, src)
    ref = reference_gating(g, x, src)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    cot = torch.randn_like(out)
    # Below one chunk nothing reads the target path (its update is never applied): no gradient.
    grads = torch.autograd.grad(out, inputs, cot, allow_unused=True, materialize_grads=True)
    ref_grads = torch.autograd.grad(ref, inputs, cot, allow_unused=True, materialize_grads=True)
    names = ["x", "src", "conv", "proj", "w_down", "linear_in", "gate_w", "gate_b"]
    for name, a, r in zip(names, grads, ref_grads):
        torch.testing.assert_close(a, r, atol=1e-9, rtol=1e-9, msg=name)
    assert grads[2].abs().sum() > 0 if T > C else True
    if T > C:  # the normaliser matters: it changes the output of the chunks after the first
        other_norm = "zsq" if eta_norm == "none" else "none"
        other = _gating(other_norm, fast_form=fast_form, depthwise=T != C, write_gate=write_gate)
        assert not torch.allclose(other(x, src)[:, C:], out[:, C:])
        assert all(a.abs().sum() > 0 for a in grads[6:])  # the gate trains through the zsq update


def test_zsq_is_raw_eta_divided_by_the_chunk_statistic():
    # One chunk's update under zsq equals the raw update with eta / mean ||z||^2 (a per-chunk scalar).
    g = _gating("zsq")
    x, src = (
        torch.randn(1, 2 * C, g.dim, dtype=torch.float64),
        torch.randn(1, 2 * C, g.dim, dtype=torch.float64),
    )
    with torch.no_grad():
        s = float(chunk_mean_sq(g.activations(x), C)[0, 0])
        out = g(x, src)
        g.config = TTTConfig(**{**g.config.to_dict(), "eta_norm": "none", "eta": g.config.eta / s})
        raw = g(x, src)
    torch.testing.assert_close(out, raw, atol=1e-12, rtol=1e-12)


def test_chunk_statistic_is_the_same_over_the_grid_and_over_a_chunk_buffer():
    z = torch.randn(3, 3 * C + 5, 40) * 2.0
    grid = chunk_mean_sq(z, C)
    assert grid.shape == (3, 3 * C + 5)
    for i in range(3):  # streaming reads each completed chunk's [B, C, h] buffer
        buf = z[:, i * C : (i + 1) * C].contiguous()
        stream = chunk_mean_sq(buf, C)
        assert torch.equal(stream, grid[:, i * C : (i + 1) * C])
        torch.testing.assert_close(stream[:, 0], (buf * buf).sum(-1).mean(-1))
    # The partial last chunk averages over its own 5 steps.
    torch.testing.assert_close(grid[:, -1], (z[:, 3 * C :] ** 2).sum(-1).mean(-1))


def _model(eta_norm, context=16, write_gate=False):
    base = build_tiny_lm(context=context)
    cfg = TTTConfig(chunk_size=C, eta=0.5, eta_norm=eta_norm, layers=[0, 2], write_gate=write_gate)
    model = apply_ttt(copy.deepcopy(base), cfg)
    randomize_ttt(model)
    if write_gate:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for g in ttt_gatings(model).values():
                g.write_gate_w.copy_(torch.randn(g.write_gate_w.shape, generator=gen))
    return model


@pytest.mark.numerics
@pytest.mark.parametrize("write_gate", [False, True])
@pytest.mark.parametrize("pieces", [[1] * 45, [3, 7, 1, 13, 2, 19]])
def test_zsq_streaming_equals_the_full_forward(pieces, write_gate):
    model = _model("zsq", context=16 if len(pieces) == 45 else 64, write_gate=write_gate)
    model.eval()
    seq = random_codes(model, 2, 45)
    with torch.no_grad():
        full = model.forward_text(seq)[1]
        with model.streaming(2):
            outs, t = [], 0
            for n in pieces:
                outs.append(model.forward_text(seq[:, :, t : t + n])[1])
                t += n
            assert ttt_gatings(model)[0]._streaming_state.delta.any()
    torch.testing.assert_close(torch.cat(outs, 2), full, atol=2e-5, rtol=1e-4)


@pytest.mark.numerics
@pytest.mark.parametrize("write_gate", [False, True])
def test_zsq_per_element_chunk_ends_and_graph_steps_equal_the_full_forward(write_gate):
    # Element 1 runs 3 steps behind (exec_mask), so chunks complete for one element at a time and
    # _apply_update takes its per-element branch; the last steps run the CUDA-graph step path.
    model = _model("zsq", write_gate=write_gate)
    model.eval()
    seq = random_codes(model, 2, 30)
    gatings = list(ttt_gatings(model).values())
    with torch.no_grad():
        full = model.forward_text(seq)[1]
        with model.streaming(2):
            out0, out1 = [], []
            model.set_exec_mask(torch.tensor([True, False]))
            for t in range(3):
                out0.append(model.forward_text(seq[:, :, t : t + 1])[1][0])
            model.set_exec_mask(torch.tensor([True, True]))
            for t in range(3, 30):
                graph = t >= 20
                for g in gatings:
                    if graph:
                        g.prepare_graph_step()
                    g.graph_mode = graph
                step = torch.stack([seq[0, :, t : t + 1], seq[1, :, t - 3 : t - 2]])
                lg = model.forward_text(step)[1]
                for g in gatings:
                    g.graph_mode = False
                    g._streaming_state.graph_steps |= graph
                out0.append(lg[0])
                out1.append(lg[1])
    torch.testing.assert_close(torch.cat(out0, -2), full[0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat(out1, -2), full[1, :, :27], atol=2e-5, rtol=1e-4)


def test_config_rejects_unknown_eta_norm_and_other_variants():
    with pytest.raises(ValueError, match="TTTConfig.eta_norm"):
        TTTConfig(eta_norm="l2")
    with pytest.raises(ValueError, match="TTTConfig.eta_norm: applies to variant inplace only"):
        TTTConfig(eta_norm="zsq", variant="mlp")
    assert TTTConfig.from_dict({"eta": 3.0}).eta_norm == "none"  # older TTT files: raw eta


# ---------------------------------------------------------------- telemetry


@pytest.mark.parametrize("eta_norm", ["none", "zsq"])
def test_telemetry_ratios_match_their_definitions(eta_norm):
    g = _gating(eta_norm)
    T = 3 * C + 5
    x, src = torch.randn(2, T, g.dim, dtype=torch.float64), torch.randn(2, T, g.dim, dtype=torch.float64)
    g.record_stats = True
    with torch.no_grad():
        out = g(x, src)
        t = g.telemetry()
        g.updates_enabled = False
        off = g(x, src)
    assert g.telemetry().keys() == {"w_down_drift"}  # read once
    # The telemetry computes in float32.
    assert t["term_ratio"] == pytest.approx(float((out - off).norm() / off.norm()), rel=1e-5)
    z = g.activations(x).detach()
    assert t["z_sq_mean"] == pytest.approx(float((z * z).sum(-1).mean()), rel=1e-5)
    # One chunk's update, each written out as a [d, h] weight: W^(i) - W^(i-1) from the reference.
    v = g.update_target(src, z).detach()
    norms = [
        (g.config.eta * v[b, i * C : (i + 1) * C].T @ z[b, i * C : (i + 1) * C]).norm()
        for b in range(2)
        for i in range(3)  # the 3 complete chunks (the partial one is never applied)
    ]
    ratio = float(torch.stack(norms).mean() / g.w_down.detach().norm())
    assert t["chunk_update_ratio"] == pytest.approx(ratio, rel=1e-5)


@pytest.mark.numerics
def test_term_ratio_is_the_exact_term_under_bf16_autocast():
    # Under bf16, out - base would carry the output's rounding (~1e-3 relative): a TTT that is
    # effectively off must still read as ~eta-small, which is what a user looks for.
    model = _model("none")
    for g in ttt_gatings(model).values():
        g.config.eta = 1e-9
        g.record_stats = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(random_codes(model, 2, 3 * C))
    for g in ttt_gatings(model).values():
        t = g.telemetry()
        assert 0 < t["term_ratio"] < 1e-6 and 0 < t["chunk_update_ratio"] < 1e-6


def test_no_complete_chunk_reports_no_chunk_update():
    g = _gating("none")
    g.record_stats = True
    with torch.no_grad():
        g(
            torch.randn(1, C - 1, g.dim, dtype=torch.float64),
            torch.randn(1, C - 1, g.dim, dtype=torch.float64),
        )
    t = g.telemetry()
    assert "chunk_update_ratio" not in t and t["term_ratio"] == 0.0


def test_console_line_lists_each_layer():
    from finetune.trainer import ttt_console_line

    values = {
        "loss": 1.0,
        "ttt/layer1/term_ratio": 3.14e-3,
        "ttt/layer12/term_ratio": 2.0,
        "ttt/layer1/chunk_update_ratio": 1e-6,
        "ttt/layer12/chunk_update_ratio": 5e-5,
        "ttt/layer1/z_sq_mean": 4.0,
    }
    assert ttt_console_line(values) == "ttt/base L1 3.1e-03 L12 2.0e+00 | dW/W0 L1 1.0e-06 L12 5.0e-05"
    assert ttt_console_line({"loss": 1.0}) is None


def test_stats_are_recorded_once_under_gradient_checkpointing(monkeypatch):
    from moshi_ttt.gating import TTTGating

    calls = []
    original = TTTGating.sequence_stats
    monkeypatch.setattr(
        TTTGating, "sequence_stats", lambda self, z, v: calls.append(1) or original(self, z, v)
    )
    model = _model("zsq")
    model.transformer.checkpointing = True
    model.train()
    gatings = list(ttt_gatings(model).values())
    for g in gatings:
        g.record_stats = True
    out = model(random_codes(model, 2, 3 * C))
    out.text_logits[out.text_mask].sum().backward()  # recomputes every layer's forward
    assert len(calls) == len(gatings) and not any(g.record_stats for g in gatings)
    assert all(g.telemetry()["term_ratio"] > 0 for g in gatings)
