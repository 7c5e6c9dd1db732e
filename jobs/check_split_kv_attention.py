"""Check and time the split-KV attention kernel against the attention it replaces (CUDA).

For the query stage's shapes (LLaVA-OneVision-7B's decoder: 4 key/value heads of 128,
7 query heads each; a prefix of ``L`` keys in a cache of capacity ``S``; ``q`` questions
of ``t`` tokens under the block mask), on fresh random bf16 inputs:

- the kernel (``split_kv_attention``, also replayed from a CUDA graph) and the previous
  attention (``_grouped_query_attention(split_kv=False)``: matrix products or masked SDPA)
  against float64 softmax attention: ``||out - ref|| / ||ref||``; their max abs
  difference from each other;
- their times (median of CUDA-graph replays, ``triton.testing.do_bench``).

    python -m jobs.check_split_kv_attention --out jobs/results/split_kv_attention_h200.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import torch

from pipeline.query import _grouped_query_attention
from pipeline.split_kv_attention import split_kv_attention


def block_mask(rows_per_question: int, questions: int, prefix: int, capacity: int, device) -> torch.Tensor:
    """``[1, 1, n, S]``: the newest ``n = questions * rows_per_question`` tokens (each
    question's in a run, after earlier tokens of each question) see the prefix and their
    own question's tokens up to themselves; slots after them are unused."""
    earlier = 3  # tokens of each question already in the cache
    owner = torch.full((capacity,), -2, device=device)
    owner[:prefix] = -1
    old = torch.arange(questions, device=device).repeat_interleave(earlier)
    new = torch.arange(questions, device=device).repeat_interleave(rows_per_question)
    owner[prefix : prefix + old.numel()] = old
    start = prefix + old.numel()
    owner[start : start + new.numel()] = new
    slot = torch.arange(capacity, device=device)
    row_slot = torch.arange(start, start + new.numel(), device=device)
    own = (owner[None] == new[:, None]) & (slot[None] <= row_slot[:, None])
    return (own | (owner == -1)[None])[None, None]


def reference(query, key, value, mask) -> torch.Tensor:
    """float64 softmax attention, GQA by repeating keys: ``[1, n, H, D]``."""
    groups = query.shape[1] // key.shape[1]
    key, value = (x.double().repeat_interleave(groups, dim=1) for x in (key, value))
    scores = query.double() @ key.transpose(-1, -2) * query.shape[-1] ** -0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    return (torch.softmax(scores, -1) @ value).transpose(1, 2)


def graphed(function):
    """``function`` captured in a CUDA graph: a replay and its static output."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            function()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = function()
    return graph.replay, output


def relative_error(out, ref) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def main() -> None:
    import triton.testing

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    module = SimpleNamespace(num_key_value_groups=7)
    cases = [  # (name, questions, rows per question, prefix, capacity)
        ("decode 1q", 1, 1, 24_000, 28_672),
        ("decode 10q (16 rows)", 16, 1, 24_000, 28_672),
        ("prompts 10q x 41", 10, 41, 24_000, 28_672),
        ("prompts 3q x 41", 3, 41, 24_000, 28_672),
        ("decode 10q, 64 frames", 16, 1, 12_000, 16_384),
        ("prompts 10q x 41, 64 frames", 10, 41, 12_000, 16_384),
    ]
    rows = []
    torch.manual_seed(0)
    for name, questions, per_question, prefix, capacity in cases:
        n = questions * per_question
        query = torch.randn(1, 28, n, 128, device=device, dtype=torch.bfloat16)
        key = torch.randn(1, 4, capacity, 128, device=device, dtype=torch.bfloat16)
        value = torch.randn(1, 4, capacity, 128, device=device, dtype=torch.bfloat16)
        mask = block_mask(per_question, questions, prefix, capacity, device)
        ref = reference(query, key, value, mask)
        row = dict(case=name, query_rows=n, keys=capacity, prefix=prefix)
        for label, split_kv in (("split_kv", True), ("previous", False)):
            def run(split_kv=split_kv):
                return _grouped_query_attention(module, query, key, value, mask, split_kv=split_kv)[0]

            eager = run()
            replay, output = graphed(run)
            output.fill_(float("nan"))  # poisoned: the replay must write it all
            replay()
            torch.cuda.synchronize()
            row[f"{label}_rel_err"] = relative_error(eager, ref)
            row[f"{label}_graph_rel_err"] = relative_error(output, ref)
            row[f"{label}_ms"] = round(triton.testing.do_bench(replay, warmup=25, rep=200, return_mode="median"), 4)
            row[f"{label}_out"] = eager
        row["max_abs_diff"] = float((row.pop("split_kv_out").float() - row.pop("previous_out").float()).abs().max())
        row["speedup"] = round(row["previous_ms"] / row["split_kv_ms"], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = dict(check="split_kv_attention", device_name=torch.cuda.get_device_name(), torch=torch.__version__,
                  rows=rows)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'case':32} {'rows':>5} {'keys':>6} {'new ms':>8} {'old ms':>8} {'x':>6} {'new err':>9} {'old err':>9} {'max|d|':>8}")
    for row in rows:
        print(f"{row['case']:32} {row['query_rows']:5} {row['keys']:6} {row['split_kv_ms']:8.4f} {row['previous_ms']:8.4f} "
              f"{row['speedup']:6.2f} {row['split_kv_rel_err']:9.2e} {row['previous_rel_err']:9.2e} {row['max_abs_diff']:8.4f}")


if __name__ == "__main__":
    main()
