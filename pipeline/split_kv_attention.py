"""Masked attention for few query rows over a long key/value cache, split over the keys
(flash-decoding).

The query stage attends with a few hundred query rows at most (question prompts, one
token per question per decoding step) over a cache of tens of thousands of keys, under a
block mask. SDPA's kernels give each block of query rows one program that walks all the
keys, which leaves most of a large GPU idle; the plain matrix-product form writes out all
the scores. Here the keys are cut into ``splits`` chunks: one program per (block of
query rows, key/value head, chunk) computes that chunk's softmax-weighted values and the
log-sum-exp of its scores, and a combine step weights each chunk's values by
``exp(lse_chunk - lse_all)``. The result is the softmax over all keys, reassociated.

Queries come packed by key/value head (``[H_kv, M, D]``: the query heads that share a
key/value head stacked along the rows, no copies of the keys), and the mask is one
``[n, S]`` boolean mask shared by all heads: packed row ``m`` uses mask row ``m % n``.

``split_kv_attention`` runs the Triton kernel (CUDA); ``split_kv_reference`` is the same
arithmetic in plain torch (any device), which the tests check against ordinary softmax
attention on the CPU and the benchmark checks the kernel against on the GPU.
"""
from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch; the CPU path never needs it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BLOCK_N = 64
# Programs to aim for per multiprocessor when choosing the number of key chunks.
PROGRAMS_PER_SM = 4


def available(query: torch.Tensor) -> bool:
    """Whether ``split_kv_attention`` can run on ``query``'s device and shapes."""
    dim = query.shape[-1]
    return triton is not None and query.is_cuda and dim in (64, 128, 256) and query.dtype in (torch.float16, torch.bfloat16)


def block_rows(rows: int) -> int:
    """Query rows per program: all of them up to 64 (each program reads its keys once
    for all rows), else blocks of 64 (on an H200 one block of 128 rows ran slower than
    two of 64: ``jobs/results/split_kv_attention_h200.json``)."""
    return max(16, 1 << (rows - 1).bit_length()) if rows <= 64 else 64


def num_splits(rows: int, heads: int, keys: int, multiprocessors: int) -> int:
    """Key chunks so that (row blocks x heads x chunks) fills the GPU a few times over,
    each chunk at least one key block."""
    programs = -(-rows // block_rows(rows)) * heads
    wanted = -(-PROGRAMS_PER_SM * multiprocessors // programs)
    return max(1, min(wanted, -(-keys // BLOCK_N)))


def split_kv_reference(query, key, value, mask, *, scale: float, splits: int) -> torch.Tensor:
    """The kernel's arithmetic in plain torch.

    Args:
        query: ``[H_kv, M, D]`` packed query rows.
        key, value: ``[H_kv, S, D]``.
        mask: ``[n, S]`` boolean (true: attend); packed row ``m`` uses row ``m % n``.
        scale: factor of the scores.
        splits: key chunks (of equal length, the last shorter).
    Returns ``[H_kv, M, D]`` in ``query``'s dtype. Every row must see some key.
    """
    heads, rows, dim = query.shape
    keys = key.shape[1]
    row_mask = mask[torch.arange(rows, device=mask.device) % mask.shape[0]]  # [M, S]
    chunk = -(-keys // splits)
    outputs, lses = [], []
    for start in range(0, keys, chunk):
        part = slice(start, min(start + chunk, keys))
        scores = torch.matmul(query.float(), key[:, part].float().transpose(-1, -2)) * scale
        scores = scores.masked_fill(~row_mask[None, :, part], float("-inf"))
        peak = scores.amax(-1, keepdim=True)
        peak = torch.where(torch.isinf(peak), torch.zeros_like(peak), peak)  # a chunk all masked for a row
        weights = torch.exp(scores - peak)
        total = weights.sum(-1, keepdim=True)
        outputs.append(torch.matmul(weights, value[:, part].float()) / total.clamp_min(torch.finfo(torch.float32).tiny))
        lses.append(torch.where(total > 0, peak + torch.log(total), torch.full_like(total, float("-inf")))[..., 0])
    return _combine(torch.stack(outputs), torch.stack(lses)).to(query.dtype)


def _combine(outputs: torch.Tensor, lses: torch.Tensor) -> torch.Tensor:
    """``[P, H, M, D]`` per-chunk outputs and ``[P, H, M]`` log-sum-exps -> ``[H, M, D]``."""
    peak = lses.amax(0, keepdim=True)
    weights = torch.exp(lses - torch.where(torch.isinf(peak), torch.zeros_like(peak), peak))  # [P, H, M]
    return (outputs * weights[..., None]).sum(0) / weights.sum(0)[..., None]


if triton is not None:

    @triton.jit
    def _split_kv_kernel(
        Q, K, V, Mask, Out, Lse,
        stride_qh, stride_qm, stride_kh, stride_kn, stride_vh, stride_vn, stride_mask,
        stride_op, stride_oh, stride_om, stride_lp, stride_lh,
        mask_rows, rows, keys, keys_per_split, scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    ):  # fmt: skip
        block, head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < rows
        q = tl.load(Q + head * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        mask_row = offs_m % mask_rows
        start = split * keys_per_split
        end = tl.minimum(start + keys_per_split, keys)
        peak = tl.full([BLOCK_M], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            key_ok = offs_n < end
            allowed = tl.load(Mask + mask_row[:, None] * stride_mask + offs_n[None, :],
                              mask=row_ok[:, None] & key_ok[None, :], other=0) != 0
            if tl.max(allowed.to(tl.int32)) > 0:  # skip key blocks no row of this block sees
                k = tl.load(K + head * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None], mask=key_ok[None, :], other=0.0)
                scores = tl.dot(q, k) * scale
                scores = tl.where(allowed, scores, float("-inf"))
                new_peak = tl.maximum(peak, tl.max(scores, 1))
                safe_peak = tl.where(new_peak == float("-inf"), 0.0, new_peak)
                weights = tl.exp(scores - safe_peak[:, None])
                alpha = tl.exp(peak - safe_peak)
                total = total * alpha + tl.sum(weights, 1)
                v = tl.load(V + head * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :], mask=key_ok[:, None], other=0.0)
                acc = acc * alpha[:, None] + tl.dot(weights.to(v.dtype), v)
                peak = new_peak
        seen = total > 0
        out = acc / tl.where(seen, total, 1.0)[:, None]
        lse = tl.where(seen, peak + tl.log(tl.where(seen, total, 1.0)), float("-inf"))
        tl.store(Out + split * stride_op + head * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :], out,
                 mask=row_ok[:, None])
        tl.store(Lse + split * stride_lp + head * stride_lh + offs_m, lse, mask=row_ok)


def split_kv_attention(query, key, value, mask, *, scale: float, splits: int | None = None) -> torch.Tensor:
    """Masked attention, split over the keys, on CUDA (Triton); shapes as in
    ``split_kv_reference``. ``splits``: default from the GPU's multiprocessors. Fixed
    shapes in, fixed shapes out, no host sync: it can be captured in a CUDA graph."""
    heads, rows, dim = query.shape
    keys = key.shape[1]
    if splits is None:
        multiprocessors = torch.cuda.get_device_properties(query.device).multi_processor_count
        splits = num_splits(rows, heads, keys, multiprocessors)
    keys_per_split = -(-(-(-keys // splits)) // BLOCK_N) * BLOCK_N
    splits = -(-keys // keys_per_split)
    if key.stride(-1) != 1 or value.stride(-1) != 1 or query.stride(-1) != 1:
        raise ValueError("split_kv_attention needs the last dimension contiguous")
    mask = mask if mask.stride(-1) == 1 else mask.contiguous()
    outputs = torch.empty(splits, heads, rows, dim, dtype=torch.float32, device=query.device)
    lses = torch.empty(splits, heads, rows, dtype=torch.float32, device=query.device)
    block = block_rows(rows)
    grid = (triton.cdiv(rows, block), heads, splits)
    _split_kv_kernel[grid](
        query, key, value, mask.view(torch.uint8), outputs, lses,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1), mask.stride(0),
        outputs.stride(0), outputs.stride(1), outputs.stride(2), lses.stride(0), lses.stride(1),
        mask.shape[0], rows, keys, keys_per_split, scale,
        BLOCK_M=block, BLOCK_N=BLOCK_N, HEAD_DIM=dim, num_warps=4, num_stages=2,
    )  # fmt: skip
    return _combine(outputs, lses).to(query.dtype)
