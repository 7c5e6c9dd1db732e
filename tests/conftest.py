"""Shared test fixtures.

``s3_server``: a real S3-protocol server (moto in server mode) on 127.0.0.1, the way
s3fs tests itself, so S3 code paths run over HTTP exactly as in production.

Every Ray cluster the suite starts (``ray.init``, ``ray.cluster_utils.Cluster``, the CLI
in subprocesses) lives under one temp dir of this session, removed at the end with any
process still running from it: the suite leaves no ``ray_current_cluster`` file behind
that a later plain ``ray.init()`` would try to join.

``ray_cluster``: one Ray cluster (``ray.cluster_utils.Cluster``, a head of 2 CPUs) for the
whole session, started on first use; ``local_ray`` connects a test to it. Starting Ray
takes seconds (and, on a loaded machine, risks Ray's node registration timeout), so the
tests that run a job in this process share it: each connects as a job of its own, and a
multi-node test adds a worker node to it and removes that node again.
"""
from __future__ import annotations

import contextlib
import gc
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

# No test may reach the Hugging Face hub; models are built locally.
os.environ["HF_HUB_OFFLINE"] = "1"

# The `sttm` command hides transformers' progress bars ("Writing model shards" while it
# builds a tiny model, "Loading weights") by setting HF_HUB_DISABLE_PROGRESS_BARS before
# transformers is imported, which reads it once. In this process the test modules import
# transformers before any test runs the command (CliRunner): hide them here, before the
# test modules are imported, as the command does in its own process. Subprocesses show
# what the command leaves on.
def hide_transformers_progress_bars() -> None:
    from huggingface_hub.utils import disable_progress_bars  # what transformers reads at import

    disable_progress_bars()


hide_transformers_progress_bars()

# Short (Ray's unix socket paths must fit in 107 bytes). Subprocesses inherit it.
RAY_TMPDIR = tempfile.mkdtemp(prefix="sttm-ray-", dir="/tmp")
os.environ["RAY_TMPDIR"] = RAY_TMPDIR
os.environ.pop("RAY_ADDRESS", None)
# Ray Data's usage collection: an actor per job and a thread polling metrics every 10 s
# in every process that ran a job, for the rest of the session. Tests report no usage.
os.environ.setdefault("RAY_DATA_USAGE_DISABLED", "1")


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


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Build each test's report with the garbage collector off. Python before 3.11.8 keeps
    one AST-building state for all threads (CPython gh-106905): when a collection inside
    ``ast.parse`` runs finalizers, their Python code can hand the GIL to another thread
    that parses too (a job thread formatting a traceback), and the first parse ends with
    "SystemError: AST constructor recursion depth mismatch". pytest parses the failing
    test's source here, while a failed test's job thread may still run; that error would
    end the whole session without a summary. No collection, no finalizer, no switch."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        return (yield)
    finally:
        if collecting:
            gc.enable()


def collect_ray_garbage() -> None:
    """Collect a finished job's garbage now, while no other thread runs: left to a later,
    random collection, Ray handles' finalizers run inside whatever triggered it, an
    ``ast.parse`` too (see ``pytest_runtest_makereport``)."""
    gc.collect()


@contextlib.contextmanager
def address_file_kept():
    """``Cluster`` writes its address to Ray's ``ray_current_cluster`` file, which a plain
    ``ray.init()`` here would join (and, once the cluster is gone, hang on): put the file
    back as it was, right away and at the end. Tests connect by address."""
    from ray._common.utils import get_ray_address_file

    address_file = Path(get_ray_address_file(None))
    before = address_file.read_text() if address_file.exists() else None

    def put_back():
        if before is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_text(before)

    try:
        yield put_back
    finally:
        put_back()


@pytest.fixture(scope="session")
def ray_cluster():
    """The session's Ray cluster: a head node of 2 CPUs, no dashboard (a process less)."""
    import ray
    from ray.cluster_utils import Cluster

    with address_file_kept() as put_back:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
        put_back()
        try:
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()
            collect_ray_garbage()


@contextlib.contextmanager
def connected_to(cluster):
    """This process connected to ``cluster`` as a job of its own (its actors and workers
    end with it), disconnected at the end."""
    import ray

    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        collect_ray_garbage()


@pytest.fixture
def local_ray(ray_cluster):
    """The test connected to the session's cluster (``connected_to``); yields the cluster."""
    with connected_to(ray_cluster):
        yield ray_cluster


@contextlib.contextmanager
def worker_node(cluster, num_cpus: int):
    """A worker node of ``num_cpus`` CPUs added to ``cluster`` (the test may remove it;
    otherwise it is removed at the end)."""
    node = cluster.add_node(num_cpus=num_cpus)
    try:
        cluster.wait_for_nodes()
        yield node
    finally:
        if node in cluster.worker_nodes:
            cluster.remove_node(node)

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
