"""``tiny-random:<family>``: tiny random models of the real architectures, built offline.

Accepted wherever a model is named. Each is the family's real transformers class and
config with tiny sizes (2 layers, hidden 64) but real vision geometry (LLaVA-OneVision:
384 px frames, 14 px patches; Qwen: 14 px patches, 2x2 merge, 2-frame temporal patches),
random weights from a fixed seed, a byte-level BPE tokenizer trained here with the
``tokenizers`` library on a few sentences (carrying the family's special tokens and chat
template), and the processor configuration files a hub checkpoint of the family has.
Nothing is downloaded.

Built once into ``$STTM_CACHE/tiny-random/<family>-v<version>`` (default cache:
``~/.cache/sttm-pipeline``) and reused; a build with the same version, torch and
transformers gives the same files. Bump ``TINY_RANDOM_VERSION`` when a builder changes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

TINY_RANDOM_PREFIX = "tiny-random:"
TINY_RANDOM_VERSION = "1"
SEED = 0

# Large enough for the trained tokenizer (about 300 entries) plus headroom.
VOCAB_SIZE = 512
TEXT_SIZES = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1
)

_TOKENIZER_CORPUS = [
    "What is happening in this video?",
    "Describe the video in detail, frame by frame.",
    "The rabbit wakes up, stretches and walks out of its burrow into the meadow.",
    "Cyclists ride along a street while cars wait at the crossing.",
    "Answer with the option's letter from the given choices directly.",
    "A. The bird flies away. B. The rabbit eats an apple. C. It starts to rain. D. Nothing happens.",
    "How many people appear in the video, and what are they doing?",
    "The camera pans slowly from left to right over a green field under a blue sky.",
]

_QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip

# The chat templates the families' hub checkpoints carry (llava-hf's conversion script;
# Qwen2-VL / Qwen2.5-VL Instruct).
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

_PIXEL_SETTINGS = dict(
    resample=3, rescale_factor=1 / 255, do_resize=True, do_rescale=True, do_normalize=True, do_convert_rgb=True
)


def cache_root() -> Path:
    """``$STTM_CACHE``, or ``~/.cache/sttm-pipeline``."""
    return Path(os.environ.get("STTM_CACHE") or Path.home() / ".cache" / "sttm-pipeline")


def resolve_model(model_spec: str) -> str:
    """A local directory for ``tiny-random:<family>`` (built on first use); any other spec
    (a checkpoint directory or a hub id) unchanged."""
    if not model_spec.startswith(TINY_RANDOM_PREFIX):
        return model_spec
    family = model_spec[len(TINY_RANDOM_PREFIX) :]
    if family not in _BUILDERS:
        raise ValueError(f"unknown tiny-random family {family!r}; known: {sorted(_BUILDERS)}")
    target = cache_root() / "tiny-random" / f"{family}-v{TINY_RANDOM_VERSION}"
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename into place, so concurrent workers never see a
        # half-written model; the loser of a race discards its copy.
        staging = Path(tempfile.mkdtemp(prefix=f".{family}-", dir=target.parent))
        try:
            _BUILDERS[family](staging)
            staging.rename(target)
        except OSError:
            if not target.is_dir():
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def _train_tokenizer(special_tokens: list[str], chat_template: str, **named_tokens: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``_TOKENIZER_CORPUS``; ``special_tokens`` take
    ids 0, 1, ...; ``named_tokens`` become attributes (``tokenizer.video_token``)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE // 2 + 64,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_TOKENIZER_CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=named_tokens,
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def _save(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, directory: Path, **json_files: dict) -> None:
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    for name, content in json_files.items():
        (directory / f"{name}.json").write_text(json.dumps(content, indent=2) + "\n")


def _build_llava_onevision(directory: Path) -> None:
    """LlavaOnevisionForConditionalGeneration: SigLIP vision tower (384 px, patch 14 -> 27x27
    patches), 2-layer MLP projector, 2x2 bilinear pooling to 14x14, Qwen2 LLM."""
    tokenizer = _train_tokenizer(
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
    pixels = dict(size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3, **_PIXEL_SETTINGS)
    _save(
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


def _build_qwen(config_class, model_class, processor_class: str, vision_config: dict, directory: Path) -> None:
    """A Qwen2-VL-style model: the processor settings live in ``preprocessor_config.json``
    alone, as on the hub, and the video processor reads them from there."""
    tokenizer = _train_tokenizer(
        _QWEN_SPECIAL_TOKENS,
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
    _save(
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
            **_PIXEL_SETTINGS,
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


_BUILDERS = {
    "llava-onevision": _build_llava_onevision,
    "qwen2-vl": _build_qwen2_vl,
    "qwen2.5-vl": _build_qwen2_5_vl,
}
