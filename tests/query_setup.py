"""Shared setup of the query-stage tests: short clips of the bundled videos, encoded by
the tiny random models' adapters, merged with STTM and written to a token store."""
from __future__ import annotations

import dataclasses

import torch

import sttm
from pipeline.decode import DecodedVideo, QwenSampling, UniformSampling, decode_video
from pipeline.fingerprint import config_fingerprint
from pipeline.models import TINY_RANDOM_NAMES, VideoAdapter
from pipeline.models.base import merge_beside
from pipeline.models.registry import FAMILY_MODULES
from pipeline.samples import SAMPLE_DIR
from pipeline.store import StoredTokenSet

FAMILIES = list(TINY_RANDOM_NAMES)  # every family's tiny-random models, from the registry
# The families whose questions ride packed in one sequence on the prefix's cache (the
# others keep a recurrent state: each question runs on a copy of it, as a batch row).
PACKED_FAMILIES = [name for family in FAMILY_MODULES for name in family.TINY_RANDOM if not family.LAYOUT.recurrent_state]
VIDEOS = ("bigbuckbunny.mp4", "bikes.mp4")

# Few, small frames keep prompts short: LLaVA-OneVision 2 frames x 14 x 14 tokens; Qwen 4
# frames at 112 x 196 px -> 2 temporal patches x 4 x 7 tokens (T <= max(H, W), where every
# transformers version puts the text after the video at the same positions).
SAMPLING = {
    "llava-onevision": UniformSampling(num_frames=2),
    "qwen": QwenSampling(min_frames=4, max_frames=4, min_pixels=112 * 112, max_pixels=112 * 196, total_pixels=112 * 196 * 2),
}


def decode_sample(family: str, name: str) -> DecodedVideo:
    """The frames of a bundled video that ``family``'s tests use."""
    policy = SAMPLING["llava-onevision" if family == "llava-onevision" else "qwen"]
    return decode_video(str(SAMPLE_DIR / name), policy)


def stored_token_set(
    adapter: VideoAdapter, video: DecodedVideo, video_id: str, *, retention: float | None = None
) -> StoredTokenSet:
    """``video`` encoded by ``adapter`` and merged: nothing merged when ``retention`` is
    ``None`` (thresholds above every similarity), else to that budget."""
    encoded = adapter.encode(video)
    if retention is None:
        tokens, config = sttm.merge(encoded.tokens, tau_s=2.0), {"tau_s": 2.0}
    else:
        tokens, config = sttm.merge_to_budget(encoded.tokens, retention), {"budget": retention}
    sampling = {"frames": len(video.frame_indices)}
    return StoredTokenSet(
        video_id=video_id,
        source_uri=video.uri,
        content_hash=video.content_hash,
        model_id=adapter.model_id,
        model_revision=None,
        encoder_fingerprint=adapter.fingerprint,
        config_fingerprint=config_fingerprint(
            model_id=adapter.model_id,
            model_revision=None,
            encoder_fingerprint=adapter.fingerprint,
            sampling=sampling,
            sttm=config,
        ),
        sampling=sampling,
        frame_indices=video.frame_indices,
        timestamps=video.timestamps,
        model_extra=encoded.model_extra,
        tokens=tokens,
        pipeline_version="test",
        run_id="test-run",
        deepstack=None if encoded.deepstack is None else merge_beside(encoded.tokens, encoded.deepstack, tokens),
    )


def with_features(stored: StoredTokenSet, features: torch.Tensor) -> StoredTokenSet:
    """``stored`` with other token features (e.g. another channel count)."""
    return dataclasses.replace(stored, tokens=dataclasses.replace(stored.tokens, features=features))
