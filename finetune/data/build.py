"""The datasets of a training config: :func:`build_datasets` dispatches on ``data.source``
(``synthetic``, ``recall``, or ``manifest``: :mod:`finetune.data.manifest`)."""

from __future__ import annotations

import logging

from moshi_ttt.deprecation import moved_attributes

from .manifest import conversation_datasets
from .recall import recall_datasets
from .synthetic import synthetic_datasets

logger = logging.getLogger(__name__)


def build_datasets(cfg, model):
    """(train, eval) datasets of ``cfg.data.source`` for moshi ``model``; eval None: no held-out data."""
    if cfg.data.source == "synthetic":
        return synthetic_datasets(cfg, model)
    if cfg.data.source == "recall":
        return recall_datasets(cfg, model)
    return conversation_datasets(cfg, model)


def report_windows(cfg, model, train_set) -> None:
    """Log how the training windows compare with the attention window (conversation datasets), and
    warn when much of them is padding or few reach past the attention window."""
    stats_of = getattr(train_set, "window_stats", None)
    if stats_of is None:
        return
    context = model.transformer.layers[0].self_attn.context or cfg.data.num_frames
    s = stats_of(context)
    logger.info(
        "data: %d windows of %d steps (%.0f s); %.0f%% of their frames are padding; %.0f%% hold more "
        "than the attention window (%d steps)",
        s["windows"],
        cfg.data.num_frames,
        cfg.data.duration_sec,
        100 * s["padding"],
        100 * s["beyond_context"],
        context,
    )
    if s["padding"] > 0.25:
        logger.warning(
            "%.0f%% of the training frames are padding: the loss ignores them but every layer still "
            "computes them. Conversations are shorter than data.duration_sec; shorten the windows, or "
            'train on longer conversations (docs/long_context.md, "Long context at Moshi scale")',
            100 * s["padding"],
        )
    if cfg.ttt.enabled and s["beyond_context"] < 0.5:
        logger.warning(
            "only %.0f%% of the windows hold more than the attention window (%d steps): elsewhere "
            "attention already sees everything a TTT fast weight could carry; use longer windows "
            "(data.duration_sec) and conversations, or a shorter model.context",
            100 * s["beyond_context"],
            context,
        )


# Moved to finetune.data.manifest (issue 24): the old names work with a DeprecationWarning until the
# next release.
__getattr__ = moved_attributes(
    __name__,
    {
        name: f"finetune.data.manifest:{name}"
        for name in ("resolve_assets", "load_tokenizer", "num_codebooks", "config_num_codebooks")
    },
)
