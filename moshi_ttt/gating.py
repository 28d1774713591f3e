"""The In-Place TTT layer (``variant: inplace``): Moshi's gated MLP whose output projection is a fast weight.

``TTTGating`` implements :class:`moshi_ttt.layer.TTTLayer` and replaces
``moshi.modules.gating.ActivationGating`` in a selected layer:

- ``linear_in`` (``[W_gate; W_up]``) is kept as it is (possibly LoRA-wrapped): slow weights.
- ``w_down`` ``[d, h]`` is ``W^(0)``, the fast weight's initial state, a trainable parameter that
  the forward pass never writes to. ``w_down_pretrained`` is a float32 copy of the checkpoint's
  ``linear_out`` weight, kept for telemetry and for going back to the base model.
- The target path ``V = Conv1D_K(X_src) W_target^T`` (``target_conv``, ``target_proj``) is computed
  per chunk: position ``t`` sees ``t .. t+K-1`` of its own chunk, zero past the chunk's end.
  ``target_conv`` starts at zero and ``target_proj`` at the identity, so ``V = 0`` and the model
  equals the base model at step 0, while ``dLoss/d target_conv = X * (dLoss/dV)`` is nonzero, so
  the target path learns (two zero factors would form a saddle with no gradient).
- ``eta_norm: zsq`` divides each chunk's update by the chunk's mean ``||z_t||^2``. A per-chunk
  scalar on ``V[i]^T Z[i]`` is the same as dividing that chunk's target ``V[i]`` by it, so it lives
  here (:meth:`TTTGating.update_target`) and the fast-weight ops never see it; streaming applies it
  when a chunk completes, over the chunk buffer, with the same function training applies to the chunk
  grid (:func:`chunk_mean_sq`), and the gradient flows through the statistic as through ``V``.

Training (no streaming state) runs :func:`moshi_ttt.ops.inplace.ttt_chunked` over the whole sequence.
Streaming keeps one float32 accumulated update ``delta = W^(i-1) - W^(0)`` per batch element in
``_TTTState``: each step is computed with the weight of its chunk's start, as ``z W^(0)T`` (the
base term, in the dtype training uses for it) plus ``z delta^T`` (float32); ``z`` and the source are
buffered, and when a chunk completes its target is computed over the whole chunk (the conv needs the
chunk's later tokens) and the update is applied. Streaming therefore equals the full-sequence
forward. Under CUDA graphs (:class:`moshi_ttt.TTTLMGen`) a capturable one-step path writes the
buffers at a device-side position and the update runs between graph replays.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .config import TTTConfig
from .layer import ParamGroup, TTTLayer, TTTState, full_tensor
from .ops.common import no_autocast
from .ops.inplace import base_term, ttt_chunked

# Floor of the zsq statistic: keeps an all-zero chunk (whose update is zero anyway) finite.
_ZSQ_FLOOR = 1e-12


def _up(t: torch.Tensor) -> torch.Tensor:
    """float32, or float64 when ``t`` is (the fast-weight ops' compute dtype)."""
    return t if t.dtype == torch.float64 else t.float()


def chunk_mean_sq(z: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``[B, T]``: at each step, the mean ``||z_t||^2`` of its chunk (float32, float64 for float64
    ``z``), on the chunk grid that starts at ``z[:, 0]`` (a partial last chunk averages over its own
    steps). The statistic of ``eta_norm: zsq``; training calls it on the whole sequence, streaming
    on a completed chunk's ``[B, C, h]`` buffer, which reduces the same numbers in the same order."""
    B, T, _ = z.shape
    n = math.ceil(T / chunk_size)
    sq = _up(z).square().sum(-1)  # [B, T]
    if n * chunk_size != T:
        sq = F.pad(sq, (0, n * chunk_size - T))
    sums = sq.view(B, n, chunk_size).sum(-1)  # [B, n]
    counts = (T - chunk_size * torch.arange(n, device=z.device)).clamp(max=chunk_size)  # [n]
    return (sums / counts).repeat_interleave(chunk_size, dim=1)[:, :T]


@dataclass
class _TTTState(TTTState):
    """Per-batch-element fast-weight state of one TTT gating while streaming."""

    delta: torch.Tensor  # [B, d, h] float32: the accumulated update, W^(i-1) - W^(0)
    w0: torch.Tensor  # [d, h]: the initial weight W^(0) (a view of the parameter)
    buf_z: torch.Tensor  # [B, C, h] float32: activations of the current chunk so far
    buf_src: torch.Tensor  # [B, C, d_src]: target source of the current chunk so far
    # `pos` on the model's device, for CUDA-graph steps (see TTTGating.prepare_graph_step).
    pos_dev: torch.Tensor
    pos_dev_stale: bool = False  # eager steps moved `pos` since pos_dev was last written
    graph_steps: bool = False  # graph steps moved `pos_dev` since `pos` was last read back

    def chunk_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.buf_z, self.buf_src

    def reset(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        self.delta[reset_mask.to(self.delta.device)] = 0.0
        self.pos_dev.masked_fill_(reset_mask.to(self.pos_dev.device), 0)


def _weight_of(linear: nn.Module) -> torch.Tensor:
    """The effective weight of an ``nn.Linear`` or of a moshi ``LoRALinear`` (merged)."""
    if isinstance(linear, nn.Linear):
        return linear.weight
    frozen, lora_a, lora_b = (getattr(linear, n, None) for n in ("frozen_W", "lora_A", "lora_B"))
    if isinstance(frozen, nn.Linear) and isinstance(lora_a, nn.Linear) and isinstance(lora_b, nn.Linear):
        with torch.no_grad():
            return frozen.weight + linear.scaling * (lora_b.weight @ lora_a.weight).to(frozen.weight.dtype)
    raise ValueError(
        f"cannot read a weight from linear_out of type {type(linear).__name__}: expected nn.Linear or "
        "moshi.modules.lora.LoRALinear"
    )


class TTTGating(TTTLayer[_TTTState]):
    """Gated MLP with an In-Place TTT output projection. Build it with :meth:`from_gating`."""

    VARIANT = "inplace"
    PARAM_GROUPS = (
        ParamGroup("ttt_target", "TTT target path (conv, W_target)", ("target_conv", "target_proj")),
        ParamGroup("w_down", "TTT w_down (fast-weight init W^(0))", ("w_down",), pretrained=True),
        ParamGroup(
            "ttt_write_gate",
            "TTT write gate (per-token)",
            ("write_gate_w", "write_gate_b"),
            when="write_gate",
        ),
    )
    SLOW_PARAMS = ("linear_in.",)  # the layer's slow weights (W_gate, W_up)
    MOSHI_KEYS = {"w_down": "linear_out.weight"}
    GRAPH_STEPS = True

    def __init__(
        self,
        linear_in: nn.Module,
        w_down: torch.Tensor,
        activation: Callable[[torch.Tensor], torch.Tensor],
        config: TTTConfig,
    ) -> None:
        super().__init__()
        d, h = w_down.shape
        self.config = config
        self.dim, self.hidden = d, h
        self.linear_in = linear_in
        self.activation = activation
        factory = {"device": w_down.device, "dtype": w_down.dtype}
        self.w_down = w_down if isinstance(w_down, nn.Parameter) else nn.Parameter(w_down)
        self.register_buffer(
            "w_down_pretrained", w_down.detach().to(torch.float32, copy=True), persistent=True
        )
        K = config.conv_kernel_size
        self.target_conv = nn.Parameter(torch.zeros(d, 1 if config.conv_depthwise else d, K, **factory))
        self.target_proj = nn.Parameter(torch.empty(d, d, **factory))
        if config.write_gate:
            width = h if config.write_gate_input == "key" else d
            self.write_gate_w = nn.Parameter(torch.empty(width, **factory))
            self.write_gate_b = nn.Parameter(torch.empty(1, **factory))
        self.init_new_parameters()
        self._register_load_state_dict_pre_hook(self._map_vanilla_keys)

    @classmethod
    def _wrap(cls, gating: nn.Module, config: TTTConfig) -> TTTGating:
        lo = gating.linear_out
        w = lo.weight if isinstance(lo, nn.Linear) else nn.Parameter(_weight_of(lo).detach().clone())
        return cls(gating.linear_in, w, gating.activation, config)

    def init_new_parameters(self) -> None:
        """Zero conv and identity projection: V = 0 (base model) with a live gradient path; the write
        gate (if any) at 1 on every token."""
        with torch.no_grad():
            self.target_conv.zero_()
            if self.config.write_gate:
                self.write_gate_w.zero_()
                self.write_gate_b.zero_()
            if self.target_proj.device.type != "meta":
                self.target_proj.copy_(torch.eye(self.dim, dtype=self.target_proj.dtype))

    @torch.no_grad()
    def probe_init(self) -> bool:
        """At initialisation the conv is zero, so ``V = 0`` and no update does anything: set the conv
        to the identity tap (step ``t`` reads its own source) so that ``V = X_src W_target^T``, which
        is ``X_src`` while ``W_target`` is still the identity. A trained target path is left alone."""
        if bool(self.target_conv.any()):
            return False
        if self.config.conv_depthwise:
            self.target_conv[:, 0, 0] = 1.0
        else:
            self.target_conv[:, :, 0] = torch.eye(self.dim, dtype=self.target_conv.dtype)
        return True

    def _map_vanilla_keys(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        """Let a vanilla Moshi (or LoRA-wrapped) state dict load: ``linear_out.weight`` -> ``w_down``."""
        for key in (prefix + "linear_out.weight", prefix + "linear_out.frozen_W.weight"):
            if key in state_dict:
                w = state_dict.pop(key)
                state_dict.setdefault(prefix + "w_down", w)
                state_dict.setdefault(prefix + "w_down_pretrained", w.to(torch.float32))

    def _param_telemetry(self) -> dict[str, float]:
        """``||w_down - w_down_pretrained||``: how far W^(0) moved from the checkpoint's W_down."""
        w = full_tensor(self.w_down.detach())
        return {"w_down_drift": (w.float() - self.w_down_pretrained).norm().item()}

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"dim={self.dim}, hidden={self.hidden}, chunk_size={c.chunk_size}, eta={c.eta}, "
            f"eta_norm={c.eta_norm}, "
            f"target_source={c.target_source}, conv_kernel_size={c.conv_kernel_size}, "
            f"conv_depthwise={c.conv_depthwise}"
        )

    # ---------------------------------------------------------------- computations
    def target(self, src: torch.Tensor) -> torch.Tensor:
        """``V = Conv1D_K(src) W_target^T`` per chunk of the grid starting at ``src[:, 0]``: ``[B, T, d]``,
        times the write gate ``g_t`` of each step when ``write_gate`` reads the source."""
        B, T, D = src.shape
        C, K = self.config.chunk_size, self.config.conv_kernel_size
        n = math.ceil(T / C)
        L = T if n == 1 else C
        x = F.pad(src, (0, 0, 0, n * L - T)) if n * L != T else src
        x = x.reshape(B * n, L, D).transpose(1, 2)  # [B n, D, L]
        x = F.pad(x, (0, K - 1))  # zeros after the chunk's end: chunk i never reads chunk i+1
        groups = D if self.config.conv_depthwise else 1
        y = F.conv1d(x, self.target_conv.to(x.dtype), groups=groups)  # [B n, D, L]
        y = y.transpose(1, 2).reshape(B, n * L, D)[:, :T]
        v = F.linear(y, self.target_proj.to(y.dtype))
        if self.config.write_gate and self.config.write_gate_input == "source":
            v = v * self.gate(src).to(v.dtype)  # [B, T, d] * [B, T, 1]
        return v

    def gate(self, inp: torch.Tensor) -> torch.Tensor:
        """The write gate ``g_t = 2 sigmoid(inp_t . w + b)``, ``[B, T, 1]``: per step, so streaming (one
        chunk buffer) == training. ``inp`` is the target source or the key ``z`` (``write_gate_input``)."""
        return 2 * torch.sigmoid(
            F.linear(inp, self.write_gate_w.to(inp.dtype)[None], self.write_gate_b.to(inp.dtype))
        )

    def update_target(self, src: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The ``V`` the update ``eta * V[i]^T Z[i]`` uses, ``[B, T, d]``: :meth:`target` (times the
        write gate of the key ``z`` under ``write_gate_input: key``), divided by its chunk's mean
        ``||z||^2`` under ``eta_norm: zsq`` (then in float32 or float64). ``z`` is ``[B, T, h]`` on the
        same chunk grid."""
        v = self.target(src)
        if self.config.write_gate and self.config.write_gate_input == "key":
            v = v * self.gate(z).to(v.dtype)
        if self.config.eta_norm == "zsq":
            s = chunk_mean_sq(z, self.config.chunk_size).clamp_min(_ZSQ_FLOOR)  # [B, T]
            v = v.to(s.dtype) / s.unsqueeze(-1)
        return v

    def _forward_sequence(self, x: torch.Tensor, src: torch.Tensor, update: bool) -> torch.Tensor:
        z = self.activations(x)
        if not update:  # every chunk with W^(0): Moshi's own linear_out with w_down as its weight
            with no_autocast(z.device):
                return base_term(z, self.w_down).to(z.dtype)
        v = self.update_target(src, z)
        out, _ = ttt_chunked(
            z,
            v,
            self.w_down,
            self.config.eta,
            self.config.chunk_size,
            form=self.config.fast_form,
            return_final=False,
            precision=self.config.update_precision,
        )
        if self.record_stats:  # once: a gradient-checkpointing recompute does not pay for it again
            self.last_stats = self.sequence_stats(z, v)
            self.record_stats = False
        return out

    @torch.no_grad()
    def sequence_stats(self, z: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """The telemetry of one sequence forward (``moshi_ttt.layer.TELEMETRY``), from its activations
        ``z [B, T, h]`` and update targets ``v [B, T, d]`` (:meth:`update_target`). Costs about one more
        forward of the layer, so training computes it on logging steps only."""
        eta, C = self.config.eta, self.config.chunk_size
        zf, vf = z.detach().float(), v.detach().float()
        B, T, h = zf.shape
        w0 = self.w_down.detach()
        base = base_term(z.detach(), w0).float()  # [B, T, d]: the output with W^(0)
        # The TTT term alone, exactly (out - base would carry out's rounding under bf16).
        zero = torch.zeros(w0.shape, device=zf.device, dtype=torch.float32)
        term, _ = ttt_chunked(zf, vf, zero, eta, C, form=self.config.fast_form, return_final=False)
        upd = torch.bmm(vf.transpose(1, 2), zf)  # [B, d, h]: the whole sequence's V^T Z
        stats = {
            "update_norm": (eta * upd).norm(dim=(1, 2)).mean(),
            "term_ratio": term.norm() / base.norm().clamp_min(1e-30),
            "z_sq_mean": zf.square().sum(-1).mean(),
        }
        n = T // C  # complete chunks (a trailing partial chunk's update is never applied)
        if n:
            zc = zf[:, : n * C].reshape(B * n, C, h)
            vc = vf[:, : n * C].reshape(B * n, C, -1)
            # ||V_i^T Z_i||_F^2 = sum_{s,t} (v_s . v_t)(z_s . z_t): two [C, C] Gram matrices per chunk
            # instead of one [d, h] weight per chunk.
            sq = (torch.bmm(vc, vc.transpose(1, 2)) * torch.bmm(zc, zc.transpose(1, 2))).sum((1, 2))
            w0_norm = w0.float().norm().clamp_min(1e-30)
            stats["chunk_update_ratio"] = eta * sq.clamp_min(0).sqrt().mean() / w0_norm
        return stats

    # ---------------------------------------------------------------- streaming
    def _init_streaming_state(self, batch_size: int) -> _TTTState:
        w0 = self.w_down.detach()
        dev, C = w0.device, self.config.chunk_size
        return _TTTState(
            batch_size,
            dev,
            pos=torch.zeros(batch_size, dtype=torch.long),
            delta=torch.zeros(batch_size, self.dim, self.hidden, device=dev, dtype=torch.float32),
            w0=w0,
            buf_z=torch.zeros(batch_size, C, self.hidden, device=dev, dtype=torch.float32),
            buf_src=torch.zeros(batch_size, C, self.dim, device=dev, dtype=w0.dtype),
            pos_dev=torch.zeros(batch_size, dtype=torch.long, device=dev),
        )

    def _chunk_start_output(self, state: _TTTState, z: torch.Tensor, zf: torch.Tensor) -> torch.Tensor:
        """``z W^(0)T`` (the base term, in the dtype training uses for it) ``+ z delta^T`` (float32)."""
        return torch.baddbmm(base_term(z, state.w0).float(), zf, state.delta.transpose(1, 2))

    def _apply_update(self, state: _TTTState, done: torch.Tensor) -> None:
        """W^(i) = W^(i-1) + eta V[i]^T Z[i] for the elements in ``done``.

        One element at a time, with the same shapes whichever others complete a chunk on this step:
        a batched product over the elements that happen to be done together rounds differently on
        some CPUs (MKL's AVX2 GEMM blocks ``[k C, d]`` and ``[C, d]`` differently), which made a
        served conversation's fast weights depend on the other slots' timing."""
        eta = self.config.eta
        for b in done.nonzero().flatten().tolist():
            v = self.update_target(state.buf_src[b : b + 1], state.buf_z[b : b + 1]).float()  # [1, C, d]
            state.delta[b].addmm_(v[0].t(), state.buf_z[b], alpha=eta)

    def _forward_stream(self, x: torch.Tensor, src: torch.Tensor, state: _TTTState) -> torch.Tensor:
        if state.graph_steps:  # graph-mode steps ran before this eager call
            self.prepare_graph_step()
        z = self.activations(x)
        zf = z.to(torch.float32)
        state.pos_dev_stale = True
        outs = self._stream_chunks(state, (z, zf), (zf, src))
        return torch.cat(outs, dim=1).to(x.dtype)

    @torch.no_grad()
    def prepare_graph_step(self, pos: torch.Tensor | None = None) -> None:
        """Between two graph-mode steps (eagerly, outside any CUDA graph): read the device positions
        back, apply the updates of the chunks that completed, and write the positions the next step
        will use. :class:`moshi_ttt.TTTLMGen` calls it before every step, with ``pos`` (CPU) read
        once for all TTT layers (they see the same steps), so a step costs one host sync in all."""
        state = self._streaming_state
        if state is None:
            return
        if state.graph_steps:
            state.pos.copy_(state.pos_dev.cpu() if pos is None else pos)
            state.graph_steps = False
            done = state.pos >= self.config.chunk_size
            if bool(done.any()):
                self._complete_chunks(state, done)
                state.pos_dev_stale = True
        if state.pos_dev_stale:
            state.pos_dev.copy_(state.pos)
            state.pos_dev_stale = False

    @torch.no_grad()
    def _forward_graph_step(self, x: torch.Tensor, src: torch.Tensor, state: _TTTState) -> torch.Tensor:
        """One streaming step that a CUDA graph can capture and replay: no host sync and no branch on
        data. The output uses the chunk-start weight; ``z`` and the source go into the chunk buffers
        at the device-side position, which advances where ``exec_mask`` is set. The chunk-end update
        is left to :meth:`prepare_graph_step` before the next step."""
        B, T, _ = x.shape
        if T != 1:
            raise ValueError(f"graph-mode TTT streaming takes one step per call, got {T}")
        z = self.activations(x)
        zf = z.to(torch.float32)
        out = self._chunk_start_output(state, z, zf)
        # A completed chunk waits for prepare_graph_step; clamping keeps a forgotten call in bounds.
        idx = state.pos_dev.clamp(max=self.config.chunk_size - 1).view(B, 1, 1)
        state.buf_z.scatter_(1, idx.expand(B, 1, self.hidden), zf)
        state.buf_src.scatter_(1, idx.expand(B, 1, src.shape[-1]), src.to(state.buf_src.dtype))
        state.pos_dev.add_(state.exec_mask.to(torch.long))
        return out.to(x.dtype)
