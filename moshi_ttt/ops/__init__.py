"""Fast-weight operators, one module per TTT variant, each with its sequential specification beside
its fast form: :mod:`moshi_ttt.ops.inplace` (In-Place TTT) and :mod:`moshi_ttt.ops.mlp` (TTT-MLP).

The In-Place names are importable from here as well (``from moshi_ttt.ops import ttt_chunked``).
"""

from .inplace import PRECISIONS, base_term, choose_form, ttt_chunked, ttt_reference

__all__ = ["PRECISIONS", "base_term", "choose_form", "ttt_chunked", "ttt_reference"]
