"""The preprocessing stages, each usable without Ray: decode (CPU), then tokenize (encode +
STTM + store, on a GPU where there is one).

A stage is a small class: ``__init__`` sets up once per worker, ``__call__`` takes a batch
(a dict of equal-length numpy arrays, Ray Data's ``numpy`` batch format) and returns one.
Every input row comes out as exactly one row: a bad video becomes a ``failed`` row with
its error, never an exception that would stop the job.

Rows between the stages carry the frames as raw bytes plus a shape, so videos of any size
travel in one Arrow column.
"""
from __future__ import annotations

import importlib.metadata
import logging
import math
import os
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

import sttm
from pipeline.decode import DecodedVideo, SamplingPolicy, decode_video, fetch_video
from pipeline.errors import VideoError
from pipeline.merge_layer import LayerPrefix
from pipeline.models import load_adapter, resolve_model
from pipeline.models.base import merge_beside, resize_like_video_processor
from pipeline.store import DAMAGED, VERIFIED, StoredTokenSet, TokenStore, token_set_key
from pipeline.uris import redact_urls, sanitize_uri

logger = logging.getLogger(__name__)

PIPELINE_VERSION = importlib.metadata.version("sttm-pipeline")  # pyproject.toml is the one source

# Columns of the rows the tokenize stage returns (and the job collects).
# ``bytes``: token-set bytes this run wrote for the video (0 when they were already there);
# ``repaired``: it was stored before, but its index entry or token set failed their checks.
RESULT_COLUMNS = ("video_id", "uri", "status", "stage", "error_type", "message", "key", "content_hash",
                  "num_tokens", "original_tokens", "bytes", "tau_s", "tau_t", "seconds", "repaired")


def result_row(video_id: str, uri: str, status: str, **fields: Any) -> dict[str, Any]:
    """One result row: ``status`` is ``stored``, ``skipped`` or ``failed``."""
    row = dict.fromkeys(RESULT_COLUMNS)
    row.update(video_id=video_id, uri=sanitize_uri(uri), status=status, **fields)
    return row


def failed_row(video_id: str, uri: str, stage: str, error: BaseException, **fields: Any) -> dict[str, Any]:
    return result_row(video_id, uri, "failed", stage=stage, error_type=type(error).__name__,
                      message=redact_urls(str(error))[:2000], **fields)


def rows_to_batch(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """A list of row dicts -> Ray Data's numpy batch (object arrays keep None and bytes)."""
    batch = {}
    for column in rows[0]:
        values = np.empty(len(rows), dtype=object)
        values[:] = [row[column] for row in rows]
        batch[column] = values
    return batch


def batch_to_rows(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    columns = list(batch)
    count = len(batch[columns[0]]) if columns else 0
    return [{column: plain_value(batch[column][i]) for column in columns} for i in range(count)]


def plain_value(value: Any) -> Any:
    """numpy scalars and arrays (as Arrow round trips give them back) -> Python values;
    the NaN that stands for a missing value in a pandas conversion -> None."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


class WorkerLifetime:
    """Ends a Ray actor's process after ``limit`` batches, just before it would start the
    next one: Ray restarts the actor (Ray Data's actors have unlimited restarts and task
    retries) and runs that batch on the fresh process, so no video is lost or done twice.

    Why: the memory of Ray Data's map actors grows with every batch they return
    (ray-project/ray#65544; the same stage called in a plain process stays flat, see
    jobs/bench_actor_memory.py), so a long corpus would otherwise run an actor out of
    memory. Outside a Ray actor (tests, benchmarks) it does nothing.
    """

    def __init__(self, limit: int | None):
        self.limit = limit
        self.batches = 0

    def before_batch(self) -> None:
        if self.limit and self.batches >= self.limit and _in_ray_actor():
            logger.info("recycling this worker after %d batches (pid %d)", self.batches, os.getpid())
            logging.shutdown()
            os._exit(1)  # an unexpected exit: Ray restarts the actor and retries the batch
        self.batches += 1


def _in_ray_actor() -> bool:
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


class DecodeStage:
    """CPU: read each video once, skip what the store already holds, decode the rest.

    Output rows carry ``status`` ``decoded`` (with frames), or final ``skipped`` /
    ``failed`` result fields.
    """

    def __init__(self, store_url: str, storage_options: dict, policy: SamplingPolicy, config_fingerprint: str,
                 model_frame_size: tuple[int, int] | None = None, recycle_after: int | None = None):
        self.lifetime = WorkerLifetime(recycle_after)
        self.store = TokenStore(store_url, storage_options)
        self.storage_options = storage_options
        self.policy = policy
        self.config_fingerprint = config_fingerprint
        self.model_frame_size = model_frame_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.lifetime.before_batch()
        return rows_to_batch([self.decode_one(row["video_id"], row["uri"]) for row in batch_to_rows(batch)])

    def decode_one(self, video_id: str, uri: str) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            fetched = fetch_video(uri, self.storage_options)
            # Skip only a token set that verifies; a damaged one is stored again (a repair).
            found = self.store.check(fetched.content_hash, self.config_fingerprint, video_id)
            if found == VERIFIED:
                key = token_set_key(fetched.content_hash, self.config_fingerprint)
                return {**result_row(video_id, uri, "skipped", key=key, content_hash=fetched.content_hash,
                                     bytes=0), **_no_frames()}
            video = decode_video(uri, self.policy, self.storage_options, fetched=fetched)
        except Exception as error:  # every input must come out as a row
            if not isinstance(error, VideoError):
                logger.exception("unexpected error decoding %s", sanitize_uri(uri))
            return {**failed_row(video_id, uri, "decode", error, seconds=time.perf_counter() - started),
                    **_no_frames()}
        frames = video.frames
        if self.model_frame_size:  # the model's own resize, here on a CPU worker instead of the GPU actor
            frames = resize_like_video_processor(frames.permute(0, 3, 1, 2), self.model_frame_size).permute(0, 2, 3, 1)
        frames = frames.contiguous().numpy()
        return {
            **result_row(video_id, uri, "decoded", content_hash=video.content_hash,
                         seconds=time.perf_counter() - started, repaired=found == DAMAGED),
            "frames": frames.tobytes(),
            "frames_shape": list(frames.shape),
            "frame_indices": list(video.frame_indices),
            "timestamps": list(video.timestamps),
            "fps": float(video.fps),
            "num_frames_total": int(video.num_frames_total),
        }


def _no_frames() -> dict[str, Any]:
    return {"frames": b"", "frames_shape": [], "frame_indices": [], "timestamps": [], "fps": 0.0,
            "num_frames_total": 0}


class TokenizeStage:
    """GPU (or CPU): the model's visual tokens, merged by STTM, written to the store.

    Loads the model's vision side once per worker and refuses to start if its weights
    differ from the ones the job's config fingerprint was computed from.
    """

    def __init__(self, store_url: str, storage_options: dict, model: str, device: str, dtype: str | None,
                 sttm_options: dict, sampling: dict, encoder_fingerprint: str, config_fingerprint: str, run_id: str,
                 recycle_after: int | None = None, merge_layer: int = 0, llm_fingerprint: str | None = None):
        self.lifetime = WorkerLifetime(recycle_after)
        self.adapter = load_adapter(model, device=device, dtype=getattr(torch, dtype) if dtype else None)
        if self.adapter.fingerprint != encoder_fingerprint:
            raise RuntimeError(f"model {model} on this worker has fingerprint {self.adapter.fingerprint}, the job "
                               f"was planned with {encoder_fingerprint}: the checkpoint changed or differs per node")
        # Merge layer k > 0: the LLM's embedding and first k layers too (pipeline.merge_layer).
        self.layer_prefix = None
        if merge_layer:
            self.layer_prefix = LayerPrefix(model, resolve_model(model), merge_layer, device=device,
                                            dtype=getattr(torch, dtype) if dtype else None)
            if self.layer_prefix.fingerprint != llm_fingerprint:
                raise RuntimeError(f"model {model} on this worker has LLM layers 0..{merge_layer - 1} of fingerprint "
                                   f"{self.layer_prefix.fingerprint}, the job was planned with {llm_fingerprint}")
        self.store = TokenStore(store_url, storage_options)
        self.model = model
        self.sttm_options = sttm_options
        self.sampling = sampling
        self.config_fingerprint = config_fingerprint
        self.run_id = run_id

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.lifetime.before_batch()
        return rows_to_batch([self.tokenize_one(row) for row in batch_to_rows(batch)])

    def merge(self, tokens: torch.Tensor) -> sttm.TokenSet:
        options = dict(self.sttm_options)
        budget = options.pop("budget", None)
        if budget is not None:
            return sttm.merge_to_budget(tokens, budget, **options)
        return sttm.merge(tokens, **options)

    def tokenize_one(self, row: dict[str, Any]) -> dict[str, Any]:
        video_id, uri = row["video_id"], row["uri"]
        if row["status"] != "decoded":
            return {column: row[column] for column in RESULT_COLUMNS}
        started = time.perf_counter()
        shape = row["frames_shape"]
        frames = torch.from_numpy(np.frombuffer(row["frames"], dtype=np.uint8).reshape(shape).copy())
        video = DecodedVideo(uri=uri, frames=frames, frame_indices=row["frame_indices"],
                             timestamps=row["timestamps"], fps=row["fps"],
                             num_frames_total=row["num_frames_total"], content_hash=row["content_hash"])
        stage = "encode"
        try:
            encoded = self.adapter.encode(video)
            stage = "merge"
            layer_fields, deepstack = {}, None
            if self.layer_prefix is None:
                tokens = self.merge(encoded.tokens)
                if encoded.deepstack is not None:
                    deepstack = merge_beside(encoded.tokens, encoded.deepstack, tokens).cpu()
            else:  # merged inside the LLM, entering decoder layer k
                states = self.layer_prefix(encoded, self.merge)
                tokens = states.tokens
                layer_fields = dict(merge_layer=self.layer_prefix.merge_layer, llm_fingerprint=self.layer_prefix.fingerprint,
                                    prefix_text_ids=states.text_before_video, prefix_states=states.prefix_states.cpu(),
                                    layer_kv=states.layer_kv.cpu())
            tokens = tokens.to("cpu")
            stage = "store"
            record = StoredTokenSet(
                video_id=video_id, source_uri=uri, content_hash=video.content_hash, model_id=self.model,
                model_revision=None, encoder_fingerprint=self.adapter.fingerprint,
                config_fingerprint=self.config_fingerprint, sampling=self.sampling,
                frame_indices=video.frame_indices, timestamps=video.timestamps, model_extra=encoded.model_extra,
                tokens=tokens, pipeline_version=PIPELINE_VERSION, run_id=self.run_id, deepstack=deepstack,
                **layer_fields)
            written = self.store.put(record)
        except Exception as error:  # one bad video (or one failed store request) must not stop the job
            logger.exception("video %s failed at %s", video_id, stage)
            return failed_row(video_id, uri, stage, error, content_hash=video.content_hash,
                              seconds=row["seconds"] + time.perf_counter() - started)
        return result_row(
            video_id, uri, "stored", key=written.key, content_hash=video.content_hash, num_tokens=tokens.num_tokens,
            original_tokens=record.original_tokens, bytes=written.bytes_written, tau_s=tokens.tau_s,
            tau_t=tokens.tau_t, seconds=row["seconds"] + time.perf_counter() - started,
            repaired=bool(row.get("repaired")) or written.repaired)


def sampling_dict(policy: SamplingPolicy) -> dict[str, Any]:
    """A policy as a JSON-able dict naming its class (part of the config fingerprint)."""
    return {"policy": type(policy).__name__, **asdict(policy)}
