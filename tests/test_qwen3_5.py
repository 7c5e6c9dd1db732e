"""Qwen3.5: Qwen3-VL's per-frame video prompt without DeepStack, and a decoder whose
linear-attention (Gated DeltaNet) layers keep a recurrent state, so that every question
must start from the state the prefix left.

The references are transformers' own code: the processor's prompt
(``Qwen3VLProcessor.replace_video_token``, which Qwen3.5 uses), ``get_rope_index`` and
the model's own language model over the whole prompt. (Answers at retention 1.0 equal
the model's own ``generate``: ``tests/test_query.py``, whose families include Qwen3.5;
batched answers equal fresh prefills: ``tests/test_query_batched.py``.) Tiny random
models, float32, CPU.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import connected_to
from pipeline.models import IncompatibleTokenSetError, load_adapter, resolve_model
from pipeline.query import Decoding, QueryEngine, _copy_of_cache
from pipeline.store import TokenStore
from query_setup import decode_sample, stored_token_set
from test_query import QUESTIONS, qwen3_vl_video_text, recorded_forwards, text_around_video

OTHER_QUESTIONS = [
    "Why?",
    "Is the camera moving?",
    "Describe the video in detail, frame by frame.",
    "What colour is the sky?",
    "How does the video end?",
]


@pytest.fixture(scope="module")
def qwen3_5(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STTM_CACHE", str(tmp_path_factory.mktemp("sttm-cache")))
        resolve_model("tiny-random:qwen3.5")
        engine = QueryEngine("tiny-random:qwen3.5", dtype=torch.float32)
        adapter = load_adapter("tiny-random:qwen3.5", dtype=torch.float32)
        video = decode_sample("qwen3.5", "bikes.mp4")
        store = TokenStore(str(tmp_path_factory.mktemp("store")))
        store.write(stored_token_set(adapter, video, "bikes", retention=0.5))
        yield engine, adapter, video, store


def recurrent_states(cache) -> list[torch.Tensor]:
    """Every convolution and recurrent state of the cache's linear-attention layers."""
    return [state for layer in cache.layers for kind in ("conv_states", "recurrent_states")
            for state in getattr(layer, kind, {}).values()]


def test_the_tiny_model_mixes_recurrent_and_attention_layers_and_has_no_deepstack(qwen3_5):
    engine, adapter, video, store = qwen3_5
    assert set(engine.model.config.text_config.layer_types) == {"linear_attention", "full_attention"}
    assert engine.family.recurrent_state
    encoded = adapter.encode(video)
    assert encoded.deepstack is None and encoded.model_extra["num_deepstack_levels"] == 0
    stored = store.read("bikes")
    assert stored.deepstack is None
    with_levels = dataclasses.replace(stored, deepstack=torch.zeros(2, stored.num_tokens, engine.hidden_size))
    with pytest.raises(IncompatibleTokenSetError, match="has no DeepStack levels"):
        engine.check(with_levels)


def test_merged_prompt_is_the_processors_with_each_frames_tokens_replaced(qwen3_5):
    """As for Qwen3-VL: per temporal patch ``<t seconds><|vision_start|>``, the tokens
    rooted in that frame, ``<|vision_end|>``, at the unmerged prompt's positions; the
    first-token logits equal the model's own language model over the whole merged prompt."""
    engine, adapter, video, store = qwen3_5
    model, config = engine.model, engine.model.config
    stored = store.read("bikes")
    tokens = stored.tokens
    t, h, w = tokens.grid
    assert tokens.num_tokens <= 0.5 * t * h * w
    question = QUESTIONS[1]

    before, after = text_around_video(engine, question)
    grid = torch.tensor([stored.model_extra["video_grid_thw"]])
    video_ids = engine.tokenizer(qwen3_vl_video_text(engine, adapter, video, grid), add_special_tokens=False)["input_ids"]
    full_ids = torch.tensor([before + video_ids + after])
    is_video = full_ids[0] == config.video_token_id
    assert int(is_video.sum()) == t * h * w
    full_positions, _ = model.model.get_rope_index(full_ids, mm_token_type_ids=is_video.int()[None] * 2, video_grid_thw=grid)
    video_rows = is_video.nonzero().flatten().view(t, h * w)
    root_rows = video_rows[tokens.frame.long(), (tokens.box[:, 0] * w + tokens.box[:, 1]).long()]  # [N]
    kept = ~is_video
    kept[root_rows] = True
    keep = kept.nonzero().flatten()
    merged_ids = full_ids[0, keep]
    assert len(merged_ids) == full_ids.shape[1] - t * h * w + tokens.num_tokens
    assert (merged_ids == config.vision_start_token_id).sum() == (full_ids == config.vision_start_token_id).sum()

    prefix = engine.prefill(stored)
    length = len(before) + len(video_ids) - t * h * w + tokens.num_tokens
    positions = full_positions[:, :, keep]
    assert prefix.length == length and torch.equal(prefix.position_ids, positions[..., :length])
    assert prefix.text_position == int(positions[0, 0, length])

    embeds = model.get_input_embeddings()(merged_ids)
    embeds[merged_ids == config.video_token_id] = tokens.features
    with torch.no_grad():
        hidden = model.model.language_model(inputs_embeds=embeds[None], position_ids=positions).last_hidden_state
    expected = model.lm_head(hidden[:, -1])[0]
    torch.testing.assert_close(engine.next_token_logits(prefix, question), expected, rtol=1e-4, atol=1e-5)


def test_a_question_gets_the_same_answer_asked_first_or_after_five_others(qwen3_5):
    engine, _, _, store = qwen3_5
    stored = store.read("bikes")
    question = QUESTIONS[0]
    prefix = engine.prefill(stored)
    states_after_prefill = [state.clone() for state in recurrent_states(prefix.cache)]
    first = engine.answer(prefix, question, max_new_tokens=6)

    def same(answer):
        assert (answer.token_ids, answer.text) == (first.token_ids, first.text)
        torch.testing.assert_close(torch.tensor(answer.token_logprobs), torch.tensor(first.token_logprobs), rtol=0, atol=1e-5)

    # Five other questions answered on the same prefix, one call each, then the question.
    for other in OTHER_QUESTIONS:
        engine.answer(prefix, other, max_new_tokens=6)
    same(engine.answer(prefix, question, max_new_tokens=6))
    # ... and all six together, the question last; and on a fresh prefill.
    same(engine.answer_all(prefix, OTHER_QUESTIONS + [question], Decoding(max_new_tokens=6))[-1])
    same(engine.prefill_and_answer(stored, question, max_new_tokens=6)[1])
    # The prefix's recurrent states are untouched, bit for bit.
    assert len(states_after_prefill) == 2 * engine.model.config.text_config.layer_types.count("linear_attention")
    assert all(torch.equal(a, b) for a, b in zip(recurrent_states(prefix.cache), states_after_prefill, strict=True))


def test_cropping_the_attention_cache_alone_does_not_undo_a_question(qwen3_5):
    """Why a copy of the state is needed: after another question ran, cropping its keys
    and values back to the prefix (what the packed path does) leaves the linear layers'
    states changed, and the next question's logits change with them."""
    engine, _, _, store = qwen3_5
    prefix = engine.prefill(store.read("bikes"))
    question_ids, other_ids = (engine._question_ids(q) for q in (QUESTIONS[0], OTHER_QUESTIONS[2]))

    def question_logits(cache):
        positions = engine._text_positions(prefix.text_position, len(question_ids))
        with torch.no_grad():
            return engine._forward(engine._embed(question_ids)[None], positions, cache)

    stale = _copy_of_cache(prefix.cache)
    with torch.no_grad():
        engine._forward(engine._embed(other_ids)[None], engine._text_positions(prefix.text_position, len(other_ids)), stale)
    for layer in stale.layers:
        if hasattr(layer, "keys"):
            layer.crop(-len(other_ids))
    assert stale.get_seq_length() == prefix.length
    restored = question_logits(_copy_of_cache(prefix.cache))
    torch.testing.assert_close(restored, engine.next_token_logits(prefix, QUESTIONS[0]), rtol=0, atol=0)
    assert not torch.allclose(question_logits(stale), restored, rtol=1e-3, atol=1e-3)


def test_questions_run_as_rows_from_the_prefix_state_and_ended_rows_drop_out(qwen3_5):
    engine, _, _, store = qwen3_5
    stored = store.read("bikes")
    questions = [QUESTIONS[0], OTHER_QUESTIONS[0], QUESTIONS[2]]
    lengths = [len(engine._question_ids(q)) for q in questions]
    with recorded_forwards(engine.model) as forwards:
        prefix, answers = engine.prefill_and_answer_all(stored, questions, [Decoding(max_new_tokens=n) for n in (5, 2, 4)])
    # The prefix alone (a recurrent state cannot be taken back to its end), each prompt on a
    # copy of the prefix's cache, then one token per row for the questions still going.
    assert [(f.tokens, f.cached, f.rows) for f in forwards[:4]] == [(prefix.length, 0, 1)] + [
        (length, prefix.length, 1) for length in lengths
    ]
    going = [sum(len(a.token_ids) > step for a in answers) for step in range(1, 5)]
    assert [f.rows for f in forwards[4:]] == [rows for rows in going if rows]
    assert all(f.tokens == 1 for f in forwards[4:])


def test_static_decoding_steps_are_refused_for_a_recurrent_state(qwen3_5):
    with pytest.raises(ValueError, match="recurrent state"):
        QueryEngine("tiny-random:qwen3.5", dtype=torch.float32, decoding_steps="static")


def test_preprocess_on_the_models_own_sampling_stores_queries_and_draws_both_samples(ray_cluster, tmp_path):
    """The preprocess job (real local Ray, decode and encode actors) on the bundled videos
    with the tiny Qwen3.5 and its own sampling recipe (2 fps, one size per clip): every
    video stored without DeepStack, one timestamp per temporal patch, queryable, and drawn
    by the visualiser (one panel per temporal patch, up to its default 8)."""
    from pipeline.config import PreprocessConfig
    from pipeline.decode import decode_video
    from pipeline.run import run_preprocess
    from pipeline.samples import SAMPLE_DIR
    from pipeline.visualize import panel_token_frames, visualize_stored_video

    store_dir = tmp_path / "store"
    config = PreprocessConfig(input=str(SAMPLE_DIR), output=str(store_dir), model="tiny-random:qwen3.5", progress=False)
    with connected_to(ray_cluster):
        summary = run_preprocess(config)
    assert (summary.stored, summary.failed) == (2, 0), summary.failures

    store = TokenStore(str(store_dir))
    engine = QueryEngine("tiny-random:qwen3.5")
    adapter = load_adapter("tiny-random:qwen3.5")
    for video_id in ("bigbuckbunny", "bikes"):
        stored = store.read(video_id)
        video = decode_video(str(SAMPLE_DIR / f"{video_id}.mp4"), adapter.default_sampling())
        assert stored.frame_indices == video.frame_indices
        t = stored.tokens.grid[0]
        assert t == -(-len(video.frame_indices) // 2) and len(stored.model_extra["frame_seconds"]) == t
        assert stored.deepstack is None and stored.num_tokens <= 0.5 * stored.original_tokens
        engine.check(stored)
        assert engine.answer(engine.prefill(stored), QUESTIONS[0], max_new_tokens=2).num_question_tokens > 0
        drawn = visualize_stored_video(str(store_dir), video_id)
        assert [panel.token_frame for panel in drawn.panels] == panel_token_frames(t, 8)  # up to 8 temporal patches
