"""A slow, literal reading of STTM_SPEC.md, written independently of ``sttm/`` to test it.

Plain Python loops over cells and tokens, float64 numpy, box geometry checked directly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

EPS = 1e-8


def cosine(a: np.ndarray, b: np.ndarray, head_dim: int | None) -> float:
    d = head_dim or a.shape[0]
    sims = []
    for h in range(a.shape[0] // d):
        u, v = a[h * d:(h + 1) * d], b[h * d:(h + 1) * d]
        sims.append(float(u @ v) / ((np.linalg.norm(u) + EPS) * (np.linalg.norm(v) + EPS)))
    return float(np.mean(sims))


def groups(n: int) -> list[list[int]]:
    """Index groups of a length-n axis when it is halved (spec: odd n keeps index 0 alone)."""
    if n % 2 == 0:
        return [[i, i + 1] for i in range(0, n, 2)]
    return [[0]] + [[i, i + 1] for i in range(1, n, 2)]


@dataclass
class Cell:
    level: int
    box: tuple[int, int, int, int]  # y0, x0, y1, x1
    feature: np.ndarray
    children: list["Cell"]

    @property
    def num_patches(self) -> int:
        y0, x0, y1, x1 = self.box
        return (y1 - y0) * (x1 - x0)


def build_levels(frame: np.ndarray, weighted: bool) -> list[list[list[Cell]]]:
    """Grids of cells for every level, coarsest first; ``frame`` is ``[H, W, C]``."""
    height, width, _ = frame.shape
    finest = [[Cell(0, (y, x, y + 1, x + 1), frame[y, x], []) for x in range(width)] for y in range(height)]
    grids = [finest]
    while min(len(grids[-1]), len(grids[-1][0])) > 2:
        child_grid = grids[-1]
        grid = []
        for rows in groups(len(child_grid)):
            row = []
            for cols in groups(len(child_grid[0])):
                kids = [child_grid[r][c] for r in rows for c in cols]
                box = (min(k.box[0] for k in kids), min(k.box[1] for k in kids),
                       max(k.box[2] for k in kids), max(k.box[3] for k in kids))
                if weighted:
                    y0, x0, y1, x1 = box
                    feature = frame[y0:y1, x0:x1].reshape(-1, frame.shape[-1]).mean(0)
                else:
                    feature = np.mean([k.feature for k in kids], axis=0)
                row.append(Cell(0, box, feature, kids))
            grid.append(row)
        grids.append(grid)
    grids.reverse()
    for level, grid in enumerate(grids):
        for row in grid:
            for cell in row:
                cell.level = level
    return grids


def spatial_tokens(frame: np.ndarray, tau_s: float, root_level: int, weighted: bool,
                   head_dim: int | None) -> list[Cell]:
    grids = build_levels(frame, weighted)
    finest = len(grids) - 1
    emitted: list[Cell] = []

    def search(cell: Cell) -> None:
        if cell.level == finest or all(cosine(cell.feature, k.feature, head_dim) >= tau_s for k in cell.children):
            emitted.append(cell)
        else:
            for kid in cell.children:
                search(kid)

    for row in grids[min(root_level, finest)]:
        for cell in row:
            search(cell)
    return sorted(emitted, key=lambda c: (c.box[0], c.box[1]))


def contains(outer: tuple, inner: tuple) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and outer[2] >= inner[2] and outer[3] >= inner[3]


def reference_merge(x: np.ndarray, tau_s: float, tau_t: float | None, root_level: int = 1,
                    weighted: bool = False, head_dim: int | None = None) -> dict:
    """Returns features [N,C], frame [N], box [N,4], num_patches [N], assignment [T,H,W]."""
    frames, height, width, channels = x.shape
    tokens = []  # (t, cell), in (t, y0, x0) order
    for t in range(frames):
        tokens += [(t, c) for c in spatial_tokens(x[t], tau_s, root_level, weighted, head_dim)]

    parent = list(range(len(tokens)))
    if tau_t is not None:
        for j, (tb, b) in enumerate(tokens):
            best, best_sim = None, -math.inf
            for i, (ta, a) in enumerate(tokens):
                if ta != tb - 1 or not (contains(a.box, b.box) or contains(b.box, a.box)):
                    continue
                sim = cosine(a.feature, b.feature, head_dim)
                if sim >= tau_t and sim > best_sim:  # strict: ties keep the earlier token
                    best, best_sim = i, sim
            if best is not None:
                parent[j] = best

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    roots = [i for i in range(len(tokens)) if parent[i] == i]
    index_of_root = {r: k for k, r in enumerate(roots)}
    members = {r: [] for r in roots}
    for i in range(len(tokens)):
        members[root(i)].append(i)

    features, frame, box, num_patches = [], [], [], []
    assignment = np.full((frames, height, width), -1, dtype=np.int64)
    for r in roots:
        cells = [tokens[i][1] for i in members[r]]
        weights = [c.num_patches if weighted else 1 for c in cells]
        features.append(np.average([c.feature for c in cells], axis=0, weights=weights))
        frame.append(tokens[r][0])
        box.append(tokens[r][1].box)
        num_patches.append(sum(c.num_patches for c in cells))
        for i in members[r]:
            t, c = tokens[i]
            y0, x0, y1, x1 = c.box
            assignment[t, y0:y1, x0:x1] = index_of_root[r]
    return dict(features=np.array(features).reshape(-1, channels), frame=np.array(frame),
                box=np.array(box).reshape(-1, 4), num_patches=np.array(num_patches), assignment=assignment)
