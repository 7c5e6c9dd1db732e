"""Index tables of the spatial pyramid of one ``H x W`` frame (STTM spec, section 1).

Everything here depends only on the grid size and the root level, never on features,
so it is computed once per shape and cached. The cells of all used pyramid levels of
one frame are numbered ``0 .. P-1``, coarsest level first and raster order inside a
level; per-video tensors then have shape ``[T, P, ...]``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch


def level_sizes(height: int, width: int) -> list[tuple[int, int]]:
    """Pyramid level sizes ``S_0`` (coarsest) ... ``S_K = (H, W)`` (finest).

    Halve (rounding up) while the smaller side is above 2: 14x14 gives
    ``[(2, 2), (4, 4), (7, 7), (14, 14)]``; 3x5 gives ``[(2, 3), (3, 5)]``.
    """
    sizes = [(height, width)]
    while min(sizes[-1]) > 2:
        h, w = sizes[-1]
        sizes.append((math.ceil(h / 2), math.ceil(w / 2)))
    return sizes[::-1]


def _parent_index(n: int) -> torch.Tensor:
    """Coarser-level index of each of ``n`` positions along one axis.

    Even ``n`` pairs ``{0,1}, {2,3}, ...``; odd ``n`` leaves the first index alone and
    pairs the rest: ``{0}, {1,2}, {3,4}, ...``. Both are ``(i + n % 2) // 2``.
    """
    return (torch.arange(n) + n % 2) // 2


@dataclass(frozen=True)
class Quadtree:
    """The cells of pyramid levels ``r .. K`` of one frame, numbered ``0 .. P-1``.

    Attributes:
        sizes: ``(h, w)`` of each used level, coarsest (the root level ``r``) first.
        offsets: first cell number of each used level; ``offsets[-1]`` is the finest.
        level: ``[P]`` used-level index of each cell (0 = root level).
        box: ``[P, 4]`` ``(y0, x0, y1, x1)`` of each cell in finest-grid coordinates.
        num_patches: ``[P]`` finest patches each cell covers.
        parent: ``[P]`` cell number of the parent, -1 for root-level cells.
        top_left: ``[P]`` flat finest index ``y0 * W + x0`` of each cell's top-left patch.
        cover: ``[L, H*W]`` cell of each used level that covers each finest patch.
        child_count: per used level but the finest, ``[h, w]`` number of children.
        pad: per used level but the finest, ``(pad_rows, pad_cols)``: 1 where the
            child level has odd length, so one empty slot in front makes it pair up.
    """

    sizes: tuple[tuple[int, int], ...]
    offsets: tuple[int, ...]
    level: torch.Tensor
    box: torch.Tensor
    num_patches: torch.Tensor
    parent: torch.Tensor
    top_left: torch.Tensor
    cover: torch.Tensor
    child_count: tuple[torch.Tensor, ...]
    pad: tuple[tuple[int, int], ...]

    @property
    def num_levels(self) -> int:
        return len(self.sizes)

    @property
    def num_cells(self) -> int:
        return int(self.level.shape[0])

    def level_slice(self, level: int) -> slice:
        """The cell numbers of one used level (negative counts from the finest)."""
        level %= self.num_levels
        h, w = self.sizes[level]
        return slice(self.offsets[level], self.offsets[level] + h * w)


@lru_cache(maxsize=64)
def quadtree(height: int, width: int, root_level: int, device: torch.device) -> Quadtree:
    """Index tables for an ``height x width`` grid searched from ``root_level``."""
    all_sizes = level_sizes(height, width)
    root = min(root_level, len(all_sizes) - 1)
    sizes = tuple(all_sizes[root:])

    # Finest-index -> level-index maps per axis, built from the finest level upwards.
    row_maps = [torch.arange(height)]
    col_maps = [torch.arange(width)]
    for (h, w) in reversed(sizes[1:]):
        row_maps.append(_parent_index(h)[row_maps[-1]])
        col_maps.append(_parent_index(w)[col_maps[-1]])
    row_maps.reverse()
    col_maps.reverse()

    offsets, levels, boxes, parents, covers = [], [], [], [], []
    child_counts, pads = [], []
    offset = 0
    for lvl, ((h, w), row_map, col_map) in enumerate(zip(sizes, row_maps, col_maps)):
        offsets.append(offset)
        levels.append(torch.full((h * w,), lvl))
        # A cell spans the finest indices that map to it; the maps are monotone.
        y0 = torch.searchsorted(row_map, torch.arange(h), right=False)
        y1 = torch.searchsorted(row_map, torch.arange(h), right=True)
        x0 = torch.searchsorted(col_map, torch.arange(w), right=False)
        x1 = torch.searchsorted(col_map, torch.arange(w), right=True)
        boxes.append(torch.stack([
            y0[:, None].expand(h, w), x0[None, :].expand(h, w),
            y1[:, None].expand(h, w), x1[None, :].expand(h, w),
        ], dim=-1).reshape(h * w, 4))
        if lvl == 0:
            parents.append(torch.full((h * w,), -1))
        else:
            ph, pw = sizes[lvl - 1]
            parent_rows = _parent_index(h)[:, None]
            parent_cols = _parent_index(w)[None, :]
            parents.append((offsets[lvl - 1] + parent_rows * pw + parent_cols).reshape(-1))
            child_counts.append(torch.bincount(_parent_index(h), minlength=ph)[:, None]
                                * torch.bincount(_parent_index(w), minlength=pw)[None, :])
            pads.append((h % 2, w % 2))
        covers.append((offset + row_map[:, None] * w + col_map[None, :]).reshape(-1))
        offset += h * w

    box = torch.cat(boxes)
    return Quadtree(
        sizes=sizes,
        offsets=tuple(offsets),
        level=torch.cat(levels).to(device),
        box=box.to(device),
        num_patches=((box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])).to(device),
        parent=torch.cat(parents).to(device),
        top_left=(box[:, 0] * width + box[:, 1]).to(device),
        cover=torch.stack(covers).to(device),
        child_count=tuple(c.to(device) for c in child_counts),
        pad=tuple(pads),
    )
