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
information past the window, like TTT fast weights, can answer it. Between events the text stream holds PAD (or, with
``filler_rate``, random filler tokens on that fraction of the free frames, as words in speech).

The audio codebooks (``audio``):

- ``silent``: a constant code on every frame, so the task lives in the text stream only;
- ``uniform``: every code of every codebook drawn independently and uniformly on every frame (the
  hardest case: unpredictable audio, nothing to learn from it);
- ``markov``: every codebook of both speakers changes on every frame, following a fixed random
  sparse Markov chain (each code has four possible successors, the same table for every sequence, so
  the audio is learnable but carries nothing about the keys and values);
- ``bank``: real Mimi codes (``audio_bank``: whole conversations' code streams, e.g. the tiny
  dataset's speech encoded by its Mimi), one crop of ``num_frames`` per item at a conversation and
  start chosen by ``(seed, index)``, so a small bank still gives varied audio.

With live audio the fast weight's keys (the MLP activations ``Z``) are driven by the audio as much
as by the text, which is what Moshi meets in real conversations. Items are functions of
``(seed, index)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from ..schema import ConfigError
from .synthetic import EVAL_SEED_OFFSET

logger = logging.getLogger(__name__)

DEF, QRY = 4, 5
FIRST_KEY = 6
AUDIO_MODES = ("silent", "uniform", "markov", "bank")
_MARKOV_SEED = 20261130  # the audio "language": one transition table for every sequence and split
_MARKOV_BRANCHING = 4


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
        audio: str = "silent",
        card: int = 64,
        audio_bank: list[torch.Tensor] | None = None,
        filler_rate: float = 0.0,
        num_fillers: int = 16,
        far_pairs: int | None = None,
        near_max: int | None = None,
    ) -> None:
        need = FIRST_KEY + num_keys + num_values + (num_fillers if filler_rate > 0 else 0)
        if need > text_card:
            raise ValueError(f"recall task needs {need} text ids, model has {text_card}")
        if audio not in AUDIO_MODES:
            raise ValueError(f"recall task: audio must be one of {', '.join(AUDIO_MODES)}, got {audio!r}")
        if audio == "bank":
            if not audio_bank or any(a.dim() != 2 or a.shape[0] != n_q for a in audio_bank):
                shapes = None if audio_bank is None else [tuple(a.shape) for a in audio_bank[:3]]
                raise ValueError(
                    f"recall task: audio 'bank' needs audio_bank, a list of [n_q={n_q}, frames] code streams, "
                    f"got {shapes}"
                )
            short = min(a.shape[1] for a in audio_bank)
            if short < num_frames:
                raise ValueError(
                    f"recall task: an audio bank stream has {short} frames, need at least {num_frames}"
                )
        if not 0.0 <= filler_rate < 1.0:
            raise ValueError(f"recall task: filler_rate must be in [0, 1), got {filler_rate}")
        if pairs > num_keys:
            raise ValueError(f"recall task: pairs ({pairs}) must be <= num_keys ({num_keys})")
        # How many pairs are queried far (the others near); default: half, rounded up.
        self.far_pairs = (pairs + 1) // 2 if far_pairs is None else far_pairs
        if not 1 <= self.far_pairs <= pairs:
            raise ValueError(f"recall task: far_pairs must be in [1, pairs={pairs}], got {far_pairs}")
        # The largest near distance (steps from the definition's value to the query's): by default
        # the whole window less the markers, so near distances scale with the window.
        self.near_max = max(3, context - 5) if near_max is None else near_max
        if not 3 <= self.near_max <= max(3, context - 5):
            raise ValueError(
                f"recall task: near_max must be in [3, {max(3, context - 5)}] (a near query stays inside the "
                f"{context}-step window), got {near_max}"
            )
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
        self.audio, self.card, self.audio_bank = audio, card, audio_bank
        self.filler_rate, self.first_filler, self.num_fillers = (
            filler_rate,
            FIRST_KEY + num_keys + num_values,
            num_fillers,
        )
        if audio == "markov":
            g = torch.Generator().manual_seed(_MARKOV_SEED)
            self._succ = torch.randint(0, card, (n_q, card, _MARKOV_BRANCHING), generator=g)

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
        n_far = self.far_pairs
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
            q = p + rand(3, self.near_max)  # the query's value stays inside the window
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
        if self.filler_rate > 0:
            free = (text == self.pad).nonzero().flatten()
            take = torch.rand(len(free), generator=g) < self.filler_rate
            words = torch.randint(0, self.num_fillers, (int(take.sum()),), generator=g) + self.first_filler
            text[free[take]] = words
        return text, queries

    def queries(self, index: int) -> list[Query]:
        return self.layout(index)[1]

    def audio_codes(self, index: int) -> torch.Tensor:
        """The audio codebooks ``[n_q, T]`` of item ``index``."""
        T = self.num_frames
        if self.audio == "silent":
            return torch.full((self.n_q, T), self.silence, dtype=torch.long)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index + 7_777_777)
        if self.audio == "bank":
            stream = self.audio_bank[int(torch.randint(0, len(self.audio_bank), (1,), generator=g))]
            start = int(torch.randint(0, stream.shape[1] - T + 1, (1,), generator=g))
            return stream[:, start : start + T].clone()
        if self.audio == "uniform":
            return torch.randint(0, self.card, (self.n_q, T), generator=g)
        # markov: code[t] = one of the four successors of code[t-1], per codebook.
        codes = torch.empty(self.n_q, T, dtype=torch.long)
        codes[:, 0] = torch.randint(0, self.card, (self.n_q,), generator=g)
        branch = torch.randint(0, _MARKOV_BRANCHING, (self.n_q, T), generator=g)
        rows = torch.arange(self.n_q)
        for t in range(1, T):
            codes[:, t] = self._succ[rows, codes[:, t - 1], branch[:, t]]
        return codes

    def __getitem__(self, index: int) -> torch.Tensor:
        text, _ = self.layout(index)
        return torch.cat([text[None], self.audio_codes(index)], 0)


def _audio_bank(dataset, num_frames: int) -> list[torch.Tensor]:
    """The whole-file code streams ``[n_q, frames]`` of a manifest dataset's conversations that hold
    at least ``num_frames`` frames (unreadable ones are skipped with a warning, shorter ones left out)."""
    from .audio import FRAME_RATE, BadItem

    streams, short = [], 0
    for entry in dataset.entries:
        try:
            codes = dataset.source.codes(entry.path)
        except BadItem as e:
            logger.warning("recall audio bank: skipping %s: %s", entry.path, e)
            continue
        if codes.shape[1] >= num_frames:
            streams.append(codes)
        else:
            short += 1
    if not streams:
        raise ConfigError(
            f"data.recall.audio: bank needs conversations of at least {num_frames} frames "
            f"({num_frames / FRAME_RATE:g} s, data.duration_sec); the manifest has none ({short} shorter)"
        )
    return streams


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
    if r.far_min is not None and r.far_min < receptive + 2:
        raise ConfigError(
            f"data.recall.far_min: {r.far_min} steps is within reach of attention (receptive field "
            f"{receptive} steps: {len(model.transformer.layers)} layers x (window - 1)); use >= {receptive + 2} or null"
        )
    banks = (None, None)
    if r.audio == "bank":
        from .build import conversation_datasets

        train_audio, eval_audio = conversation_datasets(cfg, model)
        T = cfg.data.num_frames
        train_bank = _audio_bank(train_audio, T)
        banks = (train_bank, _audio_bank(eval_audio, T) if eval_audio is not None else train_bank)
    common = dict(
        num_frames=cfg.data.num_frames,
        context=attention_window(model),
        far_min=r.far_min if r.far_min is not None else receptive + 2,
        num_keys=r.num_keys,
        num_values=r.num_values,
        pairs=r.pairs,
        text_card=model.text_card,
        text_padding_id=model.text_padding_token_id,
        n_q=model.n_q,
        audio=r.audio,
        card=model.card,
        filler_rate=r.filler_rate,
        far_pairs=r.far_pairs,
        near_max=r.near_max,
    )
    train = RecallTask(r.num_train, seed=cfg.seed, audio_bank=banks[0], **common)
    evals = RecallTask(r.num_eval, seed=cfg.seed + EVAL_SEED_OFFSET, audio_bank=banks[1], **common)
    return train, evals
