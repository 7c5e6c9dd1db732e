"""STTM: multi-granular spatio-temporal token merging for Video LLMs (ICCV 2025).

A small pure-torch library: give it the visual tokens of one video as ``[T, H, W, C]``
and get back fewer, multi-granular tokens as a ``TokenSet``.

    >>> import torch, sttm
    >>> x = torch.randn(8, 14, 14, 64)
    >>> tokens = sttm.merge_to_budget(x, 0.5)          # keep at most 50% of the tokens
    >>> tokens.features.shape[0] <= 0.5 * 8 * 14 * 14
    True
    >>> fixed = sttm.merge(x, tau_s=0.9, tau_t=0.8)     # or fixed thresholds
    >>> fixed.unmerge().shape
    torch.Size([8, 14, 14, 64])
"""
from sttm.merging import merge, merge_to_budget
from sttm.quadtree import level_sizes
from sttm.token_set import TokenSet

__all__ = ["merge", "merge_to_budget", "TokenSet", "level_sizes"]
