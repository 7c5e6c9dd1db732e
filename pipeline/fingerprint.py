"""Content hashes of videos and fingerprints of configurations: the token store's keys.

A token set is a pure function of (video bytes, model, sampling, STTM configuration), so
``(content_hash, config_fingerprint)`` names it: re-running a job finds what it already
wrote, and the same video under two names is recognised as one.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any, BinaryIO

# Fingerprints are cut to 16 hex digits (64 bits): a store holds a handful of configs, so
# collisions are out of reach, and the short form keeps keys readable.
CONFIG_FINGERPRINT_HEX_DIGITS = 16
_READ_CHUNK_BYTES = 8 * 2**20


def canonical_json(value: Any) -> str:
    """One JSON text per value: sorted keys, no spaces, no NaN (JSON has none)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def content_hash(video: bytes | BinaryIO) -> str:
    """``"sha256:<hex>"`` of a video's bytes, given whole or as a binary file object."""
    digest = hashlib.sha256()
    if isinstance(video, (bytes, bytearray, memoryview)):
        digest.update(video)
    else:
        while chunk := video.read(_READ_CHUNK_BYTES):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def config_fingerprint(
    *,
    model_id: str,
    model_revision: str | None,
    encoder_fingerprint: str,
    sampling: Mapping[str, Any],
    sttm: Mapping[str, Any],
    merge_layer: int = 0,
) -> str:
    """Hex fingerprint of everything besides the video that decides the stored tokens.

    ``sampling`` is the frame sampling config (fps, max frames, ...); ``sttm`` the merge
    config as the user gave it (``tau_s``/``tau_t`` or ``budget``, ``root_level``,
    ``weighted``, ``head_dim``), not thresholds a budget search chose per video.
    """
    config = {
        "model_id": model_id,
        "model_revision": model_revision,
        "encoder_fingerprint": encoder_fingerprint,
        "sampling": dict(sampling),
        "sttm": dict(sttm),
        "merge_layer": merge_layer,
    }
    digest = hashlib.sha256(canonical_json(config).encode("utf-8")).hexdigest()
    return digest[:CONFIG_FINGERPRINT_HEX_DIGITS]
