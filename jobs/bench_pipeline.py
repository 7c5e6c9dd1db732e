"""Videos per minute of the Ray pipeline against a plain sequential loop over the same stages.

    python -m jobs.bench_pipeline --videos 8 --frames 8 --out jobs/results/bench_pipeline_cpu.json

Both runs process the same corpus (copies of the bundled sample videos, each with distinct
bytes so nothing is skipped) into fresh stores, with the same model and settings. The
sequential loop calls ``DecodeStage`` and ``TokenizeStage`` directly, one video at a time,
in this process; the Ray run is ``run_preprocess`` on an embedded local cluster.
"""
from __future__ import annotations

import argparse
import json
import os
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
        ray.init(address="local", include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        started = time.perf_counter()
        summary = run_preprocess(PreprocessConfig(output=str(Path(tmp) / "ray"), **settings))
        ray_s = time.perf_counter() - started
        ray.shutdown()
    assert summary.stored == args.videos, summary.to_dict()

    result = dict(benchmark="pipeline", machine=f"{os.cpu_count()} CPU cores, no GPU", model=args.model,
                  videos=args.videos, frames=args.frames,
                  sequential_s=round(sequential_s, 2), ray_s=round(ray_s, 2),
                  sequential_videos_per_min=round(60 * args.videos / sequential_s, 2),
                  ray_videos_per_min=round(60 * args.videos / ray_s, 2),
                  ray_over_sequential=round(sequential_s / ray_s, 2))
    print(f"{'loop':>12} {'seconds':>8} {'videos/min':>11}")
    print(f"{'sequential':>12} {result['sequential_s']:>8} {result['sequential_videos_per_min']:>11}")
    print(f"{'ray':>12} {result['ray_s']:>8} {result['ray_videos_per_min']:>11}")
    print(f"ray / sequential throughput: {result['ray_over_sequential']}x")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
