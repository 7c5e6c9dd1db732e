"""Model families: the registry, and what is particular to Qwen3-VL (per-frame prompt
blocks with timestamps, DeepStack levels merged and stored beside the tokens).

The references are transformers' own code: ``Qwen3VLVideoProcessor.sample_frames``,
``Qwen3VLProcessor.replace_video_token`` (the prompt text of a video), ``get_rope_index``
and the language model's own DeepStack path. Tiny random models, float32, CPU.
"""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
from transformers.video_utils import VideoMetadata

from conftest import connected_to
import schemas
import sttm
from pipeline import store as store_module
from pipeline.fingerprint import content_hash
from pipeline.models import load_adapter, resolve_model
from pipeline.models.base import merge_beside
from pipeline.models.qwen3_vl import Qwen3VLSampling
from pipeline.models.registry import FAMILIES, FAMILY_MODULES
from pipeline.query import QueryEngine
from pipeline.store import CorruptObjectError, TokenStore
from query_setup import decode_sample, stored_token_set
from test_query import QUESTIONS, qwen3_vl_video_text, text_around_video

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------- the registry


def test_every_family_module_is_self_contained_and_registered():
    for family in FAMILY_MODULES:
        assert family.MODEL_TYPES and family.TINY_RANDOM and family.ADAPTER and family.LAYOUT
        assert all(FAMILIES[model_type] is family for model_type in family.MODEL_TYPES)
        # A family imports the shared base and helpers, never another family.
        imported = {
            node.module
            for node in ast.walk(ast.parse(Path(family.__file__).read_text()))
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline.models")
        }
        assert imported <= {"pipeline.models.base", "pipeline.models.tiny_random"}, (family.__name__, imported)


@pytest.mark.parametrize("path", ["pipeline/query.py", "pipeline/visualize.py", "pipeline/stages.py", "pipeline/run.py"])
def test_nothing_outside_the_families_branches_on_model_type(path):
    assert "model_type" not in (REPO / path).read_text()


# ------------------------------------------------------------------- merging beside the tokens


@pytest.mark.parametrize("weighted", [False, True])
def test_per_patch_tensors_merge_with_the_tokens_groups_and_weights(weighted):
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(4, 6, 8, 16, generator=generator)
    levels = torch.randn(2, 4, 6, 8, 16, generator=generator)
    merged = sttm.merge_to_budget(tokens, 0.4, weighted=weighted)
    assert merged.num_tokens < tokens.shape[:3].numel()

    # The tokens themselves, merged beside themselves, give exactly the merged features.
    assert torch.equal(merge_beside(tokens, tokens[None], merged)[0], merged.features)
    beside = merge_beside(tokens, levels, merged)
    assert beside.shape == (2, merged.num_tokens, 16)
    # Linear in the level: one level merged is the same whatever its neighbours.
    torch.testing.assert_close(merge_beside(tokens, levels[1:], merged)[0], beside[1])
    if weighted:  # patch-count weighted: each token is the mean of its patches
        assignment = merged.assignment.reshape(-1).long()
        for level, merged_level in zip(levels, beside):
            sums = torch.zeros(merged.num_tokens, 16).index_add_(0, assignment, level.reshape(-1, 16))
            torch.testing.assert_close(merged_level, sums / merged.num_patches[:, None].float())


# ------------------------------------------------------------------- Qwen3-VL


@pytest.mark.parametrize("num_frames_total, fps", [(250, 25.0), (30, 30.0), (3, 24.0), (5000, 29.97), (100, 1.0)])
def test_qwen3_vl_sampling_is_the_video_processors(num_frames_total, fps):
    processor = Qwen3VLVideoProcessor()
    metadata = VideoMetadata(total_num_frames=num_frames_total, fps=fps)
    expected = processor.sample_frames(metadata).tolist()
    assert Qwen3VLSampling().frame_indices(num_frames_total, fps) == expected


@pytest.fixture(scope="module")
def qwen3_vl(tmp_path_factory):
    """Engine, adapter and a store holding the bikes clip merged to 50% and unmerged."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STTM_CACHE", str(tmp_path_factory.mktemp("sttm-cache")))
        resolve_model("tiny-random:qwen3-vl")
        engine = QueryEngine("tiny-random:qwen3-vl", dtype=torch.float32)
        adapter = load_adapter("tiny-random:qwen3-vl", dtype=torch.float32)
        video = decode_sample("qwen3-vl", "bikes.mp4")
        store = TokenStore(str(tmp_path_factory.mktemp("store")))
        store.write(stored_token_set(adapter, video, "bikes", retention=0.5))
        store.write(stored_token_set(adapter, video, "bikes-full"))
        yield engine, adapter, video, store


def test_qwen3_vl_store_keeps_the_deepstack_levels(qwen3_vl):
    engine, adapter, video, store = qwen3_vl
    stored = store.read("bikes")
    encoded = adapter.encode(video)
    assert stored.model_extra["num_deepstack_levels"] == len(engine.model.config.vision_config.deepstack_visual_indexes)
    assert torch.equal(stored.deepstack, merge_beside(encoded.tokens, encoded.deepstack, stored.tokens))
    # Unmerged, each level is the vision tower's own DeepStack output, in raster order.
    full = store.read("bikes-full")
    assert torch.equal(full.deepstack, encoded.deepstack.flatten(1, 3))


def test_qwen3_vl_merged_prompt_is_the_processors_with_each_frames_tokens_replaced(qwen3_vl):
    """Per temporal patch the processor's prompt holds ``<t seconds><|vision_start|>``, the
    frame's tokens, ``<|vision_end|>``. Merged, each frame keeps its text and holds the
    merged tokens rooted in it; positions are the unmerged prompt's (root top-left patch
    for a merged token); the DeepStack levels are added exactly at the merged rows."""
    engine, adapter, video, store = qwen3_vl
    model, config = engine.model, engine.model.config
    stored = store.read("bikes")
    tokens = stored.tokens
    t, h, w = tokens.grid
    assert tokens.num_tokens <= 0.5 * t * h * w
    question = QUESTIONS[1]

    # The processor's full prompt, and the same with each frame's h*w tokens replaced by
    # the count of merged tokens rooted in that frame.
    before, after = text_around_video(engine, question)
    video_text = qwen3_vl_video_text(engine, adapter, video, torch.tensor([stored.model_extra["video_grid_thw"]]))
    video_ids = engine.tokenizer(video_text, add_special_tokens=False)["input_ids"]
    full_ids = torch.tensor([before + video_ids + after])
    is_video = full_ids[0] == config.video_token_id
    assert int(is_video.sum()) == t * h * w
    full_positions, _ = model.model.get_rope_index(
        full_ids, mm_token_type_ids=is_video.int()[None] * 2, video_grid_thw=torch.tensor([stored.model_extra["video_grid_thw"]])
    )
    video_rows = is_video.nonzero().flatten().view(t, h * w)  # rows of each frame's tokens
    per_frame = torch.bincount(tokens.frame.long(), minlength=t)
    root_rows = video_rows[tokens.frame.long(), (tokens.box[:, 0] * w + tokens.box[:, 1]).long()]  # [N]
    dropped = torch.ones(len(is_video), dtype=torch.bool)
    dropped[~is_video] = False
    dropped[root_rows] = False
    keep = (~dropped).nonzero().flatten()  # text rows and each token's root row, in order
    merged_ids = full_ids[0, keep]
    visual = merged_ids == config.video_token_id
    assert len(merged_ids) == full_ids.shape[1] - t * h * w + tokens.num_tokens
    # Every frame block is there, also for frames merging left without a token of its own.
    assert (merged_ids == config.vision_start_token_id).sum() == (full_ids == config.vision_start_token_id).sum()

    prefix = engine.prefill(stored)
    length = len(before) + len(video_ids) - t * h * w + tokens.num_tokens
    assert prefix.length == length and prefix.num_visual_tokens == tokens.num_tokens
    positions = full_positions[:, :, keep]
    assert torch.equal(prefix.position_ids, positions[..., :length])
    assert prefix.text_position == int(positions[0, 0, length])

    # The model's own language model on that prompt: text embeddings, the stored features
    # scattered into the video rows in stored order, DeepStack added at those rows.
    embeds = model.get_input_embeddings()(merged_ids)
    embeds[visual] = tokens.features
    added = []
    deepstack_process = model.model.language_model._deepstack_process

    def recording(hidden_states, visual_pos_masks, visual_embeds):
        added.append((visual_pos_masks.clone(), visual_embeds))
        return deepstack_process(hidden_states, visual_pos_masks, visual_embeds)

    with torch.no_grad():
        hidden = model.model.language_model(
            inputs_embeds=embeds[None], position_ids=positions, visual_pos_masks=visual[None],
            deepstack_visual_embeds=list(stored.deepstack),
        ).last_hidden_state
    expected = model.lm_head(hidden[:, -1])[0]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model.model.language_model, "_deepstack_process", recording)
        got = engine.next_token_logits(prefix, question)
        assert len(added) == 0  # the question runs on the cached prefix: nothing added to it
        engine.prefill_and_answer(stored, question, max_new_tokens=1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert len(added) == len(stored.deepstack)
    for (mask, level_embeds), level in zip(added, stored.deepstack):
        assert torch.equal(mask[0], visual)  # exactly the merged rows of prompt + question
        assert torch.equal(level_embeds, level)


# ------------------------------------------------------------------- DeepStack in the store


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (the store tests' features are random bit patterns, NaNs included)."""
    return a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def with_deepstack(levels: int = 3):
    """The store tests' record with ``levels`` DeepStack levels beside its features."""
    from test_store import make_record

    record = make_record(num_tokens=40, channels=16, grid=(2, 6, 8))
    n, c = record.tokens.features.shape
    deepstack = torch.randn(levels, n, c, generator=torch.Generator().manual_seed(1)).to(record.tokens.features.dtype)
    return dataclasses.replace(record, deepstack=deepstack)


def test_deepstack_levels_round_trip_bit_exactly_and_are_checksummed(tmp_path):
    store = TokenStore(str(tmp_path))
    record = with_deepstack()
    key = store.write(record)
    read = store.read(record.video_id)
    assert same_bits(read.deepstack, record.deepstack) and same_bits(read.tokens.features, record.tokens.features)
    without = dataclasses.replace(record, video_id="video-2", content_hash=content_hash(b"other bytes"), deepstack=None)
    store.write(without)
    assert store.read("video-2").deepstack is None

    # The same object with other DeepStack bytes of the same size is refused (its page
    # CRC or, past that, the payload checksum, which covers the levels).
    (path,) = [p for p in tmp_path.rglob("*.parquet") if p.name in key]
    data = path.read_bytes()
    flipped = record.deepstack.clone()
    flipped[1, 2, 3] += 1
    old, new = (tensor.contiguous().view(torch.uint8).numpy().tobytes() for tensor in (record.deepstack, flipped))
    assert data.count(old) == 1
    path.write_bytes(data.replace(old, new))
    with pytest.raises(CorruptObjectError, match=key):
        store.read(record.video_id)


def test_token_set_of_an_older_schema_without_deepstack_columns_is_still_read(tmp_path, monkeypatch):
    """Objects of schema 2.0 lack the two optional columns; they read as before."""
    old_schema = dataclasses.replace(
        schemas.TOKEN_SET,
        version="2.0",
        fields=tuple(f for f in schemas.TOKEN_SET.fields if f.name not in ("deepstack_levels", "deepstack")),
    )
    encode = store_module._encode_one_row

    def as_2_0(schema, row, uncompressed=()):
        if schema.name == "token_set":
            schema, row = old_schema, {name: value for name, value in row.items() if name in old_schema.field_names}
        return encode(schema, row, uncompressed)

    store = TokenStore(str(tmp_path))
    record = dataclasses.replace(with_deepstack(), deepstack=None)
    monkeypatch.setattr(store_module, "_encode_one_row", as_2_0)
    key = store.write(record)
    monkeypatch.undo()
    (path,) = [p for p in tmp_path.rglob("*.parquet") if p.name in key]
    written = pq.read_schema(path)
    assert written.metadata[b"sttm.schema_version"] == b"2.0" and "deepstack" not in written.names
    read = store.read(record.video_id)
    assert read.deepstack is None and same_bits(read.tokens.features, record.tokens.features)


# ------------------------------------------------------------------- end to end


def test_qwen3_vl_preprocess_stores_both_samples_with_deepstack_and_visualize_draws_them(ray_cluster, tmp_path):
    """The preprocess job (real local Ray, decode and encode actors) on the bundled videos
    with the tiny Qwen3-VL: every video stored with its DeepStack levels, queryable, and
    drawn by the visualiser (one panel per temporal patch)."""
    from pipeline.config import PreprocessConfig
    from pipeline.run import run_preprocess
    from pipeline.samples import SAMPLE_DIR
    from pipeline.visualize import visualize_stored_video

    store_dir = tmp_path / "store"
    config = PreprocessConfig(input=str(SAMPLE_DIR), output=str(store_dir), model="tiny-random:qwen3-vl", frames=4,
                              progress=False)
    with connected_to(ray_cluster):
        summary = run_preprocess(config)
    assert (summary.stored, summary.failed) == (2, 0), summary.failures

    store = TokenStore(str(store_dir))
    engine = QueryEngine("tiny-random:qwen3-vl")
    levels = len(engine.model.config.vision_config.deepstack_visual_indexes)
    for video_id in ("bigbuckbunny", "bikes"):
        stored = store.read(video_id)
        assert stored.tokens.grid[0] == 2 and stored.num_tokens <= 0.5 * stored.original_tokens
        assert stored.deepstack.shape == (levels, stored.num_tokens, engine.hidden_size)
        assert len(stored.model_extra["frame_seconds"]) == 2
        engine.check(stored)
        assert engine.answer(engine.prefill(stored), QUESTIONS[0], max_new_tokens=2).num_question_tokens > 0
        drawn = visualize_stored_video(str(store_dir), video_id)
        assert [panel.token_frame for panel in drawn.panels] == [0, 1]
