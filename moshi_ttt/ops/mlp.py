"""TTT-MLP fast-weight operators (the TTT-Linear/TTT-MLP line of work): the specification and the fast form.

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

The inner loop runs in float32. The layer around these ops (projections, gate, streaming) is
:class:`moshi_ttt.ttt_mlp.TTTMLPGating`.

:func:`ttt_mlp_reference` is the specification (per-chunk inner gradients by ``torch.autograd``);
:func:`ttt_mlp_chunked` is the fast form (closed-form inner gradients, every token of a chunk and
every head and batch element in one batched matmul).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

__all__ = ["FastWeights", "ln_target", "ttt_mlp_chunked", "ttt_mlp_reference"]

_SQRT_2PI = math.sqrt(2 * math.pi)


def _gelu(a: torch.Tensor) -> torch.Tensor:
    return F.gelu(a)


def _gelu_grad(a: torch.Tensor) -> torch.Tensor:
    """d gelu(a) / da for the exact (erf) gelu: Phi(a) + a phi(a)."""
    return 0.5 * (1 + torch.erf(a / math.sqrt(2))) + a * torch.exp(-0.5 * a * a) / _SQRT_2PI


def ln_target(
    xv: torch.Tensor, xk: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """``LN(XV - XK)`` per head: ``xv, xk [..., H, c, D]``, ``weight, bias [H, D]``."""
    diff = xv - xk
    mu = diff.mean(-1, keepdim=True)
    var = diff.var(-1, keepdim=True, unbiased=False)
    return (diff - mu) / torch.sqrt(var + eps) * weight[:, None, :] + bias[:, None, :]


@dataclass
class FastWeights:
    """The fast MLP's weights, one set per batch element and head (float32)."""

    w1: torch.Tensor  # [B, H, D, E]
    b1: torch.Tensor  # [B, H, 1, E]
    w2: torch.Tensor  # [B, H, E, D]
    b2: torch.Tensor  # [B, H, 1, D]

    def tuple(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.w1, self.b1, self.w2, self.b2

    @classmethod
    def expand(cls, init: tuple[torch.Tensor, ...], B: int) -> FastWeights:
        """``init = (W1 [H,D,E], b1 [H,E], W2 [H,E,D], b2 [H,D])`` as float32 views for ``B`` elements."""
        w1, b1, w2, b2 = (t.float() for t in init)
        return cls(
            w1.expand(B, *w1.shape),
            b1[:, None].expand(B, *b1.shape[:1], 1, b1.shape[-1]),
            w2.expand(B, *w2.shape),
            b2[:, None].expand(B, *b2.shape[:1], 1, b2.shape[-1]),
        )

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """``f_W(x) = gelu(x W1 + b1) W2 + b2`` for ``x [B, H, T, D]``."""
        return _gelu(x @ self.w1 + self.b1) @ self.w2 + self.b2


def _check(xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor, lr: torch.Tensor, chunk_size: int) -> None:
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


def ttt_mlp_reference(
    xq: torch.Tensor,
    xk: torch.Tensor,
    xv: torch.Tensor,
    lr: torch.Tensor,
    init: tuple[torch.Tensor, ...],
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    chunk_size: int,
) -> tuple[torch.Tensor, FastWeights]:
    """Specification: per chunk, output with W^(i-1), then a step along autograd's inner gradient.

    ``xq, xk, xv [B, H, T, D]``, ``lr [B, H, T]``, ``init = (W1 [H,D,E], b1 [H,E], W2 [H,E,D], b2 [H,D])``.
    Returns ``(out [B, H, T, D], final FastWeights)``.
    """
    _check(xq, xk, xv, lr, chunk_size)
    B, H, T, D = xq.shape
    w = FastWeights.expand(init, B)
    params = list(w.tuple())
    outs = []
    for s in range(0, T, chunk_size):
        q, k, v = (t[:, :, s : s + chunk_size].float() for t in (xq, xk, xv))
        rate = lr[:, :, s : s + chunk_size].float()
        cur = FastWeights(*params)
        outs.append(cur.mlp(q))
        y = ln_target(v, k, ln_weight.float(), ln_bias.float())
        per_token = 0.5 * ((cur.mlp(k) - y) ** 2).sum(-1)  # [B, H, c]
        loss = (rate * per_token).sum() / q.shape[2]
        grads = torch.autograd.grad(loss, params, create_graph=True)
        params = [p - g for p, g in zip(params, grads)]
    return torch.cat(outs, 2), FastWeights(*params)


def ttt_mlp_chunked(
    xq: torch.Tensor,
    xk: torch.Tensor,
    xv: torch.Tensor,
    lr: torch.Tensor,
    init: tuple[torch.Tensor, ...] | None,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    chunk_size: int,
    state: FastWeights | None = None,
) -> tuple[torch.Tensor, FastWeights]:
    """Fast form of :func:`ttt_mlp_reference` (same arguments, same results), closed-form inner gradients.

    ``state``: start from these per-element fast weights instead of ``init`` (streaming).
    """
    _check(xq, xk, xv, lr, chunk_size)
    B, H, T, D = xq.shape
    w = state if state is not None else FastWeights.expand(init, B)
    lw, lb = ln_weight.float(), ln_bias.float()
    outs = []
    for s in range(0, T, chunk_size):
        q, k, v = (t[:, :, s : s + chunk_size].float() for t in (xq, xk, xv))
        c = q.shape[2]
        outs.append(w.mlp(q))
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
