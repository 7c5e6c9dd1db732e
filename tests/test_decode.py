"""Decode stage: sampling recipes, frames and metadata, s3://, and typed errors for bad input."""

from __future__ import annotations

import hashlib
import pickle
import random
import shutil
import wave

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import pipeline.decode as decode_module
from pipeline.decode import (
    FpsSampling,
    QwenSampling,
    UniformSampling,
    decode_video,
    resize_like_qwen_vl_utils,
    smart_resize,
)
from pipeline.errors import CorruptVideoError, NoVideoStreamError, VideoError, VideoNotFoundError
from pipeline.models.base import resize_like_video_processor
from pipeline.samples import SAMPLE_DIR

BUNNY = SAMPLE_DIR / "bigbuckbunny.mp4"  # 132 frames, 25 fps, 1280x720
BIKES = SAMPLE_DIR / "bikes.mp4"  # 250 frames, 25 fps, 640x272


# --- sampling recipes -----------------------------------------------------------------


@pytest.mark.parametrize("total, count", [(132, 8), (250, 32), (7, 7), (1, 1)])
def test_uniform_sampling_spreads_frames_from_first_to_last(total, count):
    indices = UniformSampling(count).frame_indices(total, 25.0)
    assert len(indices) == count
    assert indices[0] == 0 and indices[-1] == total - 1
    assert all(b > a for a, b in zip(indices, indices[1:]))
    # LLaVA-OneVision's recipe, written out: np.linspace(0, total - 1, n, dtype=int)
    assert indices == [int(i * (total - 1) / (count - 1)) if count > 1 else 0 for i in range(count)]


def test_uniform_sampling_of_a_short_video_takes_every_frame():
    assert UniformSampling(64).frame_indices(20, 25.0) == list(range(20))


def test_fps_sampling_takes_one_frame_per_period_and_goes_uniform_over_the_cap():
    assert FpsSampling(fps=1.0, max_frames=64).frame_indices(132, 25.0) == [0, 25, 50, 75, 100, 125]
    assert FpsSampling(fps=5.0, max_frames=64).frame_indices(132, 30.0) == list(range(0, 132, 6))
    over_cap = FpsSampling(fps=1.0, max_frames=4).frame_indices(250, 25.0)  # 10 per-second frames > 4
    assert over_cap == UniformSampling(4).frame_indices(250, 25.0)
    # a video slower than the asked rate gives every frame
    assert FpsSampling(fps=2.0, max_frames=64).frame_indices(10, 1.0) == list(range(10))


def test_qwen_sampling_frame_count_follows_qwen_vl_utils():
    policy = QwenSampling()  # 2 fps, 4..768 frames, multiples of 2
    assert policy.num_frames(250, 25.0) == 20  # 10 s * 2 fps
    assert policy.num_frames(132, 25.0) == 10  # 5.28 s * 2 fps = 10.56 -> floor to even
    assert policy.num_frames(25, 25.0) == 4  # 1 s gives 2, raised to min_frames
    assert policy.num_frames(3, 25.0) == 2  # capped by the frames that exist, rounded down
    assert policy.num_frames(1, 25.0) == 1  # shorter than a temporal patch: what exists
    assert QwenSampling(max_frames=8).num_frames(2500, 25.0) == 8
    indices = policy.frame_indices(250, 25.0)
    assert indices == torch.linspace(0, 249, 20).round().long().tolist()
    assert indices[0] == 0 and indices[-1] == 249


def test_qwen_sampling_frame_size_keeps_aspect_within_the_pixel_budget():
    policy = QwenSampling()
    # bikes, 272x640: nearest multiples of 28 already fit the per-frame bounds
    assert policy.frame_size(272, 640, 20) == (280, 644)
    # bunny, 720x1280: above 768 * 28 * 28 pixels, scaled down keeping the aspect ratio
    height, width = policy.frame_size(720, 1280, 10)
    assert (height, width) == (560, 1008)
    assert height * width <= 768 * 28 * 28
    # many frames: the per-video budget (90% of 128k tokens) shrinks each frame
    many = policy.frame_size(720, 1280, 768)
    assert many[0] * many[1] <= 128000 * 28 * 28 * 0.9 / 768 * 2 and many[0] % 28 == many[1] % 28 == 0
    assert many[0] * many[1] < height * width
    # never below the floor of 128 * 28 * 28 pixels
    small = policy.frame_size(60, 80, 10)
    assert small[0] * small[1] >= 128 * 28 * 28


@pytest.mark.parametrize("height, width", [(272, 640), (720, 1280), (61, 1999), (1080, 1920), (28, 28)])
def test_smart_resize_gives_multiples_of_the_factor_within_bounds(height, width):
    out_h, out_w = smart_resize(height, width, 28, 56 * 56, 28 * 28 * 1280)
    assert out_h % 28 == 0 and out_w % 28 == 0
    assert 56 * 56 <= out_h * out_w <= 28 * 28 * 1280
    assert abs(out_h / out_w - height / width) / (height / width) < 0.25


# --- decoding real videos ---------------------------------------------------------------


def test_decode_uniform_frames_with_indices_timestamps_and_hash():
    video = decode_video(str(BUNNY), UniformSampling(8))
    assert video.frames.dtype == torch.uint8 and video.frames.shape == (8, 720, 1280, 3)
    assert video.frame_indices == np.linspace(0, 131, 8, dtype=int).tolist()
    assert video.num_frames_total == 132 and video.fps == pytest.approx(25.0)
    # constant frame rate: a frame's start time is its index over the rate
    assert video.timestamps == pytest.approx([i / 25.0 for i in video.frame_indices], abs=1e-5)
    assert video.content_hash == "sha256:" + hashlib.sha256(BUNNY.read_bytes()).hexdigest()
    assert video.uri == str(BUNNY)
    assert video.sampled_fps == pytest.approx(8 * 25.0 / 132)


def test_decoded_frames_are_the_pictures_at_those_indices():
    """Each sampled frame equals the same frame decoded alone (random access is exact)."""
    picked = decode_video(str(BIKES), UniformSampling(5))
    for position, index in enumerate(picked.frame_indices):
        alone = decode_video(str(BIKES), _OneFrame(index))
        assert torch.equal(picked.frames[position], alone.frames[0])


class _OneFrame:
    def __init__(self, index):
        self.index = index

    def frame_indices(self, num_frames_total, fps):
        return [self.index]

    def frame_size(self, height, width, num_frames):
        return height, width


def test_qwen_policy_resizes_frames_like_a_bicubic_resize():
    video = decode_video(str(BUNNY), QwenSampling())
    assert video.frames.shape == (10, 560, 1008, 3)
    full = decode_video(str(BUNNY), _OneFrame(video.frame_indices[3])).frames[0].numpy()
    reference = np.asarray(Image.fromarray(full).resize((1008, 560), Image.Resampling.BICUBIC), dtype=np.float32)
    # a different antialiasing implementation: close, not equal
    assert np.abs(video.frames[3].numpy().astype(np.float32) - reference).mean() < 2.0


def test_qwen_recipe_resizes_in_float32_and_rounds_unlike_the_video_processors():
    """qwen-vl-utils resizes with torchvision's v1 ``resize``: float32, clamped, rounded;
    transformers' video processors use torch's uint8 kernel, which differs in the last
    level. (``jobs/check_processor_parity.py`` checks both against the originals.)"""
    frames = decode_video(str(BIKES), UniformSampling(2)).frames.permute(0, 3, 1, 2)
    ours = resize_like_qwen_vl_utils(frames, (140, 308))
    in_float = F.interpolate(frames.float(), size=[140, 308], mode="bicubic", antialias=True, align_corners=False)
    assert torch.equal(ours, in_float.clamp(0, 255).round().to(torch.uint8))
    assert not torch.equal(ours, resize_like_video_processor(frames, (140, 308)))
    assert resize_like_qwen_vl_utils(frames, (272, 640)) is frames  # same size: untouched


def test_frames_are_the_same_when_read_in_small_chunks(monkeypatch):
    whole = decode_video(str(BIKES), QwenSampling())
    monkeypatch.setattr(decode_module, "_CHUNK_BYTES", 3 * 272 * 640 * 3)  # three frames at a time
    chunked = decode_video(str(BIKES), QwenSampling())
    assert torch.equal(whole.frames, chunked.frames)


def test_video_shorter_than_the_policy_asks_for_gives_what_exists():
    small = {"max_frame_pixels": 160 * 90}  # decoded small: this test is about frame counts
    assert decode_video(str(BUNNY), UniformSampling(500), **small).frame_indices == list(range(132))
    assert len(decode_video(str(BUNNY), FpsSampling(fps=100.0, max_frames=1000), **small).frames) == 132
    assert len(decode_video(str(BUNNY), QwenSampling(fps=50.0), **small).frames) == 132


def test_very_large_frames_are_decoded_at_a_bounded_size():
    video = decode_video(str(BUNNY), UniformSampling(4), max_frame_pixels=320 * 180)
    assert video.frames.shape == (4, 180, 320, 3)
    # the Qwen recipe then works from the reduced size
    qwen = decode_video(str(BUNNY), QwenSampling(), max_frame_pixels=320 * 180)
    assert qwen.frames.shape[1:3] == QwenSampling().frame_size(180, 320, len(qwen.frames))


def test_s3_video_decodes_like_the_local_file(s3_server):
    bucket = s3_server.make_bucket("videos")
    s3_server.client().upload_file(str(BIKES), bucket, "clips/bikes.mp4")
    remote = decode_video(f"s3://{bucket}/clips/bikes.mp4", UniformSampling(6), s3_server.storage_options)
    local = decode_video(str(BIKES), UniformSampling(6))
    assert torch.equal(remote.frames, local.frames)
    assert remote.content_hash == local.content_hash
    assert remote.timestamps == local.timestamps

    with pytest.raises(VideoNotFoundError, match=f"s3://{bucket}/clips/missing.mp4"):
        decode_video(f"s3://{bucket}/clips/missing.mp4", UniformSampling(6), s3_server.storage_options)


# --- bad input ----------------------------------------------------------------------------


def _truncated(path):
    path.write_bytes(BIKES.read_bytes()[: BIKES.stat().st_size // 2])


def _damaged_stream(path):
    """Random bytes written over the compressed frames (the middle of the file)."""
    data = bytearray(BIKES.read_bytes())
    rng = random.Random(0)
    for _ in range(2000):
        data[rng.randrange(len(data) // 8, len(data) // 2)] = rng.randrange(256)
    path.write_bytes(bytes(data))


def _audio_only(path):
    """A WAV container: a valid media file with one audio stream and no video stream."""
    with wave.open(str(path), "wb") as audio:
        audio.setnchannels(1)
        audio.setsampwidth(2)
        audio.setframerate(8000)
        audio.writeframes(b"\x00\x01" * 8000)


BAD_INPUTS = {
    "missing": (lambda path: None, VideoNotFoundError, "no such file"),
    "zero-byte": (lambda path: path.write_bytes(b""), CorruptVideoError, "empty"),
    "truncated": (_truncated, CorruptVideoError, "not a decodable video"),
    "text named .mp4": (lambda path: path.write_text("not a video\n" * 10), CorruptVideoError, "not a decodable video"),
    "damaged stream": (_damaged_stream, CorruptVideoError, "not a decodable video"),
    "audio only": (_audio_only, NoVideoStreamError, "no video stream"),
    "directory": (lambda path: path.mkdir(), VideoNotFoundError, "directory"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_raises_a_typed_error_naming_the_file(tmp_path, name):
    make, error_type, reason = BAD_INPUTS[name]
    path = tmp_path / "input.mp4"
    make(path)
    with pytest.raises(error_type) as caught:
        decode_video(str(path), UniformSampling(250))
    assert str(path) in str(caught.value) and reason in str(caught.value)
    assert caught.value.uri == str(path)
    copy = pickle.loads(pickle.dumps(caught.value))  # crosses Ray's process boundary intact
    assert type(copy) is error_type and str(copy) == str(caught.value)


def test_error_messages_carry_no_credentials():
    error = VideoNotFoundError("https://user:hunter2@example.com/a.mp4?X-Amz-Signature=abc&token=t", "no such file")
    assert str(error) == "https://example.com/a.mp4: no such file"
    assert isinstance(error, VideoError)


def test_a_good_copy_still_decodes(tmp_path):
    """The bad-input cases above fail because of their bytes, not their names or places."""
    path = tmp_path / "input.mp4"
    shutil.copy(BIKES, path)
    assert decode_video(str(path), UniformSampling(4)).frames.shape == (4, 272, 640, 3)
