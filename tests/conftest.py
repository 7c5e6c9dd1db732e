"""Shared test fixtures.

``s3_server``: a real S3-protocol server (moto in server mode) on 127.0.0.1, the way
s3fs tests itself, so S3 code paths run over HTTP exactly as in production.

Every Ray cluster the suite starts (``ray.init``, ``ray.cluster_utils.Cluster``, the CLI
in subprocesses) lives under one temp dir of this session, removed at the end with any
process still running from it: the suite leaves no ``ray_current_cluster`` file behind
that a later plain ``ray.init()`` would try to join.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from typing import Any

import psutil
import pytest

# No test may reach the Hugging Face hub; models are built locally.
os.environ["HF_HUB_OFFLINE"] = "1"

# Short (Ray's unix socket paths must fit in 107 bytes). Subprocesses inherit it.
RAY_TMPDIR = tempfile.mkdtemp(prefix="sttm-ray-", dir="/tmp")
os.environ["RAY_TMPDIR"] = RAY_TMPDIR
os.environ.pop("RAY_ADDRESS", None)


def stop_processes_under(directory: str) -> None:
    """Kill the processes (raylet, GCS, workers) whose command line names ``directory``."""
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(directory in part for part in process.info["cmdline"] or []):
                process.kill()
        except psutil.Error:
            pass  # gone already


def pytest_sessionfinish(session, exitstatus):
    import ray

    ray.shutdown()
    stop_processes_under(RAY_TMPDIR)
    shutil.rmtree(RAY_TMPDIR, ignore_errors=True)

# Dummy credentials: moto accepts any, and they keep botocore from looking for real ones.
DUMMY_ACCESS_KEY = "testing-access-key"
DUMMY_SECRET_KEY = "testing-secret-key"
REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    """A running loopback S3 server.

    ``storage_options`` are what fsspec/s3fs need to reach it (pass them to
    ``TokenStore(url, storage_options)`` or ``fsspec.filesystem("s3", **...)``).
    """

    endpoint_url: str
    storage_options: dict[str, Any]

    def make_bucket(self, prefix: str = "test") -> str:
        """Create a fresh, uniquely named bucket and return its name."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def client(self):
        """A boto3 S3 client for looking at the server directly (bypassing s3fs caches)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=DUMMY_ACCESS_KEY,
            aws_secret_access_key=DUMMY_SECRET_KEY,
            region_name=REGION,
        )


@pytest.fixture(scope="session")
def s3_server():
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as patch:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL"):
            patch.delenv(name, raising=False)
        patch.setenv("AWS_ACCESS_KEY_ID", DUMMY_ACCESS_KEY)
        patch.setenv("AWS_SECRET_ACCESS_KEY", DUMMY_SECRET_KEY)
        patch.setenv("AWS_DEFAULT_REGION", REGION)

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        endpoint_url = f"http://{host}:{port}"
        try:
            yield S3Server(
                endpoint_url=endpoint_url,
                storage_options={
                    "key": DUMMY_ACCESS_KEY,
                    "secret": DUMMY_SECRET_KEY,
                    "client_kwargs": {"endpoint_url": endpoint_url, "region_name": REGION},
                },
            )
        finally:
            server.stop()
