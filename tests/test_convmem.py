"""The conversational-memory benchmark: facts stated in the other speaker's audio
(``data.recall.facts: audio | speech``), conversations mixed into the training set, and the
``user_audio_emb`` target source reading what the other speaker says."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from finetune.args import load_config
from finetune.data.recall import MixedTask, RecallTask, load_word_codes, recall_datasets
from finetune.schema import ConfigError
from moshi_ttt.tiny import build_tiny_lm

KW = dict(num_frames=160, context=16, far_min=63, n_q=4, dep_q=2, card=64, text_card=100)


def _spoken(ds: RecallTask, i: int):
    g = torch.Generator().manual_seed(ds.seed * 1_000_003 + i)
    return ds._spoken_layout(g)


@pytest.mark.parametrize("audio", ["silent", "markov"])
def test_audio_facts_are_said_on_the_users_codebooks_and_answered_in_text(audio):
    ds = RecallTask(16, seed=5, audio=audio, facts="audio", pattern_frames=2, **KW)
    plain = RecallTask(16, seed=5, audio=audio, **KW)  # the same live audio without the facts
    L = 2
    for i in range(16):
        x = ds[i]
        text, queries = ds.layout(i)
        assert torch.equal(x[0], text) and torch.equal(x, ds[i])  # a function of (seed, index)
        # Moshi's own codebooks are the live audio, untouched; the user's differ only where words are.
        assert torch.equal(x[1:3], plain[i][1:3])
        _, _, spoken = _spoken(ds, i)
        said = torch.zeros(160, dtype=torch.bool)
        for start, w in spoken:
            assert w.shape == (2, L)
            assert torch.equal(x[3:, start : start + L], w)
            said[start : start + L] = True
        assert torch.equal(x[3:, ~said], plain[i][3:, ~said])
        # Text: PAD except the answers, each one frame after its query's key (delayed codebooks).
        answers = {q.value_pos: q.value for q in queries}
        assert (text != ds.pad).sum() == len(answers)
        for pos, value in answers.items():
            assert text[pos] == value
            assert not said[pos - 1] and said[pos - 2]  # the key's last frame, then one free frame
        near = [q for q in queries if not q.far]
        far = [q for q in queries if q.far]
        assert len(near) == 2 and len(far) == 2
        assert all(q.distance >= ds.far_min for q in far)
        # A near query's whole definition is inside one attention window of its answer.
        assert all(q.distance + 3 * L - 1 <= ds.context - 1 for q in near)


def test_each_symbol_is_one_fixed_pattern_in_every_sequence_and_split():
    kw = {**KW, "context": 24}  # a 3-frame definition and query need more than a 16-step window
    a = RecallTask(4, seed=0, facts="audio", pattern_frames=3, **kw)
    b = RecallTask(4, seed=9, facts="audio", pattern_frames=3, **kw)
    assert all(torch.equal(x, y) for x, y in zip(a._symbols, b._symbols))
    assert len(a._symbols) == 2 + 16 + 16 and a._symbols[0].shape == (2, 3)
    patterns = {tuple(w.flatten().tolist()) for w in a._symbols}
    assert len(patterns) == len(a._symbols)  # no two symbols sound the same


def test_spoken_words_of_different_lengths_are_spliced_whole():
    g = torch.Generator().manual_seed(0)
    lengths = [2, 2] + [1 + i % 3 for i in range(16)] + [1 + (i * 2) % 3 for i in range(16)]
    words = [torch.randint(0, 64, (2, n), generator=g) for n in lengths]
    ds = RecallTask(8, seed=1, facts="speech", word_codes=words, **KW)
    for i in range(8):
        x = ds[i]
        _, queries, spoken = _spoken(ds, i)
        for start, w in spoken:
            assert torch.equal(x[3:, start : start + w.shape[1]], w)
        starts = [s for s, _ in spoken]
        ends = [s + w.shape[1] for s, w in spoken]
        assert all(e <= s for e, s in zip(ends[:-1], starts[1:]))  # no two words overlap
        assert all(q.far or q.distance < ds.context for q in queries)


def test_spoken_facts_refuse_what_cannot_work():
    with pytest.raises(ValueError, match="other speaker's codebooks"):
        RecallTask(2, facts="audio", **{**KW, "dep_q": 4})
    with pytest.raises(ValueError, match="word_codes for 34 words"):
        RecallTask(2, facts="speech", word_codes=[torch.zeros(2, 2, dtype=torch.long)] * 5, **KW)
    long_words = [torch.zeros(2, 6, dtype=torch.long)] * 34
    with pytest.raises(ValueError, match="do not fit in one 16-step attention window"):
        RecallTask(2, facts="speech", word_codes=long_words, **KW)
    with pytest.raises(ValueError, match="outside the model's"):
        RecallTask(2, facts="speech", word_codes=[torch.full((2, 2), 64)] * 34, **KW)
    with pytest.raises(ValueError, match="cannot hold"):
        RecallTask(2, facts="audio", **{**KW, "num_frames": 90})
    with pytest.raises(ValueError, match="facts must be one of"):
        RecallTask(2, facts="video", **KW)


def test_word_codes_file_round_trip_and_bad_files(tmp_path):
    words = ["note", "what", "apple"]
    tensors = {f"word_{i:03d}": torch.randint(0, 64, (2, 2 + i)) for i in range(3)}
    save_file(tensors, str(tmp_path / "w.safetensors"), metadata={"words": json.dumps(words)})
    got = load_word_codes(str(tmp_path / "w.safetensors"))
    assert [tuple(t.shape) for t in got] == [(2, 2), (2, 3), (2, 4)]
    assert all(torch.equal(got[i], tensors[f"word_{i:03d}"]) for i in range(3))
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    for bad in (tmp_path / "bad.safetensors", tmp_path / "missing.safetensors"):
        with pytest.raises(ConfigError, match="make_word_codes.py"):
            load_word_codes(str(bad))


def test_config_checks_of_the_benchmark():
    with pytest.raises(ConfigError, match="word_codes"):
        load_config(None, {"data.source": "recall", "data.recall.facts": "speech"})
    with pytest.raises(ConfigError, match="conversations mixes in"):
        load_config(None, {"data.source": "recall", "data.recall.conversations": 0.3})
    for key, value in (("conversations", 1.0), ("pattern_frames", 0), ("filler_rate", 1.5)):
        with pytest.raises(ConfigError, match=f"data.recall.{key}"):
            load_config(None, {f"data.recall.{key}": value})


def test_far_answers_lie_beyond_the_receptive_field_and_the_delays():
    tiny = {"dim": 32, "num_layers": 4, "context": 16, "n_q": 4, "dep_q": 2}
    cfg = load_config(
        None,
        {
            "model.tiny": tiny,
            "data.source": "recall",
            "data.duration_sec": 12.8,
            "data.recall": {"num_train": 4, "num_eval": 2, "facts": "audio", "audio": "markov"},
        },
    )
    model = build_tiny_lm(**tiny)
    train, _ = recall_datasets(cfg, model)
    # 4 layers x 15 steps of attention, + 2 as for text facts, + 1 for the delayed codebooks.
    assert train.far_min == 4 * 15 + 2 + 1
    # data.recall.far_min may move them further, never within reach of attention and the delays.
    cfg.data.recall.far_min = 70
    train, _ = recall_datasets(cfg, model)
    assert train.far_min == 70 and all(q.distance >= 70 for i in range(4) for q in train.queries(i) if q.far)
    cfg.data.recall.far_min = 4 * 15 + 2  # enough for facts in text, one short for the delayed codebooks
    with pytest.raises(ConfigError, match="use >= 63 or null"):
        recall_datasets(cfg, model)


def test_conversations_replace_a_seeded_share_of_the_training_items():
    recall = RecallTask(400, seed=0, **KW)
    convs = [torch.full((5, 160), 100 + j) for j in range(7)]
    mixed = MixedTask(recall, convs, 0.3, seed=0)
    assert len(mixed) == 400
    picked = [i for i in range(400) if mixed[i][0, 0] >= 100]
    assert 0.22 < len(picked) / 400 < 0.38
    for i in range(400):
        want = convs[i % 7] if i in picked else recall[i]
        assert torch.equal(mixed[i], want)
    again = MixedTask(recall, convs, 0.3, seed=0)
    assert torch.equal(again.is_conversation, mixed.is_conversation)
    assert not torch.equal(MixedTask(recall, convs, 0.3, seed=1).is_conversation, mixed.is_conversation)


@pytest.mark.parametrize("facts", ["text", "audio"])
def test_far_pairs_sets_how_many_facts_are_asked_beyond_the_window(facts):
    default = RecallTask(4, seed=3, facts=facts, **KW)
    same = RecallTask(4, seed=3, facts=facts, far_pairs=2, **KW)
    near_only = RecallTask(4, seed=3, facts=facts, far_pairs=0, pairs=6, **KW)
    for i in range(4):
        assert torch.equal(default[i], same[i])  # the default is half, rounded up
        qs = near_only.queries(i)
        assert len(qs) == 6 and not any(q.far for q in qs)
    with pytest.raises(ValueError, match="far_pairs"):
        RecallTask(2, facts=facts, far_pairs=5, **KW)


def test_echo_puts_each_heard_fact_in_moshis_text_before_its_answer():
    ds = RecallTask(8, seed=4, facts="audio", echo=True, audio="markov", **KW)
    plain = RecallTask(8, seed=4, facts="audio", audio="markov", **KW)
    for i in range(8):
        text, queries = ds.layout(i)
        for q in queries:
            key_tok = text[q.value_pos - 1]  # Moshi says the key it heard, then the value
            assert 6 <= key_tok < 6 + ds.num_keys and text[q.value_pos] == q.value
            anchor = q.value_pos - q.distance  # the same "key value", said after the definition
            assert text[anchor - 1] == key_tok and text[anchor] == q.value
            assert q.far == (q.distance >= ds.far_min)
        assert (text != ds.pad).sum() == 4 * len(queries)  # nothing else in Moshi's text
        _, _, spoken = _spoken(ds, i)
        for start, w in spoken:  # the user says the facts exactly as without echo
            assert torch.equal(ds[i][3:, start : start + w.shape[1]], w)
        assert len(spoken) == len(_spoken(plain, i)[2])
    with pytest.raises(ValueError, match="echo"):
        RecallTask(2, facts="text", echo=True, **KW)


def test_streamed_text_logits_reproduce_the_training_forward_and_free_text_feeds_back_its_own():
    from finetune.longeval import stream_text_logits

    lm = build_tiny_lm(dim=32, num_layers=2, context=8, n_q=4, dep_q=2)
    lm.eval()
    codes = RecallTask(2, seed=0, facts="audio", audio="markov", **KW)[0][None, :, :40].repeat(2, 1, 1)
    codes[1, 0] = torch.randint(0, 100, (40,))  # another text stream in the second row
    with torch.no_grad():
        forced = stream_text_logits(lm, codes, free_text=False)
        want = lm(codes).text_logits[:, 0].float()
        torch.testing.assert_close(forced, want, rtol=1e-4, atol=1e-4)
        free = stream_text_logits(lm, codes)
        # Free text: the second row's data text does not matter any more, only its audio.
        other = codes.clone()
        other[:, 0] = 3
        torch.testing.assert_close(free, stream_text_logits(lm, other), rtol=0, atol=0)
        assert not torch.allclose(free[1], forced[1])


def test_key_binding_diagnostic_pairs_each_far_answer_with_its_own_statement():
    """scripts/key_binding.py: the far facts' statement frames it compares against are the frames
    where the other speaker said the key that the question asks for, and the cosine table tells a
    bound key (same fact high, others low) from a key that only says "a fact is here"."""
    from scripts.key_binding import OFFSETS, centred_cosines, far_facts

    ds = RecallTask(8, seed=3, audio="markov", facts="audio", pattern_frames=2, **KW)
    for i in range(8):
        queries, spoken = ds.spoken_layout(i)
        answers, statements = far_facts(ds, i)
        assert answers and len(answers) == len(statements)
        for a, s in zip(answers, statements):
            asked = [w for start, w in spoken if start == a - 1 - 2]  # the question's key: 2 frames, 1 free
            said = [w for start, w in spoken if start == s]
            assert len(asked) == 1 and len(said) == 1 and torch.equal(asked[0], said[0])
            assert s < a - ds.far_min + 3
    with pytest.raises(ValueError, match="facts are in the text stream"):
        RecallTask(2, seed=0, **KW).spoken_layout(0)

    g = torch.Generator().manual_seed(0)
    z = torch.randn(160, 256, generator=g)
    answers, statements = [120, 130, 140], [10, 20, 30]
    bound = z.clone()
    for a, s in zip(answers, statements):
        bound[a] = z[s + 1]  # the answer's key equals its own key's second frame
    cos = centred_cosines(bound, answers, statements)
    assert min(cos[1, True]) > 0.9 and max(abs(c) for c in cos[1, False]) < 0.3
    shared = z.clone()
    for a in answers:
        shared[a] = sum(z[s + 1] for s in statements)  # "a fact is here": every fact alike
    cos = centred_cosines(shared, answers, statements)
    same, other = sum(cos[1, True]) / 3, sum(cos[1, False]) / 6
    assert same > 0.4 and abs(same - other) < 0.1
    assert set(cos) == {(o, s) for o in range(OFFSETS) for s in (True, False)}
