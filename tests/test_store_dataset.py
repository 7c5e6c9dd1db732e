"""The store reads as a dataset: the README's "Reading the store" snippets, run as written
with pyarrow, Ray Data and DuckDB, against a store holding token sets, two ids sharing one
video, a manifest and a failure record."""
from __future__ import annotations

import contextlib
import io
import re
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import torch

from pipeline.store import FailureRecord, ManifestEntry, RunManifest, TokenStore
from test_store import BITS_DTYPE, OTHER_CONFIG, make_record, s3_store

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_snippets() -> dict[str, str]:
    """The Python blocks of README "Reading the store", by the reader each is for."""
    section = README.read_text().split("## Reading the store", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"\*\*([^*]+?)[:*].*?```python\n(.*?)```", section, flags=re.S)
    return {name.split()[0].split("/")[0].lower(): code for name, code in blocks}


def fill_store(store: TokenStore) -> list:
    """Three ids under two configs; "copy" has the bytes of "original"; one run manifest
    and one failure record."""
    records = [
        make_record("original", video_bytes=b"same bytes", num_tokens=30, seed=1),
        make_record("copy", video_bytes=b"same bytes", num_tokens=30, seed=1, run_id="run-2"),
        make_record("other", num_tokens=12, seed=2, dtype=torch.float16),
        make_record("other", config=OTHER_CONFIG, num_tokens=7, seed=3, dtype=torch.float32),
    ]
    for record in records:
        store.write(record)
    now = datetime.now(timezone.utc)
    store.write_manifest(RunManifest("run-1", "0.1.0", now, now, {"budget": 0.3}, [
        ManifestEntry(r.video_id, r.source_uri, "stored", None, r.content_hash, r.config_fingerprint) for r in records
    ] + [ManifestEntry("broken", "s3://videos/broken.mp4", "failed")]))
    store.write_failure(FailureRecord("run-1", "broken", "s3://videos/broken.mp4", "decode", "VideoError", "bad",
                                      "0.1.0"))
    return records


@pytest.fixture
def quick_start_store(tmp_path, monkeypatch) -> list:
    """``./sttm-store`` in a fresh working directory, as the quick start leaves it."""
    monkeypatch.chdir(tmp_path)
    return fill_store(TokenStore("sttm-store"))


def run_snippet(code: str) -> tuple[dict, str]:
    namespace: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md (Reading the store)", "exec"), namespace)
    return namespace, out.getvalue()


def expected_rows(records) -> list[tuple]:
    return sorted((r.video_id, r.config_fingerprint, r.num_tokens) for r in records)


def test_the_readme_has_a_snippet_per_reader():
    assert set(readme_snippets()) == {"pyarrow", "ray", "duckdb"}


def test_pyarrow_snippet(quick_start_store):
    namespace, printed = run_snippet(readme_snippets()["pyarrow"])
    per_video = namespace["per_video"]
    assert sorted(zip(per_video["video_id"].to_pylist(), per_video["config_fingerprint"].to_pylist(),
                      per_video["num_tokens"].to_pylist())) == expected_rows(quick_start_store)
    assert "original" in printed and "copy" in printed
    # The snippet's tensor is the first video's tokens, bit for bit.
    first = sorted(quick_start_store, key=lambda r: (r.video_id, r.config_fingerprint))[0]
    features = namespace["features"]
    expected = first.tokens.features
    assert features.dtype == expected.dtype and features.shape == expected.shape
    bits = BITS_DTYPE[expected.dtype]
    assert torch.equal(features.view(bits), expected.view(bits))


def test_ray_data_snippet(quick_start_store):
    import ray

    # A Ray of its own, started in the quick start's folder as a user's would be: its
    # workers resolve the snippet's relative "sttm-store" there (the session's shared
    # cluster started elsewhere).
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        namespace, printed = run_snippet(readme_snippets()["ray"])
    finally:
        ray.shutdown()
    # Three distinct (content, config) pairs; four (id, config) rows: nothing else mixed in.
    assert (namespace["token_sets"], namespace["video_ids"]) == (3, 4)
    assert "4 video ids, 3 token sets" in printed


def test_duckdb_snippet(quick_start_store):
    namespace, printed = run_snippet(readme_snippets()["duckdb"])
    videos = namespace["videos"].fetchall()
    assert sorted((video_id, tokens) for video_id, tokens, *_ in videos) == sorted(
        (video_id, tokens) for video_id, _, tokens in expected_rows(quick_start_store))
    assert namespace["runs"].fetchall() == [("run-1", 5, 4, 0, 1)]
    assert "original" in printed


def test_every_prefix_holds_parquet_of_one_kind_only(quick_start_store):
    root = Path("sttm-store")
    prefixes = {path.relative_to(root).parts[0] for path in root.rglob("*") if path.is_file()}
    assert prefixes == {"tokens", "index", "manifests", "failures"}
    for path in root.rglob("*"):
        assert path.is_dir() or path.suffix == ".parquet", path
    # A token set's rows do not carry ids; the id table names every id.
    assert "video_id" not in ds.dataset(root / "tokens", format="parquet").schema.names
    assert sorted(ds.dataset(root / "index", format="parquet").to_table().column("video_id").to_pylist()) == [
        "copy", "original", "other", "other"]


def test_store_dataset_on_s3_with_its_storage_options(s3_server):
    store, _ = s3_store(s3_server)
    records = fill_store(store)
    tokens = store.dataset("tokens").to_table(columns=["content_hash", "config_fingerprint", "num_tokens"])
    index = store.dataset("index").to_table(columns=["video_id", "content_hash", "config_fingerprint"])
    joined = index.join(tokens, ["content_hash", "config_fingerprint"])
    assert sorted(zip(joined["video_id"].to_pylist(), joined["config_fingerprint"].to_pylist(),
                      joined["num_tokens"].to_pylist())) == expected_rows(records)
    assert store.dataset("manifests").count_rows() == 1 and store.dataset("failures").count_rows() == 1
    with pytest.raises(ValueError, match="kind"):
        store.dataset("index/../tokens")
