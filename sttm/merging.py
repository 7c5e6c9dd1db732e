"""Multi-granular spatio-temporal token merging (STTM), as fixed by ``STTM_SPEC.md``.

The work splits into a part that does not depend on the thresholds and a part that does:

1. ``build_pyramid``: cell features of every pyramid level of every frame, their
   per-head inverse norms, and each cell's lowest similarity to its children.
2. ``select_spatial``: the quadtree search of section 1 for a given ``tau_s`` (a few
   index operations per level, no arithmetic over channels).
3. ``link_frames``: every spatial token picks its parent one frame back (section 2);
   trees become tokens.

``merge`` runs 1-3 once. ``merge_to_budget`` runs 1 once, precomputes every similarity
a temporal link could ever need, then bisects over the thresholds with 2-3 alone.

Everything is batched over frames; Python loops run over pyramid levels only. The
features are accumulated in float32 (float64 for float64 input) and cast back at the end.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from sttm.quadtree import Quadtree, quadtree
from sttm.token_set import TokenSet

EPS = 1e-8
NEVER_MERGE = 2.0  # a threshold above every possible cosine similarity


# --------------------------------------------------------------------------- checks


def _check_input(x: torch.Tensor, root_level: int, head_dim: int | None) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor of shape [T, H, W, C], got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must have shape [T, H, W, C] (rank 4), got rank {x.dim()} with shape {tuple(x.shape)}")
    if min(x.shape) < 1:
        raise ValueError(f"x must have no empty dimension, got shape {tuple(x.shape)} (T, H, W, C)")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating point tensor, got dtype {x.dtype}")
    if not isinstance(root_level, int) or isinstance(root_level, bool) or root_level < 0:
        raise ValueError(f"root_level must be an int >= 0, got {root_level!r}")
    channels = x.shape[-1]
    if head_dim is not None and (head_dim < 1 or channels % head_dim != 0):
        raise ValueError(f"head_dim={head_dim} must be >= 1 and divide the channel count C={channels}")


def _check_threshold(name: str, tau: float | None, *, optional: bool) -> None:
    if tau is None and optional:
        return
    if not isinstance(tau, (int, float)) or isinstance(tau, bool) or math.isnan(tau):
        raise ValueError(f"{name} must be a number (cosine similarity in [-1, 1]), got {tau!r}")


# --------------------------------------------------------------------------- pyramid


@dataclass(frozen=True)
class Pyramid:
    """Threshold-independent state of one video.

    Attributes:
        tree: index tables of one frame's cells (``P`` cells over the used levels).
        features: ``[T, P, C]`` cell features (plain or patch-weighted means).
        inv_norm: ``[T, P, heads]`` ``1 / ((|head| + eps) * sqrt(heads))`` per cell, so
            summing per-head dot products times both cells' factors gives the
            head-averaged cosine (kept instead of unit vectors to save a full pass).
        min_child_sim: ``[T, P]`` lowest cosine similarity between a cell and its
            children; ``+inf`` for finest cells, which are always emitted.
        weighted: whether features are patch-count weighted.
        dtype: the input's dtype, restored on output.
    """

    tree: Quadtree
    features: torch.Tensor
    inv_norm: torch.Tensor
    min_child_sim: torch.Tensor
    weighted: bool
    dtype: torch.dtype

    @property
    def num_frames(self) -> int:
        return self.features.shape[0]


def _pool_pairs(children: torch.Tensor, pad: tuple[int, int], fill: float = 0.0) -> torch.Tensor:
    """``[T, h, w, ...]`` -> ``[T, ceil(h/2), 2, ceil(w/2), 2, ...]``: each parent's children.

    An odd axis gets one ``fill`` slot in front, so its first index stands alone.
    """
    pad_rows, pad_cols = pad
    if pad_rows or pad_cols:
        trailing = [0, 0] * (children.dim() - 3)
        children = F.pad(children, trailing + [pad_cols, 0, pad_rows, 0], value=fill)
    t, h, w = children.shape[:3]
    return children.view(t, h // 2, 2, w // 2, 2, *children.shape[3:])


def head_dots(a: torch.Tensor, b: torch.Tensor, heads: int) -> torch.Tensor:
    """``[..., C] x [..., C] -> [..., heads]``: dot products per head (broadcasting)."""
    product = a * b
    return product.view(*product.shape[:-1], heads, -1).sum(-1)


def cosine(a: torch.Tensor, b: torch.Tensor, inv_a: torch.Tensor, inv_b: torch.Tensor) -> torch.Tensor:
    """Head-averaged cosine similarity from features and their ``Pyramid.inv_norm`` rows."""
    heads = inv_a.shape[-1]
    # (inv_a * inv_b) first: symmetric in a and b to the last bit, so a pair's
    # similarity is the same whichever side it is computed from.
    return (head_dots(a, b, heads) * (inv_a * inv_b)).sum(-1).clamp_(-1.0, 1.0)


def build_pyramid(x: torch.Tensor, root_level: int, weighted: bool, head_dim: int | None) -> Pyramid:
    """Cell features and parent-child similarities of every used level (spec section 1)."""
    frames, height, width, channels = x.shape
    tree = quadtree(height, width, root_level, x.device)
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32

    # Coarser cells are sums of their children (weighted: sums of patches, divided by
    # the patch count at the end; plain: the mean of the children, level by level).
    features = x.new_empty((frames, tree.num_cells, channels), dtype=compute_dtype)
    features[:, tree.level_slice(-1)] = x.reshape(frames, height * width, channels)
    for lvl in reversed(range(tree.num_levels - 1)):
        h, w = tree.sizes[lvl + 1]
        children = features[:, tree.level_slice(lvl + 1)].view(frames, h, w, channels)
        sums = _pool_pairs(children, tree.pad[lvl]).sum(dim=(2, 4))
        if not weighted:
            sums /= tree.child_count[lvl][..., None]
        features[:, tree.level_slice(lvl)] = sums.reshape(frames, -1, channels)
    if weighted:
        features /= tree.num_patches[:, None].to(compute_dtype)

    heads = channels // (head_dim or channels)
    norms = features.view(frames, tree.num_cells, heads, -1).norm(dim=-1)  # [T, P, heads]
    if not bool(torch.isfinite(norms).all()):  # cheaper than scanning x; NaN/inf reach every norm
        raise ValueError("x contains NaN or inf values (or values too large to compare in float32)")
    inv_norm = 1.0 / ((norms + EPS) * math.sqrt(heads))

    min_child_sim = torch.full((frames, tree.num_cells), math.inf, dtype=compute_dtype, device=x.device)
    for lvl in range(tree.num_levels - 1):
        h, w = tree.sizes[lvl]
        child_h, child_w = tree.sizes[lvl + 1]
        children = tree.level_slice(lvl + 1)
        parents = tree.level_slice(lvl)
        sims = cosine(
            _pool_pairs(features[:, children].view(frames, child_h, child_w, channels), tree.pad[lvl]),
            features[:, parents].view(frames, h, 1, w, 1, channels),
            _pool_pairs(inv_norm[:, children].view(frames, child_h, child_w, heads), tree.pad[lvl]),
            inv_norm[:, parents].view(frames, h, 1, w, 1, heads),
        )  # [T, h, 2, w, 2]
        pad_rows, pad_cols = tree.pad[lvl]
        if pad_rows:
            sims[:, 0, 0] = math.inf  # the empty slot in front of an odd child axis
        if pad_cols:
            sims[:, :, :, 0, 0] = math.inf
        min_child_sim[:, parents] = sims.amin(dim=(2, 4)).reshape(frames, -1)
    return Pyramid(tree, features, inv_norm, min_child_sim, weighted, x.dtype)


# --------------------------------------------------------------------------- spatial


@dataclass(frozen=True)
class SpatialTokens:
    """The spatial tokens of a video, ordered by ``(t, y0, x0)``.

    Attributes:
        frame: ``[S]`` frame of each token.
        cell: ``[S]`` cell number of each token (index into the quadtree tables).
        patch_token: ``[T, H*W]`` token covering each finest patch.
    """

    frame: torch.Tensor
    cell: torch.Tensor
    patch_token: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.frame.shape[0])


def select_spatial(pyramid: Pyramid, tau_s: float) -> SpatialTokens:
    """Coarse-to-fine search from the root level: emit a cell when every child is similar."""
    tree = pyramid.tree
    frames = pyramid.num_frames
    merges = pyramid.min_child_sim >= tau_s  # finest cells: +inf, always true
    active = torch.zeros_like(merges)
    active[:, tree.level_slice(0)] = True
    for lvl in range(1, tree.num_levels):
        cells = tree.level_slice(lvl)
        parents = tree.parent[cells]
        active[:, cells] = active[:, parents] & ~merges[:, parents]
    emitted = active & merges  # [T, P]

    # Exactly one level emits a cell over each patch; a patch whose cell starts at it
    # is a token's top-left corner, and raster order of corners is the token order.
    num_patches = tree.cover.shape[1]
    emitted_per_level = emitted[:, tree.cover]  # [T, L, H*W]
    level_of_patch = emitted_per_level.to(torch.uint8).argmax(dim=1)  # [T, H*W]
    patch_index = torch.arange(num_patches, device=emitted.device)
    cell_of_patch = tree.cover[level_of_patch, patch_index]  # [T, H*W]
    corner_of_patch = tree.top_left[cell_of_patch]
    is_corner = corner_of_patch == patch_index
    frame, corner = is_corner.nonzero(as_tuple=True)
    token_at_corner = (is_corner.view(-1).cumsum(0) - 1).view(frames, num_patches)
    return SpatialTokens(
        frame=frame,
        cell=cell_of_patch[frame, corner],
        patch_token=token_at_corner.gather(1, corner_of_patch),
    )


# --------------------------------------------------------------------------- temporal


@dataclass(frozen=True)
class CandidatePairs:
    """Nested token pairs ``(a in frame t, b in frame t+1)`` (spec section 2).

    ``a[:n_down]`` contain their ``b`` (or have the same box); ``b[n_down:]`` strictly
    contain their ``a``. Each ``b`` has at most one containing ``a``, and each ``a``
    at most one strictly containing ``b``.
    """

    a: torch.Tensor
    b: torch.Tensor
    num_down: int


def candidate_pairs(pyramid: Pyramid, tokens: SpatialTokens) -> CandidatePairs:
    """Pair every token with the tokens one frame away that cover its top-left patch."""
    tree = pyramid.tree
    last_frame = pyramid.num_frames - 1
    ids = torch.arange(tokens.num_tokens, device=tokens.frame.device)
    level = tree.level[tokens.cell]
    corner = tree.top_left[tokens.cell]
    # Cells of two quadtrees over one grid nest or are disjoint, so the token over
    # b's corner one frame back contains b exactly when it is not finer than b.
    prev = tokens.patch_token[(tokens.frame - 1).clamp(min=0), corner]
    down = (tokens.frame > 0) & (level[prev] <= level)
    nxt = tokens.patch_token[(tokens.frame + 1).clamp(max=last_frame), corner]
    up = (tokens.frame < last_frame) & (level[nxt] < level)
    return CandidatePairs(
        a=torch.cat([prev[down], ids[up]]),
        b=torch.cat([ids[down], nxt[up]]),
        num_down=int(down.sum()),
    )


PairSimilarity = Callable[[SpatialTokens, CandidatePairs], torch.Tensor]


def direct_similarity(pyramid: Pyramid) -> PairSimilarity:
    """Cosine similarity of each candidate pair, computed from the pair's features."""
    features = pyramid.features.flatten(0, 1)
    inv_norm = pyramid.inv_norm.flatten(0, 1)
    cells = pyramid.tree.num_cells

    def similarity(tokens: SpatialTokens, pairs: CandidatePairs) -> torch.Tensor:
        rows = tokens.frame * cells + tokens.cell
        a, b = rows[pairs.a], rows[pairs.b]
        return cosine(features[a], features[b], inv_norm[a], inv_norm[b])

    return similarity


def choose_parents(num_tokens: int, pairs: CandidatePairs, sims: torch.Tensor, tau_t: float) -> torch.Tensor:
    """``[S]`` parent of each token: its most similar candidate with ``sim >= tau_t``.

    Ties go to the earlier token; a token without a parent is its own parent.
    """
    ids = torch.arange(num_tokens, device=sims.device)
    passing = sims >= tau_t
    best = torch.full((num_tokens,), -math.inf, dtype=sims.dtype, device=sims.device)
    best.scatter_reduce_(0, pairs.b, torch.where(passing, sims, -math.inf), reduce="amax")
    is_best = passing & (sims == best[pairs.b])
    parent = torch.full_like(ids, num_tokens)
    parent.scatter_reduce_(0, pairs.b, torch.where(is_best, pairs.a, num_tokens), reduce="amin")
    return torch.where(parent == num_tokens, ids, parent)


def find_roots(parent: torch.Tensor, num_frames: int) -> torch.Tensor:
    """``[S]`` root of each token's tree, by pointer jumping (trees are < T deep)."""
    root = parent
    for _ in range(math.ceil(math.log2(max(num_frames - 1, 1)))):
        root = root[root]
    return root


# --------------------------------------------------------------------------- output


def assemble(pyramid: Pyramid, tokens: SpatialTokens, parent: torch.Tensor,
             params: dict) -> TokenSet:
    """Turn the forest of spatial tokens into the output ``TokenSet`` (spec sections 2-3)."""
    tree = pyramid.tree
    frames = pyramid.num_frames
    height, width = tree.sizes[-1]
    ids = torch.arange(tokens.num_tokens, device=parent.device)
    is_root = parent == ids
    root_ids = is_root.nonzero().squeeze(1)  # in (t, y0, x0) order
    output_of_root = is_root.cumsum(0) - 1
    output_of_token = output_of_root[find_roots(parent, frames)]  # [S]
    num_outputs = int(root_ids.shape[0])

    token_patches = tree.num_patches[tokens.cell]
    token_features = pyramid.features[tokens.frame, tokens.cell]  # [S, C]
    num_patches = torch.zeros(num_outputs, dtype=token_patches.dtype, device=parent.device)
    num_patches.index_add_(0, output_of_token, token_patches)
    if num_outputs == tokens.num_tokens:  # nothing merged across frames
        features = token_features
    else:
        weights = token_patches.to(token_features.dtype) if pyramid.weighted else torch.ones_like(token_features[:, 0])
        # index_put_ with accumulate sums in a fixed order (also on CUDA): deterministic.
        sums = torch.zeros(num_outputs, token_features.shape[1], dtype=token_features.dtype, device=parent.device)
        sums.index_put_((output_of_token,), token_features * weights[:, None], accumulate=True)
        totals = torch.zeros(num_outputs, dtype=weights.dtype, device=parent.device)
        totals.index_put_((output_of_token,), weights, accumulate=True)
        features = sums / totals[:, None]

    return TokenSet(
        features=features.to(pyramid.dtype),
        frame=tokens.frame[root_ids].to(torch.int32),
        box=tree.box[tokens.cell[root_ids]].to(torch.int32),
        num_patches=num_patches.to(torch.int32),
        assignment=output_of_token[tokens.patch_token].view(frames, height, width).to(torch.int32),
        grid=(frames, height, width),
        **params,
    )


def _merge_pyramid(pyramid: Pyramid, tau_s: float, tau_t: float | None,
                   similarity: PairSimilarity) -> tuple[SpatialTokens, torch.Tensor]:
    tokens = select_spatial(pyramid, tau_s)
    if tau_t is None or pyramid.num_frames == 1:
        return tokens, torch.arange(tokens.num_tokens, device=tokens.frame.device)
    pairs = candidate_pairs(pyramid, tokens)
    return tokens, choose_parents(tokens.num_tokens, pairs, similarity(tokens, pairs), tau_t)


# --------------------------------------------------------------------------- public API


def merge(x: torch.Tensor, *, tau_s: float, tau_t: float | None = None, root_level: int = 1,
          weighted: bool = False, head_dim: int | None = None) -> TokenSet:
    """Merge the visual tokens of one video with fixed thresholds.

    Args:
        x: ``[T, H, W, C]`` visual tokens (frames, grid rows, grid columns, channels),
            any float dtype, on any device. Output features keep this dtype.
        tau_s: spatial threshold: a quadtree cell becomes one token when the cosine
            similarity between it and each of its children is ``>= tau_s``. Above 1
            nothing merges; at or below -1 every search stops at the root level.
        tau_t: temporal threshold: a token joins the most similar nested token of the
            previous frame when their similarity is ``>= tau_t``. ``None`` disables
            temporal merging.
        root_level: coarsest pyramid level searched (0 = the 2x2-ish top level); the
            search starts at ``min(root_level, K)``.
        weighted: cell and tree features are patch-count weighted means (``True``) or
            plain means of their children / members (``False``).
        head_dim: compute cosine similarity per head of this size, averaged over heads.

    Returns:
        A ``TokenSet`` with ``features [N, C]``, ``frame [N]``, ``box [N, 4]``,
        ``num_patches [N]`` and ``assignment [T, H, W]``, tokens ordered by their
        root's ``(t, y0, x0)``.

    Raises:
        ValueError: ``x`` is not a finite float tensor of rank 4 with no empty
            dimension, a threshold is NaN, ``root_level < 0`` or ``head_dim`` does not
            divide ``C``.
    """
    _check_input(x, root_level, head_dim)
    _check_threshold("tau_s", tau_s, optional=False)
    _check_threshold("tau_t", tau_t, optional=True)
    pyramid = build_pyramid(x, root_level, weighted, head_dim)
    tokens, parent = _merge_pyramid(pyramid, tau_s, tau_t, direct_similarity(pyramid))
    params = dict(tau_s=float(tau_s), tau_t=None if tau_t is None else float(tau_t),
                  root_level=root_level, weighted=weighted, head_dim=head_dim)
    return assemble(pyramid, tokens, parent, params)


def merge_to_budget(x: torch.Tensor, retention: float, *, root_level: int = 1, weighted: bool = False,
                    head_dim: int | None = None) -> TokenSet:
    """Merge to a token budget: at most ``floor(retention * T*H*W)`` tokens, as many as possible.

    Threshold schedule: both thresholds move together, ``tau_s = tau_t = tau``. The
    token count changes only where ``tau`` crosses a similarity that the search
    compares against, so the candidates for ``tau`` are exactly those similarities
    (every cell's lowest child similarity and every nested cell pair one frame apart),
    plus ``2.0`` (merge nothing). The search bisects over the sorted candidates for the
    largest ``tau`` that meets the budget; each step is index work only, no arithmetic
    over channels. The chosen thresholds are recorded in the result, and
    ``merge(x, tau_s=tau, tau_t=tau)`` reproduces it.

    Args:
        x: ``[T, H, W, C]`` visual tokens, as for ``merge``.
        retention: target fraction of tokens to keep, in ``(0, 1]``.
        root_level, weighted, head_dim: as for ``merge``.

    Returns:
        A ``TokenSet`` whose ``budget`` is ``retention`` and whose ``tau_s``/``tau_t``
        are the chosen thresholds.

    Raises:
        ValueError: bad ``x`` (as for ``merge``), ``retention`` outside ``(0, 1]``, or a
            budget below the fewest tokens merging can reach (one per root-level cell).
    """
    _check_input(x, root_level, head_dim)
    if not isinstance(retention, (int, float)) or isinstance(retention, bool) or not 0 < retention <= 1:
        raise ValueError(f"retention must be a number in (0, 1], got {retention!r}")
    frames, height, width, _ = x.shape
    budget = math.floor(retention * frames * height * width)
    pyramid = build_pyramid(x, root_level, weighted, head_dim)
    tables = _similarity_tables(pyramid) if frames > 1 else None
    similarity = _table_similarity(pyramid, tables)

    def tokens_at(tau: float) -> tuple[SpatialTokens, torch.Tensor, int]:
        tokens, parent = _merge_pyramid(pyramid, tau, tau, similarity)
        count = int((parent == torch.arange(tokens.num_tokens, device=parent.device)).sum())
        return tokens, parent, count

    candidates = _threshold_candidates(pyramid, tables)
    best = tokens_at(float(candidates[0]))
    if best[2] > budget:
        raise ValueError(
            f"retention={retention} asks for at most {budget} of {frames * height * width} tokens, but merging "
            f"keeps at least {best[2]} (one per root-level cell); use a larger retention or a lower root_level")
    best_tau = float(candidates[0])
    low, high = 0, len(candidates)  # candidates[low] meets the budget; candidates[high:] are untried or fail
    while high - low > 1:
        mid = (low + high) // 2
        tau = float(candidates[mid])
        result = tokens_at(tau)
        if result[2] <= budget:
            low = mid
            if result[2] >= best[2]:
                best, best_tau = result, tau
        else:
            high = mid
        if best[2] == budget:
            break
    tokens, parent, _ = best
    params = dict(tau_s=best_tau, tau_t=best_tau, root_level=root_level, weighted=weighted,
                  head_dim=head_dim, budget=float(retention))
    return assemble(pyramid, tokens, parent, params)


# --------------------------------------------------------------------------- budget internals


def _ancestors(tree: Quadtree, lvl: int) -> torch.Tensor:
    """``[P - offsets[lvl]]`` the level-``lvl`` cell containing each cell at level >= ``lvl``."""
    finer = slice(tree.offsets[lvl], tree.num_cells)
    return tree.cover[lvl][tree.top_left[finer]]


def _similarity_tables(pyramid: Pyramid) -> tuple[torch.Tensor, torch.Tensor]:
    """Similarity of every cell to each containing cell one frame back and one forward.

    Returns ``(back, forward)``, each ``[T, P, L]``: ``back[t, p, l]`` compares cell ``p``
    of frame ``t`` with its level-``l`` ancestor position in frame ``t-1``;
    ``forward[t, p, l]`` with the one in frame ``t+1``. Entries that no pair can use
    (no such frame, or ``l`` finer than ``p``) are NaN.
    """
    tree = pyramid.tree
    f, inv = pyramid.features, pyramid.inv_norm
    shape = (pyramid.num_frames, tree.num_cells, tree.num_levels)
    back = torch.full(shape, math.nan, dtype=f.dtype, device=f.device)
    forward = torch.full(shape, math.nan, dtype=f.dtype, device=f.device)
    for lvl in range(tree.num_levels):
        finer = slice(tree.offsets[lvl], tree.num_cells)
        ancestors = _ancestors(tree, lvl)
        back[1:, finer, lvl] = cosine(f[1:, finer], f[:-1, ancestors], inv[1:, finer], inv[:-1, ancestors])
        forward[:-1, finer, lvl] = cosine(f[:-1, finer], f[1:, ancestors], inv[:-1, finer], inv[1:, ancestors])
    return back, forward


def _table_similarity(pyramid: Pyramid, tables: tuple[torch.Tensor, torch.Tensor] | None) -> PairSimilarity:
    """Candidate-pair similarities looked up in ``_similarity_tables`` (no channel arithmetic)."""
    level = pyramid.tree.level

    def similarity(tokens: SpatialTokens, pairs: CandidatePairs) -> torch.Tensor:
        back, forward = tables  # a single frame has no pairs, so no tables
        n = pairs.num_down
        finer_down, coarser_down = pairs.b[:n], pairs.a[:n]
        finer_up, coarser_up = pairs.a[n:], pairs.b[n:]
        return torch.cat([
            back[tokens.frame[finer_down], tokens.cell[finer_down], level[tokens.cell[coarser_down]]],
            forward[tokens.frame[finer_up], tokens.cell[finer_up], level[tokens.cell[coarser_up]]],
        ])

    return similarity


def _threshold_candidates(pyramid: Pyramid, tables: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """Sorted thresholds, one between each two neighbouring distinct similarities.

    The token count can only change where a threshold crosses a similarity the search
    compares against; ``-1`` (merge everything) and ``NEVER_MERGE`` bound the list.
    """
    spatial = pyramid.min_child_sim[:, pyramid.tree.level < pyramid.tree.num_levels - 1]
    values = [spatial.flatten(), torch.tensor([-1.0, NEVER_MERGE], dtype=spatial.dtype, device=spatial.device)]
    if tables is not None:
        values += [table[~table.isnan()] for table in tables]
    values = torch.unique(torch.cat(values)).double().cpu()  # unique sorts ascending
    # Midpoints between neighbours admit the same similarities as the values themselves,
    # but leave a margin, so recomputing a similarity in another order cannot flip it.
    return torch.cat([values[:1], (values[1:] + values[:-1]) / 2])
