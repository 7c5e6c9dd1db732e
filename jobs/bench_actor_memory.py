"""Memory of the job's decode and encode actors over a long corpus: does it stay flat?

    python -m jobs.bench_actor_memory --videos 320 --frames 8 --out jobs/results/bench_actor_memory_cpu.json

Runs ``run_preprocess`` on an embedded local Ray over ``--videos`` copies of the bundled
sample videos (distinct bytes, so every one is decoded, encoded and stored) and samples,
every ``--interval`` seconds, each actor process's RSS and USS (private memory: what the
process alone would free) together with how many videos the store holds so far. Prints
per actor the USS after the first tenth of the corpus and at the end, and the growth per
100 videos over the rest (a least-squares slope); the JSON keeps the whole series.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import psutil
import ray

from pipeline.config import PreprocessConfig
from pipeline.run import run_preprocess
from pipeline.samples import SAMPLE_VIDEOS

MIB = 2**20
STAGES = ("DecodeStage", "TokenizeStage")


def make_corpus(directory: Path, count: int) -> None:
    directory.mkdir(parents=True)
    for i in range(count):  # distinct trailing bytes: distinct content hashes, one token set each
        data = SAMPLE_VIDEOS[i % len(SAMPLE_VIDEOS)].read_bytes() + i.to_bytes(4, "little")
        (directory / f"clip{i:04d}.mp4").write_bytes(data)


def actor_processes() -> dict[int, str]:
    """pid -> stage name of the Ray actor processes running our stages, among this
    process's descendants (its local Ray's workers; not other jobs on the machine)."""
    found = {}
    for process in psutil.Process().children(recursive=True):
        try:
            command = " ".join(process.cmdline())
        except psutil.Error:
            continue
        for stage in STAGES:
            if stage in command and "ray::" in command:
                found[process.pid] = stage
    return found


def slope_per_100(points: list[tuple[int, float]]) -> float | None:
    """Least-squares growth of the value per 100 videos."""
    if len(points) < 3:
        return None
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mean_x) ** 2 for x in xs)
    return 100 * sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / var if var else None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=320)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--model", default="tiny-random:llava-onevision")
    parser.add_argument("--recycle-after", type=int, default=None,
                        help="recycle_workers_after (default: none, to see the growth itself)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        corpus, store = Path(scratch) / "videos", Path(scratch) / "store"
        make_corpus(corpus, args.videos)
        config = PreprocessConfig(input=str(corpus), output=str(store), model=args.model, frames=args.frames,
                                  progress=False, recycle_workers_after=args.recycle_after)
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False)
        try:
            outcome: dict = {}
            job = threading.Thread(target=lambda: outcome.update(summary=run_preprocess(config)))
            started = time.monotonic()
            job.start()
            samples = []  # (seconds, videos stored, pid, stage, rss MiB, uss MiB)
            while job.is_alive():
                done = sum(1 for _ in (store / "index").rglob("*.json")) if (store / "index").exists() else 0
                for pid, stage in actor_processes().items():
                    try:
                        memory = psutil.Process(pid).memory_full_info()
                    except psutil.Error:
                        continue
                    samples.append((round(time.monotonic() - started, 1), done, pid, stage,
                                    round(memory.rss / MIB, 1), round(memory.uss / MIB, 1)))
                job.join(timeout=args.interval)
        finally:
            ray.shutdown()
    summary = outcome["summary"]

    actors = []
    for pid in sorted({s[2] for s in samples}):
        series = [s for s in samples if s[2] == pid]
        warm = [s for s in series if s[1] >= args.videos // 10]  # after the first tenth: allocator warmed up
        actors.append(dict(
            pid=pid, stage=series[0][3], samples=len(series),
            first_uss_mib=warm[0][5] if warm else None, last_uss_mib=series[-1][5],
            max_rss_mib=max(s[4] for s in series), videos_seen=(series[0][1], series[-1][1]),
            uss_mib_per_100_videos=slope_per_100([(s[1], s[5]) for s in warm]),
            rss_mib_per_100_videos=slope_per_100([(s[1], s[4]) for s in warm]),
        ))
    print(f"{args.videos} videos, {args.frames} frames each: stored {summary.stored}, failed {summary.failed}, "
          f"{summary.seconds:.0f} s")
    print(f"{'actor':>8} {'stage':<14} {'videos':>10} {'USS first':>10} {'USS last':>9} {'max RSS':>8} "
          f"{'USS/100 videos':>15} {'RSS/100 videos':>15}")
    for a in actors:
        fmt = lambda v: "n/a" if v is None else f"{v:+.1f} MiB"  # noqa: E731
        print(f"{a['pid']:>8} {a['stage']:<14} {a['videos_seen'][0]:>4}-{a['videos_seen'][1]:<5} "
              f"{a['first_uss_mib'] or 0:>10.1f} {a['last_uss_mib']:>9.1f} {a['max_rss_mib']:>8.1f} "
              f"{fmt(a['uss_mib_per_100_videos']):>15} {fmt(a['rss_mib_per_100_videos']):>15}")
    result = dict(videos=args.videos, frames=args.frames, cpus=args.cpus, model=args.model,
                  recycle_workers_after=args.recycle_after,
                  machine=f"{platform.machine()} {os.cpu_count()} cores (CPU only)",
                  malloc_arena_max=os.environ.get("MALLOC_ARENA_MAX"),
                  summary=dict(stored=summary.stored, failed=summary.failed, seconds=round(summary.seconds, 1)),
                  actors=actors,
                  samples=[dict(zip(("s", "videos", "pid", "stage", "rss_mib", "uss_mib"), s)) for s in samples])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
