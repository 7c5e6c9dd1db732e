"""Model families: one module per family (``llava_onevision``, ``qwen2_vl``, ...), each
owning everything about its models (see ``base``), and the ``registry`` that picks one
by a checkpoint's ``model_type``."""

from pipeline.models.base import (
    EncodedVideo,
    IncompatibleTokenSetError,
    PrefixLayout,
    PromptLayout,
    UnsupportedModelError,
    VideoAdapter,
)
from pipeline.models.registry import TINY_RANDOM_NAMES, load_adapter, prompt_layout, resolve_model

__all__ = [
    "EncodedVideo",
    "IncompatibleTokenSetError",
    "PrefixLayout",
    "PromptLayout",
    "TINY_RANDOM_NAMES",
    "UnsupportedModelError",
    "VideoAdapter",
    "load_adapter",
    "prompt_layout",
    "resolve_model",
]
