"""Benchmark ``sttm.merge`` and ``sttm.merge_to_budget`` latency.

Runs on the GPU when there is one (timed with CUDA events), else on the CPU. For each
frame count and grid it first finds the thresholds of a ~50% and a ~30% budget on the
video, then times ``merge`` with those fixed thresholds and ``merge_to_budget`` itself.

    python -m jobs.bench_sttm --frames 16 64 128 --grids 14 27 --out jobs/results/bench_sttm_cpu.json

The input is a synthetic video with the structure that makes merging do real work: a
static background, a moving object and per-frame noise, in bfloat16, C = 3584.

On the CPU it also times the output features' segment sum (``sttm.segment_sum``, in index
order at any thread count) against the former CPU path, ``index_put_`` with accumulate
(thread-dependent order), on the same rows and tokens.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import sttm
from sttm.segment_sum import weighted_segment_sum


def synthetic_video(frames: int, side: int, channels: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """``[T, side, side, C]`` bf16: smooth background, a drifting square, small noise."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    coarse = torch.randn(1, channels, 4, 4, generator=generator)
    background = torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear").permute(0, 2, 3, 1)
    video = background.repeat(frames, 1, 1, 1)
    obj = torch.randn(channels, generator=generator)
    size = max(side // 4, 1)
    for t in range(frames):  # benchmark input only
        y = x = (t * side // max(frames, 1)) % (side - size + 1)
        video[t, y:y + size, x:x + size] = obj
    video += 0.3 * torch.randn(video.shape, generator=generator)
    return video.to(device=device, dtype=torch.bfloat16)


def time_ms(fn, device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn()`` in milliseconds, after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def index_put_segment_sum(rows: torch.Tensor, weight: torch.Tensor, segment: torch.Tensor,
                          counts: torch.Tensor) -> torch.Tensor:
    """The CPU segment sum before ``index_add_``: not reproducible above one thread."""
    sums = torch.zeros(counts.shape[0], rows.shape[1], dtype=weight.dtype, device=rows.device)
    sums.index_put_((segment,), rows * weight[:, None], accumulate=True)
    return sums.to(rows.dtype)


def segment_sum_timings(x: torch.Tensor, tokens: sttm.TokenSet, repeats: int) -> dict:
    """Median milliseconds (CPU) of the output features' segment sum of ``tokens``, now and
    before, timed alternately so that a changing load on the machine hits both alike."""
    rows = x.reshape(-1, x.shape[-1])
    segment = tokens.assignment.flatten().long()
    counts = tokens.num_patches.long()
    weight = (1.0 / counts.float())[segment]
    sums = dict(now=weighted_segment_sum, before=index_put_segment_sum)
    times = {name: [] for name in sums}
    for attempt in range(2 + max(repeats, 5)):  # the first two are warm-up
        for name, segment_sum in sums.items():
            begin = time.perf_counter()
            segment_sum(rows, weight, segment, counts)
            if attempt >= 2:
                times[name].append((time.perf_counter() - begin) * 1e3)
    now_ms, before_ms = statistics.median(times["now"]), statistics.median(times["before"])
    return dict(segment_sum_ms=round(now_ms, 3), index_put_ms=round(before_ms, 3),
                index_put_over_segment_sum=round(before_ms / now_ms, 2))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 64, 128])
    parser.add_argument("--grids", type=int, nargs="+", default=[14, 27])
    parser.add_argument("--retentions", type=float, nargs="+", default=[0.5, 0.3])
    parser.add_argument("--channels", type=int, default=3584)
    parser.add_argument("--repeats", type=int, default=None, help="default: 50 on GPU, 3 on CPU")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    repeats = args.repeats or (50 if device.type == "cuda" else 3)
    rows = []
    for side in args.grids:
        for frames in args.frames:
            x = synthetic_video(frames, side, args.channels, device)
            for retention in args.retentions:
                budgeted = sttm.merge_to_budget(x, retention)
                merge_ms = time_ms(lambda: sttm.merge(x, tau_s=budgeted.tau_s, tau_t=budgeted.tau_t), device, repeats)
                budget_ms = time_ms(lambda: sttm.merge_to_budget(x, retention), device, max(repeats // 5, 1))
                rows.append(dict(frames=frames, grid=f"{side}x{side}", channels=args.channels,
                                 target_retention=retention, retention=round(budgeted.retention, 4),
                                 tau=round(budgeted.tau_s, 5), merge_ms=round(merge_ms, 3),
                                 merge_to_budget_ms=round(budget_ms, 3),
                                 budget_over_merge=round(budget_ms / merge_ms, 2)))
                if device.type == "cpu":
                    rows[-1].update(segment_sum_timings(x, budgeted, repeats))
                print_row(rows[-1])

    device_name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    result = dict(benchmark="sttm", device=device.type, device_name=device_name, torch=torch.__version__,
                  threads=torch.get_num_threads(), dtype="bfloat16", repeats=repeats, rows=rows)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return rows


def print_row(row: dict) -> None:
    with_sums = "segment_sum_ms" in row
    if not hasattr(print_row, "printed"):
        print(f"{'T':>4} {'grid':>6} {'target':>6} {'kept':>6} {'merge ms':>9} {'budget ms':>10} {'ratio':>6}"
              + (f" {'sum ms':>8} {'index_put_ ms':>13} {'ratio':>6}" if with_sums else ""))
        print_row.printed = True
    print(f"{row['frames']:>4} {row['grid']:>6} {row['target_retention']:>6.2f} {row['retention']:>6.3f} "
          f"{row['merge_ms']:>9.2f} {row['merge_to_budget_ms']:>10.2f} {row['budget_over_merge']:>6.2f}"
          + (f" {row['segment_sum_ms']:>8.2f} {row['index_put_ms']:>13.2f} {row['index_put_over_segment_sum']:>6.2f}"
             if with_sums else ""))


if __name__ == "__main__":
    main()
