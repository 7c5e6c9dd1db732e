"""Benchmark the query stage: a video's questions answered together from one prefix.

For each frame count, grid and retention (1.0 = the full, unmerged tokens), on a
synthetic token set of the model's hidden size written to and read back from a local
token store, with ``--counts`` questions per video (``--max-new-tokens`` each, greedy):

- ``load``: reading the token set from the store; ``prefill``: the LLM over the prefix;
- ``video_{n}q``: one video end to end as ``sttm query`` runs it -- load, then
  ``QueryEngine.prefill_and_answer_all`` (the first question in the prefill's forward,
  the others' prompts in one more, one forward per new token for all), and its speed-up
  over the full tokens; ``questions_per_s`` = n / that time;
- ``answer_{n}q``: the answering phase alone, ``answer_all`` on a prefilled prefix;
- ``one_by_one_{n}q``: the previous path, side by side: load, the first question in the
  prefill's forward, then the others one at a time (``answer``), each token a forward;
- ``further_ttft``: time to first token of one more question on a prefilled prefix,
  also as a share of the full tokens' prefill;
- with ``--check``: the share of questions whose answer together equals the answer of a
  fresh prefill per question, and how far apart their first-token logits are.

    python -m jobs.bench_query --model tiny-random:qwen2-vl --frames 8 16 --grids 14 \\
        --retentions 0.5 0.3 --out jobs/results/bench_query_cpu.json

Times are medians over ``--repeats`` runs after one warm-up, synchronized on CUDA. No
video decoding is involved (the tokens come from ``jobs.bench_sttm.synthetic_video``).
"""
from __future__ import annotations

import argparse
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
from pipeline.query import (DECODING_STEPS, GROUPED_QUERY_ATTENTION, GROUPED_QUERY_SDPA, Decoding,
                            QueryEngine)

# --attentions: the language model's attention under block masks
ATTENTIONS = {"split_kv": GROUPED_QUERY_ATTENTION, "sdpa": GROUPED_QUERY_SDPA}
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
    merge = getattr(engine.model.config.vision_config, "spatial_merge_size", None)
    if merge:  # the Qwen families: the unmerged grid of patches
        model_extra = {"video_grid_thw": [frames, side * merge, side * merge], "second_per_grid_t": 1.0,
                       "frame_seconds": [float(t) for t in range(frames)]}
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


def use_attention(engine: QueryEngine, name: str) -> None:
    """Run the engine's language model with the registered attention ``name`` from now
    on (decoding graphs captured with another are dropped)."""
    engine.model.config.get_text_config()._attn_implementation = name
    if engine._static_decoder is not None:
        engine._static_decoder.steps.clear()


def median_of(measure, repeats: int) -> float:
    """Median of ``measure()`` (seconds) over ``repeats`` runs after one warm-up."""
    measure()
    return statistics.median(measure() for _ in range(repeats))


def synchronized_now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def bench_one(engine: QueryEngine, store: TokenStore, stored: StoredTokenSet, args) -> dict:
    """The timings of one token set (seconds) and, with ``args.check``, the agreement of
    answers together with answers alone."""
    store.write(stored)
    decoding = Decoding(max_new_tokens=args.max_new_tokens)
    questions = QUESTIONS[: max(args.counts)]

    def now() -> float:
        return synchronized_now(engine.device)

    def video(count: int) -> float:
        start = now()
        engine.prefill_and_answer_all(store.read(stored.video_id), questions[:count], decoding)
        return now() - start

    def one_by_one(count: int) -> float:
        start = now()
        prefix, _ = engine.prefill_and_answer(store.read(stored.video_id), questions[0], **vars(decoding))
        for question in questions[1:count]:
            engine.answer(prefix, question, **vars(decoding))
        return now() - start

    prefix = engine.prefill(stored)

    def answering(count: int) -> float:
        start = now()
        engine.answer_all(prefix, questions[:count], decoding)
        return now() - start

    def further_first_token() -> float:
        start = now()
        engine.answer(prefix, questions[-1], max_new_tokens=1)
        return now() - start

    def load() -> float:
        start = time.perf_counter()
        store.read(stored.video_id)
        return time.perf_counter() - start

    repeats = args.repeats
    timings = dict(
        load_s=median_of(load, repeats),
        prefill_s=median_of(lambda: engine.prefill(stored).prefill_s, repeats),
        further_ttft_s=median_of(further_first_token, repeats),
    )
    for count in args.counts:
        timings[f"video_{count}q_s"] = median_of(lambda: video(count), repeats)
        timings[f"answer_{count}q_s"] = median_of(lambda: answering(count), repeats)
    if not args.skip_one_by_one:
        timings[f"one_by_one_{max(args.counts)}q_s"] = median_of(lambda: one_by_one(max(args.counts)), max(1, repeats // 2))
    result = dict(prefix_tokens=prefix.length, timings=timings)
    if args.check:
        result["check"] = agreement(engine, stored, prefix, questions, decoding)
    return result


def agreement(engine: QueryEngine, stored: StoredTokenSet, prefix, questions: list[str], decoding: Decoding) -> dict:
    """How answers together compare with a fresh prefill per question: the share of
    equal answers (token for token), of equal first tokens, and the largest absolute
    difference of first-token logits (float32, relative to their spread)."""
    _, together = engine.prefill_and_answer_all(stored, questions, decoding)
    alone = [engine.prefill_and_answer(stored, question, **vars(decoding))[1] for question in questions]
    logits_together = engine.next_token_logits_all(prefix, questions)
    logits_alone = torch.stack([engine.next_token_logits(engine.prefill(stored), question) for question in questions])
    difference = (logits_together - logits_alone).abs().amax(dim=-1)
    spread = logits_alone.std(dim=-1)
    return dict(
        equal_answers=sum(a.token_ids == b.token_ids for a, b in zip(together, alone)) / len(questions),
        equal_first_tokens=sum(a.token_ids[:1] == b.token_ids[:1] for a, b in zip(together, alone)) / len(questions),
        first_logits_max_abs_diff=round(float(difference.max()), 5),
        first_logits_max_abs_diff_over_std=round(float((difference / spread).max()), 5),
        first_logits_top1_equal=float((logits_together.argmax(-1) == logits_alone.argmax(-1)).float().mean()),
    )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-random:qwen2-vl", help="model spec (path, hub id, tiny-random:...)")
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 16], help="T of the token grid")
    parser.add_argument("--grids", type=int, nargs="+", default=[14], help="H = W of the token grid")
    parser.add_argument("--retentions", type=float, nargs="+", default=[0.5, 0.3])
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 3, 10], help="questions per video")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--check", action="store_true", help="also compare answers together with answers alone")
    parser.add_argument("--skip-one-by-one", action="store_true", help="do not time the previous path")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: the checkpoint's)")
    parser.add_argument("--decoding-steps", default="auto", choices=DECODING_STEPS, help="QueryEngine's decoding_steps")
    parser.add_argument("--attentions", nargs="+", default=["split_kv"], choices=list(ATTENTIONS),
                        help="attention under block masks, each measured in turn: split_kv (CUDA kernel, "
                             "pipeline.split_kv_attention) or sdpa (matrix products / masked SDPA)")
    parser.add_argument("--attention-frames", type=int, nargs="+", default=None,
                        help="frame counts measured with every --attentions (default: all; the others with the first)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if max(args.counts) > len(QUESTIONS):
        parser.error(f"at most {len(QUESTIONS)} questions per video")

    dtype = getattr(torch, args.dtype) if args.dtype else None
    engine = QueryEngine(args.model, device=args.device, dtype=dtype, decoding_steps=args.decoding_steps)
    fingerprint = load_adapter(args.model, device="cpu", dtype=engine.dtype).fingerprint
    most = max(args.counts)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-query-") as store_dir:
        store = TokenStore(store_dir)
        for side, frames, attention in [(side, frames, attention) for side in args.grids for frames in args.frames
                                        for attention in args.attentions
                                        if attention == args.attentions[0] or frames in (args.attention_frames or [frames])]:
            use_attention(engine, ATTENTIONS[attention])
            full = None
            for retention in [1.0, *args.retentions]:
                stored = synthetic_token_set(engine, fingerprint, frames, side, retention)
                measured = bench_one(engine, store, stored, args)
                timings = measured["timings"]
                full = full or timings
                row = dict(
                    frames=frames, grid=f"{side}x{side}", attention=attention, target_retention=retention,
                    retention=round(stored.tokens.retention, 4), visual_tokens=stored.num_tokens,
                    prefix_tokens=measured["prefix_tokens"],
                    **{key.removesuffix("_s") + "_ms": round(value * 1e3, 3) for key, value in timings.items()},
                    **{f"video_{n}q_speedup": round(full[f"video_{n}q_s"] / timings[f"video_{n}q_s"], 2) for n in args.counts},
                    questions_per_s=round(most / timings[f"video_{most}q_s"], 2),
                    further_ttft_vs_full_prefill=round(timings["further_ttft_s"] / full["prefill_s"], 4),
                )  # fmt: skip
                if f"one_by_one_{most}q_s" in timings:
                    row["together_vs_one_by_one"] = round(timings[f"one_by_one_{most}q_s"] / timings[f"video_{most}q_s"], 2)
                if "check" in measured:
                    row["check"] = measured["check"]
                rows.append(row)
                print(json.dumps(row), flush=True)

    device = engine.device
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    result = dict(benchmark="query", model=args.model, device=device.type, device_name=device_name,
                  torch=torch.__version__, transformers=transformers.__version__, threads=torch.get_num_threads(),
                  dtype=str(engine.dtype).removeprefix("torch."), counts=args.counts, decoding_steps=args.decoding_steps,
                  max_new_tokens=args.max_new_tokens, repeats=args.repeats, rows=rows)  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
