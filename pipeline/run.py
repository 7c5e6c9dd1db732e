"""The preprocessing job on Ray Data: inputs -> decode (CPU tasks) -> tokenize (actor pool,
one GPU each where GPUs exist) -> result rows -> failure records, run manifest, summary.

Exactly once: every input ends as exactly one of ``stored``, ``skipped`` (its token set
is already in the store under the same config fingerprint) or ``failed`` (with the error,
also written as a failure record). Ray Data retries the work of lost workers and nodes;
token set keys are content-addressed and writes are atomic, so a retried or resumed
video is never stored twice. A killed job is resumed by running it again: what it stored
is skipped.

What can be checked before any video is decoded is checked first (settings, inputs and
their ids, the store reachable and writable), so a bad job fails in seconds. SIGTERM and
SIGINT stop a run cleanly: the videos not finished are recorded as failed
("interrupted") and the manifest is written. A record that cannot be written (full disk,
store unreachable) does not lose the others: the summary names what was not written.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import statistics
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterator

import fsspec
import ray

from pipeline.config import CPUS_PER_GPU_WORKER, ConfigError, PreprocessConfig, check_run_id
from pipeline.decode import fetch_video
from pipeline.errors import VideoError
from pipeline.fingerprint import config_fingerprint, encoder_facts, sampling_policy_from_dict
from pipeline.merge_layer import layers_fingerprint
from pipeline.inputs import InputError, VideoInput, list_inputs
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
from pipeline.uris import redact_urls, sanitize_uri

logger = logging.getLogger(__name__)

class DuplicateVideoIdError(ValueError):
    """Two inputs of one job share a video id; the first one is processed."""


class LostVideoError(RuntimeError):
    """The job finished without a result for this video (should not happen; recorded so
    that nothing is lost silently)."""


class RunInterrupted(BaseException):
    """SIGTERM or SIGINT arrived during the run; ``signal_name`` says which. A
    BaseException, like KeyboardInterrupt, so that no ``except Exception`` on the way
    (Ray Data's included) takes it for an error of its own."""

    def __init__(self, signum: int):
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"the run was interrupted by {self.signal_name} before this video finished")


class StoreUnavailableError(RuntimeError):
    """The token store cannot be reached or written; checked before the run starts."""


class RayUnavailableError(RuntimeError):
    """The Ray cluster could not be started or joined."""


# What run_preprocess raises before any work: the job did not start.
NotStartedError = (ConfigError, InputError, StoreUnavailableError, RayUnavailableError)

# Exit codes of `sttm preprocess` and `python -m jobs.preprocess` (README "Failure handling").
EXIT_OK = 0
EXIT_TOO_MANY_FAILED = 1  # more videos failed than --max-failure-rate allows
EXIT_NOT_STARTED = 2  # bad settings, inputs or store: nothing was run
EXIT_RECORDS_NOT_WRITTEN = 3  # the run finished but its manifest or a failure record was not written
# 128 + the signal's number (130 SIGINT, 143 SIGTERM): interrupted, manifest written.


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
    repaired: int = 0  # of the stored: had a token set or index entry that failed its checks
    interrupted_by: str | None = None  # the signal's name when SIGTERM/SIGINT stopped the run
    unwritten_records: list[str] = field(default_factory=list)  # records the store refused, and why

    @property
    def failure_rate(self) -> float:
        return self.failed / self.inputs if self.inputs else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id, "store": self.store, "config_fingerprint": self.config_fingerprint,
            "inputs": self.inputs, "stored": self.stored, "skipped": self.skipped, "failed": self.failed,
            "repaired": self.repaired, "failure_rate": round(self.failure_rate, 6), "bytes_written": self.bytes_written,
            "seconds": round(self.seconds, 3),
            "videos_per_minute": round(60 * (self.stored + self.skipped) / self.seconds, 3) if self.seconds else 0.0,
            "retention": self.retention, "failures": self.failures,
            "interrupted_by": self.interrupted_by, "unwritten_records": self.unwritten_records,
        }

    def text(self) -> str:
        d = self.to_dict()
        lines = [
            f"run {d['run_id']} -> {d['store']}",
            f"  inputs {d['inputs']}: stored {d['stored']}, skipped {d['skipped']}, failed {d['failed']}"
            + (f" (repaired {d['repaired']} of the stored)" if d["repaired"] else ""),
            f"  bytes written {d['bytes_written']:,}, {d['seconds']} s, {d['videos_per_minute']} videos/min",
        ]
        if self.retention:
            r = self.retention
            lines.append(f"  retention min {r['min']:.3f} median {r['median']:.3f} mean {r['mean']:.3f} max {r['max']:.3f}")
        lines += [f"  failed {f['video_id']} ({f['stage']}): {f['error_type']}: {f['message']}" for f in self.failures]
        if self.interrupted_by:
            lines.append(f"  interrupted by {self.interrupted_by}: unfinished videos recorded as failed")
        lines += [f"  NOT WRITTEN: {problem}" for problem in self.unwritten_records]
        return "\n".join(lines)


def make_run_id(prefix: str) -> str:
    """``<prefix>-<UTC date and time>-<random>``: sorts by time, unique, dated."""
    return f"{prefix}-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:6]}"


def check_store_writable(url: str, storage_options: dict[str, Any]) -> None:
    """Write and delete a small probe object under the store (the bucket must exist, the
    credentials must allow writes), so that a bad store fails the job before any work."""
    try:
        fs, root = fsspec.core.url_to_fs(url, **storage_options)
        probe = f"{root.rstrip('/')}/.write-check-{uuid.uuid4().hex}"
        fs.makedirs(root, exist_ok=True)
        fs.pipe_file(probe, b"sttm write check")
        fs.rm_file(probe)
    except Exception as error:  # s3fs and botocore raise more than OSError
        raise StoreUnavailableError(
            f"token store {sanitize_uri(url)} cannot be written: {type(error).__name__}: "
            f"{redact_urls(str(error))}") from None


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

    Raises NotStartedError before Ray starts when the run id, the inputs or the store are
    not usable; after that, every outcome is a record (see the module docstring). When the
    store already holds every input, the run is recorded without starting Ray or loading
    the model. ``progress`` is told about the run as it goes.
    """
    started_at = datetime.now(timezone.utc)
    clock = time.perf_counter()
    run_id = run_id or make_run_id(config.run_id_prefix)
    check_run_id(run_id)
    inputs, repeats = _dedupe(list_inputs(config.input, config.storage_options))
    check_store_writable(config.output, config.storage_options)
    store = TokenStore(config.output, config.storage_options)

    # The config fingerprint needs the encoder's weights fingerprint: cached by the
    # checkpoint files' identity, else computed once here on the CPU (the workers check
    # they loaded the same weights).
    encoder = encoder_facts(config.model)
    policy = config.sampling_policy() or sampling_policy_from_dict(encoder.default_sampling)
    sampling = sampling_dict(policy)
    encoder_fingerprint, model_frame_size = encoder.fingerprint, encoder.input_frame_size
    # At merge layer k > 0 the tokens also depend on the LLM's embedding and first k layers.
    llm_fingerprint = layers_fingerprint(config.model, config.merge_layer, config.dtype) if config.merge_layer else None
    fingerprint = config_fingerprint(model_id=config.model, model_revision=None,
                                     encoder_fingerprint=encoder_fingerprint, sampling=sampling,
                                     sttm=config.sttm_options(), merge_layer=config.merge_layer,
                                     llm_fingerprint=llm_fingerprint)

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

    results: dict[str, dict[str, Any]] = {}  # video id -> its result row, as they come back
    with _SignalStop() as stop:
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
                                           model_frame_size=model_frame_size,
                                           recycle_after=config.recycle_workers_after),
                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=decode_workers))
            dataset = dataset.map_batches(
                TokenizeStage, batch_size=1, batch_format="numpy",
                fn_constructor_kwargs=dict(store_url=config.output, storage_options=config.storage_options,
                                           model=config.model, device=device, dtype=config.dtype,
                                           sttm_options=config.sttm_options(), sampling=sampling,
                                           encoder_fingerprint=encoder_fingerprint, config_fingerprint=fingerprint,
                                           run_id=run_id, recycle_after=config.recycle_workers_after,
                                           merge_layer=config.merge_layer, llm_fingerprint=llm_fingerprint),
                # Elastic down to one actor: a cluster that loses nodes keeps going with what is left.
                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=config.encode_workers), num_gpus=gpus,
                num_cpus=config.cpus_per_encode_worker)
            if progress is not None:
                progress.start(len(inputs) + len(repeats), failed=len(repeats))
            try:
                _collect_first_result_per_video(_reported(dataset.iter_rows(), progress), results)
            except RunInterrupted as signalled:
                logger.warning("%s: recording the run; %d of %d videos finished", signalled.signal_name,
                               len(results), len(inputs))
        stop.collecting = False  # from here on a signal is only noted: the run gets recorded

        rows = repeats + list(results.values())
        rows += _unfinished(inputs, results, stop.interruption)
        summary = _record(store, config, run_id, fingerprint, started_at, rows,
                          seconds=time.perf_counter() - clock)
    summary.interrupted_by = stop.interruption.signal_name if stop.interruption else None
    return summary


class _SignalStop:
    """SIGTERM and SIGINT during a run. The first one raises RunInterrupted while results
    are being collected; after that, signals are only noted, so that the run still gets
    recorded. The previous handlers come back on exit. Handlers can only be set in the
    main thread; elsewhere (a run in a thread) signals are left alone."""

    def __init__(self):
        self.collecting = True
        self.interruption: RunInterrupted | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_SignalStop":
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.interruption is None:
            self.interruption = RunInterrupted(signum)
            if self.collecting:
                raise self.interruption


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
        except Exception:  # anything else is the decode stage's to record, video by video
            return None
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


def _collect_first_result_per_video(rows, by_video: dict[str, dict[str, Any]]) -> None:
    """Result rows as plain dicts into ``by_video``, one per video id (a retried block
    cannot double one); filled as rows come, so an interrupted run keeps what finished."""
    for row in rows:
        by_video.setdefault(row["video_id"], {column: plain_value(value) for column, value in row.items()})


def _unfinished(inputs: list[VideoInput], results: dict[str, dict[str, Any]],
                interrupted: RunInterrupted | None) -> list[dict[str, Any]]:
    """A failed row for each input without a result: interrupted, or (should not happen) lost."""
    error = interrupted or LostVideoError("no result came back for this video")
    return [failed_row(i.video_id, i.uri, "decode", error) for i in inputs if i.video_id not in results]


def _record(store: TokenStore, config: PreprocessConfig, run_id: str, fingerprint: str,
            started_at: datetime, rows: list[dict[str, Any]], seconds: float) -> RunSummary:
    """Write failure records and the run manifest; summarise. A record the store refuses
    (full disk, store unreachable: any exception) is named in ``unwritten_records``
    instead of ending the run without its summary."""
    unwritten = []
    failures = [row for row in rows if row["status"] == "failed"]
    occurrences: Counter[str] = Counter()
    for row in failures:
        occurrence = occurrences[row["video_id"]]  # a repeated id keeps every record
        occurrences[row["video_id"]] += 1
        unwritten += _try_write(f"failure record of video {row['video_id']!r}", store.write_failure, FailureRecord(
            run_id=run_id, video_id=row["video_id"], source_uri=row["uri"], stage=row["stage"],
            error_type=row["error_type"], message=row["message"], pipeline_version=PIPELINE_VERSION,
            content_hash=row["content_hash"], config_fingerprint=fingerprint), occurrence=occurrence)
    unwritten += _try_write(f"run manifest {run_id}", store.write_manifest, RunManifest(
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
        repaired=sum(bool(row.get("repaired")) for row in stored),
        retention=dict(min=min(retentions), median=statistics.median(retentions),
                       mean=statistics.fmean(retentions), max=max(retentions)) if retentions else {},
        failures=[{k: row[k] for k in ("video_id", "stage", "error_type", "message")} for row in failures],
        unwritten_records=unwritten)


def _try_write(what: str, write, *args, **kwargs) -> list[str]:
    """``[]`` when ``write(*args, **kwargs)`` succeeds, else one line saying what was not
    written and why (also logged)."""
    try:
        write(*args, **kwargs)
    except Exception as error:  # botocore's errors are not OSErrors; any failure is reported
        problem = f"{what}: {type(error).__name__}: {redact_urls(str(error))[:500]}"
        logger.error("not written: %s", problem)
        return [problem]
    return []


def connect(address: str | None) -> None:
    """Join the Ray cluster at ``address`` ("auto" for the one this machine belongs to).
    ``None`` means ``RAY_ADDRESS`` when set, else a fresh local cluster of this process:
    never whatever cluster this machine happened to start last (Ray's own default)."""
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or "local"
        # A cluster of this process needs no dashboard (half of a local start-up's work).
        local = {"include_dashboard": False} if address == "local" else {}
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False, **local)
        except Exception as error:  # Ray raises bare Exceptions, ConnectionErrors, ValueErrors
            what = "a local Ray cluster could not be started" if address == "local" else \
                f"the Ray cluster at {redact_urls(address)!r} could not be joined"
            raise RayUnavailableError(f"{what}: {type(error).__name__}: {redact_urls(str(error))}") from None


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[Any]:
    """Send everything written to file descriptor 1 (Ray's C++ and worker-death lines
    included) to stderr while the job runs; yields a text stream on the real stdout, so
    that ``--json`` prints exactly one JSON document there."""
    sys.stdout.flush()
    real_stdout = os.dup(1)
    os.dup2(2, 1)
    try:
        if _file_descriptor(sys.stdout) == 1:
            with os.fdopen(os.dup(real_stdout), "w", encoding="utf-8", closefd=True) as out:
                yield out
                out.flush()
        else:  # stdout captured in Python (click's CliRunner, an embedding program): the caller's own
            yield sys.stdout
    finally:
        sys.stdout.flush()
        os.dup2(real_stdout, 1)
        os.close(real_stdout)


def _file_descriptor(stream: Any) -> int | None:
    """The file descriptor behind ``stream``, None when it has none."""
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return None


def exit_code(summary: RunSummary, max_failure_rate: float) -> int:
    """The process exit code of a run (the EXIT_* constants; 128 + N after signal N)."""
    if summary.interrupted_by:
        return 128 + signal.Signals[summary.interrupted_by].value
    if summary.unwritten_records:
        return EXIT_RECORDS_NOT_WRITTEN
    return EXIT_TOO_MANY_FAILED if summary.failure_rate > max_failure_rate else EXIT_OK
