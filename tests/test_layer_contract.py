"""The TTT layer contract (moshi_ttt.layer.TTTLayer), checked for every registered variant and for a
toy third variant defined here, which needs no change outside its own class and one registry entry."""

import copy
from dataclasses import dataclass

import pytest
import torch
from conftest import random_codes, stream_text_logits
from moshi.models import LMModel

from moshi_ttt import (
    VARIANTS,
    ParamGroup,
    TTTConfig,
    TTTLayer,
    apply_ttt,
    load_ttt_config,
    load_ttt_weights,
    named_ttt_layers,
    save_ttt_weights,
    set_ttt_updates,
    ttt_gatings,
    ttt_state_dict,
)
from moshi_ttt.layer import TTTState
from moshi_ttt.tiny import build_tiny_lm, tiny_lm_kwargs

C = 8


# ---------------------------------------------------------------- a toy third variant
@dataclass
class _ToyState(TTTState):
    bias: torch.Tensor  # [B, d] float32: the fast bias of the current chunk
    init: torch.Tensor  # [d]: b0, what a reset returns to
    buf_x: torch.Tensor  # [B, C, d]

    def chunk_buffers(self):
        return (self.buf_x,)

    def reset(self, reset_mask):
        super().reset(reset_mask)
        self.bias[reset_mask] = self.init


class ToyGating(TTTLayer[_ToyState]):
    """Moshi's MLP plus a fast output bias: ``b^(i) = b^(i-1) + eta * mean(x[i]) W^T``, ``b^(0) = b0``.
    ``b0`` and ``W`` start at zero: the base model at init, with gradient reaching ``W``."""

    VARIANT = "toy"
    PARAM_GROUPS = (ParamGroup("toy_bias", "toy fast bias (b0, W)", ("b0", "w")),)
    SLOW_PARAMS = ("linear_in.", "linear_out.")

    def __init__(self, gating, config):
        super().__init__()
        self.config = config
        self.linear_in, self.linear_out, self.activation = (
            gating.linear_in,
            gating.linear_out,
            gating.activation,
        )
        w = gating.linear_out.weight
        self.dim = w.shape[0]
        self.b0 = torch.nn.Parameter(torch.empty(self.dim, device=w.device, dtype=w.dtype))
        self.w = torch.nn.Parameter(torch.empty(self.dim, self.dim, device=w.device, dtype=w.dtype))
        self.init_new_parameters()

    @classmethod
    def source(cls, config):
        return "hidden"

    @classmethod
    def _wrap(cls, gating, config):
        return cls(gating, config)

    def init_new_parameters(self):
        if not self.b0.is_meta:
            with torch.no_grad():
                self.b0.zero_(), self.w.zero_()

    def _param_telemetry(self):
        return {"b0_norm": self.b0.detach().norm().item()}

    def base(self, x):
        return self.linear_out(self.activations(x))

    def _forward_sequence(self, x, src, update):
        B, T, d = x.shape
        bias = self.b0.expand(B, 1, d)
        if update:  # chunk i reads the means of the (complete) chunks before it
            n = -(-T // C)
            means = torch.nn.functional.pad(x, (0, 0, 0, n * C - T)).view(B, n, C, d).mean(2) @ self.w.T
            before = torch.cumsum(means, 1) - means  # [B, n, d]
            bias = bias + self.config.eta * before.repeat_interleave(C, 1)[:, :T]
        return self.base(x) + bias

    def _init_streaming_state(self, batch_size):
        b0 = self.b0.detach().float()
        return _ToyState(
            batch_size,
            b0.device,
            pos=torch.zeros(batch_size, dtype=torch.long),
            bias=b0.expand(batch_size, self.dim).clone(),
            init=b0,
            buf_x=torch.zeros(batch_size, self.config.chunk_size, self.dim, device=b0.device),
        )

    def _chunk_start_output(self, state, x):
        return state.bias[:, None, :].expand(-1, x.shape[1], -1).clone()  # not a view: the state moves on

    def _apply_update(self, state, done):
        state.bias[done] += self.config.eta * state.buf_x[done].mean(1) @ self.w.T.float()

    def _forward_stream(self, x, src, state):
        return self.base(x) + torch.cat(self._stream_chunks(state, (x,), (x,)), 1).to(x.dtype)


@pytest.fixture(autouse=True)
def _toy_registered(monkeypatch):
    monkeypatch.setitem(VARIANTS, "toy", ToyGating)


SHIPPED = list(VARIANTS)
# "name+flag": the variant with a TTTConfig option that adds parameters (ParamGroup.when).
ALL = [*SHIPPED, "inplace+write_gate", "inplace+write_gate+write_gate_input=key", "toy"]


def config(variant, **kw):
    """TTTConfig of a variant name, or of "name+flag" / "name+key=value" (the variant with those options)."""
    name, *flags = variant.split("+")
    opts = dict(f.split("=", 1) if "=" in f else (f, True) for f in flags)
    return TTTConfig(variant=name, **opts, **{"mlp_heads": 4, **kw})


def make(variant, seed=0, context=16, eta=0.5, **kw):
    base = build_tiny_lm(seed=seed, context=context)
    cfg = config(variant, chunk_size=C, eta=eta, layers=[0, 2], **kw)
    return base, apply_ttt(copy.deepcopy(base), cfg)


def perturb(model, std=0.1, seed=0):
    """Move every TTT weight off its initial value, through the contract's list of TTT weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in named_ttt_layers(model):
            for name in layer.ttt_param_names():
                p = getattr(layer, name)
                p.add_(torch.randn(p.shape, generator=g) * std)


def test_the_registry_lists_the_shipped_variants_and_config_validates_against_it():
    assert set(VARIANTS) >= {"inplace", "mlp", "toy"}
    for name, cls in VARIANTS.items():
        assert issubclass(cls, TTTLayer) and cls.VARIANT == name
    TTTConfig(variant="toy")  # registered: valid
    with pytest.raises(ValueError, match=r"TTTConfig.variant: must be one of inplace, mlp, toy"):
        TTTConfig(variant="linear")


@pytest.mark.numerics
@pytest.mark.parametrize("variant", ALL)
def test_identity_at_init_in_training_and_streaming(variant):
    base, model = make(variant)
    codes = random_codes(base, 2, 29)
    assert all(type(g) is VARIANTS[variant.split("+")[0]] for g in ttt_gatings(model).values())
    base.train(), model.train()
    a, b = base(codes), model(codes)
    assert torch.equal(a.logits[a.mask], b.logits[b.mask])
    assert torch.equal(a.text_logits[a.text_mask], b.text_logits[b.text_mask])
    base.eval(), model.eval()
    with torch.no_grad(), base.streaming(2), model.streaming(2):
        for t in range(12):
            step = codes[:, :, t : t + 1]
            assert torch.equal(base.forward_text(step)[1], model.forward_text(step)[1])


@pytest.mark.parametrize("variant", ALL)
@pytest.mark.parametrize(
    "context, pieces",
    # A multi-step piece is exact only when moshi's ring KV cache covers it and its history: context 64.
    [(16, [1] * 45), (64, [3, 7, 1, 13, 2, 19])],
)
@pytest.mark.numerics
def test_streaming_equals_the_full_forward(variant, context, pieces):
    _, model = make(variant, context=context)
    perturb(model)
    model.eval()
    seq = random_codes(model, 2, 45)
    with torch.no_grad():
        full = model.forward_text(seq)[1]
        with model.streaming(2):
            streamed = stream_text_logits(model, seq, pieces)
    torch.testing.assert_close(streamed, full, atol=3e-5, rtol=1e-4)


def _graph_steps(model, seq):
    """One step at a time through the graph-mode path, as TTTLMGen drives it."""
    outs = []
    for t in range(seq.shape[-1]):
        for g in ttt_gatings(model).values():
            g.prepare_graph_step()
            g.graph_mode = True
        outs.append(model.forward_text(seq[:, :, t : t + 1])[1])
        for g in ttt_gatings(model).values():
            g.graph_mode = False
            g._streaming_state.graph_steps = True
    return torch.cat(outs, 2)


@pytest.mark.numerics
@pytest.mark.parametrize("variant", ALL)
def test_one_switch_turns_updates_off_in_every_forward_path(variant):
    _, model = make(variant)
    perturb(model)
    model.eval()
    seq = random_codes(model, 2, 37)
    zero_update = copy.deepcopy(model)
    ttt_gatings(zero_update)[0].config.eta = 0.0  # shared by the copy's layers: no update anywhere
    with torch.no_grad():
        on = model.forward_text(seq)[1]
        want = zero_update.forward_text(seq)[1]
        assert not torch.allclose(on, want, atol=1e-3)  # the updates matter here
        set_ttt_updates(model, False)
        assert all(g.freeze_updates for g in ttt_gatings(model).values())  # the older name reads it
        off = model.forward_text(seq)[1]
        with model.streaming(2):
            streamed = stream_text_logits(model, seq, [1] * 37)
        graphed = None
        if all(g.GRAPH_STEPS for g in ttt_gatings(model).values()):
            with model.streaming(2):
                graphed = _graph_steps(model, seq)
        set_ttt_updates(model, True)
        assert torch.equal(model.forward_text(seq)[1], on)
    # Updates off and eta 0 are the same function computed on different matrix shapes (a variant's
    # off path may skip its chunked inner loop: TTT-MLP reads its initial weights over the whole
    # sequence, the eta-0 dual form chunk by chunk), like streaming (one step) against the full
    # forward. float32 GEMM kernels round by shape, and differently on AVX2 and AVX-512 CPUs (MKL:
    # 1.5e-6 here on AVX2 for TTT-MLP, exact on AVX-512), so both hold to the same shape tolerance.
    torch.testing.assert_close(off, want, atol=3e-5, rtol=1e-4)
    torch.testing.assert_close(streamed, want, atol=3e-5, rtol=1e-4)
    if graphed is not None:
        torch.testing.assert_close(graphed, want, atol=3e-5, rtol=1e-4)


def test_updates_off_is_the_exported_base_model_for_inplace():
    # In-Place TTT with updates off is Moshi's own MLP with W_down = w_down: the moshi export.
    from moshi_ttt import to_moshi_state_dict

    _, model = make("inplace")
    perturb(model)
    vanilla = LMModel(device="cpu", **tiny_lm_kwargs(context=16))
    vanilla.load_state_dict(to_moshi_state_dict(model))
    set_ttt_updates(model, False)
    codes = random_codes(model, 2, 29)
    model.train(), vanilla.train()
    a, b = model(codes), vanilla(codes)
    assert torch.equal(a.text_logits[a.text_mask], b.text_logits[b.text_mask])
    assert torch.equal(a.logits[a.mask], b.logits[b.mask])


@pytest.mark.parametrize("variant", ALL)
def test_new_parameters_are_what_a_vanilla_checkpoint_lacks_and_initialise_to_identity(variant):
    base = build_tiny_lm(seed=0, context=16)
    cfg = config(variant, chunk_size=C, layers=[0, 2])
    model = apply_ttt(LMModel(device="meta", **tiny_lm_kwargs(context=16)), cfg)
    res = model.load_state_dict(base.state_dict(), strict=False, assign=True)
    layers = dict(named_ttt_layers(model))
    assert res.unexpected_keys == []
    new = {f"{n}.{p}" for n, layer in layers.items() for p in layer.new_param_names()}
    assert sorted(res.missing_keys) == sorted(new) and new
    pretrained = set(ttt_state_dict(model)) - new  # TTT weights taken from the checkpoint
    assert all(not dict(model.named_parameters())[k].is_meta for k in pretrained)
    for layer in layers.values():
        assert layer.materialise_new_parameters("cpu") is True
        assert layer.materialise_new_parameters("cpu") is False  # nothing left on meta
    assert not any(p.is_meta for p in model.parameters())
    codes = random_codes(base, 2, 29)
    base.train(), model.train()
    assert torch.equal(base(codes).text_logits, model(codes).text_logits)
    # A perturbed layer goes back to the base model through init_new_parameters (plus, for
    # pretrained TTT weights, the checkpoint's values).
    perturb(model)
    for layer in layers.values():
        layer.init_new_parameters()
    model.load_state_dict(base.state_dict(), strict=False)
    assert torch.equal(base(codes).text_logits, model(codes).text_logits)


@pytest.mark.parametrize("variant", ALL)
def test_a_checkpoint_with_some_new_parameters_only_is_refused(variant):
    model = apply_ttt(
        LMModel(device="meta", **tiny_lm_kwargs(context=16)),
        config(variant, chunk_size=C, layers=[0]),
    )
    layer = ttt_gatings(model)[0]
    names = layer.new_param_names()
    assert len(names) > 1
    setattr(layer, names[0], torch.nn.Parameter(torch.zeros(getattr(layer, names[0]).shape)))
    with pytest.raises(ValueError, match="holds .* but not"):
        layer.materialise_new_parameters("cpu")


@pytest.mark.parametrize("variant", ALL)
def test_ttt_weights_file_round_trips(variant, tmp_path):
    base, model = make(variant)
    perturb(model)
    path = save_ttt_weights(model, tmp_path / "ttt.safetensors")
    rebuilt = apply_ttt(copy.deepcopy(base), load_ttt_config(path))
    load_ttt_weights(rebuilt, path)
    codes = random_codes(base, 1, 30)
    rebuilt.eval(), model.eval()
    assert torch.equal(rebuilt(codes).text_logits, model(codes).text_logits)


@pytest.mark.parametrize("variant", ALL)
def test_telemetry_reports_the_recorded_update(variant):
    _, model = make(variant)
    perturb(model)
    model.train()
    for g in ttt_gatings(model).values():
        g.record_stats = True
    model(random_codes(model, 2, 29))
    for g in ttt_gatings(model).values():
        t = g.telemetry()
        assert all(isinstance(v, float) for v in t.values()) and len(t) >= 1
        if variant != "toy":  # the toy variant records no update norm
            assert t["update_norm"] > 0
        assert "update_norm" not in g.telemetry()  # read once


@pytest.mark.parametrize("variant", ALL)
def test_finetune_param_groups_come_from_the_contract(variant, tmp_path):
    from finetune.args import load_config
    from finetune.model import param_groups, param_table, set_trainable

    _, model = make(variant)
    groups = param_groups(model)
    for name, layer in named_ttt_layers(model):
        for g in layer.param_groups():
            assert {groups[f"{name}.{p}"] for p in g.params} == {g.name}
            assert g.label in param_table(model)
        for p, _ in layer.named_parameters():
            if p.startswith(layer.SLOW_PARAMS):
                assert groups[f"{name}.{p}"] == "slow"
    ttt = {k for k, v in groups.items() if v not in ("slow", "lora", "rest")}
    assert ttt == set(ttt_state_dict(model))
    cfg = load_config(
        None, {"run_dir": str(tmp_path), "finetune": "ttt_only", "ttt": {"train_w_down": False}}
    )
    set_trainable(model, cfg)
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    pretrained = {
        f"{n}.{p}"
        for n, layer in named_ttt_layers(model)
        for g in layer.param_groups()
        if g.pretrained
        for p in g.params
    }
    assert trainable == ttt - pretrained
