"""A tiny random-weight Moshi architecture, for tests, the CPU default config and benchmarks.

Same layout as Moshi-7B (text stream + ``n_q`` audio codebooks, ``dep_q`` predicted by a
depformer, RoPE, RMSNorm, SiLU gating, sliding-window attention of ``context`` steps), at a size
that trains on two CPU cores.
"""

from __future__ import annotations

from typing import Any

import torch


def tiny_lm_kwargs(
    dim: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    n_q: int = 4,
    dep_q: int = 4,
    card: int = 64,
    text_card: int = 100,
    context: int = 64,
    depformer_dim: int = 32,
    depformer_num_layers: int = 1,
    **overrides: Any,
) -> dict[str, Any]:
    """``LMModel`` kwargs of a tiny Moshi (``moshi.models.loaders._lm_kwargs`` shrunk)."""
    kwargs: dict[str, Any] = {
        "dim": dim,
        "text_card": text_card,
        "existing_text_padding_id": 3,
        "n_q": n_q,
        "dep_q": dep_q,
        "card": card,
        "num_heads": num_heads,
        "num_layers": num_layers,
        "hidden_scale": 4.125,
        "causal": True,
        "layer_scale": None,
        "context": context,
        "max_period": 10000,
        "gating": "silu",
        "norm": "rms_norm_f32",
        "positional_embedding": "rope",
        "depformer_dim": depformer_dim,
        "depformer_dim_feedforward": int(4.125 * depformer_dim),
        "depformer_num_heads": 4,
        "depformer_num_layers": depformer_num_layers,
        "depformer_layer_scale": None,
        "depformer_multi_linear": True,
        "depformer_context": dep_q,
        "depformer_max_period": 10000,
        "depformer_gating": "silu",
        "depformer_pos_emb": "none",
        "depformer_weights_per_step": True,
        # Moshi's pattern: text and each stream's first (semantic) codebook undelayed, the others by 1.
        "delays": [0] + [0 if k % dep_q == 0 else 1 for k in range(n_q)],
    }
    kwargs.update(overrides)
    return kwargs


def build_tiny_lm(
    seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, **kw
):
    """A random-weight tiny ``LMModel`` (deterministic for a given seed)."""
    from moshi.models import LMModel

    torch.manual_seed(seed)
    return LMModel(device=device, dtype=dtype, **tiny_lm_kwargs(**kw))
