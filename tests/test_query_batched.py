"""All questions of a video answered together (STTM_SPEC section 7): the same answers as
one question per fresh prefill, token for token, greedy and seeded sampling alike; tiny
random models of every family, float32, CPU. (Models with a recurrent state, Qwen3.5,
answer as rows of a batch, each from a copy of the prefix's state.)"""
from __future__ import annotations

import pytest
import torch

from pipeline.query import Decoding, QueryEngine, Question, answer_questions
from query_setup import FAMILIES, PACKED_FAMILIES
from test_query import adapters, cached_lengths, engines, model_cache, recorded_forwards, store, videos  # noqa: F401 (fixtures)

# Prompts of very different lengths: a word, a sentence, a paragraph.
QUESTIONS = [
    "Why?",
    "How many people appear in the video, and what are they doing?",
    "Describe the video in detail, frame by frame: who is in it, what each of them does, where the "
    "scene takes place, what the camera does, which objects appear more than once, what colour the "
    "largest object is, and how the video ends. Then summarize the whole video in one sentence.",
    "Is the camera moving?",
]


def fresh(engine, stored, question, decoding=Decoding()):
    """The reference: ``question`` alone on a freshly prefilled prefix."""
    _, answer = engine.prefill_and_answer(stored, question, **vars(decoding))
    return answer


def assert_same_answers(batched, expected):
    for got, want in zip(batched, expected, strict=True):
        assert (got.token_ids, got.text, got.num_question_tokens) == (want.token_ids, want.text, want.num_question_tokens)
        torch.testing.assert_close(torch.tensor(got.token_logprobs), torch.tensor(want.token_logprobs), rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_questions_answered_together_get_the_answers_of_a_fresh_prefill_each(engines, store, family):
    engine = engines[family]
    stored = store.read(f"{family}/bunny")
    expected = [fresh(engine, stored, question, Decoding(max_new_tokens=6)) for question in QUESTIONS]
    assert len({len(answer.token_ids) for answer in expected}) >= 1
    lengths = [answer.num_question_tokens for answer in expected]
    assert max(lengths) > 5 * min(lengths)

    with recorded_forwards(engine.model) as forwards:
        prefix, together = engine.prefill_and_answer_all(stored, QUESTIONS, Decoding(max_new_tokens=6))
    assert_same_answers(together, expected)
    steps = max(len(answer.token_ids) for answer in expected)
    if engine.family.recurrent_state:
        # The prefix alone, each prompt alone on a copy of its state, then one forward per
        # new token with one row per question still going.
        assert [(f.tokens, f.cached, f.rows) for f in forwards[: 1 + len(QUESTIONS)]] == [(prefix.length, 0, 1)] + [
            (length, prefix.length, 1) for length in lengths
        ]
        decoding_forwards = forwards[1 + len(QUESTIONS) :]
        assert all(f.tokens == 1 and f.rows <= len(QUESTIONS) for f in decoding_forwards)
    else:
        # The prefill (prefix and first question), the other prompts in one forward, then one
        # forward per new token for the questions still going.
        assert forwards[0].tokens == prefix.length + lengths[0]
        assert forwards[1].tokens == sum(lengths[1:])
        decoding_forwards = forwards[2:]
        assert all(f.tokens <= len(QUESTIONS) for f in decoding_forwards)
    assert len(decoding_forwards) == steps - 1
    # The prefix is left as a prefill leaves it: answering it again, any order, changes nothing.
    assert cached_lengths(prefix) == [prefix.length] * len(cached_lengths(prefix))
    order = [2, 0, 3, 1]
    again = engine.answer_all(prefix, [QUESTIONS[q] for q in order], Decoding(max_new_tokens=6))
    assert_same_answers(again, [expected[q] for q in order])
    assert all(0 < prefix.prefill_s <= a.ttft_s <= a.total_s for a in together)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_question_that_ends_at_once_drops_out_and_the_others_go_on(engines, store, family, monkeypatch):
    engine = engines[family]
    stored = store.read(f"{family}/bikes")
    going_on = fresh(engine, stored, QUESTIONS[0], Decoding(max_new_tokens=6)).token_ids
    # Question 1 draws (seeded, nearly uniform) a first token that question 0 never says;
    # that token becomes an end-of-turn token, so question 1 ends at once and 0 goes on.
    decodings = [Decoding(max_new_tokens=6) for _ in QUESTIONS]
    decodings[1] = next(
        decoding
        for decoding in (Decoding(max_new_tokens=6, do_sample=True, temperature=1e3, seed=seed) for seed in range(100))
        if (first := fresh(engine, stored, QUESTIONS[1], decoding).token_ids) and first[0] not in going_on
    )
    monkeypatch.setattr(engine, "eos_token_ids", engine.eos_token_ids | {fresh(engine, stored, QUESTIONS[1], decodings[1]).token_ids[0]})
    decodings[2] = Decoding(max_new_tokens=2)  # and question 2 stops after two tokens
    expected = [fresh(engine, stored, question, decoding) for question, decoding in zip(QUESTIONS, decodings)]
    assert expected[1].token_ids == [] and expected[0].token_ids == going_on

    with recorded_forwards(engine.model) as forwards:
        _, together = engine.prefill_and_answer_all(stored, QUESTIONS, decodings)
    assert_same_answers(together, expected)
    # Each step runs one token per question still going.
    prompt_forwards = 1 + len(QUESTIONS) if engine.family.recurrent_state else 2
    for step, forward in enumerate(forwards[prompt_forwards:], start=1):
        assert forward.tokens * forward.rows == sum(len(answer.token_ids) > step for answer in expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_seeded_sampling_together_draws_what_each_question_draws_alone(engines, store, family):
    engine = engines[family]
    stored = store.read(f"{family}/bunny")
    decodings = [
        Decoding(max_new_tokens=5, do_sample=True, temperature=5.0, seed=1),
        Decoding(max_new_tokens=5),
        Decoding(max_new_tokens=5, do_sample=True, temperature=2.0, seed=7),
        Decoding(max_new_tokens=5, do_sample=True, temperature=5.0, seed=1),
    ]
    expected = [fresh(engine, stored, question, decoding) for question, decoding in zip(QUESTIONS, decodings)]
    prefix, together = engine.prefill_and_answer_all(stored, QUESTIONS, decodings)
    assert_same_answers(together, expected)
    assert_same_answers(engine.answer_all(prefix, QUESTIONS, decodings), expected)
    # The seeds matter: another seed draws another answer.
    reseeded = engine.answer_all(prefix, QUESTIONS[:1], Decoding(max_new_tokens=5, do_sample=True, temperature=5.0, seed=2))
    assert reseeded[0].token_ids != together[0].token_ids


def test_answer_questions_answers_a_videos_questions_together(engines, store):
    engine = engines["qwen2.5-vl"]
    asked = [("bunny", 0), ("bikes", 1), ("bunny", 2), ("bunny", 3), ("bikes", 2)]
    questions = [Question(index, f"qwen2.5-vl/{video}", QUESTIONS[q]) for index, (video, q) in enumerate(asked)]
    with recorded_forwards(engine.model) as forwards:
        results = list(answer_questions(engine, store, questions, max_new_tokens=4, do_sample=True, temperature=3.0, seed=5))
    assert [r.question.id for r in results] == [0, 2, 3, 1, 4]
    # Two prompt forwards per video (prefill with the first question, the others' prompts).
    assert sum(f.cached == 0 for f in forwards) == 2
    assert sum(f.tokens > len(QUESTIONS) for f in forwards) == 4
    for result in results:
        stored = store.read(result.question.video_id)
        expected = fresh(engine, stored, result.question.text, Decoding(4, True, 3.0, 5))
        assert result.answer.token_ids == expected.token_ids
        assert result.answer.ttft_s >= result.prefill_s


def test_decoding_options_are_checked_before_the_model_runs(engines, store):
    engine = engines["llava-onevision"]
    stored = store.read("llava-onevision/bunny")
    with recorded_forwards(engine.model) as forwards:
        with pytest.raises(ValueError, match="2 decoding options for 4 questions"):
            engine.prefill_and_answer_all(stored, QUESTIONS, [Decoding(), Decoding()])
        with pytest.raises(ValueError, match="no questions"):
            engine.prefill_and_answer_all(stored, [])
        with pytest.raises(ValueError, match="temperature must be > 0"):
            engine.prefill_and_answer_all(stored, QUESTIONS, Decoding(do_sample=True, temperature=0))
        with pytest.raises(ValueError, match="empty"):
            engine.prefill_and_answer_all(stored, [QUESTIONS[0], " "])
    assert forwards == []


@pytest.fixture(scope="module")
def static_engines(model_cache):  # noqa: F811
    """Engines whose decoding steps run on fixed-capacity caches (the CUDA graphs' path,
    eager here; not for a recurrent state, which those caches do not hold)."""
    return {family: QueryEngine(f"tiny-random:{family}", dtype=torch.float32, decoding_steps="static") for family in PACKED_FAMILIES}


@pytest.mark.parametrize("family", PACKED_FAMILIES)
def test_static_decoding_steps_answer_as_a_fresh_prefill_each(engines, static_engines, store, family):
    stored = store.read(f"{family}/bikes")
    decodings = [
        Decoding(max_new_tokens=7),
        Decoding(max_new_tokens=1),  # done after the prompts' forward
        Decoding(max_new_tokens=5, do_sample=True, temperature=3.0, seed=11),
        Decoding(max_new_tokens=3),
    ]
    expected = [fresh(engines[family], stored, question, decoding) for question, decoding in zip(QUESTIONS, decodings)]
    engine = static_engines[family]
    prefix, together = engine.prefill_and_answer_all(stored, QUESTIONS, decodings)
    assert_same_answers(together, expected)
    # Buffers and steps are reused: a second video and a single question answer alike.
    assert_same_answers(engine.answer_all(prefix, QUESTIONS[::-1], decodings[::-1]), expected[::-1])
    assert_same_answers([engine.answer(prefix, QUESTIONS[2], max_new_tokens=6)], [fresh(engines[family], stored, QUESTIONS[2], Decoding(6))])
    other = store.read(f"{family}/bunny")
    assert_same_answers(
        engine.prefill_and_answer_all(other, QUESTIONS[:2], Decoding(max_new_tokens=6))[1],
        [fresh(engines[family], other, question, Decoding(max_new_tokens=6)) for question in QUESTIONS[:2]],
    )


def test_cuda_graphs_need_a_cuda_device(model_cache):  # noqa: F811
    with pytest.raises(ValueError, match="needs a CUDA device"):
        QueryEngine("tiny-random:qwen2-vl", dtype=torch.float32, decoding_steps="graphs")
    with pytest.raises(ValueError, match="decoding_steps must be one of"):
        QueryEngine("tiny-random:qwen2-vl", dtype=torch.float32, decoding_steps="fast")


def test_a_model_whose_step_cannot_be_captured_is_not_given_graphs(model_cache):  # noqa: F811
    """Qwen3-VL-MoE routes tokens to its experts on the host, which CUDA graph capture
    refuses (seen on an H200): asking for graphs is refused for it whatever the device,
    and its default is eager steps; the dense model only needs a CUDA device."""
    with pytest.raises(ValueError, match="cannot be captured as a CUDA graph"):
        QueryEngine("tiny-random:qwen3-vl-moe", dtype=torch.float32, decoding_steps="graphs")
    assert QueryEngine("tiny-random:qwen3-vl-moe", dtype=torch.float32).family.graph_capturable is False
    with pytest.raises(ValueError, match="needs a CUDA device"):
        QueryEngine("tiny-random:qwen3-vl", dtype=torch.float32, decoding_steps="graphs")
