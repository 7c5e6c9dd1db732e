"""A random-weights checkpoint of LLaVA-OneVision-7B's real shapes, for GPU benchmarks.

No weights can be downloaded here, so the benchmarks time the real architecture with
random weights: SigLIP-so400m-patch14-384 (27 layers, width 1152), the 2-layer projector,
and a Qwen2-7B decoder (28 layers, width 3584, GQA 28/4 heads, vocabulary 152064), in
bfloat16 with SDPA attention. The processor files (tokenizer, chat template, video
processor) come from ``tiny-random:llava-onevision``; only ``config.json`` and the weights
change, so every loading path is the normal one.

    python -m jobs.random_checkpoint /tmp/llava-onevision-7b-random
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

from pipeline.models import resolve_model

SIGLIP_SO400M_384 = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                         num_hidden_layers=27, num_attention_heads=16, image_size=384, patch_size=14,
                         vision_use_head=False)
QWEN2_7B = dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                rope_theta=1000000.0, rms_norm_eps=1e-6)


def build(directory: Path, *, seed: int = 0) -> Path:
    """Write the checkpoint to ``directory`` (on the GPU if there is one) and return it."""
    tiny = Path(resolve_model("tiny-random:llava-onevision"))
    shutil.copytree(tiny, directory, dirs_exist_ok=True)
    tiny_config = json.loads((tiny / "config.json").read_text())
    special = {k: tiny_config["text_config"].get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = LlavaOnevisionConfig(
        text_config=dict(**QWEN2_7B, **special),
        vision_config=SIGLIP_SO400M_384,
        image_token_index=tiny_config["image_token_index"],
        video_token_index=tiny_config["video_token_index"],
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlavaOnevisionForConditionalGeneration(config).to(torch.bfloat16)
    for name in ("model.safetensors", "model.safetensors.index.json"):
        (directory / name).unlink(missing_ok=True)
    model.save_pretrained(directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("directory", type=Path)
    args = parser.parse_args()
    started = time.perf_counter()
    build(args.directory)
    print(f"wrote {args.directory} in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
