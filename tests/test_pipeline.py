"""The preprocessing job on real Ray: every input ends stored, skipped or failed; output on a
local disk and on a loopback S3 server; a killed job resumes with no duplicates."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fsspec
import psutil
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import ConfigError, PreprocessConfig
from pipeline.inputs import InputError, list_inputs
from pipeline.run import run_preprocess
from pipeline.samples import SAMPLE_VIDEOS
from pipeline.store import TokenStore

MODEL = "tiny-random:llava-onevision"
FRAMES = 4  # small and fast; the sampling itself is tested in test_decode.py


def make_corpus(directory: Path) -> dict[str, str]:
    """Two real videos and three bad ones; returns ``{video_id: expected status}``."""
    directory.mkdir(parents=True, exist_ok=True)
    for video in SAMPLE_VIDEOS:
        shutil.copy(video, directory / video.name)
    (directory / "empty.mp4").write_bytes(b"")
    (directory / "notes.mp4").write_text("this is a text file, not a video\n" * 20)
    data = SAMPLE_VIDEOS[0].read_bytes()
    (directory / "truncated.mp4").write_bytes(data[: len(data) // 50])
    return {"bigbuckbunny": "stored", "bikes": "stored", "empty": "failed", "notes": "failed",
            "truncated": "failed"}


def config_for(input_uri: str, output: str, **overrides) -> PreprocessConfig:
    return PreprocessConfig(input=input_uri, output=output, model=MODEL, frames=FRAMES, progress=False,
                            **overrides)


def token_objects(root: Path) -> list[Path]:
    return sorted((root / "tokens").rglob("*.parquet"))


def test_local_run_accounts_for_every_video_and_a_rerun_skips(local_ray, tmp_path):
    expected = make_corpus(tmp_path / "videos")
    store_dir = tmp_path / "store"
    summary = run_preprocess(config_for(str(tmp_path / "videos"), str(store_dir)))

    assert (summary.stored, summary.skipped, summary.failed) == (2, 0, 3)
    assert summary.inputs == 5 and summary.bytes_written > 0
    assert 0.45 <= summary.retention["min"] <= summary.retention["max"] <= 0.5
    store = TokenStore(str(store_dir))
    manifest = store.list_manifests()[0]
    assert {e.video_id: e.status for e in manifest.entries} == expected
    failures = {f.video_id: f for f in store.list_failures(summary.run_id)}
    assert set(failures) == {"empty", "notes", "truncated"}
    assert failures["empty"].error_type == "CorruptVideoError" and "empty.mp4" in failures["empty"].message
    assert all(f.stage == "decode" for f in failures.values())

    stored = store.read("bikes")
    assert stored.tokens.grid[0] == FRAMES and stored.tokens.retention <= 0.5
    assert stored.frame_indices == [0, 83, 166, 249]
    assert len(token_objects(store_dir)) == 2

    again = run_preprocess(config_for(str(tmp_path / "videos"), str(store_dir)))
    assert (again.stored, again.skipped, again.failed) == (0, 2, 3)
    assert len(token_objects(store_dir)) == 2  # nothing stored twice
    assert len(store.list_manifests()) == 2


def test_manifest_input_with_a_missing_file_and_a_repeated_id(local_ray, tmp_path):
    video = SAMPLE_VIDEOS[1]
    manifest = tmp_path / "videos.jsonl"
    manifest.write_text("\n".join(json.dumps(row) for row in [
        {"uri": str(video), "video_id": "clip-a"},
        {"uri": str(tmp_path / "nowhere.mp4"), "video_id": "gone"},
        {"uri": str(video), "video_id": "clip-a"},
        {"uri": str(video), "video_id": "clip-b"},
        {"uri": str(tmp_path / "nowhere.mp4"), "video_id": "gone"},
    ]) + "\n")
    summary = run_preprocess(config_for(str(manifest), str(tmp_path / "store"), tau_s=0.9, tau_t=0.8))
    assert (summary.stored, summary.skipped, summary.failed) == (2, 0, 3)
    reasons = sorted((f["video_id"], f["error_type"]) for f in summary.failures)
    assert reasons == [("clip-a", "DuplicateVideoIdError"), ("gone", "DuplicateVideoIdError"),
                       ("gone", "VideoNotFoundError")]
    store = TokenStore(str(tmp_path / "store"))
    # Every failure keeps its record, the two of the repeated id "gone" included.
    assert sorted((f.video_id, f.error_type) for f in store.list_failures(summary.run_id)) == reasons
    assert sorted(e.video_id for e in store.list_manifests()[0].entries) == ["clip-a", "clip-a", "clip-b", "gone", "gone"]
    # Same bytes under two ids: one object, both ids readable, thresholds as configured.
    assert len(token_objects(tmp_path / "store")) == 1
    assert store.read("clip-b").tokens.tau_s == 0.9 and store.read("clip-a").video_id == "clip-a"


def test_output_and_input_on_a_loopback_s3_server(local_ray, tmp_path, s3_server):
    bucket = s3_server.make_bucket("pipeline")
    fs = fsspec.filesystem("s3", **s3_server.storage_options)
    for video in SAMPLE_VIDEOS:
        fs.put_file(str(video), f"{bucket}/videos/{video.name}")
    fs.pipe_file(f"{bucket}/videos/broken.mp4", b"\x00" * 100)
    output = f"s3://{bucket}/store"
    config = config_for(f"s3://{bucket}/videos/", output, storage_options=s3_server.storage_options)

    summary = run_preprocess(config)
    assert (summary.stored, summary.skipped, summary.failed) == (2, 0, 1)
    store = TokenStore(output, s3_server.storage_options)
    assert {s.video_id for s in store.list()} == {"bigbuckbunny", "bikes"}
    assert store.read("bigbuckbunny").source_uri == f"s3://{bucket}/videos/bigbuckbunny.mp4"
    assert [f.video_id for f in store.list_failures()] == ["broken"]
    assert run_preprocess(config).skipped == 2


def test_killed_job_resumes_with_nothing_missing_and_nothing_twice(ray_cluster, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for copy in range(6):  # distinct bytes, so each is its own token set
        data = SAMPLE_VIDEOS[copy % 2].read_bytes() + bytes([copy])
        (videos / f"clip{copy}.mp4").write_bytes(data)
    store_dir = tmp_path / "store"
    command = [sys.executable, "-m", "pipeline.cli", "preprocess", str(videos), "--output", str(store_dir),
               "--model", MODEL, "--frames", str(FRAMES), "--json"]
    # The job's own Ray cluster lives under this temp dir, so that the processes a
    # SIGKILLed driver leaves behind can be found and stopped afterwards.
    # (Short: Ray's unix socket paths must fit in 107 bytes.)
    ray_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_TMPDIR": str(ray_dir), "RAY_ADDRESS": "local"}

    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and job.poll() is None and not (store_dir / "index").exists():
        time.sleep(0.2)
    assert job.poll() is None, "the job ended before it could be killed"
    os.killpg(job.pid, signal.SIGKILL)  # the driver and its Ray workers, mid-run
    job.wait()
    stop_processes_under(ray_dir)
    stored_before = len(token_objects(store_dir))
    assert 1 <= stored_before < 6
    assert not (store_dir / "manifests").exists()

    # The resumed run: the same command, in this process, on the session's Ray cluster.
    resumed = CliRunner().invoke(main, [*command[3:], "--address", ray_cluster.address])
    assert resumed.exit_code == 0, resumed.output[-2000:]
    summary = json.loads(resumed.stdout)  # stdout is the summary alone
    assert summary["failed"] == 0 and summary["stored"] + summary["skipped"] == 6
    assert summary["skipped"] >= stored_before
    assert len(token_objects(store_dir)) == 6
    store = TokenStore(str(store_dir))
    assert sorted(s.video_id for s in store.list()) == [f"clip{i}" for i in range(6)]


def stop_processes_under(directory: Path) -> None:
    """Kill the Ray processes (raylet, GCS, workers) whose command line names ``directory``."""
    for process in psutil.process_iter(["cmdline"]):
        if any(str(directory) in part for part in process.info["cmdline"] or []):
            process.kill()


def test_cli_exit_code_follows_the_failure_rate(ray_cluster, tmp_path):
    make_corpus(tmp_path / "videos")
    # The command in this process, on the session's Ray cluster (its own embedded Ray is
    # tested by the README walk-through and tests/test_cli.py).
    base = ["preprocess", str(tmp_path / "videos"), "--output", str(tmp_path / "store"), "--model", MODEL,
            "--frames", str(FRAMES), "--budget", "0.3", "--address", ray_cluster.address, "--json"]
    strict = CliRunner().invoke(main, base)
    assert strict.exit_code == 1 and isinstance(strict.exception, SystemExit), strict.output[-2000:]
    summary = json.loads(strict.stdout)
    assert {k: summary[k] for k in ("stored", "skipped", "failed")} == {"stored": 2, "skipped": 0, "failed": 3}
    assert summary["run_id"].startswith("run-") and summary["retention"]["max"] <= 0.3
    lenient = CliRunner().invoke(main, base + ["--max-failure-rate", "0.6"])
    assert lenient.exit_code == 0, lenient.output[-2000:]
    assert json.loads(lenient.stdout)["skipped"] == 2


# ----------------------------------------------------------------------------- inputs and config


def test_inputs_from_manifests_prefixes_and_globs(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.mp4").write_bytes(b"1")
    (tmp_path / "a" / "y.MOV").write_bytes(b"2")
    (tmp_path / "a" / "readme.txt").write_text("not a video")
    assert [(i.video_id, Path(i.uri).name) for i in list_inputs(str(tmp_path))] == [("a/x", "x.mp4"), ("a/y", "y.MOV")]
    assert [i.video_id for i in list_inputs(str(tmp_path / "a" / "*.mp4"))] == ["x"]
    (tmp_path / "list.csv").write_text("uri,video_id\na/x.mp4,first\na/y.MOV,\n")
    assert [(i.video_id, i.uri) for i in list_inputs(str(tmp_path / "list.csv"))] == [
        ("first", f"{tmp_path}/a/x.mp4"), ("y", f"{tmp_path}/a/y.MOV")]
    (tmp_path / "bad.jsonl").write_text('{"path": "a/x.mp4"}\n')
    with pytest.raises(InputError, match="no 'uri' column"):
        list_inputs(str(tmp_path / "bad.jsonl"))
    with pytest.raises(InputError, match="does not exist"):
        list_inputs(str(tmp_path / "missing.parquet"))
    with pytest.raises(InputError, match="neither"):
        list_inputs(str(tmp_path / "nothing-here"))


def test_shipped_configs_parse_and_bad_settings_are_named():
    root = Path(__file__).parent.parent / "jobs" / "configs"
    for name in ("corpus.yaml", "nightly.yaml"):
        config = PreprocessConfig.from_yaml(root / name)
        assert config.input.startswith("s3://") and config.budget == 0.5
    assert PreprocessConfig.from_yaml(root / "nightly.yaml").run_id_prefix == "nightly"
    with pytest.raises(ConfigError, match="budget"):
        PreprocessConfig(budget=1.5)
    with pytest.raises(ConfigError, match="not both"):
        PreprocessConfig(frames=8, fps=1.0, max_frames=8)
    with pytest.raises(ConfigError, match="tau_t needs tau_s"):
        PreprocessConfig(tau_t=0.5)
