"""Decode stage: a video uri and a sampling policy in, sampled RGB frames out.

Videos are read with decord from a local path or any fsspec URL (``s3://`` through
s3fs). A remote object is read once into memory, hashed, and handed to decord as a file
object, so no temporary copy touches the disk; a local file is hashed in a streaming pass
and decoded from its path.

Sampling policies are small frozen dataclasses that reproduce each model family's own
recipe (which frames, and for Qwen the frame size); ``jobs/`` configs and the adapters'
``default_sampling()`` pick one. Every input problem surfaces as a ``VideoError`` that
names the source (``pipeline.errors``).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Protocol

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import (
    CorruptVideoError,
    NoVideoStreamError,
    VideoNotFoundError,
    VideoReadError,
)
from pipeline.fingerprint import content_hash as sha256_content_hash

# Frames with more pixels than this (4K UHD) are decoded by ffmpeg at a reduced size that
# keeps the aspect ratio, so an 8K or larger video never holds full frames in memory.
MAX_FRAME_PIXELS = 3840 * 2160

# Sampled frames are pulled from decord in chunks of at most this many bytes at decoded
# size, so a policy's resize runs on a bounded amount of full-size frames at a time.
_CHUNK_BYTES = 256 * 2**20


class SamplingPolicy(Protocol):
    """Which frames to take from a video and at what size."""

    def frame_indices(self, num_frames_total: int, fps: float) -> list[int]:
        """Strictly increasing indices into the video's frames, at least one."""

    def frame_size(self, height: int, width: int, num_frames: int) -> tuple[int, int]:
        """The ``(height, width)`` the sampled frames are resized to before the model's own
        processing; ``(height, width)`` itself when the recipe keeps the decoded size."""


@dataclass(frozen=True)
class UniformSampling:
    """``num_frames`` frames spread evenly from the first to the last frame.

    LLaVA-OneVision's recipe: ``np.linspace(0, total - 1, num_frames, dtype=int)``. A video
    with fewer frames than asked for gives all of its frames.
    """

    num_frames: int = 32

    def __post_init__(self):
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")

    def frame_indices(self, num_frames_total: int, fps: float) -> list[int]:
        count = min(self.num_frames, num_frames_total)
        return np.linspace(0, num_frames_total - 1, count, dtype=int).tolist()

    def frame_size(self, height: int, width: int, num_frames: int) -> tuple[int, int]:
        return height, width


@dataclass(frozen=True)
class FpsSampling:
    """One frame every ``round(video_fps / fps)`` frames, capped at ``max_frames``.

    LLaVA-Video's recipe (``fps=1, max_frames=64`` in its ``load_video``): when the fixed
    rate gives more than ``max_frames`` frames, it samples ``max_frames`` frames uniformly
    instead (as ``UniformSampling``).
    """

    fps: float = 1.0
    max_frames: int = 64

    def __post_init__(self):
        if self.fps <= 0 or self.max_frames < 1:
            raise ValueError(f"need fps > 0 and max_frames >= 1, got {self}")

    def frame_indices(self, num_frames_total: int, fps: float) -> list[int]:
        step = max(1, round(fps / self.fps))  # a video slower than `self.fps` gives every frame
        indices = list(range(0, num_frames_total, step))
        if len(indices) > self.max_frames:
            return UniformSampling(self.max_frames).frame_indices(num_frames_total, fps)
        return indices

    def frame_size(self, height: int, width: int, num_frames: int) -> tuple[int, int]:
        return height, width


@dataclass(frozen=True)
class QwenSampling:
    """Qwen2-VL / Qwen2.5-VL's video recipe, as qwen-vl-utils' ``fetch_video`` does it.

    Frame count: ``duration * fps`` clamped to ``[min_frames, min(max_frames, total)]`` and
    rounded down to a multiple of ``temporal_patch_size``; frames ``linspace(0, total - 1,
    n).round()``. A video shorter than one temporal patch gives all of its frames (the model
    side repeats the last one, as the processor does).

    Frame size: ``smart_resize`` to multiples of ``spatial_factor`` (patch size x merge
    size) with at least ``min_pixels`` and at most ``min(max_pixels, max(total_pixels / n *
    temporal_patch_size, 1.05 * min_pixels))`` pixels per frame: a per-video pixel budget,
    so long videos get smaller frames. Defaults are qwen-vl-utils' (``max_pixels`` is 768
    merged tokens per frame, ``total_pixels`` 90% of a 128k-token context).
    """

    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    temporal_patch_size: int = 2
    spatial_factor: int = 28
    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 768 * 28 * 28
    total_pixels: int = int(128000 * 28 * 28 * 0.9)

    def num_frames(self, num_frames_total: int, fps: float) -> int:
        factor = self.temporal_patch_size
        min_frames = math.ceil(self.min_frames / factor) * factor
        max_frames = math.floor(min(self.max_frames, num_frames_total) / factor) * factor
        wanted = num_frames_total / fps * self.fps
        count = math.floor(min(max(wanted, min_frames), max_frames, num_frames_total) / factor) * factor
        return count if count >= factor else num_frames_total

    def frame_indices(self, num_frames_total: int, fps: float) -> list[int]:
        count = self.num_frames(num_frames_total, fps)
        # float32 linspace and round-half-to-even, exactly as qwen-vl-utils computes them
        return torch.linspace(0, num_frames_total - 1, count).round().long().tolist()

    def frame_size(self, height: int, width: int, num_frames: int) -> tuple[int, int]:
        budget = self.total_pixels / num_frames * self.temporal_patch_size
        max_pixels = min(self.max_pixels, max(budget, int(self.min_pixels * 1.05)))
        return smart_resize(height, width, self.spatial_factor, self.min_pixels, max_pixels)


def smart_resize(height: int, width: int, factor: int, min_pixels: float, max_pixels: float) -> tuple[int, int]:
    """Qwen's ``smart_resize``: the size nearest ``(height, width)`` in multiples of
    ``factor`` whose area lies in ``[min_pixels, max_pixels]``, keeping the aspect ratio.

    qwen-vl-utils (the decode recipe) and transformers' Qwen2-VL video processor (the
    model's preprocessing) each carry a copy; they agree except on sides shorter than
    ``factor / 2``. Both refuse aspect ratios beyond 200; this one still returns sides of
    at least ``factor`` for them.
    """
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resize_like_qwen_vl_utils(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased bicubic resize of uint8 frames ``[T, 3, H, W]`` to ``size = (h, w)``,
    bit-identical to qwen-vl-utils' ``torchvision.transforms.functional.resize``: computed
    in float32, clamped to [0, 255], rounded back to uint8. The same size comes back
    untouched. Returns uint8 ``[T, 3, h, w]``.
    """
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    resized = F.interpolate(
        frames.to(torch.float32), size=list(size), mode="bicubic", align_corners=False, antialias=True
    )
    return resized.clamp_(0, 255).round_().to(torch.uint8)


@dataclass(frozen=True, eq=False)
class DecodedVideo:
    """Sampled frames of one video and where they came from.

    Attributes:
        uri: the source as given to ``decode_video``.
        frames: uint8 ``[T, H, W, 3]`` RGB frames, already resized if the policy says so.
        frame_indices: ``[T]`` indices of the sampled frames in the source.
        timestamps: ``[T]`` presentation times of the sampled frames, in seconds.
        fps: the source's average frame rate.
        num_frames_total: number of frames in the source.
        content_hash: ``"sha256:<hex>"`` of the source file's bytes.
    """

    uri: str
    frames: torch.Tensor
    frame_indices: list[int]
    timestamps: list[float]
    fps: float
    num_frames_total: int
    content_hash: str

    @property
    def sampled_fps(self) -> float:
        """Sampled frames per second of video: ``T / duration`` (qwen-vl-utils' ``sample_fps``)."""
        return len(self.frame_indices) * self.fps / self.num_frames_total


def decode_video(
    uri: str,
    policy: SamplingPolicy,
    storage_options: dict | None = None,
    *,
    max_frame_pixels: int = MAX_FRAME_PIXELS,
    fetched: FetchedVideo | None = None,
) -> DecodedVideo:
    """Decode the frames ``policy`` picks from the video at ``uri``.

    Args:
        uri: a local path or an fsspec URL (``s3://bucket/key``, ``file://...``).
        policy: ``UniformSampling``, ``FpsSampling``, ``QwenSampling`` or an adapter's
            ``default_sampling()``.
        storage_options: passed to fsspec (for s3: ``key``, ``secret``,
            ``client_kwargs={"endpoint_url": ...}``, ...).
        max_frame_pixels: frames larger than this are decoded at a reduced size.
        fetched: the video's bytes from ``fetch_video``, when the caller already read them.

    Raises:
        VideoNotFoundError, VideoReadError, CorruptVideoError, NoVideoStreamError: bad input,
            named by its redacted uri.
    """
    fetched = fetched or fetch_video(uri, storage_options)
    source, content_hash = fetched.source, fetched.content_hash
    reader = _open_reader(uri, source)
    num_frames_total, fps = len(reader), reader.get_avg_fps()
    if not (math.isfinite(fps) and fps > 0):
        raise CorruptVideoError(uri, f"the video stream reports no usable frame rate ({fps})")

    height, width = _decode(uri, lambda: reader.get_batch([0]).shape[1:3])
    if height * width > max_frame_pixels:
        scale = math.sqrt(max_frame_pixels / (height * width))
        height, width = max(1, int(height * scale)), max(1, int(width * scale))
        reader = _open_reader(uri, source, height, width)

    indices = policy.frame_indices(num_frames_total, fps)
    size = policy.frame_size(height, width, len(indices))
    frames = _read_frames(uri, reader, indices, (height, width), size)
    # decord keeps timestamps in float32; rounding to microseconds drops its noise digits
    start_times = _decode(uri, lambda: reader.get_frame_timestamp(indices)[:, 0])
    timestamps = [round(float(t), 6) for t in start_times]
    return DecodedVideo(
        uri=uri,
        frames=frames,
        frame_indices=indices,
        timestamps=timestamps,
        fps=fps,
        num_frames_total=num_frames_total,
        content_hash=content_hash,
    )


@dataclass(frozen=True, eq=False)
class FetchedVideo:
    """A video's bytes, read once: ``source`` is what decord reads (a local path, or the
    remote object's bytes) and ``content_hash`` the ``sha256:`` of the file's bytes."""

    source: str | bytes
    content_hash: str


def fetch_video(uri: str, storage_options: dict | None = None) -> FetchedVideo:
    """Read (remote) or hash (local) the video at ``uri`` without decoding it, so a job can
    skip what its store already holds before paying for decoding."""
    source, content_hash = _fetch(uri, storage_options or {})
    return FetchedVideo(source, content_hash)


def _fetch(uri: str, storage_options: dict) -> tuple[str | bytes, str]:
    try:
        fs, path = fsspec.core.url_to_fs(uri, **storage_options)
        info = fs.info(path)
        if info["type"] != "file":
            raise VideoNotFoundError(uri, f"expected a video file, found a {info['type']}")
        if info["size"] == 0:
            raise CorruptVideoError(uri, "the file is empty (0 bytes)")
        if isinstance(fs, LocalFileSystem):
            with open(path, "rb") as file:
                return path, sha256_content_hash(file)
        data = fs.cat_file(path)
    except FileNotFoundError as err:
        raise VideoNotFoundError(uri, "no such file") from err
    except OSError as err:
        raise VideoReadError(uri, f"could not read it: {type(err).__name__}: {err}") from err
    return data, sha256_content_hash(data)


def _open_reader(uri: str, source: str | bytes, height: int = -1, width: int = -1) -> "decord.VideoReader":
    # One decoding thread: the pipeline scales out with one decode task per core.
    # Imported here, not at module level: the query stage and GPU benchmarks use this
    # module's types on machines that have no decord.
    import decord

    def open_() -> decord.VideoReader:
        file = source if isinstance(source, str) else io.BytesIO(source)
        return decord.VideoReader(file, ctx=decord.cpu(0), width=width, height=height, num_threads=1)

    return _decode(uri, open_)


def _read_frames(
    uri: str,
    reader: "decord.VideoReader",
    indices: list[int],
    decoded_size: tuple[int, int],
    size: tuple[int, int],
) -> torch.Tensor:
    """The frames at ``indices`` (decoded at ``decoded_size``) as uint8 ``[T, h, w, 3]``,
    resized to ``size = (h, w)``."""
    frames = torch.empty((len(indices), *size, 3), dtype=torch.uint8)
    chunk = max(1, _CHUNK_BYTES // (3 * math.prod(decoded_size)))
    for start in range(0, len(indices), chunk):
        batch = _decode(uri, lambda: reader.get_batch(indices[start : start + chunk]).asnumpy())
        resized = resize_like_qwen_vl_utils(torch.from_numpy(batch).permute(0, 3, 1, 2), size)
        frames[start : start + len(batch)] = resized.permute(0, 2, 3, 1)
    return frames


def _decode(uri: str, step):
    """Run one decord call; turn whatever decord raises into a typed error.

    decord reports every problem as a bare RuntimeError, DECORDError or AssertionError with
    ffmpeg's message inside, so the message is the only way to tell them apart.
    """
    try:
        return step()
    except Exception as err:  # noqa: BLE001 - decord has no error hierarchy to catch narrower
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "cannot find video stream" in message:
            raise NoVideoStreamError(uri, "the file holds no video stream") from err
        raise CorruptVideoError(uri, f"not a decodable video: {message}") from err
