"""What a job processes: the list of ``(video_id, uri)`` from a manifest or a prefix/glob.

Three ways to name a corpus, local or on any fsspec filesystem (``s3://`` included):

- a manifest file: ``.parquet``, ``.jsonl`` or ``.csv`` with a ``uri`` column and an
  optional ``video_id`` column (default: the file name without extension);
- a glob: ``s3://bucket/videos/**/*.mp4``;
- a prefix (a directory): every video file under it, recursively; the id is the path
  below the prefix without extension (``cats/001.mp4`` -> ``cats/001``);
- a single video file.

Relative URIs in a manifest are resolved against the manifest's own directory.
"""
from __future__ import annotations

import io
import json
import posixpath
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq

from pipeline.uris import sanitize_uri

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpeg", ".mpg", ".ts", ".flv")


def _read_jsonl(data: bytes) -> list[dict]:
    """One JSON object per line, read by Python's json module: an id stays exactly the
    string it was (Arrow's reader infers one type per column and rejects mixed ones)."""
    rows = []
    for line_number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise pa.ArrowInvalid(f"line {line_number}: {error}") from None
            if not isinstance(row, dict):
                raise pa.ArrowInvalid(f"line {line_number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


# Single-threaded reads: Arrow's thread pool can abort the interpreter at exit once torch
# is loaded (apache/arrow#34314), and a manifest is small. CSV columns are read as text,
# so that an id such as "007" stays "007" (type inference would make it the number 7).
MANIFEST_READERS = {
    ".parquet": lambda data: pq.read_table(io.BytesIO(data), use_threads=False).to_pylist(),
    ".jsonl": _read_jsonl,
    ".csv": lambda data: pyarrow.csv.read_csv(
        io.BytesIO(data), read_options=pyarrow.csv.ReadOptions(use_threads=False),
        convert_options=pyarrow.csv.ConvertOptions(column_types={"uri": pa.string(), "video_id": pa.string()}),
    ).to_pylist(),
}


class InputError(ValueError):
    """The job's input (manifest, prefix or glob) cannot be listed."""


@dataclass(frozen=True)
class VideoInput:
    video_id: str
    uri: str


def _strip_extension(path: str) -> str:
    root, ext = posixpath.splitext(path)
    return root if ext.lower() in VIDEO_EXTENSIONS else path


def _with_protocol(path: str, template: str) -> str:
    """Put back the ``s3://`` that fsspec strips from listed paths."""
    if "://" in template:
        return f"{template.split('://', 1)[0]}://{path}"
    return path


def _read_manifest(source: str, storage_options: dict) -> list[VideoInput]:
    ext = posixpath.splitext(source)[1].lower()
    try:
        with fsspec.open(source, "rb", **storage_options) as handle:
            rows: list[dict] = MANIFEST_READERS[ext](handle.read())
    except FileNotFoundError as error:
        raise InputError(f"manifest {sanitize_uri(source)} does not exist") from error
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as error:
        raise InputError(f"manifest {sanitize_uri(source)} cannot be read as {ext[1:]}: {error}") from error
    if rows and not any("uri" in row for row in rows):
        raise InputError(f"manifest {sanitize_uri(source)} has no 'uri' column (columns: {sorted(rows[0])})")
    base = posixpath.dirname(source)
    inputs = []
    for line, row in enumerate(rows, start=1):
        uri, video_id = row.get("uri"), row.get("video_id")
        if not uri:
            raise InputError(f"manifest {sanitize_uri(source)} row {line} has an empty 'uri'")
        uri = str(uri)
        if "://" not in uri and not posixpath.isabs(uri):
            uri = posixpath.join(base, uri)
        video_id = str(video_id) if video_id not in (None, "") else _strip_extension(posixpath.basename(uri.split("?")[0]))
        _check_video_id(video_id, f"manifest {sanitize_uri(source)} row {line}")
        inputs.append(VideoInput(video_id, uri))
    return inputs


def _check_video_id(video_id: str, where: str) -> None:
    """Ids are stored in every record: refuse one that carries a URL's credentials or
    query string (without echoing it), before the run starts."""
    if "://" in video_id and sanitize_uri(video_id) != video_id:
        raise InputError(f"{where}: the video id looks like a URL with credentials or a query string (not "
                         f"shown); give an id without them")


def list_inputs(source: str, storage_options: dict | None = None) -> list[VideoInput]:
    """The videos a job over ``source`` processes, in a stable order."""
    storage_options = storage_options or {}
    if posixpath.splitext(source)[1].lower() in MANIFEST_READERS:
        return _read_manifest(source, storage_options)

    fs, path = fsspec.core.url_to_fs(source, **storage_options)
    if any(char in path for char in "*?["):
        root = path.split("*")[0].split("?")[0].split("[")[0].rsplit("/", 1)[0]
        files = sorted(fs.glob(path))
    elif fs.isdir(path):
        root = path.rstrip("/")
        files = sorted(f for f in fs.find(path) if f.lower().endswith(VIDEO_EXTENSIONS))
    elif fs.exists(path):
        return [VideoInput(_strip_extension(posixpath.basename(path)), source)]
    else:
        raise InputError(f"input {sanitize_uri(source)} is neither a manifest, a glob, a directory nor a file")
    if not files:
        raise InputError(f"input {sanitize_uri(source)} holds no video files ({', '.join(VIDEO_EXTENSIONS)})")
    return [VideoInput(_strip_extension(posixpath.relpath(f, root)), _with_protocol(f, source)) for f in files]
