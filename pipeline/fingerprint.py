"""Content hashes of videos and fingerprints of configurations: the token store's keys.

A token set is a pure function of (video bytes, model, sampling, STTM configuration), so
``(content_hash, config_fingerprint)`` names it: re-running a job finds what it already
wrote, and the same video under two names is recognised as one.

The config fingerprint includes the encoder's weights fingerprint; ``encoder_facts``
caches it by the checkpoint files' identity, so a re-run decides what to skip without
loading the model.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
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
    llm_fingerprint: str | None = None,
) -> str:
    """Hex fingerprint of everything besides the video that decides the stored tokens.

    ``sampling`` is the frame sampling config (fps, max frames, ...); ``sttm`` the merge
    config as the user gave it (``tau_s``/``tau_t`` or ``budget``, ``root_level``,
    ``weighted``, ``head_dim``), not thresholds a budget search chose per video. At
    ``merge_layer`` k > 0 the tokens also depend on the LLM's embedding and layers
    0..k-1: ``llm_fingerprint`` (``pipeline.merge_layer.llm_fingerprint``) is then part of it.
    """
    config = {
        "model_id": model_id,
        "model_revision": model_revision,
        "encoder_fingerprint": encoder_fingerprint,
        "sampling": dict(sampling),
        "sttm": dict(sttm),
        "merge_layer": merge_layer,
    }
    if merge_layer > 0:
        if llm_fingerprint is None:
            raise ValueError(f"merge_layer {merge_layer} needs the LLM layers' fingerprint")
        config["llm_fingerprint"] = llm_fingerprint
    digest = hashlib.sha256(canonical_json(config).encode("utf-8")).hexdigest()
    return digest[:CONFIG_FINGERPRINT_HEX_DIGITS]


# ---------------------------------------------------------------------------------------
# The encoder's facts, cached by the checkpoint files' identity


@dataclass(frozen=True)
class EncoderFacts:
    """What a job needs to know about a model before it runs, besides the weights
    themselves: ``fingerprint`` (``VideoAdapter.fingerprint``), ``default_sampling``
    (``sampling_dict`` of the model's own recipe) and ``input_frame_size`` (the fixed
    frame size the model resizes to, or None)."""

    fingerprint: str
    default_sampling: dict[str, Any]
    input_frame_size: tuple[int, int] | None


def encoder_facts(model_spec: str) -> EncoderFacts:
    """The encoder facts of ``model_spec``, from the cache when its checkpoint files are
    unchanged, else by loading the vision side once on the CPU (and caching the result).

    The cache (``$STTM_CACHE/encoder-facts/``) is keyed by the checkpoint folder's real
    path and every file's (name, size, mtime), plus the versions of the code that computes
    the facts (this package's model adapters, torch, transformers), so that a re-run
    knows its config fingerprint without loading weights. Hub ids are not cached (their
    files can change behind a name). A stale entry cannot corrupt a store: every encoder
    worker compares the fingerprint with the weights it loaded and refuses to start.
    """
    from pipeline.models import resolve_model
    from pipeline.models.tiny_random import cache_root

    path = resolve_model(model_spec)
    key = _checkpoint_identity(path)
    cached = cache_root() / "encoder-facts" / f"{key}.json" if key else None
    if cached is not None and cached.is_file():
        try:
            facts = json.loads(cached.read_text())
            size = facts["input_frame_size"]
            return EncoderFacts(facts["fingerprint"], facts["default_sampling"], tuple(size) if size else None)
        except (ValueError, KeyError, TypeError):
            pass  # unreadable: compute it again below
    facts = _load_encoder_facts(model_spec)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        staging = cached.with_name(f".{cached.name}.{os.getpid()}")
        staging.write_text(canonical_json(dataclasses.asdict(facts)))
        staging.replace(cached)  # atomic: a concurrent reader sees all of it or nothing
    return facts


def _load_encoder_facts(model_spec: str) -> EncoderFacts:
    from pipeline.models import load_adapter
    from pipeline.stages import sampling_dict

    adapter = load_adapter(model_spec, device="cpu")
    size = adapter.input_frame_size
    return EncoderFacts(adapter.fingerprint, sampling_dict(adapter.default_sampling()),
                        tuple(size) if size else None)


def _checkpoint_identity(path: str) -> str | None:
    """A hex digest of a local checkpoint folder's files (path, size, mtime) and of the
    code that computes encoder facts; None for anything but a local folder."""
    import torch
    import transformers

    root = Path(path)
    if not root.is_dir():
        return None
    files = []
    for file in sorted(root.rglob("*")):
        if file.is_file():
            stat = file.stat()
            files.append([file.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns])
    models_dir = Path(__file__).parent / "models"
    code = hashlib.sha256()
    for source in sorted(models_dir.glob("*.py")):
        code.update(source.name.encode() + b"\0" + source.read_bytes())
    identity = {"path": str(root.resolve()), "files": files, "code": code.hexdigest(),
                "torch": torch.__version__, "transformers": transformers.__version__}
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()


def sampling_policy_from_dict(sampling: Mapping[str, Any]):
    """The ``SamplingPolicy`` that ``sampling_dict`` described: a policy class of
    ``pipeline.decode`` or of a model family's module (e.g. ``Qwen3VLSampling``)."""
    from pipeline import decode
    from pipeline.models.registry import FAMILY_MODULES

    fields = dict(sampling)
    name = fields.pop("policy")
    for module in (decode, *FAMILY_MODULES):
        if isinstance(policy_class := getattr(module, name, None), type):
            return policy_class(**fields)
    raise ValueError(f"unknown sampling policy {name!r}")
