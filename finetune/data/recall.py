"""A synthetic beyond-the-window recall task in Moshi's text stream.

Each sequence defines its own random key -> value associations and queries them later, at distances
chosen below (``near``) or above (``far``) the attention window. Text stream tokens::

    definition:  DEF key value          query:  QRY key value

The value of a query is the target whose accuracy and loss are reported per distance (from the
definition's value to the query's value). Keys are distinct within a sequence and values are drawn
afresh for every sequence, so a value can only be recovered from earlier in the same sequence; a near
query's value is within one attention window (``context`` steps) of its definition, a far query's
at least ``far_min`` steps after it: beyond the whole stack's receptive field
(:func:`receptive_field`, as :func:`recall_datasets` sets it), so only something that carries
information past the window, like TTT fast weights, can answer it. Between events the text
stream holds PAD, and the audio codebooks hold silence (a constant code), so the task lives in the
text stream only. Items are functions of ``(seed, index)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from ..schema import ConfigError
from .synthetic import EVAL_SEED_OFFSET

DEF, QRY = 4, 5
FIRST_KEY = 6


@dataclass(frozen=True)
class Query:
    value_pos: int  # frame whose text target is the value
    distance: int  # value_pos - the definition's value position
    value: int  # the value token id
    far: bool  # distance >= far_min (out of reach of attention); near queries are within one window


class RecallTask(Dataset):
    def __init__(
        self,
        num_items: int,
        num_frames: int,
        context: int,
        *,
        num_keys: int = 16,
        num_values: int = 16,
        pairs: int = 4,
        seed: int = 0,
        text_card: int = 100,
        text_padding_id: int = 3,
        silence_code: int = 0,
        n_q: int = 8,
        far_min: int | None = None,
    ) -> None:
        if FIRST_KEY + num_keys + num_values > text_card:
            raise ValueError(
                f"recall task needs {FIRST_KEY + num_keys + num_values} text ids, model has {text_card}"
            )
        if pairs > num_keys:
            raise ValueError(f"recall task: pairs ({pairs}) must be <= num_keys ({num_keys})")
        # Far queries are this many steps after their definition. Stacked layers see further than one
        # attention window (about num_layers * (context - 1) steps): pass that for a strict test.
        self.far_min = far_min if far_min is not None else context + 2
        if num_frames < 3 * pairs + self.far_min + 3 * pairs:
            raise ValueError(
                f"recall task: {num_frames} frames cannot hold {pairs} definitions and far queries beyond a "
                f"{context}-step window; use longer sequences (data.duration_sec) or fewer pairs"
            )
        self.num_items, self.num_frames, self.context = num_items, num_frames, context
        self.num_keys, self.num_values, self.pairs = num_keys, num_values, pairs
        self.seed, self.pad, self.silence, self.n_q = seed, text_padding_id, silence_code, n_q
        self.first_value = FIRST_KEY + num_keys

    def __len__(self) -> int:
        return self.num_items

    def layout(self, index: int) -> tuple[torch.Tensor, list[Query]]:
        """Text stream ``[T]`` and its queries."""
        if not 0 <= index < self.num_items:
            raise IndexError(index)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        T, P = self.num_frames, self.pairs
        text = torch.full((T,), self.pad, dtype=torch.long)
        keys = (torch.randperm(self.num_keys, generator=g)[:P] + FIRST_KEY).tolist()
        values = (torch.randint(0, self.num_values, (P,), generator=g) + self.first_value).tolist()
        n_far = (P + 1) // 2
        queries: list[Query] = []

        def put(pos: int, marker: int, i: int) -> None:
            text[pos : pos + 3] = torch.tensor([marker, keys[i], values[i]])

        def rand(lo: int, hi: int) -> int:
            return int(torch.randint(lo, hi + 1, (1,), generator=g))

        # 1. Definitions of the far pairs, at the start.
        def_pos = {}
        p = rand(0, 2)
        for i in range(n_far):
            put(p, DEF, i)
            def_pos[i] = p + 2  # the value's frame
            p += 3 + rand(0, 2)
        # 2. Near pairs: a definition, then its query within the window.
        for i in range(n_far, P):
            put(p, DEF, i)
            def_pos[i] = p + 2
            q = p + 3 + rand(0, max(0, self.context - 8))  # the query's value stays inside the window
            put(q, QRY, i)
            queries.append(Query(q + 2, q + 2 - def_pos[i], values[i], False))
            p = q + 3 + rand(0, 2)
        # 3. Far queries, spread over the rest, each at least far_min after its definition.
        for i in range(n_far):
            lo = max(p, def_pos[i] + self.far_min - 2)
            slots = (T - 3 - lo) // max(1, n_far - i)
            if slots < 0:
                break
            q = lo + rand(0, max(0, slots))
            put(q, QRY, i)
            queries.append(Query(q + 2, q + 2 - def_pos[i], values[i], True))
            p = q + 3
        return text, queries

    def queries(self, index: int) -> list[Query]:
        return self.layout(index)[1]

    def __getitem__(self, index: int) -> torch.Tensor:
        text, _ = self.layout(index)
        audio = torch.full((self.n_q, self.num_frames), self.silence, dtype=torch.long)
        return torch.cat([text[None], audio], 0)


def attention_window(lm) -> int | None:
    """The attention window of moshi ``lm``'s main transformer, in steps (None: unlimited)."""
    return lm.transformer.layers[0].self_attn.context


def receptive_field(lm) -> int | None:
    """How far back (steps) moshi ``lm`` can see through attention alone: each layer reaches
    ``context - 1`` steps further back than the layer below, so ``num_layers * (context - 1)``;
    None when attention is unlimited."""
    context = attention_window(lm)
    return None if context is None else len(lm.transformer.layers) * (context - 1)


def recall_datasets(cfg, model) -> tuple[RecallTask, RecallTask]:
    """Train and eval recall sets of a training config (``data.recall``) for moshi ``model``: far
    queries lie beyond the model's receptive field."""
    receptive = receptive_field(model)
    if receptive is None:
        raise ConfigError(
            "data.source recall: the task needs a model with a limited attention window (model.tiny.context)"
        )
    r = cfg.data.recall
    common = dict(
        num_frames=cfg.data.num_frames,
        context=attention_window(model),
        far_min=receptive + 2,
        num_keys=r.num_keys,
        num_values=r.num_values,
        pairs=r.pairs,
        text_card=model.text_card,
        text_padding_id=model.text_padding_token_id,
        n_q=model.n_q,
    )
    train = RecallTask(r.num_train, seed=cfg.seed, **common)
    evals = RecallTask(r.num_eval, seed=cfg.seed + EVAL_SEED_OFFSET, **common)
    return train, evals
