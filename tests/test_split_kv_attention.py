"""The split-KV attention's arithmetic (``pipeline.split_kv_attention``): per-chunk
softmax and log-sum-exp, then the combine, equal softmax attention over all keys under
the query stage's block masks. The Triton kernel runs on CUDA only
(``jobs/check_split_kv_attention.py`` checks it there against this and SDPA); here the
plain-torch form of the same arithmetic is checked on the CPU in float64."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pipeline import split_kv_attention
from pipeline.query import _grouped_query_attention
from pipeline.split_kv_attention import block_rows, num_splits, split_kv_reference


def block_mask(generator, prefix: int, questions: int, rows: int, capacity: int) -> torch.Tensor:
    """``[rows, capacity]``: each row sees the prefix and some earlier slots of its own
    question (random owners after the prefix), never the unused slots at the end."""
    owner = torch.full((capacity,), -2)
    owner[:prefix] = -1
    used = prefix + (capacity - prefix) // 2
    owner[prefix:used] = torch.randint(questions, (used - prefix,), generator=generator)
    row_owner = torch.randint(questions, (rows,), generator=generator)
    row_slot = torch.randint(prefix, used, (rows,), generator=generator)
    slot = torch.arange(capacity)
    own = (owner[None] == row_owner[:, None]) & (slot[None] <= row_slot[:, None])
    return own | (owner == -1)[None]


def softmax_attention(query, key, value, mask, scale):
    """``[H_kv, M, D]`` packed rows over ``[H_kv, S, D]``, row ``m`` under mask row ``m % n``."""
    row_mask = mask[torch.arange(query.shape[1]) % mask.shape[0]]
    scores = (query @ key.transpose(-1, -2) * scale).masked_fill(~row_mask, float("-inf"))
    return torch.softmax(scores, -1) @ value


@pytest.mark.parametrize("splits", [1, 2, 5, 16, 1000])
@pytest.mark.parametrize("prefix, capacity", [(3, 50), (200, 333)])
def test_split_keys_give_softmax_attention_under_block_masks(splits, prefix, capacity):
    generator = torch.Generator().manual_seed(splits * 1000 + capacity)
    heads, groups, rows, dim = 2, 3, 7, 16
    query = torch.randn(heads, groups * rows, dim, generator=generator, dtype=torch.float64)
    key, value = (torch.randn(heads, capacity, dim, generator=generator, dtype=torch.float64) for _ in range(2))
    mask = block_mask(generator, prefix, 3, rows, capacity)
    # Many chunks lie after the prefix, where most rows see nothing: those must not count.
    expected = softmax_attention(query, key, value, mask, dim**-0.5)

    out = split_kv_reference(query, key, value, mask, scale=dim**-0.5, splits=splits)

    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)  # float32 scores inside


def test_a_row_that_sees_one_key_gets_its_value():
    key, value = torch.randn(1, 40, 8), torch.randn(1, 40, 8)
    mask = torch.zeros(1, 40, dtype=torch.bool)
    mask[0, 37] = True
    out = split_kv_reference(torch.randn(1, 1, 8), key, value, mask, scale=1.0, splits=4)
    torch.testing.assert_close(out[0, 0], value[0, 37])


def test_the_grid_fills_the_gpu_and_never_splits_below_a_key_block():
    assert block_rows(7) == 16 and block_rows(112) == 64 and block_rows(2870) == 64
    # One program per (row block, head) is far too few for a long cache: split the keys.
    assert num_splits(rows=16 * 7, heads=4, keys=28_672, multiprocessors=132) == 66
    assert num_splits(rows=410 * 7, heads=4, keys=28_672, multiprocessors=132) == 3
    assert num_splits(rows=7, heads=4, keys=100, multiprocessors=132) == 2  # 100 keys: two blocks of 64


def test_the_cpu_path_stays_the_exact_matrix_product_form():
    """Not on CUDA: the split kernel is not used and the masked attention is unchanged."""
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 6, 5, 16, generator=generator)  # 6 heads over 2 key/value heads
    key, value = (torch.randn(1, 2, 30, 16, generator=generator) for _ in range(2))
    mask = block_mask(generator, 10, 2, 5, 30)
    assert not split_kv_attention.available(query)
    out, _ = _grouped_query_attention(SimpleNamespace(num_key_value_groups=3), query, key, value, mask[None, None])
    packed = query[0].reshape(2, 15, 16)
    expected = softmax_attention(packed.double(), key[0].double(), value[0].double(), mask, 16**-0.5)
    torch.testing.assert_close(out[0].transpose(0, 1).reshape(2, 15, 16).double(), expected, rtol=1e-5, atol=1e-5)
