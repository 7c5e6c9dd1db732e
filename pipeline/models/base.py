"""What every model family implements, and the helpers they share.

A family is one module under ``pipeline/models/`` (``llava_onevision``, ``qwen2_vl``...)
that owns everything about its models; ``pipeline.models.registry`` maps a checkpoint's
``model_type`` to it. A family module defines:

- a ``VideoAdapter`` (the encode stage's side, below);
- a ``PromptLayout`` (the query stage's side, below): where a stored token set goes in
  the model's prompt, at which positions, and how the model runs over it;
- ``MODEL_TYPES`` (the ``config.model_type`` values it loads), ``ADAPTER``, ``LAYOUT``,
  and ``TINY_RANDOM``: ``{name: builder}`` of its ``tiny-random:<name>`` models.

An adapter turns a ``DecodedVideo`` into the visual tokens ``[T', H', W', C]`` that the
model's LLM would receive for that video (after the vision tower, projector and pooling
or patch merger), plus ``model_extra``: what the query stage needs to put them back into
a prompt. It loads only the vision-side weights, through transformers' own model classes
and checkpoint loading, from a local directory, a hub id, or ``tiny-random:<family>``.

Preprocessing (resize, rescale, normalize, patchify) is done here in torch, reading the
checkpoint's own video-processor settings, because transformers' video processors need
torchvision, which is not part of this project's CPU environment. It reproduces them
bit for bit (``jobs/check_processor_parity.py`` compares the two where torchvision exists).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.utils import cached_file
from transformers.video_processing_utils import BaseVideoProcessor

from pipeline.decode import DecodedVideo, SamplingPolicy
from pipeline.fingerprint import canonical_json
from sttm.merging import assemble, cell_similarities, choose_parents, emitted_cells
from sttm.token_set import TokenSet

# transformers' value for bicubic (PILImageResampling.BICUBIC), the only resampling the
# supported video processors use.
BICUBIC = 3


# The video processors' shared class defaults (bicubic resize, rescale to [0, 1], CLIP
# normalization); each family adds its own size and patching settings.
CLIP_PIXEL_DEFAULTS = dict(
    resample=3,
    rescale_factor=1 / 255,
    image_mean=list(OPENAI_CLIP_MEAN),
    image_std=list(OPENAI_CLIP_STD),
    do_resize=True,
    do_rescale=True,
    do_normalize=True,
)


class UnsupportedModelError(ValueError):
    """The checkpoint is of an architecture, or asks for preprocessing, that no adapter
    implements."""


class IncompatibleTokenSetError(ValueError):
    """A stored token set was not made for the loaded model (hidden size, encoder
    fingerprint or grid disagree)."""


@dataclass(frozen=True, eq=False)
class EncodedVideo:
    """What the encode stage hands to STTM and the store.

    Attributes:
        tokens: ``[T', H', W', C]`` visual tokens in the model's dtype, in the order the LLM
            reads them (raster order of ``(t, h, w)``).
        model_extra: JSON-able facts the query stage needs to place the tokens in a prompt
            (see each adapter's docstring).
        deepstack: ``[L, T', H', W', C]`` per-patch features of the model's DeepStack levels
            (Qwen3-VL), merged like ``tokens`` and stored beside them; ``None`` for models
            without them.
    """

    tokens: torch.Tensor
    model_extra: dict[str, Any]
    deepstack: torch.Tensor | None = None


class VideoAdapter(ABC):
    """One model family's vision side, loaded once per worker.

    Attributes:
        family: the family's name (``"llava-onevision"``, ``"qwen2-vl"``, ...).
        model_id: the model spec it was loaded from (path, hub id or ``tiny-random:...``).
        hidden_size: ``C``, the LLM's embedding size.
        dtype: dtype of the weights and of the returned tokens.
        device: where the weights live and the tokens are computed.
        fingerprint: ``"sha256:<hex>"`` over the checkpoint config, the video-processor
            settings and every weight tensor used.
        stage: the loaded vision side, a ``PreTrainedModel`` whose submodules carry the
            full model's names (``vision_tower``, ``multi_modal_projector``, ``visual``...).
        settings: the checkpoint's video-processor settings, over the class defaults.
    """

    model_types: ClassVar[tuple[str, ...]]  # config.model_type values this adapter loads

    family: str
    model_id: str
    hidden_size: int
    dtype: torch.dtype
    device: torch.device
    fingerprint: str
    stage: nn.Module
    settings: dict[str, Any]
    # The fixed (height, width) the model resizes every frame to, or None when the size
    # depends on the video. The pipeline resizes on its CPU decode workers (with
    # ``resize_like_video_processor``, so the result is the same) and the GPU actor's
    # resize becomes a no-op.
    input_frame_size: tuple[int, int] | None = None

    def __init__(self, model_id: str, model_path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        """Load the vision side of ``model_id``, found at ``model_path`` (``registry.load_adapter``
        resolves one to the other)."""

    def _load(self, model_id: str, model_path: str, stage_class, processor_defaults: dict[str, Any], device, dtype) -> None:
        """Load ``stage_class`` (a ``PreTrainedModel`` holding only the vision side) and the
        video-processor settings from ``model_path``, and set the attributes above."""
        self.stage = stage_class.from_pretrained(model_path, dtype=dtype or "auto").to(device).eval()
        self.settings = video_processor_settings(model_path, processor_defaults)
        self.model_id = model_id
        self.hidden_size = self.stage.config.text_config.hidden_size
        self.dtype = self.stage.dtype
        self.device = self.stage.device
        self.fingerprint = weights_fingerprint(model_path, self.settings, self.stage)

    @abstractmethod
    def default_sampling(self) -> SamplingPolicy:
        """The model's own frame sampling recipe."""

    @abstractmethod
    def preprocess(self, video: DecodedVideo) -> dict[str, torch.Tensor]:
        """The float32 inputs the model's video processor would produce for these frames,
        named as the processor names them (and the full model's ``forward`` takes them)."""

    @abstractmethod
    def encode(self, video: DecodedVideo) -> EncodedVideo:
        """The visual tokens the model's LLM would receive for this video."""


@dataclass(frozen=True, eq=False)
class PrefixLayout:
    """A stored token set placed in the model's prompt: everything before the question.

    Attributes:
        embeds: ``[L, C]`` input embeddings (text before the video, then the video part).
        position_ids: ``[1, L]`` (1-D rotary) or ``[3, 1, L]`` (multimodal rotary:
            temporal, height, width) positions of those rows.
        text_position: position of the first token after the prefix.
        visual_mask: ``[L]`` bool, the rows holding merged video tokens (in stored order),
            or ``None`` when nothing is added to them inside the LLM.
        deepstack: per DeepStack level, ``[N, C]`` features added to the hidden states of
            the ``visual_mask`` rows after that decoder layer (Qwen3-VL); empty otherwise.
    """

    embeds: torch.Tensor
    position_ids: torch.Tensor
    text_position: int
    visual_mask: torch.Tensor | None = None
    deepstack: tuple[torch.Tensor, ...] = ()

    @property
    def length(self) -> int:
        return self.embeds.shape[0]


class PromptLayout(ABC):
    """One model family's query side, bound to the loaded full model
    (``AutoModelForImageTextToText``): where a stored token set goes in the prompt, at
    which positions, and what the LLM needs beyond embeddings and positions.

    The query stage renders the chat template itself, with one video placeholder; the
    layout decides what replaces the placeholder.

    ``recurrent_state``: whether the LLM has layers whose cache is a recurrent state
    (linear attention, state-space layers) rather than keys and values. Such a cache
    cannot be cropped back to the prefix, and questions cannot share one packed sequence,
    so the query stage answers each question from its own copy of the prefix's cache, as
    one row of a batch.
    """

    recurrent_state: ClassVar[bool] = False
    # Merging inside the LLM at decoder layer k > 0 (STTM_SPEC section 6, pipeline.merge_layer):
    # whether the family supports it, and if not, why (the refusal's message).
    supports_merge_layer: ClassVar[bool] = True
    merge_layer_refusal: ClassVar[str] = ""
    # Parameters of the full model's inner model (``model.model.<name>``) that ``prefix``
    # reads besides the embedding, loaded with the first k layers at merge layer k > 0.
    prefix_parameters: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module, tokenizer):
        self.model = model
        self.config = model.config
        self.tokenizer = tokenizer

    @property
    def graph_capturable(self) -> bool:
        """Whether the LLM's decoding step can be captured as a CUDA graph (the query
        stage's default on CUDA): not with a recurrent state (the fixed-capacity caches hold
        keys and values only), nor where the forward reads device data back to the host,
        which capture refuses (a family says so for such models)."""
        return not self.recurrent_state

    def check(self, stored) -> None:
        """Raise IncompatibleTokenSetError when ``stored.model_extra`` does not describe
        ``stored.tokens`` the way this family needs (the caller checked channels and
        encoder fingerprint already)."""

    @abstractmethod
    def prefix(self, stored, text_before_video: list[int]) -> PrefixLayout:
        """The prompt prefix of ``stored`` (a ``StoredTokenSet``) after the chat template's
        ``text_before_video`` token ids."""

    @abstractmethod
    def text_positions(self, start: int, count: int) -> torch.Tensor:
        """Positions of ``count`` text tokens from ``start``, shaped as ``prefix``'s
        ``position_ids`` (``[1, count]`` or ``[3, 1, count]``), on the model's device."""

    def unmerged_text_position(self, stored, text_before_video: list[int], merged: PrefixLayout) -> int:
        """Position of the first token after the prefix of ``stored`` had nothing been
        merged (``merged``: its merged prefix). Default: the merged one, as for multimodal
        rotary positions, where text keeps its unmerged positions (STTM_SPEC section 5)."""
        return merged.text_position

    def running(self, prefix: PrefixLayout):
        """A context manager around the forward that runs ``prefix`` (possibly followed by
        question tokens): families whose LLM adds per-token visual features inside its
        layers install them here. Default: nothing to add."""
        return contextlib.nullcontext()

    def embed(self, token_ids) -> torch.Tensor:
        """``[len, C]`` input embeddings of text tokens (``[0, C]`` for none: the explicit
        dtype keeps an empty list from becoming a float tensor)."""
        embeddings = self.model.get_input_embeddings()
        return embeddings(torch.tensor(list(token_ids), dtype=torch.long, device=embeddings.weight.device))


def merge_beside(tokens: torch.Tensor, deepstack: torch.Tensor, merged: TokenSet) -> torch.Tensor:
    """Per-patch tensors ``[L, T, H, W, C]`` beside the tokens (e.g. Qwen3-VL's DeepStack
    levels) merged exactly as ``merged`` merged ``tokens [T, H, W, C]``: the same groups and the same per-patch weights (STTM_SPEC
    section 3: a token's feature is a fixed weighted sum of its patches). Returns
    ``[L, N, C]``.

    The merge decisions are taken again from ``tokens`` alone at ``merged``'s thresholds
    (``sttm.merge`` reproduces a token set from them), and the same ``assemble`` step sums
    the main features and the levels side by side along the channels, so every level
    gets exactly the main features' weights.
    """
    levels, channels = deepstack.shape[0], tokens.shape[-1]
    sims = cell_similarities(tokens, merged.root_level, merged.weighted, merged.head_dim,
                             temporal=merged.tau_t is not None)
    emitted = emitted_cells(sims.tree, sims.min_child_sim, merged.tau_s)
    parent = None
    if merged.tau_t is not None and sims.nested_sim is not None:
        parent = choose_parents(sims.tree, sims.nested_sim, emitted, merged.tau_t)
    side_by_side = torch.cat([tokens, *deepstack.to(tokens.dtype)], dim=-1)  # [T, H, W, (1 + L) * C]
    params = dict(tau_s=merged.tau_s, tau_t=merged.tau_t, root_level=merged.root_level, weighted=merged.weighted,
                  head_dim=merged.head_dim)
    again = assemble(side_by_side, sims.tree, emitted, parent, merged.weighted, params)
    if not torch.equal(again.assignment.cpu(), merged.assignment.cpu()):
        raise ValueError("the per-patch tensors cannot follow this token set: its merge does not repeat on these tokens")
    return again.features[:, channels:].reshape(-1, levels, channels).transpose(0, 1).contiguous()


def video_processor_settings(model_path: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's video-processor settings over ``defaults`` (the transformers video
    processor class's own defaults), found where transformers looks for them: a nested
    ``processor_config.json``, ``video_preprocessor_config.json``, then the image
    processor's ``preprocessor_config.json``.

    Raises UnsupportedModelError for options the adapters do not implement.
    """
    stored, _ = BaseVideoProcessor.get_video_processor_dict(model_path)
    settings = {**defaults, **{key: value for key, value in stored.items() if value is not None}}
    unsupported = {
        "resample": settings.get("resample") != BICUBIC,
        "do_resize": not settings.get("do_resize"),
        "do_rescale": not settings.get("do_rescale"),
        "do_normalize": not settings.get("do_normalize"),
        "do_center_crop": bool(settings.get("do_center_crop")),
    }
    for key, is_unsupported in unsupported.items():
        if is_unsupported:
            raise UnsupportedModelError(
                f"{model_path}: video processor setting {key}={settings.get(key)!r} is not supported"
            )
    return settings


def resize_like_video_processor(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased bicubic resize of uint8 frames ``[T, 3, H, W]`` to ``size = (h, w)``,
    bit-identical to transformers' video processors (``torchvision.transforms.v2`` on the
    CPU): uint8 frames go through torch's native uint8 kernel, and the same size comes
    back untouched. Returns uint8 ``[T, 3, h, w]``.
    """
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    return F.interpolate(frames, size=list(size), mode="bicubic", align_corners=False, antialias=True)


def normalize_frames(frames: torch.Tensor, settings: dict[str, Any]) -> torch.Tensor:
    """uint8 ``[T, 3, H, W]`` -> float32, ``(x * rescale_factor - mean) / std``.

    Computed as transformers' fused rescale-and-normalize does it, ``(x - mean / r) / (std /
    r)`` in float32, so the result matches the video processors bit for bit.
    """
    scale = 1.0 / settings["rescale_factor"]
    mean = (torch.tensor(settings["image_mean"], device=frames.device) * scale).view(-1, 1, 1)
    std = (torch.tensor(settings["image_std"], device=frames.device) * scale).view(-1, 1, 1)
    return (frames.to(torch.float32) - mean) / std


def weights_fingerprint(model_path: str, settings: dict[str, Any], module: nn.Module) -> str:
    """``"sha256:<hex>"`` over the checkpoint's ``config.json`` (less the transformers
    version that wrote it), the video-processor ``settings`` and every tensor of
    ``module``'s state dict.

    Tensors enter as a sorted list of (dtype, shape, sha256 of bytes), without their names:
    transformers renames modules between versions and checkpoints come in several key
    layouts, and the same weights should keep one fingerprint through all of them.
    """
    with open(cached_file(model_path, "config.json")) as file:
        config = json.load(file)
    config.pop("transformers_version", None)
    tensors = []
    for tensor in module.state_dict().values():
        tensor = tensor.detach().to("cpu").contiguous()
        data = hashlib.sha256(tensor.reshape(-1).view(torch.uint8).numpy()).hexdigest()
        tensors.append([str(tensor.dtype), list(tensor.shape), data])
    fingerprinted = {"config": config, "video_processor": settings, "tensors": sorted(tensors)}
    return f"sha256:{hashlib.sha256(canonical_json(fingerprinted).encode()).hexdigest()}"
