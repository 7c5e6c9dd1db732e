"""Encode stage: each adapter's tokens are exactly what the full model feeds its LLM.

Tiny random models of the real architectures are built into a fresh cache, saved and
loaded through the normal ``from_pretrained`` path (``HF_HUB_OFFLINE=1``, set in
conftest). The full model is the reference: its ``get_video_features`` and, one level
up, the embeddings and 3-D positions its forward pass hands the language model.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoTokenizer

from pipeline.decode import DecodedVideo, QwenSampling, UniformSampling, decode_video
from pipeline.models import TINY_RANDOM_NAMES, UnsupportedModelError, load_adapter, resolve_model
from pipeline.models.tiny_random import TINY_RANDOM_VERSION
from pipeline.samples import SAMPLE_DIR

FAMILIES = list(TINY_RANDOM_NAMES)  # every family's tiny-random models, from the registry
QWEN_FAMILIES = ["qwen2-vl", "qwen2.5-vl"]


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """Every tiny model built once, into a cache of this test session's own."""
    with pytest.MonkeyPatch.context() as patch:
        cache = tmp_path_factory.mktemp("sttm-cache")
        patch.setenv("STTM_CACHE", str(cache))
        yield {family: Path(resolve_model(f"tiny-random:{family}")) for family in FAMILIES}


@pytest.fixture(scope="session")
def adapters(model_cache):
    return {family: load_adapter(f"tiny-random:{family}") for family in FAMILIES}


@pytest.fixture(scope="session")
def full_models(model_cache):
    return {family: AutoModelForImageTextToText.from_pretrained(path).eval() for family, path in model_cache.items()}


@pytest.fixture(scope="session")
def bikes():
    """All 250 frames of the bikes clip (640x272), to cut test videos from."""
    return decode_video(str(SAMPLE_DIR / "bikes.mp4"), UniformSampling(250))


def clip(video: DecodedVideo, num_frames: int, height: int, width: int) -> DecodedVideo:
    """``num_frames`` frames of ``video``, 3 frames apart, cropped to ``height x width``."""
    indices = list(range(0, 3 * num_frames, 3))
    return dataclasses.replace(
        video,
        frames=video.frames[indices, :height, :width].contiguous(),
        frame_indices=[video.frame_indices[i] for i in indices],
        timestamps=[video.timestamps[i] for i in indices],
    )


def reference_tokens(full_model, inputs: dict) -> torch.Tensor:
    """The full model's ``get_video_features`` rows ``[N, C]`` for one video: LLaVA-OneVision
    returns ``[1, N (+1 newline in newer transformers), C]``, Qwen a tuple of ``[N, C]``."""
    pixels, grid = inputs["pixel_values_videos"], {k: v for k, v in inputs.items() if k != "pixel_values_videos"}
    with torch.no_grad():  # pixels go in by position: transformers versions name that argument differently
        features = full_model.get_video_features(pixels, **grid).pooler_output
    return torch.cat(list(features)) if isinstance(features, (tuple, list)) else features[0]


# --- the tokens ---------------------------------------------------------------------------

# (frames, height, width): odd and even frame counts and sizes
LLAVA_CASES = [(1, 272, 640), (2, 271, 479), (3, 200, 200)]
# Qwen: 84x140 and 112x168 are already multiples of 28 (merged grids 3x5 and 4x6); 100x150
# is not, so the video processor's own resize runs; odd frame counts get padded.
QWEN_CASES = [(4, 84, 140), (3, 112, 168), (2, 100, 150), (1, 84, 84)]


@pytest.mark.parametrize("num_frames, height, width", LLAVA_CASES)
def test_llava_onevision_tokens_equal_get_video_features(adapters, full_models, bikes, num_frames, height, width):
    adapter, full = adapters["llava-onevision"], full_models["llava-onevision"]
    video = clip(bikes, num_frames, height, width)
    encoded = adapter.encode(video)
    assert encoded.tokens.shape == (num_frames, 14, 14, adapter.hidden_size)
    assert encoded.tokens.dtype == adapter.dtype == torch.float32

    reference = reference_tokens(full, adapter.preprocess(video))
    count = num_frames * 14 * 14
    assert torch.equal(encoded.tokens.reshape(count, -1), reference[:count])
    # transformers versions that append the video's newline inside get_video_features
    assert all(torch.equal(row, full.model.image_newline) for row in reference[count:])
    assert len(reference) - count in (0, 1)
    assert encoded.model_extra == {
        "grid_thw": [num_frames, 14, 14],
        "frame_size": [384, 384],
        "video_token_id": full.config.video_token_id,
        "newline": "after_video",
        "num_newline_tokens": 1,
    }


@pytest.mark.parametrize("family", QWEN_FAMILIES)
@pytest.mark.parametrize("num_frames, height, width", QWEN_CASES)
def test_qwen_tokens_equal_get_video_features(adapters, full_models, bikes, family, num_frames, height, width):
    adapter, full = adapters[family], full_models[family]
    video = clip(bikes, num_frames, height, width)
    encoded = adapter.encode(video)
    grid_t, grid_h, grid_w = encoded.model_extra["video_grid_thw"]
    assert grid_t == (num_frames + 1) // 2 and grid_h * 14 >= 56 and grid_w * 14 >= 56
    assert encoded.tokens.shape == (grid_t, grid_h // 2, grid_w // 2, adapter.hidden_size)
    assert encoded.model_extra["num_padded_frames"] == num_frames % 2
    assert encoded.model_extra["frame_size"] == [grid_h * 14, grid_w * 14]
    if (height, width) == (100, 150):
        assert encoded.model_extra["frame_size"] == [112, 140]  # the processor's smart_resize

    reference = reference_tokens(full, adapter.preprocess(video))
    assert torch.equal(encoded.tokens.reshape(-1, adapter.hidden_size), reference)


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_qwen_tokens_of_the_model_recipe_equal_get_video_features(adapters, full_models, family):
    """The whole path: the model's own sampling (fps and pixel budget), then encoding."""
    adapter = adapters[family]
    recipe = dataclasses.replace(adapter.default_sampling(), fps=0.5, max_pixels=128 * 28 * 28)
    video = decode_video(str(SAMPLE_DIR / "bigbuckbunny.mp4"), recipe)
    encoded = adapter.encode(video)
    assert torch.equal(
        encoded.tokens.reshape(-1, adapter.hidden_size),
        reference_tokens(full_models[family], adapter.preprocess(video)),
    )
    assert encoded.model_extra["second_per_grid_t"] == pytest.approx(2 / video.sampled_fps)


# --- what the language model receives -------------------------------------------------------


def language_model_inputs(full_model, **model_inputs):
    """The ``inputs_embeds`` (and keyword arguments) the full model hands its language model."""
    captured = {}

    def capture(module, args, kwargs):
        captured.update(kwargs)
        raise _Captured

    hook = full_model.model.language_model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad(), pytest.raises(_Captured):
            full_model.model(**model_inputs)
    finally:
        hook.remove()
    return captured


class _Captured(Exception):
    pass


def test_llava_onevision_llm_sees_frames_in_raster_order_then_one_newline(adapters, full_models, model_cache, bikes):
    adapter, full = adapters["llava-onevision"], full_models["llava-onevision"]
    video = clip(bikes, 2, 272, 640)
    encoded = adapter.encode(video)
    tokenizer = AutoTokenizer.from_pretrained(model_cache["llava-onevision"])
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What is happening?"}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    # the processor's expansion: one <video> becomes T*14*14 + 1 video tokens
    count = encoded.tokens.shape[:3].numel() + encoded.model_extra["num_newline_tokens"]
    input_ids = tokenizer(
        prompt.replace(tokenizer.video_token, tokenizer.video_token * count), return_tensors="pt"
    ).input_ids
    embeds = language_model_inputs(full, input_ids=input_ids, **adapter.preprocess(video))["inputs_embeds"][0]

    video_rows = embeds[input_ids[0] == encoded.model_extra["video_token_id"]]
    expected = torch.cat([encoded.tokens.reshape(-1, adapter.hidden_size), adapter.stage.image_newline[None]])
    assert torch.equal(video_rows, expected)


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_qwen_llm_sees_tokens_in_raster_order_with_their_3d_positions(
    adapters, full_models, model_cache, bikes, family
):
    adapter, full = adapters[family], full_models[family]
    video = clip(bikes, 4, 84, 140)
    encoded = adapter.encode(video)
    extra = encoded.model_extra
    tokenizer = AutoTokenizer.from_pretrained(model_cache[family])
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What is happening?"}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    count = encoded.tokens.shape[:3].numel()
    input_ids = tokenizer(
        prompt.replace(tokenizer.video_token, tokenizer.video_token * count), return_tensors="pt"
    ).input_ids
    is_video = input_ids[0] == extra["video_token_id"]
    mm_token_type_ids = is_video.long()[None] * 2  # the processor's marks: 2 = video
    inputs = adapter.preprocess(video)
    timing = {"second_per_grid_ts": torch.tensor([extra["second_per_grid_t"]])} if family == "qwen2.5-vl" else {}

    embeds = language_model_inputs(full, input_ids=input_ids, mm_token_type_ids=mm_token_type_ids, **inputs, **timing)[
        "inputs_embeds"
    ][0]
    assert torch.equal(embeds[is_video], encoded.tokens.reshape(count, -1))

    # The model's 3-D positions for the video tokens: token (t, h, w) of the raster order
    # sits at (start + t * interval, start + h, start + w).
    positions, _ = full.model.get_rope_index(
        input_ids, mm_token_type_ids=mm_token_type_ids, video_grid_thw=inputs["video_grid_thw"], **timing
    )
    video_positions = positions[:, 0, is_video].T.reshape(*encoded.tokens.shape[:3], 3)
    start = int(positions[0, 0, is_video.nonzero()[0, 0] - 1]) + 1
    t_grid, h_grid, w_grid = torch.meshgrid(*(torch.arange(n) for n in encoded.tokens.shape[:3]), indexing="ij")
    assert torch.equal(video_positions[..., 1], start + h_grid)
    assert torch.equal(video_positions[..., 2], start + w_grid)
    temporal = video_positions[..., 0]
    assert torch.equal(temporal, temporal[:, :1, :1].expand_as(temporal))  # one time per frame group
    if family == "qwen2-vl":
        assert torch.equal(temporal, start + t_grid)
    else:
        assert bool((temporal[1:, 0, 0] > temporal[:-1, 0, 0]).all())


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_qwen_token_comes_from_its_own_block_of_pixels(adapters, bikes, family):
    """Token (t, h, w) of the raster order is built from frames 2t, 2t+1 and the 28x28 px
    block at (28h, 28w): changing that block changes exactly the 4 patch embeddings the
    merger fuses into that token (checked before attention mixes them)."""
    adapter = adapters[family]
    video = clip(bikes, 4, 84, 140)  # merged grid 2 x 3 x 5
    t, h, w = 1, 2, 3
    changed_frames = video.frames.clone()
    changed_frames[2 * t : 2 * t + 2, 28 * h : 28 * h + 28, 28 * w : 28 * w + 28] ^= 0x55
    changed = dataclasses.replace(video, frames=changed_frames)

    embeddings = []
    hook = adapter.stage.visual.patch_embed.register_forward_hook(
        lambda module, args, output: embeddings.append(output)
    )
    try:
        adapter.encode(video)
        adapter.encode(changed)
    finally:
        hook.remove()
    differing_rows = (embeddings[0] != embeddings[1]).any(dim=1).nonzero().flatten().tolist()
    token = (t * 3 + h) * 5 + w
    assert differing_rows == [4 * token + i for i in range(4)]


# --- loading --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_holds_only_the_vision_side_with_the_full_models_weights(adapters, full_models, family):
    stage, full = adapters[family].stage, full_models[family]
    names = set(stage.state_dict())
    assert not any(re.search(r"language_model|lm_head|embed_tokens", name) for name in names)
    full_weights = {name.removeprefix("model."): tensor for name, tensor in full.state_dict().items()}
    assert all(torch.equal(tensor, full_weights[name]) for name, tensor in stage.state_dict().items())
    # Nothing of the LLM (decoder, output head) is loaded beside the vision side.
    llm = sum(p.numel() for p in full.model.language_model.parameters()) + full.lm_head.weight.numel()
    assert sum(p.numel() for p in stage.parameters()) <= sum(p.numel() for p in full.parameters()) - llm


# How checkpoints name their tensors: as the model classes do in memory (transformers 5),
# and as the hub checkpoints do (written before transformers 5). Loading maps both.
HUB_KEY_RENAMES = {
    "llava-onevision": [
        (r"^model\.vision_tower\.(vision_model\.)?", "vision_tower.vision_model."),
        (r"^model\.language_model\.", "language_model.model."),
        (r"^lm_head\.", "language_model.lm_head."),
        (r"^model\.", ""),
    ],
    "qwen2-vl": [(r"^model\.visual\.", "visual."), (r"^model\.language_model\.", "model.")],
    "qwen2.5-vl": [(r"^model\.visual\.", "visual."), (r"^model\.language_model\.", "model.")],
    "qwen3-vl": [],  # the hub checkpoints use the in-memory names
    "qwen3-vl-moe": [],
    "qwen3.5": [],  # as Qwen3-VL (the hub checkpoints' extra `mtp.*` weights are not the vision side's)
    "qwen3.5-moe": [],
}


def save_in_layout(full_model, source: Path, target: Path, renames: list[tuple[str, str]]) -> None:
    """``source``'s checkpoint with its weights written under renamed keys."""
    shutil.copytree(source, target)
    tensors = {}
    for name, tensor in full_model.state_dict().items():
        for pattern, replacement in renames:
            name, hits = re.subn(pattern, replacement, name)
            if hits:
                break
        tensors[name] = tensor.contiguous()
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("layout", ["in-memory names", "hub names"])
@pytest.mark.parametrize("family", FAMILIES)
def test_both_checkpoint_layouts_give_the_same_tokens_and_fingerprint(
    adapters, full_models, model_cache, bikes, tmp_path, family, layout
):
    renames = HUB_KEY_RENAMES[family] if layout == "hub names" else []
    save_in_layout(full_models[family], model_cache[family], tmp_path / "checkpoint", renames)
    names = load_file(tmp_path / "checkpoint" / "model.safetensors")
    assert any(name.startswith("model.") for name in names) == (
        layout == "in-memory names" or family != "llava-onevision"
    )
    reloaded = load_adapter(str(tmp_path / "checkpoint"))
    video = clip(bikes, 2, 112, 168)
    assert torch.equal(reloaded.encode(video).tokens, adapters[family].encode(video).tokens)
    assert reloaded.fingerprint == adapters[family].fingerprint


@pytest.mark.parametrize("family", FAMILIES)
def test_fingerprint_follows_vision_weights_and_processor_settings_only(adapters, model_cache, tmp_path, family):
    path = model_cache[family]
    assert load_adapter(str(path)).fingerprint == adapters[family].fingerprint
    assert adapters[family].fingerprint.startswith("sha256:")

    def edited_copy(name, edit_tensors=None, edit_json=None):
        copy = tmp_path / name
        shutil.copytree(path, copy)
        if edit_tensors:
            tensors = load_file(copy / "model.safetensors")
            edit_tensors(tensors)
            save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
        if edit_json:
            config_path = copy / "preprocessor_config.json"
            config_path.write_text(json.dumps(edit_json(json.loads(config_path.read_text()))))
            (copy / "video_preprocessor_config.json").unlink(missing_ok=True)
        return load_adapter(str(copy)).fingerprint

    def bump_vision_weight(tensors):
        name = next(n for n in sorted(tensors) if re.search(r"vision_tower|visual", n) and n.endswith("weight"))
        tensors[name] = tensors[name] + 1

    def bump_language_weight(tensors):
        name = next(
            n for n in sorted(tensors) if not re.search(r"vision_tower|visual|multi_modal_projector|newline", n)
        )
        tensors[name] = tensors[name] + 1

    assert edited_copy("vision", edit_tensors=bump_vision_weight) != adapters[family].fingerprint
    assert edited_copy("language", edit_tensors=bump_language_weight) == adapters[family].fingerprint
    assert edited_copy("mean", edit_json=lambda c: {**c, "image_mean": [0.4, 0.4, 0.4]}) != adapters[family].fingerprint


def test_tiny_random_models_rebuild_identically(model_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("STTM_CACHE", str(tmp_path))
    for family, first_build in model_cache.items():
        rebuilt = Path(resolve_model(f"tiny-random:{family}"))
        assert rebuilt == tmp_path / "tiny-random" / f"{family}-v{TINY_RANDOM_VERSION}"
        for name in ("model.safetensors", "tokenizer.json", "config.json"):
            assert (rebuilt / name).read_bytes() == (first_build / name).read_bytes(), (family, name)


@pytest.mark.parametrize(
    "family, placeholder",
    [
        ("llava-onevision", "<video>"),
        ("qwen2-vl", "<|vision_start|><|video_pad|><|vision_end|>"),
        ("qwen2.5-vl", "<|vision_start|><|video_pad|><|vision_end|>"),
    ],
)
def test_tiny_tokenizer_carries_the_family_chat_template_and_video_token(model_cache, full_models, family, placeholder):
    tokenizer = AutoTokenizer.from_pretrained(model_cache[family])
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Describe the video."}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert placeholder in prompt and prompt.endswith("<|im_start|>assistant\n")
    assert tokenizer.convert_tokens_to_ids(tokenizer.video_token) == full_models[family].config.video_token_id
    assert len(tokenizer(placeholder).input_ids) == placeholder.count("<")  # special tokens stay whole


def test_default_sampling_is_the_family_recipe(adapters):
    assert adapters["llava-onevision"].default_sampling() == UniformSampling(32)
    assert adapters["qwen2-vl"].default_sampling() == QwenSampling(temporal_patch_size=2, spatial_factor=28)
    assert adapters["qwen2.5-vl"].family == "qwen2.5-vl" and adapters["qwen2-vl"].family == "qwen2-vl"


def test_unknown_models_are_refused(model_cache, tmp_path):
    with pytest.raises(ValueError, match="unknown tiny-random family"):
        resolve_model("tiny-random:gpt-2")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UnsupportedModelError, match="llama"):
        load_adapter(str(tmp_path))
