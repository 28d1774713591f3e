"""A second TTT variant: a TTT-MLP branch (the TTT-Linear/TTT-MLP line of work) beside Moshi's MLP.

Per head ``h`` (``D = dim / heads``, ``E = expansion * D``) the fast weights are a two-layer MLP
``f_W(x) = gelu(x W1 + b1) W2 + b2`` with ``W = (W1 [D, E], b1 [E], W2 [E, D], b2 [D])``. From the MLP
input ``x`` the branch computes ``XQ, XK, XV = x Wq, x Wk, x Wv`` and a per-token inner learning
rate ``lr_t = eta * sigmoid(x_t . w_lr + b_lr)``. The self-supervised target is normalised *after*
the difference (an earlier attempt normalised ``XV`` alone and subtracted ``XK`` afterwards)::

    y_t = LN(XV_t - XK_t)            (per head over D, learned scale and shift)
    l_t(W) = 1/2 || f_W(XK_t) - y_t ||^2

The sequence is cut into chunks of ``chunk_size`` (the mini-batches) aligned to its start. As for In-Place
TTT, chunk ``i`` is computed with the weights before its own step, then one gradient step is taken on
the chunk's mean loss::

    O[i]  = f_{W^(i-1)}(XQ[i])
    W^(i) = W^(i-1) - (1 / |i|) sum_{t in i} lr_t grad_W l_t(W^(i-1))

The branch output ``concat_h(O) Wo^T`` joins the layer as a residual gated by ``tanh(alpha)``, with
``alpha = 0`` at the start, so the model equals the base model at init while ``alpha`` receives
gradient. The initial fast weights are parameters trained by the optimizer, never overwritten by the
forward pass; streaming keeps one copy per batch element in the streaming state. The inner loop runs
in float32.

:func:`ttt_mlp_reference` is the specification (per-chunk inner gradients by ``torch.autograd``);
:func:`ttt_mlp_chunked` is the fast form (closed-form inner gradients, every token of a chunk and
every head and batch element in one batched matmul).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from moshi.modules.streaming import State, StreamingModule
from torch import nn
from torch.nn import functional as F

from .config import TTTConfig
from .ops import _no_autocast

_SQRT_2PI = math.sqrt(2 * math.pi)


def _gelu(a: torch.Tensor) -> torch.Tensor:
    return F.gelu(a)


def _gelu_grad(a: torch.Tensor) -> torch.Tensor:
    """d gelu(a) / da for the exact (erf) gelu: Phi(a) + a phi(a)."""
    return 0.5 * (1 + torch.erf(a / math.sqrt(2))) + a * torch.exp(-0.5 * a * a) / _SQRT_2PI


def ln_target(
    xv: torch.Tensor, xk: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6
):
    """``LN(XV - XK)`` per head: ``xv, xk [..., H, c, D]``, ``weight, bias [H, D]``."""
    diff = xv - xk
    mu = diff.mean(-1, keepdim=True)
    var = diff.var(-1, keepdim=True, unbiased=False)
    return (diff - mu) / torch.sqrt(var + eps) * weight[:, None, :] + bias[:, None, :]


@dataclass
class FastWeights:
    w1: torch.Tensor  # [B, H, D, E]
    b1: torch.Tensor  # [B, H, 1, E]
    w2: torch.Tensor  # [B, H, E, D]
    b2: torch.Tensor  # [B, H, 1, D]

    def tuple(self):
        return self.w1, self.b1, self.w2, self.b2


def _expand(init: tuple[torch.Tensor, ...], B: int) -> FastWeights:
    w1, b1, w2, b2 = (t.float() for t in init)
    return FastWeights(
        w1.expand(B, *w1.shape),
        b1[:, None].expand(B, *b1.shape[:1], 1, b1.shape[-1]),
        w2.expand(B, *w2.shape),
        b2[:, None].expand(B, *b2.shape[:1], 1, b2.shape[-1]),
    )


def _mlp(x: torch.Tensor, w: FastWeights) -> torch.Tensor:
    return _gelu(x @ w.w1 + w.b1) @ w.w2 + w.b2


def _check(xq, xk, xv, lr, chunk_size):
    if xq.dim() != 4 or xq.shape != xk.shape or xq.shape != xv.shape:
        raise ValueError(
            f"xq, xk, xv must share one shape [B, H, T, D], got {tuple(xq.shape)}, {tuple(xk.shape)}, {tuple(xv.shape)}"
        )
    if lr.shape != xq.shape[:3]:
        raise ValueError(f"lr must have shape [B, H, T] = {tuple(xq.shape[:3])}, got {tuple(lr.shape)}")
    if xq.shape[2] == 0:
        raise ValueError("empty sequence: T = 0")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")


def ttt_mlp_reference(xq, xk, xv, lr, init, ln_weight, ln_bias, chunk_size):
    """Specification: per chunk, output with W^(i-1), then a step along autograd's inner gradient.

    ``xq, xk, xv [B, H, T, D]``, ``lr [B, H, T]``, ``init = (W1 [H,D,E], b1 [H,E], W2 [H,E,D], b2 [H,D])``.
    Returns ``(out [B, H, T, D], final FastWeights)``.
    """
    _check(xq, xk, xv, lr, chunk_size)
    B, H, T, D = xq.shape
    w = _expand(init, B)
    params = list(w.tuple())
    outs = []
    for s in range(0, T, chunk_size):
        q, k, v = (t[:, :, s : s + chunk_size].float() for t in (xq, xk, xv))
        rate = lr[:, :, s : s + chunk_size].float()
        cur = FastWeights(*params)
        outs.append(_mlp(q, cur))
        y = ln_target(v, k, ln_weight.float(), ln_bias.float())
        per_token = 0.5 * ((_mlp(k, cur) - y) ** 2).sum(-1)  # [B, H, c]
        loss = (rate * per_token).sum() / q.shape[2]
        grads = torch.autograd.grad(loss, params, create_graph=True)
        params = [p - g for p, g in zip(params, grads)]
    return torch.cat(outs, 2), FastWeights(*params)


def ttt_mlp_chunked(xq, xk, xv, lr, init, ln_weight, ln_bias, chunk_size, state: FastWeights | None = None):
    """Fast form of :func:`ttt_mlp_reference` (same arguments, same results), closed-form inner gradients.

    ``state``: start from these per-element fast weights instead of ``init`` (streaming).
    """
    _check(xq, xk, xv, lr, chunk_size)
    B, H, T, D = xq.shape
    w = state if state is not None else _expand(init, B)
    lw, lb = ln_weight.float(), ln_bias.float()
    outs = []
    for s in range(0, T, chunk_size):
        q, k, v = (t[:, :, s : s + chunk_size].float() for t in (xq, xk, xv))
        c = q.shape[2]
        outs.append(_mlp(q, w))
        a = k @ w.w1 + w.b1  # [B, H, c, E]
        hid = _gelu(a)
        err = hid @ w.w2 + w.b2 - ln_target(v, k, lw, lb)  # [B, H, c, D]
        g = err * (lr[:, :, s : s + chunk_size].float() / c)[..., None]  # dLoss/dprediction
        gh = (g @ w.w2.transpose(-1, -2)) * _gelu_grad(a)  # dLoss/da
        w = FastWeights(
            w.w1 - k.transpose(-1, -2) @ gh,
            w.b1 - gh.sum(2, keepdim=True),
            w.w2 - hid.transpose(-1, -2) @ g,
            w.b2 - g.sum(2, keepdim=True),
        )
    return torch.cat(outs, 2), w


@dataclass
class _MLPState(State):
    fast: FastWeights  # per batch element, float32
    init: FastWeights  # W^(0) per batch element (views of the parameters), what resets return to
    buf_x: torch.Tensor  # [B, C, dim]: the MLP inputs of the current chunk so far
    pos: torch.Tensor  # [B] int64 on CPU

    def reset(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        m = reset_mask.to(self.buf_x.device)
        for cur, init in zip(self.fast.tuple(), self.init.tuple()):
            cur[m] = init[m]
        self.pos[reset_mask.cpu()] = 0


class TTTMLPGating(StreamingModule[_MLPState]):
    """Moshi's gated MLP plus a TTT-MLP residual branch gated by ``tanh(alpha)`` (``alpha = 0`` at init)."""

    _fsdp_final = True
    SLOW_PARAMS = ("linear_in.", "linear_out.")  # the layer's own MLP
    TTT_PARAMS = (
        "q_proj",
        "k_proj",
        "v_proj",
        "lr_proj",
        "lr_bias",
        "ln_weight",
        "ln_bias",
        "w1",
        "b1",
        "w2",
        "b2",
        "o_proj",
        "alpha",
    )

    def __init__(
        self,
        linear_in: nn.Module,
        linear_out: nn.Module,
        activation,
        dim: int,
        config: TTTConfig,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        H = config.mlp_heads
        if dim % H:
            raise ValueError(f"TTTConfig.mlp_heads: {H} does not divide the model dimension {dim}")
        D, E = dim // H, config.mlp_expansion * (dim // H)
        self.config, self.dim, self.heads, self.head_dim = config, dim, H, D
        self.linear_in, self.linear_out, self.activation = linear_in, linear_out, activation
        f = {"device": device, "dtype": dtype}
        self.q_proj = nn.Parameter(torch.empty(H * D, dim, **f))
        self.k_proj = nn.Parameter(torch.empty(H * D, dim, **f))
        self.v_proj = nn.Parameter(torch.empty(H * D, dim, **f))
        self.lr_proj = nn.Parameter(torch.zeros(H, dim, **f))
        self.lr_bias = nn.Parameter(torch.zeros(H, **f))
        self.ln_weight = nn.Parameter(torch.ones(H, D, **f))
        self.ln_bias = nn.Parameter(torch.zeros(H, D, **f))
        self.w1 = nn.Parameter(torch.empty(H, D, E, **f))
        self.b1 = nn.Parameter(torch.zeros(H, E, **f))
        self.w2 = nn.Parameter(torch.empty(H, E, D, **f))
        self.b2 = nn.Parameter(torch.zeros(H, D, **f))
        self.o_proj = nn.Parameter(torch.empty(dim, H * D, **f))
        self.alpha = nn.Parameter(torch.zeros((), **f))
        self.reset_ttt_parameters()
        self.freeze_updates = False
        self.record_stats = False
        self.last_update_norm: torch.Tensor | None = None

    @classmethod
    def from_gating(cls, gating: nn.Module, config: TTTConfig) -> TTTMLPGating:
        for attr in ("linear_in", "linear_out", "activation"):
            if not hasattr(gating, attr):
                raise ValueError(
                    f"TTT needs a gated MLP (moshi ActivationGating), got {type(gating).__name__} without `{attr}`"
                )
        ref = next(gating.parameters())
        dim = ref.shape[1] if isinstance(gating.linear_in, nn.Linear) else gating.linear_in.in_features
        return cls(gating.linear_in, gating.linear_out, gating.activation, dim, config, ref.device, ref.dtype)

    def reset_ttt_parameters(self) -> None:
        if self.q_proj.device.type == "meta":
            return
        with torch.no_grad():
            for p in (self.q_proj, self.k_proj, self.v_proj, self.w1, self.w2, self.o_proj):
                nn.init.normal_(p, std=0.02)
            for p in (self.lr_proj, self.lr_bias, self.b1, self.b2, self.ln_bias, self.alpha):
                p.zero_()
            self.ln_weight.fill_(1.0)

    def telemetry(self) -> dict[str, float]:
        """Training telemetry: the branch gate ``tanh(alpha)`` and the last sequence's update norm."""
        a = self.alpha.detach()
        if hasattr(a, "full_tensor"):
            a = a.full_tensor()
        out = {"gate": float(torch.tanh(a.float()))}
        if self.last_update_norm is not None:
            out["update_norm"] = self.last_update_norm.item()
            self.last_update_norm = None
        return out

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"dim={self.dim}, heads={self.heads}, expansion={c.mlp_expansion}, chunk_size={c.chunk_size}, "
            f"eta={c.eta}"
        )

    # ---------------------------------------------------------------- computations
    def base(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear_in(x)
        B, T, _ = y.shape
        y = y.view(B, T, 2, -1)
        return self.linear_out(self.activation(y[..., 0, :]) * y[..., 1, :])

    def _heads(self, x: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return F.linear(x, proj).view(B, T, self.heads, self.head_dim).transpose(1, 2).float()  # [B, H, T, D]

    def projections(self, x: torch.Tensor):
        xq, xk, xv = (self._heads(x, p) for p in (self.q_proj, self.k_proj, self.v_proj))
        lr = self.config.eta * torch.sigmoid(F.linear(x, self.lr_proj, self.lr_bias).float()).transpose(1, 2)
        return xq, xk, xv, lr  # lr [B, H, T]

    def _init(self):
        return self.w1, self.b1, self.w2, self.b2

    def _merge(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        B, H, T, D = o.shape
        o = o.transpose(1, 2).reshape(B, T, H * D).to(x.dtype)
        return torch.tanh(self.alpha).to(x.dtype) * F.linear(o, self.o_proj)

    def forward(self, x: torch.Tensor, src: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"TTT-MLP gating input must be [B, T, {self.dim}], got {tuple(x.shape)}")
        if x.shape[1] == 0:
            raise ValueError("TTT-MLP gating got an empty sequence (T = 0)")
        state = self._streaming_state
        if state is not None:
            return self.base(x) + self._stream(x, state)
        xq, xk, xv, lr = self.projections(x)
        with _no_autocast(x.device):
            o, final = ttt_mlp_chunked(
                xq, xk, xv, lr, self._init(), self.ln_weight, self.ln_bias, self.config.chunk_size
            )
        if self.record_stats:
            with torch.no_grad():
                upd = [
                    (a - b.float()).flatten(1).norm(dim=1) ** 2
                    for a, b in zip(final.tuple(), _expand(self._init(), x.shape[0]).tuple())
                ]
                self.last_update_norm = torch.stack(upd).sum(0).sqrt().mean()
        return self.base(x) + self._merge(o, x)

    # ---------------------------------------------------------------- streaming
    def _init_streaming_state(self, batch_size: int) -> _MLPState:
        dev = self.w1.device
        init = _expand(tuple(t.detach() for t in self._init()), batch_size)
        fast = FastWeights(*(t.clone() for t in init.tuple()))
        return _MLPState(
            batch_size,
            dev,
            fast=fast,
            init=init,
            buf_x=torch.zeros(batch_size, self.config.chunk_size, self.dim, device=dev, dtype=self.w1.dtype),
            pos=torch.zeros(batch_size, dtype=torch.long),
        )

    @torch.no_grad()
    def _stream(self, x: torch.Tensor, state: _MLPState) -> torch.Tensor:
        B, T, _ = x.shape
        if B != state.batch_size:
            raise ValueError(f"streaming batch size is {state.batch_size}, got an input of batch {B}")
        C = self.config.chunk_size
        active = state.exec_mask.cpu()
        pos = state.pos
        outs = []
        t = 0
        while t < T:
            L = T - t
            if active.any():
                L = min(L, int((C - pos[active]).min()))
            xs = x[:, t : t + L]
            outs.append(_mlp(self._heads(xs, self.q_proj), state.fast))
            for b in active.nonzero().flatten().tolist():
                p = int(pos[b])
                state.buf_x[b, p : p + L] = xs[b].to(state.buf_x.dtype)
            pos[active] += L
            done = pos == C
            if done.any() and not self.freeze_updates:
                idx = done.nonzero().flatten().to(x.device)
                xb = state.buf_x[idx]
                xq, xk, xv, lr = self.projections(xb)
                sub = FastWeights(*(f[idx] for f in state.fast.tuple()))
                _, new = ttt_mlp_chunked(xq, xk, xv, lr, None, self.ln_weight, self.ln_bias, C, state=sub)
                for cur, upd in zip(state.fast.tuple(), new.tuple()):
                    cur[idx] = upd
            pos[done] = 0
            t += L
        o = torch.cat(outs, 2)  # [B, H, T, D]
        return self._merge(o, x)
