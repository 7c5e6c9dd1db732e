"""The token store under faults: damaged objects are never skipped, concurrent writers
never break each other's entries, hostile index entries never lead out of the store.

Local disk and a real S3-protocol server (moto, ``raw_store``/``s3_server`` fixtures).
"""
from __future__ import annotations

import io
import threading
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

import pipeline.store as store_module
from pipeline.cli import main
from pipeline.decode import UniformSampling
from pipeline.fingerprint import content_hash
from pipeline.inspect_store import summarize_store
from pipeline.run import RunSummary
from pipeline.stages import DecodeStage
from pipeline.store import (
    DAMAGED,
    INDEX_ENTRY,
    MISSING,
    VERIFIED,
    CorruptObjectError,
    StoreError,
    TokenStore,
    index_key,
)
from test_store import (
    CONFIG,
    SMALL_PIECE,
    assert_same_record,
    flip_bit_inside,
    make_record,
    raw_store,  # noqa: F401 (a fixture: local disk or S3)
    s3_store,
    stream_checksum,
    tensor_bytes,
    write_legacy,
)

SAMPLES = Path(__file__).resolve().parent.parent / "pipeline" / "samples"


def big_record(video_id: str = "video-1", **options):
    return make_record(video_id, num_tokens=500, channels=256, grid=(4, 16, 16), **options)


def damage(data: bytes, record, where: str) -> bytes:
    """``data`` (a token set's bytes) with one bit flipped in its ``where`` part."""
    if where == "features":
        return flip_bit_inside(data, tensor_bytes(record.tokens.features))
    if where == "metadata column":  # a small zstd column: its page CRC no longer holds
        return flip_bit_inside(data, tensor_bytes(record.tokens.assignment))
    assert where == "footer"  # the footer length: the file no longer parses
    flipped = bytearray(data)
    flipped[-6] ^= 0x10
    return bytes(flipped)


# ---------------------------------------------------------------------------------------
# A skip is granted only to a token set that verifies; anything else is stored again


@pytest.mark.parametrize("where", ["features", "metadata column", "footer"])
def test_a_damaged_token_set_is_not_skipped_and_storing_again_repairs_it(raw_store, monkeypatch, where):
    monkeypatch.setattr(store_module, "_PIECE_BYTES", SMALL_PIECE)
    store, record = raw_store.store, big_record()
    assert store.check(record.content_hash, CONFIG, record.video_id) == MISSING
    first = store.put(record)
    assert first.bytes_written == first.object_bytes > 0 and not first.repaired
    assert store.check(record.content_hash, CONFIG, record.video_id) == VERIFIED
    intact = raw_store.get(first.key)

    raw_store.put(first.key, damage(intact, record, where))
    assert store.check(record.content_hash, CONFIG, record.video_id) == DAMAGED
    assert not store.exists(record.content_hash, CONFIG, video_id=record.video_id)

    again = store.put(record)
    assert again.repaired and again.bytes_written == len(intact)
    assert raw_store.get(first.key) == intact, "the same bytes again: they depend on content and config only"
    assert store.check(record.content_hash, CONFIG, record.video_id) == VERIFIED
    assert_same_record(store.read(record.video_id), record)


def test_a_garbled_or_dangling_index_entry_is_stored_again_not_an_error(raw_store):
    store, record = raw_store.store, make_record()
    key = store.write(record)
    entry_key = index_key(record.video_id, CONFIG)
    raw_store.put(entry_key, b"PAR1 not an index entry")
    assert store.check(record.content_hash, CONFIG, record.video_id) == DAMAGED
    store.put(record)
    assert store.check(record.content_hash, CONFIG, record.video_id) == VERIFIED

    # An entry whose token set is gone.
    if isinstance(store._fs, store_module.LocalFileSystem):
        Path(store._path(key)).unlink()
    else:
        store._fs.rm_file(store._path(key))
    assert store.check(record.content_hash, CONFIG, record.video_id) == DAMAGED
    assert store.put(record).repaired is False, "the object was missing, so it is simply created"
    assert store.check(record.content_hash, CONFIG, record.video_id) == VERIFIED


def test_a_video_id_that_now_names_other_content_is_missing_not_damaged(tmp_path):
    store = TokenStore(str(tmp_path))
    store.write(make_record(video_bytes=b"old cut"))
    assert store.check(content_hash(b"new cut"), CONFIG, "video-1") == MISSING


def test_the_s3_skip_check_is_one_head_when_the_etag_is_unchanged(s3_server, monkeypatch):
    store, bucket = s3_store(s3_server)
    record = big_record()
    key = store.write(record)
    token_set_reads = []
    for method in ("open", "cat_file", "cat_ranges"):
        real = getattr(store._fs, method)

        def recorded(path, *args, _real=real, **kwargs):
            token_set_reads.extend([path] if "/tokens/" in str(path) else [])
            return _real(path, *args, **kwargs)

        monkeypatch.setattr(store._fs, method, recorded)
    assert store.check(record.content_hash, CONFIG, record.video_id) == VERIFIED
    assert token_set_reads == []
    monkeypatch.undo()

    # Same size, other bytes (a new ETag): the check reads the object and refuses it.
    client = s3_server.client()
    data = client.get_object(Bucket=bucket, Key=f"store/{key}")["Body"].read()
    client.put_object(Bucket=bucket, Key=f"store/{key}", Body=damage(data, record, "features"))
    assert store.check(record.content_hash, CONFIG, record.video_id) == DAMAGED


def test_the_decode_stage_skips_only_what_verifies_and_marks_repairs(tmp_path):
    """The skip decision where the job makes it: DecodeStage, on a real video."""
    video = SAMPLES / "bikes.mp4"
    store = TokenStore(str(tmp_path))
    record = replace(make_record("bikes"), content_hash=content_hash(video.read_bytes()))
    stage = DecodeStage(str(tmp_path), {}, UniformSampling(2), CONFIG)

    row = stage.decode_one("bikes", str(video))
    assert (row["status"], row["repaired"]) == ("decoded", False)
    key = store.write(record)
    assert stage.decode_one("bikes", str(video))["status"] == "skipped"

    (tmp_path / key).write_bytes(damage((tmp_path / key).read_bytes(), record, "features"))
    row = stage.decode_one("bikes", str(video))
    assert (row["status"], row["repaired"]) == ("decoded", True)
    assert len(row["frame_indices"]) == 2

    store.write(record)
    (tmp_path / index_key("bikes", CONFIG)).write_bytes(b"garbage")
    row = stage.decode_one("bikes", str(video))
    assert (row["status"], row["repaired"]) == ("decoded", True), "a garbled entry is not a decode failure"


def test_the_run_summary_counts_repairs_and_only_bytes_written():
    rows = [
        {"status": "stored", "bytes": 1000, "repaired": True, "num_tokens": 5, "original_tokens": 10},
        {"status": "stored", "bytes": 0, "repaired": False, "num_tokens": 5, "original_tokens": 10},
        {"status": "skipped", "bytes": 0, "repaired": None},
    ]
    summary = RunSummary(run_id="r", stored=2, skipped=1, failed=0, inputs=3, seconds=1.0, retention={},
                         bytes_written=sum(row["bytes"] for row in rows if row["status"] == "stored"),
                         repaired=sum(bool(row["repaired"]) for row in rows if row["status"] == "stored"))
    assert summary.to_dict()["repaired"] == 1 and summary.to_dict()["bytes_written"] == 1000
    assert "repaired 1" in summary.text()


# ---------------------------------------------------------------------------------------
# bytes_written counts only bytes written


def test_put_reports_only_the_bytes_it_wrote(raw_store):
    store = raw_store.store
    original = make_record("original", video_bytes=b"same bytes")
    copy = make_record("copy", video_bytes=b"same bytes", run_id="a-longer-run-id")
    first, second = store.put(original), store.put(copy)
    assert first.key == second.key and first.object_bytes == second.object_bytes
    assert (first.bytes_written, second.bytes_written) == (first.object_bytes, 0)
    assert len(raw_store.get(first.key)) == first.object_bytes


# ---------------------------------------------------------------------------------------
# Concurrent writers


def test_token_set_bytes_depend_only_on_content_and_config():
    a = make_record("a", video_bytes=b"v", run_id="r")
    b = replace(make_record("b-other-id", video_bytes=b"v", run_id="run-with-a-much-longer-id",
                            source_uri="s3://elsewhere/b.mp4"), created_at=a.created_at + timedelta(days=3))
    assert store_module._encode_token_set(a).equals(store_module._encode_token_set(b))


def write_concurrently(stores: list[TokenStore], videos: int) -> list[list[store_module.PutResult]]:
    """Every store (one writer each, as separate runs are) writes the same ``videos``
    videos at once, each writer under its own run id, in its own order."""
    barrier = threading.Barrier(len(stores))
    results: list[list] = [[] for _ in stores]
    errors = []

    def writer(index: int) -> None:
        try:
            records = [make_record(f"video-{v}", seed=v, run_id="r" * (index + 1)) for v in range(videos)]
            if index % 2:
                records.reverse()
            barrier.wait()
            results[index] = [stores[index].put(record) for record in records]
        except BaseException as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return results


def assert_every_video_verifies(store: TokenStore, videos: int) -> None:
    for v in range(videos):
        record = make_record(f"video-{v}", seed=v)
        assert store.check(record.content_hash, CONFIG, record.video_id) == VERIFIED
        read = store.read(record.video_id)
        assert_same_record(read, replace(record, run_id=read.run_id))
    assert [s.video_id for s in store.list()] == sorted(f"video-{v}" for v in range(videos))


def test_concurrent_writers_on_local_disk_create_each_token_set_once(tmp_path):
    writers, videos = 4, 6
    results = write_concurrently([TokenStore(str(tmp_path)) for _ in range(writers)], videos)
    by_key: dict[str, list] = {}
    for result in (r for run in results for r in run):
        by_key.setdefault(result.key, []).append(result)
    assert len(by_key) == videos
    for key, puts in by_key.items():
        assert sum(p.bytes_written > 0 for p in puts) == 1, f"{key} created by one writer, linked by the others"
        assert len({p.object_bytes for p in puts}) == 1
    assert_every_video_verifies(TokenStore(str(tmp_path)), videos)
    assert not list(tmp_path.rglob("*.tmp"))


def _write_videos_in_a_process(url: str, index: int, videos: int, barrier, results) -> None:
    """One writer process (a separate run): the same videos as the others, its own run id."""
    records = [make_record(f"video-{v}", seed=v, run_id="p" * (index + 1)) for v in range(videos)]
    barrier.wait()
    results.put([(r.key, r.bytes_written) for r in map(TokenStore(url).put, records)])


def test_concurrent_writer_processes_on_local_disk(tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("fork")  # the store re-creates its thread pool in a child
    writers, videos = 2, 6
    barrier, results = context.Barrier(writers), context.Queue()
    processes = [context.Process(target=_write_videos_in_a_process, args=(str(tmp_path), i, videos, barrier, results))
                 for i in range(writers)]
    for process in processes:
        process.start()
    written = [results.get(timeout=300) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    for v in range(videos):
        key = written[0][v][0]
        assert sum(bytes_written > 0 for run in written for k, bytes_written in run if k == key) == 1
    assert_every_video_verifies(TokenStore(str(tmp_path)), videos)


def test_concurrent_writers_on_s3(s3_server):
    writers, videos = 3, 5
    reader, bucket = s3_store(s3_server)
    stores = [TokenStore(reader.url, s3_server.storage_options) for _ in range(writers)]
    results = write_concurrently(stores, videos)
    assert all(len(run) == videos for run in results)
    assert_every_video_verifies(reader, videos)
    # Whoever created a token set, a later writer finds it and writes nothing (If-None-Match).
    record = make_record("video-0", seed=0, run_id="late")
    assert reader.put(record).bytes_written == 0


def test_replayed_interleaving_object_from_one_run_index_from_another(raw_store, monkeypatch):
    """The order that broke reads: run A creates the object and stalls before its index
    entry; run B (another run id length) finds the object and writes its entry; then A's
    entry lands last. Every step leaves the video readable and verified."""
    url = raw_store.store.url
    options = raw_store.store._fs.storage_options
    store_a, store_b = TokenStore(url, options), TokenStore(url, options)
    a = make_record("video-1", run_id="a")
    b = replace(a, run_id="b-run-id-of-another-length", created_at=a.created_at + timedelta(hours=1))
    stalled = []
    put_object = TokenStore._put_object

    def stall_a_before_its_index_entry(self, key, data, if_absent):
        if self is store_a and key.startswith("index/"):
            stalled.append((key, data))
            return True
        return put_object(self, key, data, if_absent)

    monkeypatch.setattr(TokenStore, "_put_object", stall_a_before_its_index_entry)
    written_a = store_a.put(a)
    assert store_b.check(a.content_hash, CONFIG, "video-1") == MISSING
    written_b = store_b.put(b)
    assert (written_a.bytes_written > 0, written_b.bytes_written) == (True, 0)
    assert raw_store.store.check(a.content_hash, CONFIG, "video-1") == VERIFIED
    assert raw_store.store.read("video-1").run_id == b.run_id

    put_object(store_a, *stalled[0], False)  # A's entry lands after B's
    assert raw_store.store.check(a.content_hash, CONFIG, "video-1") == VERIFIED
    assert_same_record(raw_store.store.read("video-1"), a)


# ---------------------------------------------------------------------------------------
# Index entries never lead out of the store; inspect goes on past what it cannot read


def forged_entry(record, **changes) -> bytes:
    """A well-formed index entry of ``record`` with ``changes``."""
    entry = {
        "video_id": record.video_id, "source_uri": record.source_uri, "content_hash": record.content_hash,
        "key": store_module.token_set_key(record.content_hash, CONFIG), "config_fingerprint": CONFIG,
        "model_id": record.model_id, "num_tokens": 1, "original_tokens": 2, "object_bytes": 10,
        "object_checksum": "sha256-pieces:" + "0" * 64, "object_etag": None, "run_id": "x",
        "created_at": record.created_at,
    }
    entry.update(changes)
    row = {name: entry[name] for name in INDEX_ENTRY.field_names}
    return store_module._encode_one_row(INDEX_ENTRY, row).to_pybytes()


@pytest.mark.parametrize("key", ["../secret.txt", "tokens/../../secret.txt", "/etc/passwd",
                                 "tokens/0123456789abcdef/sha256-" + "a" * 64 + ".parquet"])
def test_an_index_entry_naming_another_key_is_refused_and_inspect_goes_on(tmp_path, key):
    root = tmp_path / "store"
    (tmp_path / "secret.txt").write_text("SECRET CONTENT")
    store = TokenStore(str(root))
    store.write(make_record("good-video"))
    forged = make_record("forged", video_bytes=b"forged video")
    (root / index_key("forged", CONFIG)).parent.mkdir(parents=True)
    (root / index_key("forged", CONFIG)).write_bytes(forged_entry(forged, key=key))

    with pytest.raises(CorruptObjectError, match="names object"):
        store.read("forged")
    assert store.check(forged.content_hash, CONFIG, "forged") == DAMAGED
    summary = summarize_store(str(root))
    assert [row.video_id for row in summary.videos] == ["good-video"]
    assert [problem["key"] for problem in summary.problems] == [index_key("forged", CONFIG)]
    result = CliRunner().invoke(main, ["inspect", str(root), "--json"])
    assert result.exit_code == 1 and "SECRET" not in result.output
    assert "good-video" in result.output and "names object" in result.output


def test_an_index_entry_under_another_ids_name_is_refused(tmp_path):
    store = TokenStore(str(tmp_path))
    store.write(make_record("victim"))
    attacker = make_record("attacker")
    (tmp_path / index_key("victim", CONFIG)).write_bytes(forged_entry(attacker))
    with pytest.raises(CorruptObjectError, match="another video id"):
        store.read("victim")


def test_read_token_set_fields_refuses_keys_that_are_not_token_sets(tmp_path):
    store = TokenStore(str(tmp_path))
    for key in ("../x.parquet", "index/a/b.parquet", "tokens/../../x", "manifests/run.parquet"):
        with pytest.raises(StoreError, match="not a token set key"):
            store.read_token_set_fields(key, ["tau_s"])


def test_inspect_reports_a_truncated_token_set_and_lists_the_rest(tmp_path):
    store = TokenStore(str(tmp_path))
    keys = [store.write(make_record(f"video-{i}", seed=i)) for i in range(3)]
    data = (tmp_path / keys[1]).read_bytes()
    (tmp_path / keys[1]).write_bytes(data[: len(data) // 3])
    summary = summarize_store(str(tmp_path))
    assert [row.video_id for row in summary.videos] == ["video-0", "video-2"]
    assert [problem["key"] for problem in summary.problems] == [keys[1]]
    assert "problems: 1" in summary.text()


# ---------------------------------------------------------------------------------------
# Stores written before token_set 3.0 / index_entry 2.0


@pytest.mark.parametrize("version", ["1.0", "2.0"])
def test_a_store_of_the_previous_layout_reads_verifies_and_moves_to_parquet(raw_store, version):
    store = raw_store.store
    records = [big_record("old-1"), big_record("old-2", video_bytes=b"other")]
    keys = [write_legacy(raw_store, record, version) for record in records]
    assert [s.video_id for s in store.list()] == ["old-1", "old-2"]
    for record in records:
        assert_same_record(store.read(record.video_id), record,
                           checksum=stream_checksum(record.tokens) if version == "1.0" else None)
    # A damaged one is not skipped; an intact one is, and its entry moves to Parquet.
    raw_store.put(keys[1], damage(raw_store.get(keys[1]), records[1], "features"))
    assert store.check(records[1].content_hash, CONFIG, "old-2") == DAMAGED
    assert store.check(records[0].content_hash, CONFIG, "old-1") == VERIFIED
    assert [row["video_id"] for row in store.dataset("index").to_table().to_pylist()] == ["old-1"]
    assert_same_record(store.read("old-1"), records[0],
                       checksum=stream_checksum(records[0].tokens) if version == "1.0" else None)
    assert store.check(records[0].content_hash, CONFIG, "old-1") == VERIFIED

    # Writing an id again gives it a Parquet entry and removes its JSON one.
    assert store.put(records[1]).repaired
    assert store.check(records[1].content_hash, CONFIG, "old-2") == VERIFIED
    legacy = index_key("old-2", CONFIG).replace(".parquet", ".json")
    with pytest.raises(Exception):
        raw_store.get(legacy)
    assert pq.read_table(io.BytesIO(raw_store.get(index_key("old-2", CONFIG)))
                         ).column("video_id").to_pylist() == ["old-2"]
    assert [s.video_id for s in store.list()] == ["old-1", "old-2"]


def test_store_errors_on_mismatched_records_and_stores_stay(tmp_path):
    """TokenStore's refusals: records of wrong dtypes or shapes, naive timestamps, a
    store root that is a file."""
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("x")
    with pytest.raises(StoreError, match=f"could not write {not_a_directory}/tokens/"):
        TokenStore(str(not_a_directory)).write(make_record())
    tmp_path = tmp_path / "store"
    store = TokenStore(str(tmp_path))
    record = make_record()
    bad = [
        replace(record, tokens=replace(record.tokens, features=record.tokens.features.to(torch.float64))),
        replace(record, tokens=replace(record.tokens, frame=record.tokens.frame.to(torch.int64))),
        replace(record, tokens=replace(record.tokens, box=record.tokens.box[:, :3])),
        replace(record, timestamps=record.timestamps[:-1]),
        replace(record, created_at=record.created_at.replace(tzinfo=None)),
    ]
    for case in bad:
        with pytest.raises(ValueError):
            store.write(case)
    assert not tmp_path.exists() or not list(tmp_path.rglob("*.parquet"))


# ---------------------------------------------------------------------------------------
# The tokenize stage: a store error after the write is that video's failure, not the job's


def test_a_store_error_after_the_write_is_a_failed_row_and_bytes_count_what_was_written(tmp_path, monkeypatch):
    from pipeline.models import load_adapter
    from pipeline.stages import TokenizeStage

    model = "tiny-random:llava-onevision"
    adapter = load_adapter(model, device="cpu")
    video = str(SAMPLES / "bikes.mp4")
    decode = DecodeStage(str(tmp_path), {}, UniformSampling(2), CONFIG, model_frame_size=adapter.input_frame_size)
    tokenize = TokenizeStage(str(tmp_path), {}, model, "cpu", None, {"budget": 0.5}, {"frames": 2},
                             adapter.fingerprint, CONFIG, run_id="run-1")

    # One transient error on the HEAD that follows the token set's write.
    object_info = TokenStore._object_info
    failures = iter([OSError("connection reset by peer")])

    def flaky_object_info(self, key):
        if key.startswith("tokens/") and (error := next(failures, None)):
            raise StoreError(f"could not read {self._display(key)}: {error}")
        return object_info(self, key)

    monkeypatch.setattr(TokenStore, "_object_info", flaky_object_info)
    row = tokenize.tokenize_one(decode.decode_one("bikes", video))
    assert (row["status"], row["stage"], row["error_type"]) == ("failed", "store", "StoreError")
    assert "connection reset" in row["message"]

    # The next run finds the token set the failed attempt wrote: it writes its entry only.
    row = tokenize.tokenize_one(decode.decode_one("bikes", video))
    assert (row["status"], row["bytes"], row["repaired"]) == ("stored", 0, False)
    copy = tokenize.tokenize_one(decode.decode_one("bikes-copy", video))
    assert (copy["status"], copy["bytes"]) == ("stored", 0)
    assert decode.decode_one("bikes", video)["status"] == "skipped"
    assert decode.decode_one("bikes-copy", video)["status"] == "skipped"
    other = tokenize.tokenize_one(decode.decode_one("bunny", str(SAMPLES / "bigbuckbunny.mp4")))
    assert other["status"] == "stored" and other["bytes"] == TokenStore(str(tmp_path)).object_size(other["key"])


@pytest.mark.parametrize("piece_bytes", [SMALL_PIECE, 4 * 2**20])
def test_the_index_entry_records_the_object_as_schemas_define_it(raw_store, monkeypatch, piece_bytes):
    """object_bytes and object_checksum, computed here from the raw object as
    schemas/index_entry.json defines them."""
    import hashlib

    monkeypatch.setattr(store_module, "_PIECE_BYTES", piece_bytes)
    record = big_record()
    key = raw_store.store.write(record)
    data = raw_store.get(key)
    digests = b"".join(hashlib.sha256(data[i : i + piece_bytes]).digest() for i in range(0, len(data), piece_bytes))
    entry = pq.read_table(io.BytesIO(raw_store.get(index_key(record.video_id, CONFIG)))).to_pylist()[0]
    assert entry["object_bytes"] == len(data)
    assert entry["object_checksum"] == f"sha256-pieces:{hashlib.sha256(digests).hexdigest()}"
    assert (entry["object_etag"] is None) == isinstance(raw_store.store._fs, store_module.LocalFileSystem)
