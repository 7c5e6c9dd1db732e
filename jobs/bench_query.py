"""Benchmark the query stage: what merged tokens and a shared prefix save per question.

For each frame count, grid and retention (1.0 = the full, unmerged tokens), on a
synthetic token set of the model's hidden size written to and read back from a local
token store:

- ``load``: reading the token set from the store;
- ``prefill``: running the LLM over the video prefix alone;
- ``ttft``: time to first token of one question on a cold video, its prompt riding in the
  prefill's forward as the query stage does for a video's first question
  (``QueryEngine.prefill_and_answer``), and its speed-up over the full tokens;
- ``further_ttft``: time to first token of one more question on a prefilled prefix;
- ``shared`` vs ``fresh``: answering ``--questions`` questions as the query stage does
  (the first in the prefill's forward, the others from its prefix) vs with a fresh
  prefill, carrying its question, per question (same greedy answers, so the same work
  per answer);
- ``deepcopy`` vs ``crop``: forking the prefix cache per question by copying it vs by
  cropping the question back off (what the query stage does).

    python -m jobs.bench_query --model tiny-random:qwen2-vl --frames 8 16 --grids 14 \\
        --retentions 0.5 0.3 --out jobs/results/bench_query_cpu.json

Times are medians over ``--repeats`` runs after one warm-up, synchronized on CUDA. No
video decoding is involved (the tokens come from ``jobs.bench_sttm.synthetic_video``).
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers

import sttm
from jobs.bench_sttm import synthetic_video
from pipeline.fingerprint import config_fingerprint
from pipeline.models import load_adapter
from pipeline.query import MULTIMODAL_ROPE_POSITIONS, QueryEngine, VideoPrefix
from pipeline.store import StoredTokenSet, TokenStore

QUESTIONS = [
    "What is happening in this video?",
    "Describe the video in detail, frame by frame.",
    "How many people appear in the video, and what are they doing?",
    "What color is the largest object in the scene?",
    "Where does the video take place?",
    "What happens at the end of the video?",
    "Is the camera moving or static?",
    "Summarize the video in one sentence.",
    "What is the first thing that moves?",
    "Which objects appear more than once?",
]


def synthetic_token_set(engine: QueryEngine, fingerprint: str, frames: int, side: int, retention: float) -> StoredTokenSet:
    """A stored token set of ``[frames, side, side, C]`` synthetic tokens in the model's
    dtype, merged to ``retention`` (1.0: nothing merged), with the ``model_extra`` the
    model family needs (Qwen: 2-frame temporal patches of 1 s, 2x2 merge)."""
    x = synthetic_video(frames, side, engine.hidden_size, torch.device("cpu")).to(engine.dtype)
    tokens = sttm.merge(x, tau_s=2.0) if retention >= 1.0 else sttm.merge_to_budget(x, retention)
    model_extra = {}
    if engine.model_type in MULTIMODAL_ROPE_POSITIONS:
        merge = engine.model.config.vision_config.spatial_merge_size
        model_extra = {"video_grid_thw": [frames, side * merge, side * merge], "second_per_grid_t": 1.0}
    sampling = {"synthetic": True, "frames": frames, "side": side}
    return StoredTokenSet(
        video_id=f"synthetic-{frames}x{side}x{side}-r{retention}",
        source_uri="synthetic",
        content_hash="sha256:" + "0" * 64,
        model_id=engine.model_spec,
        model_revision=None,
        encoder_fingerprint=fingerprint,
        config_fingerprint=config_fingerprint(
            model_id=engine.model_spec,
            model_revision=None,
            encoder_fingerprint=fingerprint,
            sampling=sampling,
            sttm={"budget": retention},
        ),
        sampling=sampling,
        frame_indices=list(range(frames)),
        timestamps=[float(t) for t in range(frames)],
        model_extra=model_extra,
        tokens=tokens,
        pipeline_version="bench",
        run_id="bench-query",
    )


def median_of(measure, repeats: int) -> float:
    """Median of ``measure()`` (seconds) over ``repeats`` runs after one warm-up."""
    measure()
    return statistics.median(measure() for _ in range(repeats))


def synchronized_now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def bench_one(engine: QueryEngine, store: TokenStore, stored: StoredTokenSet, args) -> dict:
    """The timings of one token set (seconds)."""
    store.write(stored)
    questions = QUESTIONS[: args.questions]
    decoding = dict(max_new_tokens=args.max_new_tokens)

    def load() -> float:
        start = time.perf_counter()
        store.read(stored.video_id)
        return time.perf_counter() - start

    def cold_first_token() -> float:
        """The fused call's time to first token counts from the start of its prefill."""
        _, answer = engine.prefill_and_answer(stored, questions[0], max_new_tokens=1)
        return answer.ttft_s

    def shared() -> list[float]:
        """Cumulative seconds after 1, 2, ... questions answered from one prefix, the
        first in its prefill's forward (its times include the prefill)."""
        prefix, first = engine.prefill_and_answer(stored, questions[0], **decoding)
        elapsed, cumulative = first.total_s, [first.total_s]
        for question in questions[1:]:
            elapsed += engine.answer(prefix, question, **decoding).total_s
            cumulative.append(elapsed)
        return cumulative

    def fresh() -> list[float]:
        """Cumulative seconds after 1, 2, ... questions, each in its own full prefill."""
        elapsed, cumulative = 0.0, []
        for question in questions:
            elapsed += engine.prefill_and_answer(stored, question, **decoding)[1].total_s
            cumulative.append(elapsed)
        return cumulative

    def further_question_first_token() -> float:
        """Time to first token of one more question on an already prefilled prefix."""
        prefix, _ = engine.prefill_and_answer(stored, questions[0], max_new_tokens=1)
        return engine.answer(prefix, questions[-1], max_new_tokens=1).ttft_s

    prefix: VideoPrefix = engine.prefill(stored)

    def deepcopy_cache() -> float:
        start = synchronized_now(engine.device)
        copy.deepcopy(prefix.cache)
        return synchronized_now(engine.device) - start

    def crop_cache() -> float:
        cache = copy.deepcopy(prefix.cache)
        start = synchronized_now(engine.device)
        cache.crop(-1)  # a view per layer, whatever the number of tokens removed
        return synchronized_now(engine.device) - start

    repeats = args.repeats
    shared_runs = [shared() for _ in range(repeats + 1)][1:]  # the first is a warm-up
    fresh_runs = [fresh() for _ in range(repeats + 1)][1:]
    per_count = {}
    for count in sorted({min(3, len(questions)), len(questions)}):
        per_count[f"shared_{count}q_s"] = statistics.median(run[count - 1] for run in shared_runs)
        per_count[f"fresh_{count}q_s"] = statistics.median(run[count - 1] for run in fresh_runs)
    load_s = median_of(load, repeats)
    ttft_s = median_of(cold_first_token, repeats)
    return dict(
        load_s=load_s,
        prefill_s=median_of(lambda: engine.prefill(stored).prefill_s, repeats),
        ttft_s=ttft_s,
        load_ttft_s=load_s + ttft_s,
        further_ttft_s=median_of(further_question_first_token, repeats),
        shared_s=per_count[f"shared_{len(questions)}q_s"],
        fresh_s=per_count[f"fresh_{len(questions)}q_s"],
        **per_count,
        deepcopy_s=median_of(deepcopy_cache, repeats),
        crop_s=median_of(crop_cache, repeats),
        prefix_tokens=prefix.length,
    )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-random:qwen2-vl", help="model spec (path, hub id, tiny-random:...)")
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 16], help="T of the token grid")
    parser.add_argument("--grids", type=int, nargs="+", default=[14], help="H = W of the token grid")
    parser.add_argument("--retentions", type=float, nargs="+", default=[0.5, 0.3])
    parser.add_argument("--questions", type=int, default=8, choices=range(1, len(QUESTIONS) + 1))
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: the checkpoint's)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    dtype = getattr(torch, args.dtype) if args.dtype else None
    engine = QueryEngine(args.model, device=args.device, dtype=dtype)
    fingerprint = load_adapter(args.model, device="cpu", dtype=engine.dtype).fingerprint
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-query-") as store_dir:
        store = TokenStore(store_dir)
        for side in args.grids:
            for frames in args.frames:
                full_ttft_s = full_prefill_s = None
                for retention in [1.0, *args.retentions]:
                    stored = synthetic_token_set(engine, fingerprint, frames, side, retention)
                    timings = bench_one(engine, store, stored, args)
                    full_ttft_s = full_ttft_s or timings["load_ttft_s"]
                    full_prefill_s = full_prefill_s or timings["prefill_s"]
                    rows.append(dict(
                        frames=frames, grid=f"{side}x{side}", target_retention=retention,
                        retention=round(stored.tokens.retention, 4), visual_tokens=stored.num_tokens,
                        prefix_tokens=timings.pop("prefix_tokens"),
                        **{key.replace("_s", "_ms"): round(value * 1e3, 3) for key, value in timings.items()},
                        ttft_speedup=round(full_ttft_s / timings["load_ttft_s"], 2),
                        further_question_vs_full_prefill=round(timings["further_ttft_s"] / full_prefill_s, 4),
                        shared_speedup=round(timings["fresh_s"] / timings["shared_s"], 2),
                    ))  # fmt: skip
                    print_row(rows[-1], args.questions)

    device = engine.device
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    result = dict(benchmark="query", model=args.model, device=device.type, device_name=device_name,
                  torch=torch.__version__, transformers=transformers.__version__, threads=torch.get_num_threads(), dtype=str(engine.dtype).removeprefix("torch."),
                  questions=args.questions, max_new_tokens=args.max_new_tokens, repeats=args.repeats, rows=rows)  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return rows


def print_row(row: dict, questions: int) -> None:
    if not hasattr(print_row, "printed"):
        print(f"{'T':>4} {'grid':>6} {'kept':>6} {'N':>6} {'load ms':>8} {'prefill ms':>10} {'TTFT ms':>8} "
              f"{'x full':>6} {f'{questions}q shared ms':>15} {'fresh ms':>9} {'x':>5} {'deepcopy ms':>11} {'crop ms':>8}")  # fmt: skip
        print_row.printed = True
    print(f"{row['frames']:>4} {row['grid']:>6} {row['retention']:>6.3f} {row['visual_tokens']:>6} {row['load_ms']:>8.2f} "
          f"{row['prefill_ms']:>10.2f} {row['ttft_ms']:>8.2f} {row['ttft_speedup']:>6.2f} {row['shared_ms']:>15.2f} "
          f"{row['fresh_ms']:>9.2f} {row['shared_speedup']:>5.2f} {row['deepcopy_ms']:>11.3f} {row['crop_ms']:>8.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
