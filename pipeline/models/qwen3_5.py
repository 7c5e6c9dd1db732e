"""Qwen3.5 family (``qwen3_5``, ``qwen3_5_moe``).

Its video path is Qwen3-VL's (transformers maps both model types to ``Qwen3VLProcessor``
and ``Qwen3VLVideoProcessor``, and ``Qwen3_5Model.get_rope_index`` is Qwen3-VL's, line for
line), so sampling, pixels, the prompt and the positions are those of ``qwen3_vl``, and
this module takes them from there:

- frames sampled at 2 fps, one size per clip from a pixel budget over all frames,
  normalized (mean = std = 0.5), an odd count padded with the last frame; patches of
  2 frames x 16 x 16 px, a 2x2 merger: ``tokens [t, h/2, w/2, C]``;
- in the prompt, per temporal patch: ``<{seconds:.1f} seconds>``, ``<|vision_start|>``,
  that row's tokens, ``<|vision_end|>``; 3-D interleaved positions from ``get_rope_index``
  (each frame block an image of one temporal step).

What differs from Qwen3-VL:

- no DeepStack: ``Qwen3_5VisionModel`` returns only the merged tokens
  (``pooler_output``), so nothing is stored beside them and nothing is added inside the
  LLM;
- the decoder: three of every four layers are Gated DeltaNet linear attention, whose
  cache (transformers' ``LinearAttentionLayer``) is a convolution window and a recurrent
  state per sequence, not keys and values. A crop cannot undo a recurrent update, and a
  sequence of packed questions would run one question's tokens through another's state,
  so the layout says ``recurrent_state = True``: the query stage keeps the state after
  the prefix untouched and answers every question from a copy of it, one batch row per
  question (``pipeline.query``);
- the rotary embedding covers a quarter of each head (``partial_rotary_factor``), still
  3-D interleaved; transformers applies it from the same ``[3, 1, L]`` positions.

After STTM the prompt and positions are built as for Qwen3-VL (STTM_SPEC section 5): each
frame keeps its timestamp and markers, merged tokens sit in their root frame's block at
the unmerged position of their root's top-left patch.

``model_extra``: as Qwen3-VL's, with ``num_deepstack_levels`` 0.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeConfig,
    Qwen3_5MoeForConditionalGeneration,
)
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5PreTrainedModel, Qwen3_5VisionModel
from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import (
    Qwen3_5MoePreTrainedModel,
    Qwen3_5MoeVisionModel,
)

from pipeline.decode import DecodedVideo
from pipeline.models.base import EncodedVideo, IncompatibleTokenSetError
from pipeline.models.qwen3_vl import (
    VIDEO_PROCESSOR_DEFAULTS,
    Qwen3VLAdapter,
    Qwen3VLLayout,
    _vision_stage_class,
    frame_seconds,
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

_VISION_STAGES = {
    "qwen3_5": ("qwen3.5", _vision_stage_class(Qwen3_5PreTrainedModel, Qwen3_5VisionModel)),
    "qwen3_5_moe": ("qwen3.5-moe", _vision_stage_class(Qwen3_5MoePreTrainedModel, Qwen3_5MoeVisionModel)),
}
MODEL_TYPES = tuple(_VISION_STAGES)


class Qwen3_5Adapter(Qwen3VLAdapter):
    """Qwen3-VL's preprocessing and sampling (the same video processor); the vision
    model has no DeepStack mergers."""

    def __init__(self, model_id: str, model_path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        self.family, stage_class = _VISION_STAGES[AutoConfig.from_pretrained(model_path).model_type]
        self._load(model_id, model_path, stage_class, VIDEO_PROCESSOR_DEFAULTS, device, dtype)

    @torch.no_grad()
    def encode(self, video: DecodedVideo) -> EncodedVideo:
        inputs = self.preprocess(video)
        grid_thw = inputs["video_grid_thw"]
        merge, temporal = self.settings["merge_size"], self.settings["temporal_patch_size"]
        output = self.stage.visual(
            inputs["pixel_values_videos"].to(self.device, self.dtype), grid_thw=grid_thw.to(self.device)
        )
        grid_t, grid_h, grid_w = grid_thw[0].tolist()
        config = self.stage.config
        return EncodedVideo(
            tokens=output.pooler_output.view(grid_t, grid_h // merge, grid_w // merge, -1),
            model_extra={
                "video_grid_thw": [grid_t, grid_h, grid_w],
                "spatial_merge_size": merge,
                "temporal_patch_size": temporal,
                "frame_seconds": frame_seconds(video.frame_indices, video.fps, temporal),
                "frame_size": [grid_h * self.settings["patch_size"], grid_w * self.settings["patch_size"]],
                "num_padded_frames": grid_t * temporal - len(video.frames),
                "num_deepstack_levels": 0,
                "video_token_id": config.video_token_id,
                "vision_start_token_id": config.vision_start_token_id,
                "vision_end_token_id": config.vision_end_token_id,
            },
        )


class Qwen3_5Layout(Qwen3VLLayout):
    """Qwen3-VL's prompt and positions, without DeepStack; the decoder keeps a recurrent
    state, so questions are answered from copies of the prefix's state."""

    recurrent_state = True

    def check(self, stored) -> None:
        t, h, w = stored.tokens.grid
        merge = self.config.vision_config.spatial_merge_size
        extra = stored.model_extra
        if extra.get("video_grid_thw") != [t, h * merge, w * merge] or len(extra.get("frame_seconds", ())) != t:
            raise IncompatibleTokenSetError(
                f"video {stored.video_id!r}: model_extra video_grid_thw {extra.get('video_grid_thw')} and "
                f"{len(extra.get('frame_seconds', ()))} frame times do not match the token grid {[t, h, w]} with "
                f"spatial merge {merge}"
            )
        if stored.deepstack is not None:
            raise IncompatibleTokenSetError(
                f"video {stored.video_id!r}: {stored.model_id} has no DeepStack levels, but the token set stores "
                f"{stored.deepstack.shape[0]}"
            )


# --- tiny-random:qwen3.5 --------------------------------------------------------------------

# The Qwen3-VL Instruct chat template's shape, for one video (the Qwen3.5 hub template adds
# thinking and tool sections, which a video question does not reach).
_QWEN3_5_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _build_qwen3_5(directory: Path, config_class=Qwen3_5Config, model_class=Qwen3_5ForConditionalGeneration,
                   **text_sizes) -> None:
    """Qwen3_5ForConditionalGeneration: Qwen3-VL's vision side without DeepStack (16 px
    patches, 2x2 merger); a decoder of 4 layers, linear attention (Gated DeltaNet) in
    the first three and full attention in the last, as in the hub checkpoints' pattern;
    interleaved multimodal rotary positions on a quarter of each head... here a half, so
    that every axis gets frequencies at this tiny head size."""
    tokenizer = train_tokenizer(
        QWEN_SPECIAL_TOKENS,
        _QWEN3_5_CHAT_TEMPLATE,
        image_token="<|image_pad|>",
        video_token="<|video_pad|>",
        vision_start_token="<|vision_start|>",
        vision_end_token="<|vision_end|>",
    )
    head_dim = TEXT_SIZES["hidden_size"] // TEXT_SIZES["num_attention_heads"]
    rotary_factor = 0.5
    rotary_half = int(head_dim * rotary_factor) // 2
    rope = {
        "rope_type": "default",
        "rope_theta": 1e7,
        "partial_rotary_factor": rotary_factor,
        "mrope_section": [rotary_half - 2 * (rotary_half // 4), rotary_half // 4, rotary_half // 4],
        "mrope_interleaved": True,
    }
    sizes = {**TEXT_SIZES, "num_hidden_layers": 4, **text_sizes}
    config = config_class(
        text_config=dict(
            vocab_size=VOCAB_SIZE,
            head_dim=head_dim,
            rope_parameters=rope,
            layer_types=["linear_attention"] * 3 + ["full_attention"],
            linear_conv_kernel_dim=4,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **sizes,
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=TEXT_SIZES["hidden_size"],
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=64,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )
    torch.manual_seed(SEED)
    model = model_class(config)
    pixels = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3, patch_size=16, temporal_patch_size=2, merge_size=2,
                  **PIXEL_SETTINGS)
    save(
        model,
        tokenizer,
        directory,
        preprocessor_config=dict(
            image_processor_type="Qwen2VLImageProcessorFast",
            processor_class="Qwen3VLProcessor",
            size={"shortest_edge": 65536, "longest_edge": 16777216},
            **pixels,
        ),
        video_preprocessor_config=dict(
            video_processor_type="Qwen3VLVideoProcessor",
            processor_class="Qwen3VLProcessor",
            size={"shortest_edge": 4096, "longest_edge": 25165824},
            fps=2,
            min_frames=4,
            max_frames=768,
            **pixels,
        ),
    )


def _build_qwen3_5_moe(directory: Path) -> None:
    """Qwen3_5MoeForConditionalGeneration: the same vision side, prompt and layer
    pattern, with sparse mixture-of-experts blocks (4 experts, 2 per token, and a shared
    expert) in every decoder layer."""
    _build_qwen3_5(directory, Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration,
                   num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)


ADAPTER = Qwen3_5Adapter
LAYOUT = Qwen3_5Layout
TINY_RANDOM = {"qwen3.5": _build_qwen3_5, "qwen3.5-moe": _build_qwen3_5_moe}
