"""Videos per minute of the Ray pipeline against a plain sequential loop over the same
stages, and the start-up costs a user waits through.

    python -m jobs.bench_pipeline --videos 8 --frames 8 --out jobs/results/bench_pipeline_cpu.json

Both runs process the same corpus (copies of the bundled sample videos, each with distinct
bytes so nothing is skipped) into fresh stores, with the same model and settings. The
sequential loop calls ``DecodeStage`` and ``TokenizeStage`` directly, one video at a time,
in this process; the Ray run is ``run_preprocess`` starting its own local cluster.

Start-up: in the Ray run, the seconds until Ray is asked to start (inputs listed, encoder
facts, store checked) and until the first video's result; then `sttm preprocess` run
again over the finished store, as a new process (what a user types: imports included),
which records the run without starting Ray.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray

from pipeline.config import PreprocessConfig
from pipeline.fingerprint import config_fingerprint
from pipeline.inputs import list_inputs
from pipeline.models import load_adapter
from pipeline.run import run_preprocess
from pipeline.samples import SAMPLE_VIDEOS
from pipeline.stages import DecodeStage, TokenizeStage, sampling_dict


def make_corpus(directory: Path, count: int) -> None:
    directory.mkdir(parents=True)
    for i in range(count):
        (directory / f"clip{i}.mp4").write_bytes(SAMPLE_VIDEOS[i % len(SAMPLE_VIDEOS)].read_bytes() + bytes([i % 256]))


def sequential(config: PreprocessConfig) -> float:
    """Seconds for the stages called one video at a time, model loading included."""
    started = time.perf_counter()
    adapter = load_adapter(config.model, device="cpu")
    policy = config.sampling_policy() or adapter.default_sampling()
    sampling = sampling_dict(policy)
    fingerprint = config_fingerprint(model_id=config.model, model_revision=None, encoder_fingerprint=adapter.fingerprint,
                                     sampling=sampling, sttm=config.sttm_options())
    decode = DecodeStage(config.output, {}, policy, fingerprint)
    tokenize = TokenizeStage(config.output, {}, config.model, "cpu", None, config.sttm_options(), sampling,
                             adapter.fingerprint, fingerprint, "sequential")
    for item in list_inputs(config.input):
        result = tokenize.tokenize_one(decode.decode_one(item.video_id, item.uri))
        assert result["status"] == "stored", result
    return time.perf_counter() - started


class StartupClock:
    """A progress receiver (see ``pipeline.progress.Progress``) that notes when things happen."""

    def __init__(self):
        self.started = time.perf_counter()
        self.ray_asked_s: float | None = None
        self.first_result_s: float | None = None

    def phase(self, text: str) -> None:
        if "Ray" in text and self.ray_asked_s is None:
            self.ray_asked_s = time.perf_counter() - self.started

    def start(self, total: int, failed: int = 0) -> None:
        pass

    def result(self, video_id: str, status: str, message: str | None = None) -> None:
        if self.first_result_s is None:
            self.first_result_s = time.perf_counter() - self.started


def rerun_seconds(corpus: Path, store: Path, model: str, frames: int) -> tuple[float, float, dict]:
    """Wall and CPU (user + system) seconds of `sttm preprocess` over a finished store, as
    a new process, and its summary. On a shared machine the CPU seconds are what an idle
    one would wait."""
    command = [sys.executable, "-m", "pipeline.cli", "preprocess", str(corpus), "--output", str(store),
               "--model", model, "--frames", str(frames), "--json"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, json.loads(done.stdout)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--model", default="tiny-random:llava-onevision")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "videos"
        make_corpus(corpus, args.videos)
        settings = dict(input=str(corpus), model=args.model, frames=args.frames, progress=False)
        sequential_s = sequential(PreprocessConfig(output=str(Path(tmp) / "sequential"), **settings))
        clock = StartupClock()
        summary = run_preprocess(PreprocessConfig(output=str(Path(tmp) / "ray"), **settings), progress=clock)
        ray_s = time.perf_counter() - clock.started
        ray.shutdown()
        rerun_s, rerun_cpu_s, rerun = rerun_seconds(corpus, Path(tmp) / "ray", args.model, args.frames)
    assert summary.stored == args.videos, summary.to_dict()
    assert rerun["skipped"] == args.videos, rerun

    result = dict(benchmark="pipeline", machine=f"{os.cpu_count()} CPU cores, no GPU",
                  load_average_1min=round(os.getloadavg()[0], 1), model=args.model,
                  videos=args.videos, frames=args.frames,
                  sequential_s=round(sequential_s, 2), ray_s=round(ray_s, 2),
                  sequential_videos_per_min=round(60 * args.videos / sequential_s, 2),
                  ray_videos_per_min=round(60 * args.videos / ray_s, 2),
                  ray_over_sequential=round(sequential_s / ray_s, 2),
                  startup_until_ray_s=round(clock.ray_asked_s, 2), startup_until_first_result_s=round(clock.first_result_s, 2),
                  rerun_finished_store_s=round(rerun_s, 2), rerun_finished_store_cpu_s=round(rerun_cpu_s, 2),
                  rerun_recorded_s=rerun["seconds"])
    print(f"{'loop':>12} {'seconds':>8} {'videos/min':>11}")
    print(f"{'sequential':>12} {result['sequential_s']:>8} {result['sequential_videos_per_min']:>11}")
    print(f"{'ray':>12} {result['ray_s']:>8} {result['ray_videos_per_min']:>11}")
    print(f"ray / sequential throughput: {result['ray_over_sequential']}x")
    print(f"start-up: {result['startup_until_ray_s']} s until Ray is asked for, "
          f"{result['startup_until_first_result_s']} s until the first video's result")
    print(f"re-run over the finished store: {result['rerun_finished_store_s']} s ({result['rerun_finished_store_cpu_s']} "
          f"CPU s) as a new `sttm preprocess` process, {result['rerun_recorded_s']} s of it in run_preprocess; "
          f"no Ray started")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
