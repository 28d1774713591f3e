"""The TTT-MLP layer (``variant: mlp``): Moshi's gated MLP plus a TTT-MLP residual branch.

``TTTMLP`` implements :class:`moshi_ttt.layer.TTTLayer`. It keeps the layer's MLP as it is
(``linear_in``, ``linear_out``: slow weights) and adds beside it the TTT-MLP layer of the TTT papers,
read from their public code: test-time-training/ttt-lm-pytorch (``ttt.py``, ``TTTMLP``; causal
language modelling, the closest setting to Moshi's) and test-time-training/ttt-video-dit
(``ttt/models/ssm/ttt_layer.py`` and ``ops/ttt_mlp.py``, ``compute_mini_batch``; bidirectional
video). The inner loop is in :mod:`moshi_ttt.ops.mlp`. Per choice, with its source:

- **Where it sits.** The branch reads the MLP's (already normalised) input ``x`` and joins the
  residual beside the MLP: ``MLP(x) + tanh(alpha) * branch(x)``. ttt-lm-pytorch puts TTT in place of
  attention behind a pre-norm; ttt-video-dit adds it after attention through a per-channel
  ``tanh(alpha)`` gate. Moshi keeps its attention and MLP, so the branch is added, gated as in
  ttt-video-dit (per channel), with ``alpha = 0`` at the start (ttt-video-dit starts it at a configured
  ``gating_alpha_init``): the model equals the base model at init while ``alpha`` receives gradient.
- **Q, K, V.** Three bias-free linear maps of ``x`` split into ``mlp_heads`` heads of ``D = dim / heads``
  (ttt-lm-pytorch; ttt-video-dit adds biases). Neither reference's extras are used: ttt-lm-pytorch's
  RoPE by position inside the mini-batch (it rotates a key and a later query by different angles when
  they sit at different offsets of their chunks: a recall across chunks would have to undo it; Moshi's
  hidden states already carry position), its Mamba-backbone option of a shared Q/K with causal depthwise
  convolutions, and ttt-video-dit's L2 normalisation of Q and K (``mlp_qk_norm: true`` turns it on).
- **Inner model and loss.** ``x + LN(f_W(x))`` with ``f_W`` a two-layer gelu MLP of hidden size
  ``mlp_expansion * D`` (4 in both) and ``LN`` a per-head LayerNorm with learned scale and shift;
  loss ``1/2 ||LN(f_W(XK)) - (XV - XK)||^2``, its gradient through the LayerNorm in closed form
  (both references' ``ln_fused_l2_bwd``). ttt-video-dit also layer-normalises the target ``XV - XK``;
  ttt-lm-pytorch (the causal one) does not, nor does this.
- **Inner learning rate.** ``r_t = eta * sigmoid(x_t . w_h + b_h) / D`` per head and token, ``eta``
  the base rate (``ttt_base_lr``: 1.0 in ttt-lm-pytorch, 0.1 for TTT-MLP in ttt-video-dit), times
  ttt-lm-pytorch's per-position factor ``tau_i = max(1/(i+1) + tau'_i, 0)`` with ``tau'`` learned
  (``token_offset``, zero at init). ttt-video-dit's non-causal chunks use ``1/C`` for every token.
- **Updates inside a mini-batch.** Token ``i`` of a chunk reads the weights moved by the gradients
  (at the chunk-start weights) of itself and the chunk's earlier tokens, the lower-triangular dual
  form of ttt-lm-pytorch; the next chunk starts from its last token's weights. ttt-video-dit's
  chunks are non-causal (every token reads the chunk's last weights), which a causal model cannot use.
- **Output.** ``XQ + LN(f_W(XQ))`` per head, the heads concatenated, a LayerNorm over ``dim`` with
  learned scale and shift (the post-norm of both), the output projection (bias-free, ttt-lm-pytorch),
  then the gate. ttt-lm-pytorch's optional ``gelu(x W_g)`` output gate (``use_gate``, off by default
  there) is not used: the ``tanh(alpha)`` gate plays that role.
- **Initialisation** (both): Q, K, V, O, ``W1``, ``W2`` and the rate weights ``w_h`` normal with std
  0.02, biases 0, LayerNorm scales 1 and shifts 0.
- **Precision.** The inner loop and the fast-weight state run in float32 whatever the model dtype.

The initial fast weights are parameters trained by the optimizer, never overwritten by the forward
pass. Streaming keeps, per batch element, the chunk-start fast weights and the chunk's running
gradient sum, and computes each piece of steps with the same dual form as training, so streaming
step by step equals the training forward. Each step costs one inner gradient and one read of the
fast MLP (a few products of ``D x E`` per head): the same order as one MLP step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from .deprecation import moved_attributes
from .layer import (
    FIXED_ON_RESUME,
    ParamGroup,
    TTTLayer,
    TTTState,
    VariantSettings,
    full_tensor,
    is_int,
    setting_error,
)
from .ops.common import no_autocast
from .ops.mlp import FastWeights, InnerParams, read_out, token_weights, ttt_mlp_chunked, ttt_mlp_piece

if TYPE_CHECKING:
    from .config import TTTConfig

POST_NORM_EPS = 1e-6  # both references' post-norm epsilon (nn.LayerNorm(width, eps=1e-6))


@dataclass
class TTTMLPSettings(VariantSettings):
    """TTT-MLP's own settings (flat ``ttt.<name>`` keys of :class:`moshi_ttt.TTTConfig`).

    Attributes:
        mlp_heads, mlp_expansion: heads of the TTT-MLP branch and the hidden size of each head's
            fast MLP as a multiple of the head dimension.
        mlp_qk_norm: L2-normalise each head's queries and keys (ttt-video-dit does, ttt-lm-pytorch
            does not).
    """

    mlp_heads: int = field(default=4, metadata=FIXED_ON_RESUME)
    mlp_expansion: int = field(default=4, metadata=FIXED_ON_RESUME)
    mlp_qk_norm: bool = False

    def check(self) -> None:
        for name in ("mlp_heads", "mlp_expansion"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise setting_error(self, name, "must be an integer >= 1")
        if not isinstance(self.mlp_qk_norm, bool):
            raise setting_error(self, "mlp_qk_norm", "must be true or false")


@dataclass
class TTTMLPState(TTTState):
    fast: FastWeights  # chunk-start weights per batch element, float32
    acc: FastWeights  # sum over the current chunk's tokens so far of r_s * grad l_s(fast), float32
    init: FastWeights  # W^(0) per batch element (views of the parameters), what resets return to

    def chunk_buffers(self) -> tuple[()]:
        return ()  # the running sum `acc` replaces a buffer of the chunk's inputs

    def reset(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        m = reset_mask.to(self.acc.w1.device)
        for cur, init, acc in zip(self.fast.tuple(), self.init.tuple(), self.acc.tuple()):
            cur[m] = init[m]
            acc[m] = 0


class TTTMLP(TTTLayer[TTTMLPState]):
    """Moshi's gated MLP plus a TTT-MLP residual branch gated by ``tanh(alpha)`` (``alpha = 0`` at init)."""

    VARIANT = "mlp"
    SETTINGS = TTTMLPSettings
    PARAM_GROUPS = (
        ParamGroup(
            "ttt_mlp",
            "TTT-MLP branch (proj., fast-weight init)",
            ("q_proj", "k_proj", "v_proj", "lr_proj", "lr_bias", "token_offset", "ln_weight", "ln_bias")
            + ("w1", "b1", "w2", "b2", "post_norm_weight", "post_norm_bias", "o_proj", "alpha"),
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
        self.lr_proj = nn.Parameter(torch.empty(H, dim, **f))
        self.lr_bias = nn.Parameter(torch.empty(H, **f))
        self.token_offset = nn.Parameter(torch.empty(config.chunk_size, **f))
        self.ln_weight = nn.Parameter(torch.empty(H, D, **f))
        self.ln_bias = nn.Parameter(torch.empty(H, D, **f))
        self.w1 = nn.Parameter(torch.empty(H, D, E, **f))
        self.b1 = nn.Parameter(torch.empty(H, E, **f))
        self.w2 = nn.Parameter(torch.empty(H, E, D, **f))
        self.b2 = nn.Parameter(torch.empty(H, D, **f))
        self.post_norm_weight = nn.Parameter(torch.empty(dim, **f))
        self.post_norm_bias = nn.Parameter(torch.empty(dim, **f))
        self.o_proj = nn.Parameter(torch.empty(dim, H * D, **f))
        self.alpha = nn.Parameter(torch.empty(dim, **f))
        self.init_new_parameters()

    @classmethod
    def source(cls, config: TTTConfig) -> str:
        return "hidden"  # the branch reads only the MLP input

    @classmethod
    def _wrap(cls, gating: nn.Module, config: TTTConfig) -> TTTMLP:
        ref = next(gating.parameters())
        dim = ref.shape[1] if isinstance(gating.linear_in, nn.Linear) else gating.linear_in.in_features
        return cls(gating.linear_in, gating.linear_out, gating.activation, dim, config, ref.device, ref.dtype)

    def init_new_parameters(self) -> None:
        """The references' initialisation; ``alpha = 0`` closes the branch's gate."""
        if self.q_proj.device.type == "meta":
            return
        with torch.no_grad():
            for p in (self.q_proj, self.k_proj, self.v_proj, self.o_proj, self.w1, self.w2, self.lr_proj):
                nn.init.normal_(p, std=0.02)
            for p in (self.lr_bias, self.token_offset, self.b1, self.b2, self.ln_bias, self.post_norm_bias):
                p.zero_()
            self.ln_weight.fill_(1.0)
            self.post_norm_weight.fill_(1.0)
            self.alpha.zero_()

    def _param_telemetry(self) -> dict[str, float]:
        """The branch gate: the root mean square of ``tanh(alpha)`` over channels."""
        gate = torch.tanh(full_tensor(self.alpha.detach()).float())
        return {"gate": float(gate.pow(2).mean().sqrt())}

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"dim={self.dim}, heads={self.heads}, expansion={c.mlp_expansion}, chunk_size={c.chunk_size}, "
            f"eta={c.eta}, qk_norm={c.mlp_qk_norm}"
        )

    # ---------------------------------------------------------------- computations
    def base(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's own MLP, as moshi computes it."""
        return self.linear_out(self.activations(x))

    def _heads(self, x: torch.Tensor, proj: torch.Tensor, unit: bool = False) -> torch.Tensor:
        B, T, _ = x.shape
        y = F.linear(x, proj).view(B, T, self.heads, self.head_dim).transpose(1, 2).float()  # [B, H, T, D]
        return F.normalize(y, dim=-1) if unit else y

    def projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``XQ, XK, XV [B, H, T, D]`` (float32) and the rates ``r = eta sigmoid(x w + b) / D [B, H, T]``."""
        unit = self.config.mlp_qk_norm
        xq, xk = self._heads(x, self.q_proj, unit), self._heads(x, self.k_proj, unit)
        xv = self._heads(x, self.v_proj)
        gate = torch.sigmoid(F.linear(x, self.lr_proj, self.lr_bias).float()).transpose(1, 2)
        return xq, xk, xv, gate * (self.config.eta / self.head_dim)

    def _ln(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ln_weight.float(), self.ln_bias.float()

    def _init(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.w1, self.b1, self.w2, self.b2

    def _merge(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Heads ``o [B, H, T, D]`` -> post-norm -> output projection -> gate, in ``x``'s dtype."""
        B, H, T, D = o.shape
        o = o.transpose(1, 2).reshape(B, T, H * D)
        o = F.layer_norm(
            o, (H * D,), self.post_norm_weight.float(), self.post_norm_bias.float(), POST_NORM_EPS
        )
        return torch.tanh(self.alpha).to(x.dtype) * F.linear(o.to(x.dtype), self.o_proj)

    def _forward_sequence(self, x: torch.Tensor, src: torch.Tensor, update: bool) -> torch.Tensor:
        xq, xk, xv, lr = self.projections(x)
        with no_autocast(x.device):
            if not update:  # every token reads W^(0)
                o = read_out(FastWeights.expand(self._init(), x.shape[0]), xq, *self._ln())
                return self.base(x) + self._merge(o, x)
            inner = InnerParams(self._init(), *self._ln(), self.token_offset)
            o, final = ttt_mlp_chunked(xq, xk, xv, lr, inner, self.config.chunk_size)
        base = self.base(x)
        if self.record_stats:
            with torch.no_grad(), no_autocast(x.device):
                init = FastWeights.expand(self._init(), x.shape[0])
                upd = [
                    (a - b.float()).flatten(1).norm(dim=1) ** 2 for a, b in zip(final.tuple(), init.tuple())
                ]
                # The TTT term: the branch with the updated fast weights minus the branch at W^(0).
                b0 = self._merge(read_out(init, xq, *self._ln()), x).float()
                term = self._merge(o, x).float() - b0
                self.last_stats = {
                    "update_norm": torch.stack(upd).sum(0).sqrt().mean(),
                    "term_ratio": term.norm() / (base.float() + b0).norm().clamp_min(1e-30),
                }
            self.record_stats = False  # once per request (not again in a checkpointing recompute)
        return base + self._merge(o, x)

    # ---------------------------------------------------------------- streaming
    def _init_streaming_state(self, batch_size: int) -> TTTMLPState:
        init = FastWeights.expand(tuple(t.detach() for t in self._init()), batch_size)
        fast = FastWeights(*(t.clone() for t in init.tuple()))
        return TTTMLPState(
            batch_size,
            self.w1.device,
            pos=torch.zeros(batch_size, dtype=torch.long),
            fast=fast,
            acc=fast.zeros_like(),
            init=init,
        )

    def _chunk_start_output(self, state: TTTMLPState, x: torch.Tensor) -> torch.Tensor:
        """The piece's output, and (the side effect this variant needs) the piece's gradients added to
        the running sum of the elements that execute: tokens read updates made inside their chunk."""
        xq, xk, xv, lr = self.projections(x)
        if not self.updates_enabled:
            return read_out(state.fast, xq, *self._ln())
        C = self.config.chunk_size
        L = x.shape[1]
        # Each element's in-chunk positions; an element that does not execute may run past its chunk's
        # end (the piece is cut for the active ones): clamp, its output is not used and it does not learn.
        pos = (state.pos[:, None] + torch.arange(L)).clamp_max(C - 1).to(x.device)  # [B, L]
        tau = token_weights(self.token_offset.detach().float())[pos]
        out, acc = ttt_mlp_piece(state.fast, state.acc, xq, xk, xv, lr, tau, *self._ln())
        active = state.exec_mask.to(x.device)
        for cur, new in zip(state.acc.tuple(), acc.tuple()):
            cur[active] = new[active]
        return out

    def _apply_update(self, state: TTTMLPState, done: torch.Tensor) -> None:
        """The chunk's last token's weights become the next chunk's start, for the elements in ``done``."""
        idx = done.to(state.acc.w1.device)
        tau_last = token_weights(self.token_offset.detach().float())[-1]
        new = state.fast.step(state.acc, tau_last)
        for cur, upd in zip(state.fast.tuple(), new.tuple()):
            cur[idx] = upd[idx]

    def _complete_chunks(self, state: TTTMLPState, done: torch.Tensor) -> None:
        super()._complete_chunks(state, done)
        idx = done.to(state.acc.w1.device)
        for acc in state.acc.tuple():  # a new chunk: no gradient yet (with updates on or off)
            acc[idx] = 0

    def _forward_stream(self, x: torch.Tensor, src: torch.Tensor, state: TTTMLPState) -> torch.Tensor:
        o = torch.cat(self._stream_chunks(state, (x,), ()), 2)  # [B, H, T, D]
        with torch.no_grad():
            branch = self._merge(o, x)
        return self.base(x) + branch


# Old names (issue 24), with a DeprecationWarning until the next release.
__getattr__ = moved_attributes(
    __name__, {"TTTMLPGating": "moshi_ttt.mlp:TTTMLP", "_MLPState": "moshi_ttt.mlp:TTTMLPState"}
)
