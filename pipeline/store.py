"""The token store: STTM token sets as Parquet objects on any fsspec filesystem.

A store is a root URL (a local path, ``file://...`` or ``s3://bucket/prefix``) laid out as
four prefixes of Parquet files, each one kind of record that a dataset reader (pyarrow,
Ray Data, DuckDB) can take whole (README "Reading the store")::

    tokens/<config_fingerprint>/sha256-<video content hex>.parquet   one token set
    index/<video id hash>/<config_fingerprint>.parquet              one id-table row: video id -> token set
    manifests/<run_id>.parquet                                      what one run did
    failures/<run_id>/<video id hash>.parquet                       why a video failed

Every object's fields are defined in ``schemas/`` (token_set, index_entry, run_manifest,
failure), which also holds the schema versions checked on every read. Stores written
before index_entry 2.0 have JSON index entries (``index/<hash>/<config>.json``): they are
still read, and replaced by Parquet ones when the video id is checked (a re-run) or
written again.

Why this layout:

- Token sets are content-addressed: ``(video bytes, config)`` decides the tokens, and the
  object holds nothing else (no video id, run id or time: those are in the index entry
  and the manifest), so a re-run, a second id with the same video or a concurrent run
  finds, or writes, the very same bytes.
- A token set is one Parquet row whose features are one uncompressed binary value
  (``schemas/README.md`` has the measurements): it loads without per-value decoding,
  4-5x faster than numeric list columns, and the per-video fields (frames, timestamps,
  assignment) sit beside the tokens. A read takes the features straight out of their
  column chunk, in parallel pieces, each hashed as it arrives (:func:`_read_token_set`).
- Reading by video id is one GET (``index/<hash>/<config>.parquet``) or, without a config,
  one LIST of that id's own prefix: no object of another video is ever opened. The id is
  hashed because it is untrusted text: it can never form a path (``../../x``), exceed a
  name length limit or collide by case on a case-insensitive disk. An entry's ``key`` is
  never trusted either: it must be the key its own content hash and config make.

All or nothing, and race-free: every object is written whole with one atomic step (local:
a temp file in the same directory, fsync, then a hard link, which fails if the name
exists, or a rename for objects that are replaced; object stores: one PUT, or a multipart
upload, which S3 makes visible only when it completes, with ``If-None-Match: *`` for
token sets). A token set is only ever created, never overwritten, unless the one in place
fails its checks (a repair). Its index entry is written after it, from the object that is
actually in place (its size, checksum and ETag), so whichever of two concurrent writers
creates the object, both entries verify against it. Readers only find token sets through
index entries, so a writer that dies at any point leaves either a complete entry or none.
(Leftovers of a killed writer are invisible: a ``.tmp`` file locally, uncompleted
multipart parts on S3 -- give the bucket an AbortIncompleteMultipartUpload lifecycle rule.)

Credentials never leave the ``storage_options``: URIs are stored and shown without user
info or query string (:func:`pipeline.uris.sanitize_uri`), and error messages name objects
by the sanitized root URL plus key.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import posixpath
import re
import sys
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.dataset
import pyarrow.parquet as pq
import torch
from fsspec.implementations.local import LocalFileSystem

from pipeline.fingerprint import canonical_json
from pipeline.uris import redact_urls, sanitize_uri
from schemas import (
    FAILURE,
    INDEX_ENTRY,
    RUN_MANIFEST,
    SCHEMA_NAME_KEY,
    SCHEMA_VERSION_KEY,
    TOKEN_SET,
    RecordSchema,
    parse_version,
)
from sttm.token_set import TokenSet

# Features are stored as the machine's raw bytes and documented as little-endian.
if sys.byteorder != "little":
    raise ImportError("the token store format is little-endian; big-endian hosts are not supported")

logger = logging.getLogger(__name__)

FEATURE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_TENSOR_COLUMNS = ("features", "frame", "box", "num_patches", "assignment", "deepstack", "prefix_states", "layer_kv")
# Optional columns older objects lack: 2.0 the DeepStack ones, 3.0 the merge layer's.
_LAYER_COLUMNS = ("llm_fingerprint", "prefix_text_ids", "prefix_states_rows", "prefix_states", "layer_kv_shape",
                  "layer_kv", "layer_payload_checksum")
_OPTIONAL_COLUMNS = ("deepstack_levels", "deepstack", *_LAYER_COLUMNS)
MANIFEST_STATUSES = ("stored", "skipped", "failed")
FAILURE_STAGES = ("decode", "encode", "merge", "store")

# Payload checksum kinds (schemas/README.md): what schema 2.x writes, and what 1.x wrote.
_PIECES_CHECKSUM = "sha256-pieces"
_STREAM_CHECKSUM = "sha256"
# The features are hashed, and read, in pieces of this size, in parallel. Part of the
# stored format (every "sha256-pieces" checksum depends on it); tests shrink it to get
# many pieces out of small token sets.
_PIECE_BYTES = 4 * 2**20
# A remote read fetches this much of the object's tail for the Parquet footer (a token
# set's footer is about 12 KB; a longer one costs a second GET).
_TAIL_BYTES = 64 * 2**10

# What TokenStore.check finds for a video id: the skip decision of a re-run.
VERIFIED = "verified"  # indexed, and the token set verifies against its entry: skip it
MISSING = "missing"  # nothing stored for this id, content and config: store it
DAMAGED = "damaged"  # an entry or token set is there but fails its checks: store it again (a repair)

_CONTENT_HASH = re.compile(r"sha256:[0-9a-f]{64}")
_TOKEN_SET_KEY = re.compile(r"tokens/[0-9a-f]{8,64}/sha256-[0-9a-f]{64}\.parquet")
# The fields of a legacy (index_entry 1.x) JSON entry.
_LEGACY_INDEX_FIELDS = ("schema_version", "video_id", "source_uri", "key", "content_hash", "config_fingerprint",
                        "model_id", "num_tokens", "original_tokens", "object_bytes", "run_id", "created_at")
_CONFIG_FINGERPRINT = re.compile(r"[0-9a-f]{8,64}")
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MAX_FAILURE_MESSAGE_CHARS = 4000


# ---------------------------------------------------------------------------------------
# Errors. Messages name the object (sanitized root URL + key), never credentials.


class StoreError(Exception):
    """Base of every error the token store raises."""


class NotFoundError(StoreError, KeyError):
    """No such video id, config or object in the store."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0])


class AmbiguousError(StoreError):
    """A video id has token sets under several configs and none was named."""


class CorruptObjectError(StoreError):
    """An object is truncated, unparseable or fails its checksum."""


class SchemaVersionError(StoreError):
    """An object was written with a schema major version this code cannot read."""


# ---------------------------------------------------------------------------------------
# Records


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class StoredTokenSet:
    """One video's STTM token set with everything needed to use and trust it later.

    ``content_hash`` is ``"sha256:<hex>"`` of the video bytes (pipeline.fingerprint);
    ``config_fingerprint`` names model + sampling + STTM config. ``sampling`` and
    ``model_extra`` must be JSON-able. ``frame_indices``/``timestamps`` (seconds) describe
    the sampled frames, one entry per frame. ``payload_checksum`` is computed by the store
    on write and filled in on read.
    """

    video_id: str
    source_uri: str
    content_hash: str
    model_id: str
    model_revision: str | None
    encoder_fingerprint: str
    config_fingerprint: str
    sampling: dict[str, Any]
    frame_indices: list[int]
    timestamps: list[float]
    model_extra: dict[str, Any]
    tokens: TokenSet
    pipeline_version: str
    run_id: str
    created_at: datetime = field(default_factory=_utc_now)
    merge_layer: int = 0
    payload_checksum: str | None = None
    # [L, N, C] the model's DeepStack levels merged like tokens.features (Qwen3-VL), in
    # the features' dtype; None for models without them.
    deepstack: torch.Tensor | None = None
    # merge_layer k > 0 only (STTM_SPEC section 6; None at k = 0): tokens.features are the
    # merged hidden states entering decoder layer k, and these hold the rest of the
    # prefix: ``llm_fingerprint`` of the LLM's embedding and layers 0..k-1,
    # ``prefix_text_ids`` the P token ids of the text before the video, ``prefix_states``
    # [R, C] the hidden states entering layer k of the prefix rows that are not video
    # tokens (the P text rows, then those after the video), ``layer_kv``
    # [k, 2, H_kv, L, D] the keys and values of layers 0..k-1 over the unmerged prefix of
    # L = R + T*H*W rows; all in the features' dtype.
    llm_fingerprint: str | None = None
    prefix_text_ids: list[int] | None = None
    prefix_states: torch.Tensor | None = None
    layer_kv: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.tokens.num_tokens

    @property
    def original_tokens(self) -> int:
        t, h, w = self.tokens.grid
        return t * h * w


@dataclass(frozen=True)
class TokenSetSummary:
    """What :meth:`TokenStore.list` shows per (video id, config), read from index entries."""

    video_id: str
    source_uri: str
    key: str
    content_hash: str
    config_fingerprint: str
    model_id: str
    num_tokens: int
    original_tokens: int
    bytes: int
    run_id: str
    created_at: datetime

    @property
    def retention(self) -> float:
        return self.num_tokens / self.original_tokens


@dataclass(frozen=True)
class PutResult:
    """What :meth:`TokenStore.put` did: ``bytes_written`` counts the token-set bytes this
    call wrote (0 when the object was already there and verified); ``repaired`` says the
    object was there but failed its checks and was replaced."""

    key: str
    object_bytes: int
    bytes_written: int
    repaired: bool


@dataclass(frozen=True)
class StoreProblem:
    """An object a listing could not read (``key`` relative to the root) and why."""

    key: str
    message: str


@dataclass(frozen=True)
class ManifestEntry:
    """What a run did with one input video; ``status`` is one of MANIFEST_STATUSES."""

    video_id: str
    source_uri: str
    status: str
    key: str | None = None
    content_hash: str | None = None
    config_fingerprint: str | None = None


@dataclass(frozen=True)
class RunManifest:
    """What one run did with every input. ``job_config`` must be JSON-able."""

    run_id: str
    pipeline_version: str
    started_at: datetime
    finished_at: datetime
    job_config: dict[str, Any]
    entries: list[ManifestEntry]

    def count(self, status: str) -> int:
        return sum(entry.status == status for entry in self.entries)


@dataclass(frozen=True)
class FailureRecord:
    """Why one video failed in one run; ``stage`` is one of FAILURE_STAGES."""

    run_id: str
    video_id: str
    source_uri: str
    stage: str
    error_type: str
    message: str
    pipeline_version: str
    content_hash: str | None = None
    config_fingerprint: str | None = None
    created_at: datetime = field(default_factory=_utc_now)


# ---------------------------------------------------------------------------------------
# The store


class TokenStore:
    """Token sets, run manifests and failure records under one fsspec URL.

    ``storage_options`` go to fsspec unchanged (e.g. ``key``, ``secret``,
    ``client_kwargs={"endpoint_url": ...}`` for s3fs) and are never shown.
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None):
        self.url = sanitize_uri(url).rstrip("/")
        self._fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
        self._root = root.rstrip("/")
        self._is_local = isinstance(self._fs, LocalFileSystem)

    def __repr__(self) -> str:
        return f"TokenStore({self.url!r})"

    # -- token sets ----------------------------------------------------------------------

    def write(self, record: StoredTokenSet) -> str:
        """Store ``record`` and point its video id to it; returns the token set's key
        (:meth:`put` also says what was written)."""
        return self.put(record).key

    def put(self, record: StoredTokenSet) -> PutResult:
        """Store ``record`` and point its video id to it.

        Idempotent and safe beside concurrent writers: the token set is created only if
        no object has its key (token sets are immutable); one already there is kept
        when it verifies, and replaced when it does not (a repair). The index entry of
        ``record.video_id`` is then (re)written from the object in place.
        """
        _check_video_id(record.video_id)
        _check_run_id(record.run_id)
        _check_aware(record.created_at)
        key = token_set_key(record.content_hash, record.config_fingerprint)
        data = _encode_token_set(record)
        stored, repaired = record, False
        if self._put_object(key, data, if_absent=True):
            object_bytes, object_checksum, bytes_written = len(data), _object_checksum(data), len(data)
        else:
            existing = self._get(key)
            try:
                stored = self._verified_existing(key, existing, data, record)
                object_bytes, object_checksum, bytes_written = len(existing), _object_checksum(existing), 0
                logger.info("token set %s already stored; linking video id %r", key, record.video_id)
            except CorruptObjectError as error:
                logger.warning("replacing a corrupt token set: %s", error)
                self._put_object(key, data, if_absent=False)
                object_bytes, object_checksum, bytes_written = len(data), _object_checksum(data), len(data)
                repaired = True

        entry = {
            "video_id": record.video_id,
            "source_uri": sanitize_uri(record.source_uri),
            "key": key,
            "content_hash": record.content_hash,
            "config_fingerprint": record.config_fingerprint,
            "model_id": stored.model_id,
            "num_tokens": stored.num_tokens,
            "original_tokens": stored.original_tokens,
            "object_bytes": object_bytes,
            "object_checksum": object_checksum,
            "object_etag": self._object_info(key)[1],
            "run_id": record.run_id,
            "created_at": record.created_at,
        }
        self._write_index_entry(entry)
        return PutResult(key=key, object_bytes=object_bytes, bytes_written=bytes_written, repaired=repaired)

    def read(self, video_id: str, config_fingerprint: str | None = None) -> StoredTokenSet:
        """The token set of ``video_id`` (under ``config_fingerprint``, which may be left
        out when the id has exactly one config).

        Raises NotFoundError, AmbiguousError, CorruptObjectError, SchemaVersionError.
        """
        entry = self._index_entry(video_id, config_fingerprint)
        return self._load_token_set(entry["key"], entry)

    def check(self, content_hash: str, config_fingerprint: str, video_id: str) -> str:
        """What a re-run should do with ``video_id``: VERIFIED (skip it: its index entry
        points to this content and config, and the token set verifies against the
        entry), MISSING (store it) or DAMAGED (store it again: the entry is unreadable,
        or the token set is missing, truncated or fails its checksum).

        Reads what it must: on an object store the object's size and ETag (one HEAD)
        when they match the entry's, else, and on local disk, the whole object, hashed
        against the entry's checksum. Raises SchemaVersionError for an entry of a newer
        major version (it is not overwritten), StoreError when the store cannot be read.
        """
        key = token_set_key(content_hash, config_fingerprint)
        try:
            entry = self._index_entry(video_id, config_fingerprint)
        except NotFoundError:
            return MISSING
        except CorruptObjectError as error:
            logger.warning("%s; video id %r will be stored again", error, video_id)
            return DAMAGED
        if entry["key"] != key:
            return MISSING  # the id now names other video content
        try:
            self._verify_against_entry(entry)
        except (CorruptObjectError, NotFoundError) as error:
            logger.warning("%s; video id %r will be stored again", error, video_id)
            return DAMAGED
        return VERIFIED

    def exists(self, content_hash: str, config_fingerprint: str, video_id: str | None = None) -> bool:
        """Whether the token set of this video content and config is stored.

        With ``video_id``, whether :meth:`check` finds it VERIFIED for that id: the check
        a re-run should skip on (without it, a second id with the same content would
        never be indexed).
        """
        if video_id is not None:
            return self.check(content_hash, config_fingerprint, video_id) == VERIFIED
        return self._size_or_none(token_set_key(content_hash, config_fingerprint)) is not None

    def object_size(self, key: str) -> int:
        """Bytes of the stored object ``key`` (as returned by ``write``)."""
        size = self._size_or_none(key)
        if size is None:
            raise NotFoundError(f"no object {self._display(key)}")
        return size

    def list(self, config_fingerprint: str | None = None, problems: list[StoreProblem] | None = None
             ) -> list[TokenSetSummary]:
        """One summary per (video id, config), sorted by video id; reads index entries only.

        With a ``problems`` list, a damaged entry is appended to it and left out instead
        of raising (SchemaVersionError is always raised).
        """
        if config_fingerprint is not None:
            _check_config_fingerprint(config_fingerprint)
        keys = self._index_keys("index")
        if config_fingerprint is not None:
            keys = [key for key in keys if _config_of_index_key(key) == config_fingerprint]
        summaries = []
        for key, data in self._get_many(keys).items():
            try:
                entry = self._parse_index_entry(key, data)
            except SchemaVersionError:
                raise  # not damage: this sttm-pipeline cannot read it (the message says why)
            except StoreError as error:
                if problems is None:
                    raise
                problems.append(StoreProblem(key, str(error)))
                continue
            summaries.append(
                TokenSetSummary(
                    video_id=entry["video_id"],
                    source_uri=entry["source_uri"],
                    key=entry["key"],
                    content_hash=entry["content_hash"],
                    config_fingerprint=entry["config_fingerprint"],
                    model_id=entry["model_id"],
                    num_tokens=entry["num_tokens"],
                    original_tokens=entry["original_tokens"],
                    bytes=entry["object_bytes"],
                    run_id=entry["run_id"],
                    created_at=entry["created_at"],
                )
            )
        return sorted(summaries, key=lambda s: (s.video_id, s.config_fingerprint))

    def read_token_set_fields(self, key: str, names: list[str]) -> dict[str, Any]:
        """The fields ``names`` of the token set at ``key`` (a key :meth:`list` gives),
        reading only their columns: never the features, unless asked for.

        Raises StoreError for a key that is not a token set's, and the errors of a read.
        """
        if not _TOKEN_SET_KEY.fullmatch(key):
            raise StoreError(f"refusing key {key!r:.200}: not a token set key")
        display = self._display(key)
        with self._open_object(key) as source:
            try:
                metadata = source.footer()
                _check_schema(TOKEN_SET, metadata.metadata, display)
                missing = sorted(set(names) - set(metadata.schema.to_arrow_schema().names))
                if missing:  # Parquet would silently leave them out of the read
                    raise CorruptObjectError(f"{display} lacks {TOKEN_SET.name} columns {missing}")
                return source.read_columns(metadata, list(names)).to_pylist()[0]
            except (pa.ArrowException, OSError, ValueError, IndexError) as error:
                raise CorruptObjectError(f"{display} is not a readable Parquet file ({error})") from None

    # -- the store as datasets -----------------------------------------------------------

    def dataset(self, kind: str) -> pyarrow.dataset.Dataset:
        """One prefix of the store as a pyarrow dataset: ``"tokens"`` (one row per token
        set), ``"index"`` (the id table: one row per video id and config), ``"manifests"``
        or ``"failures"``; on any filesystem, with this store's storage options.

        Takes the prefix's Parquet files only (a store written before index_entry 2.0
        also has JSON entries there, which are left out), read with the current schema
        (columns older token sets have beyond it are not read). Join tokens and index on
        ``(content_hash, config_fingerprint)``; README "Reading the store" shows how, and
        how to read the store with Ray Data and DuckDB.
        """
        schemas_by_kind = {"tokens": TOKEN_SET, "index": INDEX_ENTRY, "manifests": RUN_MANIFEST, "failures": FAILURE}
        if kind not in schemas_by_kind:
            raise ValueError(f"kind must be one of {sorted(schemas_by_kind)}, got {kind!r}")
        paths = [self._path(key) for key in self._list_keys(kind, suffix=".parquet")]
        return pyarrow.dataset.dataset(paths, schema=schemas_by_kind[kind].arrow_schema(), format="parquet",
                                       filesystem=self._fs)

    # -- run manifests and failures ------------------------------------------------------

    def write_manifest(self, manifest: RunManifest) -> str:
        """Store the manifest of a run (replacing one of the same run id); returns its key."""
        _check_run_id(manifest.run_id)
        for entry in manifest.entries:
            if entry.status not in MANIFEST_STATUSES:
                raise ValueError(f"manifest entry status must be one of {MANIFEST_STATUSES}, got {entry.status!r}")
        row = {
            "run_id": manifest.run_id,
            "pipeline_version": manifest.pipeline_version,
            "started_at": _check_aware(manifest.started_at),
            "finished_at": _check_aware(manifest.finished_at),
            "job_config_json": redact_urls(canonical_json(manifest.job_config)),
            "num_inputs": len(manifest.entries),
            "num_stored": manifest.count("stored"),
            "num_skipped": manifest.count("skipped"),
            "num_failed": manifest.count("failed"),
            "entries": [
                {
                    "video_id": entry.video_id,
                    "source_uri": sanitize_uri(entry.source_uri),
                    "status": entry.status,
                    "key": entry.key,
                    "content_hash": entry.content_hash,
                    "config_fingerprint": entry.config_fingerprint,
                }
                for entry in manifest.entries
            ],
        }
        key = f"manifests/{manifest.run_id}.parquet"
        self._put_object(key, _encode_one_row(RUN_MANIFEST, row), if_absent=False)
        return key

    def list_manifests(self, problems: list[StoreProblem] | None = None) -> list[RunManifest]:
        """Every run manifest, sorted by start time (``problems``: as in :meth:`list`)."""

        def manifest(key: str, data: bytes) -> RunManifest:
            row = _decode_one_row(RUN_MANIFEST, data, self._display(key))
            return RunManifest(
                run_id=row["run_id"],
                pipeline_version=row["pipeline_version"],
                started_at=row["started_at"],
                finished_at=row["finished_at"],
                job_config=json.loads(row["job_config_json"]),
                entries=[ManifestEntry(**entry) for entry in row["entries"]],
            )

        manifests = self._decode_each(self._list_keys("manifests", suffix=".parquet"), manifest, problems)
        return sorted(manifests, key=lambda m: (m.started_at, m.run_id))

    def write_failure(self, failure: FailureRecord, occurrence: int = 0) -> str:
        """Record why a video failed in a run; returns its key. One record per run, video id
        and ``occurrence`` (the n-th failure of that id in the run: a repeated id keeps all)."""
        _check_run_id(failure.run_id)
        _check_video_id(failure.video_id)
        if failure.stage not in FAILURE_STAGES:
            raise ValueError(f"failure stage must be one of {FAILURE_STAGES}, got {failure.stage!r}")
        row = {
            "run_id": failure.run_id,
            "video_id": failure.video_id,
            "source_uri": sanitize_uri(failure.source_uri),
            "stage": failure.stage,
            "error_type": failure.error_type,
            "message": redact_urls(failure.message)[:_MAX_FAILURE_MESSAGE_CHARS],
            "content_hash": failure.content_hash,
            "config_fingerprint": failure.config_fingerprint,
            "pipeline_version": failure.pipeline_version,
            "created_at": _check_aware(failure.created_at),
        }
        suffix = f".{occurrence}" if occurrence else ""
        key = f"failures/{failure.run_id}/{_video_id_hash(failure.video_id)}{suffix}.parquet"
        self._put_object(key, _encode_one_row(FAILURE, row), if_absent=False)
        return key

    def list_failures(self, run_id: str | None = None, problems: list[StoreProblem] | None = None
                      ) -> list[FailureRecord]:
        """Failure records of one run, or of every run; sorted by time (``problems``: as
        in :meth:`list`)."""
        prefix = "failures"
        if run_id is not None:
            _check_run_id(run_id)
            prefix = f"failures/{run_id}"

        def failure(key: str, data: bytes) -> FailureRecord:
            return FailureRecord(**_decode_one_row(FAILURE, data, self._display(key)))

        records = self._decode_each(self._list_keys(prefix, suffix=".parquet"), failure, problems)
        return sorted(records, key=lambda f: (f.created_at, f.video_id))

    def _decode_each(self, keys: list[str], decode: Any, problems: list[StoreProblem] | None) -> list[Any]:
        """``decode(key, data)`` of each object; one that is damaged goes to ``problems``
        when given (else raises). SchemaVersionError is always raised."""
        decoded = []
        for key, data in self._get_many(keys).items():
            try:
                decoded.append(decode(key, data))
            except SchemaVersionError:
                raise
            except (StoreError, ValueError, TypeError) as error:
                if problems is None:
                    raise
                problems.append(StoreProblem(key, str(error)))
        return decoded

    # -- index entries -------------------------------------------------------------------

    def _index_entry(self, video_id: str, config_fingerprint: str | None) -> dict[str, Any]:
        """The index entry of ``video_id`` (under ``config_fingerprint``, or its only one),
        Parquet or, in stores written before index_entry 2.0, JSON."""
        _check_video_id(video_id)
        if config_fingerprint is not None:
            for key in (index_key(video_id, config_fingerprint), _legacy_index_key(video_id, config_fingerprint)):
                try:
                    return self._parse_index_entry(key, self._get(key))
                except NotFoundError:
                    continue
            raise NotFoundError(
                f"no token set for video id {video_id!r} with config {config_fingerprint} in {self.url}"
            )
        keys = self._index_keys(f"index/{_video_id_hash(video_id)}")
        if not keys:
            raise NotFoundError(f"no token set for video id {video_id!r} in {self.url}")
        if len(keys) > 1:
            configs = ", ".join(_config_of_index_key(key) for key in keys)
            raise AmbiguousError(
                f"video id {video_id!r} has token sets under {len(keys)} configs in {self.url} "
                f"({configs}); pass --config-fingerprint (config_fingerprint in Python)"
            )
        return self._parse_index_entry(keys[0], self._get(keys[0]))

    def _index_keys(self, prefix: str) -> list[str]:
        """Index entry keys under ``prefix``: one per (video id, config), the Parquet entry
        where a legacy JSON one of the same id and config is left beside it."""
        keys = {key.removesuffix(".json") + ".parquet": key for key in self._list_keys(prefix, suffix=".json")}
        keys.update({key: key for key in self._list_keys(prefix, suffix=".parquet")})
        return sorted(keys.values())

    def _parse_index_entry(self, key: str, data: bytes) -> dict[str, Any]:
        """The entry at ``key`` as a dict of index_entry fields (a legacy JSON entry has
        ``object_checksum`` and ``object_etag`` None), after checking it names only what
        its key allows: the token set of its own content hash and config, for the video
        id and config its key is made of."""
        display = self._display(key)
        if key.endswith(".json"):
            entry = _parse_legacy_index_entry(data, display)
        else:
            entry = _decode_one_row(INDEX_ENTRY, data, display)
        try:
            expected_key = token_set_key(entry["content_hash"], entry["config_fingerprint"])
            own_key = index_key(entry["video_id"], entry["config_fingerprint"])
        except (ValueError, TypeError, AttributeError) as error:
            raise CorruptObjectError(f"{display} is not a valid index entry ({error})") from None
        if entry["key"] != expected_key:
            raise CorruptObjectError(f"{display} names object {entry['key']!r:.200}, not its token set {expected_key}")
        if own_key.removesuffix(".parquet") != key.removesuffix(".json").removesuffix(".parquet"):
            raise CorruptObjectError(f"{display} is the index entry of another video id or config")
        return entry

    def _write_index_entry(self, entry: dict[str, Any]) -> None:
        """Write ``entry`` (index_entry fields), then delete the JSON entry a store written
        before index_entry 2.0 may hold for its id and config: the index/ prefix then
        holds Parquet only."""
        self._put_object(index_key(entry["video_id"], entry["config_fingerprint"]),
                         _encode_one_row(INDEX_ENTRY, entry), if_absent=False)
        key = _legacy_index_key(entry["video_id"], entry["config_fingerprint"])
        try:
            if self._is_local:
                os.remove(self._path(key))
            elif self._size_or_none(key) is not None:  # a HEAD: writers may lack delete rights
                self._fs.rm_file(self._path(key))
        except FileNotFoundError:
            pass

    # -- token set objects ---------------------------------------------------------------

    def _load_token_set(self, key: str, entry: Mapping[str, Any]) -> StoredTokenSet:
        """The token set at ``key``, checked end to end, as the index ``entry`` names it."""
        display = self._display(key)
        with self._open_object(key) as source:
            if source.size != entry["object_bytes"]:
                raise CorruptObjectError(
                    f"{display} has {source.size} bytes, its index entry says {entry['object_bytes']}: "
                    "truncated or replaced"
                )
            record = _read_token_set(source, display, entry)
        if token_set_key(record.content_hash, record.config_fingerprint) != key:
            raise CorruptObjectError(f"{display} holds the token set of another video or config")
        return record

    def _verified_existing(self, key: str, existing: bytes, ours: pa.Buffer, record: StoredTokenSet
                           ) -> StoredTokenSet:
        """The token set already at ``key`` (bytes ``existing``), after checking it; it
        is ``record`` when its bytes are the ones we would write (the usual case: they
        depend only on content and config). Raises CorruptObjectError."""
        if pa.py_buffer(existing).equals(ours):
            return record
        display = self._display(key)
        stored = _read_token_set(_BufferObject(existing, display), display, record.__dict__)
        if token_set_key(stored.content_hash, stored.config_fingerprint) != key:
            raise CorruptObjectError(f"{display} holds the token set of another video or config")
        return stored

    def _verify_against_entry(self, entry: Mapping[str, Any]) -> None:
        """Check the token set in place is the one ``entry`` was written for; raises
        CorruptObjectError or NotFoundError."""
        key, display = entry["key"], self._display(entry["key"])
        if entry["object_checksum"] is None:  # a legacy entry: verify the token set itself
            self._upgrade_legacy_entry(entry)
            return
        size, etag = self._object_info(key)
        if size != entry["object_bytes"]:
            raise CorruptObjectError(
                f"{display} has {size} bytes, its index entry says {entry['object_bytes']}: truncated or replaced"
            )
        if etag is not None and etag == entry["object_etag"]:
            return  # the object store says it is the object verified when the entry was written
        with self._open_object(key) as source:
            actual = _source_checksum(source)
        if actual != entry["object_checksum"]:
            raise CorruptObjectError(f"{display} does not match the checksum its index entry records")

    def _upgrade_legacy_entry(self, entry: Mapping[str, Any]) -> None:
        """Verify the token set a legacy (JSON) ``entry`` points to, reading it whole,
        then write the entry as the current Parquet one with the object's checksum and
        ETag: a re-run moves an older store's index to the current layout as it checks
        it. Raises CorruptObjectError or NotFoundError."""
        key, display = entry["key"], self._display(entry["key"])
        data = self._get(key)
        if len(data) != entry["object_bytes"]:
            raise CorruptObjectError(
                f"{display} has {len(data)} bytes, its index entry says {entry['object_bytes']}: truncated or replaced"
            )
        stored = _read_token_set(_BufferObject(data, display), display, entry)
        if token_set_key(stored.content_hash, stored.config_fingerprint) != key:
            raise CorruptObjectError(f"{display} holds the token set of another video or config")
        self._write_index_entry({
            **{name: entry[name] for name in INDEX_ENTRY.field_names},
            "object_checksum": _object_checksum(data),
            "object_etag": self._object_info(key)[1],
        })

    @contextlib.contextmanager
    def _open_object(self, key: str) -> Iterator[_LocalObject | _RemoteObject]:
        """The object at ``key``, open for ranged reads; failed reads raise NotFoundError
        or StoreError naming it."""
        display = self._display(key)
        with _reading(display):
            path = self._path(key)
            source = _LocalObject(path, display) if self._is_local else _RemoteObject(self._fs, path, display)
            try:
                yield source
            finally:
                source.close()

    # -- objects: keys, atomic writes, reads, listings -----------------------------------

    def _path(self, key: str) -> str:
        # Keys are built only from validated hex digests, fingerprints and run ids, and
        # keys read from index entries are checked against the key they must be; this
        # check makes sure no key, however built, can leave the root.
        parts = key.split("/")
        if any(part in ("", ".", "..") for part in parts) or "\\" in key or "\x00" in key:
            raise StoreError(f"refusing key {key!r:.200}: it could leave the store root")
        return f"{self._root}/{key}"

    def _display(self, key: str) -> str:
        return f"{self.url}/{key}"

    def _put_object(self, key: str, data: bytes | pa.Buffer, if_absent: bool) -> bool:
        """Write ``data`` at ``key`` all at once or not at all. With ``if_absent``, only
        if no object has that key (atomically: S3 ``If-None-Match: *``, locally a hard
        link); returns whether it was written."""
        path = self._path(key)
        try:
            if self._is_local:
                written = _write_local_atomically(path, data, replace=not if_absent)
            else:
                # One PUT, or for large data a multipart upload; either becomes visible
                # only when complete.
                try:
                    self._fs.pipe_file(path, bytes(data), mode="create" if if_absent else "overwrite")
                    written = True
                except FileExistsError:  # the precondition If-None-Match: * failed
                    written = False
        except OSError as error:
            raise StoreError(f"could not write {self._display(key)}: {redact_urls(str(error))}") from error
        logger.debug("%s %s (%d bytes)", "wrote" if written else "found", self._display(key), len(data))
        return written

    def _get(self, key: str) -> bytes:
        with _reading(self._display(key)):
            return self._fs.cat_file(self._path(key))

    def _get_many(self, keys: list[str]) -> dict[str, bytes]:
        """``{key: bytes}``, fetched concurrently where the filesystem can (s3fs)."""
        if not keys:
            return {}
        with _reading(self.url):
            by_path = self._fs.cat([self._path(key) for key in keys])
        return {key: by_path[self._path(key)] for key in keys}

    def _object_info(self, key: str) -> tuple[int, str | None]:
        """Size and ETag (None where the filesystem has none) of the object at ``key``."""
        path = self._path(key)
        self._fs.invalidate_cache(path)  # another process may have written it
        with _reading(self._display(key)):
            info = self._fs.info(path)
        return info["size"], info.get("ETag")

    def _size_or_none(self, key: str) -> int | None:
        try:
            return self._object_info(key)[0]
        except NotFoundError:
            return None

    def _list_keys(self, prefix: str, suffix: str) -> list[str]:
        """Keys under ``prefix`` ending in ``suffix`` (skipping in-flight temp files)."""
        base = self._path(prefix)
        self._fs.invalidate_cache(base)  # s3fs caches listings; others write concurrently
        keys = []
        for path in self._fs.find(base):
            key = path[len(self._root) + 1 :]
            if key.endswith(suffix) and not posixpath.basename(key).startswith("."):
                keys.append(key)
        return sorted(keys)


# ---------------------------------------------------------------------------------------
# Keys


def token_set_key(content_hash: str, config_fingerprint: str) -> str:
    """``tokens/<config>/sha256-<hex>.parquet``: where a token set lives, relative to the root."""
    _check_content_hash(content_hash)
    _check_config_fingerprint(config_fingerprint)
    algorithm, _, digest = content_hash.partition(":")
    return f"tokens/{config_fingerprint}/{algorithm}-{digest}.parquet"


def index_key(video_id: str, config_fingerprint: str) -> str:
    """``index/<video id hash>/<config>.parquet``: where a video id's index entry lives."""
    _check_config_fingerprint(config_fingerprint)
    return f"index/{_video_id_hash(video_id)}/{config_fingerprint}.parquet"


def _legacy_index_key(video_id: str, config_fingerprint: str) -> str:
    """Where index_entry 1.x put the entry: the same name, as JSON."""
    return index_key(video_id, config_fingerprint).removesuffix(".parquet") + ".json"


def _config_of_index_key(key: str) -> str:
    return posixpath.basename(key).removesuffix(".json").removesuffix(".parquet")


def _parse_legacy_index_entry(data: bytes, display: str) -> dict[str, Any]:
    """An index_entry 1.x JSON entry as a dict of the current fields (the object's
    checksum and ETag unknown: None)."""
    try:
        entry = json.loads(data)
        found_version = entry["schema_version"]
    except (ValueError, TypeError, KeyError) as error:
        raise CorruptObjectError(f"{display} is not a readable index entry ({error})") from None
    check_schema_version(INDEX_ENTRY, str(found_version), display)
    missing = [name for name in _LEGACY_INDEX_FIELDS if name not in entry]
    if missing:
        raise CorruptObjectError(f"{display} lacks index entry fields {missing}")
    try:
        created_at = datetime.fromisoformat(entry["created_at"])
    except (TypeError, ValueError) as error:
        raise CorruptObjectError(f"{display} is not a readable index entry ({error})") from None
    return {**{name: entry[name] for name in INDEX_ENTRY.field_names if name in entry},
            "object_checksum": None, "object_etag": None, "created_at": created_at}


def _video_id_hash(video_id: str) -> str:
    return hashlib.sha256(video_id.encode("utf-8")).hexdigest()[:32]


def _check_video_id(video_id: str) -> None:
    if not isinstance(video_id, str) or not video_id:
        raise ValueError("video id must be a non-empty string")
    if "://" in video_id and sanitize_uri(video_id) != video_id:
        # Do not echo it: it may hold a password or a signature.
        raise ValueError(
            "video id looks like a URL with credentials or a query string; use an id without them"
        )


def _check_content_hash(content_hash: str) -> None:
    if not isinstance(content_hash, str) or not _CONTENT_HASH.fullmatch(content_hash):
        raise ValueError(f"content hash must be 'sha256:<64 hex digits>', got {content_hash!r:.80}")


def _check_config_fingerprint(config_fingerprint: str) -> None:
    if not isinstance(config_fingerprint, str) or not _CONFIG_FINGERPRINT.fullmatch(config_fingerprint):
        raise ValueError(f"config fingerprint must be 8-64 lowercase hex digits, got {config_fingerprint!r:.80}")


def _check_run_id(run_id: str) -> None:
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id) or ".." in run_id:
        raise ValueError(f"run id must be 1-128 of [A-Za-z0-9._-] without '..', got {run_id!r:.80}")


def _check_aware(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware (use datetime.now(timezone.utc))")
    return moment


# ---------------------------------------------------------------------------------------
# Local files


def _write_local_atomically(path: str, data: bytes | pa.Buffer, replace: bool) -> bool:
    """Temp file in the same directory, fsync, then into place, fsync the directory:
    after a crash ``path`` is the old file or the new one, never part of one. With
    ``replace`` a rename puts it over any file there; without, a hard link puts it there
    only if no file is (atomically, even against other processes); returns whether it was
    put in place."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    temp_path = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temp_path, "wb") as temp_file:
            temp_file.write(data)
            temp_file.flush()
            os.fsync(temp_file.fileno())
        if replace:
            os.replace(temp_path, path)
        else:
            try:
                os.link(temp_path, path)
            except FileExistsError:
                return False
    finally:
        if os.path.exists(temp_path):
            os.remove(temp_path)
    directory_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)
    return True


# ---------------------------------------------------------------------------------------
# Ranged reads of one object, local or remote, and the threads that run them


@contextlib.contextmanager
def _reading(display: str) -> Iterator[None]:
    """Turn an OSError of reading the object ``display`` into NotFoundError or StoreError."""
    try:
        yield
    except FileNotFoundError:
        raise NotFoundError(f"{display} does not exist") from None
    except OSError as error:
        raise StoreError(f"could not read {display}: {redact_urls(str(error))}") from error


class _LocalObject:
    """An object on local disk, open once: every read sees the same file, even if a
    writer renames a new one over it meanwhile.

    Arrow reads the footer and columns from the open file; :meth:`read_into` uses
    ``os.preadv``, which releases the GIL, so pieces read in parallel threads take the
    page faults of a fresh destination buffer on several cores at once.
    """

    def __init__(self, path: str, display: str):
        self._file = open(path, "rb")
        self._display = display
        self.size = os.fstat(self._file.fileno()).st_size

    def close(self) -> None:
        self._file.close()

    def footer(self) -> pq.FileMetaData:
        return pq.read_metadata(self._file)

    def read_columns(self, metadata: pq.FileMetaData, names: list[str]) -> pa.Table:
        """Columns ``names``, with their page CRCs verified."""
        return _read_parquet_columns(self._file, metadata, names)

    def read_into(self, offset: int, out: np.ndarray) -> None:
        """Fill the uint8 array ``out`` with the bytes at ``offset``."""
        done = 0
        while done < out.nbytes:
            count = os.preadv(self._file.fileno(), [out[done:]], offset + done)
            if count == 0:
                raise CorruptObjectError(f"{self._display} ends at byte {offset + done}, inside its features")
            done += count


class _RemoteObject:
    """An object on an object store (``s3://...``), read with range GETs.

    A read costs one HEAD (the size), one GET of the tail (the footer), one batch of
    concurrent GETs for the columns Arrow reads, and concurrent GETs of the feature pieces.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, display: str):
        self._fs, self._path, self._display = fs, path, display
        fs.invalidate_cache(path)  # another process may have replaced it
        self.size = fs.size(path)

    def close(self) -> None:
        """Nothing stays open between requests."""

    def footer(self) -> pq.FileMetaData:
        (tail,) = self._fetch([(max(0, self.size - _TAIL_BYTES), self.size)])
        footer_bytes = int.from_bytes(tail[-8:-4], "little") + 8  # footer, its length, "PAR1"
        if len(tail) < footer_bytes <= self.size:
            (tail,) = self._fetch([(self.size - footer_bytes, self.size)])
        return pq.read_metadata(pa.BufferReader(tail))

    def read_columns(self, metadata: pq.FileMetaData, names: list[str]) -> pa.Table:
        """Columns ``names``, with their page CRCs verified: their column chunks are
        fetched in one batch (adjacent chunks as one range), then Arrow reads them from
        memory ("strict": a read outside them fails instead of fetching)."""
        ranges = _merged_ranges([_chunk_range(chunk) for chunk in _column_chunks(metadata, names)])
        parts = dict(zip(ranges, self._fetch(ranges)))
        with self._fs.open(
            self._path, "rb", cache_type="parts", cache_options={"data": parts, "strict": True}, size=self.size
        ) as file:
            return _read_parquet_columns(file, metadata, names)

    def read_into(self, offset: int, out: np.ndarray) -> None:
        """Fill the uint8 array ``out`` with the bytes at ``offset``."""
        (data,) = self._fetch([(offset, offset + out.nbytes)])
        out[:] = np.frombuffer(data, dtype=np.uint8)

    def _fetch(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        """The bytes of each ``(start, end)`` range, fetched concurrently."""
        with _reading(self._display):
            blobs = self._fs.cat_ranges(
                [self._path] * len(ranges), [start for start, _ in ranges], [end for _, end in ranges], on_error="raise"
            )
        for (start, end), blob in zip(ranges, blobs):
            if len(blob) != end - start:
                raise CorruptObjectError(f"{self._display} ends before byte {end}")
        return blobs


class _BufferObject:
    """An object already in memory (what a writer found at a token set's key)."""

    def __init__(self, data: bytes, display: str):
        self._data, self._display = data, display
        self.size = len(data)

    def footer(self) -> pq.FileMetaData:
        return pq.read_metadata(pa.BufferReader(self._data))

    def read_columns(self, metadata: pq.FileMetaData, names: list[str]) -> pa.Table:
        return _read_parquet_columns(pa.BufferReader(self._data), metadata, names)

    def read_into(self, offset: int, out: np.ndarray) -> None:
        piece = self._data[offset : offset + out.nbytes]
        if len(piece) != out.nbytes:
            raise CorruptObjectError(f"{self._display} ends at byte {offset + len(piece)}, inside its features")
        out[:] = np.frombuffer(piece, dtype=np.uint8)


def _object_checksum(data: bytes | pa.Buffer) -> str:
    """What index entries record of a token-set object: ``"sha256-pieces:<hex>"``, the
    SHA-256 of the SHA-256 digests of its consecutive ``_PIECE_BYTES`` pieces (hashed in
    parallel, as the payload checksum is)."""
    view = memoryview(data)
    pieces = [view[offset : offset + _PIECE_BYTES] for offset in range(0, len(view), _PIECE_BYTES)]
    return _checksum_of_digests(list(_pool().map(_sha256_digest, pieces)))


def _source_checksum(source: _LocalObject | _RemoteObject) -> str:
    """:func:`_object_checksum` of the object ``source``, its pieces read and hashed in
    parallel threads, one piece in memory per thread."""

    def piece_digest(offset: int) -> bytes:
        piece = np.empty(min(_PIECE_BYTES, source.size - offset), dtype=np.uint8)
        source.read_into(offset, piece)
        return _sha256_digest(piece)

    pieces = [_pool().submit(piece_digest, offset) for offset in range(0, source.size, _PIECE_BYTES)]
    concurrent.futures.wait(pieces)  # every read finishes, failed or not, before the source closes
    return _checksum_of_digests([piece.result() for piece in pieces])


def _checksum_of_digests(piece_digests: list[bytes]) -> str:
    digest = hashlib.sha256()
    for piece_digest in piece_digests:
        digest.update(piece_digest)
    return f"{_PIECES_CHECKSUM}:{digest.hexdigest()}"


def _read_parquet_columns(file: Any, metadata: pq.FileMetaData, names: list[str]) -> pa.Table:
    """Columns ``names`` of the Parquet ``file`` (a binary file object) whose footer is
    ``metadata``, with their page CRCs verified, reading exactly their column chunks."""
    # No pre-buffering: it would coalesce reads across small gaps (such as a small
    # features chunk), and run them on Arrow's IO threads. One row needs no thread pool,
    # and Arrow's pool can abort the interpreter at exit when torch is loaded too
    # (apache/arrow#34314).
    parquet_file = pq.ParquetFile(file, metadata=metadata, pre_buffer=False, page_checksum_verification=True)
    return parquet_file.read(columns=names, use_threads=False)


@functools.cache
def _pool() -> concurrent.futures.ThreadPoolExecutor:
    """Threads that read and hash feature pieces, one per core (hashlib, os.preadv and
    NumPy copies release the GIL); made on first use."""
    return concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="token-store")


# A forked child inherits the pool but none of its threads: it makes its own.
os.register_at_fork(after_in_child=_pool.cache_clear)


def _column_chunks(metadata: pq.FileMetaData, names: list[str]) -> list[pq.ColumnChunkMetaData]:
    """The column chunks of the top-level fields ``names`` in the only row group."""
    row_group = metadata.row_group(0)
    chunks = (row_group.column(i) for i in range(row_group.num_columns))
    return [chunk for chunk in chunks if chunk.path_in_schema.split(".")[0] in names]


def _chunk_range(chunk: pq.ColumnChunkMetaData) -> tuple[int, int]:
    """``(start, end)`` of a column chunk's pages in the file."""
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    return start, start + chunk.total_compressed_size


def _merged_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``ranges`` sorted, with touching or overlapping ones joined."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


# ---------------------------------------------------------------------------------------
# Parquet encoding. A token set is one row; the features are one uncompressed
# large_binary value, so they are read back straight out of their column chunk.


def payload_checksum(tokens: TokenSet, deepstack: torch.Tensor | None = None) -> str:
    """The payload checksum every write stores, ``"sha256-pieces:<hex>"``."""
    features = _raw_bytes(tokens.features)
    pieces = (features[offset : offset + _PIECE_BYTES] for offset in range(0, features.nbytes, _PIECE_BYTES))
    return _pieces_checksum(tokens, list(_pool().map(_sha256_digest, pieces)), deepstack)


def _pieces_checksum(tokens: TokenSet, piece_digests: list[bytes], deepstack: torch.Tensor | None = None) -> str:
    """``"sha256-pieces:<hex>"`` (schema 2.x): SHA-256 of the header line, the SHA-256
    digest of each ``_PIECE_BYTES`` piece of the features, then the raw bytes of frame,
    box, num_patches and assignment, then (when stored) the SHA-256 digest of the
    DeepStack bytes (schemas/README.md). The pieces are hashed in parallel, on write and
    as they are read."""
    digest = hashlib.sha256(_checksum_header(tokens))
    for piece_digest in piece_digests:
        digest.update(piece_digest)
    for tensor in (tokens.frame, tokens.box, tokens.num_patches, tokens.assignment):
        digest.update(_raw_bytes(tensor))
    if deepstack is not None:
        digest.update(_sha256_digest(_raw_bytes(deepstack)))
    return f"{_PIECES_CHECKSUM}:{digest.hexdigest()}"


def _stream_checksum(tokens: TokenSet) -> str:
    """``"sha256:<hex>"`` (schema 1.x): SHA-256 of the header line, then the raw bytes
    of features, frame, box, num_patches and assignment as one stream (one core)."""
    digest = hashlib.sha256(_checksum_header(tokens))
    for tensor in (tokens.features, tokens.frame, tokens.box, tokens.num_patches, tokens.assignment):
        digest.update(_raw_bytes(tensor))
    return f"{_STREAM_CHECKSUM}:{digest.hexdigest()}"


def _checksum_header(tokens: TokenSet) -> bytes:
    """The line ``"<features_dtype> <N>x<C> <T>x<H>x<W>\\n"`` every checksum starts with."""
    n, c = tokens.features.shape
    t, h, w = tokens.grid
    return f"{_dtype_name(tokens.features.dtype)} {n}x{c} {t}x{h}x{w}\n".encode()


def _sha256_digest(data: np.ndarray) -> bytes:
    return hashlib.sha256(data).digest()


def _encode_token_set(record: StoredTokenSet) -> pa.Buffer:
    _check_content_hash(record.content_hash)
    _check_config_fingerprint(record.config_fingerprint)
    if len(record.frame_indices) != len(record.timestamps):
        raise ValueError(
            f"frame_indices ({len(record.frame_indices)}) and timestamps ({len(record.timestamps)}) differ in length"
        )
    tokens = _checked_cpu_tokens(record.tokens)
    n, c = tokens.features.shape
    # Content and config only (schemas/token_set.json): who asked for it, when and in
    # which run is written into the index entry, so every writer writes the same bytes.
    deepstack = None if record.deepstack is None else record.deepstack.to("cpu").contiguous()
    if deepstack is not None and (deepstack.dim() != 3 or deepstack.shape[1:] != (n, c) or deepstack.dtype != tokens.features.dtype):
        raise ValueError(f"deepstack must be [L, {n}, {c}] {tokens.features.dtype}, got {list(deepstack.shape)} {deepstack.dtype}")
    row = {
        "content_hash": record.content_hash,
        "model_id": record.model_id,
        "model_revision": record.model_revision,
        "encoder_fingerprint": record.encoder_fingerprint,
        "config_fingerprint": record.config_fingerprint,
        "sampling_json": canonical_json(record.sampling),
        "frame_indices": [int(i) for i in record.frame_indices],
        "timestamps": [float(s) for s in record.timestamps],
        "merge_layer": record.merge_layer,
        "model_extra_json": canonical_json(record.model_extra),
        "grid": list(tokens.grid),
        "original_tokens": record.original_tokens,
        "num_tokens": n,
        "retention": tokens.retention,
        "tau_s": tokens.tau_s,
        "tau_t": tokens.tau_t,
        "root_level": tokens.root_level,
        "weighted": tokens.weighted,
        "head_dim": tokens.head_dim,
        "budget": tokens.budget,
        "features_dtype": _dtype_name(tokens.features.dtype),
        "channels": c,
        "features": _one_binary_value(_raw_bytes(tokens.features)),
        "frame": _one_list_value(pa.array(tokens.frame.numpy())),
        "box": _one_list_value(pa.FixedSizeListArray.from_arrays(pa.array(tokens.box.numpy().reshape(-1)), 4)),
        "num_patches": _one_list_value(pa.array(tokens.num_patches.numpy())),
        "assignment": _one_list_value(pa.array(tokens.assignment.numpy().reshape(-1))),
        "deepstack_levels": None if deepstack is None else deepstack.shape[0],
        "deepstack": None if deepstack is None else _one_binary_value(_raw_bytes(deepstack)),
        "payload_checksum": payload_checksum(tokens) if deepstack is None else payload_checksum(tokens, deepstack),
        "pipeline_version": record.pipeline_version,
    }
    row.update(_layer_columns(record, tokens))
    row = {name: row[name] for name in TOKEN_SET.field_names}
    return _encode_one_row(TOKEN_SET, row, uncompressed=("features", "deepstack", "prefix_states", "layer_kv"))


def _layer_columns(record: StoredTokenSet, tokens: TokenSet) -> dict[str, Any]:
    """The merge layer's columns of ``record`` (all null at merge_layer 0), checked."""
    parts = dict(llm_fingerprint=record.llm_fingerprint, prefix_text_ids=record.prefix_text_ids,
                 prefix_states=record.prefix_states, layer_kv=record.layer_kv)
    if record.merge_layer == 0:
        if any(value is not None for value in parts.values()):
            raise ValueError("a token set merged at layer 0 holds no prefix states, layer keys or values")
        return dict.fromkeys(_LAYER_COLUMNS)
    missing = [name for name, value in parts.items() if value is None]
    if record.merge_layer < 0 or missing:
        raise ValueError(f"a token set merged at layer {record.merge_layer} needs {sorted(parts)}; missing {missing}")
    n, c = tokens.features.shape
    states = record.prefix_states.detach().cpu().contiguous()
    kv = record.layer_kv.detach().cpu().contiguous()
    rows = states.shape[0]
    if states.dim() != 2 or states.shape[1] != c or states.dtype != tokens.features.dtype or rows < len(record.prefix_text_ids):
        raise ValueError(f"prefix_states must be [R >= {len(record.prefix_text_ids)}, {c}] {tokens.features.dtype}, "
                         f"got {list(states.shape)} {states.dtype}")
    if (kv.dim() != 5 or kv.shape[:2] != (record.merge_layer, 2) or kv.shape[3] != rows + record.original_tokens
            or kv.dtype != tokens.features.dtype):
        raise ValueError(f"layer_kv must be [{record.merge_layer}, 2, H_kv, {rows + record.original_tokens}, D] "
                         f"{tokens.features.dtype}, got {list(kv.shape)} {kv.dtype}")
    return {
        "llm_fingerprint": record.llm_fingerprint,
        "prefix_text_ids": [int(i) for i in record.prefix_text_ids],
        "prefix_states_rows": rows,
        "prefix_states": _one_binary_value(_raw_bytes(states)),
        "layer_kv_shape": list(kv.shape),
        "layer_kv": _one_binary_value(_raw_bytes(kv)),
        "layer_payload_checksum": layer_payload_checksum(states, kv),
    }


def layer_payload_checksum(prefix_states: torch.Tensor, layer_kv: torch.Tensor) -> str:
    """``"sha256-pieces:<hex>"`` of a merge layer's payload (schemas/README.md): the
    header line, then the digest of each ``_PIECE_BYTES`` piece of the prefix states'
    bytes followed by the keys' and values' bytes, hashed in parallel."""
    header = f"{_dtype_name(prefix_states.dtype)} {'x'.join(map(str, prefix_states.shape))} {'x'.join(map(str, layer_kv.shape))}\n"
    digest = hashlib.sha256(header.encode())
    payload = np.concatenate([_raw_bytes(prefix_states), _raw_bytes(layer_kv)])
    pieces = (payload[offset : offset + _PIECE_BYTES] for offset in range(0, payload.nbytes, _PIECE_BYTES))
    for piece_digest in _pool().map(_sha256_digest, pieces):
        digest.update(piece_digest)
    return f"{_PIECES_CHECKSUM}:{digest.hexdigest()}"


def _read_layer_columns(row: dict[str, Any], table: pa.Table, dtype: torch.dtype, c: int, display: str) -> dict[str, Any]:
    """The merge layer's fields of a read token set (None at merge_layer 0 and in objects
    older than 3.1), checked against their checksum."""
    if row.get("layer_payload_checksum") is None:
        if row["merge_layer"] != 0:
            raise CorruptObjectError(f"{display}: merged at layer {row['merge_layer']} but holds no layer payload")
        return {}
    rows, shape = row["prefix_states_rows"], row["layer_kv_shape"]
    states_value = _only_chunk(table, "prefix_states")[0].as_buffer()
    kv_value = _only_chunk(table, "layer_kv")[0].as_buffer()
    if states_value is None or states_value.size != rows * c * dtype.itemsize:
        raise CorruptObjectError(f"{display}: prefix_states does not hold {rows}x{c} states")
    if kv_value is None or len(shape) != 5 or kv_value.size != math.prod(shape) * dtype.itemsize:
        raise CorruptObjectError(f"{display}: layer_kv does not hold keys and values of shape {shape}")
    states = torch.frombuffer(bytearray(states_value), dtype=torch.uint8).view(dtype).view(rows, c)
    kv = torch.frombuffer(bytearray(kv_value), dtype=torch.uint8).view(dtype).view(*shape)
    if layer_payload_checksum(states, kv) != row["layer_payload_checksum"]:
        raise CorruptObjectError(f"{display}: layer payload does not match its checksum {row['layer_payload_checksum']}")
    return dict(llm_fingerprint=row["llm_fingerprint"], prefix_text_ids=row["prefix_text_ids"], prefix_states=states,
                layer_kv=kv)


def _read_token_set(
    source: _LocalObject | _RemoteObject | _BufferObject, display: str, identity: Mapping[str, Any]
) -> StoredTokenSet:
    """The token set in ``source``, checked end to end, as a record of the video id,
    source URI, run id and creation time in ``identity`` (its index entry: token sets
    hold none of them; those of schema 1.x and 2.x do, and are read the same way).

    Arrow reads the footer and every column but the features, verifying their page CRCs
    (they are small). The features are read straight out of their column chunk
    (:func:`_read_features`) without their page CRC: the payload checksum covers exactly
    those bytes, so it also proves they were read from the right place.
    """
    try:
        metadata = source.footer()
        _check_schema(TOKEN_SET, metadata.metadata, display)
        present = set(metadata.schema.to_arrow_schema().names)
        missing = [name for name in TOKEN_SET.field_names if name not in present and name not in _OPTIONAL_COLUMNS]
        if missing:
            raise CorruptObjectError(f"{display} lacks {TOKEN_SET.name} columns {missing}")
        if metadata.num_rows != 1 or metadata.num_row_groups != 1:
            raise CorruptObjectError(f"{display} has {metadata.num_rows} rows, a token set has 1")
        table = source.read_columns(
            metadata, [name for name in TOKEN_SET.field_names if name != "features" and name in present]
        )
    except (pa.ArrowException, OSError, ValueError) as error:
        raise CorruptObjectError(f"{display} is not a readable Parquet file ({error})") from None
    # Small fields become Python values; the tensors come from the column buffers, since
    # an Arrow scalar of a long list would copy it.
    row = {name: table.column(name)[0].as_py() for name in table.column_names if name not in _TENSOR_COLUMNS}
    for name in _OPTIONAL_COLUMNS:  # objects of 2.0 and older lack the DeepStack ones, of 3.0 the layer ones
        row.setdefault(name, None)
    n, c = row["num_tokens"], row["channels"]
    t, h, w = row["grid"]
    if row["features_dtype"] not in FEATURE_DTYPES:
        raise CorruptObjectError(f"{display} has unknown features_dtype {row['features_dtype']!r}")
    dtype = FEATURE_DTYPES[row["features_dtype"]]
    checksum = row["payload_checksum"]
    checksum_kind, _, _ = checksum.partition(":")
    if checksum_kind not in (_PIECES_CHECKSUM, _STREAM_CHECKSUM):
        raise CorruptObjectError(f"{display} has a payload checksum of unknown kind {checksum_kind!r}")

    features, piece_digests = _read_features(
        source, metadata, n * c * dtype.itemsize, hash_pieces=checksum_kind == _PIECES_CHECKSUM, display=display
    )
    tokens = TokenSet(
        features=features.view(dtype).view(n, c),
        frame=_int32_tensor(_only_chunk(table, "frame").flatten()),
        box=_int32_tensor(_only_chunk(table, "box").flatten().flatten()).view(-1, 4),
        num_patches=_int32_tensor(_only_chunk(table, "num_patches").flatten()),
        assignment=_int32_tensor(_only_chunk(table, "assignment").flatten()).view(t, h, w),
        grid=(t, h, w),
        tau_s=row["tau_s"],
        tau_t=row["tau_t"],
        root_level=row["root_level"],
        weighted=row["weighted"],
        head_dim=row["head_dim"],
        budget=row["budget"],
    )
    if not (tokens.frame.shape == tokens.num_patches.shape == (n,) and tokens.box.shape == (n, 4)):
        raise CorruptObjectError(f"{display}: per-token columns do not have {n} entries")
    deepstack = None
    if (levels := row["deepstack_levels"]) is not None:
        value = _only_chunk(table, "deepstack")[0].as_buffer()
        if value is None or value.size != levels * n * c * dtype.itemsize:
            raise CorruptObjectError(f"{display}: deepstack does not hold {levels} levels of {n}x{c} features")
        deepstack = torch.frombuffer(bytearray(value), dtype=torch.uint8).view(dtype).view(levels, n, c)
    if checksum_kind == _PIECES_CHECKSUM:
        actual = _pieces_checksum(tokens, piece_digests, deepstack)
    else:
        actual = _stream_checksum(tokens)
    if actual != checksum:
        raise CorruptObjectError(f"{display}: token payload does not match its checksum {checksum}")
    layer_fields = _read_layer_columns(row, table, dtype, c, display)
    return StoredTokenSet(
        video_id=identity["video_id"],
        source_uri=identity["source_uri"],
        content_hash=row["content_hash"],
        model_id=row["model_id"],
        model_revision=row["model_revision"],
        encoder_fingerprint=row["encoder_fingerprint"],
        config_fingerprint=row["config_fingerprint"],
        sampling=json.loads(row["sampling_json"]),
        frame_indices=row["frame_indices"],
        timestamps=row["timestamps"],
        model_extra=json.loads(row["model_extra_json"]),
        tokens=tokens,
        pipeline_version=row["pipeline_version"],
        run_id=identity["run_id"],
        created_at=identity["created_at"],
        merge_layer=row["merge_layer"],
        payload_checksum=checksum,
        deepstack=deepstack,
        **layer_fields,
    )


def _read_features(
    source: _LocalObject | _RemoteObject, metadata: pq.FileMetaData, nbytes: int, hash_pieces: bool, display: str
) -> tuple[torch.Tensor, list[bytes] | None]:
    """The ``nbytes`` bytes of the features value as a new ``[nbytes]`` uint8 tensor, and
    with ``hash_pieces`` the SHA-256 digest of each ``_PIECE_BYTES`` piece (else None).

    The pieces are read in parallel threads straight into the tensor, and each is hashed
    by the thread that read it, right away, while it is still in cache.
    """
    start = _features_value_offset(metadata, nbytes, source.size, display)
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    array = buffer.numpy()

    def read_piece(offset: int) -> bytes | None:
        piece = array[offset : offset + _PIECE_BYTES]
        source.read_into(start + offset, piece)
        return _sha256_digest(piece) if hash_pieces else None

    pieces = [_pool().submit(read_piece, offset) for offset in range(0, nbytes, _PIECE_BYTES)]
    # Let every read finish, failed or not, before the source can be closed.
    concurrent.futures.wait(pieces)
    digests = [piece.result() for piece in pieces]  # raises the first piece's error
    return buffer, digests if hash_pieces else None


def _features_value_offset(metadata: pq.FileMetaData, nbytes: int, object_bytes: int, display: str) -> int:
    """Where the ``nbytes`` of the features value start in the object.

    The writer stores the features uncompressed, PLAIN-encoded (a 4-byte length, then the
    bytes), without a dictionary, as the only value of their column chunk: the value is
    the chunk's last ``nbytes`` bytes. Anything else is refused here; a wrong offset or
    length is caught by the payload checksum.
    """
    chunks = _column_chunks(metadata, ["features"])
    if len(chunks) != 1:
        raise CorruptObjectError(f"{display}: features are {len(chunks)} Parquet columns, not one binary column")
    chunk = chunks[0]
    # RLE and BIT_PACKED can only be the encodings of the (empty) levels.
    plain = set(chunk.encodings) <= {"PLAIN", "RLE", "BIT_PACKED"}
    if chunk.compression != "UNCOMPRESSED" or chunk.has_dictionary_page or not plain:
        raise CorruptObjectError(
            f"{display}: features are stored {chunk.compression} with encodings {chunk.encodings}, "
            "not uncompressed PLAIN without a dictionary"
        )
    start, end = _chunk_range(chunk)
    if not (0 <= start and end - start >= nbytes and end <= object_bytes):
        raise CorruptObjectError(f"{display}: the features column chunk [{start}, {end}) cannot hold {nbytes} bytes")
    return end - nbytes


def _encode_one_row(schema: RecordSchema, row: dict[str, Any], uncompressed: tuple[str, ...] = ()) -> pa.Buffer:
    """A Parquet file of one row of ``schema``; ``row`` values are Python values or
    prebuilt one-element Arrow arrays. Columns in ``uncompressed`` are stored raw."""
    if list(row) != schema.field_names:
        raise AssertionError(f"{schema.name} row fields drifted from schemas/: {sorted(set(row) ^ set(schema.field_names))}")
    columns = {name: value if isinstance(value, pa.Array) else [value] for name, value in row.items()}
    table = pa.Table.from_pydict(columns, schema=schema.arrow_schema())
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        compression={name: "none" if name in uncompressed else "zstd" for name in schema.field_names},
        use_dictionary=False,
        # min/max statistics of one row are useless, and for a binary column they would
        # copy the whole value into the footer.
        write_statistics=False,
        write_page_checksum=True,
    )
    return sink.getvalue()


def _read_parquet(schema: RecordSchema, data: bytes, display: str) -> pa.Table:
    """The table in ``data`` after checking it is a ``schema`` object of a readable version."""
    try:
        parquet_file = pq.ParquetFile(pa.BufferReader(data), page_checksum_verification=True)
        _check_schema(schema, parquet_file.schema_arrow.metadata, display)
        # One row needs no thread pool, and Arrow's pool can abort the interpreter at exit
        # when torch is loaded too (apache/arrow#34314).
        table = parquet_file.read(use_threads=False)
        missing = [name for name in schema.field_names if name not in table.column_names]
    except (pa.ArrowException, OSError, ValueError) as error:
        raise CorruptObjectError(f"{display} is not a readable Parquet file ({error})") from None
    if missing:
        raise CorruptObjectError(f"{display} lacks {schema.name} columns {missing}")
    return table


def _decode_one_row(schema: RecordSchema, data: bytes, display: str) -> dict[str, Any]:
    table = _read_parquet(schema, data, display)
    if table.num_rows != 1:
        raise CorruptObjectError(f"{display} has {table.num_rows} rows, a {schema.name} object has 1")
    return table.select(schema.field_names).to_pylist()[0]


def _check_schema(schema: RecordSchema, metadata: Mapping[bytes, bytes] | None, display: str) -> None:
    """Refuse an object whose Parquet metadata does not name ``schema`` at a version this
    code reads."""
    metadata = metadata or {}
    found_name = metadata.get(SCHEMA_NAME_KEY, b"").decode()
    if found_name != schema.name:
        raise CorruptObjectError(f"{display} is not a {schema.name} object (it says {found_name or 'nothing'!r})")
    check_schema_version(schema, metadata.get(SCHEMA_VERSION_KEY, b"").decode(), display)


def check_schema_version(schema: RecordSchema, found_version: str, display: str) -> None:
    """Refuse an object of a major version ``schema`` does not read (its own and the
    older ones in ``schema.reads_majors``): its fields may mean something else."""
    try:
        found_major, _ = parse_version(found_version)
    except ValueError:
        raise CorruptObjectError(f"{display} has no valid {schema.name} schema version ({found_version!r})") from None
    if found_major > schema.major:
        raise SchemaVersionError(
            f"{display} was written with {schema.name} schema version {found_version}, newer than the "
            f"{schema.version} this sttm-pipeline reads; upgrade sttm-pipeline to read it"
        )
    if found_major not in schema.reads_majors:
        raise SchemaVersionError(
            f"{display} was written with {schema.name} schema version {found_version}, older than the "
            f"major versions {', '.join(map(str, schema.reads_majors))} this sttm-pipeline reads; re-run the job "
            "that wrote it"
        )


# ---------------------------------------------------------------------------------------
# Tensors <-> bytes


def _dtype_name(dtype: torch.dtype) -> str:
    for name, candidate in FEATURE_DTYPES.items():
        if candidate == dtype:
            return name
    raise ValueError(f"features must be one of {list(FEATURE_DTYPES)}, got {dtype}")


def _checked_cpu_tokens(tokens: TokenSet) -> TokenSet:
    """``tokens`` on the CPU, contiguous, after checking the shapes and dtypes we store."""
    tokens = replace(
        tokens,
        features=tokens.features.detach().cpu().contiguous(),
        frame=tokens.frame.cpu().contiguous(),
        box=tokens.box.cpu().contiguous(),
        num_patches=tokens.num_patches.cpu().contiguous(),
        assignment=tokens.assignment.cpu().contiguous(),
    )
    _dtype_name(tokens.features.dtype)
    if tokens.features.dim() != 2 or tokens.features.shape[0] == 0:
        raise ValueError(f"features must be [N, C] with N >= 1, got {list(tokens.features.shape)}")
    n = tokens.features.shape[0]
    expected = {"frame": (n,), "box": (n, 4), "num_patches": (n,), "assignment": tuple(tokens.grid)}
    for name, shape in expected.items():
        tensor = getattr(tokens, name)
        if tensor.dtype != torch.int32 or tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must be int32 of shape {list(shape)}, got {tensor.dtype} {list(tensor.shape)}")
    return tokens


def _raw_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The bytes of a contiguous CPU tensor as a uint8 array, without copying."""
    return tensor.contiguous().view(torch.uint8).numpy().reshape(-1)


def _one_binary_value(data: np.ndarray) -> pa.Array:
    """A one-element large_binary array whose value is ``data``, without copying it."""
    offsets = pa.py_buffer(np.array([0, data.nbytes], dtype=np.int64))
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), 1, [None, offsets, pa.py_buffer(data)])


def _one_list_value(values: pa.Array) -> pa.Array:
    """A one-element list array holding ``values``."""
    return pa.ListArray.from_arrays(pa.array([0, len(values)], pa.int32()), values)


def _only_chunk(table: pa.Table, name: str) -> pa.Array:
    """The chunk holding the row of a one-row table."""
    return next(chunk for chunk in table.column(name).chunks if len(chunk))


def _int32_tensor(values: pa.Array) -> torch.Tensor:
    return torch.from_numpy(values.to_numpy(zero_copy_only=False).astype(np.int32, copy=True))
