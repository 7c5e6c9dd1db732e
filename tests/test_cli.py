"""The `sttm` command line as a new user meets it: every bad invocation is a short error
naming the option, with exit status 2, before Ray starts or weights load; a re-run over a
finished store records itself without Ray; progress in videos on stderr; `--json` leaves
one JSON document on stdout."""
from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest
import ray
import yaml
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import PreprocessConfig
from pipeline.fingerprint import config_fingerprint, encoder_facts, sampling_policy_from_dict
from pipeline.progress import Progress
from pipeline.samples import SAMPLE_DIR, SAMPLE_VIDEOS
from pipeline.stages import DecodeStage, TokenizeStage, sampling_dict
from pipeline.store import TokenStore

MODEL = "tiny-random:llava-onevision"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def ray_dir(tmp_path_factory, monkeypatch):
    """Where a Ray started by the command would put its session: must stay empty."""
    directory = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: unix socket paths
    monkeypatch.setenv("RAY_TMPDIR", str(directory))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def invoke(args: list[str]):
    return CliRunner().invoke(main, args, catch_exceptions=True)


def assert_usage_error(result, *expected: str, ray_dir: Path) -> None:
    """Exit status 2, a short message naming ``expected``, no traceback, no Ray."""
    output = result.output
    assert result.exit_code == 2, output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in output and len(output.splitlines()) <= 6, output
    for text in expected:
        assert text in output, output
    assert not ray.is_initialized()
    assert list(ray_dir.iterdir()) == [], "a Ray session was started"


@pytest.fixture
def files(tmp_path):
    """Bad inputs of every kind, by name."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "not-a-store").mkdir()
    (tmp_path / "not-a-store" / "notes.txt").write_text("hello")
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "no-uri.jsonl").write_text('{"path": "clip.mp4"}\n')
    (tmp_path / "typo.yaml").write_text("budgte: 0.3\nframes: 4\n")
    (tmp_path / "good.yaml").write_text(yaml.safe_dump({"model": MODEL, "frames": 2}))
    (tmp_path / "wrong-type.yaml").write_text("budget: half\n")
    (tmp_path / "questions.jsonl").write_text('{"video_id": "bikes", "question": "What happens?"}\n')
    (tmp_path / "bench.json").write_text("[]")
    (tmp_path / "store" / "tokens").mkdir(parents=True)  # looks like a store
    return tmp_path


def bad_invocations(f: Path, port: int) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    """name -> (arguments, what the error must say)."""
    out = ["--output", str(f / "out-store")]
    query = ["--model", MODEL, "--questions", str(f / "questions.jsonl"), "--out", str(f / "answers.jsonl")]
    return {
        "budget above 1": (["preprocess", "--budget", "1.5", *out], ("--budget", "1.5")),
        "zero frames": (["preprocess", "--frames", "0", *out], ("--frames",)),
        "tau-t without tau-s": (["preprocess", "--tau-t", "0.8", *out], ("--tau-t needs --tau-s",)),
        "fps without max-frames": (["preprocess", "--fps", "1", *out], ("--fps", "--max-frames")),
        "missing input": (["preprocess", str(f / "nowhere"), *out], ("INPUT", "nowhere")),
        "empty folder": (["preprocess", str(f / "empty"), *out], ("INPUT", "no video files")),
        "manifest without uri": (["preprocess", str(f / "no-uri.jsonl"), *out], ("INPUT", "'uri'")),
        "yaml typo": (["preprocess", "--config", str(f / "typo.yaml"), *out],
                      ("--config", "'budgte'", "did you mean 'budget'")),
        "yaml wrong type": (["preprocess", "--config", str(f / "wrong-type.yaml"), *out], ("'budget'", "number")),
        "unknown tiny-random family": (["preprocess", "--model", "tiny-random:foo", *out],
                                       ("--model", "'foo'", "llava-onevision")),
        "model path missing": (["preprocess", "--model", str(f / "no-model"), *out], ("--model", "no such folder")),
        "store is a file": (["preprocess", "--output", str(f / "a-file")], ("--output", "is a file")),
        "address unreachable": (["preprocess", "--address", f"127.0.0.1:{port}", *out],
                                ("--address", "nothing answers")),
        "submit unreachable": (["submit", str(f / "good.yaml"), "--working-dir", str(f), "--address",
                                f"http://127.0.0.1:{port}"], ("--address", "nothing answers")),
        "submit yaml typo": (["submit", str(f / "typo.yaml"), "--working-dir", str(f), "--address",
                              f"http://127.0.0.1:{port}"], ("did you mean 'budget'",)),
        "submit config outside working dir": (["submit", str(f / "good.yaml"), "--working-dir", str(f / "empty"),
                                               "--address", f"http://127.0.0.1:{port}"], ("--working-dir",)),
        "inspect a folder that is no store": (["inspect", str(f / "not-a-store")], ("STORE", "not a token store")),
        "inspect a file": (["inspect", str(f / "a-file")], ("STORE", "is a file")),
        "query a store that is a file": (["query", str(f / "a-file"), *query], ("STORE", "is a file")),
        "query model path missing": (["query", str(f / "store"), *query[2:], "--model", str(f / "no-model")],
                                     ("--model", "no such folder")),
        "eval into a missing folder": (["eval", str(f / "store"), "--model", MODEL, "--benchmark",
                                        str(f / "bench.json"), "--out", str(f / "missing" / "r.jsonl")],
                                       ("--out", "does not exist")),
        "visualize into a missing folder": (["visualize", str(f / "store"), "bikes", "--out",
                                             str(f / "missing" / "bikes.png")], ("--out", "does not exist")),
        "budget-curve of a missing video": (["budget-curve", str(f / "gone.mp4"), "--model", MODEL, "--out",
                                             str(f / "curve.png")], ("VIDEO", "gone.mp4")),
        "budget-curve unknown family": (["budget-curve", str(SAMPLE_VIDEOS[0]), "--model", "tiny-random:foo",
                                         "--out", str(f / "curve.png")], ("--model",)),
    }


CASES = list(bad_invocations(Path("/x"), 1))


@pytest.mark.parametrize("case", CASES)
def test_a_bad_invocation_is_a_short_usage_error_before_ray(case, files, ray_dir):
    args, expected = bad_invocations(files, free_port())[case]
    assert_usage_error(invoke(args), *expected, ray_dir=ray_dir)
    assert not (files / "out-store").exists()


def test_the_installed_command_reports_without_a_traceback(files, ray_dir):
    """The console script, not the in-process runner: stderr is the message, stdout empty."""
    sttm = str(Path(sys.executable).with_name("sttm"))
    for args in (["preprocess", "--budget", "1.5"], ["inspect", str(files / "not-a-store")]):
        done = subprocess.run([sttm, *args], capture_output=True, text=True, timeout=300, cwd=files)
        assert done.returncode == 2 and done.stdout == "", done
        assert "Traceback" not in done.stderr and "Error:" in done.stderr
    assert list(ray_dir.iterdir()) == []


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(files, ray_dir):
    checkpoint = files / "broken-checkpoint"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{ not json")
    args = ["preprocess", str(SAMPLE_VIDEOS[0]), "--model", str(checkpoint), "--output", str(files / "s")]
    quiet = invoke(args)
    assert quiet.exit_code == 1 and "--debug" in quiet.output and "Traceback" not in quiet.output
    loud = invoke([*args, "--debug"])
    assert loud.exit_code == 1 and not isinstance(loud.exception, SystemExit)  # the real exception, raised
    assert not ray.is_initialized() and list(ray_dir.iterdir()) == []


def test_preprocess_help_shows_input_as_optional():
    result = invoke(["preprocess", "--help"])
    assert result.exit_code == 0 and "preprocess [OPTIONS] [INPUT]" in result.output


# ----------------------------------------------------------------------------- a store made without Ray


def store_without_ray(store_dir: Path, frames: int) -> str:
    """The bundled samples into ``store_dir`` by the stages called directly, under the
    config fingerprint `sttm preprocess --frames N` computes; returns it."""
    config = PreprocessConfig(output=str(store_dir), model=MODEL, frames=frames)
    facts = encoder_facts(MODEL)
    policy = config.sampling_policy() or sampling_policy_from_dict(facts.default_sampling)
    sampling = sampling_dict(policy)
    fingerprint = config_fingerprint(model_id=MODEL, model_revision=None, encoder_fingerprint=facts.fingerprint,
                                     sampling=sampling, sttm=config.sttm_options())
    decode = DecodeStage(str(store_dir), {}, policy, fingerprint, facts.input_frame_size)
    tokenize = TokenizeStage(str(store_dir), {}, MODEL, "cpu", None, config.sttm_options(), sampling,
                             facts.fingerprint, fingerprint, "made-without-ray")
    for video in SAMPLE_VIDEOS:
        assert tokenize.tokenize_one(decode.decode_one(video.stem, str(video)))["status"] == "stored"
    return fingerprint


@pytest.fixture(scope="module")
def two_config_store(tmp_path_factory):
    store_dir = tmp_path_factory.mktemp("two-configs") / "store"
    return store_dir, [store_without_ray(store_dir, frames) for frames in (2, 3)]


def test_a_rerun_over_a_finished_store_records_itself_without_ray(two_config_store, ray_dir):
    store_dir, (first, _) = two_config_store
    result = invoke(["preprocess", str(SAMPLE_DIR), "--output", str(store_dir), "--model", MODEL, "--frames", "2",
                     "--json", "--run-id-prefix", "rerun"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # the whole of stdout: one JSON document
    assert (summary["stored"], summary["skipped"], summary["failed"]) == (0, 2, 0)
    assert summary["config_fingerprint"] == first
    assert not ray.is_initialized() and list(ray_dir.iterdir()) == []
    manifest = [m for m in TokenStore(str(store_dir)).list_manifests() if m.run_id.startswith("rerun-")]
    assert len(manifest) == 1 and {e.status for e in manifest[0].entries} == {"skipped"}


def test_the_encoder_facts_are_cached_by_the_checkpoint_files(tmp_path, monkeypatch):
    from pipeline.models import resolve_model

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(resolve_model(MODEL), checkpoint)
    monkeypatch.setenv("STTM_CACHE", str(tmp_path / "cache"))
    loads = []
    import pipeline.fingerprint as fingerprint_module

    real = fingerprint_module._load_encoder_facts
    monkeypatch.setattr(fingerprint_module, "_load_encoder_facts", lambda spec: loads.append(spec) or real(spec))
    first = encoder_facts(str(checkpoint))
    assert encoder_facts(str(checkpoint)) == first and len(loads) == 1  # cached: no second load
    assert first.fingerprint == encoder_facts(MODEL).fingerprint  # same weights, same fingerprint
    config = checkpoint / "config.json"
    config.write_text(config.read_text() + "\n")  # a changed file: computed again
    assert encoder_facts(str(checkpoint)).fingerprint != "" and len(loads) == 3


def test_query_with_several_configs_names_the_flag_and_visualize_draws_the_newest(two_config_store, files, ray_dir):
    store_dir, (first, second) = two_config_store
    query = ["query", str(store_dir), "--model", MODEL, "--questions", str(files / "questions.jsonl"), "--out",
             str(files / "answers.jsonl")]
    assert_usage_error(invoke(query), "--config-fingerprint", first, second, ray_dir=ray_dir)
    assert_usage_error(invoke([*query, "--config-fingerprint", "0123456789abcdef"]), "--config-fingerprint",
                       ray_dir=ray_dir)
    drawn = invoke(["visualize", str(store_dir), "bikes", "--out", str(files / "bikes.png"), "--json"])
    assert drawn.exit_code == 0, drawn.output
    assert json.loads(drawn.stdout)["config_fingerprint"] == second and "--config-fingerprint" in drawn.stderr


# ----------------------------------------------------------------------------- progress


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_progress_in_logs_counts_videos_rates_and_eta():
    clock, out = FakeClock(), io.StringIO()
    progress = Progress(out, terminal=False, interval=3600, clock=clock)
    progress.phase("starting Ray")
    clock.now += 20
    progress.start(5, failed=1)  # one repeated id failed before the run
    clock.now += 30
    progress.result("a", "stored")
    progress.result("a", "stored")  # a retried block reports it again: counted once
    clock.now += 30
    progress.result("b", "failed", "CorruptVideoError: b.mp4: the file is empty")
    progress.result("c", "skipped")
    assert progress.line().split(" | ") == [
        "sttm: 4/5 videos", "1 stored, 1 skipped, 2 failed", "3.0 videos/min", "1m20s", "ETA 20s"]
    progress.close()
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("starting Ray ...")
    assert lines[1].endswith("sttm: 1/5 videos | 0 stored, 0 skipped, 1 failed | -- videos/min | 20s")
    assert lines[2].endswith("failed b: CorruptVideoError: b.mp4: the file is empty")
    assert lines[3].endswith(progress.line())  # the last line when the run ends
    assert len(lines) == 4 and all(line[:4].isdigit() for line in lines)  # each stamped with the time


def test_progress_on_a_terminal_redraws_one_line():
    out = io.StringIO()
    progress = Progress(out, terminal=True, clock=FakeClock())
    progress.start(2)
    progress.result("a", "stored")
    progress.print_above("a warning from somewhere")
    progress.close()
    text = out.getvalue()
    assert text.count("\n") == 1 and "\r\x1b[2Ka warning from somewhere\n" in text  # only the other output
    assert "sttm: 1/2 videos" in text and text.endswith("\r\x1b[2K")  # the line is cleared at the end


def stop_processes_under(directory: Path) -> None:
    for process in psutil.process_iter(["cmdline"]):
        if any(str(directory) in part for part in process.info["cmdline"] or []):
            process.kill()


def test_a_real_run_logs_progress_on_stderr_and_one_json_document_on_stdout(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(SAMPLE_VIDEOS[1], videos / "clip.mp4")
    (videos / "empty.mp4").write_bytes(b"")
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "pipeline.cli", "preprocess", str(videos), "--output", str(tmp_path / "store"),
               "--model", MODEL, "--frames", "2", "--json", "--max-failure-rate", "0.5"]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    finally:
        stop_processes_under(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert (summary["stored"], summary["failed"]) == (1, 1)
    log = done.stderr.splitlines()
    assert any("starting Ray ..." in line for line in log)
    assert any("failed empty: " in line and "empty" in line for line in log)
    assert "sttm: 2/2 videos | 1 stored, 0 skipped, 1 failed" in log[-1]
    for noise in ("Token authentication", "core_worker.cc", "streaming_executor", "Loading weights", "MapBatches"):
        assert noise not in done.stderr, done.stderr
