"""Index tables of the spatial pyramid of one ``H x W`` frame (STTM spec, section 1).

Everything here depends only on the grid size and the root level, never on features,
so it is computed once per shape and cached. The cells of all used pyramid levels of
one frame are numbered ``0 .. P-1``, coarsest level first and raster order inside a
level; per-video tensors then have shape ``[T, P, ...]``.

Every similarity STTM compares lies inside one root-level cell: a cell against its
children, and a cell against the nested cells one frame away, which share its
root-level ancestor. So the tables also describe each root-level cell as a **block**:
its finest patches, its cells, and each cell's feature as a weighted sum of the block's
patches. ``sttm.merging`` gets every dot product it needs from small per-block Gram
matrices of patches, and never builds the features of coarser cells.
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

    Geometry:
        sizes: ``(h, w)`` of each used level, coarsest (the root level ``r``) first.
        offsets: first cell number of each used level; ``offsets[-1]`` is the finest.
        box: ``[P, 4]`` ``(y0, x0, y1, x1)`` of each cell in finest-grid coordinates.
        parent: ``[P]`` cell number of the parent, -1 for root-level cells.
        top_left: ``[P]`` flat finest index ``y0 * W + x0`` of each cell's top-left patch.
        cover: ``[L, H*W]`` cell of each used level that covers each finest patch.
        mean_weight: ``[L, H*W]`` weight of each finest patch in the plain mean-of-means
            feature of its level-``l`` cell (a product of ``1/children`` down the tree).

    Blocks (the ``R`` root-level cells, each padded to ``n`` patches and ``m`` cells):
        block_patches: ``[R, n]`` flat finest index of each block's patches (padding
            repeats a patch of the block; its weights are zero).
        block_weights: ``{weighted: [R, m, n]}`` feature of each block cell as weights of
            the block's patches: mean of means (``False``) or patch mean (``True``);
            padding rows and columns are zero.
        children: ``(parent_cell [E_c], pair_index [E_c])``: every (cell, child) pair and
            where its similarity sits in a flattened ``[R, m, m]`` block table.
        nested: ``(later [E_n], earlier [E_n], pair_index [E_n])``: every pair of nested
            cells (one contains the other, or the same cell) of two consecutive frames:
            cell ``later`` of the later frame against cell ``earlier`` of the earlier
            one, and where ``cos(earlier, later)`` sits in a flattened ``[R, m, m]``
            table whose rows are earlier-frame cells.
    """

    sizes: tuple[tuple[int, int], ...]
    offsets: tuple[int, ...]
    box: torch.Tensor
    parent: torch.Tensor
    top_left: torch.Tensor
    cover: torch.Tensor
    mean_weight: torch.Tensor
    block_patches: torch.Tensor
    block_weights: dict[bool, torch.Tensor]
    children: tuple[torch.Tensor, torch.Tensor]
    nested: tuple[torch.Tensor, torch.Tensor, torch.Tensor]

    @property
    def num_levels(self) -> int:
        return len(self.sizes)

    @property
    def num_cells(self) -> int:
        return int(self.parent.shape[0])

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
            pw = sizes[lvl - 1][1]
            parent_rows = _parent_index(h)[:, None]
            parent_cols = _parent_index(w)[None, :]
            parents.append((offsets[lvl - 1] + parent_rows * pw + parent_cols).reshape(-1))
        covers.append((offset + row_map[:, None] * w + col_map[None, :]).reshape(-1))
        offset += h * w

    level = torch.cat(levels)
    box = torch.cat(boxes)
    parent = torch.cat(parents)
    cover = torch.stack(covers)
    num_patches = (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])
    top_left = box[:, 0] * width + box[:, 1]
    plain = _mean_of_means_weights(sizes, offsets, parent, cover)  # [P, H*W]
    tables = _block_tables(level, parent, cover, top_left, num_patches, plain)
    patch_index = torch.arange(height * width)
    return Quadtree(
        sizes=sizes,
        offsets=tuple(offsets),
        box=box.to(device),
        parent=parent.to(device),
        top_left=top_left.to(device),
        cover=cover.to(device),
        mean_weight=plain[cover, patch_index].to(device),
        block_patches=tables["block_patches"].to(device),
        block_weights={weighted: w.to(device) for weighted, w in tables["block_weights"].items()},
        children=tuple(t.to(device) for t in tables["children"]),
        nested=tuple(t.to(device) for t in tables["nested"]),
    )


def _mean_of_means_weights(sizes, offsets, parent: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
    """``[P, H*W]`` float64: each cell's plain feature (mean of its children's features,
    recursively) as weights of the finest patches."""
    num_cells, num_patches = int(parent.shape[0]), int(cover.shape[1])
    weights = torch.zeros(num_cells, num_patches, dtype=torch.float64)
    weights[cover[-1], torch.arange(num_patches)] = 1.0
    for lvl in reversed(range(len(sizes) - 1)):
        children = torch.arange(offsets[lvl + 1], offsets[lvl + 1] + sizes[lvl + 1][0] * sizes[lvl + 1][1])
        sums = torch.zeros_like(weights).index_add_(0, parent[children], weights[children])
        counts = torch.bincount(parent[children], minlength=num_cells).clamp(min=1)
        level_cells = slice(offsets[lvl], offsets[lvl] + sizes[lvl][0] * sizes[lvl][1])
        weights[level_cells] = sums[level_cells] / counts[level_cells, None]
    return weights


def _block_tables(level, parent, cover, top_left, num_patches, plain) -> dict:
    """Blocks (root-level cells) as padded patch lists and weight matrices, and the
    (cell, child) and nested-pair lists with their places in flattened block tables."""
    num_cells = int(level.shape[0])
    block = cover[0][top_left]  # [P] root-level ancestor of each cell
    num_blocks = int(block.max()) + 1
    cells_of = [torch.nonzero(block == b).squeeze(1) for b in range(num_blocks)]
    patches_of = [torch.nonzero(cover[0] == b).squeeze(1) for b in range(num_blocks)]
    m = max(len(cells) for cells in cells_of)
    n = max(len(patches) for patches in patches_of)
    slot = torch.zeros(num_cells, dtype=torch.long)
    block_patches = torch.zeros(num_blocks, n, dtype=torch.long)
    member = cover[level] == torch.arange(num_cells)[:, None]  # [P, H*W]: the patches of each cell
    patch_mean = member.double() / num_patches[:, None].double()
    block_weights = {False: torch.zeros(num_blocks, m, n, dtype=torch.float64),
                     True: torch.zeros(num_blocks, m, n, dtype=torch.float64)}
    for b, (cells, patches) in enumerate(zip(cells_of, patches_of)):
        slot[cells] = torch.arange(len(cells))
        block_patches[b, : len(patches)] = patches
        block_patches[b, len(patches):] = patches[0]
        block_weights[False][b, : len(cells), : len(patches)] = plain[cells][:, patches]
        block_weights[True][b, : len(cells), : len(patches)] = patch_mean[cells][:, patches]

    def pair_index(row_cell: torch.Tensor, column_cell: torch.Tensor) -> torch.Tensor:
        """Flat index of ``(row, column)`` in a ``[R, m, m]`` table; both in one block."""
        return (block[row_cell] * m + slot[row_cell]) * m + slot[column_cell]

    child = torch.nonzero(parent >= 0).squeeze(1)
    children = (parent[child], pair_index(parent[child], child))

    # Nested pairs: each cell with itself, its ancestors and its descendants. Sorted by
    # later cell, then by the earlier cell's top-left patch: among the candidates of one
    # token that are tokens themselves (disjoint cells), that is the global token order.
    ancestors = [[] for _ in range(num_cells)]
    for cell in range(num_cells):
        up = int(parent[cell])
        while up >= 0:
            ancestors[cell].append(up)
            up = int(parent[up])
    descendants = [[] for _ in range(num_cells)]
    for cell in range(num_cells):
        for up in ancestors[cell]:
            descendants[up].append(cell)
    later, earlier = [], []
    for cell in range(num_cells):
        related = sorted(ancestors[cell] + [cell] + descendants[cell],
                         key=lambda other: (int(top_left[other]), int(level[other])))
        later += [cell] * len(related)
        earlier += related
    later, earlier = torch.tensor(later), torch.tensor(earlier)
    return dict(
        block_patches=block_patches,
        block_weights=block_weights,
        children=children,
        nested=(later, earlier, pair_index(earlier, later)),
    )
