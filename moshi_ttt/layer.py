"""The contract every TTT variant implements: :class:`TTTLayer`.

A TTT layer replaces the gated MLP (moshi's ``ActivationGating``) of a selected main-transformer
layer. Everything outside a variant's own module (``apply_ttt``, the TTT weights file, ``TTTLMGen``,
and all of ``finetune/``) talks to it through this class only, so a new variant is one module plus
one line in :mod:`moshi_ttt.variants`.

A variant **declares** (class attributes):

- ``VARIANT``: its ``TTTConfig.variant`` name;
- ``PARAM_GROUPS``: its TTT weights, by :class:`ParamGroup` (the optimizer group and parameter-table
  row; a group with ``when`` exists only when that ``TTTConfig`` flag is set). A group is ``pretrained`` when it is taken from the base checkpoint (In-Place's ``w_down``);
  every other TTT weight is *new*: a vanilla Moshi checkpoint lacks it and
  :meth:`TTTLayer.init_new_parameters` initialises it;
- ``SLOW_PARAMS``: name prefixes of its slow weights (the layer's own MLP, possibly LoRA-wrapped);
- ``MOSHI_KEYS``: TTT weights that moshi's own layout stores under another key (``w_down`` is
  ``linear_out.weight``), for exporting back to moshi;
- ``GRAPH_STEPS``: whether it has a CUDA-graph-capturable streaming step for :class:`moshi_ttt.TTTLMGen`
  (then it implements ``_forward_graph_step`` and ``prepare_graph_step(pos)`` and its state keeps
  ``pos_dev`` / ``graph_steps``, as :class:`moshi_ttt.gating.TTTGating` does); without one, a model
  with that variant streams without CUDA graphs.

A variant **implements**: ``_wrap`` (build from moshi's gating), :meth:`TTTLayer.init_new_parameters`,
``_forward_sequence`` (training: the whole sequence at once), ``_init_streaming_state`` (a
:class:`TTTState`), ``_forward_stream`` (around the shared chunk loop), the loop's two hooks
``_chunk_start_output`` and ``_apply_update``, and ``_param_telemetry``; with ``record_stats`` set,
its sequence forward fills ``last_stats`` with what it can of :data:`TELEMETRY`.

The base class **owns**: the input checks, the dispatch between the training forward, eager
streaming and graph-mode steps, the streaming chunk loop (per-element positions, ``exec_mask``,
chunk completion), the switch :attr:`TTTLayer.updates_enabled` that turns updates off in every one of
those paths, telemetry, and materialising the new parameters of a model built on the meta device.
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, TypeVar

import torch
from moshi.modules.streaming import State, StreamingModule
from torch import nn

if TYPE_CHECKING:
    from .config import TTTConfig


# What a variant records in ``last_stats`` (each optional), all means over the batch:
TELEMETRY = {
    "update_norm": "norm of the whole sequence's accumulated fast-weight update",
    "term_ratio": "||TTT term of the output|| / ||output with the fast weights at W^(0)||",
    "chunk_update_ratio": "one complete chunk's update ||dW|| / ||W^(0)|| (mean over chunks)",
    "z_sq_mean": "mean ||z_t||^2 of the activations the fast weight reads",
}


@dataclass(frozen=True)
class ParamGroup:
    """A group of a TTT layer's TTT weights: one optimizer group and one parameter-table row."""

    name: str  # the group's key (in finetune's parameter groups)
    label: str  # its row in the start-of-run parameter table
    params: tuple[str, ...]  # parameter names inside the layer
    pretrained: bool = False  # taken from the base checkpoint (not new); trains per ttt.train_w_down
    # A TTTConfig flag the group depends on: the layer has these parameters only when it is true.
    when: str | None = None


@dataclass
class TTTState(State):
    """What every TTT layer keeps while streaming: per batch element, how many steps of the current
    chunk it has seen, and the chunk buffers its update reads when the chunk completes."""

    pos: torch.Tensor  # [B] int64 on CPU: steps of the current chunk seen so far

    def chunk_buffers(self) -> tuple[torch.Tensor, ...]:
        """The ``[B, C, ...]`` buffers the chunk loop fills, in the order of its ``buffered`` inputs."""
        raise NotImplementedError

    def reset(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        self.pos[reset_mask.cpu()] = 0


S = TypeVar("S", bound=TTTState)


class _class_or_instance:  # noqa: N801 - used as a decorator, like classmethod
    """A method bound to the instance when called on one, to the class otherwise (what a layer has
    depends on its config; what a variant may have, on the class)."""

    def __init__(self, f):
        self.f = f

    def __get__(self, obj, cls):
        return functools.partial(self.f, cls if obj is None else obj)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded (FSDP2 DTensor) parameter: a collective, every rank calls it."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class TTTLayer(StreamingModule[S]):
    """Base class of the TTT layers (see the module docstring for the contract)."""

    _fsdp_final = True  # as moshi's ActivationGating: an FSDP wrapping policy stops here
    VARIANT: ClassVar[str]
    PARAM_GROUPS: ClassVar[tuple[ParamGroup, ...]]
    SLOW_PARAMS: ClassVar[tuple[str, ...]]
    MOSHI_KEYS: ClassVar[dict[str, str]] = {}
    GRAPH_STEPS: ClassVar[bool] = False

    config: TTTConfig
    dim: int

    def __init__(self) -> None:
        super().__init__()
        # The one switch for test-time updates: False keeps the fast weights at W^(0) in the training
        # forward, in eager streaming and in graph-mode steps alike (same weights, no TTT).
        self.updates_enabled = True
        self.graph_mode = False  # streaming: the capturable one-step path, set by TTTLMGen per step
        # Training telemetry: with record_stats set, the next sequence forward keeps its statistics
        # (TELEMETRY keys, 0-dim tensors) in last_stats until telemetry() reads them, and clears
        # record_stats (a gradient-checkpointing recompute of that forward records nothing).
        self.record_stats = False
        self.last_stats: dict[str, torch.Tensor] = {}

    @property
    def freeze_updates(self) -> bool:
        """Older name of ``not updates_enabled`` (it used to act on streaming only)."""
        return not self.updates_enabled

    @freeze_updates.setter
    def freeze_updates(self, value: bool) -> None:
        self.updates_enabled = not value

    # ---------------------------------------------------------------- what the layer is
    @_class_or_instance
    def param_groups(self_or_cls) -> tuple[ParamGroup, ...]:
        """The layer's groups of :attr:`PARAM_GROUPS`: on a layer, those its config enables (a group
        with ``when`` exists only when that flag is set); on the class, every possible group."""
        groups = self_or_cls.PARAM_GROUPS
        if isinstance(self_or_cls, type):
            return groups
        return tuple(g for g in groups if g.when is None or getattr(self_or_cls.config, g.when))

    @_class_or_instance
    def ttt_param_names(self_or_cls) -> tuple[str, ...]:
        """Every TTT weight (what a TTT weights file holds)."""
        return tuple(p for g in self_or_cls.param_groups() for p in g.params)

    @_class_or_instance
    def new_param_names(self_or_cls) -> tuple[str, ...]:
        """The TTT weights a vanilla Moshi checkpoint lacks."""
        return tuple(p for g in self_or_cls.param_groups() if not g.pretrained for p in g.params)

    @classmethod
    def source(cls, config: TTTConfig) -> str:
        """What the layer reads besides its MLP input: ``text_emb``, ``input_emb``, ``user_audio_emb`` or ``hidden``
        (nothing else). ``apply_ttt`` captures it and hands it to :meth:`forward` as ``src``."""
        return config.target_source

    @classmethod
    def from_gating(cls, gating: nn.Module, config: TTTConfig) -> TTTLayer:
        """Turn a moshi ``ActivationGating`` (plain or LoRA-wrapped) into this TTT layer."""
        for attr in ("linear_in", "linear_out", "activation"):
            if not hasattr(gating, attr):
                raise ValueError(
                    f"TTT needs a gated MLP (moshi ActivationGating with linear_in/linear_out), got "
                    f"{type(gating).__name__} without `{attr}`; build the model with gating='silu'"
                )
        return cls._wrap(gating, config)

    @classmethod
    @abc.abstractmethod
    def _wrap(cls, gating: nn.Module, config: TTTConfig) -> TTTLayer:
        """Build the layer around a checked moshi gating (keeping its slow weights)."""

    @abc.abstractmethod
    def init_new_parameters(self) -> None:
        """Initialise every new parameter (:meth:`new_param_names`) so the layer computes exactly what
        the base model's MLP computes while the new parameters still receive gradient. A no-op on
        the meta device."""

    def materialise_new_parameters(self, device: torch.device | str) -> bool:
        """Allocate on ``device`` and initialise the new parameters still on the meta device (a model
        built on meta, loaded from a vanilla checkpoint). Returns whether there were any."""
        names = self.new_param_names()
        meta = [n for n in names if getattr(self, n).is_meta]
        if not meta:
            return False
        if len(meta) != len(names):
            kept = sorted(set(names) - set(meta))
            raise ValueError(
                f"{type(self).__name__}: the checkpoint holds {kept} but not {meta}; a base checkpoint "
                "holds none of a TTT layer's new parameters, a TTT weights file all of them"
            )
        for n in meta:
            p = getattr(self, n)
            new = torch.empty(p.shape, dtype=p.dtype, device=device)
            setattr(self, n, nn.Parameter(new, requires_grad=p.requires_grad))
        self.init_new_parameters()
        return True

    # ---------------------------------------------------------------- telemetry
    @abc.abstractmethod
    def _param_telemetry(self) -> dict[str, float]:
        """How far the layer's weights moved from where the base model puts them."""

    def telemetry(self) -> dict[str, float]:
        """Training telemetry: :meth:`_param_telemetry` and the statistics of the last sequence forward
        run with ``record_stats`` set (:data:`TELEMETRY`), each read once. Collective under FSDP2."""
        out = self._param_telemetry()
        out.update({k: float(v) for k, v in self.last_stats.items()})
        self.last_stats = {}
        return out

    def probe_init(self) -> bool:
        """Give a layer whose TTT term is zero at initialisation by construction a fixed nonzero one,
        so what its updates would do can be measured before any training (``scripts/probe_eta.py``).
        Returns whether it changed the layer. The default changes nothing."""
        return False

    # ---------------------------------------------------------------- forward
    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """``Z = act(x W_gate^T) * (x W_up^T)``, ``[B, T, h]``, of the gated MLP the layer keeps
        (``linear_in``, ``activation``), computed as in moshi's gating kernel."""
        y = self.linear_in(x)
        B, T, _ = y.shape
        y = y.view(B, T, 2, -1)  # [B, T, 2, h]: W_gate rows first, then W_up
        return self.activation(y[..., 0, :]) * y[..., 1, :]

    def _check_inputs(self, x: torch.Tensor, src: torch.Tensor | None) -> torch.Tensor:
        """Check the MLP input ``x`` and the target source; returns the source to use."""
        name = type(self).__name__
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"{name} input must be [B, T, {self.dim}], got {tuple(x.shape)}")
        if x.shape[1] == 0:
            raise ValueError(f"{name} got an empty sequence (T = 0)")
        source = self.source(self.config)
        if source == "hidden":
            return x if src is None else src
        if src is None:
            raise ValueError(
                f"TTT target source '{source}' is missing: run the model through "
                "LMModel.forward / forward_text / LMGen after moshi_ttt.apply_ttt (which captures it), "
                "or pass ttt_src=... to the transformer"
            )
        if src.shape != x.shape:
            raise ValueError(
                f"TTT target source '{source}' has shape {tuple(src.shape)}, "
                f"expected {tuple(x.shape)} (same [B, T, d] as the MLP input)"
            )
        if src.device != x.device:
            raise ValueError(f"TTT target source is on {src.device} but the MLP input is on {x.device}")
        return src

    def forward(self, x: torch.Tensor, src: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, T, dim]`` (the normalised MLP input), ``src`` the target source -> ``[B, T, dim]``."""
        src = self._check_inputs(x, src)
        state = self._streaming_state
        if state is None:
            return self._forward_sequence(x, src, update=self.updates_enabled)
        if x.shape[0] != state.batch_size:
            raise ValueError(
                f"streaming batch size is {state.batch_size}, got an input of batch {x.shape[0]}"
            )
        if self.graph_mode:
            return self._forward_graph_step(x, src, state)
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "TTT streaming under a CUDA graph needs the graph-mode step: stream with "
                "moshi_ttt.TTTLMGen instead of moshi's LMGen (or set NO_CUDA_GRAPH=1)"
            )
        return self._forward_stream(x, src, state)

    @abc.abstractmethod
    def _forward_sequence(self, x: torch.Tensor, src: torch.Tensor, update: bool) -> torch.Tensor:
        """The whole sequence at once (training, evaluation): chunk ``i`` with the state after chunks
        ``< i``; with ``update`` False, every chunk with the initial state."""

    @abc.abstractmethod
    def _forward_stream(self, x: torch.Tensor, src: torch.Tensor, state: S) -> torch.Tensor:
        """Streaming: the next steps of each batch element, through :meth:`_stream_chunks`."""

    def _forward_graph_step(self, x: torch.Tensor, src: torch.Tensor, state: S) -> torch.Tensor:
        raise RuntimeError(f"{type(self).__name__} has no graph-mode streaming step (GRAPH_STEPS is False)")

    # ---------------------------------------------------------------- the streaming chunk loop
    @abc.abstractmethod
    def _chunk_start_output(self, state: S, *pieces: torch.Tensor) -> torch.Tensor:
        """Hook: the output of a piece of steps that lies inside one chunk, with each element's
        chunk-start state. ``pieces``: the loop's ``inputs``, cut to the piece. A new tensor, never a
        view of the state (the state changes before the pieces are concatenated). A variant whose
        fast weights also move inside a chunk (TTT-MLP) folds the piece into the state of the elements
        in ``state.exec_mask`` here, and its output reads those moves."""

    @abc.abstractmethod
    def _apply_update(self, state: S, done: torch.Tensor) -> None:
        """Hook: the update of the chunk that just completed, from the chunk buffers, for the batch
        elements in ``done`` (CPU bool ``[B]``)."""

    def _complete_chunks(self, state: S, done: torch.Tensor) -> None:
        """Chunk end for the elements in ``done``: the update (unless updates are off), a new chunk."""
        if self.updates_enabled:
            self._apply_update(state, done)
        state.pos[done] = 0

    @torch.no_grad()
    def _stream_chunks(
        self, state: S, inputs: Sequence[torch.Tensor], buffered: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """The streaming loop every variant shares. Cuts the ``T`` new steps into pieces that end at
        the next chunk boundary of any active element; per piece: the output with the chunk-start
        state (:meth:`_chunk_start_output` on ``inputs`` cut to the piece), ``buffered`` (``[B, T, ...]``
        each) written into ``state.chunk_buffers()`` at each active element's position, and the
        update of every chunk that completes. Elements whose ``exec_mask`` is False neither buffer
        nor advance. Returns the outputs of the pieces, in order."""
        T = inputs[0].shape[1]
        C = self.config.chunk_size
        bufs = state.chunk_buffers()
        active = state.exec_mask.cpu()
        pos = state.pos
        outs = []
        t = 0
        while t < T:
            L = T - t
            if active.any():
                L = min(L, int((C - pos[active]).min()))
            outs.append(self._chunk_start_output(state, *(x[:, t : t + L] for x in inputs)))
            if active.all() and bool((pos == pos[0]).all()):
                p = int(pos[0])
                for buf, x in zip(bufs, buffered):
                    buf[:, p : p + L] = x[:, t : t + L]
            else:
                for b in active.nonzero().flatten().tolist():
                    p = int(pos[b])
                    for buf, x in zip(bufs, buffered):
                        buf[b, p : p + L] = x[b, t : t + L]
            pos[active] += L
            done = pos == C
            if done.any():
                self._complete_chunks(state, done)
            t += L
        return outs


def named_ttt_layers(model: nn.Module) -> Iterator[tuple[str, TTTLayer]]:
    """``(module name, layer)`` for every TTT layer of a model (names as in its state dict)."""
    for name, module in model.named_modules():
        if isinstance(module, TTTLayer):
            yield name, module
