"""`sttm submit` sends the preprocessing job to a real Ray cluster through Ray Jobs."""
from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import yaml

from pipeline.samples import SAMPLE_DIR
from pipeline.store import TokenStore


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_submit_runs_the_job_on_a_ray_cluster(tmp_path):
    working_dir = tmp_path / "job"
    working_dir.mkdir()
    store_dir = tmp_path / "store"
    (working_dir / "job.yaml").write_text(yaml.safe_dump(dict(
        input=str(SAMPLE_DIR), output=str(store_dir), model="tiny-random:llava-onevision", frames=2,
        progress=False, run_id_prefix="submitted")))

    ray_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: unix socket paths
    dashboard = free_port()
    # Ray clusters require a token by default; the cluster and the client share this one.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    ray = str(Path(sys.executable).with_name("ray"))
    subprocess.run([ray, "start", "--head", "--num-cpus", "2", "--port", str(free_port()),
                    "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                    "--dashboard-agent-listen-port", str(free_port()),  # its default may be taken
                    "--temp-dir", str(ray_dir), "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=120)
    try:
        submitted = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "submit", str(working_dir / "job.yaml"),
             "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", str(working_dir), "--wait", "--json"],
            env=env, capture_output=True, text=True, timeout=400)
    finally:
        for process in psutil.process_iter(["cmdline"]):
            if any(str(ray_dir) in part for part in process.info["cmdline"] or []):
                process.kill()

    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    result = json.loads(submitted.stdout.strip().splitlines()[-1])
    assert result["status"] == "SUCCEEDED"
    assert result["entrypoint"] == "python -m jobs.preprocess --config job.yaml"
    summary = json.loads(result["logs"][result["logs"].index("{"):])  # the job prints its summary last
    assert (summary["stored"], summary["failed"]) == (2, 0) and summary["run_id"].startswith("submitted-")
    assert sorted(s.video_id for s in TokenStore(str(store_dir)).list()) == ["bigbuckbunny", "bikes"]
