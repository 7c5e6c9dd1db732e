"""LLaVA-OneVision adapter (llava-hf LLaVA-OneVision checkpoints, and LLaVA-Video
checkpoints converted to ``LlavaOnevisionForConditionalGeneration``).

What the LLM sees for one video of ``T`` frames, and so what the query stage must build:

- frames resized to 384x384 (bicubic, antialiased; no aspect ratio kept), normalized;
- the SigLIP tower's hidden states at ``config.vision_feature_layer`` (all 27x27 patches,
  ``vision_feature_select_strategy="full"``), through the 2-layer projector: ``[T, 729, C]``;
- 2x2 bilinear pooling per frame to 14x14: ``tokens [T, 14, 14, C]``;
- in the prompt, the ``T * 196`` tokens in raster order of ``(t, y, x)``, then ONE
  ``image_newline`` embedding (``model.model.image_newline``) after the last frame. The
  processor expands the prompt's single ``<video>`` into ``T * 196 + 1`` video tokens and
  the model scatters these embeddings into them in this order.

After STTM, the query stage puts the N merged tokens (in ``TokenSet`` order) where the
``T * 196`` tokens were and keeps the one newline after them: ``N + 1`` video tokens.
Positions are 1-D, consecutive, as for any other token (STTM_SPEC section 5).

Everything else about the family lives here too: ``LlavaOnevisionLayout`` (the query
stage's prompt), and the ``tiny-random:llava-onevision`` builder.

``model_extra``: ``grid_thw`` ``[T, 14, 14]``, ``frame_size`` ``[384, 384]``,
``video_token_id``, ``newline`` (``"after_video"``), ``num_newline_tokens`` (1).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
from transformers.models.llava_onevision.modeling_llava_onevision import (
    LlavaOnevisionMultiModalProjector,
    LlavaOnevisionPreTrainedModel,
)

from pipeline.decode import DecodedVideo, UniformSampling
from pipeline.models.base import (
    CLIP_PIXEL_DEFAULTS,
    EncodedVideo,
    PrefixLayout,
    PromptLayout,
    UnsupportedModelError,
    VideoAdapter,
    normalize_frames,
    resize_like_video_processor,
)
from pipeline.models.tiny_random import PIXEL_SETTINGS, SEED, TEXT_SIZES, VOCAB_SIZE, save, train_tokenizer

MODEL_TYPES = ("llava_onevision",)

# LlavaOnevisionVideoProcessor's class defaults, for settings a checkpoint leaves out.
VIDEO_PROCESSOR_DEFAULTS = dict(
    size={"height": 384, "width": 384},
    **CLIP_PIXEL_DEFAULTS,
)


class LlavaOnevisionVisionStage(LlavaOnevisionPreTrainedModel):
    """The vision side of ``LlavaOnevisionModel``: its tower, projector and newline, under
    the same attribute names, so ``from_pretrained`` reads exactly those tensors from the
    checkpoint (hub layouts included, through transformers' key conversions) and never
    reads the language model's."""

    _keys_to_ignore_on_load_unexpected = [r"^(?!(vision_tower|multi_modal_projector|image_newline)\b)"]

    def __init__(self, config):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaOnevisionMultiModalProjector(config)
        self.image_newline = nn.Parameter(torch.empty(config.text_config.hidden_size))
        self.post_init()


class LlavaOnevisionAdapter(VideoAdapter):
    family = "llava-onevision"

    def __init__(self, model_id: str, model_path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        self._load(model_id, model_path, LlavaOnevisionVisionStage, VIDEO_PROCESSOR_DEFAULTS, device, dtype)
        if set(self.settings["size"]) != {"height", "width"}:
            raise UnsupportedModelError(
                f"{model_id}: expected a fixed video frame size, got size={self.settings['size']}"
            )
        vision_config = self.stage.config.vision_config
        self.patch_grid = vision_config.image_size // vision_config.patch_size  # 27
        self.pooled_grid = math.ceil(self.patch_grid / 2)  # 14

    def default_sampling(self) -> UniformSampling:
        """32 uniformly spread frames, as LLaVA-OneVision is evaluated on video."""
        return UniformSampling(num_frames=32)

    @property
    def input_frame_size(self) -> tuple[int, int]:
        return self.settings["size"]["height"], self.settings["size"]["width"]

    def preprocess(self, video: DecodedVideo) -> dict[str, torch.Tensor]:
        """``pixel_values_videos``: float32 ``[1, T, 3, 384, 384]`` on the adapter's device.

        The resize runs on the CPU (the processors' uint8 kernel; a no-op for frames the
        pipeline's decode workers already resized), the normalization on the device."""
        frames = resize_like_video_processor(video.frames.permute(0, 3, 1, 2).contiguous(), self.input_frame_size)
        return {"pixel_values_videos": normalize_frames(frames.to(self.device), self.settings)[None]}

    @torch.no_grad()
    def encode(self, video: DecodedVideo) -> EncodedVideo:
        pixels = self.preprocess(video)["pixel_values_videos"][0].to(self.device, self.dtype)
        config = self.stage.config
        hidden_states = self.stage.vision_tower(pixels, output_hidden_states=True).hidden_states
        if isinstance(config.vision_feature_layer, int):
            features = hidden_states[config.vision_feature_layer]
        else:
            features = torch.cat([hidden_states[layer] for layer in config.vision_feature_layer], dim=-1)
        if config.vision_feature_select_strategy == "default":
            features = features[:, 1:]  # drop the class token
        features = self.stage.multi_modal_projector(features)  # [T, 27*27, C]

        # 2x2 bilinear pooling of each frame's 27x27 grid to 14x14 (the model's apply_pooling)
        num_frames = features.shape[0]
        grid = features.view(num_frames, self.patch_grid, self.patch_grid, -1).permute(0, 3, 1, 2)
        if not (grid.is_cuda and grid.dtype == torch.bfloat16):
            # The model's own layout (NCHW). On CUDA in bf16 the channels-last view above
            # gives bit-identical output 200x faster (183 ms -> 0.8 ms for 128 frames of
            # 7B-sized tokens on an H100); in float32 its rounding differs, so other
            # dtypes and the CPU keep the model's kernel.
            grid = grid.contiguous()
        pooled = F.interpolate(grid, size=[self.pooled_grid, self.pooled_grid], mode="bilinear")
        tokens = pooled.permute(0, 2, 3, 1).contiguous()  # [T, 14, 14, C]
        return EncodedVideo(
            tokens=tokens,
            model_extra={
                "grid_thw": list(tokens.shape[:3]),
                "frame_size": list(pixels.shape[-2:]),
                "video_token_id": config.video_token_id,
                "newline": "after_video",
                "num_newline_tokens": 1,
            },
        )


class LlavaOnevisionLayout(PromptLayout):
    """The prompt around ``N`` merged tokens: they replace the ``T * 196`` video tokens,
    followed by the one ``image_newline`` embedding (``LlavaOnevisionModel.get_video_features``
    appends it after the last frame), at consecutive 1-D positions."""

    prefix_parameters = ("image_newline",)

    def prefix(self, stored, text_before_video: list[int]) -> PrefixLayout:
        features = stored.tokens.features.to(self.model.device, self.model.dtype)  # [N, C]
        embeds = torch.cat([self.embed(text_before_video), features, self.model.model.image_newline[None]])
        length = embeds.shape[0]
        return PrefixLayout(embeds, torch.arange(length, device=self.model.device)[None], text_position=length)

    def unmerged_text_position(self, stored, text_before_video: list[int], merged: PrefixLayout) -> int:
        """1-D positions: after the text, every unmerged video token and the newline."""
        t, h, w = stored.tokens.grid
        return len(text_before_video) + t * h * w + 1

    def text_positions(self, start: int, count: int) -> torch.Tensor:
        return torch.arange(start, start + count, device=self.model.device)[None]


# --- tiny-random:llava-onevision ----------------------------------------------------------

# The chat template llava-hf's conversion script gives the hub checkpoints.
_LLAVA_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _build_llava_onevision(directory: Path) -> None:
    """LlavaOnevisionForConditionalGeneration: SigLIP vision tower (384 px, patch 14 -> 27x27
    patches), 2-layer MLP projector, 2x2 bilinear pooling to 14x14, Qwen2 LLM."""
    tokenizer = train_tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"],
        _LLAVA_ONEVISION_CHAT_TEMPLATE,
        image_token="<image>",
        video_token="<video>",
    )
    special_ids = dict(
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", vocab_size=VOCAB_SIZE, **TEXT_SIZES, **special_ids),
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=384,
            patch_size=14,
            vision_use_head=False,  # as in the hub checkpoints: LLaVA reads hidden states
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
    )
    torch.manual_seed(SEED)
    model = LlavaOnevisionForConditionalGeneration(config)
    processor_class = {"processor_class": "LlavaOnevisionProcessor"}
    pixels = dict(size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3, **PIXEL_SETTINGS)
    save(
        model,
        tokenizer,
        directory,
        processor_config=dict(
            **processor_class,
            num_image_tokens=729,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            vision_aspect_ratio=config.vision_aspect_ratio,
        ),
        preprocessor_config=dict(
            image_processor_type="LlavaOnevisionImageProcessor",
            image_grid_pinpoints=config.image_grid_pinpoints,
            do_pad=True,
            **processor_class,
            **pixels,
        ),
        video_preprocessor_config=dict(
            video_processor_type="LlavaOnevisionVideoProcessor", **processor_class, **pixels
        ),
    )


ADAPTER = LlavaOnevisionAdapter
LAYOUT = LlavaOnevisionLayout
TINY_RANDOM = {"llava-onevision": _build_llava_onevision}
