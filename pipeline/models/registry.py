"""The model families, by ``config.model_type``, and loading any model by its spec.

A model spec is a checkpoint directory, a hub id, or ``tiny-random:<name>`` (built by
its family's builder on first use). Adding a family: write its module (see ``base``) and
add it to ``FAMILY_MODULES``.
"""

from __future__ import annotations

import importlib.util
from types import ModuleType

import torch
from torch import nn
from transformers import AutoConfig

from pipeline.models import llava_onevision, qwen2_vl, qwen3_vl
from pipeline.models.base import PromptLayout, UnsupportedModelError, VideoAdapter
from pipeline.models.tiny_random import TINY_RANDOM_PREFIX, build_once

FAMILY_MODULES: tuple[ModuleType, ...] = (llava_onevision, qwen2_vl, qwen3_vl)
# Qwen3.5 came in a later transformers release than the others; older ones go without it.
if importlib.util.find_spec("transformers.models.qwen3_5") is not None:
    from pipeline.models import qwen3_5

    FAMILY_MODULES += (qwen3_5,)

FAMILIES: dict[str, ModuleType] = {model_type: family for family in FAMILY_MODULES for model_type in family.MODEL_TYPES}
TINY_RANDOM_BUILDERS = {name: builder for family in FAMILY_MODULES for name, builder in family.TINY_RANDOM.items()}
# Every tiny-random model name, e.g. for tests that run each family.
TINY_RANDOM_NAMES = tuple(TINY_RANDOM_BUILDERS)


def resolve_model(model_spec: str) -> str:
    """A local directory for ``tiny-random:<name>`` (built on first use); any other spec
    (a checkpoint directory or a hub id) unchanged."""
    if not model_spec.startswith(TINY_RANDOM_PREFIX):
        return model_spec
    name = model_spec[len(TINY_RANDOM_PREFIX) :]
    if name not in TINY_RANDOM_BUILDERS:
        raise ValueError(f"unknown tiny-random family {name!r}; known: {sorted(TINY_RANDOM_BUILDERS)}")
    return build_once(name, TINY_RANDOM_BUILDERS[name])


def family_of(model_type: str, model_spec: str) -> ModuleType:
    """The family module that handles ``model_type``; UnsupportedModelError names
    ``model_spec`` otherwise."""
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"{model_spec}: model_type {model_type!r} has no model family; supported: {sorted(FAMILIES)}"
        )
    return FAMILIES[model_type]


def load_adapter(model_spec: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> VideoAdapter:
    """The vision side of ``model_spec``, by its family's adapter (chosen by the checkpoint
    config's ``model_type``). ``dtype=None`` keeps the checkpoint's dtype."""
    model_path = resolve_model(model_spec)
    family = family_of(AutoConfig.from_pretrained(model_path).model_type, model_spec)
    return family.ADAPTER(model_spec, model_path, device=device, dtype=dtype)


def prompt_layout(model: nn.Module, tokenizer, model_spec: str) -> PromptLayout:
    """The query-side layout of a loaded full model (``AutoModelForImageTextToText``) and
    its tokenizer."""
    return family_of(model.config.model_type, model_spec).LAYOUT(model, tokenizer)
