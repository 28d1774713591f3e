"""The text stream against moshi-finetune's interleaving rule, case by case.

The reference is the rule of kyutai-labs/moshi-finetune's ``Interleaver`` as its ``train.py`` builds
it (``keep_main_only=True``, everything else default), applied BY HAND below; moshi-finetune itself
is not imported. The rule, as read from its ``finetune/data/interleaver.py``:

  R1. keep SPEAKER_MAIN words whose start s satisfies window_start <= s < window_end, and whose end
      is after their start; sort them by start (a stable sort);
  R2. tokenize each word alone (stripped; no BOS);
  R3. for each frame t = 0 .. T-1: every not yet pushed word with x = (s - window_start) * 12.5 < t + 1
      is pushed, in order, and each push REPLACES the pending token queue (so only the last word
      pushed in a frame survives, and a word still being written loses its remaining tokens);
      then if the queue is not empty: if t > 0 and frame t-1 holds PAD, frame t-1 becomes EPAD;
      frame t takes the next queued token. Frames never written hold PAD.

x < t + 1 means a word enters in frame floor(x): frame k covers [0.08 k, 0.08 (k + 1)) seconds.
PAD = 3, EPAD = 0, the zero token (no audio) = -1. FakeTokenizer's ids are listed on the class.
"""

import pytest

from finetune.data.interleave import Interleaver, Word

PAD, EPAD, Z = 3, 0, -1
OTHER = "SPEAKER_OTHER"


class FakeTokenizer:
    """hi -> [10], there -> [11, 12], long -> [20 .. 24], mute -> [] (no token);
    any other string: one id per character, 30 + (code point mod 10) ("\\n" -> 30)."""

    table = {"hi": [10], "there": [11, 12], "long": [20, 21, 22, 23, 24], "mute": []}

    def encode(self, text):
        return list(self.table.get(text, [30 + (ord(c) % 10) for c in text]))


def W(text, start, end, speaker="SPEAKER_MAIN"):
    return Word(text, start, end, speaker)


# (name, words, T, build kwargs, expected stream: moshi-finetune's rule)
CASES = [
    # ---- silence
    ("silence: no words", [], 4, {}, [PAD, PAD, PAD, PAD]),
    # Only the other speaker talks: R1 keeps no word; the stream is all PAD.
    ("silence: only the user speaks", [W("hi", 0.1, 0.3, OTHER)], 3, {}, [PAD, PAD, PAD]),
    # hi at 0.0 (x = 0) and hi at 0.4 (x = 5): tokens in frames 0 and 5; frame 4 is PAD before a
    # token -> EPAD. No EPAD before frame 0 (t > 0 fails).
    (
        "silence between words: EPAD only just before the next word",
        [W("hi", 0.0, 0.1), W("hi", 0.4, 0.5)],
        7,
        {},
        [10, PAD, PAD, PAD, EPAD, 10, PAD],
    ),
    # ---- frame boundaries
    # x = 0.08 * 12.5 = 1.0; frame 0: 1.0 < 1 is false; frame 1: 1.0 < 2 -> enters in frame 1.
    ("start exactly on a frame boundary", [W("hi", 0.08, 0.2)], 4, {}, [EPAD, 10, PAD, PAD]),
    # x = 0.0799 * 12.5 = 0.99875 < 1 -> frame 0, and frame 0 gets no EPAD.
    ("start just before a boundary", [W("hi", 0.0799, 0.2)], 4, {}, [10, PAD, PAD, PAD]),
    # x = 0.24 * 12.5 = 3.0 (exact in floating point) -> frame 3; frame 2 becomes EPAD.
    ("boundary in the middle", [W("hi", 0.24, 0.3)], 5, {}, [PAD, PAD, EPAD, 10, PAD]),
    # Window at 0.46 s, word at 0.7 s: 0.7 - 0.46 is 0.23999999999999994 in floating point, so
    # x = 2.999999999999999 < 3 and the word enters in frame 2 (not 3): moshi-finetune computes x this
    # way, with no rounding slack, and so do we. Frame 1 becomes EPAD.
    (
        "on-paper boundary that floating point puts earlier",
        [W("hi", 0.7, 0.8)],
        4,
        {"offset": 0.46},
        [PAD, EPAD, 10, PAD],
    ),
    # ---- adjacent words: no EPAD between them (frame t-1 holds a token, not PAD)
    # hi at 0.0 -> frame 0; hi at 0.08 -> x = 1.0 -> frame 1.
    ("adjacent words", [W("hi", 0.0, 0.08), W("hi", 0.08, 0.16)], 3, {}, [10, 10, PAD]),
    # there (2 tokens) at 0.0 -> frames 0, 1; hi at 0.16 (x = 2) -> frame 2: the queue was already
    # empty, nothing is dropped, and frame 1 holds 12, so no EPAD.
    (
        "word right after the previous word's last token",
        [W("there", 0.0, 0.16), W("hi", 0.16, 0.2)],
        4,
        {},
        [11, 12, 10, PAD],
    ),
    # ---- overlapping words, dense speech: tokens dropped
    # long (5 tokens) at 0.0 -> 20 in frame 0, 21 in frame 1; hi at 0.17 (x = 2.125) is pushed in
    # frame 2 and replaces the queue [22, 23, 24]: those are dropped, 10 goes to frame 2.
    (
        "a word starting while the previous is written cuts it",
        [W("long", 0.0, 0.5), W("hi", 0.17, 0.3)],
        6,
        {},
        [20, 21, 10, PAD, PAD, PAD],
    ),
    # there at 0.0 (x = 0) and hi at 0.05 (x = 0.625): both pushed in frame 0, hi last, so the queue
    # is [10]: "there" is not written at all.
    (
        "two words entering in one frame: only the last is written",
        [W("there", 0.0, 0.1), W("hi", 0.05, 0.3)],
        4,
        {},
        [10, PAD, PAD, PAD],
    ),
    # Fast speech, three words 40 ms apart: long at 0.0 (x = 0, frame 0), there at 0.04 (x = 0.5,
    # frame 0), hi at 0.12 (x = 1.5, frame 1). Frame 0: long then there pushed -> queue [11, 12],
    # writes 11. Frame 1: hi pushed -> queue [10] (12 dropped), writes 10.
    (
        "fast speech",
        [W("long", 0.0, 0.04), W("there", 0.04, 0.12), W("hi", 0.12, 0.2)],
        4,
        {},
        [11, 10, PAD, PAD],
    ),
    # Equal start times: the stable sort keeps file order (hi, there); both enter in frame 1
    # (x = 1.25), there is pushed last and written. Frame 0 becomes EPAD.
    (
        "equal starts: the later one in the file wins",
        [W("hi", 0.1, 0.3), W("there", 0.1, 0.3)],
        4,
        {},
        [EPAD, 11, 12, PAD],
    ),
    # The file lists there (0.3) before hi (0.0): R1 sorts by start. hi -> frame 0; there ->
    # x = 3.75 -> frame 3; frame 2 is PAD before it -> EPAD.
    (
        "words out of order in the file are sorted by start",
        [W("there", 0.3, 0.4), W("hi", 0.0, 0.1)],
        5,
        {},
        [10, PAD, EPAD, 11, 12],
    ),
    # A word that tokenizes to nothing still replaces the queue when it is pushed: long at 0.0 writes
    # 20 in frame 0; mute at 0.1 (x = 1.25) is pushed in frame 1 and empties the queue.
    (
        "a word with no tokens still cuts the previous one",
        [W("long", 0.0, 0.5), W("mute", 0.1, 0.2)],
        6,
        {},
        [20, PAD, PAD, PAD, PAD, PAD],
    ),
    # ---- zero and negative durations (R1 drops them, so they cut nothing)
    (
        "zero-duration word is dropped",
        [W("long", 0.0, 0.5), W("hi", 0.1, 0.1)],
        6,
        {},
        [20, 21, 22, 23, 24, PAD],
    ),
    (
        "negative-duration word is dropped",
        [W("long", 0.0, 0.5), W("hi", 0.2, 0.1)],
        6,
        {},
        [20, 21, 22, 23, 24, PAD],
    ),
    ("a lone zero-duration word leaves silence", [W("hi", 0.08, 0.08)], 3, {}, [PAD, PAD, PAD]),
    # ---- other speakers
    # The user's hi at 0.1 is removed by R1 before R3, so it cuts nothing; there at 0.5 (x = 6.25)
    # -> frame 6; frame 5 is PAD before it -> EPAD.
    (
        "the user's words are not in the stream and cut nothing",
        [W("long", 0.0, 0.5), W("hi", 0.1, 0.2, OTHER), W("there", 0.5, 0.7)],
        8,
        {},
        [20, 21, 22, 23, 24, EPAD, 11, 12],
    ),
    # ---- windows
    # Window of 4 frames from 0.32 s. long starts at 0.2, before the window: R1 drops it (it belongs
    # to the previous window, and its unwritten tokens do not carry over). hi at 0.5: x = (0.5 - 0.32)
    # * 12.5 = 2.25 -> frame 2; frame 1 -> EPAD.
    (
        "window starting mid-word",
        [W("long", 0.2, 0.6), W("hi", 0.5, 0.6)],
        4,
        {"offset": 0.32},
        [PAD, EPAD, 10, PAD],
    ),
    # there at exactly the window start: x = 0 -> frame 0.
    ("word at the window start", [W("there", 0.32, 0.5)], 4, {"offset": 0.32}, [11, 12, PAD, PAD]),
    # hi at 0.64 = 0.32 + 4 / 12.5, the window's end: R1 excludes it (start < end fails), so frame 3
    # stays PAD (the EPAD before it falls in no window).
    (
        "word at the window end belongs to the next window",
        [W("hi", 0.64, 0.7)],
        4,
        {"offset": 0.32},
        [PAD, PAD, PAD, PAD],
    ),
    # long at 0.1 (x = 1.25) -> frames 1, 2, 3 get 20, 21, 22; 23 and 24 fall past the window.
    ("tokens past the window end are cut", [W("long", 0.1, 0.4)], 4, {}, [EPAD, 20, 21, 22]),
    # ---- tokenization details
    # R2 strips the word; a line break inside it becomes the newline piece ("\n" -> 30 here).
    ("words are stripped", [W(" hi ", 0.0, 0.1)], 2, {}, [10, PAD]),
    (
        "a line break inside a word is the newline piece",
        [W("hi\nthere", 0.0, 0.3)],
        5,
        {},
        [10, 30, 11, 12, PAD],
    ),
]


# The last, shorter window of a file: 6 frames, audio for 4 (valid_frames=4). Here the window ends
# with its audio and the frames past it are -1, like the audio; moshi-finetune instead builds the
# stream past the audio (written out for each case), which we do not reproduce on purpose.
SHORT_WINDOW_CASES = [
    # there at 0.16 (x = 2) -> frames 2, 3; frame 1 -> EPAD. moshi-finetune: the same, PAD, PAD.
    ("word inside the audio", [W("there", 0.16, 0.3)], [PAD, EPAD, 11, 12, Z, Z]),
    # long at 0.16 -> 20, 21 in frames 2, 3, then cut at the audio end. moshi-finetune: ..., 22, 23.
    ("word cut at the audio end", [W("long", 0.16, 0.5)], [PAD, EPAD, 20, 21, Z, Z]),
    # hi at 0.32 (x = 4) starts after the audio: not selected. moshi-finetune: PAD, PAD, PAD, EPAD, 10, PAD.
    ("word after the audio end", [W("hi", 0.32, 0.4)], [PAD, PAD, PAD, PAD, Z, Z]),
]


def build(words, T, overlap="drop", **kw):
    return Interleaver(FakeTokenizer(), overlap=overlap).build(words, T, **kw).tolist()


@pytest.mark.parametrize("name, words, T, kw, expected", CASES, ids=[c[0] for c in CASES])
def test_text_stream_follows_moshi_finetune(name, words, T, kw, expected):
    assert build(words, T, **kw) == expected


@pytest.mark.parametrize("name, words, expected", SHORT_WINDOW_CASES, ids=[c[0] for c in SHORT_WINDOW_CASES])
def test_last_short_window_ends_with_its_audio(name, words, expected):
    assert build(words, 6, valid_frames=4) == expected


# overlap="delay" (moshi-finetune's keep_and_shift=True): R3 with each push APPENDING to the queue.
DELAY_CASES = [
    # long at 0.0 -> 20..24 in frames 0..4; hi (x = 2.125, pushed in frame 2) queues after 22, 23, 24
    # -> frame 5. Nothing dropped; hi is 3 frames late.
    (
        "dense speech is delayed, not dropped",
        [W("long", 0.0, 0.5), W("hi", 0.17, 0.3)],
        7,
        [20, 21, 22, 23, 24, 10, PAD],
    ),
    # there and hi both pushed in frame 0: queue [11, 12, 10].
    ("two words in one frame both written", [W("there", 0.0, 0.1), W("hi", 0.05, 0.3)], 4, [11, 12, 10, PAD]),
    # mute adds nothing to the queue and cuts nothing.
    (
        "a word with no tokens is a no-op",
        [W("long", 0.0, 0.5), W("mute", 0.1, 0.2)],
        6,
        [20, 21, 22, 23, 24, PAD],
    ),
    # Zero-duration words are dropped in this mode too (R1 applies to both).
    ("zero-duration word dropped", [W("hi", 0.0, 0.0), W("there", 0.08, 0.2)], 4, [EPAD, 11, 12, PAD]),
    # Queued tokens past the window end are cut: long (frames 1..3) then there would follow at 4, 5.
    ("queue cut at the window end", [W("long", 0.1, 0.4), W("there", 0.2, 0.3)], 4, [EPAD, 20, 21, 22]),
]


@pytest.mark.parametrize("name, words, T, expected", DELAY_CASES, ids=[c[0] for c in DELAY_CASES])
def test_delay_option(name, words, T, expected):
    assert build(words, T, overlap="delay") == expected


def test_the_two_rules_agree_on_sparse_speech_and_differ_on_dense():
    sparse = [W("there", 0.0, 0.2), W("hi", 0.4, 0.5), W("long", 0.8, 1.4)]
    assert build(sparse, 20) == build(sparse, 20, overlap="delay")
    dense = [W("long", 0.0, 0.2), W("there", 0.1, 0.3)]
    assert build(dense, 8) != build(dense, 8, overlap="delay")


def test_bad_overlap_value_is_refused():
    with pytest.raises(ValueError, match="overlap: 'shift' is not allowed"):
        Interleaver(FakeTokenizer(), overlap="shift")
