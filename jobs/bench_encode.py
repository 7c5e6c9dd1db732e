"""Benchmark the encode stage: the adapter's frames/s against the bare vision tower.

For each frame count it times, in one run on one device:

- ``tower``: the SigLIP tower's forward alone on ready pixels (the floor);
- ``encode``: ``adapter.encode`` (normalize, tower, projector, 2x2 pooling) on frames
  already resized to the model's size, as the pipeline's CPU decode workers hand them over;
- ``encode+sttm``: ``encode`` then ``sttm.merge_to_budget`` at 50%;

and the peak GPU memory of ``encode+sttm`` for one video. Frames are random 720p uint8
(decoding is benchmarked on the CPU by ``jobs.bench_decode``).

    python -m jobs.bench_encode --model /tmp/llava-onevision-7b-random --frames 64 128 \\
        --out jobs/results/bench_encode_h100.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

import sttm
from pipeline.decode import DecodedVideo
from pipeline.models import load_adapter
from pipeline.models.base import resize_like_video_processor


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` after one warm-up, synchronized on CUDA."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--frames", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    adapter = load_adapter(args.model, device=device, dtype=torch.bfloat16)
    rows = []
    for frames in args.frames:
        generator = torch.Generator().manual_seed(frames)
        video = DecodedVideo(uri="synthetic", frames=torch.randint(0, 256, (frames, 720, 1280, 3), dtype=torch.uint8,
                                                                   generator=generator),
                             frame_indices=list(range(frames)), timestamps=[i / 25 for i in range(frames)], fps=25.0,
                             num_frames_total=frames, content_hash="sha256:" + "0" * 64)
        # As the pipeline hands them over: resized to the model's size on a CPU decode worker.
        if adapter.input_frame_size:
            video = replace(video, frames=resize_like_video_processor(
                video.frames.permute(0, 3, 1, 2), adapter.input_frame_size).permute(0, 2, 3, 1).contiguous())
        pixels = adapter.preprocess(video)["pixel_values_videos"][0].to(device, torch.bfloat16)
        with torch.no_grad():
            tower = timed(lambda: adapter.stage.vision_tower(pixels), args.repeats)
        encode = timed(lambda: adapter.encode(video), args.repeats)
        full = timed(lambda: sttm.merge_to_budget(adapter.encode(video).tokens, 0.5), args.repeats)
        peak_gib = float("nan")
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            sttm.merge_to_budget(adapter.encode(video).tokens, 0.5)
            peak_gib = torch.cuda.max_memory_allocated() / 2**30
        rows.append(dict(frames=frames, tower_s=round(tower, 4), encode_s=round(encode, 4),
                         encode_sttm_s=round(full, 4), tower_fps=round(frames / tower, 1),
                         encode_sttm_fps=round(frames / full, 1), overhead_vs_tower=round(full / tower - 1, 3),
                         peak_gib=round(peak_gib, 2)))
        print(json.dumps(rows[-1]))
    print(f"{'T':>4} {'tower fps':>10} {'encode+sttm fps':>16} {'overhead':>9} {'peak GiB':>9}")
    for r in rows:
        print(f"{r['frames']:>4} {r['tower_fps']:>10} {r['encode_sttm_fps']:>16} {r['overhead_vs_tower']:>9.1%} "
              f"{r['peak_gib']:>9}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(benchmark="encode", device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                                            torch=torch.__version__, model=args.model, rows=rows), indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
