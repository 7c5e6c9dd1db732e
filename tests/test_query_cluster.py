"""``sttm query`` / ``sttm eval`` on Ray (``pipeline.query_job``): the same answers as in
one process, resumable, nothing lost or doubled when a node dies, every bad input
reported. Real Ray (a two-node ``ray.cluster_utils.Cluster``), a tiny random
LLaVA-OneVision, float32, CPU."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from ray._common.utils import get_ray_address_file

from conftest import worker_node
from pipeline.cli import main
from pipeline.models import load_adapter, resolve_model
from pipeline.query_job import QueryKey
from pipeline.store import TokenStore
from query_setup import decode_sample, stored_token_set, with_features

MODEL = "tiny-random:llava-onevision"
VIDEOS = 12
QUESTIONS = ("What is happening in this video?", "Describe the video in detail, frame by frame.")
DECODING = dict(max_new_tokens=6, do_sample=False, temperature=1.0, seed=None)


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory):
    """The tiny model, built into a cache of this module's own (Ray workers build it into
    theirs: the build is reproducible, so its encoder fingerprint is the same)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STTM_CACHE", str(tmp_path_factory.mktemp("sttm-cache")))
        resolve_model(MODEL)
        yield


@pytest.fixture(scope="module")
def store(tmp_path_factory, model_cache):
    """``v00`` .. ``v11`` (two clips' token sets, shared between ids), ``other-model``
    (hidden size halved) and ``corrupt`` (its object cut in half)."""
    adapter = load_adapter(MODEL, dtype=torch.float32)
    store = TokenStore(str(tmp_path_factory.mktemp("store")))
    clips = [stored_token_set(adapter, decode_sample("llava-onevision", name), "clip", retention=0.5)
             for name in ("bigbuckbunny.mp4", "bikes.mp4")]
    for index in range(VIDEOS):
        store.write(dataclasses.replace(clips[index % 2], video_id=f"v{index:02d}"))
    bunny = clips[0]
    store.write(dataclasses.replace(with_features(bunny, bunny.tokens.features[:, :16].contiguous()),
                                    video_id="other-model", content_hash="sha256:" + "1" * 64))
    key = store.write(dataclasses.replace(bunny, video_id="corrupt", content_hash="sha256:" + "2" * 64))
    corrupt = Path(store.url) / key
    corrupt.write_bytes(corrupt.read_bytes()[: corrupt.stat().st_size // 2])
    return store


@pytest.fixture(scope="module")
def questions_path(tmp_path_factory):
    """Two questions per video, then one of each kind of bad input."""
    lines = [json.dumps({"id": f"v{index:02d}-{number}", "video_id": f"v{index:02d}", "question": question})
             for index in range(VIDEOS) for number, question in enumerate(QUESTIONS)]
    lines += [
        "{not json",
        json.dumps({"id": "unknown", "video_id": "no-such-video", "question": QUESTIONS[0]}),
        json.dumps({"id": "other", "video_id": "other-model", "question": QUESTIONS[0]}),
        json.dumps({"id": "corrupt", "video_id": "corrupt", "question": QUESTIONS[0]}),
        json.dumps({"id": "v00-0", "video_id": "v01", "question": QUESTIONS[1]}),  # repeated id
        json.dumps({"video_id": "v03", "question": QUESTIONS[0]}),  # id 30: its line number
    ]
    path = tmp_path_factory.mktemp("questions") / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


ANSWERED_IDS = {f"v{index:02d}-{number}" for index in range(VIDEOS) for number in range(len(QUESTIONS))} | {"30"}
FAILED_IDS = {"unknown", "other", "corrupt", "v00-0"}


def query_args(store, questions_path, out_path, *extra):
    return ["query", store.url, "--model", MODEL, "--dtype", "float32", "--questions", str(questions_path),
            "--out", str(out_path), "--max-new-tokens", str(DECODING["max_new_tokens"]), "--json", *extra]


def run_cli(args):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output  # the bad inputs
    return json.loads(result.stdout)  # exactly one JSON document


def output_lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def answers_by_id(path):
    """``{id: (answer, tokens)}`` of an output file, checking no id is answered twice."""
    answers = [line for line in output_lines(path) if "answer" in line]
    by_id = {line["id"]: (line["answer"], line["num_generated_tokens"]) for line in answers}
    assert len(by_id) == len(answers), "a question was answered twice"
    return by_id


@contextlib.contextmanager
def one_thread():
    """Ray's CPU workers run torch on one thread (OMP_NUM_THREADS=1): the reference run
    does too, so that float32 sums are the same and greedy near-ties break the same way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def local_run(store, questions_path, tmp_path_factory):
    """The in-process run everything else is compared with: its summary and output."""
    out_path = tmp_path_factory.mktemp("local") / "answers.jsonl"
    with one_thread():
        summary = run_cli(query_args(store, questions_path, out_path))
    return summary, out_path


def test_local_run_answers_good_questions_and_reports_each_bad_input(local_run, store):
    summary, out_path = local_run
    assert answers_by_id(out_path).keys() == ANSWERED_IDS
    assert (summary["num_questions"], summary["num_answered"], summary["num_already_answered"]) == (
        len(ANSWERED_IDS) + len(FAILED_IDS), len(ANSWERED_IDS), 0)
    problems = {problem.get("id", problem.get("line")): problem["error"] for problem in summary["problems"]}
    assert set(problems) == FAILED_IDS | {25}
    assert "not valid JSON" in problems[25]
    assert "no token set for video id 'no-such-video'" in problems["unknown"]
    assert "16 channels" in problems["other"]
    assert "corrupt" in problems["corrupt"].lower() or "bytes" in problems["corrupt"]
    assert "repeats an earlier question's id" in problems["v00-0"]
    # Each problem is in the output too, with the key of the run.
    errors = [line for line in output_lines(out_path) if "error" in line]
    assert {line.get("id", line.get("line")): line["error"] for line in errors} == problems
    key = QueryKey.of(store=store.url, config_fingerprint=None, model=MODEL, dtype="float32", **DECODING).to_json()
    assert all(line["key"] == key for line in output_lines(out_path))
    assert all(isinstance(line["id"], str) for line in output_lines(out_path) if "id" in line)


def test_rerun_answers_nothing_twice_and_other_options_answer_again(local_run, store, questions_path, tmp_path):
    _, reference = local_run
    out_path = tmp_path / "answers.jsonl"
    out_path.write_bytes(reference.read_bytes())
    summary = run_cli(query_args(store, questions_path, out_path))
    assert (summary["num_answered"], summary["num_already_answered"]) == (0, len(ANSWERED_IDS))
    assert out_path.read_bytes() == reference.read_bytes()  # not a line added: the problems are there already

    # A run killed mid-line: the cut answer is answered again, the others are kept.
    lines = reference.read_text().splitlines(keepends=True)
    cut = next(i for i, line in enumerate(lines) if '"answer"' in line)
    out_path.write_text("".join(lines[:cut]) + lines[cut][:40])
    summary = run_cli(query_args(store, questions_path, out_path))
    assert summary["num_answered"] == len(ANSWERED_IDS) - sum('"answer"' in line for line in lines[:cut])
    assert answers_by_id(out_path) == answers_by_id(reference)

    # Other decoding options are another key: all answered again, into the same file.
    summary = run_cli(query_args(store, questions_path, out_path)[:-1] + ["--max-new-tokens", "2", "--json"])
    assert summary["num_answered"] == len(ANSWERED_IDS)
    keyed = [line for line in output_lines(out_path) if "answer" in line and line["key"]["max_new_tokens"] == 2]
    assert {line["id"] for line in keyed} == ANSWERED_IDS


def problems_by_input(summary):
    return {problem.get("id", problem.get("line")): problem["error"] for problem in summary["problems"]}


def benchmark_path(tmp_path):
    """A Video-MME-format benchmark over the first videos, and one record of an unknown video."""
    options = ["A. A rabbit.", "B. Bikes.", "C. A car.", "D. Nothing."]
    records = [{"videoID": f"v{index:02d}", "question_id": f"{index:03d}-1", "question": "What is in the video?",
                "options": options, "answer": "AB"[index % 2], "duration": "short"} for index in range(4)]
    records.append({"videoID": "no-such-video", "question_id": "999-1", "question": "?", "options": options,
                    "answer": "A"})
    path = tmp_path / "benchmark.json"
    path.write_text(json.dumps(records))
    return path


def eval_rows(store, benchmark, out_path, *extra):
    result = CliRunner().invoke(main, ["eval", store.url, "--model", MODEL, "--dtype", "float32", "--benchmark",
                                       str(benchmark), "--out", str(out_path), "--json", *extra])
    assert result.exit_code == 1, result.output  # the unknown video
    return json.loads(result.stdout), read_eval_rows(out_path)


def read_eval_rows(out_path):
    return {row["question_id"]: {key: row.get(key) for key in ("response", "predicted", "correct", "error")}
            for row in output_lines(out_path)}


def test_on_a_two_node_cluster_losing_a_node_mid_run_loses_and_doubles_nothing(local_run, store, questions_path,
                                                                             local_ray, tmp_path):
    local_summary, reference = local_run
    out_path = tmp_path / "answers.jsonl"
    args = query_args(store, questions_path, out_path, "--workers", "2")

    def answered():
        return out_path.exists() and '"answer"' in out_path.read_text()

    # The session's cluster (a head of 2 CPUs; this process is connected to it, so the
    # command, in a thread, uses this connection and keeps it) and a worker node of 2 CPUs.
    cluster = local_ray
    with worker_node(cluster, num_cpus=2) as worker:
        args += ["--address", cluster.address]
        outcome = {}

        def first_run():
            try:
                outcome["summary"] = run_cli(args)
            except BaseException as error:  # shown by the assertion below
                outcome["error"] = error

        job = threading.Thread(target=first_run)
        job.start()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not answered():
            time.sleep(0.02)
        assert job.is_alive(), "the job ended before the node could be removed"
        cluster.remove_node(worker)
        job.join(timeout=600)
        assert not job.is_alive()
        assert "summary" in outcome, repr(outcome.get("error"))
        first = outcome["summary"]
        second = run_cli(args)  # answers what the first run could not, if anything
        written = out_path.read_bytes()
        third = run_cli(args)

    # The same answers as in one process, each once; every bad input reported as there.
    assert answers_by_id(out_path) == answers_by_id(reference)
    assert problems_by_input(second) == problems_by_input(local_summary)
    lost = problems_by_input(first).keys() - problems_by_input(local_summary).keys()
    assert all("no result came back" in problems_by_input(first)[id_] for id_ in lost)
    assert first["num_answered"] + len(lost) == len(ANSWERED_IDS), first
    assert (second["num_answered"], second["num_already_answered"]) == (len(lost), first["num_answered"])
    assert (third["num_answered"], third["num_already_answered"]) == (0, len(ANSWERED_IDS))
    assert out_path.read_bytes() == written  # the third run wrote nothing


def test_eval_on_an_embedded_local_ray_matches_the_local_run(store, tmp_path):
    benchmark = benchmark_path(tmp_path)
    with one_thread():
        local_summary, local_rows = eval_rows(store, benchmark, tmp_path / "local.jsonl")
    out_path = tmp_path / "ray.jsonl"
    # As a killed earlier run left it: two answers written, the third cut short. The run
    # on Ray answers the rest only, and scores all.
    local_lines = (tmp_path / "local.jsonl").read_text().splitlines()
    out_path.write_text("\n".join(local_lines[:2]) + "\n" + local_lines[2][:40])
    # The real command in its own process (its stdout is the real one), with a Ray temp
    # dir of its own that names a dead cluster as the machine's last: a plain ray.init()
    # would try to join it; the command must start its own.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rq", dir="/tmp"))  # short: Ray's socket paths have a length limit
    try:
        address_file = Path(get_ray_address_file(str(ray_tmp / "ray")))
        address_file.parent.mkdir()
        address_file.write_text("127.0.0.1:9")
        command = [sys.executable, "-m", "pipeline.cli", "eval", store.url, "--model", MODEL, "--dtype", "float32",
                   "--benchmark", str(benchmark), "--out", str(out_path), "--workers", "2", "--json"]
        result = subprocess.run(command, env=os.environ | {"RAY_TMPDIR": str(ray_tmp)}, capture_output=True, text=True,
                                timeout=600)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    assert result.returncode == 1, result.stderr[-3000:]  # the unknown video
    summary = json.loads(result.stdout)  # exactly one JSON document on stdout
    assert read_eval_rows(out_path) == local_rows
    answered = [row["question_id"] for row in output_lines(out_path) if "response" in row]
    assert sorted(answered) == sorted(id_ for id_, row in local_rows.items() if row["response"])  # each once
    assert summary["num_already_answered"] == 2
    assert "no token set" in local_rows["999-1"]["error"]
    keys = ("accuracy", "num_questions", "num_answered", "num_failed", "by_category")
    assert {key: summary[key] for key in keys} == {key: local_summary[key] for key in keys}
