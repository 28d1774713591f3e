"""In-Place TTT fast-weight operators: the sequential specification and the fast forms.

Notation (one TTT layer, one batch element): ``Z [T, h]`` are the gated MLP activations
``silu(H W_gate^T) * (H W_up^T)``, ``V [T, d]`` the targets, ``W0 [d, h]`` the initial fast weight
(Moshi's ``linear_out.weight``). The sequence is cut into chunks of ``C`` tokens aligned to its start
(the last may be partial). Chunk ``i`` is computed with the weight *before* its own update::

    O[i]  = Z[i] @ W^(i-1)^T
    W^(i) = W^(i-1) + eta * V[i]^T @ Z[i]

Because the update is linear in ``W`` (the paper's loss is ``-<V, Z W^T>_F``) the whole recurrence
has a closed form, the "dual" form::

    O = Z W0^T + eta * (M * (Z Z^T)) V,    M[s, t] = 1  iff  chunk(t) < chunk(s)

:func:`ttt_reference` is the specification: a plain loop over chunks in float32 that materialises
the weight of every chunk. :func:`ttt_chunked` is what the model uses; it never holds one ``[d, h]``
weight per chunk. It walks over *tiles* (a whole number of chunks, at least ``_MIN_TILE`` tokens):

- ``dual`` form: tile ``r`` attends to everything before it, ``eta * (Z_r Z_<r^T) V_<r``, costing
  ``O(T^2 (d + h))`` in all. Cheapest for sequences up to a few thousand tokens.
- ``scan`` form: a running state ``S = sum_j V_j^T Z_j`` (one ``[d, h]`` per batch element) gives the
  inter-tile term ``eta * Z_r S^T``; ``O(T d h)``, linear in ``T``.

Within a tile that holds several chunks (small ``C``) the dual form is used with the block-strict
mask. Both forms run inside a custom autograd function that saves only ``z``, ``v`` and ``w0`` (plus,
in the dual form, the small ``[L, r0]`` score tiles) and recomputes the rest in backward; the scan's
backward recomputes the states in a forward sweep and accumulates the suffix gradient in a reverse
sweep, so its memory stays at two ``[B, d, h]`` buffers whatever the length.

Precision (``precision``, the layer's ``TTTConfig.update_precision``). Whatever accumulates across
tiles (``out``, the gradients ``dz`` / ``dv``, the scan state and its gradient, ``w_final``) is
float32 (float64 if any input is float64), whatever the inputs' dtype: a tiny per-chunk update never
meets a bf16 accumulator. The *products* feeding those sums run

- ``"fp32"``: with float32 operands (TF32 tensor cores if ``torch.backends.cuda.matmul.allow_tf32``);
- ``"bf16"``: when ``z`` is bf16 or fp16 (bf16 autocast, or a bf16 model), with bfloat16 operands
  and float32 accumulation and results, the precision of a tensor-core GEMM. The inputs are
  already bf16 then, so what this rounds in addition is the intermediate operands: the score tiles
  ``Z Z^T``, their gradients, ``eta * dO`` and the scan state where it enters a product (the state
  itself stays float32). With float32 inputs it computes exactly what ``"fp32"`` does.

On CUDA the bf16 products are ``torch.bmm(..., out_dtype=torch.float32)``; elsewhere they are
emulated exactly (bf16-rounded operands multiplied in float32: a product of two bf16 numbers is exact
in float32), so CPU tests measure the numerics the GPU runs, up to the order of summation. ``out``
comes back in ``z``'s dtype and ``w_final`` in float32.

The base term ``Z W0^T`` is exactly Moshi's own ``linear_out`` and is computed the way that layer
would be: in ``z``'s dtype when ``z`` is bf16 or fp16, in the compute dtype otherwise. So a TTT layer
whose update is zero reproduces the base model bit for bit in bf16 too, whatever ``precision``.
"""

from __future__ import annotations

import logging

import torch
from torch.nn import functional as F

from .common import no_autocast

__all__ = ["ttt_reference", "ttt_chunked", "choose_form", "base_term", "PRECISIONS"]

logger = logging.getLogger(__name__)

_MIN_TILE = 64
PRECISIONS = ("fp32", "bf16")  # operands of the update math's products (see the module docstring)


def _check_inputs(
    z: torch.Tensor, v: torch.Tensor, w0: torch.Tensor, eta: float, chunk_size: int
) -> tuple[int, int, int, int]:
    for name, t in (("z", z), ("v", v), ("w0", w0)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if z.dim() != 3:
        raise ValueError(f"z must have shape [B, T, h], got {tuple(z.shape)}")
    if v.dim() != 3:
        raise ValueError(f"v must have shape [B, T, d], got {tuple(v.shape)}")
    B, T, h = z.shape
    if v.shape[:2] != (B, T):
        raise ValueError(f"z {tuple(z.shape)} and v {tuple(v.shape)} must agree on [B, T]")
    d = v.shape[2]
    if T == 0:
        raise ValueError("empty sequence: T = 0 (z and v need at least one time step)")
    if w0.shape not in ((d, h), (B, d, h)):
        raise ValueError(
            f"w0 must have shape [d, h] = [{d}, {h}] or [B, d, h] = [{B}, {d}, {h}], got {tuple(w0.shape)}"
        )
    if not (z.device == v.device == w0.device):
        raise ValueError(f"z, v and w0 must be on one device, got {z.device}, {v.device}, {w0.device}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    if isinstance(eta, torch.Tensor) or not isinstance(eta, (int, float)):
        raise ValueError(f"eta must be a Python number, got {type(eta).__name__}")
    return B, T, d, h


def _compute_dtype(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def ttt_reference(
    z: torch.Tensor, v: torch.Tensor, w0: torch.Tensor, eta: float, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The specification: a sequential loop over chunks, one explicit weight per chunk.

    Args:
        z: ``[B, T, h]`` MLP activations. v: ``[B, T, d]`` targets.
        w0: ``[d, h]`` (shared) or ``[B, d, h]`` (per batch element) initial fast weight.
    Returns:
        ``(out [B, T, d] in z's dtype, w_final [B, d, h])`` where ``w_final`` includes the update of
        every chunk, a trailing partial chunk included.
    """
    B, T, d, h = _check_inputs(z, v, w0, eta, chunk_size)
    cdt = _compute_dtype(z, v, w0)
    w = w0.to(cdt).expand(B, d, h)
    outs = []
    for s in range(0, T, chunk_size):
        zc = z[:, s : s + chunk_size].to(cdt)  # [B, c, h]
        vc = v[:, s : s + chunk_size].to(cdt)  # [B, c, d]
        outs.append(torch.einsum("bch,bdh->bcd", zc, w))
        w = w + eta * torch.einsum("bcd,bch->bdh", vc, zc)
    return torch.cat(outs, dim=1).to(z.dtype), w


def choose_form(T: int, d: int, h: int) -> str:
    """The cheaper form by FLOPs: dual costs ~``T^2 (d + h)``, scan ~``4 T d h``."""
    return "dual" if T * (d + h) <= 4 * d * h else "scan"


def _tile_size(chunk_size: int) -> int:
    return chunk_size * max(1, -(-_MIN_TILE // chunk_size))


def _intra_mask(L: int, chunk_size: int, device: torch.device) -> torch.Tensor | None:
    """Block-strict lower mask inside a chunk-aligned tile of ``L`` tokens (None if one chunk)."""
    if L <= chunk_size:
        return None
    cid = torch.arange(L, device=device) // chunk_size
    return cid[None, :] < cid[:, None]  # [L, L]: column chunk strictly before row chunk


def _base(z: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
    # Same kernel as nn.Linear, so a TTT layer at init reproduces Moshi's linear_out bit for bit.
    if w0.dim() == 2:
        return F.linear(z, w0)
    return torch.bmm(z, w0.transpose(1, 2))


def _base_dtype(z: torch.Tensor, cdt: torch.dtype) -> torch.dtype:
    """The dtype of the base term ``Z W0^T``: Moshi's ``linear_out`` would run in ``z``'s."""
    return z.dtype if z.dtype in (torch.bfloat16, torch.float16) else cdt


def base_term(z: torch.Tensor, w0: torch.Tensor, cdt: torch.dtype | None = None) -> torch.Tensor:
    """``Z W0^T`` as Moshi's own ``linear_out`` computes it: in ``z``'s dtype when that is bf16 or
    fp16, else in ``cdt`` (default: the inputs' compute dtype, float64 if either is float64, else
    float32). What a TTT layer outputs when its fast weight is still ``W^(0)``."""
    bdt = _base_dtype(z, _compute_dtype(z, w0) if cdt is None else cdt)
    return _base(z.to(bdt), w0.to(bdt))


class _Products:
    """The products of the update math at one precision (module docstring, "Precision").

    ``op(t)`` is ``t`` as a product operand; ``mm(a, b)`` the batched product of two operands, in the
    compute dtype. In bf16 mode, CUDA (and meta) multiply bf16 operands into float32 results; other
    devices hold the operands as bf16-rounded float32 values and multiply in float32, which is the
    same arithmetic."""

    native_failed: bool = False  # set if this torch build refuses out_dtype: emulate from then on

    def __init__(self, precision: str, z: torch.Tensor, cdt: torch.dtype) -> None:
        self.cdt = cdt
        self.low = precision == "bf16" and z.dtype in (torch.bfloat16, torch.float16) and cdt == torch.float32
        self.native = self.low and z.device.type in ("cuda", "meta") and not _Products.native_failed

    def op(self, t: torch.Tensor) -> torch.Tensor:
        if not self.low:
            return t.to(self.cdt)
        t = t.to(torch.bfloat16)
        return t if self.native else t.to(self.cdt)

    def mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.native:
            try:
                return torch.bmm(a, b, out_dtype=torch.float32)
            except (RuntimeError, NotImplementedError, TypeError) as e:
                if not _Products.native_failed:
                    logger.warning("bf16 products into float32 failed (%s); emulating them in float32", e)
                _Products.native_failed = True  # the same numbers at float32 speed
                self.native = False
        return torch.bmm(a.to(self.cdt), b.to(self.cdt))  # no-ops unless a native product just failed

    def saved(self, t: torch.Tensor) -> torch.Tensor:
        """How a score tile is kept for backward: bf16 in bf16 mode (half the memory, no extra
        rounding: it is an operand already), else as it is."""
        return t.to(torch.bfloat16) if self.low else t


class _TTTChunkedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, v, w0, eta, chunk_size, form, return_final, precision):  # type: ignore[override]
        B, T, h = z.shape
        d = v.shape[2]
        cdt = _compute_dtype(z, v, w0)
        P = _Products(precision, z, cdt)
        zo, vo = P.op(z), P.op(v)  # [B, T, h], [B, T, d] as product operands
        tile = _tile_size(chunk_size)
        out = base_term(z, w0, cdt).to(cdt)  # [B, T, d]
        S = z.new_zeros(B, d, h, dtype=cdt) if form == "scan" else None
        scores = []  # dual form: score tiles Z_r Z_<r^T, reused in backward
        for a in range(0, T, tile):
            b = min(T, a + tile)
            zr, vr = zo[:, a:b], vo[:, a:b]  # [B, L, h], [B, L, d]
            acc = None
            if a > 0:
                if form == "dual":
                    A = P.op(P.mm(zr, zo[:, :a].transpose(1, 2)))  # [B, L, a]
                    scores.append(P.saved(A))
                    acc = P.mm(A, vo[:, :a])  # [B, L, d]
                else:
                    acc = P.mm(zr, P.op(S).transpose(1, 2))  # [B, L, d]
            M = _intra_mask(b - a, chunk_size, z.device)
            if M is not None:
                intra = P.mm(P.op(P.mm(zr, zr.transpose(1, 2)) * M), vr)
                acc = intra if acc is None else acc + intra
            if acc is not None:
                out[:, a:b] += eta * acc
            if S is not None:
                S += P.mm(vr.transpose(1, 2), zr)  # [B, d, h]
        w_final = None
        if return_final:
            if S is None:
                S = P.mm(vo.transpose(1, 2), zo)
            w_final = w0.to(cdt).expand(B, d, h) + eta * S
        ctx.save_for_backward(z, v, w0, *scores)
        ctx.cfg = (eta, chunk_size, form, cdt, precision)
        if w_final is None:
            return out.to(z.dtype)
        return out.to(z.dtype), w_final

    @staticmethod
    def backward(ctx, g_out, g_final=None):  # type: ignore[override]
        with no_autocast(g_out.device):
            return _TTTChunkedFn._backward(ctx, g_out, g_final)

    @staticmethod
    def _backward(ctx, g_out, g_final):
        z, v, w0, *scores = ctx.saved_tensors
        eta, chunk_size, form, cdt, precision = ctx.cfg
        B, T, h = z.shape
        d = v.shape[2]
        P = _Products(precision, z, cdt)
        zo, vo = P.op(z), P.op(v)
        tile = _tile_size(chunk_size)
        # Base term O = Z W0^T, in the dtype the forward used for it.
        bdt = _base_dtype(z, cdt)
        gb, zb = g_out.to(bdt), z.to(bdt)
        dz = _base(gb, w0.to(bdt).transpose(-1, -2)).to(cdt)  # [B, T, h]
        dw = None  # skipped for a frozen w0 (ttt.train_w_down: false), like a frozen nn.Linear's
        if ctx.needs_input_grad[2]:
            if w0.dim() == 2:
                dw = (gb.reshape(-1, d).t() @ zb.reshape(-1, h)).to(cdt)  # [d, h]
            else:
                dw = torch.bmm(gb.transpose(1, 2), zb).to(cdt)  # [B, d, h]
        del gb, zb
        dv = torch.zeros(B, T, d, dtype=cdt, device=v.device)
        gF = None
        if g_final is not None:
            gF = g_final.to(cdt)
            if dw is not None:
                dw = dw + (gF.sum(0) if w0.dim() == 2 else gF)
        tiles = [(a, min(T, a + tile)) for a in range(0, T, tile)]
        eg = P.op(eta * g_out.to(cdt))  # [B, T, d]
        if form == "dual":
            for (a, b), A in zip(tiles[1:], scores):
                A = P.op(A)
                zr, gr = zo[:, a:b], eg[:, a:b]
                dv[:, :a] += P.mm(A.transpose(1, 2), gr)
                dA = P.op(P.mm(gr, vo[:, :a].transpose(1, 2)))  # [B, L, a]
                dz[:, a:b] += P.mm(dA, zo[:, :a])
                dz[:, :a] += P.mm(dA.transpose(1, 2), zr)
            if gF is not None:  # w_final = W0 + eta * V^T Z over the whole sequence
                gFo = P.op(gF)
                dv += eta * P.mm(zo, gFo.transpose(1, 2))
                dz += eta * P.mm(vo, gFo)
        else:
            # Forward sweep: the state each tile saw, for dZ_r += eta dO_r S_r.
            S = z.new_zeros(B, d, h, dtype=cdt)
            for a, b in tiles:
                if a > 0:
                    dz[:, a:b] += P.mm(eg[:, a:b], P.op(S))
                S += P.mm(vo[:, a:b].transpose(1, 2), zo[:, a:b])
            del S
            # Reverse sweep: G_r = eta * sum_{s > r} dO_s^T Z_s (+ eta dW_final) is dLoss/dDelta_r.
            G = eta * gF if gF is not None else z.new_zeros(B, d, h, dtype=cdt)
            for a, b in reversed(tiles):
                zr, vr, Go = zo[:, a:b], vo[:, a:b], P.op(G)
                dv[:, a:b] += P.mm(zr, Go.transpose(1, 2))
                dz[:, a:b] += P.mm(vr, Go)
                if a > 0:
                    G = G + P.mm(eg[:, a:b].transpose(1, 2), zr)
        for a, b in tiles:
            M = _intra_mask(b - a, chunk_size, z.device)
            if M is None:
                continue
            zr, vr, gr = zo[:, a:b], vo[:, a:b], eg[:, a:b]
            Am = P.op(P.mm(zr, zr.transpose(1, 2)) * M)
            dv[:, a:b] += P.mm(Am.transpose(1, 2), gr)
            dA = P.op(P.mm(gr, vr.transpose(1, 2)) * M)
            dz[:, a:b] += P.mm(dA, zr) + P.mm(dA.transpose(1, 2), zr)
        dw = None if dw is None else dw.to(w0.dtype)
        return dz.to(z.dtype), dv.to(v.dtype), dw, None, None, None, None, None


def ttt_chunked(
    z: torch.Tensor,
    v: torch.Tensor,
    w0: torch.Tensor,
    eta: float,
    chunk_size: int,
    *,
    form: str = "auto",
    return_final: bool = True,
    precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fast form of :func:`ttt_reference`: same arguments, same results, no per-chunk weights.

    Args:
        form: ``"dual"``, ``"scan"`` or ``"auto"`` (:func:`choose_form` by FLOPs).
        return_final: compute ``w_final``; pass False in training, where it is not needed and
            would cost one more ``[d, h]``-sized product per batch element.
        precision: ``"fp32"`` or ``"bf16"``: the operands of the update math's products when ``z``
            is bf16 or fp16 (module docstring, "Precision"); sums across tiles are float32 either way.
    Returns:
        ``(out [B, T, d] in z's dtype, w_final [B, d, h] float32 (float64 for float64 inputs) or None)``.
    """
    B, T, d, h = _check_inputs(z, v, w0, eta, chunk_size)
    if form == "auto":
        form = choose_form(T, d, h)
    if form not in ("dual", "scan"):
        raise ValueError(f"form must be 'auto', 'dual' or 'scan', got {form!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    with no_autocast(z.device):
        res = _TTTChunkedFn.apply(z, v, w0, float(eta), chunk_size, form, return_final, precision)
    if return_final:
        return res[0], res[1]
    return res, None
