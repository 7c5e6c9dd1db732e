"""Benchmark the token store against raw files of the same bytes.

For token sets of 4k and 12k tokens x 3584 channels (bfloat16), on local disk and on a
loopback S3 server (moto, started here), measures:

- write: ``TokenStore.write`` of a new token set vs one ``pipe_file`` of the raw features
  to a new file;
- load: ``TokenStore.read`` by video id (index lookup, fetch, parse, checksum, tensors)
  vs one ``cat_file`` of the raw features viewed as a tensor without copying.

The ratios store/raw show what the format costs. Local reads hit a warm page cache.

    python -m jobs.bench_store --repeats 5
"""
from __future__ import annotations

import contextlib
import logging
import os
import platform
import statistics
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime, timezone

import click
import torch

from pipeline.fingerprint import config_fingerprint, content_hash
from pipeline.store import StoredTokenSet, TokenStore
from sttm.token_set import TokenSet

CHANNELS = 3584
CONFIG = config_fingerprint(
    model_id="bench/model",
    model_revision=None,
    encoder_fingerprint="bench",
    sampling={"fps": 1.0},
    sttm={"budget": 0.3},
)


def bench_record(num_tokens: int) -> StoredTokenSet:
    """A bfloat16 token set of ``num_tokens`` x 3584 on a 64 x 27 x 27 grid, random content."""
    grid = (64, 27, 27)
    tokens = TokenSet(
        features=torch.randn(num_tokens, CHANNELS).to(torch.bfloat16),
        frame=torch.randint(0, grid[0], (num_tokens,), dtype=torch.int32),
        box=torch.randint(0, grid[1], (num_tokens, 4), dtype=torch.int32),
        num_patches=torch.randint(1, 9, (num_tokens,), dtype=torch.int32),
        assignment=torch.randint(0, num_tokens, grid, dtype=torch.int32),
        grid=grid,
        tau_s=0.9,
        tau_t=0.8,
        root_level=1,
        weighted=True,
        head_dim=None,
        budget=0.3,
    )
    return StoredTokenSet(
        video_id="bench-video",
        source_uri="s3://videos/bench.mp4",
        content_hash=content_hash(uuid.uuid4().bytes),
        model_id="bench/model",
        model_revision=None,
        encoder_fingerprint="bench",
        config_fingerprint=CONFIG,
        sampling={"fps": 1.0},
        frame_indices=list(range(grid[0])),
        timestamps=[float(i) for i in range(grid[0])],
        model_extra={},
        tokens=tokens,
        pipeline_version="bench",
        run_id="bench",
        created_at=datetime.now(timezone.utc),
    )


def median_seconds(action: Callable[[], object], repeats: int) -> float:
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


@contextlib.contextmanager
def loopback_s3() -> Iterator[dict]:
    """A moto S3 server on 127.0.0.1 with one bucket; yields s3fs storage options."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {
        "key": "bench",
        "secret": "bench",
        "client_kwargs": {"endpoint_url": f"http://{host}:{port}", "region_name": "us-east-1"},
    }
    boto3.client("s3", aws_access_key_id="bench", aws_secret_access_key="bench", **options["client_kwargs"]).create_bucket(
        Bucket="bench"
    )
    try:
        yield options
    finally:
        server.stop()


def bench_one(url: str, storage_options: dict, num_tokens: int, repeats: int) -> dict:
    """Timings of the store and of raw files for one backend and size."""
    store = TokenStore(url, storage_options)
    fs = store._fs
    raw_paths: list[str] = []
    record = bench_record(num_tokens)
    raw_bytes = record.tokens.features.view(torch.uint8).numpy().tobytes()

    def write_new_token_set() -> None:
        # A fresh content hash each time, so every repeat really writes.
        store.write(StoredTokenSet(**{**record.__dict__, "content_hash": content_hash(uuid.uuid4().bytes)}))

    def write_new_raw_file() -> None:
        # A new file each time, as the store writes a new object each time.
        raw_paths.append(f"{store._root}/raw/{uuid.uuid4().hex}.bin")
        fs.pipe_file(raw_paths[-1], raw_bytes)

    def read_raw_file() -> torch.Tensor:
        with warnings.catch_warnings():  # bytes are read-only; the tensor is only looked at
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(fs.cat_file(raw_paths[-1]), dtype=torch.bfloat16).view(num_tokens, CHANNELS)

    fs.mkdirs(f"{store._root}/raw", exist_ok=True)
    write_seconds = median_seconds(write_new_token_set, repeats)
    raw_write_seconds = median_seconds(write_new_raw_file, repeats)
    object_bytes = store.list()[0].bytes
    load_seconds = median_seconds(lambda: store.read("bench-video"), repeats)
    raw_read_seconds = median_seconds(read_raw_file, repeats)
    return {
        "object_mb": object_bytes / 1e6,
        "write_mb_s": object_bytes / 1e6 / write_seconds,
        "raw_write_mb_s": len(raw_bytes) / 1e6 / raw_write_seconds,
        "load_ms": load_seconds * 1e3,
        "read_mb_s": object_bytes / 1e6 / load_seconds,
        "raw_read_ms": raw_read_seconds * 1e3,
        "raw_read_mb_s": len(raw_bytes) / 1e6 / raw_read_seconds,
    }


@click.command()
@click.option("--repeats", default=5, show_default=True, help="Timed repeats per measurement (median reported).")
@click.option("--tokens", "token_counts", multiple=True, type=int, default=(4000, 12000), show_default=True)
def main(repeats: int, token_counts: tuple[int, ...]) -> None:
    """Print a Markdown table of store vs raw-file throughput and load times."""
    rows = []
    with tempfile.TemporaryDirectory() as local_root, loopback_s3() as s3_options:
        backends = [("local disk", f"{local_root}/store", {}), ("S3 (moto, loopback)", "s3://bench/store", s3_options)]
        for backend, url, options in backends:
            for num_tokens in token_counts:
                rows.append((backend, num_tokens, bench_one(f"{url}-{num_tokens}", options, num_tokens, repeats)))

    print(f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"torch {torch.__version__}; median of {repeats}; bfloat16, {CHANNELS} channels.\n")
    print("| backend | tokens | object MB | write MB/s (raw) | load ms (raw read ms) | load / raw | read MB/s (raw) |")
    print("|---|---|---|---|---|---|---|")
    for backend, num_tokens, r in rows:
        print(
            f"| {backend} | {num_tokens} | {r['object_mb']:.1f} | {r['write_mb_s']:.0f} ({r['raw_write_mb_s']:.0f}) "
            f"| {r['load_ms']:.0f} ({r['raw_read_ms']:.0f}) | {r['load_ms'] / r['raw_read_ms']:.2f}x "
            f"| {r['read_mb_s']:.0f} ({r['raw_read_mb_s']:.0f}) |"
        )


if __name__ == "__main__":
    main()
