"""The result of STTM: a set of multi-granular spatio-temporal tokens (spec section 3)."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class TokenSet:
    """Merged visual tokens of one video.

    Tokens are ordered by their root's ``(frame, y0, x0)``; token ``i`` covers the patches
    where ``assignment == i``.

    Attributes:
        features: ``[N, C]`` merged token features, in the input dtype.
        frame: ``[N]`` int32, frame of the token's root (its earliest member).
        box: ``[N, 4]`` int32, ``(y0, x0, y1, x1)`` of the root's cell, half-open, in
            finest-grid coordinates.
        num_patches: ``[N]`` int32, how many of the ``T*H*W`` input patches the token covers.
        assignment: ``[T, H, W]`` int32, index of the token covering each input patch.
        grid: ``(T, H, W)`` of the input.
        tau_s: spatial threshold used.
        tau_t: temporal threshold used, ``None`` when temporal merging was off.
        root_level: root level asked for (the search starts at ``min(root_level, K)``).
        weighted: whether features are patch-count weighted means.
        head_dim: head size of the per-head cosine similarity, ``None`` for one head.
        budget: the retention target in budget mode, ``None`` for fixed thresholds.
    """

    features: torch.Tensor
    frame: torch.Tensor
    box: torch.Tensor
    num_patches: torch.Tensor
    assignment: torch.Tensor
    grid: tuple[int, int, int]
    tau_s: float
    tau_t: float | None
    root_level: int
    weighted: bool
    head_dim: int | None
    budget: float | None = None

    @property
    def num_tokens(self) -> int:
        return self.features.shape[0]

    @property
    def retention(self) -> float:
        """``N / (T*H*W)``: the fraction of input tokens kept."""
        t, h, w = self.grid
        return self.num_tokens / (t * h * w)

    def unmerge(self) -> torch.Tensor:
        """Copy each token's feature back to the patches it covers: ``[T, H, W, C]``."""
        return self.features[self.assignment.long()]

    def to(self, device: torch.device | str) -> "TokenSet":
        """The same token set with every tensor on ``device``."""
        return replace(
            self,
            features=self.features.to(device),
            frame=self.frame.to(device),
            box=self.box.to(device),
            num_patches=self.num_patches.to(device),
            assignment=self.assignment.to(device),
        )
