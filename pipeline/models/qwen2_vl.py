"""Qwen2-VL and Qwen2.5-VL adapter.

What the LLM sees for one video, and so what the query stage must build:

- frames at a size in multiples of 28 (``QwenSampling`` already resizes with
  qwen-vl-utils' pixel budget; the video processor's own ``smart_resize`` then leaves
  them as they are), normalized; an odd frame count gets its last frame repeated;
- patches of 2 frames x 14 x 14 px, grid ``video_grid_thw = (t, h, w)`` =
  ``(T/2, H/14, W/14)``; the vision transformer, then the merger, which fuses each 2x2
  block of patches into one token: ``tokens [t, h/2, w/2, C]``;
- in the prompt, ``<|vision_start|>``, then the ``t * h/2 * w/2`` tokens in raster order
  of ``(t, h', w')`` as ``<|video_pad|>`` tokens, then ``<|vision_end|>``.

Positions are 3-D (multimodal RoPE). The full model gives the video token at ``(t, h',
w')`` the position ``(s + t * interval, s + h', s + w')``, where ``s`` is the position
after the text before it, and the text after the video continues at ``s + max(t_last *
interval, h/2 - 1, w/2 - 1) + 1``. ``interval`` is 1 for Qwen2-VL; for Qwen2.5-VL it is
``tokens_per_second * second_per_grid_t`` (seconds of video per temporal patch), which
transformers versions quantize differently (5.17 truncates ``second_per_grid_t`` to an
integer first), so the query stage should get positions from the loaded model's own
``get_rope_index(input_ids, ..., video_grid_thw=[video_grid_thw], second_per_grid_ts=
[second_per_grid_t])`` on the unmerged placeholder sequence. With STTM, each merged
token takes the position of the top-left patch of its root (its ``box[:2]`` at its
``frame``), and the text after the video keeps the positions of the unmerged sequence
(STTM_SPEC section 5).

Everything else about the family lives here too: ``QwenVLLayout`` (the query stage's
prompt and positions), and the ``tiny-random:qwen2-vl`` / ``tiny-random:qwen2.5-vl``
builders.

``model_extra``: ``video_grid_thw``, ``spatial_merge_size``, ``temporal_patch_size``,
``second_per_grid_t``, ``tokens_per_second`` (Qwen2.5-VL; ``None`` for Qwen2-VL),
``frame_size`` ``[H, W]`` fed to the tower, ``num_padded_frames``, and the ids of
``<|video_pad|>``, ``<|vision_start|>``, ``<|vision_end|>``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLPreTrainedModel,
)
from transformers.models.qwen2_vl.modeling_qwen2_vl import (
    Qwen2VisionTransformerPretrainedModel,
    Qwen2VLPreTrainedModel,
)

from pipeline.decode import DecodedVideo, QwenSampling, smart_resize
from pipeline.models.base import (
    CLIP_PIXEL_DEFAULTS,
    EncodedVideo,
    IncompatibleTokenSetError,
    PrefixLayout,
    PromptLayout,
    VideoAdapter,
    normalize_frames,
    resize_like_video_processor,
)
from pipeline.models.tiny_random import (
    PIXEL_SETTINGS,
    QWEN_SPECIAL_TOKENS,
    SEED,
    TEXT_SIZES,
    VOCAB_SIZE,
    save,
    train_tokenizer,
)

# Qwen2VLVideoProcessor's class defaults, for settings a checkpoint leaves out.
VIDEO_PROCESSOR_DEFAULTS = dict(
    size={"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768},
    **CLIP_PIXEL_DEFAULTS,
    patch_size=14,
    temporal_patch_size=2,
    merge_size=2,
    cap_pixels_per_frame=False,
    max_video_tokens=128000,
)


def _vision_stage_class(pretrained_class, vision_class):
    """The vision side of a Qwen VL model (``model.visual``: patch embedding, blocks,
    merger) under its own attribute name, so ``from_pretrained`` reads exactly those
    tensors and never the language model's."""

    class VisionStage(pretrained_class):
        _keys_to_ignore_on_load_unexpected = [r"^(?!visual\.)"]

        def __init__(self, config):
            super().__init__(config)
            self.visual = vision_class._from_config(config.vision_config)
            self.post_init()

    VisionStage.__name__ = VisionStage.__qualname__ = f"{vision_class.__name__}Stage"
    return VisionStage


_VISION_STAGES = {
    "qwen2_vl": ("qwen2-vl", _vision_stage_class(Qwen2VLPreTrainedModel, Qwen2VisionTransformerPretrainedModel)),
    "qwen2_5_vl": (
        "qwen2.5-vl",
        _vision_stage_class(Qwen2_5_VLPreTrainedModel, Qwen2_5_VisionTransformerPretrainedModel),
    ),
}


MODEL_TYPES = tuple(_VISION_STAGES)


class Qwen2VLAdapter(VideoAdapter):
    def __init__(self, model_id: str, model_path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        self.family, stage_class = _VISION_STAGES[AutoConfig.from_pretrained(model_path).model_type]
        self._load(model_id, model_path, stage_class, VIDEO_PROCESSOR_DEFAULTS, device, dtype)

    def default_sampling(self) -> QwenSampling:
        """qwen-vl-utils' recipe: 2 fps, 4 to 768 frames, per-video pixel budget."""
        return QwenSampling(
            temporal_patch_size=self.settings["temporal_patch_size"],
            spatial_factor=self.settings["patch_size"] * self.settings["merge_size"],
        )

    def preprocess(self, video: DecodedVideo) -> dict[str, torch.Tensor]:
        """What Qwen2VLVideoProcessor returns: ``pixel_values_videos`` float32
        ``[t * h * w, 3 * 2 * 14 * 14]`` (patches in the order the merger expects: each 2x2
        block of patches consecutive, blocks in raster order) and ``video_grid_thw``
        ``[[t, h, w]]``."""
        patch, merge, temporal = (self.settings[key] for key in ("patch_size", "merge_size", "temporal_patch_size"))
        frames = video.frames.permute(0, 3, 1, 2).contiguous()  # [T, 3, H, W]
        size = smart_resize(*frames.shape[-2:], patch * merge, *self._pixel_bounds(len(frames)))
        frames = resize_like_video_processor(frames, size)
        pixels = normalize_frames(frames, self.settings)
        if pad := -len(pixels) % temporal:
            pixels = torch.cat([pixels, pixels[-1:].expand(pad, -1, -1, -1)])
        channels, height, width = pixels.shape[1:]
        grid_t, grid_h, grid_w = len(pixels) // temporal, height // patch, width // patch
        patches = pixels.view(grid_t, temporal, channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
        patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return {
            "pixel_values_videos": patches.reshape(grid_t * grid_h * grid_w, channels * temporal * patch * patch),
            "video_grid_thw": torch.tensor([[grid_t, grid_h, grid_w]]),
        }

    def _pixel_bounds(self, num_frames: int) -> tuple[int, int]:
        """(min, max) pixels per frame of the video processor's resize."""
        size = self.settings["size"]
        min_pixels = self.settings.get("min_pixels") or size["shortest_edge"]
        max_pixels = self.settings.get("max_pixels") or size["longest_edge"]
        if self.settings["cap_pixels_per_frame"]:  # newer transformers' optional per-video budget
            factor = self.settings["patch_size"] * self.settings["merge_size"]
            total_pixels = int(self.settings["max_video_tokens"] * factor * factor * 0.9)
            budget = total_pixels * self.settings["temporal_patch_size"] // num_frames
            max_pixels = max(min(max_pixels, budget), int(min_pixels * 1.05))
        return min_pixels, max_pixels

    @torch.no_grad()
    def encode(self, video: DecodedVideo) -> EncodedVideo:
        inputs = self.preprocess(video)
        grid_thw = inputs["video_grid_thw"]
        merge, temporal = self.settings["merge_size"], self.settings["temporal_patch_size"]
        output = self.stage.visual(
            inputs["pixel_values_videos"].to(self.device, self.dtype), grid_thw=grid_thw.to(self.device)
        )
        grid_t, grid_h, grid_w = grid_thw[0].tolist()
        tokens = output.pooler_output.view(grid_t, grid_h // merge, grid_w // merge, -1)
        config = self.stage.config
        return EncodedVideo(
            tokens=tokens,
            model_extra={
                "video_grid_thw": [grid_t, grid_h, grid_w],
                "spatial_merge_size": merge,
                "temporal_patch_size": temporal,
                "second_per_grid_t": temporal / video.sampled_fps,
                "tokens_per_second": getattr(config.vision_config, "tokens_per_second", None),
                "frame_size": [grid_h * self.settings["patch_size"], grid_w * self.settings["patch_size"]],
                "num_padded_frames": grid_t * temporal - len(video.frames),
                "video_token_id": config.video_token_id,
                "vision_start_token_id": config.vision_start_token_id,
                "vision_end_token_id": config.vision_end_token_id,
            },
        )


class QwenVLLayout(PromptLayout):
    """The prompt around ``N`` merged tokens: they replace the video's ``t * h * w``
    ``<|video_pad|>`` tokens (between ``<|vision_start|>`` and ``<|vision_end|>``, which the
    chat template writes around the placeholder), at 3-D multimodal positions
    (``[3, 1, L]``): each merged token takes the position the model's own
    ``get_rope_index`` gives the top-left patch of its root in the full, unmerged video,
    and the text after the video keeps its full-video positions, so they follow whatever
    the installed transformers version computes (STTM_SPEC section 5)."""

    def check(self, stored) -> None:
        t, h, w = stored.tokens.grid
        merge = self.config.vision_config.spatial_merge_size
        grid_thw = stored.model_extra.get("video_grid_thw")
        if grid_thw != [t, h * merge, w * merge]:
            raise IncompatibleTokenSetError(
                f"video {stored.video_id!r}: model_extra video_grid_thw {grid_thw} does not match the token grid "
                f"{[t, h, w]} with spatial merge {merge}"
            )

    def prefix(self, stored, text_before_video: list[int]) -> PrefixLayout:
        """The model's own ``get_rope_index`` runs on the unmerged sequence (text before the
        video, ``T*H*W`` video placeholders, one text token); each merged token takes the
        position of its root's top-left patch, and the text after the video starts where the
        unmerged sequence's text would."""
        extra = stored.model_extra
        t, h, w = stored.tokens.grid
        before = len(text_before_video)
        # One text token after the video (which one does not matter) shows where text resumes.
        input_ids = torch.tensor([list(text_before_video) + [self.config.video_token_id] * (t * h * w) + [0]])
        token_types = torch.zeros_like(input_ids, dtype=torch.int32)
        token_types[0, before : before + t * h * w] = 2  # transformers' mm_token_type_ids: 2 = video
        rope_inputs = dict(mm_token_type_ids=token_types, video_grid_thw=torch.tensor([extra["video_grid_thw"]]))
        if self.config.model_type == "qwen2_5_vl":  # absolute-time temporal positions
            rope_inputs["second_per_grid_ts"] = torch.tensor([extra["second_per_grid_t"]])
        full_positions, _ = self.model.model.get_rope_index(input_ids, **rope_inputs)  # [3, 1, before + T*H*W + 1]

        tokens = stored.tokens
        root_patch = (tokens.frame.long() * h + tokens.box[:, 0].long()) * w + tokens.box[:, 1].long()  # [N]
        keep = torch.cat([torch.arange(before), before + root_patch])
        features = tokens.features.to(self.model.device, self.model.dtype)
        return PrefixLayout(
            embeds=torch.cat([self.embed(text_before_video), features]),
            position_ids=full_positions[:, :, keep].to(self.model.device),
            text_position=int(full_positions[0, 0, -1]),
        )

    def text_positions(self, start: int, count: int) -> torch.Tensor:
        return torch.arange(start, start + count, device=self.model.device)[None, None].expand(3, 1, count)


# --- tiny-random:qwen2-vl, tiny-random:qwen2.5-vl -------------------------------------------

# The chat template of the Qwen2-VL / Qwen2.5-VL Instruct checkpoints.
_QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _build_qwen(config_class, model_class, processor_class: str, vision_config: dict, directory: Path) -> None:
    """A Qwen2-VL-style model: the processor settings live in ``preprocessor_config.json``
    alone, as on the hub, and the video processor reads them from there."""
    tokenizer = train_tokenizer(
        QWEN_SPECIAL_TOKENS,
        _QWEN_CHAT_TEMPLATE,
        image_token="<|image_pad|>",
        video_token="<|video_pad|>",
        vision_start_token="<|vision_start|>",
        vision_end_token="<|vision_end|>",
    )
    head_dim = TEXT_SIZES["hidden_size"] // TEXT_SIZES["num_attention_heads"]
    rope = {
        "rope_type": "default",
        "rope_theta": 1e6,
        "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16],
    }
    config = config_class(
        text_config=dict(
            vocab_size=VOCAB_SIZE,
            rope_parameters=rope,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **TEXT_SIZES,
        ),
        vision_config=dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, **vision_config),
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )
    torch.manual_seed(SEED)
    model = model_class(config)
    save(
        model,
        tokenizer,
        directory,
        preprocessor_config=dict(
            image_processor_type="Qwen2VLImageProcessor",
            processor_class=processor_class,
            min_pixels=56 * 56,
            max_pixels=28 * 28 * 16384,
            patch_size=14,
            temporal_patch_size=2,
            merge_size=2,
            image_mean=list(OPENAI_CLIP_MEAN),
            image_std=list(OPENAI_CLIP_STD),
            **PIXEL_SETTINGS,
        ),
    )


def _build_qwen2_vl(directory: Path) -> None:
    """Qwen2VLForConditionalGeneration: ViT with 2-D rotary positions, 2x2 patch merger."""
    _build_qwen(
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        "Qwen2VLProcessor",
        dict(depth=2, embed_dim=32, hidden_size=TEXT_SIZES["hidden_size"], num_heads=2, mlp_ratio=2),
        directory,
    )


def _build_qwen2_5_vl(directory: Path) -> None:
    """Qwen2_5_VLForConditionalGeneration: window-attention ViT (one full-attention block),
    2x2 patch merger, absolute-time temporal positions."""
    _build_qwen(
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        "Qwen2_5_VLProcessor",
        dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=TEXT_SIZES["hidden_size"],
            window_size=112,
            fullatt_block_indexes=[1],
            tokens_per_second=2,
        ),
        directory,
    )


ADAPTER = Qwen2VLAdapter
LAYOUT = QwenVLLayout
TINY_RANDOM = {"qwen2-vl": _build_qwen2_vl, "qwen2.5-vl": _build_qwen2_5_vl}
