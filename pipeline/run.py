"""The preprocessing job on Ray Data: inputs -> decode (CPU tasks) -> tokenize (actor pool,
one GPU each where GPUs exist) -> result rows -> failure records, run manifest, summary.

Exactly once: every input ends as exactly one of ``stored``, ``skipped`` (its token set
is already in the store under the same config fingerprint) or ``failed`` (with the error,
also written as a failure record). Ray Data retries the work of lost workers and nodes;
token set keys are content-addressed and writes are atomic, so a retried or resumed
video is never stored twice. A killed job is resumed by running it again: what it stored
is skipped.
"""
from __future__ import annotations

import logging
import os
import statistics
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import ray

from pipeline.config import CPUS_PER_GPU_WORKER, PreprocessConfig
from pipeline.decode import fetch_video
from pipeline.errors import VideoError
from pipeline.fingerprint import config_fingerprint, encoder_facts, sampling_policy_from_dict
from pipeline.inputs import VideoInput, list_inputs
from pipeline.progress import Progress
from pipeline.stages import (
    PIPELINE_VERSION,
    DecodeStage,
    TokenizeStage,
    plain_value,
    failed_row,
    result_row,
    sampling_dict,
)
from pipeline.store import FailureRecord, ManifestEntry, RunManifest, TokenStore, token_set_key

logger = logging.getLogger(__name__)

class DuplicateVideoIdError(ValueError):
    """Two inputs of one job share a video id; the first one is processed."""


class LostVideoError(RuntimeError):
    """The job finished without a result for this video (should not happen; recorded so
    that nothing is lost silently)."""


@dataclass
class RunSummary:
    """What a run did, printed and written with the run manifest."""

    run_id: str
    stored: int
    skipped: int
    failed: int
    inputs: int
    bytes_written: int
    seconds: float
    retention: dict[str, float]
    failures: list[dict[str, str]] = field(default_factory=list)
    store: str = ""
    config_fingerprint: str = ""

    @property
    def failure_rate(self) -> float:
        return self.failed / self.inputs if self.inputs else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id, "store": self.store, "config_fingerprint": self.config_fingerprint,
            "inputs": self.inputs, "stored": self.stored, "skipped": self.skipped, "failed": self.failed,
            "failure_rate": round(self.failure_rate, 6), "bytes_written": self.bytes_written,
            "seconds": round(self.seconds, 3),
            "videos_per_minute": round(60 * (self.stored + self.skipped) / self.seconds, 3) if self.seconds else 0.0,
            "retention": self.retention, "failures": self.failures,
        }

    def text(self) -> str:
        d = self.to_dict()
        lines = [
            f"run {d['run_id']} -> {d['store']}",
            f"  inputs {d['inputs']}: stored {d['stored']}, skipped {d['skipped']}, failed {d['failed']}",
            f"  bytes written {d['bytes_written']:,}, {d['seconds']} s, {d['videos_per_minute']} videos/min",
        ]
        if self.retention:
            r = self.retention
            lines.append(f"  retention min {r['min']:.3f} median {r['median']:.3f} mean {r['mean']:.3f} max {r['max']:.3f}")
        lines += [f"  failed {f['video_id']} ({f['stage']}): {f['error_type']}: {f['message']}" for f in self.failures]
        return "\n".join(lines)


def make_run_id(prefix: str) -> str:
    """``<prefix>-<UTC date and time>-<random>``: sorts by time, unique, dated."""
    return f"{prefix}-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:6]}"


def _dedupe(inputs: list[VideoInput]) -> tuple[list[VideoInput], list[dict[str, Any]]]:
    """Unique inputs, and a failed row for each repeat of an earlier video id."""
    seen: set[str] = set()
    unique, repeats = [], []
    for item in inputs:
        if item.video_id in seen:
            error = DuplicateVideoIdError(f"video id {item.video_id!r} appears more than once in the input")
            repeats.append(failed_row(item.video_id, item.uri, "decode", error))
        else:
            seen.add(item.video_id)
            unique.append(item)
    return unique, repeats


def _resolve_device(config: PreprocessConfig) -> tuple[str, float]:
    """The encoder's device and the GPUs each tokenize worker asks Ray for."""
    has_gpus = ray.cluster_resources().get("GPU", 0) >= 1
    device = config.device if config.device != "auto" else ("cuda" if has_gpus else "cpu")
    return device, (1.0 if device.startswith("cuda") else 0.0)


def run_preprocess(config: PreprocessConfig, run_id: str | None = None, address: str | None = None,
                   progress: Progress | None = None) -> RunSummary:
    """Run the job on the current Ray cluster, else the one at ``address`` (see ``connect``).

    When the store already holds every input, the run is recorded without starting Ray
    or loading the model. ``progress`` is told about the run as it goes.
    """
    started_at = datetime.now(timezone.utc)
    clock = time.perf_counter()
    run_id = run_id or make_run_id(config.run_id_prefix)
    store = TokenStore(config.output, config.storage_options)
    inputs, repeats = _dedupe(list_inputs(config.input, config.storage_options))

    # The config fingerprint needs the encoder's weights fingerprint: cached by the
    # checkpoint files' identity, else computed once here on the CPU (the workers check
    # they loaded the same weights).
    encoder = encoder_facts(config.model)
    policy = config.sampling_policy() or sampling_policy_from_dict(encoder.default_sampling)
    sampling = sampling_dict(policy)
    encoder_fingerprint, model_frame_size = encoder.fingerprint, encoder.input_frame_size
    fingerprint = config_fingerprint(model_id=config.model, model_revision=None,
                                     encoder_fingerprint=encoder_fingerprint, sampling=sampling,
                                     sttm=config.sttm_options())

    if progress is not None:
        progress.phase("checking what the store holds")
    already_stored = _stored_before_ray(store, inputs, fingerprint, config.storage_options)
    if already_stored is not None:  # nothing to do: no Ray, no model
        return _record(store, config, run_id, fingerprint, started_at, repeats + already_stored,
                       seconds=time.perf_counter() - clock)

    if progress is not None:
        progress.phase("starting Ray" if address is None and not ray.is_initialized() else "joining Ray")
    connect(address)  # no-op when the caller already joined a cluster
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = config.progress
    context.execution_options.preserve_order = False
    device, gpus = _resolve_device(config)

    rows = list(repeats)
    if inputs:
        dataset = ray.data.from_items([{"video_id": i.video_id, "uri": i.uri} for i in inputs],
                                      override_num_blocks=len(inputs))
        # Decoding runs in its own pool of CPU actors (an actor pool is never fused into
        # the next stage, so decode keeps its own cores and overlaps with encoding).
        decode_workers = config.decode_concurrency or _decode_workers(config, gpus)
        dataset = dataset.map_batches(
            DecodeStage, batch_size=1, batch_format="numpy", num_cpus=1,
            fn_constructor_kwargs=dict(store_url=config.output, storage_options=config.storage_options,
                                       policy=policy, config_fingerprint=fingerprint,
                                       model_frame_size=model_frame_size),
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=decode_workers))
        dataset = dataset.map_batches(
            TokenizeStage, batch_size=1, batch_format="numpy",
            fn_constructor_kwargs=dict(store_url=config.output, storage_options=config.storage_options,
                                       model=config.model, device=device, dtype=config.dtype,
                                       sttm_options=config.sttm_options(), sampling=sampling,
                                       encoder_fingerprint=encoder_fingerprint, config_fingerprint=fingerprint,
                                       run_id=run_id),
            # Elastic down to one actor: a cluster that loses nodes keeps going with what is left.
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=config.encode_workers), num_gpus=gpus,
            num_cpus=config.cpus_per_encode_worker)
        if progress is not None:
            progress.start(len(inputs) + len(repeats), failed=len(repeats))
        rows += _first_result_per_video(_reported(dataset.iter_rows(), progress))

    rows += _lost(inputs, rows)
    return _record(store, config, run_id, fingerprint, started_at, rows, seconds=time.perf_counter() - clock)


# The most the driver reads to find every input already stored before it starts Ray
# (hashing is what proves a video unchanged); a larger corpus is checked by the decode
# actors, in parallel, as before.
PRE_RAY_CHECK_MAX_BYTES = 2 * 2**30
PRE_RAY_CHECK_MAX_VIDEOS = 10_000


def _stored_before_ray(store: TokenStore, inputs: list[VideoInput], fingerprint: str,
                       storage_options: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The result rows of a run over ``inputs`` when it would decode nothing: each input
    ``skipped`` (the store holds it under ``fingerprint``, by the decode stage's own test:
    content hash, token set and index entry) or ``failed`` (missing or empty, as the decode
    stage would record it). None as soon as one video needs decoding, or the check would
    read too much."""
    if not inputs or len(inputs) > PRE_RAY_CHECK_MAX_VIDEOS:
        return None
    rows, bytes_read = [], 0
    for item in inputs:
        try:
            fetched = fetch_video(item.uri, storage_options)
        except VideoError as error:  # missing or empty: failed as the decode stage fails it
            rows.append(failed_row(item.video_id, item.uri, "decode", error))
            continue
        source = fetched.source
        bytes_read += len(source) if isinstance(source, bytes) else os.path.getsize(source)
        if bytes_read > PRE_RAY_CHECK_MAX_BYTES or not store.exists(fetched.content_hash, fingerprint, item.video_id):
            return None
        rows.append(result_row(item.video_id, item.uri, "skipped", bytes=0, content_hash=fetched.content_hash,
                               key=token_set_key(fetched.content_hash, fingerprint)))
    return rows


def _reported(rows, progress: Progress | None):
    """``rows`` unchanged, each also told to ``progress``."""
    for row in rows:
        if progress is not None:
            progress.result(row["video_id"], row["status"], f"{row['error_type']}: {row['message']}")
        yield row


def _decode_workers(config: PreprocessConfig, gpus: float) -> int:
    """Decode actors: CPUS_PER_GPU_WORKER per GPU encoder (what keeps it fed), else the
    cores the encoders leave free; never more than the cluster's CPUs."""
    cpus = int(ray.cluster_resources().get("CPU", 1))
    free = max(1, cpus - int(config.encode_workers * config.cpus_per_encode_worker))
    return min(CPUS_PER_GPU_WORKER * config.encode_workers, free) if gpus else free


def _first_result_per_video(results) -> list[dict[str, Any]]:
    """Result rows as plain dicts, one per video id (a retried block cannot double one)."""
    by_video: dict[str, dict[str, Any]] = {}
    for row in results:
        by_video.setdefault(row["video_id"], {column: plain_value(value) for column, value in row.items()})
    return list(by_video.values())


def _lost(inputs: list[VideoInput], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    done = {row["video_id"] for row in rows}
    return [failed_row(i.video_id, i.uri, "decode", LostVideoError("no result came back for this video"))
            for i in inputs if i.video_id not in done]


def _record(store: TokenStore, config: PreprocessConfig, run_id: str, fingerprint: str,
            started_at: datetime, rows: list[dict[str, Any]], seconds: float) -> RunSummary:
    """Write failure records and the run manifest; summarise."""
    failures = [row for row in rows if row["status"] == "failed"]
    for row in failures:
        store.write_failure(FailureRecord(
            run_id=run_id, video_id=row["video_id"], source_uri=row["uri"], stage=row["stage"],
            error_type=row["error_type"], message=row["message"], pipeline_version=PIPELINE_VERSION,
            content_hash=row["content_hash"], config_fingerprint=fingerprint))
    store.write_manifest(RunManifest(
        run_id=run_id, pipeline_version=PIPELINE_VERSION, started_at=started_at,
        finished_at=datetime.now(timezone.utc), job_config=config.to_dict(),
        entries=[ManifestEntry(video_id=row["video_id"], source_uri=row["uri"],
                               status=row["status"], key=row["key"],
                               content_hash=row["content_hash"], config_fingerprint=fingerprint)
                 for row in sorted(rows, key=lambda r: r["video_id"])]))
    counts = Counter(row["status"] for row in rows)
    stored = [row for row in rows if row["status"] == "stored"]
    retentions = [row["num_tokens"] / row["original_tokens"] for row in stored]
    return RunSummary(
        run_id=run_id, store=store.url, config_fingerprint=fingerprint,
        inputs=len(rows), stored=counts["stored"], skipped=counts["skipped"], failed=counts["failed"],
        bytes_written=sum(row["bytes"] for row in stored), seconds=seconds,
        retention=dict(min=min(retentions), median=statistics.median(retentions),
                       mean=statistics.fmean(retentions), max=max(retentions)) if retentions else {},
        failures=[{k: row[k] for k in ("video_id", "stage", "error_type", "message")} for row in failures])


def connect(address: str | None) -> None:
    """Join the Ray cluster at ``address`` ("auto" for the one this machine belongs to);
    ``None`` starts an embedded local one."""
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or "local"
        # A cluster of this process needs no dashboard (half of a local start-up's work).
        local = {"include_dashboard": False} if address == "local" else {}
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False, **local)


def exit_code(summary: RunSummary, max_failure_rate: float) -> int:
    """Non-zero only when more videos failed than the job allows."""
    return 1 if summary.failure_rate > max_failure_rate else 0
