"""The token store on local disk and on a real S3-protocol server (the ``s3_server`` fixture)."""
from __future__ import annotations

import hashlib
import io
import json
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pipeline.store as store_module
import schemas
from pipeline.fingerprint import config_fingerprint, content_hash
from pipeline.store import (
    AmbiguousError,
    CorruptObjectError,
    FailureRecord,
    ManifestEntry,
    NotFoundError,
    RunManifest,
    SchemaVersionError,
    StoredTokenSet,
    TokenStore,
    token_set_key,
)
from pipeline.uris import redact_urls, sanitize_uri
from sttm.token_set import TokenSet

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent

CONFIG = config_fingerprint(
    model_id="tiny/qwen2-vl",
    model_revision="abc123",
    encoder_fingerprint="enc-1",
    sampling={"fps": 1.0, "max_frames": 8},
    sttm={"budget": 0.3, "root_level": 1, "weighted": True},
)
OTHER_CONFIG = config_fingerprint(
    model_id="tiny/qwen2-vl",
    model_revision="abc123",
    encoder_fingerprint="enc-1",
    sampling={"fps": 2.0, "max_frames": 8},
    sttm={"budget": 0.5, "root_level": 1, "weighted": True},
)
SIGNED_URL = "https://user:hunter2@cdn.example.com/videos/v.mp4?X-Amz-Credential=AKIAEXAMPLEKEY&X-Amz-Signature=deadbeef0123"
SECRETS = ("hunter2", "AKIAEXAMPLEKEY", "deadbeef0123")

# Integer views with the same width as each float dtype: comparing them compares bits,
# so NaN payloads, -0.0 and subnormals must survive too.
BITS_DTYPE = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

# A piece size for tests: small token sets then span many pieces.
SMALL_PIECE = 64 * 2**10


def make_tokens(
    num_tokens: int = 40,
    channels: int = 32,
    dtype: torch.dtype = torch.bfloat16,
    grid: tuple[int, int, int] = (2, 6, 6),
    seed: int = 0,
    tau_t: float | None = 0.8,
    head_dim: int | None = None,
    budget: float | None = 0.3,
) -> TokenSet:
    """A token set whose features are random bit patterns (every value a dtype can hold)."""
    generator = torch.Generator().manual_seed(seed)
    bits = BITS_DTYPE[dtype]
    info = torch.iinfo(bits)
    features = torch.randint(info.min, info.max, (num_tokens, channels), generator=generator, dtype=bits).view(dtype)
    t, h, w = grid
    return TokenSet(
        features=features,
        frame=torch.randint(0, t, (num_tokens,), generator=generator, dtype=torch.int32),
        box=torch.randint(0, max(h, w), (num_tokens, 4), generator=generator, dtype=torch.int32),
        num_patches=torch.randint(1, 5, (num_tokens,), generator=generator, dtype=torch.int32),
        assignment=torch.randint(0, num_tokens, grid, generator=generator, dtype=torch.int32),
        grid=grid,
        tau_s=0.9,
        tau_t=tau_t,
        root_level=1,
        weighted=True,
        head_dim=head_dim,
        budget=budget,
    )


def make_record(
    video_id: str = "video-1",
    video_bytes: bytes | None = None,
    config: str = CONFIG,
    source_uri: str | None = None,
    run_id: str = "run-1",
    **token_options,
) -> StoredTokenSet:
    tokens = make_tokens(**token_options)
    frames = tokens.grid[0]
    return StoredTokenSet(
        video_id=video_id,
        source_uri=source_uri or f"s3://videos/{video_id}.mp4",
        content_hash=content_hash(video_bytes if video_bytes is not None else f"bytes of {video_id}".encode()),
        model_id="tiny/qwen2-vl",
        model_revision="abc123",
        encoder_fingerprint="enc-1",
        config_fingerprint=config,
        sampling={"fps": 1.0, "max_frames": 8},
        frame_indices=list(range(0, 2 * frames, 2)),
        timestamps=[0.5 * i for i in range(frames)],
        model_extra={"grid_thw": [frames, 12, 12], "seconds_per_grid_t": 2.0},
        tokens=tokens,
        pipeline_version="0.1.0",
        run_id=run_id,
        created_at=datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc),
    )


def assert_same_record(read: StoredTokenSet, written: StoredTokenSet, checksum: str | None = None) -> None:
    """Equal in every field; tokens bit for bit; the payload checksum read is ``checksum``
    (by default the one a write stores now)."""
    a, b = read.tokens, written.tokens
    assert a.features.dtype == b.features.dtype and a.features.shape == b.features.shape
    bits = BITS_DTYPE[b.features.dtype]
    assert torch.equal(a.features.view(bits), b.features.view(bits))
    for name in ("frame", "box", "num_patches", "assignment"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("grid", "tau_s", "tau_t", "root_level", "weighted", "head_dim", "budget"):
        assert getattr(a, name) == getattr(b, name), name
    assert read.payload_checksum == (checksum or store_module.payload_checksum(b))
    expected = replace(written, source_uri=sanitize_uri(written.source_uri))
    for name in StoredTokenSet.__dataclass_fields__:
        if name not in ("tokens", "payload_checksum"):
            assert getattr(read, name) == getattr(expected, name), name


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()


def checksum_header(tokens: TokenSet) -> bytes:
    (n, c), (t, h, w) = tokens.features.shape, tokens.grid
    return f"{DTYPE_NAMES[tokens.features.dtype]} {n}x{c} {t}x{h}x{w}\n".encode()


def pieces_checksum(tokens: TokenSet, piece_bytes: int = 4 * 2**20) -> str:
    """The schema 2.x payload checksum, computed as schemas/README.md defines it."""
    features = tensor_bytes(tokens.features)
    digest = hashlib.sha256(checksum_header(tokens))
    for start in range(0, len(features), piece_bytes):
        digest.update(hashlib.sha256(features[start : start + piece_bytes]).digest())
    for tensor in (tokens.frame, tokens.box, tokens.num_patches, tokens.assignment):
        digest.update(tensor_bytes(tensor))
    return f"sha256-pieces:{digest.hexdigest()}"


def stream_checksum(tokens: TokenSet) -> str:
    """The schema 1.x payload checksum, computed as schemas/README.md defines it."""
    digest = hashlib.sha256(checksum_header(tokens))
    for tensor in (tokens.features, tokens.frame, tokens.box, tokens.num_patches, tokens.assignment):
        digest.update(tensor_bytes(tensor))
    return f"sha256:{digest.hexdigest()}"


def flip_bit_inside(data: bytes, part: bytes) -> bytes:
    """``data`` with one bit flipped two thirds into its only copy of ``part``."""
    at = data.find(part)
    assert at >= 0 and data.find(part, at + 1) == -1, "part must occur exactly once"
    flipped = bytearray(data)
    flipped[at + 2 * len(part) // 3] ^= 0x10
    return bytes(flipped)


@dataclass
class RawStore:
    """A store, and raw access to its objects by key (bypassing the store)."""

    store: TokenStore
    get: Callable[[str], bytes]
    put: Callable[[str, bytes], object]


@pytest.fixture(params=["local", "s3"])
def raw_store(request, tmp_path) -> RawStore:
    """A store on local disk, or on the S3 server."""
    if request.param == "local":
        def put(key: str, data: bytes) -> None:
            (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / key).write_bytes(data)

        return RawStore(TokenStore(str(tmp_path)), lambda key: (tmp_path / key).read_bytes(), put)
    s3_server = request.getfixturevalue("s3_server")
    store, bucket = s3_store(s3_server)
    client = s3_server.client()
    return RawStore(
        store,
        lambda key: client.get_object(Bucket=bucket, Key=f"store/{key}")["Body"].read(),
        lambda key, data: client.put_object(Bucket=bucket, Key=f"store/{key}", Body=data),
    )


def s3_store(s3_server, prefix: str = "store") -> tuple[TokenStore, str]:
    bucket = s3_server.make_bucket()
    return TokenStore(f"s3://{bucket}/{prefix}", s3_server.storage_options), bucket


def bucket_objects(s3_server, bucket: str) -> dict[str, bytes]:
    client = s3_server.client()
    listing = client.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {item["Key"]: client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read() for item in listing}


# ---------------------------------------------------------------------------------------
# Round trips


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    num_tokens=st.integers(1, 72),
    channels=st.integers(1, 40),
    seed=st.integers(0, 2**31 - 1),
    tau_t=st.none() | st.floats(-1, 1),
    head_dim=st.none() | st.integers(1, 8),
    budget=st.none() | st.floats(0.01, 1),
)
def test_token_sets_round_trip_bit_exact(tmp_path, dtype, num_tokens, channels, seed, tau_t, head_dim, budget):
    store = TokenStore(str(tmp_path / uuid.uuid4().hex))
    record = make_record(
        dtype=dtype, num_tokens=num_tokens, channels=channels, seed=seed, tau_t=tau_t, head_dim=head_dim, budget=budget
    )
    store.write(record)
    assert_same_record(store.read(record.video_id), record)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_on_s3(s3_server, dtype):
    store, _ = s3_store(s3_server)
    record = make_record(dtype=dtype, num_tokens=300, channels=64, grid=(4, 10, 10))
    key = store.write(record)
    assert key == token_set_key(record.content_hash, CONFIG)
    assert_same_record(store.read(record.video_id, CONFIG), record)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_features_spanning_many_pieces_round_trip_bit_exact(raw_store, monkeypatch, dtype):
    monkeypatch.setattr(store_module, "_PIECE_BYTES", SMALL_PIECE)
    # On S3 the footer (about 12 KB) then takes a second GET.
    monkeypatch.setattr(store_module, "_TAIL_BYTES", 1024)
    record = make_record(dtype=dtype, num_tokens=700, channels=300, grid=(4, 20, 20))
    nbytes = record.tokens.features.numel() * record.tokens.features.element_size()
    assert nbytes > 6 * SMALL_PIECE and nbytes % SMALL_PIECE, "many pieces, the last one shorter"
    raw_store.store.write(record)

    read = raw_store.store.read(record.video_id)
    assert_same_record(read, record)
    assert read.payload_checksum == pieces_checksum(record.tokens, SMALL_PIECE)
    features = read.tokens.features
    assert features.device.type == "cpu" and features.is_contiguous()
    assert features.view(torch.uint8).numpy().flags.writeable


def test_features_over_4_mib_round_trip_with_the_real_piece_size(tmp_path):
    store = TokenStore(str(tmp_path))
    record = make_record(num_tokens=2400, channels=3584, grid=(8, 16, 16))  # 17.2 MB: 5 pieces
    store.write(record)
    read = store.read(record.video_id)
    assert_same_record(read, record)
    assert read.payload_checksum == pieces_checksum(record.tokens)


def test_s3_read_fetches_the_footer_the_small_columns_and_the_feature_pieces(s3_server, monkeypatch):
    monkeypatch.setattr(store_module, "_PIECE_BYTES", SMALL_PIECE)
    store, _ = s3_store(s3_server)
    record = make_record(num_tokens=500, channels=256, grid=(4, 16, 16))  # 256000 bytes: 4 pieces
    store.write(record)
    fetches = []
    fetch = store_module._RemoteObject._fetch

    def recorded_fetch(self, ranges):
        fetches.append(ranges)
        return fetch(self, ranges)

    monkeypatch.setattr(store_module._RemoteObject, "_fetch", recorded_fetch)

    assert_same_record(store.read(record.video_id), record)
    footer, columns, *pieces = fetches
    assert len(footer) == 1 and len(columns) == 2, "the small columns before and after the features, in one batch"
    assert [len(ranges) for ranges in pieces] == [1] * 4
    assert sum(end - start for ((start, end),) in pieces) == 256000


def test_file_url_and_plain_path_name_the_same_store(tmp_path):
    record = make_record()
    TokenStore(f"file://{tmp_path}").write(record)
    assert_same_record(TokenStore(str(tmp_path)).read(record.video_id), record)


def test_stored_columns_are_exactly_the_schema(tmp_path):
    store = TokenStore(str(tmp_path))
    key = store.write(make_record())
    stored = pq.read_schema(tmp_path / key)
    expected = schemas.TOKEN_SET.arrow_schema()
    assert [(f.name, f.type, f.nullable) for f in stored] == [(f.name, f.type, f.nullable) for f in expected]
    assert stored.metadata[b"sttm.schema_version"] == schemas.TOKEN_SET.version.encode()


# ---------------------------------------------------------------------------------------
# Listing, lookup by id and config, idempotent re-runs


def test_list_and_read_by_id_and_config(s3_server):
    store, _ = s3_store(s3_server)
    first = make_record("video-a", num_tokens=20)
    second = make_record("video-b", num_tokens=30)
    second_other_config = make_record("video-b", config=OTHER_CONFIG, num_tokens=10)
    for record in (first, second, second_other_config):
        store.write(record)

    summaries = store.list()
    assert [(s.video_id, s.config_fingerprint) for s in summaries] == sorted(
        [("video-a", CONFIG), ("video-b", CONFIG), ("video-b", OTHER_CONFIG)]
    )
    by_config = {(s.video_id, s.config_fingerprint): s for s in summaries}
    summary = by_config[("video-b", OTHER_CONFIG)]
    assert summary.num_tokens == 10 and summary.original_tokens == 72
    assert summary.retention == pytest.approx(10 / 72)
    assert summary.model_id == "tiny/qwen2-vl" and summary.bytes > 0
    assert summary.key == token_set_key(second_other_config.content_hash, OTHER_CONFIG)
    assert [s.video_id for s in store.list(OTHER_CONFIG)] == ["video-b"]

    assert_same_record(store.read("video-a"), first)
    assert_same_record(store.read("video-b", OTHER_CONFIG), second_other_config)
    with pytest.raises(AmbiguousError, match="video-b.*2 configs"):
        store.read("video-b")


def test_missing_video_is_a_not_found_error_naming_it(s3_server):
    store, _ = s3_store(s3_server)
    store.write(make_record("video-a"))
    with pytest.raises(NotFoundError, match="no-such-video") as error:
        store.read("no-such-video")
    assert isinstance(error.value, KeyError)
    with pytest.raises(NotFoundError, match=f"video-a.*{OTHER_CONFIG}"):
        store.read("video-a", OTHER_CONFIG)


def test_rerun_is_idempotent(s3_server):
    store, bucket = s3_store(s3_server)
    record = make_record()
    assert not store.exists(record.content_hash, CONFIG)
    key = store.write(record)
    objects_after_first_run = bucket_objects(s3_server, bucket)
    assert store.exists(record.content_hash, CONFIG)
    assert store.exists(record.content_hash, CONFIG, video_id=record.video_id)

    rerun = replace(record, run_id="run-2", created_at=record.created_at + timedelta(days=1))
    assert store.write(rerun) == key
    objects_after_rerun = bucket_objects(s3_server, bucket)
    assert objects_after_rerun.keys() == objects_after_first_run.keys()
    token_key = f"store/{key}"
    assert objects_after_rerun[token_key] == objects_after_first_run[token_key], "token sets are never rewritten"
    assert len(store.list()) == 1
    assert store.read(record.video_id).run_id == "run-2", "the index entry names the run that last wrote it"


def test_same_video_content_under_two_ids_shares_one_object(s3_server):
    store, bucket = s3_store(s3_server)
    original = make_record("original", video_bytes=b"same bytes")
    copy = make_record("copy", video_bytes=b"same bytes", source_uri="s3://videos/copy.mp4")
    assert store.write(original) == store.write(copy)
    assert not store.exists(original.content_hash, CONFIG, video_id="third-name")
    assert sum(key.startswith("store/tokens/") for key in bucket_objects(s3_server, bucket)) == 1
    read_copy = store.read("copy")
    assert (read_copy.video_id, read_copy.source_uri) == ("copy", "s3://videos/copy.mp4")
    assert_same_record(store.read("original"), original)


# ---------------------------------------------------------------------------------------
# A writer killed mid-write leaves nothing visible; the re-run completes

# Runs in a child process: writes one big token set and hangs where part of it is written,
# announcing "MID_WRITE" so the test can SIGKILL it there. On S3 that is after the first
# multipart part; locally, before the object under the folder `hang_at` is put in place
# ("tokens": the token set is in its temp file; "index": it is in place, its index entry
# is in a temp file).
_WRITER_CHILD = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
from test_store import BIG_RECORD, make_record
from pipeline.store import TokenStore

url, storage_options, num_tokens, hang_at = sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), sys.argv[5]

def announce_and_hang(*args, **kwargs):
    print("MID_WRITE", flush=True)
    time.sleep(600)

if url.startswith("s3://"):
    import s3fs
    call_s3 = s3fs.S3FileSystem._call_s3
    async def call_s3_then_hang(self, method, *args, **kwargs):
        out = await call_s3(self, method, *args, **kwargs)
        if method == "upload_part":
            announce_and_hang()
        return out
    s3fs.S3FileSystem._call_s3 = call_s3_then_hang
else:
    # Token sets are put in place with a hard link (create only), index entries with a rename.
    rename, link = os.replace, os.link
    def rename_or_hang(source, target):
        if f"/{hang_at}/" in target:
            announce_and_hang()
        rename(source, target)
    def link_or_hang(source, target):
        if f"/{hang_at}/" in target:
            announce_and_hang()
        link(source, target)
    os.replace, os.link = rename_or_hang, link_or_hang

TokenStore(url, storage_options).write(make_record(**BIG_RECORD[num_tokens]))
print("FINISHED", flush=True)
"""

# Big enough that s3fs uploads it in parts (it does so from 2 x 50 MiB on).
BIG_RECORD = {
    15000: dict(num_tokens=15000, channels=3584, grid=(16, 32, 32)),
    2000: dict(num_tokens=2000, channels=3584, grid=(8, 16, 16)),
}


def run_writer_and_kill_it_mid_write(url: str, storage_options: dict, num_tokens: int, hang_at: str = "") -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _WRITER_CHILD, str(TESTS_DIR), url, json.dumps(storage_options), str(num_tokens), hang_at],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = child.stdout.readline()
        assert line.strip() == "MID_WRITE", f"writer did not reach mid-write: {line!r} {child.stderr.read()[-2000:]}"
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
        child.stderr.close()


def assert_no_entry_visible(store: TokenStore, record: StoredTokenSet) -> None:
    assert store.list() == []
    assert not store.exists(record.content_hash, CONFIG, video_id=record.video_id)
    with pytest.raises(NotFoundError):
        store.read(record.video_id)


@pytest.mark.parametrize("hang_at", ["tokens", "index"])
def test_writer_killed_mid_write_on_local_disk(tmp_path, hang_at):
    store = TokenStore(str(tmp_path))
    run_writer_and_kill_it_mid_write(str(tmp_path), {}, 2000, hang_at)

    record = make_record(**BIG_RECORD[2000])
    assert list(tmp_path.glob(f"{hang_at}/*/.*.tmp")), "the child should have died with its temp file written"
    assert_no_entry_visible(store, record)
    assert store.exists(record.content_hash, CONFIG) == (hang_at == "index")

    store.write(record)
    assert_same_record(store.read(record.video_id), record)


def test_writer_killed_mid_write_on_s3(s3_server):
    store, bucket = s3_store(s3_server)
    run_writer_and_kill_it_mid_write(store.url, s3_server.storage_options, 15000)

    record = make_record(**BIG_RECORD[15000])
    client = s3_server.client()
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads"), "the child should have died mid-upload"
    assert bucket_objects(s3_server, bucket) == {}
    assert_no_entry_visible(store, record)
    assert not store.exists(record.content_hash, CONFIG)

    store.write(record)
    assert_same_record(store.read(record.video_id), record)


# ---------------------------------------------------------------------------------------
# Corrupt objects


@pytest.mark.parametrize(
    ("column", "error"),
    [
        ("features", "token payload does not match its checksum sha256-pieces:"),
        ("assignment", "not a readable Parquet file .*CRC"),  # a small column: its page CRC
    ],
)
def test_a_flipped_bit_is_a_corrupt_object_error_naming_it(raw_store, monkeypatch, column, error):
    monkeypatch.setattr(store_module, "_PIECE_BYTES", SMALL_PIECE)
    store = raw_store.store
    record = make_record(num_tokens=500, channels=256, grid=(4, 16, 16))
    key = store.write(record)
    raw_store.put(key, flip_bit_inside(raw_store.get(key), tensor_bytes(getattr(record.tokens, column))))

    with pytest.raises(CorruptObjectError, match=f"{store.url}/{key}:? .*{error}"):
        store.read(record.video_id)
    # Re-running the video replaces the corrupt object.
    store.write(record)
    assert_same_record(store.read(record.video_id), record)


def test_truncated_object_is_a_corrupt_object_error_naming_it(s3_server):
    store, bucket = s3_store(s3_server)
    record = make_record()
    key = store.write(record)
    client = s3_server.client()
    data = client.get_object(Bucket=bucket, Key=f"store/{key}")["Body"].read()
    client.put_object(Bucket=bucket, Key=f"store/{key}", Body=data[: len(data) // 2])

    with pytest.raises(CorruptObjectError, match=f"{key}.*truncated"):
        store.read(record.video_id)
    assert not store.exists(record.content_hash, CONFIG, video_id=record.video_id)


@pytest.mark.parametrize("kind", ["sha256-pieces", "sha256"])
def test_payload_not_matching_its_checksum_is_a_corrupt_object_error(tmp_path, monkeypatch, kind):
    # A well-formed Parquet file whose tokens are not the ones the checksum was taken of.
    store = TokenStore(str(tmp_path))
    record = make_record()
    monkeypatch.setattr(store_module, "payload_checksum", lambda tokens: f"{kind}:" + "0" * 64)
    key = store.write(record)
    monkeypatch.undo()
    with pytest.raises(CorruptObjectError, match=f"{key}: token payload does not match its checksum {kind}:"):
        store.read(record.video_id)


def test_unknown_payload_checksum_kind_is_a_corrupt_object_error(tmp_path, monkeypatch):
    store = TokenStore(str(tmp_path))
    record = make_record()
    monkeypatch.setattr(store_module, "payload_checksum", lambda tokens: "md5:" + "0" * 32)
    key = store.write(record)
    monkeypatch.undo()
    with pytest.raises(CorruptObjectError, match=f"{key} has a payload checksum of unknown kind 'md5'"):
        store.read(record.video_id)


def test_garbage_index_entry_is_a_corrupt_object_error(tmp_path):
    store = TokenStore(str(tmp_path))
    store.write(make_record())
    (entry_path,) = tmp_path.glob("index/*/*.parquet")
    entry_path.write_text("{not parquet")
    with pytest.raises(CorruptObjectError, match=str(entry_path.relative_to(tmp_path))):
        store.read("video-1")


# ---------------------------------------------------------------------------------------
# Schema versions


def at_version(schema: schemas.RecordSchema, version: str) -> schemas.RecordSchema:
    return replace(schema, version=version)


def test_token_sets_and_index_entries_read_their_older_majors_other_records_only_their_own():
    assert (schemas.TOKEN_SET.version, schemas.TOKEN_SET.reads_majors) == ("3.1", (1, 2, 3))
    assert (schemas.INDEX_ENTRY.version, schemas.INDEX_ENTRY.reads_majors) == ("2.0", (1, 2))
    for schema in (schemas.RUN_MANIFEST, schemas.FAILURE):
        assert schema.reads_majors == (schema.major,), schema.name


def test_store_written_with_a_newer_major_version_is_refused(s3_server, monkeypatch):
    store, _ = s3_store(s3_server)
    record = make_record()
    # Write the store as a future sttm-pipeline with newer major versions would.
    monkeypatch.setattr(store_module, "TOKEN_SET", at_version(schemas.TOKEN_SET, "4.0"))
    monkeypatch.setattr(store_module, "INDEX_ENTRY", at_version(schemas.INDEX_ENTRY, "3.0"))
    store.write(record)
    monkeypatch.undo()

    with pytest.raises(SchemaVersionError, match=r"index_entry schema version 3\.0.*upgrade sttm-pipeline"):
        store.read(record.video_id)
    with pytest.raises(SchemaVersionError, match=r"3\.0"):
        store.list()
    # A re-run neither skips nor overwrites what a newer sttm-pipeline wrote.
    with pytest.raises(SchemaVersionError):
        store.check(record.content_hash, CONFIG, record.video_id)


def test_token_set_of_a_newer_major_version_is_refused_naming_it(tmp_path, monkeypatch):
    store = TokenStore(str(tmp_path))
    record = make_record()
    monkeypatch.setattr(store_module, "TOKEN_SET", at_version(schemas.TOKEN_SET, "4.0"))
    key = store.write(record)
    monkeypatch.undo()
    with pytest.raises(SchemaVersionError, match=rf"{key} was written with token_set schema version 4\.0.*upgrade"):
        store.read(record.video_id)


def test_token_set_of_a_major_version_no_longer_read_is_refused_naming_it(tmp_path, monkeypatch):
    store = TokenStore(str(tmp_path))
    record = make_record()
    monkeypatch.setattr(store_module, "TOKEN_SET", at_version(schemas.TOKEN_SET, "0.9"))
    key = store.write(record)
    monkeypatch.undo()
    with pytest.raises(SchemaVersionError, match=rf"{key} .* version 0\.9, older.*re-run the job"):
        store.read(record.video_id)


def test_newer_minor_version_is_still_read(tmp_path, monkeypatch):
    store = TokenStore(str(tmp_path))
    record = make_record()
    monkeypatch.setattr(store_module, "TOKEN_SET", at_version(schemas.TOKEN_SET, "3.7"))
    monkeypatch.setattr(store_module, "INDEX_ENTRY", at_version(schemas.INDEX_ENTRY, "2.7"))
    store.write(record)
    monkeypatch.undo()
    assert_same_record(store.read(record.video_id), record)


LEGACY_SCHEMAS = TESTS_DIR / "data" / "legacy_schemas"


def legacy_schema(file_name: str, version: str) -> schemas.RecordSchema:
    """A schema as an older sttm-pipeline shipped it (copied from its schemas/)."""
    spec = json.loads((LEGACY_SCHEMAS / file_name).read_text())
    return schemas.RecordSchema(
        name=spec["name"], version=version, description=spec["description"],
        fields=tuple(schemas._field_spec(field) for field in spec["fields"]), reads_majors=(int(version[0]),),
    )


def write_legacy(raw_store: RawStore, record: StoredTokenSet, token_set_version: str = "2.0") -> str:
    """Write ``record`` as sttm-pipeline did before token_set 3.0 and index_entry 2.0: the
    token set with the video id, source, run id and time inside (schema 1.0 with the
    whole-stream "sha256:" payload checksum), and a JSON index entry beside it."""
    old_schema = legacy_schema("token_set_2.0.json", token_set_version)
    identity = {"video_id": record.video_id, "source_uri": sanitize_uri(record.source_uri),
                "run_id": record.run_id, "created_at": record.created_at}
    encode = store_module._encode_one_row

    def encode_old(schema, row, uncompressed=()):
        old_row = {**row, **identity}
        return encode(old_schema, {name: old_row[name] for name in old_schema.field_names}, uncompressed)

    with pytest.MonkeyPatch.context() as old_writer:
        old_writer.setattr(store_module, "_encode_one_row", encode_old)
        if token_set_version.startswith("1."):
            old_writer.setattr(store_module, "payload_checksum", stream_checksum)
        data = store_module._encode_token_set(record).to_pybytes()
    key = token_set_key(record.content_hash, record.config_fingerprint)
    raw_store.put(key, data)
    entry = {"schema_version": "1.0", **identity, "key": key, "content_hash": record.content_hash,
             "config_fingerprint": record.config_fingerprint, "model_id": record.model_id,
             "num_tokens": record.num_tokens, "original_tokens": record.original_tokens, "object_bytes": len(data),
             "created_at": datetime.now(timezone.utc).isoformat()}
    entry["created_at"] = record.created_at.isoformat()
    legacy_key = store_module.index_key(record.video_id, record.config_fingerprint).replace(".parquet", ".json")
    raw_store.put(legacy_key, json.dumps(entry).encode())
    return key


def test_token_set_of_schema_1_0_is_still_read(raw_store, monkeypatch):
    monkeypatch.setattr(store_module, "_PIECE_BYTES", SMALL_PIECE)  # read in pieces, hashed as one stream
    record = make_record(num_tokens=500, channels=256, grid=(4, 16, 16))
    key = write_legacy(raw_store, record, "1.0")
    stored = pq.read_table(io.BytesIO(raw_store.get(key)), columns=["payload_checksum"])
    assert stored.schema.metadata[b"sttm.schema_version"] == b"1.0"
    assert stored.column("payload_checksum")[0].as_py().startswith("sha256:")

    assert_same_record(raw_store.store.read(record.video_id), record, checksum=stream_checksum(record.tokens))


def test_corrupt_token_set_of_schema_1_0_is_a_corrupt_object_error(raw_store, monkeypatch):
    monkeypatch.setattr(store_module, "_PIECE_BYTES", SMALL_PIECE)
    store = raw_store.store
    record = make_record(num_tokens=500, channels=256, grid=(4, 16, 16))
    key = write_legacy(raw_store, record, "1.0")
    raw_store.put(key, flip_bit_inside(raw_store.get(key), tensor_bytes(record.tokens.features)))
    with pytest.raises(CorruptObjectError, match=f"{store.url}/{key}: token payload does not match .* sha256:"):
        store.read(record.video_id)


# ---------------------------------------------------------------------------------------
# Untrusted ids and URIs

HOSTILE_IDS = ["../../x", "/etc/x", "..", ".", "a/../../b", "..\\..\\x", "x\x00y", "CON", "Video", "video", "é/🎥"]


def test_hostile_video_ids_stay_inside_the_root_on_local_disk(tmp_path):
    root = tmp_path / "nested" / "root"
    store = TokenStore(str(root))
    records = [make_record(video_id, seed=i) for i, video_id in enumerate(HOSTILE_IDS)]
    for record in records:
        store.write(record)
    for record in records:
        assert_same_record(store.read(record.video_id), record)
    assert sorted(s.video_id for s in store.list()) == sorted(HOSTILE_IDS)
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and root not in p.parents]
    assert outside == []


def test_hostile_video_ids_stay_inside_the_prefix_on_s3(s3_server):
    store, bucket = s3_store(s3_server, prefix="root")
    for i, video_id in enumerate(HOSTILE_IDS[:4]):
        store.write(make_record(video_id, seed=i))
        assert store.read(video_id).video_id == video_id
    assert all(key.startswith("root/") for key in bucket_objects(s3_server, bucket))


@pytest.mark.parametrize(
    "bad_field",
    [
        {"content_hash": "sha256:../../x"},
        {"content_hash": "md5:" + "0" * 32},
        {"config_fingerprint": "../../x"},
        {"config_fingerprint": "ABCDEF0123456789"},
        {"run_id": "../x"},
        {"run_id": "a/b"},
        {"video_id": ""},
    ],
)
def test_malformed_key_parts_are_refused_before_writing(tmp_path, bad_field):
    store = TokenStore(str(tmp_path / "root"))
    with pytest.raises(ValueError):
        store.write(replace(make_record(), **bad_field))
    assert not (tmp_path / "root").exists()


def test_credentials_never_reach_objects_logs_or_errors(s3_server, caplog):
    caplog.set_level("DEBUG")
    store, bucket = s3_store(s3_server)
    store.write(make_record(source_uri=SIGNED_URL))
    store.write_failure(
        FailureRecord(
            run_id="run-1",
            video_id="video-2",
            source_uri=SIGNED_URL,
            stage="decode",
            error_type="HTTPError",
            message=f"403 Forbidden for url: {SIGNED_URL}",
            pipeline_version="0.1.0",
        )
    )
    now = datetime.now(timezone.utc)
    store.write_manifest(
        RunManifest(
            run_id="run-1",
            pipeline_version="0.1.0",
            started_at=now,
            finished_at=now,
            job_config={"inputs": [SIGNED_URL]},
            entries=[ManifestEntry(video_id="video-1", source_uri=SIGNED_URL, status="stored")],
        )
    )
    messages = [repr(store), store.read("video-1").source_uri, store.list()[0].source_uri]
    messages += [f.message + f.source_uri for f in store.list_failures()]
    messages += [json.dumps(m.job_config) + m.entries[0].source_uri for m in store.list_manifests()]
    with pytest.raises(ValueError) as id_error:
        store.read(SIGNED_URL)
    messages.append(str(id_error.value))
    messages.append(caplog.text)

    stored = b"".join(bucket_objects(s3_server, bucket).values())
    for secret in (*SECRETS, s3_server.storage_options["secret"]):
        assert secret.encode() not in stored
        assert all(secret not in message for message in messages), secret
    assert "https://cdn.example.com/videos/v.mp4" in messages[1]


def test_sanitize_uri_and_redact_urls():
    assert sanitize_uri(SIGNED_URL) == "https://cdn.example.com/videos/v.mp4"
    assert sanitize_uri("s3://bucket/a/b.mp4?versionId=3#x") == "s3://bucket/a/b.mp4"
    assert sanitize_uri("/data/videos/a?b.mp4") == "/data/videos/a?b.mp4"
    assert redact_urls(f"failed: '{SIGNED_URL}' then s3://b/k") == "failed: 'https://cdn.example.com/videos/v.mp4' then s3://b/k"


# ---------------------------------------------------------------------------------------
# Run manifests and failure records


def test_manifests_and_failures_round_trip(s3_server):
    store, _ = s3_store(s3_server)
    start = datetime(2025, 3, 1, 2, 0, tzinfo=timezone.utc)
    manifests = [
        RunManifest(
            run_id=f"nightly-{day}",
            pipeline_version="0.1.0",
            started_at=start + timedelta(days=day),
            finished_at=start + timedelta(days=day, hours=1),
            job_config={"input": "s3://videos/", "budget": 0.3},
            entries=[
                ManifestEntry("video-1", "s3://videos/1.mp4", "stored", "tokens/x.parquet", "sha256:" + "1" * 64, CONFIG),
                ManifestEntry("video-2", "s3://videos/2.mp4", "skipped", "tokens/y.parquet", "sha256:" + "2" * 64, CONFIG),
                ManifestEntry("video-3", "s3://videos/3.mp4", "failed"),
            ],
        )
        for day in (2, 1)
    ]
    for manifest in manifests:
        store.write_manifest(manifest)
    assert store.list_manifests() == sorted(manifests, key=lambda m: m.started_at)
    assert [manifests[0].count(status) for status in ("stored", "skipped", "failed")] == [1, 1, 1]

    failures = [
        FailureRecord("nightly-1", f"video-{i}", f"s3://videos/{i}.mp4", "decode", "ValueError", "bad frame",
                      "0.1.0", created_at=start + timedelta(minutes=i))
        for i in range(2)
    ] + [FailureRecord("nightly-2", "video-9", "s3://videos/9.mp4", "encode", "OOM", "no memory", "0.1.0",
                       content_hash="sha256:" + "9" * 64, config_fingerprint=CONFIG, created_at=start)]
    for failure in failures:
        store.write_failure(failure)
    assert store.list_failures("nightly-1") == failures[:2]
    assert len(store.list_failures()) == 3
    with pytest.raises(ValueError, match="stage"):
        store.write_failure(replace(failures[0], stage="somewhere"))


def test_empty_store_lists_nothing(s3_server, tmp_path):
    for store in (s3_store(s3_server)[0], TokenStore(str(tmp_path / "never-written"))):
        assert store.list() == [] and store.list_manifests() == [] and store.list_failures() == []


# ---------------------------------------------------------------------------------------
# schemas/ documents every stored field


def test_every_stored_field_is_described():
    readme = (REPO_ROOT / "schemas" / "README.md").read_text()
    for schema in (schemas.TOKEN_SET, schemas.INDEX_ENTRY, schemas.RUN_MANIFEST, schemas.FAILURE):
        fields = list(schema.fields) + [sub for f in schema.fields for sub in f.fields]
        for field in fields:
            assert len(field.description) > 10, (schema.name, field.name)
            assert f"`{field.name}`" in readme, (schema.name, field.name)
        assert schema.arrow_schema().metadata[b"sttm.schema_version"] == schema.version.encode()


def test_features_are_stored_as_one_uncompressed_value(tmp_path):
    # The layout that loads at close to raw-file speed (schemas/README.md), and that
    # readers take the features straight out of.
    store = TokenStore(str(tmp_path))
    key = store.write(make_record())
    metadata = pq.ParquetFile(tmp_path / key).metadata
    assert metadata.num_rows == 1 and metadata.num_row_groups == 1
    features = metadata.row_group(0).column(schemas.TOKEN_SET.field_names.index("features"))
    assert features.path_in_schema == "features"
    assert features.compression == "UNCOMPRESSED"
    assert "PLAIN" in features.encodings and not features.has_dictionary_page


def test_features_not_stored_uncompressed_are_a_corrupt_object_error(tmp_path, monkeypatch):
    store = TokenStore(str(tmp_path))
    record = make_record()
    encode = store_module._encode_one_row
    monkeypatch.setattr(store_module, "_encode_one_row", lambda schema, row, uncompressed=(): encode(schema, row))
    key = store.write(record)
    monkeypatch.undo()
    with pytest.raises(CorruptObjectError, match=f"{key}: features are stored ZSTD"):
        store.read(record.video_id)
