"""Check the encode stage against the reference implementations it reproduces.

The adapters preprocess frames in torch because transformers' video processors need
torchvision, which the project's CPU environment cannot install beside its torch build.
Run this where torchvision is installed (a GPU worker image) to confirm, bit for bit:

1. ``adapter.preprocess`` equals the checkpoint's own video processor
   (``AutoProcessor.from_pretrained(...).video_processor``), and the processor expands
   the prompt's video placeholder into as many tokens as the adapter returns (+1 newline
   for LLaVA-OneVision);
2. ``adapter.encode`` on every available device and dtype equals the full model's
   ``get_video_features`` on the processor's own pixels;
3. with qwen-vl-utils and decord installed: ``QwenSampling`` picks the same frames, at
   the same size and values, and the same sample rate as qwen-vl-utils' ``fetch_video``.

    python -m jobs.check_processor_parity            # exit status 1 on any mismatch
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FORCE_QWENVL_VIDEO_READER", "decord")  # qwen-vl-utils' decord path, as ours

import torch
import transformers
from transformers import AutoModelForImageTextToText, AutoProcessor

from pipeline.decode import QwenSampling, UniformSampling, decode_video
from pipeline.models import load_adapter, resolve_model
from pipeline.models.qwen3_vl import Qwen3VLSampling
from pipeline.samples import SAMPLE_VIDEOS

FAMILIES = ["llava-onevision", "qwen2-vl", "qwen2.5-vl", "qwen3-vl"]
POLICIES = {
    "llava-onevision": [UniformSampling(3), UniformSampling(8)],
    "qwen2-vl": [QwenSampling(fps=0.5), QwenSampling(fps=1.0, max_pixels=128 * 28 * 28), UniformSampling(3)],
    "qwen2.5-vl": [QwenSampling(fps=0.5), UniformSampling(5)],
    "qwen3-vl": [Qwen3VLSampling(), Qwen3VLSampling(fps=0.5), UniformSampling(5)],
}


def main() -> int:
    try:
        import torchvision
    except ImportError:
        print("needs torchvision, which transformers' video processors use: run it on a worker image that has it")
        return 2
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}")
    failures = []

    def check(name: str, ok: bool) -> None:
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
        if not ok:
            failures.append(name)

    devices = [("cpu", torch.float32)] + (
        [("cuda", torch.float32), ("cuda", torch.bfloat16)] if torch.cuda.is_available() else []
    )
    for family in FAMILIES:
        path = resolve_model(f"tiny-random:{family}")
        processor = AutoProcessor.from_pretrained(path)
        adapters = {
            (device, dtype): load_adapter(f"tiny-random:{family}", device=device, dtype=dtype)
            for device, dtype in devices
        }
        full_models = {
            (device, dtype): AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device).eval()
            for device, dtype in devices
        }
        reference_adapter = adapters[("cpu", torch.float32)]
        for policy in POLICIES[family]:
            for video_path in SAMPLE_VIDEOS:
                video = decode_video(str(video_path), policy)
                case = f"{family} {video_path.name} {policy}"
                ours = reference_adapter.preprocess(video)
                # The frames are sampled already (Qwen3-VL's processor would sample again).
                theirs = processor.video_processor(
                    videos=[video.frames.numpy()], do_sample_frames=False, return_tensors="pt"
                )
                check(
                    f"{case}: pixels equal the video processor's",
                    all(torch.equal(ours[key], theirs[key]) for key in ours),
                )

                encoded = reference_adapter.encode(video)
                expected_video_tokens = encoded.tokens.shape[:3].numel() + encoded.model_extra.get(
                    "num_newline_tokens", 0
                )
                prompt = processor.apply_chat_template(
                    [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}],
                    add_generation_prompt=True,
                    tokenize=False,
                )
                ids = processor(
                    text=prompt, videos=[video.frames.numpy()], do_sample_frames=False, return_tensors="pt"
                ).input_ids
                video_token_count = int((ids == encoded.model_extra["video_token_id"]).sum())
                check(
                    f"{case}: processor expands the prompt to {expected_video_tokens} video tokens",
                    video_token_count == expected_video_tokens,
                )

                for (device, dtype), adapter in adapters.items():
                    tokens = adapter.encode(video).tokens
                    pixels = theirs["pixel_values_videos"].to(device)
                    grid = {key: theirs[key].to(device) for key in ours if key != "pixel_values_videos"}
                    with torch.no_grad():  # pixels by position: transformers versions name the argument differently
                        features = full_models[(device, dtype)].get_video_features(pixels, **grid).pooler_output
                    rows = torch.cat(list(features)) if isinstance(features, (tuple, list)) else features[0]
                    flat = tokens.reshape(-1, tokens.shape[-1])
                    check(
                        f"{case}: {device} {dtype} tokens equal get_video_features",
                        torch.equal(flat, rows[: len(flat)]),
                    )

    try:
        from qwen_vl_utils import fetch_video
    except ImportError as missing:
        print(f"skipped the qwen-vl-utils comparison: {missing}")
    else:
        for video_path in SAMPLE_VIDEOS:
            for fps, max_pixels in [(2.0, None), (0.5, 128 * 28 * 28)]:
                request = {"type": "video", "video": str(video_path), "fps": fps}
                if max_pixels:
                    request["max_pixels"] = max_pixels
                (frames, metadata), sample_fps = fetch_video(
                    request, return_video_sample_fps=True, return_video_metadata=True
                )
                policy = QwenSampling(fps=fps, max_pixels=max_pixels or QwenSampling.max_pixels)
                ours = decode_video(str(video_path), policy)
                case = f"qwen-vl-utils {video_path.name} fps={fps} max_pixels={max_pixels}"
                check(f"{case}: same frame indices", list(metadata["frames_indices"]) == ours.frame_indices)
                check(f"{case}: same frames", torch.equal(frames, ours.frames.permute(0, 3, 1, 2).float()))
                check(f"{case}: same sample fps", abs(sample_fps - ours.sampled_fps) < 1e-9)

    print(f"{len(failures)} failed" if failures else "all equal")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
