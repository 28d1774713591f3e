"""Streaming generation with TTT layers under moshi's CUDA graphs."""

from __future__ import annotations

import contextlib
from typing import Any

from moshi.models import LMGen
from moshi.utils.compile import no_cuda_graph

from .patch import ttt_layers


class TTTLMGen(LMGen):
    """moshi's ``LMGen`` for a model with TTT layers, CUDA graphs included; same arguments.

    On GPU, moshi captures the main transformer's step in a CUDA graph and replays it every frame.
    An In-Place TTT layer updates its fast weight once every ``chunk_size`` steps, which a replayed
    graph cannot contain. So each step here runs the layers' capturable graph-mode path (output with
    the chunk-start weight; activations and target source written into the chunk buffers at a
    device-side position), and before each step :meth:`InPlaceTTT.prepare_graph_step` applies, outside
    the graph, the updates of the chunks that completed (one host sync per step). The results equal
    moshi's ``LMGen`` run without graphs. A variant without a graph-mode path (``GRAPH_STEPS`` False,
    TTT-MLP today) makes the model stream without CUDA graphs. On CPU (no graphs) it behaves like
    ``LMGen``.
    """

    def __init__(self, lm_model, *args: Any, **kwargs: Any) -> None:
        super().__init__(lm_model, *args, **kwargs)
        gatings = list(ttt_layers(lm_model).values())
        self._graphed = [g for g in gatings if g.GRAPH_STEPS]
        self._graphable = len(self._graphed) == len(gatings)

    def _step(self, *args: Any, **kwargs: Any):
        first = self._graphed[0]._streaming_state if self._graphed else None
        # Every TTT layer has seen the same steps (one chunk size, model-wide exec_mask and resets),
        # so one read of the device positions serves them all: one host sync per step.
        pos = first.pos_dev.to("cpu", copy=True) if first is not None and first.graph_steps else None
        for g in self._graphed:
            g.prepare_graph_step(pos)
            g.graph_mode = True
        try:
            with contextlib.nullcontext() if self._graphable else no_cuda_graph():
                return super()._step(*args, **kwargs)
        finally:
            for g in self._graphed:
                g.graph_mode = False
                if g._streaming_state is not None:
                    g._streaming_state.graph_steps = True
