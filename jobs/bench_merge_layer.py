"""What merging inside the LLM (merge layer k = 2, the paper's 7B setting) costs against
merging before it (k = 0): store bytes, preprocessing time, time to first token and a
10-question workload per video.

``bytes`` (CPU, no model): the token-set bytes per video of LLaVA-OneVision-7B shapes
(C = 3584, 4 key/value heads of 128, bfloat16) at k = 0 and k = 2, computed from the
format (schemas/token_set.json), and checked against the size of real token sets of those
shapes written to a local store for a small frame count.

``gpu`` (needs a CUDA device and a checkpoint, e.g. ``jobs.random_checkpoint``): per
retention, one video of ``--frames`` frames of synthetic visual tokens
(``jobs.bench_sttm.synthetic_video``) stored at k = 0 and k = 2, then:

- ``encode_ms``: the vision side on random frames (the same at both k);
- ``merge_ms``: k = 0: STTM to the budget; k = 2: the LLM's first 2 layers over the
  unmerged prefix plus STTM on their output (``pipeline.merge_layer.LayerPrefix``);
- ``write_ms`` and ``bytes``: the token set written to a local store;
- ``ttft_ms``: one question on the stored video, from the start of its prefill to its
  first token (``prefill_and_answer``);
- ``video_10q_ms``: 10 questions answered together (``prefill_and_answer_all``,
  ``--max-new-tokens`` each), with CUDA-graph decoding steps (the default on a GPU) and
  with eager ones (``dynamic``), and the share of answers the two paths agree on.

    python -m jobs.bench_merge_layer bytes --out jobs/results/bench_merge_layer_bytes.json
    python -m jobs.bench_merge_layer gpu --model /tmp/ov7b --out jobs/results/bench_merge_layer_h200.json
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers

import sttm
from jobs.bench_query import QUESTIONS
from jobs.bench_sttm import synthetic_video
from pipeline.decode import DecodedVideo
from pipeline.models.base import EncodedVideo
from pipeline.store import StoredTokenSet, TokenStore

# LLaVA-OneVision-7B (Qwen2-7B decoder) and its 14x14 pooled grid per frame.
SHAPES_7B = dict(channels=3584, kv_heads=4, head_dim=128, itemsize=2, grid=14)
# Per merged token: frame, box (4), num_patches, int32; per patch: assignment, int32.
TOKEN_METADATA_BYTES = 4 * 6
PATCH_METADATA_BYTES = 4


def token_set_bytes(frames: int, retention: float, merge_layer: int, text_before: int, after_video: int = 1,
                    channels: int = 3584, kv_heads: int = 4, head_dim: int = 128, itemsize: int = 2, grid: int = 14,
                    kept: int | None = None) -> dict:
    """The payload bytes of one token set, by the format: features, per-token and per-patch
    metadata, and at k > 0 the prefix states and the keys and values of k layers over the
    unmerged prefix (``text_before`` + video + ``after_video`` rows). ``kept``: the merged
    token count (default: the budget's, ``floor(retention * T*H*W)``)."""
    patches = frames * grid * grid
    kept = math.floor(retention * patches) if kept is None else kept
    features = kept * channels * itemsize
    metadata = kept * TOKEN_METADATA_BYTES + patches * PATCH_METADATA_BYTES
    prefix_states = layer_kv = 0
    if merge_layer:
        prefix_states = (text_before + after_video) * channels * itemsize
        layer_kv = merge_layer * 2 * kv_heads * (text_before + patches + after_video) * head_dim * itemsize
    return dict(features=features, metadata=metadata, prefix_states=prefix_states, layer_kv=layer_kv,
                total=features + metadata + prefix_states + layer_kv)


def random_token_set(frames: int, retention: float, merge_layer: int, text_before: int, seed: int = 0) -> StoredTokenSet:
    """A token set of 7B shapes with random bf16 values (random bytes do not compress,
    like real features), merged to ``retention`` by STTM on random tokens."""
    s = SHAPES_7B
    generator = torch.Generator().manual_seed(seed)
    x = synthetic_video(frames, s["grid"], s["channels"], torch.device("cpu"), seed=seed)
    tokens = sttm.merge_to_budget(x, retention)
    patches = frames * s["grid"] ** 2
    layer = {}
    if merge_layer:
        rows = text_before + patches + 1
        layer = dict(
            llm_fingerprint="sha256:" + "1" * 64, prefix_text_ids=list(range(text_before)),
            prefix_states=torch.randn(text_before + 1, s["channels"], generator=generator).to(torch.bfloat16),
            layer_kv=torch.randn(merge_layer, 2, s["kv_heads"], rows, s["head_dim"], generator=generator).to(torch.bfloat16),
        )  # fmt: skip
    return StoredTokenSet(
        video_id=f"random-{frames}f-r{retention}-k{merge_layer}", source_uri="synthetic",
        content_hash="sha256:" + f"{seed:064x}", model_id="random-7b-shapes", model_revision=None,
        encoder_fingerprint="sha256:" + "0" * 64, config_fingerprint=f"{merge_layer:02d}{int(retention * 100):02d}" + "0" * 12,
        sampling={"frames": frames}, frame_indices=list(range(frames)), timestamps=[float(i) for i in range(frames)],
        model_extra={"grid_thw": [frames, s["grid"], s["grid"]]}, tokens=tokens, pipeline_version="bench",
        run_id="bench", merge_layer=merge_layer, **layer,
    )  # fmt: skip


def bench_bytes(args) -> dict:
    """Analytic bytes at ``args.frames``, and the formula checked against real objects."""
    rows = []
    for retention in args.retentions:
        for k in (0, 2):
            size = token_set_bytes(args.frames, retention, k, args.text_before)
            rows.append(dict(frames=args.frames, retention=retention, merge_layer=k, **{f"{n}_bytes": v for n, v in size.items()}))
    for row in rows:
        base = next(r for r in rows if r["retention"] == row["retention"] and r["merge_layer"] == 0)
        row["vs_k0"] = round(row["total_bytes"] / base["total_bytes"], 3)
    checks = []
    with tempfile.TemporaryDirectory() as directory:
        store = TokenStore(directory)
        for retention in args.retentions:
            for k in (0, 2):
                record = random_token_set(args.check_frames, retention, k, args.text_before)
                key = store.write(record)
                expected = token_set_bytes(args.check_frames, retention, k, args.text_before, kept=record.num_tokens)["total"]
                actual = store.object_size(key)
                checks.append(dict(frames=args.check_frames, retention=retention, merge_layer=k, num_tokens=record.num_tokens,
                                   payload_bytes=expected, object_bytes=actual, overhead_bytes=actual - expected))  # fmt: skip
    return dict(benchmark="merge_layer_bytes", shapes="LLaVA-OneVision-7B (C 3584, 4 kv heads x 128, bf16, 14x14 per frame)",
                text_before_video=args.text_before, rows=rows, checked_against_written_objects=checks)


# --- GPU ------------------------------------------------------------------------------------


def median_ms(measure, repeats: int) -> float:
    measure()  # warm-up
    return round(statistics.median(measure() for _ in range(repeats)) * 1000, 3)


def bench_gpu(args) -> dict:
    from pipeline.merge_layer import LayerPrefix
    from pipeline.models import load_adapter, resolve_model
    from pipeline.query import Decoding, QueryEngine

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(function):
        def run():
            sync()
            start = time.perf_counter()
            function()
            sync()
            return time.perf_counter() - start
        return run

    adapter = load_adapter(args.model, device=device, dtype=torch.bfloat16)
    layer_prefix = LayerPrefix(args.model, resolve_model(args.model), 2, device=device, dtype=torch.bfloat16)
    engine = QueryEngine(args.model, device=device, dtype=torch.bfloat16)
    frames = torch.randint(0, 256, (args.frames, 384, 384, 3), dtype=torch.uint8)
    video = DecodedVideo(uri="random", frames=frames, frame_indices=list(range(args.frames)),
                         timestamps=[float(i) for i in range(args.frames)], fps=1.0, num_frames_total=args.frames,
                         content_hash="sha256:" + "0" * 64)  # fmt: skip
    encoded = adapter.encode(video)
    encode_ms = median_ms(timed(lambda: adapter.encode(video)), args.repeats)
    tokens = synthetic_video(args.frames, 14, engine.hidden_size, device).to(engine.dtype)
    synthetic = EncodedVideo(tokens=tokens, model_extra=encoded.model_extra)
    decoding = Decoding(max_new_tokens=args.max_new_tokens)
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        store = TokenStore(directory)
        for retention in args.retentions:
            merge = lambda x: sttm.merge_to_budget(x, retention)  # noqa: E731
            for k in (0, 2):
                if k == 0:
                    merge_ms = median_ms(timed(lambda: merge(tokens)), args.repeats)
                    merged, layer = merge(tokens), {}
                else:
                    merge_ms = median_ms(timed(lambda: layer_prefix(synthetic, merge)), args.repeats)
                    states = layer_prefix(synthetic, merge)
                    merged = states.tokens
                    layer = dict(llm_fingerprint=layer_prefix.fingerprint, prefix_text_ids=states.text_before_video,
                                 prefix_states=states.prefix_states.cpu(), layer_kv=states.layer_kv.cpu())
                record = StoredTokenSet(
                    video_id=f"bench-r{retention}-k{k}", source_uri="synthetic", content_hash="sha256:" + "0" * 64,
                    model_id=args.model, model_revision=None, encoder_fingerprint=adapter.fingerprint,
                    config_fingerprint=f"{k:02d}{int(retention * 100):02d}" + "0" * 12, sampling={"frames": args.frames},
                    frame_indices=video.frame_indices, timestamps=video.timestamps, model_extra=encoded.model_extra,
                    tokens=merged.to("cpu"), pipeline_version="bench", run_id="bench", merge_layer=k, **layer,
                )  # fmt: skip
                start = time.perf_counter()
                key = store.write(record)
                write_ms = round((time.perf_counter() - start) * 1000, 3)
                stored = store.read(record.video_id)
                row = dict(retention=retention, merge_layer=k, num_tokens=stored.num_tokens, bytes=store.object_size(key),
                           encode_ms=encode_ms, merge_ms=merge_ms, write_ms=write_ms,
                           preprocess_ms=round(encode_ms + merge_ms + write_ms, 3))  # fmt: skip
                row["ttft_ms"] = median_ms(
                    lambda: engine.prefill_and_answer(stored, QUESTIONS[0], max_new_tokens=1)[1].ttft_s, args.repeats)
                answers = {}
                for mode, decoder in {"graphs": engine._static_decoder, "dynamic": None}.items():
                    kept, engine._static_decoder = engine._static_decoder, decoder
                    row[f"video_10q_{mode}_ms"] = median_ms(
                        timed(lambda: engine.prefill_and_answer_all(stored, QUESTIONS, decoding)), args.repeats)
                    answers[mode] = [a.token_ids for a in engine.prefill_and_answer_all(stored, QUESTIONS, decoding)[1]]
                    engine._static_decoder = kept
                # bf16: the two paths may differ where reassociated sums flip a near-tie
                row["graphs_equal_dynamic_answers"] = sum(a == b for a, b in zip(*answers.values())) / len(QUESTIONS)
                rows.append(row)
                print(json.dumps(row), flush=True)
    return dict(benchmark="merge_layer_gpu", model=args.model, device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                torch=torch.__version__, transformers=transformers.__version__, dtype="bfloat16", frames=args.frames,
                max_new_tokens=args.max_new_tokens, repeats=args.repeats, rows=rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=("bytes", "gpu"))
    parser.add_argument("--model", help="checkpoint (gpu)")
    parser.add_argument("--device", default="cuda", help="gpu part: where the model runs")
    parser.add_argument("--frames", type=int, default=128)
    parser.add_argument("--check-frames", type=int, default=4, help="frames of the written objects (bytes)")
    parser.add_argument("--text-before", type=int, default=3, help="text tokens before the video (LLaVA-OneVision's template: 3)")
    parser.add_argument("--retentions", type=float, nargs="+", default=[0.5, 0.3])
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    result = bench_bytes(args) if args.part == "bytes" else bench_gpu(args)
    result.update(machine=platform.machine())
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
