"""TTT-MLP fast-weight operators: the sequential specification and the fast (dual) form.

One head of one batch element (``D`` the head dimension, ``E = expansion * D``). The fast weights
``W = (W1 [D, E], b1 [E], W2 [E, D], b2 [D])`` define the MLP ``f_W(x) = gelu(x W1 + b1) W2 + b2``
(gelu: the tanh approximation). The inner model is ``x + LN(f_W(x))``, ``LN`` a LayerNorm over ``D``
with the head's learned scale and shift (slow weights, trained by the outer loop only). From keys,
values and queries ``k_t, v_t, q_t`` (``[D]`` each) and a per-token rate ``r_t`` the inner loss and
the output are::

    l_t(W) = 1/2 || LN(f_W(k_t)) - (v_t - k_t) ||^2          (the residual makes the target v - k)
    o_t    = q_t + LN(f_{W_t}(q_t))

The sequence is cut into mini-batches (chunks) of ``C`` tokens aligned to its start. Inside a chunk
every token's gradient is taken at the chunk-start weights ``W_0`` (mini-batch gradient descent),
and the token at position ``i`` of its chunk reads the weights moved by itself and every earlier
token of the chunk::

    W_i = W_0 - tau_i * sum_{s <= i} r_s grad l_s(W_0),      tau_i = max(1 / (i + 1) + tau'_i, 0)

``tau'`` is a learned per-position offset (zero at init, so ``tau_i`` starts as the running mean
``1/(i+1)``). The next chunk starts from the weights of the chunk's last token, ``W_{n-1}``.

The functions:

- :func:`ttt_mlp_reference` is the specification: token by token, the gradients by
  ``torch.autograd``, the weights of every token materialised. Tests run it in float64.
- :func:`ttt_mlp_piece` is the building block of the fast form: the outputs of a run of consecutive
  tokens of one chunk, without materialising one weight per token (the lower-triangular "dual" form:
  ``Z1_j = q_j W1_0 + b1_0 - sum_{s <= j} tau_j r_s (q_j . k_s + 1) g1_s`` and likewise for the second
  layer, with the closed-form gradients ``g2 = dl/dZ2`` through the LayerNorm and ``g1 = dl/dZ1``),
  starting from the chunk-start weights plus a running sum ``acc = sum r_s grad l_s`` of the chunk's
  earlier tokens. Training calls it once per chunk (``acc`` zero); streaming calls it once per
  piece of steps and keeps ``acc`` between calls, so the two compute the same thing.
- :func:`ttt_mlp_chunked` is the training form: :func:`ttt_mlp_piece` per chunk, every token,
  head and batch element of a chunk in one batched product, autograd through all of it.

Fast-weight math runs in float32 (float64 when an input is float64), whatever the model dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

__all__ = [
    "FastWeights",
    "InnerParams",
    "gelu_grad",
    "ln_l2_grad",
    "read_out",
    "token_weights",
    "ttt_mlp_chunked",
    "ttt_mlp_piece",
    "ttt_mlp_reference",
]

LN_EPS = 1e-6  # ttt-lm-pytorch's inner LayerNorm epsilon
_GELU_C = math.sqrt(2 / math.pi)


def _gelu(a: torch.Tensor) -> torch.Tensor:
    return F.gelu(a, approximate="tanh")


def gelu_grad(a: torch.Tensor) -> torch.Tensor:
    """``d gelu(a) / da`` for the tanh approximation ``gelu(a) = a/2 (1 + tanh(c (a + 0.044715 a^3)))``."""
    th = torch.tanh(_GELU_C * (a + 0.044715 * a**3))
    return 0.5 * (1 + th) + 0.5 * a * (1 - th * th) * _GELU_C * (1 + 3 * 0.044715 * a * a)


def _ln(
    z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head LayerNorm of ``z [B, H, L, D]`` with ``weight, bias [H, D]``: ``(output, z_hat, std)``."""
    std = torch.sqrt(z.var(-1, keepdim=True, unbiased=False) + LN_EPS)
    z_hat = (z - z.mean(-1, keepdim=True)) / std
    return z_hat * weight[:, None] + bias[:, None], z_hat, std


def ln_l2_grad(
    z: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """``d/dz 1/2 ||LN(z) - target||^2`` per row, ``z, target [B, H, L, D]``, ``weight, bias [H, D]``.

    LayerNorm's backward: with ``h = (LN(z) - target) * weight`` (the gradient at the normalised
    ``z_hat``), ``dl/dz = (h - mean(h) - z_hat * mean(h * z_hat)) / std(z)``.
    """
    y, z_hat, std = _ln(z, weight, bias)
    h = (y - target) * weight[:, None]
    return (h - h.mean(-1, keepdim=True) - z_hat * (h * z_hat).mean(-1, keepdim=True)) / std


def token_weights(token_offset: torch.Tensor) -> torch.Tensor:
    """``tau_i = max(1 / (i + 1) + tau'_i, 0)`` for the positions of a chunk, from the offsets ``tau' [C]``."""
    pos = torch.arange(1, token_offset.shape[0] + 1, device=token_offset.device, dtype=token_offset.dtype)
    return torch.clamp_min(1.0 / pos + token_offset, 0.0)


@dataclass
class FastWeights:
    """The fast MLP's weights, one set per batch element and head."""

    w1: torch.Tensor  # [B, H, D, E]
    b1: torch.Tensor  # [B, H, 1, E]
    w2: torch.Tensor  # [B, H, E, D]
    b2: torch.Tensor  # [B, H, 1, D]

    def tuple(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.w1, self.b1, self.w2, self.b2

    @classmethod
    def expand(
        cls, init: tuple[torch.Tensor, ...], B: int, dtype: torch.dtype = torch.float32
    ) -> FastWeights:
        """``init = (W1 [H,D,E], b1 [H,E], W2 [H,E,D], b2 [H,D])`` as ``dtype`` views for ``B`` elements."""
        w1, b1, w2, b2 = (t.to(dtype) for t in init)
        return cls(
            w1.expand(B, *w1.shape),
            b1[:, None].expand(B, b1.shape[0], 1, b1.shape[-1]),
            w2.expand(B, *w2.shape),
            b2[:, None].expand(B, b2.shape[0], 1, b2.shape[-1]),
        )

    def zeros_like(self) -> FastWeights:
        return FastWeights(*(torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in self.tuple()))

    def step(self, acc: FastWeights, scale: torch.Tensor | float) -> FastWeights:
        """``self - scale * acc``; ``scale`` a number or ``[B]`` (one per batch element)."""
        if isinstance(scale, torch.Tensor) and scale.dim() == 1:
            scale = scale[:, None, None, None]
        return FastWeights(*(w - scale * a for w, a in zip(self.tuple(), acc.tuple())))

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """``f_W(x) = gelu(x W1 + b1) W2 + b2`` for ``x [B, H, T, D]``."""
        return _gelu(x @ self.w1 + self.b1) @ self.w2 + self.b2


@dataclass
class InnerParams:
    """The inner loop's learned parameters (slow weights, trained by the outer loop only)."""

    init: tuple[torch.Tensor, ...]  # the initial fast weights: W1 [H,D,E], b1 [H,E], W2 [H,E,D], b2 [H,D]
    ln_weight: torch.Tensor  # [H, D]: the inner LayerNorm's scale
    ln_bias: torch.Tensor  # [H, D]: and shift
    token_offset: torch.Tensor  # [C]: the rate offsets tau' of the chunk positions

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (*self.init, self.ln_weight, self.ln_bias, self.token_offset)


def read_out(
    w: FastWeights, xq: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor
) -> torch.Tensor:
    """The inner model at the queries with fixed weights: ``XQ + LN(f_W(XQ))``, ``xq [B, H, T, D]``."""
    return xq + _ln(w.mlp(xq), ln_weight, ln_bias)[0]


def _compute_dtype(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _check(
    xq: torch.Tensor,
    xk: torch.Tensor,
    xv: torch.Tensor,
    lr: torch.Tensor,
    token_offset: torch.Tensor,
    chunk_size: int,
) -> None:
    if xq.dim() != 4 or xq.shape != xk.shape or xq.shape != xv.shape:
        raise ValueError(
            f"xq, xk, xv must share one shape [B, H, T, D], got {tuple(xq.shape)}, {tuple(xk.shape)}, "
            f"{tuple(xv.shape)}"
        )
    if lr.shape != xq.shape[:3]:
        raise ValueError(f"lr must have shape [B, H, T] = {tuple(xq.shape[:3])}, got {tuple(lr.shape)}")
    if xq.shape[2] == 0:
        raise ValueError("empty sequence: T = 0")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    if token_offset.shape != (chunk_size,):
        raise ValueError(
            f"token_offset must have shape [chunk_size] = [{chunk_size}], got {tuple(token_offset.shape)}"
        )


def _ln_reference(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Per-head ``F.layer_norm`` of ``z [B, H, ..., D]`` (a loop over heads, for the specification)."""
    D = z.shape[-1]
    return torch.stack(
        [F.layer_norm(z[:, h], (D,), weight[h], bias[h], LN_EPS) for h in range(z.shape[1])], 1
    )


def _prepare(
    xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor, lr: torch.Tensor, p: InnerParams, chunk_size: int
) -> tuple[torch.Tensor, ...]:
    """Both forms' start: check the inputs, cast them to the compute dtype, the position factors
    ``tau [C]`` and the initial weights expanded over the batch. Returns
    ``(xq, xk, xv, lr, ln_weight, ln_bias, tau, w)``."""
    _check(xq, xk, xv, lr, p.token_offset, chunk_size)
    dt = _compute_dtype(xq, xk, xv, lr, *p.tensors())
    xq, xk, xv, lr = (t.to(dt) for t in (xq, xk, xv, lr))
    tau = token_weights(p.token_offset.to(dt))
    w = FastWeights.expand(p.init, xq.shape[0], dt)
    return xq, xk, xv, lr, p.ln_weight.to(dt), p.ln_bias.to(dt), tau, w


def ttt_mlp_reference(
    xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor, lr: torch.Tensor, p: InnerParams, chunk_size: int
) -> tuple[torch.Tensor, FastWeights]:
    """Specification: token by token, inner gradients by autograd, every token's weights materialised.

    ``xq, xk, xv [B, H, T, D]``, ``lr [B, H, T]`` (the rates ``r_t``), ``p`` the inner loop's learned
    parameters (``p.token_offset`` is ``tau'``), ``chunk_size`` the mini-batch ``C``.
    Returns ``(out [B, H, T, D], the weights after the last token)``.
    """
    xq, xk, xv, lr, lw, lb, tau, w = _prepare(xq, xk, xv, lr, p, chunk_size)
    T = xq.shape[2]
    outs = []
    for start in range(0, T, chunk_size):
        w0 = list(w.tuple())
        acc = [torch.zeros_like(p) for p in w0]
        for i in range(min(chunk_size, T - start)):
            t = start + i
            k, v, q = (x[:, :, t : t + 1] for x in (xk, xv, xq))  # [B, H, 1, D]
            pred = _ln_reference(FastWeights(*w0).mlp(k), lw, lb)
            per_head = 0.5 * ((pred - (v - k)) ** 2).sum((-2, -1))  # [B, H]
            # Each (element, head) owns its weights, so one sum gives every owner its own gradient.
            grads = torch.autograd.grad((lr[:, :, t] * per_head).sum(), w0, create_graph=True)
            acc = [a + g for a, g in zip(acc, grads)]
            w = FastWeights(*(p - tau[i] * a for p, a in zip(w0, acc)))
            outs.append(q + _ln_reference(w.mlp(q), lw, lb))
    return torch.cat(outs, 2), w


def ttt_mlp_piece(
    w: FastWeights,
    acc: FastWeights | None,
    xq: torch.Tensor,
    xk: torch.Tensor,
    xv: torch.Tensor,
    lr: torch.Tensor,
    tau: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
) -> tuple[torch.Tensor, FastWeights]:
    """Outputs of ``L`` consecutive tokens of one chunk (dual form), and the chunk's new gradient sum.

    ``w``: the chunk-start weights; ``acc``: ``sum r_s grad l_s(w)`` over the chunk's tokens before
    this piece (None: none); ``xq, xk, xv [B, H, L, D]`` and ``lr [B, H, L]`` in the compute dtype;
    ``tau [B, L]`` (or ``[L]``): each token's ``tau_i`` (its position in the chunk). Returns
    ``(out [B, H, L, D], acc + sum over the piece of r_s grad l_s(w))``.
    """
    if tau.dim() == 1:
        tau = tau.expand(xq.shape[0], -1)
    tau_col = tau[:, None, :, None]  # [B, 1, L, 1]: the reading token's weight
    # Inner gradients at the chunk-start weights: through the second layer, the LayerNorm and gelu.
    z1 = xk @ w.w1 + w.b1  # [B, H, L, E]
    x2 = _gelu(z1)
    g2 = ln_l2_grad(x2 @ w.w2 + w.b2, xv - xk, ln_weight, ln_bias)  # [B, H, L, D] dl/dZ2
    g1 = (g2 @ w.w2.transpose(-1, -2)) * gelu_grad(z1)  # [B, H, L, E] dl/dZ1
    # eta[j, s] = tau_j r_s for s <= j: token j reads the gradients of itself and the tokens before it.
    eta = torch.tril(tau_col * lr[:, :, None, :])  # [B, H, L, L]
    z1_bar = xq @ w.w1 + w.b1 - (eta * (xq @ xk.transpose(-1, -2) + 1)) @ g1  # [B, H, L, E]
    if acc is not None:
        z1_bar = z1_bar - tau_col * (xq @ acc.w1 + acc.b1)
    x2_bar = _gelu(z1_bar)
    z2_bar = x2_bar @ w.w2 + w.b2 - (eta * (x2_bar @ x2.transpose(-1, -2) + 1)) @ g2  # [B, H, L, D]
    if acc is not None:
        z2_bar = z2_bar - tau_col * (x2_bar @ acc.w2 + acc.b2)
    out = xq + _ln(z2_bar, ln_weight, ln_bias)[0]
    r = lr[..., None]  # [B, H, L, 1]
    new = FastWeights(
        xk.transpose(-1, -2) @ (r * g1),  # [B, H, D, E]
        (r * g1).sum(2, keepdim=True),
        x2.transpose(-1, -2) @ (r * g2),  # [B, H, E, D]
        (r * g2).sum(2, keepdim=True),
    )
    if acc is not None:
        new = FastWeights(*(a + n for a, n in zip(acc.tuple(), new.tuple())))
    return out, new


def ttt_mlp_chunked(
    xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor, lr: torch.Tensor, p: InnerParams, chunk_size: int
) -> tuple[torch.Tensor, FastWeights]:
    """Fast form of :func:`ttt_mlp_reference` (same arguments, same results): one dual-form
    :func:`ttt_mlp_piece` per chunk."""
    xq, xk, xv, lr, lw, lb, tau, w = _prepare(xq, xk, xv, lr, p, chunk_size)
    T = xq.shape[2]
    outs = []
    for s in range(0, T, chunk_size):
        e = min(s + chunk_size, T)
        out, acc = ttt_mlp_piece(
            w, None, xq[:, :, s:e], xk[:, :, s:e], xv[:, :, s:e], lr[:, :, s:e], tau[: e - s], lw, lb
        )
        outs.append(out)
        w = w.step(acc, tau[e - s - 1])  # the weights of the chunk's last token
    return torch.cat(outs, 2), w
