"""The preprocessing job under faults: its own Ray whatever cluster this machine ran last,
checks before the run, records that survive a store that refuses them, no secret stored
or printed, ids kept as given, one JSON document on stdout, clean SIGTERM/SIGINT."""
from __future__ import annotations

import json
import shutil
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import ray

from conftest import stop_processes_under
from pipeline.config import ConfigError, PreprocessConfig
from pipeline.inputs import InputError, list_inputs
from pipeline.run import (EXIT_NOT_STARTED, EXIT_RECORDS_NOT_WRITTEN, StoreUnavailableError, exit_code,
                          run_preprocess)
from pipeline.samples import SAMPLE_VIDEOS
from pipeline.store import TokenStore

MODEL = "tiny-random:llava-onevision"
FRAMES = 4
CLI = [sys.executable, "-m", "pipeline.cli", "preprocess"]


@pytest.fixture
def own_ray_dir():
    """A Ray temp dir for one CLI subprocess; its processes are stopped afterwards."""
    directory = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: unix socket paths
    yield Path(directory)
    stop_processes_under(directory)


def distinct_videos(directory: Path, count: int) -> list[str]:
    """``count`` real videos with distinct bytes (one token set each); returns their ids."""
    directory.mkdir(parents=True, exist_ok=True)
    for copy in range(count):
        (directory / f"clip{copy}.mp4").write_bytes(SAMPLE_VIDEOS[copy % 2].read_bytes() + bytes([copy]))
    return [f"clip{copy}" for copy in range(count)]


def parquet_text(root: Path) -> str:
    """Every Parquet file under ``root`` decoded to text (values, not compressed bytes)."""
    return "\n".join(str(pq.read_table(path).to_pylist()) + str(pq.read_metadata(path).metadata)
                     for path in sorted(root.rglob("*.parquet")))


# ----------------------------------------------------------------------------- item 1, 6, 7


def test_cli_starts_its_own_ray_beside_a_stale_cluster_file_and_prints_one_json_document(tmp_path, own_ray_dir):
    """A `ray_current_cluster` file naming a dead cluster (what a killed run or the test
    suite's Cluster leaves) must not be joined; a worker killed mid-run must not put Ray's
    lines on stdout; ids like 007 and 7 stay distinct strings; a repeated id keeps every
    record."""
    # Where a plain ray.init() looks for the last cluster: $RAY_TMPDIR/ray/ray_current_cluster.
    (own_ray_dir / "ray").mkdir()
    (own_ray_dir / "ray" / "ray_current_cluster").write_text("127.0.0.1:1\n")  # nothing listens there
    videos = tmp_path / "videos"
    distinct_videos(videos, 4)
    manifest = tmp_path / "videos.csv"
    manifest.write_text("uri,video_id\n" + "".join(f"{line}\n" for line in [
        "videos/clip0.mp4,007", "videos/clip1.mp4,7", "videos/clip2.mp4,0x10", "videos/clip3.mp4,1e3",
        "videos/gone.mp4,twice", "videos/gone.mp4,twice"]))
    store_dir = tmp_path / "store"
    env = {**os.environ, "RAY_TMPDIR": str(own_ray_dir), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    job = subprocess.Popen([*CLI, str(manifest), "--output", str(store_dir), "--model", MODEL, "--frames",
                            str(FRAMES), "--max-failure-rate", "1", "--json"],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        killed = kill_one_decode_worker(job, store_dir)
        stdout, stderr = job.communicate(timeout=420)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout)  # the whole of stdout is one JSON document
    assert killed, "no decode worker was found to kill"
    assert (summary["stored"], summary["failed"]) == (4, 2), summary

    store = TokenStore(str(store_dir))
    assert sorted(s.video_id for s in store.list()) == ["007", "0x10", "1e3", "7"]
    assert store.read("007").source_uri.endswith("clip0.mp4") and store.read("7").source_uri.endswith("clip1.mp4")
    entries = store.list_manifests()[0].entries
    assert sorted(e.video_id for e in entries) == ["007", "0x10", "1e3", "7", "twice", "twice"]
    failures = store.list_failures(summary["run_id"])
    assert sorted((f.video_id, f.error_type) for f in failures) == [
        ("twice", "DuplicateVideoIdError"), ("twice", "VideoNotFoundError")]


def kill_one_decode_worker(job: subprocess.Popen, store_dir: Path) -> bool:
    """SIGKILL the job's decode actor once the job has stored something; True if one was
    killed (Ray Data restarts it and retries its video)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and job.poll() is None:
        if (store_dir / "index").exists():
            for process in psutil.Process(job.pid).children(recursive=True):
                try:
                    if "DecodeStage" in " ".join(process.cmdline()):
                        process.kill()
                        return True
                except psutil.Error:
                    continue
        time.sleep(0.2)
    return False


def test_manifest_ids_stay_strings(tmp_path):
    (tmp_path / "ids.csv").write_text("uri,video_id\na.mp4,007\nb.mp4,7\nc.mp4,1.50\nd.mp4,\n")
    assert [i.video_id for i in list_inputs(str(tmp_path / "ids.csv"))] == ["007", "7", "1.50", "d"]
    (tmp_path / "ids.jsonl").write_text('{"uri": "a.mp4", "video_id": "007"}\n{"uri": "b.mp4", "video_id": 7}\n\n')
    assert [i.video_id for i in list_inputs(str(tmp_path / "ids.jsonl"))] == ["007", "7"]
    (tmp_path / "bad.jsonl").write_text('{"uri": "a.mp4"}\nnot json\n')
    with pytest.raises(InputError, match="line 2"):
        list_inputs(str(tmp_path / "bad.jsonl"))


# ----------------------------------------------------------------------------- item 3: before the run


def test_bad_run_id_prefix_ids_and_stores_fail_before_any_work(tmp_path, s3_server):
    videos = tmp_path / "videos"
    distinct_videos(videos, 1)
    with pytest.raises(ConfigError, match="run_id_prefix"):
        PreprocessConfig(input=str(videos), run_id_prefix="../evil")

    secret = f"pw-{uuid.uuid4().hex}"
    manifest = tmp_path / "ids.jsonl"
    manifest.write_text(json.dumps({"uri": str(videos / "clip0.mp4"),
                                    "video_id": f"https://user:{secret}@host/v.mp4"}) + "\n")
    with pytest.raises(InputError, match="row 1: the video id looks like a URL") as raised:
        run_preprocess(PreprocessConfig(input=str(manifest), output=str(tmp_path / "store"), model=MODEL))
    assert secret not in str(raised.value)

    missing_bucket = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/store"
    with pytest.raises(StoreUnavailableError, match="no-such-bucket"):
        run_preprocess(PreprocessConfig(input=str(videos), output=missing_bucket, model=MODEL,
                                        storage_options=s3_server.storage_options))
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(StoreUnavailableError, match="cannot be written"):
        run_preprocess(PreprocessConfig(input=str(videos), output=str(tmp_path / "a-file" / "store"), model=MODEL))
    assert not ray.is_initialized(), "a check that can be made before the run started Ray first"


def test_cli_names_a_bad_run_id_prefix_with_its_own_exit_code(tmp_path):
    distinct_videos(tmp_path / "videos", 1)
    result = subprocess.run([*CLI, str(tmp_path / "videos"), "--output", str(tmp_path / "store"),
                             "--run-id-prefix", "../evil", "--json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == EXIT_NOT_STARTED and result.stdout == ""
    assert "--run-id-prefix" in result.stderr and "Traceback" not in result.stderr
    # Refused before any work: no store, nothing written beside it.
    assert not (tmp_path / "store").exists() and not (tmp_path / "evil").exists()


# ----------------------------------------------------------------------------- item 3: during the run, item 5


def test_records_the_store_refuses_are_named_and_secrets_never_written(local_ray, tmp_path, s3_server):
    """The store accepts token sets but refuses the manifest and failure records (their
    prefixes are files): the run still returns its summary, naming what was not written.
    Credentials given in storage_options or inside video URLs appear in no output."""
    distinct_videos(tmp_path / "videos", 1)
    secret, password, signature = (f"{kind}-{uuid.uuid4().hex}" for kind in ("secret", "password", "sig"))
    manifest = tmp_path / "videos.jsonl"
    manifest.write_text("\n".join(json.dumps(row) for row in [
        {"uri": str(tmp_path / "videos" / "clip0.mp4"), "video_id": "good"},
        {"uri": f"http://user:{password}@127.0.0.1:9/v.mp4?X-Amz-Signature={signature}", "video_id": "remote"},
    ]) + "\n")
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    (store_dir / "manifests").write_text("a file where the manifests directory should be")
    (store_dir / "failures").write_text("a file where the failures directory should be")
    config = PreprocessConfig(input=str(manifest), output=str(store_dir), model=MODEL, frames=FRAMES, progress=False,
                              storage_options={"secret": secret, "client_kwargs": {"aws_secret_access_key": secret}})
    summary = run_preprocess(config)

    assert (summary.stored, summary.failed) == (1, 1)
    assert len(summary.unwritten_records) == 2, summary.unwritten_records
    assert "run manifest" in summary.unwritten_records[-1] and "remote" in summary.unwritten_records[0]
    assert exit_code(summary, max_failure_rate=1.0) == EXIT_RECORDS_NOT_WRITTEN

    # Now with a store that takes them: the manifest's job config keeps no secret.
    (store_dir / "manifests").unlink()
    (store_dir / "failures").unlink()
    summary = run_preprocess(config)
    assert summary.unwritten_records == [] and exit_code(summary, max_failure_rate=1.0) == 0
    job_config = TokenStore(str(store_dir)).list_manifests()[-1].job_config
    assert job_config["storage_options"]["secret"] == "<redacted>"
    printed = summary.text() + json.dumps(summary.to_dict()) + repr(summary)
    written = parquet_text(store_dir) + "".join(p.read_text() for p in (store_dir / "index").rglob("*.json"))
    for credential in (secret, password, signature):
        assert credential not in printed and credential not in written


# ----------------------------------------------------------------------------- item 9


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_ends_the_run_with_its_manifest(tmp_path, own_ray_dir, signum):
    ids = distinct_videos(tmp_path / "videos", 8)
    store_dir = tmp_path / "store"
    env = {**os.environ, "RAY_TMPDIR": str(own_ray_dir)}
    job = subprocess.Popen([*CLI, str(tmp_path / "videos"), "--output", str(store_dir), "--model", MODEL,
                            "--frames", str(FRAMES), "--decode-concurrency", "1", "--json"],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and job.poll() is None and not (store_dir / "index").exists():
            time.sleep(0.1)
        assert job.poll() is None, "the job ended before it could be signalled"
        job.send_signal(signum)  # the driver only, as a scheduler's stop would
        stdout, stderr = job.communicate(timeout=180)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    summary = json.loads(stdout)
    assert summary["interrupted_by"] == signal.Signals(signum).name
    store = TokenStore(str(store_dir))
    manifest = store.list_manifests()[0]
    assert sorted(e.video_id for e in manifest.entries) == ids
    interrupted = {f.video_id for f in store.list_failures(manifest.run_id) if f.error_type == "RunInterrupted"}
    # Unfinished as far as the driver knows (a video stored by a worker whose result had
    # not come back counts here and is skipped by the next run).
    assert interrupted == {e.video_id for e in manifest.entries if e.status == "failed"} and interrupted
    assert summary["stored"] + summary["failed"] == len(ids)


# ----------------------------------------------------------------------------- item 1, 11: the suite itself


def test_the_suite_leaves_no_ray_state_behind(tmp_path):
    """A pytest session (with this suite's conftest) whose `ray.cluster_utils.Cluster` test
    fails before its cleanup leaves no `ray_current_cluster` file in Ray's default temp
    dir, no Ray temp dir and no Ray process running."""
    (tmp_path / "test_child.py").write_text(
        "import os, pathlib, ray\n"
        "from ray.cluster_utils import Cluster\n\n"
        "def test_cluster_fails_before_its_cleanup():\n"
        f"    pathlib.Path({str(tmp_path / 'ray_dir')!r}).write_text(os.environ.get('RAY_TMPDIR', ''))\n"
        "    cluster = Cluster(initialize_head=True, head_node_args={'num_cpus': 1})\n"
        "    ray.init(address=cluster.address, include_dashboard=False)\n"
        "    assert False, 'a cluster test that fails before cluster.shutdown()'\n")
    system_tmp = Path(tempfile.mkdtemp(prefix="tmp-", dir="/tmp"))  # Ray's default: $TMPDIR/ray
    tests_dir = Path(__file__).parent
    env = {**os.environ, "TMPDIR": str(system_tmp),
           "PYTHONPATH": os.pathsep.join([str(tests_dir.parent), str(tests_dir), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_TMPDIR", None)
    try:
        child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                                "--rootdir", str(tmp_path), str(tmp_path / "test_child.py")],
                               env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert "1 failed" in child.stdout, child.stdout[-3000:] + child.stderr[-3000:]
        assert not (system_tmp / "ray" / "ray_current_cluster").exists()
        ray_dir = (tmp_path / "ray_dir").read_text()
        assert ray_dir and not Path(ray_dir).exists()
        assert not [p for p in psutil.process_iter(["cmdline"]) if ray_dir in " ".join(p.info["cmdline"] or [])]
    finally:
        stop_processes_under(str(system_tmp))
        shutil.rmtree(system_tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- item 10


def test_workers_are_recycled_without_losing_or_doubling_a_video(local_ray, tmp_path):
    """With recycle_workers_after=2, the decode and encode actors' processes are replaced
    every two videos (the memory Ray's actors gain per video is measured in
    jobs/bench_actor_memory.py); every video is still stored exactly once."""
    ids = distinct_videos(tmp_path / "videos", 6)
    store_dir = tmp_path / "store"
    config = PreprocessConfig(input=str(tmp_path / "videos"), output=str(store_dir), model=MODEL, frames=FRAMES,
                              progress=False, recycle_workers_after=2)
    outcome = {}
    job = threading.Thread(target=lambda: outcome.update(summary=run_preprocess(config)))
    job.start()
    pids: dict[str, set[int]] = {"DecodeStage": set(), "TokenizeStage": set()}
    while job.is_alive():
        for process in psutil.process_iter(["pid", "cmdline"]):
            command = " ".join(process.info["cmdline"] or [])
            for stage in pids:
                if "ray::" in command and stage in command:
                    pids[stage].add(process.info["pid"])
        job.join(timeout=0.2)
    summary = outcome["summary"]
    assert (summary.stored, summary.failed) == (len(ids), 0), summary.failures
    assert len(pids["DecodeStage"]) >= 2 and len(pids["TokenizeStage"]) >= 2, pids
    assert len(list((store_dir / "tokens").rglob("*.parquet"))) == len(ids)
    manifest = TokenStore(str(store_dir)).list_manifests()[0]
    assert sorted(e.video_id for e in manifest.entries) == ids
