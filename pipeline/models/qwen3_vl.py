"""Qwen3-VL family (``qwen3_vl``, ``qwen3_vl_moe``).

What the LLM sees for one video, and so what the query stage must build (transformers'
``Qwen3VLVideoProcessor``, ``Qwen3VLProcessor`` and ``Qwen3VLModel``):

- frames sampled at 2 fps (``Qwen3VLSampling``: ``int(total / video_fps * 2)`` frames,
  clamped to ``[min_frames, max_frames]`` and to the frame count, spread by
  ``linspace(0, total - 1, n).round()``) at their decoded size;
- one size for the whole clip, multiples of 32 (patch 16 x merge 2), from the
  processor's ``smart_resize``, whose pixel budget counts all frames
  (``t * h * w <= size["longest_edge"]``): longer videos get smaller frames; then
  normalized (mean = std = 0.5) and, for an odd frame count, the last frame repeated;
- patches of 2 frames x 16 x 16 px, grid ``video_grid_thw = (t, h, w)``; the vision
  transformer and its merger give ``tokens [t, h/2, w/2, C]``, and its DeepStack
  mergers give one more ``[t, h/2, w/2, C]`` tensor per ``deepstack_visual_indexes``
  entry, which the LLM adds to the hidden states of the video tokens after its first
  decoder layers;
- in the prompt, the video placeholder ``<|video_pad|>`` becomes, for every temporal
  patch (one row of the token grid): ``<{seconds:.1f} seconds>`` (the mean time of the
  patch's first and last frame), ``<|vision_start|>``, that row's ``h/2 * w/2`` video
  tokens, ``<|vision_end|>`` (inside the chat template's own ``<|vision_start|>`` /
  ``<|vision_end|>`` around the placeholder);
- 3-D multimodal positions from ``get_rope_index``, which treats every frame block as
  an image of one temporal step: a video token at ``(h', w')`` of a block whose first
  token sits at ``s`` has position ``(s, s + h', s + w')``, and the text after it resumes
  at ``s + max(h/2, w/2)``.

After STTM (STTM_SPEC section 5): every frame block keeps its timestamp and both
markers, also when merging left it no token; each merged token sits in the block of its
root frame, in stored order, at the position the unmerged prompt gives its root's
top-left patch; every text token keeps its unmerged position. The DeepStack levels are
merged with the same groups and weights as the main features (``base.merge_beside``) and
added at the merged tokens' rows.

``model_extra``: ``video_grid_thw``, ``spatial_merge_size``, ``temporal_patch_size``,
``frame_seconds`` (one per temporal patch, as the processor computes them),
``frame_size`` ``[H, W]`` fed to the tower, ``num_padded_frames``,
``num_deepstack_levels`` and the ids of ``<|video_pad|>``, ``<|vision_start|>``,
``<|vision_end|>``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoConfig,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLPreTrainedModel, Qwen3VLVisionModel
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import (
    Qwen3VLMoePreTrainedModel,
    Qwen3VLMoeVisionModel,
)

from pipeline.decode import DecodedVideo
from pipeline.models.base import (
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

# Qwen3VLVideoProcessor's class defaults, for settings a checkpoint leaves out.
VIDEO_PROCESSOR_DEFAULTS = dict(
    size={"shortest_edge": 128 * 32 * 32, "longest_edge": 32 * 32 * 768},
    resample=3,
    rescale_factor=1 / 255,
    image_mean=[0.5, 0.5, 0.5],
    image_std=[0.5, 0.5, 0.5],
    do_resize=True,
    do_rescale=True,
    do_normalize=True,
    patch_size=16,
    temporal_patch_size=2,
    merge_size=2,
    fps=2,
    min_frames=4,
    max_frames=768,
    cap_pixels_per_frame=False,
    max_video_tokens=768,
)


def _vision_stage_class(pretrained_class, vision_class):
    """The vision side of a Qwen3-VL model (``model.visual``: patch embedding, blocks,
    merger, DeepStack mergers) under its own attribute name, so ``from_pretrained`` reads
    exactly those tensors and never the language model's."""

    class VisionStage(pretrained_class):
        _keys_to_ignore_on_load_unexpected = [r"^(?!visual\.)"]

        def __init__(self, config):
            super().__init__(config)
            self.visual = vision_class._from_config(config.vision_config)
            self.post_init()

    VisionStage.__name__ = VisionStage.__qualname__ = f"{vision_class.__name__}Stage"
    return VisionStage


_VISION_STAGES = {
    "qwen3_vl": ("qwen3-vl", _vision_stage_class(Qwen3VLPreTrainedModel, Qwen3VLVisionModel)),
    "qwen3_vl_moe": ("qwen3-vl-moe", _vision_stage_class(Qwen3VLMoePreTrainedModel, Qwen3VLMoeVisionModel)),
}
MODEL_TYPES = tuple(_VISION_STAGES)


@dataclass(frozen=True)
class Qwen3VLSampling:
    """``Qwen3VLVideoProcessor.sample_frames``: ``int(total / video_fps * fps)`` frames,
    clamped to ``[min_frames, max_frames]`` and to ``total``, at
    ``linspace(0, total - 1, n).round()``; frames keep their decoded size (the processor
    resizes the whole clip to one size, in ``Qwen3VLAdapter.preprocess``)."""

    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768

    def frame_indices(self, num_frames_total: int, fps: float) -> list[int]:
        count = int(num_frames_total / fps * self.fps)
        count = min(max(count, self.min_frames), self.max_frames, num_frames_total)
        return np.linspace(0, num_frames_total - 1, count).round().astype(int).tolist()

    def frame_size(self, height: int, width: int, num_frames: int) -> tuple[int, int]:
        return height, width


def smart_resize(num_frames: int, height: int, width: int, temporal_factor: int, factor: int,
                 min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen3-VL's video ``smart_resize``: ``(h, w)`` in multiples of ``factor`` near the
    frame's aspect ratio, with ``t * h * w`` (``t``: frames rounded to the temporal patch)
    within ``[min_pixels, max_pixels]``."""
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def frame_seconds(frame_indices: list[int], video_fps: float, temporal_patch_size: int) -> list[float]:
    """The time of each temporal patch as ``Qwen3VLProcessor._calculate_timestamps`` gives
    it: indices padded with the last to a multiple of the patch, ``index / fps``, the mean
    of each patch's first and last frame."""
    indices = list(frame_indices)
    indices += [indices[-1]] * (-len(indices) % temporal_patch_size)
    seconds = [index / video_fps for index in indices]
    return [(seconds[i] + seconds[i + temporal_patch_size - 1]) / 2 for i in range(0, len(seconds), temporal_patch_size)]


class Qwen3VLAdapter(VideoAdapter):
    def __init__(self, model_id: str, model_path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        self.family, stage_class = _VISION_STAGES[AutoConfig.from_pretrained(model_path).model_type]
        self._load(model_id, model_path, stage_class, VIDEO_PROCESSOR_DEFAULTS, device, dtype)

    def default_sampling(self) -> Qwen3VLSampling:
        """The video processor's own recipe (2 fps, 4 to 768 frames, by default)."""
        return Qwen3VLSampling(
            fps=self.settings["fps"], min_frames=self.settings["min_frames"], max_frames=self.settings["max_frames"]
        )

    def preprocess(self, video: DecodedVideo) -> dict[str, torch.Tensor]:
        """What Qwen3VLVideoProcessor returns: ``pixel_values_videos`` float32
        ``[t * h * w, 3 * 2 * 16 * 16]`` (each 2x2 block of patches consecutive, blocks in
        raster order) and ``video_grid_thw`` ``[[t, h, w]]``."""
        patch, merge, temporal = (self.settings[key] for key in ("patch_size", "merge_size", "temporal_patch_size"))
        frames = video.frames.permute(0, 3, 1, 2).contiguous()  # [T, 3, H, W]
        size = smart_resize(max(len(frames), temporal), *frames.shape[-2:], temporal, patch * merge,
                            *self._pixel_bounds(len(frames)))
        pixels = normalize_frames(resize_like_video_processor(frames, size), self.settings)
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
        """(min, max) pixels of the whole clip for ``smart_resize``."""
        size = self.settings["size"]
        max_pixels = size["longest_edge"]
        if self.settings["cap_pixels_per_frame"]:  # newer transformers' optional per-frame cap
            factor = self.settings["patch_size"] * self.settings["merge_size"]
            frame_cap = self.settings["max_video_tokens"] * factor * factor
            max_pixels = max(min(frame_cap, size["longest_edge"] // num_frames), int(size["shortest_edge"] * 1.05))
            max_pixels *= num_frames
        return size["shortest_edge"], max_pixels

    @torch.no_grad()
    def encode(self, video: DecodedVideo) -> EncodedVideo:
        inputs = self.preprocess(video)
        grid_thw = inputs["video_grid_thw"]
        merge, temporal = self.settings["merge_size"], self.settings["temporal_patch_size"]
        output = self.stage.visual(
            inputs["pixel_values_videos"].to(self.device, self.dtype), grid_thw=grid_thw.to(self.device)
        )
        grid_t, grid_h, grid_w = grid_thw[0].tolist()
        shape = (grid_t, grid_h // merge, grid_w // merge, -1)
        config = self.stage.config
        return EncodedVideo(
            tokens=output.pooler_output.view(shape),
            deepstack=torch.stack([level.view(shape) for level in output.deepstack_features]),
            model_extra={
                "video_grid_thw": [grid_t, grid_h, grid_w],
                "spatial_merge_size": merge,
                "temporal_patch_size": temporal,
                "frame_seconds": frame_seconds(video.frame_indices, video.fps, temporal),
                "frame_size": [grid_h * self.settings["patch_size"], grid_w * self.settings["patch_size"]],
                "num_padded_frames": grid_t * temporal - len(video.frames),
                "num_deepstack_levels": len(output.deepstack_features),
                "video_token_id": config.video_token_id,
                "vision_start_token_id": config.vision_start_token_id,
                "vision_end_token_id": config.vision_end_token_id,
            },
        )


class Qwen3VLLayout(PromptLayout):
    """The prompt around ``N`` merged tokens (see the module docstring): one block per
    temporal patch, ``<t seconds><|vision_start|>`` + the tokens whose root is that frame +
    ``<|vision_end|>``, at the positions ``get_rope_index`` gives the unmerged prompt; the
    DeepStack levels are added at the merged tokens' rows inside the LLM."""

    # DeepStack adds each level's per-patch features to the video tokens' hidden states
    # after decoder layers 0..levels-1, inside the very layers a merge at k > 0 would run
    # unmerged, and STTM_SPEC sections 5-6 define merging them only at k = 0 (before the
    # LLM); k > 0 is not built for this family.
    supports_merge_layer = False
    merge_layer_refusal = ("Qwen3-VL adds DeepStack features inside its first decoder layers, and merging at "
                           "k > 0 with DeepStack is not defined; use merge_layer 0")

    @property
    def graph_capturable(self) -> bool:
        # Qwen3-VL-MoE's experts run in a loop over the experts its tokens were routed to,
        # which reads the routing back to the host: CUDA graph capture refuses it.
        return getattr(self.config.get_text_config(), "num_experts", 0) == 0

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
        levels = len(self.config.vision_config.deepstack_visual_indexes)
        deepstack = stored.deepstack
        expected = (levels, stored.num_tokens, stored.tokens.features.shape[1])
        if levels and (deepstack is None or tuple(deepstack.shape) != expected):
            found = None if deepstack is None else list(deepstack.shape)
            raise IncompatibleTokenSetError(
                f"video {stored.video_id!r}: {stored.model_id} needs {levels} DeepStack levels {list(expected)} "
                f"stored beside the tokens, found {found}"
            )

    def frame_blocks(self, stored) -> list[tuple[list[int], list[int]]]:
        """Per temporal patch, the text token ids before its video tokens (timestamp,
        ``<|vision_start|>``) and after them (``<|vision_end|>``)."""
        start, end = self.config.vision_start_token_id, self.config.vision_end_token_id
        return [
            (self.tokenizer(f"<{seconds:.1f} seconds>", add_special_tokens=False)["input_ids"] + [start], [end])
            for seconds in stored.model_extra["frame_seconds"]
        ]

    def prefix(self, stored, text_before_video: list[int]) -> PrefixLayout:
        tokens = stored.tokens
        t, h, w = tokens.grid
        blocks = self.frame_blocks(stored)

        # The unmerged prompt (with one text token after the video, to see where text
        # resumes) and where each of its pieces sits.
        ids = list(text_before_video)
        video_rows = []  # [t] index of each frame's first video token
        for before, after in blocks:
            ids += before
            video_rows.append(len(ids))
            ids += [self.config.video_token_id] * (h * w) + after
        input_ids = torch.tensor([ids + [0]])
        token_types = (input_ids == self.config.video_token_id).int() * 2  # mm_token_type_ids: 2 = video
        video_grid_thw = torch.tensor([stored.model_extra["video_grid_thw"]])
        full_positions, _ = self.model.model.get_rope_index(input_ids, mm_token_type_ids=token_types,
                                                            video_grid_thw=video_grid_thw)

        # The merged prompt: every text piece kept, each frame's video tokens replaced by
        # the merged tokens rooted in it (tokens are stored in (frame, y0, x0) order).
        per_frame = torch.bincount(tokens.frame.long(), minlength=t).tolist()
        root_patch = tokens.box[:, 0].long() * w + tokens.box[:, 1].long()  # [N] in its frame
        keep, is_visual = list(range(len(text_before_video))), [False] * len(text_before_video)
        first = 0
        pieces = []  # ("text", ids) or ("tokens", (first, end)), in prompt order
        cursor = len(text_before_video)
        for frame, ((before, after), count) in enumerate(zip(blocks, per_frame)):
            keep += range(cursor, cursor + len(before))
            keep += (video_rows[frame] + root_patch[first : first + count]).tolist()
            keep += range(video_rows[frame] + h * w, video_rows[frame] + h * w + len(after))
            is_visual += [False] * len(before) + [True] * count + [False] * len(after)
            pieces += [("text", before), ("tokens", (first, first + count)), ("text", after)]
            cursor = video_rows[frame] + h * w + len(after)
            first += count

        features = tokens.features.to(self.model.device, self.model.dtype)
        embeds = [self.embed(text_before_video)]
        for kind, piece in pieces:
            embeds.append(self.embed(piece) if kind == "text" else features[piece[0] : piece[1]])
        deepstack = stored.deepstack
        return PrefixLayout(
            embeds=torch.cat(embeds),
            position_ids=full_positions[:, :, keep].to(self.model.device),
            text_position=int(full_positions[0, 0, -1]),
            visual_mask=torch.tensor(is_visual, device=self.model.device),
            deepstack=() if deepstack is None else tuple(deepstack.to(self.model.device, self.model.dtype)),
        )

    def text_positions(self, start: int, count: int) -> torch.Tensor:
        return torch.arange(start, start + count, device=self.model.device)[None, None].expand(3, 1, count)

    @contextlib.contextmanager
    def running(self, prefix: PrefixLayout):
        """Hands the language model the DeepStack levels and the rows they go to, as
        ``Qwen3VLModel.forward`` does when it encodes the video itself (which it does not
        here: the prompt arrives as embeddings)."""
        if not prefix.deepstack:
            yield
            return

        def add_deepstack(module, args, kwargs):
            length = kwargs["inputs_embeds"].shape[1]
            mask = torch.zeros(1, length, dtype=torch.bool, device=prefix.visual_mask.device)
            mask[0, : prefix.length] = prefix.visual_mask
            return args, {**kwargs, "visual_pos_masks": mask, "deepstack_visual_embeds": list(prefix.deepstack)}

        hook = self.model.model.language_model.register_forward_pre_hook(add_deepstack, with_kwargs=True)
        try:
            yield
        finally:
            hook.remove()


# --- tiny-random:qwen3-vl -------------------------------------------------------------------

# The Qwen3-VL Instruct chat template's shape (no default system turn), for one video.
_QWEN3_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _build_qwen3_vl(directory: Path, config_class=Qwen3VLConfig, model_class=Qwen3VLForConditionalGeneration,
                    **text_sizes) -> None:
    """Qwen3VLForConditionalGeneration: ViT with learned + 2-D rotary positions, 16 px
    patches, 2x2 merger, DeepStack mergers after both vision blocks (added after LLM
    layers 0 and 1), interleaved multimodal rotary positions."""
    tokenizer = train_tokenizer(
        QWEN_SPECIAL_TOKENS,
        _QWEN3_VL_CHAT_TEMPLATE,
        image_token="<|image_pad|>",
        video_token="<|video_pad|>",
        vision_start_token="<|vision_start|>",
        vision_end_token="<|vision_end|>",
    )
    head_dim = TEXT_SIZES["hidden_size"] // TEXT_SIZES["num_attention_heads"]
    rope = {
        "rope_type": "default",
        "rope_theta": 5e6,
        "mrope_section": [head_dim // 2 - 2 * (head_dim // 6), head_dim // 6, head_dim // 6],
        "mrope_interleaved": True,
    }
    config = config_class(
        text_config=dict(
            vocab_size=VOCAB_SIZE,
            head_dim=head_dim,
            rope_parameters=rope,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **TEXT_SIZES,
            **text_sizes,
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
            deepstack_visual_indexes=[0, 1],
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


def _build_qwen3_vl_moe(directory: Path) -> None:
    """Qwen3VLMoeForConditionalGeneration: the same vision side and prompt, a decoder of
    sparse mixture-of-experts blocks (4 experts, 2 per token)."""
    _build_qwen3_vl(directory, Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration,
                    num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)


ADAPTER = Qwen3VLAdapter
LAYOUT = Qwen3VLLayout
TINY_RANDOM = {"qwen3-vl": _build_qwen3_vl, "qwen3-vl-moe": _build_qwen3_vl_moe}
