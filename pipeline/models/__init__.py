"""Model adapters: the vision side of each supported Video LLM family (see ``base``)."""

from pipeline.models.base import EncodedVideo, UnsupportedModelError, VideoAdapter, load_adapter
from pipeline.models.tiny_random import resolve_model

__all__ = ["EncodedVideo", "UnsupportedModelError", "VideoAdapter", "load_adapter", "resolve_model"]
