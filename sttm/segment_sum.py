"""Weighted sums of rows into segments: the one pass over the channels that builds the
output features (``sttm.merging.assemble``).

``weighted_segment_sum(rows, weight, segment, counts)`` returns
``out[s] = sum(weight[i] * rows[i] for i with segment[i] == s)``, summed in float32
(float64 for float64 rows) in increasing ``i`` and cast back to the rows' dtype.

The result is bitwise the same at any thread count and on every call:

- On the CPU this is ``index_add_``, which adds each segment's rows in index order
  whatever the thread count (threads split the channels, or the segments after a stable
  sort by segment, never one sum). Not ``index_put_`` with accumulate: with more than one
  thread it adds with atomics, in an order that changes from call to call.
- On CUDA a small Triton kernel: each program owns one segment and a slice of channels
  and walks the segment's rows in order. It reads the rows once in their own dtype and
  writes the output once; ``index_put_`` (deterministic on CUDA: it sorts) first writes
  a float32 copy of every weighted row and then spends about 1.2 ms (128 frames x 196
  patches x 3584 channels on an H100) in its sort-based accumulation. Without Triton,
  for float64 and for outputs of 2**31 values or more, CUDA takes ``index_put_``.
"""
from __future__ import annotations

import importlib.util

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _segment_sum_kernel(rows, weight, order, starts, out, channels, BLOCK: tl.constexpr):
        segment = tl.program_id(0)
        columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = columns < channels
        begin = tl.load(starts + segment)
        end = tl.load(starts + segment + 1)
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for position in range(begin, end):
            row = tl.load(order + position)
            values = tl.load(rows + row * channels + columns, mask=inside, other=0.0).to(tl.float32)
            total += values * tl.load(weight + row)
        tl.store(out + segment * channels + columns, total.to(out.dtype.element_ty), mask=inside)


def weighted_segment_sum(rows: torch.Tensor, weight: torch.Tensor, segment: torch.Tensor,
                         counts: torch.Tensor) -> torch.Tensor:
    """``[S, C]`` in ``rows.dtype``: ``rows [M, C]`` times ``weight [M]`` summed by ``segment [M]``.

    ``weight`` is float32 (float64 for float64 rows); ``counts [S]`` is the number of rows
    of each segment (given, because counting here would cost a host sync on CUDA).
    """
    num_segments = int(counts.shape[0])
    # The kernel's offsets are 32-bit: outputs of 2**31 values or more take index_put_.
    if HAS_TRITON and rows.is_cuda and rows.dtype != torch.float64 and num_segments * rows.shape[1] < 2**31:
        rows = rows.contiguous()
        order = torch.argsort(segment, stable=True)  # each segment's rows, in increasing index
        starts = torch.zeros(num_segments + 1, dtype=torch.long, device=rows.device)
        starts[1:] = counts.cumsum(0)
        out = torch.empty(num_segments, rows.shape[1], dtype=rows.dtype, device=rows.device)
        block = 512
        grid = (num_segments, triton.cdiv(rows.shape[1], block))
        _segment_sum_kernel[grid](rows, weight.float().contiguous(), order, starts, out, rows.shape[1], BLOCK=block)
        return out
    sums = torch.zeros(num_segments, rows.shape[1], dtype=weight.dtype, device=rows.device)
    if rows.is_cuda:
        sums.index_put_((segment,), rows * weight[:, None], accumulate=True)
    else:
        sums.index_add_(0, segment, rows * weight[:, None])
    return sums.to(rows.dtype)
