"""Answering a questions file as a resumable job, in this process or on a Ray cluster.

``run_query`` reads a questions file (``pipeline.query.read_questions``), drops the
questions whose answers the output file already holds, answers the rest and appends one
JSON line per question as it is answered. Each line carries the question's ``id`` (a
string) and a ``key``: what its answer depends on besides the question -- the store, the
config fingerprint, the model, its dtype and the decoding options (``QueryKey``). Running
the same command again therefore answers only what is missing: nothing is answered twice,
and what a killed run did not write is answered by the next one. Questions that cannot be
answered get an ``error`` line (malformed input line, repeated id, unknown video, token set
of another model, corrupt object, a worker that failed); a re-run tries them again and
writes an error line only when it is not already there.

Where the answers come from is the caller's choice:

- in this process: ``pipeline.query.answer_questions`` with one ``QueryEngine``;
- on Ray (``answer_on_ray``): a Ray Data pipeline over the videos, one row per video with
  all its questions. A pool of reader actors reads token sets in parallel (the next videos'
  token sets load while the model answers), and a pool of model actors
  (``AnswerStage``), one per GPU (or one CPU worker each), loads the model once and answers
  one video's questions per call. Ray Data retries the work of lost actors and nodes; a
  question answered twice by a retry is yielded once, and a question that no result came
  back for is reported, never dropped.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.fingerprint import canonical_json
from pipeline.query import Question, QuestionResult, answer_questions, prefix_reuse_timings, read_questions
from pipeline.stages import batch_to_rows, rows_to_batch
from pipeline.store import StoreError, StoredTokenSet, TokenStore
from pipeline.uris import redact_urls, sanitize_uri

logger = logging.getLogger(__name__)

# What answers a list of questions: this process's engine or the Ray pipeline.
Answerer = Callable[[list[Question]], Iterable[QuestionResult]]


@dataclass(frozen=True)
class QueryKey:
    """What an answer depends on besides its question: with the question id, the key a
    re-run looks answers up by. ``temperature`` and ``seed`` count only when sampling
    (greedy answers do not depend on them)."""

    store: str
    config_fingerprint: str | None
    model: str
    dtype: str
    max_new_tokens: int
    do_sample: bool
    temperature: float | None
    seed: int | None

    @classmethod
    def of(cls, *, store: str, config_fingerprint: str | None, model: str, dtype: str, max_new_tokens: int,
           do_sample: bool, temperature: float, seed: int | None) -> QueryKey:
        # The store as TokenStore names it (no credentials), local paths made absolute.
        store = sanitize_uri(store if "://" in store else os.path.abspath(store)).rstrip("/")
        return cls(store=store, config_fingerprint=config_fingerprint, model=model, dtype=dtype,
                   max_new_tokens=max_new_tokens, do_sample=do_sample,
                   temperature=float(temperature) if do_sample else None, seed=seed if do_sample else None)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class QueryJobSummary:
    """What ``run_query`` did.

    Attributes:
        num_questions: questions read from the file (malformed lines not counted).
        num_answered: questions answered by this run.
        num_already_answered: questions whose answers the output already held.
        problems: one ``{"line", "error"}`` per malformed input line and one ``{"id",
            "video_id", "error"}`` per question that could not be answered.
        timings: ``pipeline.query.prefix_reuse_timings`` of this run's answers plus ``wall_s``.
    """

    num_questions: int
    num_answered: int
    num_already_answered: int
    problems: list[dict[str, Any]]
    timings: dict[str, float | int]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def run_query(questions_path: str | Path, out_path: str | Path, key: QueryKey, answer: Answerer) -> QueryJobSummary:
    """Answer the questions of ``questions_path`` that ``out_path`` holds no answer for
    under ``key``, appending one line per question to ``out_path`` as results come in.

    ``answer`` is called once, with the questions still to answer (not at all when none
    is left, so a finished job loads no model). Raises ValueError when the file holds no
    question at all.
    """
    start = time.perf_counter()
    questions, input_problems = read_questions(questions_path)
    if not questions:
        details = "".join(f"\n  line {problem.line}: {problem.message}" for problem in input_problems)
        raise ValueError(f"{questions_path} holds no questions{details}")
    questions, repeated = _unique_string_ids(questions)
    key_json = key.to_json()
    answered, written_errors = read_output(out_path, canonical_json(key_json), id_field="id", answer_field="answer")
    pending = [question for question in questions if question.id not in answered]

    problems: list[dict[str, Any]] = []
    results: list[QuestionResult] = []
    with open_for_appending(out_path) as out:

        def write(record: dict[str, Any]) -> None:
            out.write(json.dumps(record | {"key": key_json}, ensure_ascii=False) + "\n")
            out.flush()

        def report(problem: dict[str, Any]) -> None:
            problems.append(problem)
            line = canonical_json(problem | {"key": key_json})
            if line not in written_errors:  # a re-run does not repeat the same report
                written_errors.add(line)
                write(problem)

        for problem in input_problems:
            report({"line": problem.line, "error": problem.message})
        for question in repeated:
            report({"id": question.id, "video_id": question.video_id,
                    "error": f"question id {question.id!r} repeats an earlier question's id; only the first is answered"})
        if pending:
            for result in answer(pending):
                if result.answer is None:
                    report({"id": result.question.id, "video_id": result.question.video_id, "error": result.error})
                    continue
                results.append(result)
                write(result.to_json())

    timings = prefix_reuse_timings(results) | {"wall_s": round(time.perf_counter() - start, 6)}
    return QueryJobSummary(len(questions) + len(repeated), len(results), len(questions) - len(pending), problems, timings)


def _unique_string_ids(questions: list[Question]) -> tuple[list[Question], list[Question]]:
    """The questions with string ids, and those whose id repeats an earlier one's (a
    resumed job could not tell their answers apart)."""
    seen: set[str] = set()
    unique, repeated = [], []
    for question in questions:
        question = dataclasses.replace(question, id=str(question.id))
        (repeated if question.id in seen else unique).append(question)
        seen.add(question.id)
    return unique, repeated


def read_output(
    out_path: str | Path, key: str, *, id_field: str, answer_field: str
) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """The rows of an existing output file answered under ``key`` (they hold a string
    ``answer_field``), by their ``id_field`` (the first row of each id), and its error rows
    as canonical JSON. A line that does not parse (the last one of a killed run, cut short)
    is skipped: its question is answered again. Shared by ``sttm query`` (``id``/``answer``)
    and ``sttm eval`` (``question_id``/``response``)."""
    answered: dict[str, dict[str, Any]] = {}
    errors: set[str] = set()
    path = Path(out_path)
    if not path.exists():
        return answered, errors
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if not isinstance(row, dict):
                continue
            if "error" in row:
                errors.add(canonical_json(row))
            elif isinstance(row.get(answer_field), str) and canonical_json(row.get("key")) == key:
                answered.setdefault(str(row.get(id_field)), row)
    return answered, errors


@contextmanager
def open_for_appending(out_path: str | Path):
    """``out_path`` opened for appending. A last line without its newline (a run killed
    while writing it) is cut off first, so the file stays one JSON object per line."""
    path = Path(out_path)
    if path.exists() and path.stat().st_size:
        with open(path, "rb+") as existing:
            existing.seek(-1, 2)
            if existing.read(1) != b"\n":  # rare: read it all to find the last newline
                existing.seek(0)
                existing.truncate(existing.read().rfind(b"\n") + 1)
    with open(path, "a", encoding="utf-8") as out:
        yield out


# ---------------------------------------------------------------------------------------
# On Ray


@contextmanager
def ray_session(address: str | None):
    """Ray for one job: the cluster at ``address``, or with none a fresh local Ray started
    for this job (never whatever cluster this machine last saw). Disconnects at the end
    when it connected; a caller already connected keeps its connection.

    Ray prints some of its messages (a task retried after its worker died, ...) to
    ``sys.stdout``; while the job runs they go to stderr, so that stdout holds only what
    the command prints (one JSON document with ``--json``).
    """
    import ray

    with redirect_stdout(sys.stderr):
        if ray.is_initialized():
            yield
            return
        ray.init(address=address or "local", logging_level=logging.WARNING, log_to_driver=False)
        try:
            yield
        finally:
            ray.shutdown()


class ReadStage:
    """Reads each video's token set from the store (a CPU actor; several run in parallel
    ahead of the model actors). A row gets the pickled ``StoredTokenSet``, or the reason it
    could not be read, and the seconds the read took."""

    def __init__(self, store_url: str, storage_options: dict[str, Any] | None, config_fingerprint: str | None):
        self.store = TokenStore(store_url, storage_options)
        self.config_fingerprint = config_fingerprint

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = batch_to_rows(batch)
        for row in rows:
            start = time.perf_counter()
            try:
                row["token_set"] = pickle.dumps(self.store.read(row["video_id"], self.config_fingerprint))
                row["read_error"] = None
            except (StoreError, ValueError) as error:  # ValueError: a video id the store refuses
                row["token_set"], row["read_error"] = None, str(error)
            except Exception as error:  # noqa: BLE001 -- e.g. storage unreachable: reported, the job goes on
                row["token_set"], row["read_error"] = None, redact_urls(
                    f"reading the token set failed: {type(error).__name__}: {error}")
            row["load_s"] = time.perf_counter() - start
        return rows_to_batch(rows)


class _ReadAhead:
    """The one token set a ``ReadStage`` read (or its error), as ``answer_questions``'s store."""

    def __init__(self, token_set: StoredTokenSet | None, error: str | None):
        self.token_set, self.error = token_set, error

    def read(self, video_id: str, config_fingerprint: str | None = None) -> StoredTokenSet:
        if self.error is not None:
            raise StoreError(self.error)
        return self.token_set


class AnswerStage:
    """A model actor: loads the model once, then answers one video's questions per row
    (``pipeline.query.answer_questions``). A row's ``results`` are its pickled
    ``QuestionResult``s; an error while answering becomes the error of the video's
    questions not yet answered, so one video never stops the job."""

    def __init__(self, model_spec: str, device: str, dtype: str | None, config_fingerprint: str | None,
                 decoding: dict[str, Any]):
        import torch

        from pipeline.query import QueryEngine

        self.engine = QueryEngine(model_spec, device=device, dtype=getattr(torch, dtype) if dtype else None)
        self.config_fingerprint = config_fingerprint
        self.decoding = decoding

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        for row in batch_to_rows(batch):
            questions: list[Question] = pickle.loads(row["questions"])
            token_set = pickle.loads(row["token_set"]) if row["token_set"] is not None else None
            store = _ReadAhead(token_set, row["read_error"])
            results: list[QuestionResult] = []
            try:
                for result in answer_questions(self.engine, store, questions, config_fingerprint=self.config_fingerprint,
                                               **self.decoding):
                    # The read happened in the reader: its time is the video's load time.
                    results.append(dataclasses.replace(result, load_s=row["load_s"]) if result.answer else result)
            except Exception as error:  # noqa: BLE001 -- reported per question, the job goes on
                done = {result.question.id for result in results}
                message = f"answering failed: {type(error).__name__}: {error}"
                results += [QuestionResult(question, error=message) for question in questions if question.id not in done]
            out.append({"video_id": row["video_id"], "results": pickle.dumps(results)})
        return rows_to_batch(out)


class LostQuestionError(RuntimeError):
    """The job finished without a result for this question (should not happen; reported
    so that nothing is lost silently)."""


def answer_on_ray(
    questions: list[Question],
    *,
    store_url: str,
    model_spec: str,
    dtype: str | None,
    device: str | None = None,
    workers: int | None = None,
    storage_options: dict[str, Any] | None = None,
    config_fingerprint: str | None = None,
    **decoding: Any,
) -> Iterator[QuestionResult]:
    """Answer ``questions`` (ids unique) on the connected Ray cluster, yielding each
    video's results as its model actor finishes them, in no particular order of videos.

    Args:
        dtype: the model's torch dtype by name (``"bfloat16"``), ``None`` for the checkpoint's.
        device: the model actors' device; default ``cuda`` when the cluster has GPUs.
        workers: model actors (at most; the pool shrinks when nodes go), one GPU each on
            ``cuda``; default one per GPU of the cluster, else 1.
        decoding: ``max_new_tokens``, ``do_sample``, ``temperature``, ``seed``.
    """
    import ray

    by_video: dict[str, list[Question]] = {}
    for question in questions:
        by_video.setdefault(question.video_id, []).append(question)
    if not by_video:
        return
    cluster_gpus = int(ray.cluster_resources().get("GPU", 0))
    device = device or ("cuda" if cluster_gpus else "cpu")
    gpus = 1.0 if device.startswith("cuda") else 0.0
    workers = workers or max(1, cluster_gpus)

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = sys.stderr.isatty()
    context.execution_options.preserve_order = False
    dataset = ray.data.from_items(
        [{"video_id": video_id, "questions": pickle.dumps(group)} for video_id, group in by_video.items()],
        override_num_blocks=len(by_video))
    # Readers in their own actor pool (an actor pool is never fused into the next stage),
    # so reads run ahead of the model actors on other cores.
    dataset = dataset.map_batches(
        ReadStage, batch_size=1, batch_format="numpy", num_cpus=1,
        fn_constructor_kwargs=dict(store_url=store_url, storage_options=storage_options,
                                   config_fingerprint=config_fingerprint),
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers))
    dataset = dataset.map_batches(
        AnswerStage, batch_size=1, batch_format="numpy", num_cpus=1, num_gpus=gpus,
        fn_constructor_kwargs=dict(model_spec=model_spec, device=device, dtype=dtype,
                                   config_fingerprint=config_fingerprint, decoding=decoding),
        # Elastic down to one actor: a cluster that loses nodes goes on with what is left.
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers))

    answered: set[str] = set()
    for row in dataset.iter_rows():
        for result in pickle.loads(row["results"]):
            if result.question.id not in answered:  # a retried video may come back twice
                answered.add(result.question.id)
                yield result
    lost = LostQuestionError("no result came back for this question")
    for question in questions:
        if question.id not in answered:
            yield QuestionResult(question, error=str(lost))
