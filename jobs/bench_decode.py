"""Benchmark the decode stage: sampled frames per second per CPU core.

For each sample video and each model family's sampling recipe, times ``decode_video``
(open, seek, decode, and for the Qwen recipe the resize) and reports the sampled frames
it delivers per second of wall time and per second of CPU time. decord runs one decoding
thread per video (the pipeline scales out with one decode task per core), so frames per
CPU-second is the per-core throughput.

    python -m jobs.bench_decode --out jobs/results/bench_decode_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from pipeline.decode import FpsSampling, QwenSampling, UniformSampling, decode_video
from pipeline.samples import SAMPLE_VIDEOS

POLICIES = {
    "uniform 32 (LLaVA-OneVision)": UniformSampling(num_frames=32),
    "1 fps, max 64 (LLaVA-Video)": FpsSampling(fps=1.0, max_frames=64),
    "2 fps + pixel budget (Qwen2-VL)": QwenSampling(),
}


def measure(path: str, policy, repeats: int) -> dict:
    decode_video(path, policy)  # warm the page cache
    wall, cpu = [], []
    for _ in range(repeats):
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        video = decode_video(path, policy)
        wall.append(time.perf_counter() - wall_start)
        cpu.append(time.process_time() - cpu_start)
    frames = len(video.frame_indices)
    return {
        "sampled_frames": frames,
        "frame_size": list(video.frames.shape[1:3]),
        "source_frames": video.num_frames_total,
        "wall_s": statistics.median(wall),
        "cpu_s": statistics.median(cpu),
        "frames_per_s": frames / statistics.median(wall),
        "frames_per_cpu_s": frames / statistics.median(cpu),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    args = parser.parse_args()

    rows = []
    print("| video | policy | frames | size | wall ms | frames/s | frames/s per core |")
    print("|:--|:--|--:|:--:|--:|--:|--:|")
    for path in SAMPLE_VIDEOS:
        for name, policy in POLICIES.items():
            row = {"video": path.name, "policy": name, **measure(str(path), policy, args.repeats)}
            rows.append(row)
            print(
                f"| {row['video']} | {name} | {row['sampled_frames']} | {row['frame_size'][0]}x{row['frame_size'][1]} "
                f"| {row['wall_s'] * 1e3:.0f} | {row['frames_per_s']:.0f} | {row['frames_per_cpu_s']:.0f} |"
            )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}
        args.out.write_text(json.dumps({"machine": machine, "repeats": args.repeats, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
