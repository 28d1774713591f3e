"""The TTT-MLP layer (``variant: mlp``): Moshi's gated MLP plus a TTT-MLP residual branch.

``TTTMLPGating`` implements :class:`moshi_ttt.layer.TTTLayer`. It keeps the layer's MLP as it is
(``linear_in``, ``linear_out``: slow weights) and adds beside it, per head, a two-layer fast MLP
trained at test time by one gradient step per chunk (the math and the ops are in
:mod:`moshi_ttt.ops.mlp`). From the MLP input ``x`` the branch computes ``XQ, XK, XV = x Wq, x Wk,
x Wv`` and the per-token inner learning rate ``eta * sigmoid(x w_lr + b_lr)``; chunk ``i`` reads
``f_{W^(i-1)}(XQ[i])``.

The branch output ``concat_h(O) Wo^T`` joins the layer as a residual gated by ``tanh(alpha)``, with
``alpha = 0`` at the start, so the model equals the base model at init while ``alpha`` receives
gradient. The initial fast weights are parameters trained by the optimizer, never overwritten by the
forward pass; streaming keeps one copy per batch element in the streaming state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .config import TTTConfig
from .layer import ParamGroup, TTTLayer, TTTState, full_tensor
from .ops.common import no_autocast
from .ops.mlp import FastWeights, ttt_mlp_chunked


@dataclass
class _MLPState(TTTState):
    fast: FastWeights  # per batch element, float32
    init: FastWeights  # W^(0) per batch element (views of the parameters), what resets return to
    buf_x: torch.Tensor  # [B, C, dim]: the MLP inputs of the current chunk so far

    def chunk_buffers(self) -> tuple[torch.Tensor]:
        return (self.buf_x,)

    def reset(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        m = reset_mask.to(self.buf_x.device)
        for cur, init in zip(self.fast.tuple(), self.init.tuple()):
            cur[m] = init[m]


class TTTMLPGating(TTTLayer[_MLPState]):
    """Moshi's gated MLP plus a TTT-MLP residual branch gated by ``tanh(alpha)`` (``alpha = 0`` at init)."""

    VARIANT = "mlp"
    PARAM_GROUPS = (
        ParamGroup(
            "ttt_mlp",
            "TTT-MLP branch (proj., fast-weight init)",
            ("q_proj", "k_proj", "v_proj", "lr_proj", "lr_bias", "ln_weight", "ln_bias")
            + ("w1", "b1", "w2", "b2", "o_proj", "alpha"),
        ),
    )
    SLOW_PARAMS = ("linear_in.", "linear_out.")  # the layer's own MLP

    def __init__(
        self,
        linear_in: nn.Module,
        linear_out: nn.Module,
        activation: Callable[[torch.Tensor], torch.Tensor],
        dim: int,
        config: TTTConfig,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
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
        self.init_new_parameters()

    @classmethod
    def source(cls, config: TTTConfig) -> str:
        return "hidden"  # the branch reads only the MLP input

    @classmethod
    def _wrap(cls, gating: nn.Module, config: TTTConfig) -> TTTMLPGating:
        ref = next(gating.parameters())
        dim = ref.shape[1] if isinstance(gating.linear_in, nn.Linear) else gating.linear_in.in_features
        return cls(gating.linear_in, gating.linear_out, gating.activation, dim, config, ref.device, ref.dtype)

    def init_new_parameters(self) -> None:
        """Small random projections and fast-weight init; ``alpha = 0`` closes the branch's gate."""
        if self.q_proj.device.type == "meta":
            return
        with torch.no_grad():
            for p in (self.q_proj, self.k_proj, self.v_proj, self.w1, self.w2, self.o_proj):
                nn.init.normal_(p, std=0.02)
            for p in (self.lr_proj, self.lr_bias, self.b1, self.b2, self.ln_bias, self.alpha):
                p.zero_()
            self.ln_weight.fill_(1.0)

    def _param_telemetry(self) -> dict[str, float]:
        """The branch gate ``tanh(alpha)``."""
        return {"gate": float(torch.tanh(full_tensor(self.alpha.detach()).float()))}

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"dim={self.dim}, heads={self.heads}, expansion={c.mlp_expansion}, chunk_size={c.chunk_size}, "
            f"eta={c.eta}"
        )

    # ---------------------------------------------------------------- computations
    def base(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's own MLP, as moshi computes it."""
        return self.linear_out(self.activations(x))

    def _heads(self, x: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return F.linear(x, proj).view(B, T, self.heads, self.head_dim).transpose(1, 2).float()  # [B, H, T, D]

    def projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        xq, xk, xv = (self._heads(x, p) for p in (self.q_proj, self.k_proj, self.v_proj))
        lr = self.config.eta * torch.sigmoid(F.linear(x, self.lr_proj, self.lr_bias).float()).transpose(1, 2)
        return xq, xk, xv, lr  # lr [B, H, T]

    def _init(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.w1, self.b1, self.w2, self.b2

    def _merge(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        B, H, T, D = o.shape
        o = o.transpose(1, 2).reshape(B, T, H * D).to(x.dtype)
        return torch.tanh(self.alpha).to(x.dtype) * F.linear(o, self.o_proj)

    def _forward_sequence(self, x: torch.Tensor, src: torch.Tensor, update: bool) -> torch.Tensor:
        xq, xk, xv, lr = self.projections(x)
        with no_autocast(x.device):
            if not update:  # every chunk with W^(0)
                o = FastWeights.expand(self._init(), x.shape[0]).mlp(xq)
                return self.base(x) + self._merge(o, x)
            o, final = ttt_mlp_chunked(
                xq, xk, xv, lr, self._init(), self.ln_weight, self.ln_bias, self.config.chunk_size
            )
        base = self.base(x)
        if self.record_stats:
            with torch.no_grad(), no_autocast(x.device):
                init = FastWeights.expand(self._init(), x.shape[0])
                upd = [
                    (a - b.float()).flatten(1).norm(dim=1) ** 2 for a, b in zip(final.tuple(), init.tuple())
                ]
                # The TTT term: the branch with the updated fast weights minus the branch at W^(0).
                b0 = self._merge(init.mlp(xq), x).float()
                term = self._merge(o, x).float() - b0
                self.last_stats = {
                    "update_norm": torch.stack(upd).sum(0).sqrt().mean(),
                    "term_ratio": term.norm() / (base.float() + b0).norm().clamp_min(1e-30),
                }
            self.record_stats = False  # once per request (not again in a checkpointing recompute)
        return base + self._merge(o, x)

    # ---------------------------------------------------------------- streaming
    def _init_streaming_state(self, batch_size: int) -> _MLPState:
        dev = self.w1.device
        init = FastWeights.expand(tuple(t.detach() for t in self._init()), batch_size)
        fast = FastWeights(*(t.clone() for t in init.tuple()))
        return _MLPState(
            batch_size,
            dev,
            pos=torch.zeros(batch_size, dtype=torch.long),
            fast=fast,
            init=init,
            buf_x=torch.zeros(batch_size, self.config.chunk_size, self.dim, device=dev, dtype=self.w1.dtype),
        )

    def _chunk_start_output(self, state: _MLPState, x: torch.Tensor) -> torch.Tensor:
        return state.fast.mlp(self._heads(x, self.q_proj))  # [B, H, L, D]

    def _apply_update(self, state: _MLPState, done: torch.Tensor) -> None:
        """One inner gradient step on the completed chunk, for the elements in ``done``."""
        idx = done.nonzero().flatten().to(state.buf_x.device)
        xq, xk, xv, lr = self.projections(state.buf_x[idx])
        sub = FastWeights(*(f[idx] for f in state.fast.tuple()))
        _, new = ttt_mlp_chunked(
            xq, xk, xv, lr, None, self.ln_weight, self.ln_bias, self.config.chunk_size, state=sub
        )
        for cur, upd in zip(state.fast.tuple(), new.tuple()):
            cur[idx] = upd

    def _forward_stream(self, x: torch.Tensor, src: torch.Tensor, state: _MLPState) -> torch.Tensor:
        o = torch.cat(self._stream_chunks(state, (x,), (x,)), 2)  # [B, H, T, D]
        with torch.no_grad():
            branch = self._merge(o, x)
        return self.base(x) + branch
