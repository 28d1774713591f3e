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
as by the text, which is what Moshi meets in real conversations.

Where the facts are stated (``facts``):

- ``text``: the definitions and queries above, in Moshi's own text stream;
- ``audio``: the other speaker states them in their audio codebooks (Moshi's input only: the user's
  words never reach Moshi as text). Every symbol (the definition and query markers, each key, each
  value) is a fixed code pattern of ``pattern_frames`` frames on the user's codebooks, the same for
  every sequence; a definition is ``DEF key value`` and a query ``QRY key`` in the user's audio, and
  Moshi answers the value in its text stream one frame after the query's key has fully arrived (its
  delayed codebooks included). The text stream holds PAD except the answers;
- with ``echo``, Moshi repeats each fact it hears in its own text stream (``key value`` after a
  definition, ``key`` before its answer), as Moshi acknowledges what it is told in conversation;
  scored with Moshi's own text (``scripts/eval_long_context.py --free-text``), the echo must come
  from what Moshi heard, not from the data;
- ``speech``: as ``audio``, with each symbol a spoken word: the Mimi codes of that word as espeak
  says it (``word_codes``, made by ``scripts/make_word_codes.py`` with the Mimi of the data), so
  patterns differ in length from word to word.

The audio modes above fill every frame the facts leave free (the user's stream between facts, and
Moshi's own stream everywhere). Items are functions of ``(seed, index)``.
"""

from __future__ import annotations

import json
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
FACT_MODES = ("text", "audio", "speech")
_MARKOV_SEED = 20261130  # the audio "language": one transition table for every sequence and split
_MARKOV_BRANCHING = 4
_PATTERN_SEED = 20261205  # the spoken symbols of facts: audio: one code pattern per symbol, every split


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
        facts: str = "text",
        dep_q: int | None = None,
        pattern_frames: int = 2,
        word_codes: list[torch.Tensor] | None = None,
        far_pairs: int | None = None,
        echo: bool = False,
        near_max: int | None = None,
    ) -> None:
        need = FIRST_KEY + num_keys + num_values + (num_fillers if filler_rate > 0 else 0)
        if facts not in FACT_MODES:
            raise ValueError(f"recall task: facts must be one of {', '.join(FACT_MODES)}, got {facts!r}")
        self.facts = facts
        if echo and facts == "text":
            raise ValueError("recall task: echo repeats facts stated in audio in Moshi's text; facts is text")
        self.echo = echo
        self.dep_q = n_q // 2 if dep_q is None else dep_q
        if facts != "text":
            self._symbols = self._spoken_symbols(
                facts, n_q - self.dep_q, 2 + num_keys + num_values, pattern_frames, card, word_codes
            )
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
        if not 0.0 <= filler_rate <= 1.0:
            raise ValueError(f"recall task: filler_rate must be in [0, 1], got {filler_rate}")
        if pairs > num_keys:
            raise ValueError(f"recall task: pairs ({pairs}) must be <= num_keys ({num_keys})")
        # How many pairs are queried far (the others near); default: half, rounded up. 0 gives the
        # in-window part alone (what a base model without TTT can learn).
        self.far_pairs = (pairs + 1) // 2 if far_pairs is None else far_pairs
        if isinstance(self.far_pairs, bool) or not 0 <= self.far_pairs <= pairs:
            raise ValueError(f"recall task: far_pairs must be in [0, pairs={pairs}], got {far_pairs}")
        # The largest near distance (steps from the definition's value to the query's): by default
        # the whole window less the markers, so near distances scale with the window.
        if near_max is not None and facts != "text":
            raise ValueError(
                f"recall task: near_max applies to facts in text only (facts is {facts!r}: a spoken near "
                "query already takes what the window leaves); leave it null"
            )
        self.near_max = max(3, context - 5) if near_max is None else near_max
        if not 3 <= self.near_max <= max(3, context - 5):
            raise ValueError(
                f"recall task: near_max must be in [3, {max(3, context - 5)}] (a near query stays inside the "
                f"{context}-step window), got {near_max}"
            )
        # Far queries are this many steps after their definition. Stacked layers see further than one
        # attention window (about num_layers * (context - 1) steps): pass that for a strict test.
        self.far_min = far_min if far_min is not None else context + 2
        if facts == "text" and num_frames < 3 * pairs + self.far_min + 3 * pairs:
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
        if facts != "text":
            self._check_spoken_fits(*self._spans())

    def __len__(self) -> int:
        return self.num_items

    # ------------------------------------------------------------------ facts stated in audio
    @staticmethod
    def _spoken_symbols(facts, n_user, n_symbols, pattern_frames, card, word_codes) -> list[torch.Tensor]:
        """The user-stream codes ``[n_user, frames]`` of every symbol: the DEF and QRY markers, then
        the keys, then the values."""
        if n_user < 1:
            raise ValueError(
                "recall task: facts in audio need a model with the other speaker's codebooks (n_q > dep_q)"
            )
        if facts == "audio":
            if not isinstance(pattern_frames, int) or pattern_frames < 1:
                raise ValueError(
                    f"recall task: pattern_frames must be an integer >= 1, got {pattern_frames!r}"
                )
            g = torch.Generator().manual_seed(_PATTERN_SEED)
            table = torch.randint(0, card, (n_symbols, n_user, pattern_frames), generator=g)
            return list(table)
        if word_codes is None or len(word_codes) < n_symbols:
            have = None if word_codes is None else len(word_codes)
            raise ValueError(
                f"recall task: facts 'speech' needs word_codes for {n_symbols} words (2 markers, the keys, "
                f"the values), got {have}; make them with scripts/make_word_codes.py"
            )
        out = []
        for i, w in enumerate(word_codes[:n_symbols]):
            if w.dim() != 2 or w.shape[0] < n_user or w.shape[1] < 1:
                raise ValueError(
                    f"recall task: word {i}'s codes have shape {tuple(w.shape)}, need [>= {n_user} codebooks, frames]"
                )
            if int(w.max()) >= card or int(w.min()) < 0:
                raise ValueError(f"recall task: word {i}'s codes are outside the model's 0..{card - 1}")
            out.append(w[:n_user].long())
        return out

    def _word(self, kind: str, i: int = 0) -> torch.Tensor:
        off = {"def": 0, "qry": 1, "key": 2, "value": 2 + self.num_keys}[kind]
        return self._symbols[off + i]

    def _spans(self) -> tuple[int, int]:
        """The longest definition (``DEF key value``) and query (``QRY key`` + a frame for the delayed
        codebooks + the answer frame) in frames."""
        lk = max(w.shape[1] for w in self._symbols[2 : 2 + self.num_keys])
        lv = max(w.shape[1] for w in self._symbols[2 + self.num_keys :])
        e = 3 if self.echo else 0  # a frame for the delayed codebooks, then "key value" in text
        return self._word("def").shape[1] + lk + lv + e, self._word("qry").shape[1] + lk + 2 + self.echo

    def _check_spoken_fits(self, d: int, q: int) -> None:
        num_frames, context, pairs = self.num_frames, self.context, self.pairs
        n_far = self.far_pairs
        if pairs > n_far and d + q - 1 > context - 1:
            raise ValueError(
                f"recall task: a spoken definition ({d} frames) and its query ({q}) do not fit in one "
                f"{context}-step attention window for the near queries; use shorter patterns or words, a "
                "longer window, or pairs: 1"
            )
        # Far definitions (with their gaps), then the near pairs (each inside one window), then the far
        # queries, the first of which must wait far_min after the far definitions: the worst case.
        defs = n_far * (d + 2)
        need = max(defs + (pairs - n_far) * (context + 2), defs + self.far_min) + n_far * (q + 1)
        if num_frames < need:
            raise ValueError(
                f"recall task: {num_frames} frames cannot hold {pairs} spoken definitions and their far "
                f"queries beyond the receptive field (about {need} needed); use longer sequences "
                "(data.duration_sec) or fewer pairs"
            )

    def _spoken_layout(
        self, g: torch.Generator
    ) -> tuple[torch.Tensor, list[Query], list[tuple[int, torch.Tensor]]]:
        """Text stream ``[T]`` (PAD and the answers), queries, and the user-stream patterns to
        overlay as ``(start frame, codes [n_user, frames])``."""
        T, P = self.num_frames, self.pairs
        text = torch.full((T,), self.pad, dtype=torch.long)
        keys = torch.randperm(self.num_keys, generator=g)[:P].tolist()
        values = torch.randint(0, self.num_values, (P,), generator=g).tolist()
        n_far = self.far_pairs
        queries: list[Query] = []
        spoken: list[tuple[int, torch.Tensor]] = []

        def rand(lo: int, hi: int) -> int:
            return int(torch.randint(lo, hi + 1, (1,), generator=g))

        def define(p: int, i: int) -> int:
            """Say ``DEF key value`` from frame ``p`` (with ``echo``, Moshi then says ``key value`` in
            its text); returns the fact's last frame."""
            for w in (self._word("def"), self._word("key", keys[i]), self._word("value", values[i])):
                spoken.append((p, w))
                p += w.shape[1]
            if not self.echo:
                return p - 1
            text[p + 1 : p + 3] = torch.tensor([FIRST_KEY + keys[i], self.first_value + values[i]])
            return p + 2

        def query_len(i: int) -> int:
            return self._word("qry").shape[1] + self._word("key", keys[i]).shape[1] + 2 + self.echo

        def ask(q: int, i: int, anchor: int, far: bool) -> int:
            """Say ``QRY key`` from frame ``q``; Moshi answers in text (with ``echo``: ``key value``);
            returns the answer's frame."""
            for w in (self._word("qry"), self._word("key", keys[i])):
                spoken.append((q, w))
                q += w.shape[1]
            answer = q + 1 + self.echo  # the key's delayed codebooks arrive one frame later
            if self.echo:
                text[answer - 1] = FIRST_KEY + keys[i]
            text[answer] = self.first_value + values[i]
            queries.append(Query(answer, answer - anchor, self.first_value + values[i], far))
            return answer

        anchor = {}
        p = rand(0, 2)
        for i in range(n_far):  # 1. far definitions at the start
            anchor[i] = define(p, i)
            p = anchor[i] + 1 + rand(0, 2)
        for i in range(n_far, P):  # 2. near pairs, definition and query inside one window
            start = p
            anchor[i] = define(p, i)
            room = self.context - 1 - (anchor[i] + 1 - start) - query_len(i)
            q = anchor[i] + 1 + rand(0, max(0, room))
            p = ask(q, i, anchor[i], False) + 1 + rand(0, 2)
        for i in range(n_far):  # 3. far queries, each answer >= far_min after its definition
            lo = max(p, anchor[i] + self.far_min - (query_len(i) - 1))
            slots = (T - query_len(i) - lo) // max(1, n_far - i)
            if slots < 0:
                break
            p = ask(lo + rand(0, slots), i, anchor[i], True) + 1
        return text, queries, spoken

    def layout(self, index: int) -> tuple[torch.Tensor, list[Query]]:
        """Text stream ``[T]`` and its queries."""
        if not 0 <= index < self.num_items:
            raise IndexError(index)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        if self.facts != "text":
            text, queries, _ = self._spoken_layout(g)
            return self._fill(text, g), queries
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
        return self._fill(text, g), queries

    def _fill(self, text: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Filler words on ``filler_rate`` of the PAD frames."""
        if self.filler_rate > 0:
            free = (text == self.pad).nonzero().flatten()
            take = torch.rand(len(free), generator=g) < self.filler_rate
            words = torch.randint(0, self.num_fillers, (int(take.sum()),), generator=g) + self.first_filler
            text[free[take]] = words
        return text

    def queries(self, index: int) -> list[Query]:
        return self.layout(index)[1]

    def spoken_layout(self, index: int) -> tuple[list[Query], list[tuple[int, torch.Tensor]]]:
        """Item ``index``'s queries and what the other speaker says, as ``(start frame, codes [n_user,
        frames])`` in speaking order (facts ``audio`` or ``speech``)."""
        if self.facts == "text":
            raise ValueError("spoken_layout: facts are in the text stream (data.recall.facts: text)")
        if not 0 <= index < self.num_items:
            raise IndexError(index)
        _, queries, spoken = self._spoken_layout(torch.Generator().manual_seed(self.seed * 1_000_003 + index))
        return queries, spoken

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
        audio = self.audio_codes(index)
        if self.facts != "text":
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
            _, _, spoken = self._spoken_layout(g)
            for start, w in spoken:  # the other speaker's codebooks: rows dep_q .. n_q - 1
                audio[self.dep_q :, start : start + w.shape[1]] = w
        return torch.cat([text[None], audio], 0)


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


def recall_datasets(cfg, model):
    """Train and eval recall sets of a training config (``data.recall``) for moshi ``model``: far
    queries lie beyond the model's receptive field (and, for facts in audio, beyond it by the
    codebooks' delays too). With ``data.recall.conversations`` the training set mixes in windows of
    the ``data.train`` conversations (:class:`MixedTask`); the eval set stays the recall task."""
    receptive = receptive_field(model)
    if receptive is None:
        raise ConfigError(
            "data.source recall: the task needs a model with a limited attention window (model.tiny.context)"
        )
    r = cfg.data.recall
    far_floor = receptive + 2 + (max(model.delays) if r.facts != "text" else 0)
    if r.far_min is not None and r.far_min < far_floor:
        raise ConfigError(
            f"data.recall.far_min: {r.far_min} steps is within reach of attention (receptive field "
            f"{receptive} steps: {len(model.transformer.layers)} layers x (window - 1), plus the codebook "
            f"delays for facts in audio); use >= {far_floor} or null"
        )
    banks, conversations = (None, None), (None, None)
    if r.reads_manifests:
        from .build import conversation_datasets

        conversations = conversation_datasets(cfg, model)
    if r.audio == "bank":
        train_audio, eval_audio = conversations
        T = cfg.data.num_frames
        train_bank = _audio_bank(train_audio, T)
        banks = (train_bank, _audio_bank(eval_audio, T) if eval_audio is not None else train_bank)
    word_codes = load_word_codes(r.word_codes) if r.facts == "speech" else None
    delay = max(model.delays) if r.facts != "text" else 0
    common = dict(
        num_frames=cfg.data.num_frames,
        context=attention_window(model),
        far_min=r.far_min if r.far_min is not None else receptive + 2 + delay,
        num_keys=r.num_keys,
        num_values=r.num_values,
        pairs=r.pairs,
        text_card=model.text_card,
        text_padding_id=model.text_padding_token_id,
        n_q=model.n_q,
        audio=r.audio,
        card=model.card,
        filler_rate=r.filler_rate,
        facts=r.facts,
        dep_q=model.dep_q,
        pattern_frames=r.pattern_frames,
        word_codes=word_codes,
        far_pairs=r.far_pairs,
        echo=r.echo,
        near_max=r.near_max,
    )
    try:
        train = RecallTask(r.num_train, seed=cfg.seed, audio_bank=banks[0], **common)
        evals = RecallTask(r.num_eval, seed=cfg.seed + EVAL_SEED_OFFSET, audio_bank=banks[1], **common)
    except ValueError as e:
        raise ConfigError(f"data.recall: {e}") from None
    if r.conversations > 0:
        train = MixedTask(train, conversations[0], r.conversations, cfg.seed)
    return train, evals


class MixedTask(Dataset):
    """The recall task with a share of its items replaced by conversation windows: item ``i`` is window
    ``i mod len(conversations)`` when a draw seeded by ``(seed, i)`` falls below ``share``, else recall
    item ``i``. Same length as the recall task; only for training (the eval set stays pure recall)."""

    def __init__(self, recall: RecallTask, conversations, share: float, seed: int) -> None:
        if len(conversations) == 0:
            raise ConfigError("data.recall.conversations: data.train has no conversation window")
        self.recall, self.conversations = recall, conversations
        g = torch.Generator().manual_seed(seed * 1_000_003 + 4_242_424)
        self.is_conversation = torch.rand(len(recall), generator=g) < share

    def __len__(self) -> int:
        return len(self.recall)

    def __getitem__(self, index: int) -> torch.Tensor:
        if self.is_conversation[index]:
            return self.conversations[index % len(self.conversations)]
        return self.recall[index]


def load_word_codes(path: str) -> list[torch.Tensor]:
    """The spoken symbols of ``data.recall.facts: speech`` from a ``make_word_codes.py`` file: the
    DEF and QRY words, then the keys, then the values, each ``[codebooks, frames]``."""
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            words = json.loads(meta.get("words", "null"))
            if not isinstance(words, list):
                raise ValueError("no 'words' list in its metadata")
            return [f.get_tensor(f"word_{i:03d}") for i in range(len(words))]
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same config error
        raise ConfigError(
            f"data.recall.word_codes: {path} is not a word-codes file ({e}); make it with scripts/make_word_codes.py"
        ) from None
