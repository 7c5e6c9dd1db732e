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

``model_extra``: ``video_grid_thw``, ``spatial_merge_size``, ``temporal_patch_size``,
``second_per_grid_t``, ``tokens_per_second`` (Qwen2.5-VL; ``None`` for Qwen2-VL),
``frame_size`` ``[H, W]`` fed to the tower, ``num_padded_frames``, and the ids of
``<|video_pad|>``, ``<|vision_start|>``, ``<|vision_end|>``.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLPreTrainedModel,
)
from transformers.models.qwen2_vl.modeling_qwen2_vl import (
    Qwen2VisionTransformerPretrainedModel,
    Qwen2VLPreTrainedModel,
)

from pipeline.decode import DecodedVideo, QwenSampling, smart_resize
from pipeline.models.base import CLIP_PIXEL_DEFAULTS, EncodedVideo, VideoAdapter, normalize_frames, resize_like_video_processor
from pipeline.models.tiny_random import resolve_model

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


class Qwen2VLAdapter(VideoAdapter):
    model_types = tuple(_VISION_STAGES)

    def __init__(self, model_id: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        self.family, stage_class = _VISION_STAGES[AutoConfig.from_pretrained(resolve_model(model_id)).model_type]
        self._load(model_id, stage_class, VIDEO_PROCESSOR_DEFAULTS, device, dtype)

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
