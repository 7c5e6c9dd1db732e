"""``tiny-random:<name>``: tiny random models of the real architectures, built offline.

Accepted wherever a model is named. Each family module's ``TINY_RANDOM`` builders make
its real transformers class and config with tiny sizes (2 layers, hidden 64) but real
vision geometry, random weights from a fixed seed, a byte-level BPE tokenizer trained
here with the ``tokenizers`` library on a few sentences (carrying the family's special
tokens and chat template), and the processor configuration files a hub checkpoint of the
family has. Nothing is downloaded. This module holds what the builders share and the
build-once cache; ``registry.resolve_model`` picks the builder.

Built once into ``$STTM_CACHE/tiny-random/<name>-v<version>`` (default cache:
``~/.cache/sttm-pipeline``) and reused; a build with the same version, torch and
transformers gives the same files. Bump ``TINY_RANDOM_VERSION`` when a builder changes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

TINY_RANDOM_PREFIX = "tiny-random:"
TINY_RANDOM_VERSION = "2"
SEED = 0

# Large enough for the trained tokenizer (about 300 entries) plus headroom.
VOCAB_SIZE = 512
TEXT_SIZES = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1
)

TOKENIZER_CORPUS = [
    "What is happening in this video?",
    "Describe the video in detail, frame by frame.",
    "The rabbit wakes up, stretches and walks out of its burrow into the meadow.",
    "Cyclists ride along a street while cars wait at the crossing.",
    "Answer with the option's letter from the given choices directly.",
    "A. The bird flies away. B. The rabbit eats an apple. C. It starts to rain. D. Nothing happens.",
    "How many people appear in the video, and what are they doing?",
    "The camera pans slowly from left to right over a green field under a blue sky.",
]

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip

PIXEL_SETTINGS = dict(
    resample=3, rescale_factor=1 / 255, do_resize=True, do_rescale=True, do_normalize=True, do_convert_rgb=True
)


def cache_root() -> Path:
    """``$STTM_CACHE``, or ``~/.cache/sttm-pipeline``."""
    return Path(os.environ.get("STTM_CACHE") or Path.home() / ".cache" / "sttm-pipeline")


def build_once(name: str, builder: Callable[[Path], None]) -> str:
    """The directory of ``tiny-random:<name>``, made by ``builder(directory)`` on first use."""
    target = cache_root() / "tiny-random" / f"{name}-v{TINY_RANDOM_VERSION}"
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename into place, so concurrent workers never see a
        # half-written model; the loser of a race discards its copy.
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        try:
            builder(staging)
            staging.rename(target)
        except OSError:
            if not target.is_dir():
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def train_tokenizer(special_tokens: list[str], chat_template: str, **named_tokens: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``TOKENIZER_CORPUS``; ``special_tokens`` take
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
    bpe.train_from_iterator(TOKENIZER_CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=named_tokens,
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def save(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, directory: Path, **json_files: dict) -> None:
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    for name, content in json_files.items():
        (directory / f"{name}.json").write_text(json.dumps(content, indent=2) + "\n")
