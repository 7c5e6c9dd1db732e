"""Query stage: answers from stored token sets, one prefilled prefix per video.

The reference is each model's own end-to-end path on the same frames: the prompt as the
processor builds it (the chat template with the video placeholder repeated once per video
token), the adapter's pixel values, and ``model(...)`` / ``model.generate(...)``. Tiny
random models of the real architectures, float32, CPU.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json

import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.models import load_adapter, resolve_model
from pipeline.query import IncompatibleTokenSetError, QueryEngine, Question, answer_questions
from pipeline.query_job import QueryKey, run_query
from pipeline.store import TokenStore
from query_setup import FAMILIES, PACKED_FAMILIES, decode_sample, stored_token_set, with_features

QUESTIONS = [
    "What is happening in this video?",
    "How many people appear in the video, and what are they doing?",
    "Describe the video in detail, frame by frame.",
]


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """The tiny models, built into a cache of this session's own."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STTM_CACHE", str(tmp_path_factory.mktemp("sttm-cache")))
        for family in FAMILIES:
            resolve_model(f"tiny-random:{family}")
        yield


@pytest.fixture(scope="session")
def engines(model_cache):
    return {family: QueryEngine(f"tiny-random:{family}", dtype=torch.float32) for family in FAMILIES}


@pytest.fixture(scope="session")
def adapters(model_cache):
    return {family: load_adapter(f"tiny-random:{family}", dtype=torch.float32) for family in FAMILIES}


@pytest.fixture(scope="session")
def videos():
    return {(family, name): decode_sample(family, name) for family in FAMILIES for name in ("bigbuckbunny.mp4", "bikes.mp4")}


@pytest.fixture(scope="session")
def store(tmp_path_factory, adapters, videos):
    """Per family: ``<family>/bunny-full`` (nothing merged), ``<family>/bunny`` and
    ``<family>/bikes`` (merged to a 50% budget)."""
    store = TokenStore(str(tmp_path_factory.mktemp("store")))
    for family, adapter in adapters.items():
        bunny, bikes = videos[family, "bigbuckbunny.mp4"], videos[family, "bikes.mp4"]
        store.write(stored_token_set(adapter, bunny, f"{family}/bunny-full"))
        store.write(stored_token_set(adapter, bunny, f"{family}/bunny", retention=0.5))
        store.write(stored_token_set(adapter, bikes, f"{family}/bikes", retention=0.5))
    return store


def reference_inputs(engine: QueryEngine, adapter, video, question: str) -> dict[str, torch.Tensor]:
    """The full model's inputs as its processor builds them: the chat template's text
    with the video placeholder repeated once per video token, plus the pixel values."""
    pixels = adapter.preprocess(video)
    tokenizer = engine.tokenizer
    placeholder = tokenizer.convert_ids_to_tokens(engine.video_token_id)
    model_type = engine.model.config.model_type
    if model_type == "llava_onevision":
        num_frames = pixels["pixel_values_videos"].shape[1]
        replacement = placeholder * (num_frames * 14 * 14 + 1)  # pooled 14x14 grid per frame, one newline
    elif model_type in ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"):  # Qwen3.5 uses Qwen3VLProcessor
        replacement = qwen3_vl_video_text(engine, adapter, video, pixels["video_grid_thw"])
    else:
        replacement = placeholder * (int(pixels["video_grid_thw"].prod()) // 4)  # 2x2 patch merger
    conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    input_ids = tokenizer(text.replace(placeholder, replacement), return_tensors="pt")["input_ids"]
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **pixels}
    if engine.model.config.model_type != "llava_onevision":
        inputs["mm_token_type_ids"] = (input_ids == engine.video_token_id).int() * 2
    if engine.model.config.model_type == "qwen2_5_vl":
        encoded = adapter.encode(video)
        inputs["second_per_grid_ts"] = torch.tensor([encoded.model_extra["second_per_grid_t"]])
    return inputs


def qwen3_vl_video_text(engine: QueryEngine, adapter, video, video_grid_thw: torch.Tensor) -> str:
    """What ``Qwen3VLProcessor`` puts in place of the video placeholder (per temporal patch:
    its timestamp, vision start, its tokens, vision end), from the processor's own
    ``replace_video_token`` with the checkpoint's video-processor settings (its pixel path
    needs torchvision, which this environment lacks; ``adapter.preprocess`` stands in)."""
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.video_utils import VideoMetadata

    # Without torchvision the processor cannot be built whole (its auto classes are
    # placeholders): set the attributes replace_video_token reads, as __init__ sets them.
    processor = Qwen3VLProcessor.__new__(Qwen3VLProcessor)
    processor.video_processor = Qwen3VLVideoProcessor(
        **{key: adapter.settings[key] for key in ("patch_size", "temporal_patch_size", "merge_size")}
    )
    processor.video_token = engine.tokenizer.video_token
    processor.vision_start_token = engine.tokenizer.vision_start_token
    processor.vision_end_token = engine.tokenizer.vision_end_token
    metadata = VideoMetadata(total_num_frames=video.num_frames_total, fps=video.fps, frames_indices=list(video.frame_indices))
    return processor.replace_video_token({"video_grid_thw": video_grid_thw, "video_metadata": [metadata]}, 0)


def text_around_video(engine: QueryEngine, question: str) -> tuple[list[int], list[int]]:
    """Token ids of the chat template before and after the video placeholder."""
    conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    text = engine.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    before, after = text.split(engine.tokenizer.convert_ids_to_tokens(engine.video_token_id))
    return engine.tokenizer(before)["input_ids"], engine.tokenizer(after)["input_ids"]


@dataclasses.dataclass(frozen=True)
class Forward:
    """One forward of the model: ``tokens`` per row of ``rows`` run on top of ``cached``
    ones, and the float logits of the first row's last position."""

    tokens: int
    cached: int
    logits: torch.Tensor
    rows: int = 1


@contextlib.contextmanager
def recorded_forwards(model):
    """Record every forward of ``model`` (a list of ``Forward``, filled as they run)."""
    forwards: list[Forward] = []
    forward = model.forward

    def recording(**inputs):
        cache = inputs.get("cache", inputs.get("past_key_values"))
        cached = cache.get_seq_length()
        output = forward(**inputs)
        rows, tokens = inputs["inputs_embeds"].shape[:2]
        forwards.append(Forward(tokens, cached, output.logits[0, -1].float(), rows))
        return output

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model, "forward", recording)
        yield forwards


def cached_lengths(prefix) -> list[int]:
    """Tokens in each key/value layer of the prefix's cache (a recurrent layer's state
    has no length)."""
    return [layer.get_seq_length() for layer in prefix.cache.layers if hasattr(layer, "keys")]


# ------------------------------------------------------------------- the model's own path


@pytest.mark.parametrize("family", FAMILIES)
def test_unmerged_token_set_answers_like_the_models_own_generate(engines, adapters, videos, store, family):
    engine, model = engines[family], engines[family].model
    stored = store.read(f"{family}/bunny-full")
    assert stored.tokens.retention == 1.0
    prefix = engine.prefill(stored)

    for question in QUESTIONS[:2]:
        inputs = reference_inputs(engine, adapters[family], videos[family, "bigbuckbunny.mp4"], question)
        with torch.no_grad():
            expected_logits = model(**inputs).logits[0, -1]
            generated = model.generate(
                **inputs, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
        expected_tokens = generated.sequences[0, inputs["input_ids"].shape[1] :].tolist()
        expected_logprobs = [
            torch.log_softmax(step_logits[0], dim=-1)[token] for step_logits, token in zip(generated.logits, expected_tokens)
        ]
        if expected_tokens[-1] in engine.eos_token_ids:
            expected_tokens, expected_logprobs = expected_tokens[:-1], expected_logprobs[:-1]

        torch.testing.assert_close(engine.next_token_logits(prefix, question), expected_logits, rtol=1e-4, atol=1e-5)
        answer = engine.answer(prefix, question, max_new_tokens=8)
        with recorded_forwards(model) as forwards:
            _, fused = engine.prefill_and_answer(stored, question, max_new_tokens=8)  # question in the prefill's forward
        # The forward that ran the question: the prefill's, or (recurrent state) the one after it.
        question_forward = forwards[1] if engine.family.recurrent_state else forwards[0]
        torch.testing.assert_close(question_forward.logits, expected_logits, rtol=1e-4, atol=1e-5)
        for got in (answer, fused):
            assert got.token_ids == expected_tokens
            # Every decoding step ran at the model's own positions, not only the first.
            torch.testing.assert_close(torch.tensor(got.token_logprobs), torch.stack(expected_logprobs), rtol=0, atol=1e-5)
            assert got.text == engine.tokenizer.decode(expected_tokens, skip_special_tokens=True).strip()


# ------------------------------------------------------------------- the shared prefix


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prefix_answers_equal_a_fresh_prefill_per_question(engines, store, family):
    engine = engines[family]
    stored = store.read(f"{family}/bunny")
    shared = engine.prefill(stored)

    for question in QUESTIONS:
        from_shared = engine.answer(shared, question, max_new_tokens=6)
        assert shared.cache.get_seq_length() == shared.length  # cropped back to the prefix
        fresh = engine.prefill(stored)
        assert engine.answer(fresh, question, max_new_tokens=6).token_ids == from_shared.token_ids
        torch.testing.assert_close(
            engine.next_token_logits(shared, question), engine.next_token_logits(engine.prefill(stored), question)
        )


def test_seeded_sampling_repeats_and_leaves_the_prefix_as_it_was(engines, store):
    engine = engines["qwen2-vl"]
    prefix = engine.prefill(store.read("qwen2-vl/bunny"))
    greedy = engine.answer(prefix, QUESTIONS[0], max_new_tokens=6)

    def sample(seed):
        return engine.answer(prefix, QUESTIONS[0], max_new_tokens=6, do_sample=True, temperature=5.0, seed=seed).token_ids

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    assert engine.answer(prefix, QUESTIONS[0], max_new_tokens=6).token_ids == greedy.token_ids


# ------------------------------------------------------------------- the first question in the prefill


@pytest.mark.parametrize("family", PACKED_FAMILIES)  # the prefill holds the first question
def test_first_question_in_the_prefill_forward_answers_as_on_a_prefilled_prefix(engines, store, family):
    engine = engines[family]
    stored = store.read(f"{family}/bunny")
    prefilled = engine.prefill(stored)
    with recorded_forwards(engine.model) as separate_forwards:
        separate = engine.answer(prefilled, QUESTIONS[0], max_new_tokens=6)

    with recorded_forwards(engine.model) as forwards:
        prefix, fused = engine.prefill_and_answer(stored, QUESTIONS[0], max_new_tokens=6)

    # The forwards of `answer`, but the question's is the prefill's: no forward in between.
    prompt = prefix.length + fused.num_question_tokens
    assert (forwards[0].tokens, forwards[0].cached) == (prompt, 0)
    assert [(f.tokens, f.cached) for f in forwards[1:]] == [(f.tokens, f.cached) for f in separate_forwards[1:]]
    assert all(f.tokens == 1 for f in forwards[1:])
    torch.testing.assert_close(forwards[0].logits, separate_forwards[0].logits, rtol=1e-4, atol=1e-5)
    assert fused.token_ids == separate.token_ids and fused.text == separate.text
    assert fused.num_question_tokens == separate.num_question_tokens
    torch.testing.assert_close(torch.tensor(fused.token_logprobs), torch.tensor(separate.token_logprobs), rtol=0, atol=1e-5)
    # The time to first token counts from the start of the prefill, which it includes.
    assert 0 < prefix.prefill_s <= fused.ttft_s <= fused.total_s


@pytest.mark.parametrize("family", PACKED_FAMILIES)  # the prefill holds the first question
def test_first_question_in_the_prefill_forward_leaves_the_prefix_a_prefill_leaves(engines, store, family):
    engine = engines[family]
    stored = store.read(f"{family}/bikes")
    prefilled = engine.prefill(stored)

    prefix, _ = engine.prefill_and_answer(stored, QUESTIONS[0], max_new_tokens=6)

    # Cropped back to the prefix in every layer, with the keys and values a prefill computes.
    assert (prefix.length, prefix.text_position) == (prefilled.length, prefilled.text_position)
    assert cached_lengths(prefix) == [prefix.length] * len(cached_lengths(prefix))
    assert torch.equal(prefix.position_ids, prefilled.position_ids)
    for layer, expected in zip(prefix.cache.layers, prefilled.cache.layers):
        torch.testing.assert_close(layer.keys, expected.keys, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.values, expected.values, rtol=1e-4, atol=1e-5)
    # So a further question gets the answer it gets on a freshly prefilled prefix.
    further, on_prefilled = (engine.answer(p, QUESTIONS[1], max_new_tokens=6) for p in (prefix, prefilled))
    assert further.token_ids == on_prefilled.token_ids
    torch.testing.assert_close(engine.next_token_logits(prefix, QUESTIONS[1]), engine.next_token_logits(prefilled, QUESTIONS[1]))


def test_answer_questions_answers_each_videos_first_question_in_its_prefill(engines, store):
    engine = engines["qwen2-vl"]
    asked = [("bunny", 0), ("bikes", 1), ("bunny", 1), ("bunny", 2)]
    questions = [Question(index, f"qwen2-vl/{video}", QUESTIONS[q]) for index, (video, q) in enumerate(asked)]

    with recorded_forwards(engine.model) as forwards:
        results = list(answer_questions(engine, store, questions, max_new_tokens=3))

    # Grouped by video; the first question of each video in the prefill's forward, on an
    # empty cache, holding the prefix and the question; the others' prompts in one more.
    assert [r.question.id for r in results] == [0, 2, 3, 1]
    assert [r.prefix_reused for r in results] == [False, True, True, False]
    others = results[1].answer.num_question_tokens + results[2].answer.num_question_tokens
    assert sum(f.tokens == others for f in forwards) == 1
    prefills = [f for f in forwards if f.cached == 0]
    assert [f.tokens for f in prefills] == [
        engine.prefill(store.read(f"qwen2-vl/{video}")).length + result.answer.num_question_tokens
        for video, result in (("bunny", results[0]), ("bikes", results[3]))
    ]
    # The same answers as from a plain prefill per video and one answer per question.
    for result in results:
        prefix = engine.prefill(store.read(result.question.video_id))
        expected = engine.answer(prefix, result.question.text, max_new_tokens=3)
        assert (result.answer.token_ids, result.answer.text) == (expected.token_ids, expected.text)
        assert result.num_visual_tokens == prefix.num_visual_tokens
    assert results[0].prefill_s == results[1].prefill_s == results[2].prefill_s
    assert results[0].answer.ttft_s >= results[0].prefill_s  # the first question's times include the prefill


# ------------------------------------------------------------------- failures


def test_the_fused_call_refuses_what_prefill_and_answer_refuse_before_running_the_model(engines, store):
    engine = engines["qwen2-vl"]
    stored = store.read("qwen2-vl/bunny")
    with recorded_forwards(engine.model) as forwards:
        with pytest.raises(ValueError, match="empty"):
            engine.prefill_and_answer(stored, "  ")
        with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
            engine.prefill_and_answer(stored, QUESTIONS[0], max_new_tokens=0)
        with pytest.raises(ValueError, match="temperature must be > 0"):
            engine.prefill_and_answer(stored, QUESTIONS[0], do_sample=True, temperature=0.0)
        with pytest.raises(IncompatibleTokenSetError, match="another vision encoder"):
            engines["llava-onevision"].prefill_and_answer(stored, QUESTIONS[0])
        wrong_grid = dataclasses.replace(stored, model_extra=stored.model_extra | {"video_grid_thw": [4, 8, 14]})
        with pytest.raises(IncompatibleTokenSetError, match="does not match the token grid"):
            engine.prefill_and_answer(wrong_grid, QUESTIONS[0])
    assert forwards == []
    # A bad question is the caller's error, not the video's: it is raised, not reported.
    with pytest.raises(ValueError, match="empty"):
        list(answer_questions(engine, store, [Question(1, "qwen2-vl/bunny", "  ")]))


def test_a_forward_failing_part_way_leaves_no_extended_cache_behind(engines, store):
    engine = engines["qwen2-vl"]
    stored = store.read("qwen2-vl/bunny")
    prefix = engine.prefill(stored)
    expected = engine.answer(prefix, QUESTIONS[1], max_new_tokens=4)
    last_layer = engine.model.model.language_model.layers[-1]

    def failing_on(run):
        """Make the last decoder layer fail on its ``run``-th forward, after the layers
        below it have extended the cache."""
        runs = itertools.count(1)

        def hook(module, args):
            if next(runs) == run:
                raise RuntimeError("injected failure")

        return last_layer.register_forward_pre_hook(hook)

    for run in (1, 2):  # the question's forward (the fused call: its prefill), the first decoding step
        with failing_on(run), pytest.raises(RuntimeError, match="injected"):
            engine.answer(prefix, QUESTIONS[0], max_new_tokens=4)
        assert cached_lengths(prefix) == [prefix.length] * len(cached_lengths(prefix))
        # The fused call raises too, handing out no prefix.
        with failing_on(run), pytest.raises(RuntimeError, match="injected"):
            engine.prefill_and_answer(stored, QUESTIONS[0], max_new_tokens=4)
    assert engine.answer(prefix, QUESTIONS[1], max_new_tokens=4).token_ids == expected.token_ids
    _, first = engine.prefill_and_answer(stored, QUESTIONS[1], max_new_tokens=4)
    assert first.token_ids == expected.token_ids


# ------------------------------------------------------------------- merged prompts


def spec_positions(engine: QueryEngine, stored, num_text_before: int, num_text_after: int) -> torch.Tensor:
    """Positions of the whole merged prompt computed from STTM_SPEC section 5 alone.

    1-D models: ``0 .. L-1``. Qwen2-VL (3-D): text before the video at ``0 .. s-1`` on all
    axes; a merged token at ``s + (t, y0, x0)`` of its root's top-left patch; text after
    the video from ``s + max(T, H, W)``, where the full video's text would be.
    """
    tokens = stored.tokens
    if engine.model.config.model_type == "llava_onevision":
        return torch.arange(num_text_before + tokens.num_tokens + 1 + num_text_after)[None]
    s = num_text_before
    before = torch.arange(s).expand(3, -1)
    video = s + torch.stack([tokens.frame, tokens.box[:, 0], tokens.box[:, 1]]).long()
    after = (s + max(tokens.grid) + torch.arange(num_text_after)).expand(3, -1)
    return torch.cat([before, video, after], dim=1)[:, None]


def model_positions(engine: QueryEngine, stored, num_text_before: int, num_text_after: int) -> torch.Tensor:
    """Qwen2.5-VL positions from the model's own positions of the unmerged prompt, taken
    at each merged token's root top-left patch (its temporal spacing depends on the
    transformers version, so no formula is written down here)."""
    t, h, w = stored.tokens.grid
    s, video_length = num_text_before, t * h * w
    input_ids = torch.zeros(1, s + video_length + num_text_after, dtype=torch.long)
    token_types = torch.zeros_like(input_ids, dtype=torch.int32)
    token_types[0, s : s + video_length] = 2
    full, _ = engine.model.model.get_rope_index(
        input_ids,
        mm_token_type_ids=token_types,
        video_grid_thw=torch.tensor([stored.model_extra["video_grid_thw"]]),
        second_per_grid_ts=torch.tensor([stored.model_extra["second_per_grid_t"]]),
    )
    tokens = stored.tokens
    roots = s + (tokens.frame.long() * h + tokens.box[:, 0].long()) * w + tokens.box[:, 1].long()
    keep = torch.cat([torch.arange(s), roots, torch.arange(s + video_length, input_ids.shape[1])])
    return full[:, :, keep]


# Families whose video is one block of tokens in the prompt (Qwen3-VL's per-frame blocks:
# tests/test_families.py).
ONE_BLOCK_FAMILIES = ["llava-onevision", "qwen2-vl", "qwen2.5-vl"]


@pytest.mark.parametrize("family", ONE_BLOCK_FAMILIES)
def test_merged_prompt_holds_the_n_stored_tokens_in_order_at_their_spec_positions(engines, store, family):
    engine, model = engines[family], engines[family].model
    stored = store.read(f"{family}/bikes")
    t, h, w = stored.tokens.grid
    assert stored.num_tokens <= 0.5 * t * h * w
    question = QUESTIONS[1]
    before, after = text_around_video(engine, question)
    newline = [model.model.image_newline] if family == "llava-onevision" else []

    prefix = engine.prefill(stored)
    assert prefix.num_visual_tokens == stored.num_tokens
    assert prefix.length == len(before) + stored.num_tokens + len(newline)

    positions_of = model_positions if family == "qwen2.5-vl" else spec_positions
    positions = positions_of(engine, stored, len(before), len(after))
    assert torch.equal(prefix.position_ids, positions[..., : prefix.length])
    assert prefix.text_position == int(positions.flatten(0, -2)[0, prefix.length])  # first text after the video

    # The whole prompt in one forward pass: text, the stored features in stored order,
    # (the newline), the question -- gives the query stage's next-token logits.
    embed = model.get_input_embeddings()
    prompt = torch.cat([embed(torch.tensor(before)), stored.tokens.features, *(n[None] for n in newline), embed(torch.tensor(after))])
    with torch.no_grad():
        expected = model(inputs_embeds=prompt[None], position_ids=positions).logits[0, -1]
    torch.testing.assert_close(engine.next_token_logits(prefix, question), expected, rtol=1e-4, atol=1e-5)

    # Any other order of the same tokens is another prompt.
    shuffled = stored.tokens.features[torch.randperm(stored.num_tokens, generator=torch.Generator().manual_seed(0))]
    other = engine.prefill(with_features(stored, shuffled))
    assert not torch.allclose(engine.next_token_logits(other, question), expected, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------- bad input


def test_a_store_made_for_another_model_is_refused(engines, store):
    stored = store.read("qwen2-vl/bunny")
    with pytest.raises(IncompatibleTokenSetError, match="32 channels.*takes 64"):
        engines["qwen2-vl"].prefill(with_features(stored, stored.tokens.features[:, :32].contiguous()))
    # Same hidden size, other vision encoder: caught by the encoder fingerprint.
    with pytest.raises(IncompatibleTokenSetError, match="another vision encoder"):
        engines["llava-onevision"].prefill(stored)


def query_key(store, max_new_tokens=16):
    return QueryKey.of(store=store.url, config_fingerprint=None, model="tiny-random:qwen2-vl", dtype="float32",
                       max_new_tokens=max_new_tokens, do_sample=False, temperature=1.0, seed=None)


def test_questions_file_reports_bad_lines_and_videos_and_answers_the_rest(engines, store, tmp_path):
    lines = [
        json.dumps({"video_id": "qwen2-vl/bunny", "question": QUESTIONS[0], "id": "q1"}),  # 1
        "{not json",  # 2
        "",  # 3: blank, skipped
        json.dumps(["video_id", "question"]),  # 4
        json.dumps({"video_id": "qwen2-vl/bunny"}),  # 5
        json.dumps({"video_id": "no-such-video", "question": QUESTIONS[0], "id": "q6"}),  # 6
        json.dumps({"video_id": "llava-onevision/bunny", "question": QUESTIONS[0], "id": "q7"}),  # 7: other model
        json.dumps({"video_id": "qwen2-vl/bikes", "question": QUESTIONS[1]}),  # 8: id from line number
        json.dumps({"video_id": "qwen2-vl/bunny", "question": QUESTIONS[2], "id": "q9"}),  # 9
    ]
    questions_path, out_path = tmp_path / "questions.jsonl", tmp_path / "answers.jsonl"
    questions_path.write_text("\n".join(lines) + "\n")

    summary = run_query(questions_path, out_path, query_key(store, max_new_tokens=4),
                        lambda questions: answer_questions(engines["qwen2-vl"], store, questions, max_new_tokens=4))

    written = [json.loads(line) for line in out_path.read_text().splitlines()]
    answers = [line for line in written if "answer" in line]
    assert [(a["id"], a["video_id"]) for a in answers] == [("q1", "qwen2-vl/bunny"), ("q9", "qwen2-vl/bunny"), ("8", "qwen2-vl/bikes")]
    assert [a["prefix_reused"] for a in answers] == [False, True, False]
    for answer in answers:
        assert set(answer) >= {"answer", "load_s", "prefill_s", "ttft_s", "total_s", "num_visual_tokens"}
        assert 0 < answer["ttft_s"] <= answer["total_s"]
    assert answers[0]["prefill_s"] == answers[1]["prefill_s"]
    assert (summary.num_questions, summary.num_answered) == (5, 3)
    assert [p.get("line") for p in summary.problems[:3]] == [2, 4, 5]
    by_id = {p["id"]: p["error"] for p in summary.problems[3:]}
    assert "no token set for video id 'no-such-video'" in by_id["q6"]
    assert "another vision encoder" in by_id["q7"]
    assert summary.timings["num_videos"] == 2
    assert summary.timings["saved_s"] == pytest.approx(answers[0]["prefill_s"], abs=2e-6)
    # Besides the answers, the output holds each problem once, with the run's key.
    key = query_key(store, max_new_tokens=4).to_json()
    assert [line for line in written if "answer" not in line] == [problem | {"key": key} for problem in summary.problems]


def test_a_questions_file_without_questions_is_an_error(engines, store, tmp_path):
    questions_path = tmp_path / "questions.jsonl"
    questions_path.write_text("\n\n{\"question\": \"no video\"}\n")
    asked = []
    with pytest.raises(ValueError, match=r"holds no questions\n  line 3: needs non-empty string fields \['video_id'\]"):
        run_query(questions_path, tmp_path / "answers.jsonl", query_key(store), asked.append)
    assert asked == []  # refused before any model would answer


def test_empty_question_text_is_refused(engines, store):
    prefix = engines["qwen2-vl"].prefill(store.read("qwen2-vl/bunny"))
    with pytest.raises(ValueError, match="empty"):
        engines["qwen2-vl"].answer(prefix, "  ")
    results = list(answer_questions(engines["qwen2-vl"], store, []))
    assert results == []


# ------------------------------------------------------------------- command line


def test_query_command(model_cache, store, tmp_path):
    questions_path, out_path = tmp_path / "questions.jsonl", tmp_path / "answers.jsonl"
    questions = [{"video_id": "qwen2.5-vl/bunny", "question": q} for q in QUESTIONS[:2]] + [{"video_id": "nope", "question": "?"}]
    questions_path.write_text("".join(json.dumps(q) + "\n" for q in questions))
    args = ["query", store.url, "--model", "tiny-random:qwen2.5-vl", "--dtype", "float32",
            "--questions", str(questions_path), "--out", str(out_path), "--max-new-tokens", "3"]  # fmt: skip

    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 1, result.output  # one question's video is missing
    summary = json.loads(result.stdout)
    assert (summary["num_questions"], summary["num_answered"]) == (3, 2)
    assert summary["problems"][0]["video_id"] == "nope"
    lines = [json.loads(line) for line in out_path.read_text().splitlines()]
    assert [(line["id"], "answer" in line) for line in lines] == [("1", True), ("2", True), ("3", False)]

    result = CliRunner().invoke(main, args)  # a re-run: the answers are there already
    assert "answered 0 of 3 questions on 0 videos (2 already answered)" in result.stdout
    assert "problem: question 3 (nope): no token set for video id 'nope'" in result.stderr
