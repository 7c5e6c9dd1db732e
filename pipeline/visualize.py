"""See what STTM did to one video: its tokens drawn on its frames, and how many tokens a
threshold keeps.

``visualize_stored_video`` reads a token set from a store, decodes the frames it was made
from again (the stored ``source_uri`` and ``frame_indices``) and draws every token on a
grid of those frames, where the store says it is:

- a token's root (its earliest cell, ``box`` at ``frame``) is outlined in the frame
  where the token starts: yellow for one patch of the finest grid, cyan for a coarser
  quadtree cell (merged in space), magenta when the token's tree continues into later
  frames (merged in time);
- in a later frame, patches that joined a token of an earlier frame have no token of
  their own there: they are tinted magenta, not outlined.

The token grid ``H x W`` is laid over the whole decoded frame by scaling: both model
families see the whole frame (LLaVA-OneVision squashes it to 384x384, Qwen resizes it
keeping its aspect ratio). One token frame stands for ``temporal_patch_size`` sampled
frames (``model_extra``; Qwen: 2, LLaVA-OneVision: 1); its panel shows the first.

``budget_curve`` merges one video's tokens at a range of thresholds ``tau`` (``tau_s =
tau_t = tau``, the schedule ``sttm.merge_to_budget`` searches) and ``draw_budget_curve``
plots retention against ``tau``, with the thresholds the budget search picks for
retention 0.5 and 0.3 marked, so users can choose a budget or fixed thresholds.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import sttm
from pipeline.decode import UniformSampling, decode_video, fetch_video
from pipeline.errors import VideoError
from pipeline.models import load_adapter
from pipeline.store import StoredTokenSet, TokenStore
from pipeline.uris import sanitize_uri
from sttm.token_set import TokenSet

# --------------------------------------------------------------------------- colours

FINEST_COLOUR = (255, 214, 0)  # yellow: one patch of the finest grid, in one frame
COARSE_COLOUR = (0, 190, 255)  # cyan: a coarser quadtree cell, in one frame
SPANS_FRAMES_COLOUR = (255, 0, 200)  # magenta: a token whose tree continues into later frames
# Patches of a later frame that joined an earlier frame's token are blended with magenta
# at this weight: the frame stays visible under them.
CONTINUATION_TINT = 0.35

BACKGROUND = (24, 24, 24)
TEXT_COLOUR = (235, 235, 235)
MARGIN = 8
LABEL_HEIGHT = 18  # text line above each panel
LINE_HEIGHT = 18  # legend and caption lines
MAX_COLUMNS = 4
MIN_WIDTH = 720  # room for the legend and caption under a single narrow panel
MIN_CELL_PIXELS = 2  # a token cell smaller than this on screen cannot show an outline


class TokenKind(IntEnum):
    """How a token was merged, which decides its colour."""

    FINEST = 0  # one finest-grid patch in one frame: not merged
    COARSE = 1  # a coarser quadtree cell in one frame: merged in space
    SPANS_FRAMES = 2  # its tree continues into later frames: merged in time (any cell size)


KIND_COLOURS = {TokenKind.FINEST: FINEST_COLOUR, TokenKind.COARSE: COARSE_COLOUR,
                TokenKind.SPANS_FRAMES: SPANS_FRAMES_COLOUR}


class SourceUnavailableError(Exception):
    """The video a token set was made from cannot be decoded again as it was: it is gone,
    unreadable, not decodable, or its bytes changed since the token set was made.

    Attributes:
        video_id: the store's video id.
        uri: the stored source uri (without credentials).
        reason: what is wrong, in words.
    """

    def __init__(self, video_id: str, uri: str, reason: str):
        self.video_id, self.uri, self.reason = video_id, sanitize_uri(uri), reason
        super().__init__(f"cannot draw video {video_id!r}: its source {self.uri} {reason}")


# --------------------------------------------------------------------------- token facts


def last_frames(tokens: TokenSet) -> torch.Tensor:
    """``[N]`` int64: the last frame each token covers a patch in, from ``assignment``."""
    t = tokens.grid[0]
    frame_of_patch = torch.arange(t).view(t, 1, 1).expand(tokens.grid).reshape(-1)
    last = torch.zeros(tokens.num_tokens, dtype=torch.int64)
    return last.scatter_reduce(0, tokens.assignment.reshape(-1).long(), frame_of_patch, reduce="amax")


def token_kinds(tokens: TokenSet) -> torch.Tensor:
    """``[N]`` int64 ``TokenKind`` of each token: spanning frames (by ``assignment``) first,
    else by the size of its root cell."""
    box = tokens.box.long()
    area = (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])
    kinds = torch.where(area > 1, TokenKind.COARSE, TokenKind.FINEST)
    return torch.where(last_frames(tokens) > tokens.frame.long(), TokenKind.SPANS_FRAMES, kinds)


def sampled_frames_per_token_frame(record: StoredTokenSet) -> int:
    """How many sampled frames one token frame stands for: the model's temporal patch
    (``model_extra["temporal_patch_size"]``; Qwen: 2), else 1 (LLaVA-OneVision).

    Raises ValueError when the stored frames do not make the stored token frames.
    """
    per_token_frame = int(record.model_extra.get("temporal_patch_size", 1))
    num_token_frames, num_sampled = record.tokens.grid[0], len(record.frame_indices)
    if math.ceil(num_sampled / per_token_frame) != num_token_frames:
        raise ValueError(f"token set of video {record.video_id!r} has {num_token_frames} token frames but "
                         f"{num_sampled} sampled frames at {per_token_frame} per token frame")
    return per_token_frame


def panel_token_frames(num_token_frames: int, max_panels: int) -> list[int]:
    """Up to ``max_panels`` token frames spread evenly from the first to the last."""
    if max_panels < 1:
        raise ValueError(f"max_panels must be >= 1, got {max_panels}")
    count = min(num_token_frames, max_panels)
    return sorted(set(np.linspace(0, num_token_frames - 1, count).round().astype(int).tolist()))


# --------------------------------------------------------------------------- frames of a token set


@dataclass(frozen=True)
class DisplayFrames:
    """A sampling policy that decodes given frames at a display width (keeping the aspect
    ratio): the frames a token set was made from, small enough to draw on."""

    indices: tuple[int, ...]
    width: int

    def frame_indices(self, num_frames_total: int, fps: float) -> list[int]:
        return list(self.indices)

    def frame_size(self, height: int, width: int, num_frames: int) -> tuple[int, int]:
        return max(1, round(self.width * height / width)), self.width


def decode_token_frames(record: StoredTokenSet, token_frames: Sequence[int], width: int,
                        storage_options: Mapping[str, Any] | None = None) -> torch.Tensor:
    """The first sampled frame of each of ``token_frames``, decoded again from the stored
    source at ``width`` pixels: uint8 ``[P, h, width, 3]``.

    Raises SourceUnavailableError (naming the video id and uri) when the source is gone,
    unreadable or not decodable, or its bytes are not the ones the token set was made from.
    """
    per_token_frame = sampled_frames_per_token_frame(record)
    indices = tuple(record.frame_indices[t * per_token_frame] for t in token_frames)
    try:
        fetched = fetch_video(record.source_uri, dict(storage_options or {}))
        if fetched.content_hash != record.content_hash:
            raise SourceUnavailableError(
                record.video_id, record.source_uri,
                f"has changed since the token set was made (its bytes hash to {fetched.content_hash}, the "
                f"token set was made from {record.content_hash})")
        return decode_video(record.source_uri, DisplayFrames(indices, width), dict(storage_options or {}),
                            fetched=fetched).frames
    except VideoError as error:
        raise SourceUnavailableError(record.video_id, record.source_uri,
                                     f"cannot be decoded again: {error.reason}") from error


# --------------------------------------------------------------------------- drawing a token set


@dataclass(frozen=True)
class Panel:
    """Where one token frame was drawn in the image.

    Attributes:
        token_frame: index ``t`` into the token grid.
        frame_indices: the sampled frames (indices in the video) token frame ``t``
            stands for; the panel shows the first.
        timestamp: presentation time in seconds of the frame shown.
        tokens_starting: tokens whose root is in this token frame.
        left, top, width, height: the frame's rectangle in the image, in pixels.
    """

    token_frame: int
    frame_indices: list[int]
    timestamp: float
    tokens_starting: int
    left: int
    top: int
    width: int
    height: int


@dataclass(frozen=True)
class Visualization:
    """The drawn image of one token set, and what it shows."""

    image: Image.Image
    panels: list[Panel]
    caption: list[str]
    record: StoredTokenSet

    def to_dict(self) -> dict[str, Any]:
        tokens = self.record.tokens
        kinds = torch.bincount(token_kinds(tokens), minlength=len(TokenKind)).tolist()
        return {
            "video_id": self.record.video_id, "source_uri": self.record.source_uri,
            "config_fingerprint": self.record.config_fingerprint, "model_id": self.record.model_id,
            "grid": list(tokens.grid), "num_tokens": tokens.num_tokens, "retention": tokens.retention,
            "tau_s": tokens.tau_s, "tau_t": tokens.tau_t, "budget": tokens.budget, "root_level": tokens.root_level,
            "tokens_by_kind": {kind.name.lower(): kinds[kind] for kind in TokenKind},
            "width": self.image.width, "height": self.image.height,
            "panels": [vars(panel) for panel in self.panels], "caption": self.caption,
        }


def visualize_stored_video(store_url: str, video_id: str, *, config_fingerprint: str | None = None,
                           max_panels: int = 8, panel_width: int = 320,
                           storage_options: Mapping[str, Any] | None = None) -> Visualization:
    """Draw the token set of ``video_id`` on up to ``max_panels`` of its frames.

    ``storage_options`` reach both the store and the video source. Panels are made wide
    enough for at least 4 pixels per token column.

    Raises NotFoundError / AmbiguousError (pipeline.store) for an unknown video id or
    one with several configs and none named, and SourceUnavailableError when its frames
    cannot be decoded again.
    """
    record = TokenStore(store_url, storage_options).read(video_id, config_fingerprint)
    token_frames = panel_token_frames(record.tokens.grid[0], max_panels)
    panel_width = max(panel_width, 4 * record.tokens.grid[2])
    frames = decode_token_frames(record, token_frames, panel_width, storage_options)
    return draw_token_set(record, frames, token_frames)


def draw_token_set(record: StoredTokenSet, frames: torch.Tensor, token_frames: Sequence[int]) -> Visualization:
    """Draw ``record``'s tokens on ``frames`` (uint8 ``[P, h, w, 3]``, the frame shown for
    each of ``token_frames``), panels in rows of up to 4, then a legend and a caption."""
    tokens = record.tokens
    kinds = token_kinds(tokens)
    per_token_frame = sampled_frames_per_token_frame(record)
    num_panels, frame_height, frame_width = len(token_frames), frames.shape[1], frames.shape[2]
    columns = min(MAX_COLUMNS, num_panels)
    rows = math.ceil(num_panels / columns)
    width = max(columns * frame_width + (columns + 1) * MARGIN, MIN_WIDTH)
    font = ImageFont.load_default(size=12)

    legend = _legend_rows(font, width - 2 * MARGIN)
    caption = _wrap(_caption_parts(record, kinds, len(token_frames)), font, width - 2 * MARGIN)
    row_height = LABEL_HEIGHT + frame_height + MARGIN
    legend_top = MARGIN + rows * row_height
    caption_top = legend_top + len(legend) * LINE_HEIGHT + MARGIN // 2
    image = Image.new("RGB", (width, caption_top + len(caption) * LINE_HEIGHT + MARGIN), BACKGROUND)
    draw = ImageDraw.Draw(image)

    panels = []
    root_frames = tokens.frame.tolist()
    for n, t in enumerate(token_frames):
        left = MARGIN + (n % columns) * (frame_width + MARGIN)
        top = MARGIN + (n // columns) * row_height + LABEL_HEIGHT
        image.paste(draw_token_frame(frames[n].numpy(), tokens, kinds, t), (left, top))
        first = t * per_token_frame
        covered = record.frame_indices[first : first + per_token_frame]
        panel = Panel(token_frame=t, frame_indices=covered, timestamp=record.timestamps[first],
                      tokens_starting=root_frames.count(t), left=left, top=top, width=frame_width,
                      height=frame_height)
        shown = f"frame {covered[0]}" if len(covered) == 1 else f"frames {covered[0]}-{covered[-1]}"
        labels = [f"{shown} · {panel.timestamp:.2f} s · {panel.tokens_starting} tokens start here",
                  f"{shown} · {panel.tokens_starting} new tokens", shown]  # longest that fits the panel
        label = next((text for text in labels if font.getlength(text) <= frame_width), shown)
        draw.text((left, top - LABEL_HEIGHT + 3), label, font=font, fill=TEXT_COLOUR)
        panels.append(panel)

    for line, items in enumerate(legend):
        x, y = MARGIN, legend_top + line * LINE_HEIGHT
        for colour, label, tinted in items:
            _draw_swatch(draw, (x, y + 2), colour, tinted)
            draw.text((x + 18, y + 2), label, font=font, fill=TEXT_COLOUR)
            x += _legend_item_width(font, label)
    for line, text in enumerate(caption):
        draw.text((MARGIN, caption_top + line * LINE_HEIGHT), text, font=font, fill=TEXT_COLOUR)
    return Visualization(image=image, panels=panels, caption=caption, record=record)


def draw_token_frame(frame: np.ndarray, tokens: TokenSet, kinds: torch.Tensor, t: int) -> Image.Image:
    """One panel: token frame ``t`` of ``tokens`` drawn on ``frame`` (uint8 ``[h, w, 3]``).

    The ``H x W`` token grid is scaled over the frame: token column ``x`` covers pixel
    columns ``[edges[x], edges[x+1])`` with ``edges[x] = round(x * w / W)``. A root box
    ``(y0, x0, y1, x1)`` is outlined inside its pixel rectangle, so boxes that touch never
    draw over each other.
    """
    height, width = frame.shape[:2]
    _, grid_height, grid_width = tokens.grid
    row_edges, column_edges = _cell_edges(grid_height, height), _cell_edges(grid_width, width)
    smallest_cell = min(np.diff(row_edges).min(), np.diff(column_edges).min())
    if smallest_cell < MIN_CELL_PIXELS:
        raise ValueError(f"a {width}x{height} px frame is too small to draw a {grid_height}x{grid_width} token grid; "
                         "use a larger panel width")
    line_width = 2 if smallest_cell >= 10 else 1

    continued = tokens.frame.numpy()[tokens.assignment[t].numpy()] < t  # [H, W] patches of an earlier frame's token
    pixel_rows = np.repeat(np.arange(grid_height), np.diff(row_edges))
    pixel_columns = np.repeat(np.arange(grid_width), np.diff(column_edges))
    tinted = continued[pixel_rows][:, pixel_columns]  # [h, w]
    pixels = frame.astype(np.float32)
    pixels[tinted] = (1 - CONTINUATION_TINT) * pixels[tinted] + CONTINUATION_TINT * np.float32(SPANS_FRAMES_COLOUR)
    image = Image.fromarray(pixels.round().astype(np.uint8))
    draw = ImageDraw.Draw(image)

    # Tokens starting in this frame: their root box.
    for i in torch.nonzero(tokens.frame == t).flatten().tolist():
        y0, x0, y1, x1 = tokens.box[i].tolist()
        draw.rectangle([column_edges[x0], row_edges[y0], column_edges[x1] - 1, row_edges[y1] - 1],
                       outline=KIND_COLOURS[TokenKind(int(kinds[i]))], width=line_width)
    return image


def _cell_edges(num_cells: int, num_pixels: int) -> np.ndarray:
    """``[num_cells + 1]`` pixel boundaries of ``num_cells`` equal cells over ``num_pixels``."""
    return np.round(np.arange(num_cells + 1) * num_pixels / num_cells).astype(int)


_LEGEND = [
    (FINEST_COLOUR, "one patch (finest level)", False),
    (COARSE_COLOUR, "coarser cell (merged in space)", False),
    (SPANS_FRAMES_COLOUR, "first cell of a token spanning later frames", False),
    (SPANS_FRAMES_COLOUR, "merged into a token of an earlier frame", True),
]


def _legend_item_width(font: ImageFont.FreeTypeFont, label: str) -> int:
    return 18 + math.ceil(font.getlength(label)) + 16


def _legend_rows(font: ImageFont.FreeTypeFont, width: int) -> list[list[tuple]]:
    """The legend's items, flowed into rows that fit ``width`` pixels."""
    rows, used = [[]], 0
    for item in _LEGEND:
        item_width = _legend_item_width(font, item[1])
        if rows[-1] and used + item_width > width:
            rows.append([])
            used = 0
        rows[-1].append(item)
        used += item_width
    return rows


def _draw_swatch(draw: ImageDraw.ImageDraw, corner: tuple[int, int], colour: tuple[int, int, int], tinted: bool):
    x, y = corner
    if tinted:  # the tint over a mid grey
        blend = tuple(round((1 - CONTINUATION_TINT) * 128 + CONTINUATION_TINT * c) for c in colour)
        draw.rectangle([x, y, x + 12, y + 12], fill=blend, outline=colour)
    else:
        draw.rectangle([x, y, x + 12, y + 12], outline=colour, width=2)


def _caption_parts(record: StoredTokenSet, kinds: torch.Tensor, num_panels: int) -> list[str]:
    tokens = record.tokens
    t, h, w = tokens.grid
    counts = torch.bincount(kinds, minlength=len(TokenKind)).tolist()
    return [
        record.video_id,
        f"model {record.model_id}",
        f"grid {t}x{h}x{w}",
        f"kept {tokens.num_tokens:,} of {t * h * w:,} tokens: retention {tokens.retention:.3f}",
        f"tau_s {tokens.tau_s:.4f}",
        "temporal merging off" if tokens.tau_t is None else f"tau_t {tokens.tau_t:.4f}",
        "fixed thresholds" if tokens.budget is None else f"budget {tokens.budget:g}",
        f"root level {tokens.root_level}",
        f"{counts[TokenKind.FINEST]} single patches, {counts[TokenKind.COARSE]} coarser cells, "
        f"{counts[TokenKind.SPANS_FRAMES]} spanning frames",
        f"showing {num_panels} of {t} token frames",
    ]


def _wrap(parts: list[str], font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """``parts`` joined by " · " into lines no wider than ``width`` pixels (a part wider
    than a line gets a line of its own)."""
    lines = [parts[0]]
    for part in parts[1:]:
        joined = f"{lines[-1]} · {part}"
        if font.getlength(joined) <= width:
            lines[-1] = joined
        else:
            lines.append(part)
    return lines


# --------------------------------------------------------------------------- budget curve


@dataclass(frozen=True)
class CurvePoint:
    """What ``sttm.merge(x, tau_s=tau, tau_t=tau)`` keeps."""

    tau: float
    num_tokens: int
    retention: float


@dataclass(frozen=True)
class BudgetCurve:
    """Retention against the threshold ``tau`` for one video's tokens.

    Attributes:
        grid: ``(T, H, W)`` of the tokens.
        points: sorted by ``tau``.
        budgets: per asked retention budget, the point ``sttm.merge_to_budget`` picks, or
            None when no threshold gets that few tokens (fewer than one per root cell).
    """

    grid: tuple[int, int, int]
    points: list[CurvePoint]
    budgets: dict[float, CurvePoint | None]

    def to_dict(self) -> dict[str, Any]:
        return {"grid": list(self.grid), "points": [vars(p) for p in self.points],
                "budgets": [{"budget": b, **(vars(p) if p else {"tau": None, "num_tokens": None, "retention": None})}
                            for b, p in self.budgets.items()]}


def budget_curve(x: torch.Tensor, *, budgets: Sequence[float] = (0.5, 0.3), num_points: int = 40,
                 root_level: int = 1) -> BudgetCurve:
    """Retention of ``x`` (``[T, H, W, C]`` visual tokens) merged with ``tau_s = tau_t =
    tau`` for thresholds from where merging goes as far as it can up to 1, plus the budget
    search's pick for each of ``budgets``.

    A coarse pass over ``[-1, 1]`` finds where the curve starts to rise; then
    ``num_points`` more thresholds each split the largest retention step between two
    neighbours. Real encoders' similarities crowd close to 1, so evenly spaced thresholds
    would leave the steep end, where budgets are picked, with a few points.
    """
    def point(tau: float) -> CurvePoint:
        merged = sttm.merge(x, tau_s=tau, tau_t=tau, root_level=root_level)
        return CurvePoint(tau=tau, num_tokens=merged.num_tokens, retention=merged.retention)

    coarse = [point(tau) for tau in np.linspace(-1.0, 1.0, 11).tolist()]
    fewest = coarse[0].num_tokens  # at tau = -1 everything merges as far as it can
    lowest = max(p.tau for p in coarse if p.num_tokens == fewest)
    points = [p for p in coarse if p.tau >= lowest]
    for _ in range(num_points):
        # Steps narrower than this in tau are one similarity shared by many cells (e.g.
        # identical frames): splitting them again cannot show more.
        steps = [(abs(b.retention - a.retention), i) for i, (a, b) in enumerate(zip(points, points[1:]))
                 if b.tau - a.tau > 1e-6]
        if not steps or max(steps)[0] == 0:
            break
        i = max(steps)[1]
        points.insert(i + 1, point((points[i].tau + points[i + 1].tau) / 2))

    total = math.prod(x.shape[:3])
    picked: dict[float, CurvePoint | None] = {}
    for budget in budgets:
        if math.floor(budget * total) < fewest:
            picked[budget] = None
            continue
        merged = sttm.merge_to_budget(x, budget, root_level=root_level)
        picked[budget] = CurvePoint(merged.tau_s, merged.num_tokens, merged.retention)
    on_curve = {p.tau: p for p in points} | {p.tau: p for p in picked.values() if p is not None}
    return BudgetCurve(grid=tuple(x.shape[:3]), points=sorted(on_curve.values(), key=lambda p: p.tau),
                       budgets=picked)


def measure_budget_curve(video_uri: str, model_spec: str, *, frames: int | None = None, device: str = "cpu",
                         dtype: torch.dtype | None = None, storage_options: Mapping[str, Any] | None = None,
                         budgets: Sequence[float] = (0.5, 0.3), num_points: int = 40,
                         root_level: int = 1) -> BudgetCurve:
    """Decode ``video_uri`` (``frames`` uniform frames, or the model's own sampling),
    encode it with ``model_spec``'s vision side, and compute its ``budget_curve``."""
    adapter = load_adapter(model_spec, device=device, dtype=dtype)
    policy = UniformSampling(frames) if frames else adapter.default_sampling()
    video = decode_video(video_uri, policy, dict(storage_options or {}))
    tokens = adapter.encode(video).tokens
    return budget_curve(tokens, budgets=budgets, num_points=num_points, root_level=root_level)


@dataclass(frozen=True)
class CurvePlot:
    """A drawn budget curve; ``area`` is the plot's ``(left, top, right, bottom)`` in
    pixels, spanning ``tau_range`` across and retention 0 to 1 up."""

    image: Image.Image
    area: tuple[int, int, int, int]
    tau_range: tuple[float, float]

    def to_pixel(self, tau: float, retention: float) -> tuple[int, int]:
        left, top, right, bottom = self.area
        low, high = self.tau_range
        return (round(left + (tau - low) / (high - low) * (right - left)),
                round(bottom - retention * (bottom - top)))


CURVE_COLOUR = (31, 119, 180)
BUDGET_COLOURS = [(230, 120, 0), (200, 30, 40), (40, 150, 60), (140, 80, 180)]
_PLOT_SIZE = (800, 500)
_GRID_COLOUR = (225, 225, 225)
_INK = (20, 20, 20)


def draw_budget_curve(curve: BudgetCurve, title: str) -> CurvePlot:
    """Plot retention (up) against ``tau`` (across) as a line through ``curve.points``,
    each budget's pick as a dot on a dashed line at that budget, and a legend below."""
    width, height = _PLOT_SIZE
    font = ImageFont.load_default(size=12)
    area = (70, 56, width - 30, height - 70 - 16 * len(curve.budgets))
    taus = [p.tau for p in curve.points]
    plot = CurvePlot(image=Image.new("RGB", _PLOT_SIZE, "white"), area=area, tau_range=(min(taus), max(taus)))
    draw = ImageDraw.Draw(plot.image)
    left, top, right, bottom = area

    draw.text((left, 14), title, font=ImageFont.load_default(size=14), fill=_INK)
    draw.text((left - 60, top - 22), "retention", font=font, fill=_INK)
    for tick in np.linspace(0, 1, 11).tolist():
        _, y = plot.to_pixel(plot.tau_range[0], tick)
        draw.line([(left, y), (right, y)], fill=_GRID_COLOUR)
        draw.text((left - 8, y), f"{tick:.1f}", font=font, fill=_INK, anchor="rm")
    step, decimals = _tick_step(plot.tau_range[1] - plot.tau_range[0])
    for tick in np.arange(math.ceil(plot.tau_range[0] / step) * step, plot.tau_range[1] + step / 2, step).tolist():
        x, _ = plot.to_pixel(tick, 0)
        draw.line([(x, top), (x, bottom)], fill=_GRID_COLOUR)
        draw.text((x, bottom + 6), f"{tick:.{decimals}f}", font=font, fill=_INK, anchor="mt")
    draw.rectangle(area, outline=_INK)
    draw.text(((left + right) // 2, bottom + 24), "tau (tau_s = tau_t)", font=font, fill=_INK, anchor="mt")

    draw.line([plot.to_pixel(p.tau, p.retention) for p in curve.points], fill=CURVE_COLOUR, width=2)
    for p in curve.points:
        x, y = plot.to_pixel(p.tau, p.retention)
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=CURVE_COLOUR)

    legend_y = bottom + 44
    for n, (budget, picked) in enumerate(curve.budgets.items()):
        colour = BUDGET_COLOURS[n % len(BUDGET_COLOURS)]
        _, budget_y = plot.to_pixel(plot.tau_range[0], budget)
        for x in range(left, right, 12):  # dashed line at the budget
            draw.line([(x, budget_y), (min(x + 6, right), budget_y)], fill=colour)
        if picked is None:
            text = f"budget {budget:g}: unreachable (merging keeps at least one token per root cell)"
        else:
            x, y = plot.to_pixel(picked.tau, picked.retention)
            draw.ellipse([x - 5, y - 5, x + 5, y + 5], fill=colour)
            text = (f"budget {budget:g}: tau {picked.tau:.4f} keeps {picked.num_tokens:,} tokens "
                    f"(retention {picked.retention:.3f})")
        draw.rectangle([left, legend_y + 2, left + 10, legend_y + 12], fill=colour)
        draw.text((left + 16, legend_y), text, font=font, fill=_INK)
        legend_y += 16
    return plot


def _tick_step(span: float) -> tuple[float, int]:
    """A round tick step giving about 6 ticks over ``span``, and the decimals to print it."""
    raw = max(span, 1e-9) / 6
    magnitude = 10 ** math.floor(math.log10(raw))
    multiple = next(m for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    step = multiple * magnitude
    decimals = max(0, -math.floor(math.log10(step)) + (1 if multiple == 2.5 else 0))
    return step, decimals
