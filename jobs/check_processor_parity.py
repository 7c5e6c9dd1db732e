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
3. Qwen3-VL and Qwen3.5 (per-frame blocks): the processor's whole prompt, with the
   video's metadata (timestamps), is the token sequence the query stage builds for the
   unmerged video: the same timestamps, and the vision start/end markers in the same
   places;
4. with qwen-vl-utils and decord installed: ``QwenSampling`` picks the same frames, at
   the same size and values, and the same sample rate as qwen-vl-utils' ``fetch_video``.

    python -m jobs.check_processor_parity            # exit status 1 on any mismatch
    python -m jobs.check_processor_parity --families qwen3-vl,qwen3.5
    # on a worker without decord: decode here, check there
    python -m jobs.check_processor_parity --save-decoded decoded.pt.gz
    python -m jobs.check_processor_parity --decoded decoded.pt.gz
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import os
import sys
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FORCE_QWENVL_VIDEO_READER", "decord")  # qwen-vl-utils' decord path, as ours

import torch
import transformers
from transformers import AutoModelForImageTextToText, AutoProcessor

from pipeline.decode import QwenSampling, UniformSampling, decode_video
from pipeline.models import TINY_RANDOM_NAMES, load_adapter, resolve_model
from pipeline.models.qwen3_vl import Qwen3VLSampling
from pipeline.samples import SAMPLE_VIDEOS

# Qwen3.5 where the installed transformers has it.
FAMILIES = [name for name in ("llava-onevision", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3.5") if name in TINY_RANDOM_NAMES]
POLICIES = {
    "llava-onevision": [UniformSampling(3), UniformSampling(8)],
    "qwen2-vl": [QwenSampling(fps=0.5), QwenSampling(fps=1.0, max_pixels=128 * 28 * 28), UniformSampling(3)],
    "qwen2.5-vl": [QwenSampling(fps=0.5), UniformSampling(5)],
    "qwen3-vl": [Qwen3VLSampling(), Qwen3VLSampling(fps=0.5), UniformSampling(5)],
    "qwen3.5": [Qwen3VLSampling(), Qwen3VLSampling(fps=0.5), UniformSampling(5)],
}


def decoded_videos(families: list[str]) -> dict[tuple[str, str], object]:
    """Every (policy, video) the families' checks use, decoded: ``{(repr(policy), name): DecodedVideo}``."""
    return {
        (repr(policy), path.name): decode_video(str(path), policy)
        for family in families
        for policy in POLICIES[family]
        for path in SAMPLE_VIDEOS
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated tiny-random families")
    parser.add_argument("--decoded", help="read the decoded videos from this file (made with --save-decoded)")
    parser.add_argument("--save-decoded", help="decode the videos, write them to this file and stop")
    args = parser.parse_args()
    families = [name for name in args.families.split(",") if name in FAMILIES]
    if skipped := sorted(set(args.families.split(",")) - set(families)):
        print(f"skipped, not in this transformers' families: {skipped}")
    if args.save_decoded:
        with gzip.open(args.save_decoded, "wb", compresslevel=6) as file:
            torch.save(decoded_videos(families), file)
        return 0
    has_qwen3_5 = importlib.util.find_spec("transformers.models.qwen3_5") is not None
    print(f"transformers {transformers.__version__} has Qwen3.5 (transformers.models.qwen3_5): {has_qwen3_5}")
    try:
        import torchvision
    except ImportError:
        print("needs torchvision, which transformers' video processors use: run it on a worker image that has it")
        return 2
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}")
    if args.decoded:
        with gzip.open(args.decoded, "rb") as file:
            videos = torch.load(file, weights_only=False)
    else:
        videos = decoded_videos(families)
    failures = []

    def check(name: str, ok: bool) -> None:
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
        if not ok:
            failures.append(name)

    devices = [("cpu", torch.float32)] + (
        [("cuda", torch.float32), ("cuda", torch.bfloat16)] if torch.cuda.is_available() else []
    )
    for family in families:
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
                video = videos[repr(policy), video_path.name]
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

                if "frame_seconds" in encoded.model_extra:
                    check_frame_blocks(check, case, path, processor, video, encoded, prompt)

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
        if not args.decoded:
            from qwen_vl_utils import fetch_video
        else:
            raise ImportError("the videos were decoded elsewhere")
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


def check_frame_blocks(check, case, path, processor, video, encoded, prompt) -> None:
    """The processor's prompt, given the video's metadata (its timestamps), against the
    query stage's unmerged prompt: the chat template's text around the placeholder, and
    per temporal patch the family layout's timestamp and markers around its tokens."""
    from transformers.video_utils import VideoMetadata

    from pipeline.query import QueryEngine

    metadata = VideoMetadata(total_num_frames=video.num_frames_total, fps=video.fps, frames_indices=list(video.frame_indices))
    try:
        ids = processor(text=prompt, videos=[video.frames.numpy()], video_metadata=[metadata], do_sample_frames=False,
                        return_tensors="pt").input_ids[0].tolist()
    except Exception as error:  # noqa: BLE001 - report what this transformers version does not take
        check(f"{case}: processor takes the video's metadata ({type(error).__name__}: {error})", False)
        return
    engine = QueryEngine(path, dtype=torch.float32)
    before, after = engine._prompt_ids("What happens?")
    t, h, w = encoded.tokens.shape[:3]
    ours = list(before)
    for text_before, text_after in engine.family.frame_blocks(SimpleNamespace(model_extra=encoded.model_extra)):
        ours += text_before + [encoded.model_extra["video_token_id"]] * (h * w) + text_after
    ours += after
    same = ids == ours
    check(f"{case}: processor prompt (timestamps, vision start/end markers) is the query stage's", same)
    if not same:
        print("     processor:", engine.tokenizer.decode(ids).replace("<|video_pad|>", "")[:400])
        print("     ours:     ", engine.tokenizer.decode(ours).replace("<|video_pad|>", "")[:400])


if __name__ == "__main__":
    sys.exit(main())
