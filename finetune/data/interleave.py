"""Word alignments -> Moshi's text stream at the audio frame rate (12.5 Hz).

The rule, for one window of ``num_frames`` frames starting at ``offset`` seconds:

1. Keep the words of the main speaker (``SPEAKER_MAIN``, or entries with no speaker) whose start
   time lies in ``[offset, offset + num_frames / frame_rate)``, ordered by start time. A word
   starting before the window belongs to the previous window, even if it is still being spoken.
2. Tokenize each word on its own with the text tokenizer (no BOS/EOS). A word that maps to no token
   is skipped.
3. A word's first token goes to frame ``floor((start - offset) * frame_rate)``, the frame in which it
   starts, or, if earlier words' tokens still occupy that frame, to the first free frame after them:
   tokens are delayed, never dropped, except those pushed past the end of the window.
4. Every frame without a token holds PAD (``text_padding_id``, 3 for Moshi). A PAD frame directly
   before a word's first token becomes EPAD (``end_of_text_padding_id``, 0): "text starts next".
5. Frames past the end of the audio (``valid_frames``) hold the zero token ``-1``, which moshi
   embeds as zeros and excludes from the loss.

So silence is all PAD, a word at a frame boundary lands in the frame its start falls in, and
overlapping or fast speech spills into the following frames.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

MAIN_SPEAKER = "SPEAKER_MAIN"


class TextTokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class Word:
    text: str
    start: float
    end: float
    speaker: str = MAIN_SPEAKER


def _seconds(x: object) -> float | None:
    """``x`` as a time in seconds if it is a finite JSON number (not a string, bool or NaN), else None."""
    if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x):
        return float(x)
    return None


def parse_alignments(data: object, source: str = "alignments") -> list[Word]:
    """Words from moshi-finetune's JSON: ``{"alignments": [[word, [start, end], speaker], ...]}``.

    ValueError naming ``source``, the alignment's index and what is wrong: times must be JSON numbers
    (``"1.0"`` as a string, ``NaN`` or ``null`` are refused, not guessed at), ``0 <= start <= end``.
    """
    if not isinstance(data, dict) or not isinstance(data.get("alignments"), list):
        raise ValueError(f"{source}: expected a JSON object with an 'alignments' list")
    words = []
    for i, item in enumerate(data["alignments"]):
        shape_ok = (
            isinstance(item, (list, tuple))
            and len(item) >= 2
            and isinstance(item[1], (list, tuple))
            and len(item[1]) == 2
        )
        if not shape_ok:
            raise ValueError(
                f"{source}: alignment #{i} is {item!r}; expected [word, [start_seconds, end_seconds], speaker]"
            )
        text, (start, end), *rest = item
        if not isinstance(text, str):
            raise ValueError(f"{source}: alignment #{i} {item!r}: the word must be a string, got {text!r}")
        s, e = _seconds(start), _seconds(end)
        if s is None or e is None:
            raise ValueError(
                f"{source}: alignment #{i} {item!r}: start and end must be numbers of seconds, got "
                f"{start!r} and {end!r}"
            )
        if e < s or s < 0:
            raise ValueError(f"{source}: alignment #{i} {item!r} has an invalid time span")
        words.append(Word(text, s, e, str(rest[0]) if rest else MAIN_SPEAKER))
    return words


class Interleaver:
    def __init__(
        self,
        tokenizer: TextTokenizer,
        frame_rate: float = 12.5,
        text_padding_id: int = 3,
        end_of_text_padding_id: int = 0,
        zero_token_id: int = -1,
        main_speaker: str = MAIN_SPEAKER,
    ) -> None:
        self.tokenizer = tokenizer
        self.frame_rate = frame_rate
        self.pad, self.epad, self.zero = text_padding_id, end_of_text_padding_id, zero_token_id
        self.main_speaker = main_speaker

    def tokens(self, word: str) -> list[int]:
        return list(self.tokenizer.encode(word))

    def build(
        self,
        words: Sequence[Word],
        num_frames: int,
        offset: float = 0.0,
        valid_frames: int | None = None,
    ) -> torch.Tensor:
        """The text stream ``[num_frames]`` (int64) of the window starting at ``offset`` seconds."""
        end = offset + num_frames / self.frame_rate
        chosen = sorted(
            (w for w in words if w.speaker == self.main_speaker and offset <= w.start < end),
            key=lambda w: w.start,
        )
        stream = [self.pad] * num_frames
        starts = []
        free = 0  # first frame not taken by earlier tokens
        for w in chosen:
            toks = self.tokens(w.text)
            if not toks:
                continue
            f = max(math.floor((w.start - offset) * self.frame_rate + 1e-9), free)
            if f >= num_frames:
                break
            starts.append(f)
            for k, tok in enumerate(toks):
                if f + k >= num_frames:
                    break
                stream[f + k] = tok
            free = f + len(toks)
        for f in starts:
            if f > 0 and stream[f - 1] == self.pad:
                stream[f - 1] = self.epad
        out = torch.tensor(stream, dtype=torch.long)
        if valid_frames is not None and valid_frames < num_frames:
            out[valid_frames:] = self.zero
        return out
