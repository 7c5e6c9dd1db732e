"""Multi-granular spatio-temporal token merging (STTM), as fixed by ``STTM_SPEC.md``.

The work splits into a part that does not depend on the thresholds and a part that does:

1. ``cell_similarities``: every similarity the search can compare against, once per
   video: each cell against its children (spec section 1) and each cell against the
   nested cells of the previous frame (section 2).
2. ``emitted_cells``: the quadtree search of section 1 for a given ``tau_s`` (a few
   index operations per level, no arithmetic over channels).
3. ``choose_parents``: every token picks its parent one frame back (section 2).
4. ``assemble``: trees become tokens; their features are weighted sums of input patches.

``merge`` runs 1-4 once. ``merge_to_budget`` runs 1 once, counts the tokens of many
thresholds at a time with 2 and the link test of 3, then runs 2-4 at the chosen one.

**Why no cell features.** Every cell feature is a fixed weighted sum of the finest
patches of its root-level cell (its *block*, ``sttm.quadtree``), and every pair the
algorithm compares lies inside one block. So all the dot products come from small
per-block Gram matrices of patches (``[n, n]``, ``n`` = patches per block, 16 on a
14x14 grid with root level 1), one matmul per frame and per frame pair, instead of
building coarse features and reading channels once per compared pair. The only other
pass over the channels is the output features. Python loops run over pyramid levels
only; there are no loops over tokens or frames, and no host syncs but the output size.

Similarities are computed in float32 (float64 for float64 input) with IEEE float32
matmuls, features accumulated likewise and cast back to the input dtype at the end.
Everything is deterministic: there are no float atomics.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch

from sttm.quadtree import Quadtree, quadtree
from sttm.segment_sum import weighted_segment_sum
from sttm.token_set import TokenSet

EPS = 1e-8
NEVER_MERGE = 2.0  # a threshold above every possible cosine similarity
PROBE_ELEMENTS = 2**24  # how many (threshold, pair) tests one budget-search round may hold


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


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- similarities


@dataclass(frozen=True)
class CellSimilarities:
    """Threshold-independent similarities of one video's cells.

    Attributes:
        tree: index tables of one frame's ``P`` cells.
        min_child_sim: ``[T, P]`` lowest cosine similarity between a cell and its
            children; ``+inf`` for finest cells, which are always emitted.
        nested_sim: ``[T-1, E]`` cosine similarity of each nested cell pair of
            ``tree.nested`` in frames ``(t, t+1)``; ``None`` without temporal merging.
    """

    tree: Quadtree
    min_child_sim: torch.Tensor
    nested_sim: torch.Tensor | None

    @property
    def num_frames(self) -> int:
        return self.min_child_sim.shape[0]


@contextlib.contextmanager
def _ieee_float32_matmuls() -> Iterator[None]:
    """TF32 matmuls (``set_float32_matmul_precision("high")``, a common speed setting)
    would round the patches to 10 mantissa bits; the spec asks for float32 similarities."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def cell_similarities(x: torch.Tensor, root_level: int, weighted: bool, head_dim: int | None,
                      temporal: bool) -> CellSimilarities:
    """Parent-child similarities and, with ``temporal``, nested-pair similarities one
    frame apart, of ``x [T, H, W, C]`` (spec sections 1-2)."""
    frames, height, width, channels = x.shape
    tree = quadtree(height, width, root_level, x.device)
    compute_dtype = _compute_dtype(x)
    heads = channels // (head_dim or channels)
    weights = tree.block_weights[weighted].to(compute_dtype)[:, None]  # [R, 1, m, n]: cells from patches
    with _ieee_float32_matmuls():
        grams, cross_grams = _block_grams(x, tree, heads, compute_dtype, temporal=temporal and frames > 1)
        # Cell dot products per head: cell . cell' = w G w'^T.
        dots = weights @ grams @ weights.transpose(-1, -2)  # [T, R, heads, m, m]
        if cross_grams is not None:
            cross_dots = weights @ cross_grams @ weights.transpose(-1, -2)  # [T-1, R, heads, m, m]

    squared_norms = dots.diagonal(dim1=-2, dim2=-1)  # [T, R, heads, m]
    if not bool(torch.isfinite(squared_norms).all()):  # NaN or inf in x reaches every norm of its block
        raise ValueError("x contains NaN or inf values (or values too large to compare in float32)")
    # 1 / ((|cell| + eps) sqrt(heads)): the product of two gives the head average of cosines.
    inv_norm = 1.0 / ((squared_norms.clamp(min=0).sqrt() + EPS) * math.sqrt(heads))

    parent_cell, child_pair = tree.children
    child_sim = _cosines(dots, inv_norm, inv_norm)[:, child_pair]  # [T, E_c]
    min_child_sim = torch.full((frames, tree.num_cells), math.inf, dtype=compute_dtype, device=x.device)
    min_child_sim.scatter_reduce_(1, parent_cell.expand(frames, -1), child_sim, reduce="amin")
    nested_sim = None
    if cross_grams is not None:
        nested_sim = _cosines(cross_dots, inv_norm[:-1], inv_norm[1:])[:, tree.nested[2]]  # [T-1, E_n]
    return CellSimilarities(tree, min_child_sim, nested_sim)


def _block_grams(x: torch.Tensor, tree: Quadtree, heads: int, compute_dtype: torch.dtype,
                 temporal: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-head Gram matrices of each block's patches: ``[T, R, heads, n, n]`` within each
    frame and, with ``temporal``, ``[T-1, R, heads, n, n]`` between frame ``t`` (rows) and
    ``t+1`` (columns), in ``compute_dtype``. Run under ``_ieee_float32_matmuls``.

    Half-precision input on CUDA: whole frames, ``[H*W, H*W]``, on the tensor cores with
    float32 output (products of 16-bit floats are exact in float32 and the sums are
    float32, as after upcasting), then the blocks are picked out; on an H100 that is
    faster than gathering each block's patches. Elsewhere: gather each block's patches,
    upcast and multiply, ``n^2`` products per block instead of ``(H*W)^2`` per frame.
    """
    frames, height, width, channels = x.shape
    patches_per_frame, head_size = height * width, channels // heads
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
        by_head = x.reshape(frames, patches_per_frame, heads, head_size).transpose(1, 2)  # [T, heads, H*W, d]
        rows, columns = tree.block_patches[:, :, None], tree.block_patches[:, None, :]

        def gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            whole = torch.bmm(a.reshape(-1, patches_per_frame, head_size),
                              b.reshape(-1, patches_per_frame, head_size).transpose(1, 2), out_dtype=torch.float32)
            whole = whole.view(a.shape[0], heads, patches_per_frame, patches_per_frame)
            return whole[:, :, rows, columns].transpose(1, 2)

        return gram(by_head, by_head), gram(by_head[:-1], by_head[1:]) if temporal else None

    blocks, block_size = tree.block_patches.shape
    patches = x.reshape(frames, patches_per_frame, channels).index_select(1, tree.block_patches.flatten())
    patches = patches.to(compute_dtype).view(frames, blocks, block_size, heads, head_size).transpose(2, 3)
    grams = patches @ patches.transpose(-1, -2)
    return grams, patches[:-1] @ patches[1:].transpose(-1, -2) if temporal else None


def _cosines(dots: torch.Tensor, inv_rows: torch.Tensor, inv_columns: torch.Tensor) -> torch.Tensor:
    """``[T', R*m*m]`` head-averaged cosines from per-head dot products ``[T', R, heads, m, m]``."""
    scale = inv_rows[..., :, None] * inv_columns[..., None, :]
    return (dots * scale).sum(2).clamp_(-1.0, 1.0).flatten(1)


# --------------------------------------------------------------------------- search


def emitted_cells(tree: Quadtree, min_child_sim: torch.Tensor, tau_s: float | torch.Tensor) -> torch.Tensor:
    """``[..., T, P]`` bool: the cells the coarse-to-fine search emits as tokens.

    A cell is emitted when it is reached (every ancestor split) and all its children are
    similar to it. ``tau_s`` is a number or ``[K, 1, 1]`` (K thresholds at once).
    """
    merges = min_child_sim >= tau_s  # finest cells: +inf, always true
    active = torch.zeros_like(merges)
    active[..., tree.level_slice(0)] = True
    for lvl in range(1, tree.num_levels):
        cells = tree.level_slice(lvl)
        parents = tree.parent[cells]
        active[..., cells] = active[..., parents] & ~merges[..., parents]
    return active & merges


def _links(tree: Quadtree, nested_sim: torch.Tensor, emitted: torch.Tensor,
           tau_t: float | torch.Tensor) -> torch.Tensor:
    """``[..., T-1, E]`` bool: nested pairs of tokens one frame apart similar enough to link."""
    later, earlier, _ = tree.nested
    return emitted[..., 1:, later] & emitted[..., :-1, earlier] & (nested_sim >= tau_t)


def choose_parents(tree: Quadtree, nested_sim: torch.Tensor, emitted: torch.Tensor, tau_t: float) -> torch.Tensor:
    """``[T-1, P]`` the parent cell, one frame back, of each token of frames ``1..T-1``
    (-1: none): its most similar nested token with ``sim >= tau_t``, ties to the earlier
    token in ``(t, y0, x0)`` order."""
    later, earlier, _ = tree.nested
    links = _links(tree, nested_sim, emitted, tau_t)
    num_cells = tree.num_cells
    to_later = later.expand_as(links)
    best = torch.full((links.shape[0], num_cells), -math.inf, dtype=nested_sim.dtype, device=links.device)
    best.scatter_reduce_(1, to_later, torch.where(links, nested_sim, -math.inf), reduce="amax")
    is_best = links & (nested_sim == best.gather(1, to_later))
    # A token's candidates that are tokens are disjoint cells of one frame, so their
    # top-left patches differ and give the token order; the key also names the cell.
    no_key = int(tree.cover.shape[1]) * num_cells
    key = torch.where(is_best, tree.top_left[earlier] * num_cells + earlier, no_key)
    chosen = torch.full_like(best, no_key, dtype=torch.long).scatter_reduce_(1, to_later, key, reduce="amin")
    return torch.where(chosen < no_key, chosen % num_cells, -1)


def _token_counts(sims: CellSimilarities, taus: torch.Tensor) -> torch.Tensor:
    """``[K]`` output token count at each of ``taus [K]`` (``tau_s = tau_t = tau``).

    Each output token is a tree with one root, a token without a parent, so the count
    is the spatial tokens minus those that link to a parent; which parent each picks
    does not matter.
    """
    tree = sims.tree
    tau = taus.view(-1, 1, 1)
    emitted = emitted_cells(tree, sims.min_child_sim, tau)  # [K, T, P]
    count = emitted.sum(dim=(1, 2))
    if sims.nested_sim is not None:
        links = _links(tree, sims.nested_sim, emitted, tau)  # [K, T-1, E]
        links_per_cell = torch.zeros(emitted.shape[0], sims.num_frames - 1, tree.num_cells, dtype=torch.int32,
                                     device=emitted.device).index_add_(2, tree.nested[0], links.int())
        count -= (links_per_cell > 0).sum(dim=(1, 2))
    return count


# --------------------------------------------------------------------------- output


def assemble(x: torch.Tensor, tree: Quadtree, emitted: torch.Tensor, parent: torch.Tensor | None, weighted: bool,
             params: dict) -> TokenSet:
    """Turn the forest of spatial tokens into the output ``TokenSet`` (spec sections 2-3).

    Args:
        x: ``[T, H, W, C]`` the input.
        emitted: ``[T, P]`` the spatial tokens (``emitted_cells``).
        parent: ``[T-1, P]`` each token's parent cell one frame back (``choose_parents``),
            ``None`` without temporal merging.
    """
    frames, height, width, channels = x.shape
    num_cells, frame_patches = tree.num_cells, height * width
    patch_index = torch.arange(frame_patches, device=x.device)

    # Exactly one level emits a cell over each patch.
    level_of_patch = emitted[:, tree.cover].to(torch.uint8).argmax(dim=1)  # [T, H*W]
    cell_of_patch = tree.cover[level_of_patch, patch_index]  # [T, H*W]

    # Root of every cell's tree over flat (frame, cell) ids, by pointer jumping (trees
    # are < T deep); a cell without a parent is its own root.
    flat = torch.arange(frames * num_cells, device=x.device).view(frames, num_cells)
    root, is_root = flat, emitted
    if parent is not None:
        has_parent = parent >= 0
        root = flat.clone()
        root[1:] = torch.where(has_parent, flat[:-1, :1] + parent, flat[1:])
        root = root.view(-1)
        for _ in range(math.ceil(math.log2(max(frames - 1, 1)))):
            root = root[root]
        root = root.view(frames, num_cells)
        is_root = emitted.clone()
        is_root[1:] &= ~has_parent

    # Output tokens are the trees, ordered by their root's (t, y0, x0).
    root_ids = is_root.view(-1).nonzero().squeeze(1)
    root_frame, root_cell = root_ids // num_cells, root_ids % num_cells
    order = (root_frame * frame_patches + tree.top_left[root_cell]).argsort()
    root_ids, root_frame, root_cell = root_ids[order], root_frame[order], root_cell[order]
    num_outputs = int(root_ids.shape[0])
    output_of_flat = torch.zeros(frames * num_cells, dtype=torch.long, device=x.device)
    output_of_flat[root_ids] = torch.arange(num_outputs, device=x.device)
    output_of_cell = output_of_flat[root.reshape(-1)].view(frames, num_cells)  # meaningful where emitted
    assignment = output_of_cell.gather(1, cell_of_patch).view(-1)  # [T*H*W]
    num_patches = torch.zeros(num_outputs, dtype=torch.long, device=x.device)
    num_patches.index_add_(0, assignment, torch.ones_like(assignment))

    # A token's feature is a weighted sum of the patches it covers: the patch mean, or
    # (plain) the mean over its member cells of each cell's mean of means.
    compute_dtype = _compute_dtype(x)
    if weighted:
        patch_weight = 1.0 / num_patches.to(compute_dtype)[assignment]
    else:
        members = torch.zeros(num_outputs, dtype=compute_dtype, device=x.device)
        # Whole numbers: exact, whatever order the additions take.
        members.index_add_(0, output_of_cell.view(-1), emitted.view(-1).to(compute_dtype))
        patch_weight = tree.mean_weight[level_of_patch, patch_index].view(-1).to(compute_dtype) / members[assignment]
    features = weighted_segment_sum(x.reshape(-1, channels), patch_weight, assignment, num_patches)

    return TokenSet(
        features=features,
        frame=root_frame.to(torch.int32),
        box=tree.box[root_cell].to(torch.int32),
        num_patches=num_patches.to(torch.int32),
        assignment=assignment.view(frames, height, width).to(torch.int32),
        grid=(frames, height, width),
        **params,
    )


def _merge_at(x: torch.Tensor, sims: CellSimilarities, tau_s: float, tau_t: float | None, weighted: bool,
              params: dict) -> TokenSet:
    """The tokens of ``x`` at fixed thresholds, from its similarities."""
    # Python floats compare after one rounding to the similarities' dtype, as the budget
    # search's threshold tensors do (and, unlike those, without a copy to the device).
    emitted = emitted_cells(sims.tree, sims.min_child_sim, tau_s)
    parent = None
    if tau_t is not None and sims.nested_sim is not None:
        parent = choose_parents(sims.tree, sims.nested_sim, emitted, tau_t)
    return assemble(x, sims.tree, emitted, parent, weighted, params)


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
    sims = cell_similarities(x, root_level, weighted, head_dim, temporal=tau_t is not None)
    params = dict(tau_s=float(tau_s), tau_t=None if tau_t is None else float(tau_t),
                  root_level=root_level, weighted=weighted, head_dim=head_dim)
    return _merge_at(x, sims, tau_s, tau_t, weighted, params)


def merge_to_budget(x: torch.Tensor, retention: float, *, root_level: int = 1, weighted: bool = False,
                    head_dim: int | None = None) -> TokenSet:
    """Merge to a token budget: at most ``floor(retention * T*H*W)`` tokens, as many as possible.

    Threshold schedule: both thresholds move together, ``tau_s = tau_t = tau``. The
    token count changes only where ``tau`` crosses a similarity that the search
    compares against, so the candidates for ``tau`` are exactly those similarities
    (every cell's lowest child similarity and every nested cell pair one frame apart),
    plus ``2.0`` (merge nothing). The search narrows the sorted candidates down by
    counting the tokens of many of them at once (up to 64 per round, a few rounds);
    counting is index work only, no arithmetic over channels. The chosen thresholds are
    recorded in the result, and ``merge(x, tau_s=tau, tau_t=tau)`` reproduces it.

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
    sims = cell_similarities(x, root_level, weighted, head_dim, temporal=True)
    candidates = _threshold_candidates(sims)
    fewest = int(_token_counts(sims, _on_device(candidates[:1], sims))[0])
    if fewest > budget:
        raise ValueError(
            f"retention={retention} asks for at most {budget} of {frames * height * width} tokens, but merging "
            f"keeps at least {fewest} (one per root-level cell); use a larger retention or a lower root_level")
    tau = float(candidates[_search_budget(sims, candidates, budget, fewest)])
    params = dict(tau_s=tau, tau_t=tau, root_level=root_level, weighted=weighted, head_dim=head_dim,
                  budget=float(retention))
    return _merge_at(x, sims, tau, tau, weighted, params)


# --------------------------------------------------------------------------- budget internals


def _threshold_candidates(sims: CellSimilarities) -> torch.Tensor:
    """Sorted float64 CPU thresholds, one between each two neighbouring distinct similarities.

    The token count can only change where a threshold crosses a similarity the search
    compares against; ``-1`` (merge everything) and ``NEVER_MERGE`` bound the list.
    """
    spatial = sims.min_child_sim[:, : sims.tree.offsets[-1]]  # cells with children
    values = [spatial.flatten(), torch.tensor([-1.0, NEVER_MERGE], dtype=spatial.dtype, device=spatial.device)]
    if sims.nested_sim is not None:
        values.append(sims.nested_sim.flatten())
    values = torch.unique(torch.cat(values)).double().cpu()  # unique sorts ascending
    # Midpoints between neighbours admit the same similarities as the values themselves,
    # but leave a margin, so a threshold never sits exactly on a similarity.
    return torch.cat([values[:1], (values[1:] + values[:-1]) / 2])


def _on_device(taus: torch.Tensor, sims: CellSimilarities) -> torch.Tensor:
    return taus.to(device=sims.min_child_sim.device, dtype=sims.min_child_sim.dtype)


def _search_budget(sims: CellSimilarities, candidates: torch.Tensor, budget: int, fewest: int) -> int:
    """Index of the candidate with the most tokens within ``budget`` found by a K-ary search.

    Each round counts the tokens at up to K evenly spread candidates of the bracket
    ``[low, high)`` in one batch (one host sync) and keeps the part between the last
    candidate that fits and the next one. The count is not monotone in ``tau`` everywhere
    (a finer spatial split can let more temporal links form), so the best count seen
    that fits is kept, ties to the larger ``tau``.
    """
    tree = sims.tree
    per_candidate = sims.num_frames * tree.num_cells + (0 if sims.nested_sim is None else sims.nested_sim.numel())
    probes_per_round = max(2, min(64, PROBE_ELEMENTS // per_candidate))
    best_count, best_index = fewest, 0
    low, high = 0, len(candidates)  # candidates[low] fits the budget; candidates[high] does not (or is past the end)
    while high - low > 1 and best_count < budget:
        probes = torch.linspace(low, high - 1, probes_per_round + 1).round().long().unique()[1:].tolist()
        counts = _token_counts(sims, _on_device(candidates[probes], sims)).tolist()
        fitting = [i for i, count in enumerate(counts) if count <= budget]
        for i in fitting:
            if counts[i] >= best_count:
                best_count, best_index = counts[i], probes[i]
        if fitting:
            last = fitting[-1]
            low = probes[last]
            high = probes[last + 1] if last + 1 < len(probes) else high
        else:
            high = probes[0]
    return best_index
