"""Word alignments -> Moshi's text stream at the audio frame rate (12.5 Hz).

The default rule is kyutai-labs/moshi-finetune's (its ``Interleaver`` as its ``train.py`` builds
it: main speaker only, no BOS/EOS, no delay), so both projects train on the same token grids. For
one window of ``num_frames`` frames starting at ``offset`` seconds:

1. Keep the words of the main speaker (``SPEAKER_MAIN``, or entries with no speaker) whose start
   lies in ``[offset, offset + num_frames / frame_rate)`` and whose end is after their start
   (zero- and negative-duration words are dropped), ordered by start time (ties keep file order).
   A word starting before the window belongs to the previous window, even if it is still spoken.
2. Tokenize each word on its own (stripped, no BOS/EOS; a line break inside a word becomes the
   tokenizer's newline piece).
3. Word ``w`` enters at frame ``floor((w.start - offset) * frame_rate)``, the frame its start falls
   in. Each frame then writes the next pending token, if any. With ``overlap="drop"`` (the default,
   moshi-finetune's rule) an entering word *replaces* the pending tokens: the rest of a word still
   being written when the next word starts is dropped, and of several words entering in one frame
   only the last is written (dense speech loses tokens but every word keeps its timing). With
   ``overlap="delay"`` (moshi-finetune's ``keep_and_shift``, this project's earlier rule) the new
   word's tokens queue after the pending ones: nothing is dropped, later words shift.
4. Every frame without a token holds PAD (``text_padding_id``, 3 for Moshi). A PAD frame directly
   before a written token becomes EPAD (``end_of_text_padding_id``, 0): "text starts next".
5. Frames past the end of the audio (``valid_frames``) hold the zero token ``-1``, which moshi
   embeds as zeros and excludes from the loss, and the window is treated as ending with the audio.

Where this differs from moshi-finetune, on purpose: in the last, shorter window of a file,
moshi-finetune builds the text stream past the end of the audio (its stream length comes from a
frame count passed where seconds are expected, then cut back) and so trains the model to predict
PAD, or the tail of a word, over frames whose audio is the zero token; here those frames are ``-1``
like the audio. Full windows are identical. moshi-finetune also finds a window's words by binary
search, which assumes the file lists them by start time; here they are selected by start time
whatever the file order.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from .audio import FRAME_RATE

MAIN_SPEAKER = "SPEAKER_MAIN"
TextOverlap = Literal["drop", "delay"]


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
    (``"1.0"`` as a string, ``NaN`` or ``null`` are refused, not guessed at) and ``start >= 0``. A word
    whose end is not after its start is kept here and dropped by the interleaver, as moshi-finetune
    drops it (the rest of the file stays usable); ``scripts/check_dataset.py`` reports such words.
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
        if s < 0:
            raise ValueError(f"{source}: alignment #{i} {item!r} starts before the audio (negative time)")
        words.append(Word(text, s, e, str(rest[0]) if rest else MAIN_SPEAKER))
    return words


class Interleaver:
    """Builds a window's text stream from word alignments (the rule is in the module docstring)."""

    def __init__(
        self,
        tokenizer: TextTokenizer,
        frame_rate: float = FRAME_RATE,
        text_padding_id: int = 3,
        end_of_text_padding_id: int = 0,
        zero_token_id: int = -1,
        main_speaker: str = MAIN_SPEAKER,
        overlap: TextOverlap = "drop",
    ) -> None:
        if overlap not in ("drop", "delay"):
            raise ValueError(f"overlap: {overlap!r} is not allowed; choose 'drop' or 'delay'")
        self.tokenizer = tokenizer
        self.frame_rate = frame_rate
        self.pad, self.epad, self.zero = text_padding_id, end_of_text_padding_id, zero_token_id
        self.main_speaker = main_speaker
        self.overlap = overlap

    def tokens(self, word: str) -> list[int]:
        """The word's token ids: stripped, each line encoded alone, lines joined by the newline piece."""
        lines = word.strip().split("\n")
        out = list(self.tokenizer.encode(lines[0]))
        if len(lines) > 1:
            newline = list(self.tokenizer.encode("\n"))[-1:]  # sentencepiece may prefix a space piece
            for line in lines[1:]:
                out += newline + list(self.tokenizer.encode(line))
        return out

    def select(self, words: Sequence[Word], offset: float, end: float) -> list[Word]:
        """The words that enter the window ``[offset, end)`` seconds, in order (rule step 1)."""
        chosen = [
            w for w in words if w.speaker == self.main_speaker and offset <= w.start < end and w.start < w.end
        ]
        return sorted(chosen, key=lambda w: w.start)  # stable: equal starts keep file order

    def build(
        self,
        words: Sequence[Word],
        num_frames: int,
        offset: float = 0.0,
        valid_frames: int | None = None,
    ) -> torch.Tensor:
        """The text stream ``[num_frames]`` (int64) of the window starting at ``offset`` seconds."""
        n = num_frames if valid_frames is None else max(0, min(valid_frames, num_frames))
        chosen = self.select(words, offset, offset + n / self.frame_rate)
        stream = [self.pad] * n
        pending: deque[int] = deque()
        i = 0
        for t in range(n):
            # Word i enters in the first frame t with x < t + 1, x its start in frames from the window
            # start, i.e. t = floor(x). x is computed as moshi-finetune computes it (seconds relative to
            # the window, times the frame rate, no rounding slack), so a start a hair below a frame
            # boundary in floating point stays in the earlier frame, as it does there.
            while i < len(chosen) and (chosen[i].start - offset) * self.frame_rate < t + 1:
                toks = self.tokens(chosen[i].text)
                if self.overlap == "drop":
                    pending = deque(toks)  # an empty word also cuts the previous one, as in moshi-finetune
                else:
                    pending.extend(toks)
                i += 1
            if pending:
                if t > 0 and stream[t - 1] == self.pad:
                    stream[t - 1] = self.epad
                stream[t] = pending.popleft()
        out = torch.full((num_frames,), self.zero, dtype=torch.long)
        out[:n] = torch.tensor(stream, dtype=torch.long)
        return out
