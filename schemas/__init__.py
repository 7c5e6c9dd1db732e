"""What the token store holds: the single source of truth for every stored field.

Each ``*.json`` file beside this module defines one kind of stored record: its name, its
``schema_version`` (``"MAJOR.MINOR"``), the older major versions it still reads
(``reads_majors``, optional) and its fields, each with a type, whether it may be null and
a one-line description (README.md beside this module explains the format and the
compatibility rules). Code never spells out columns itself; it asks a
:class:`RecordSchema` for its Arrow schema.

Field types are written as Arrow types:
``string``, ``bool``, ``int32``, ``int64``, ``float64``, ``large_binary``,
``timestamp[us, UTC]``, ``list<T>``, ``fixed_size_list<T, n>`` and ``list<struct>`` (the
struct's own ``fields`` are given beside the type).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

import pyarrow as pa

# Arrow field metadata keys: the description travels inside every Parquet file (pyarrow
# stores the Arrow schema in the footer), so a file found on its own still explains itself.
DESCRIPTION_KEY = b"description"
# Parquet file (schema) metadata keys naming the record kind and its version.
SCHEMA_NAME_KEY = b"sttm.schema"
SCHEMA_VERSION_KEY = b"sttm.schema_version"


@dataclass(frozen=True)
class FieldSpec:
    """One stored field. ``fields`` is set only for ``list<struct>``."""

    name: str
    type: str
    nullable: bool
    description: str
    fields: tuple["FieldSpec", ...] = ()

    def arrow_field(self) -> pa.Field:
        return pa.field(
            self.name,
            _arrow_type(self.type, self.fields),
            nullable=self.nullable,
            metadata={DESCRIPTION_KEY: self.description.encode()},
        )


@dataclass(frozen=True)
class RecordSchema:
    """One kind of stored record (token set, index entry, run manifest, failure).

    ``reads_majors``: the major versions whose objects this code reads: its own, and the
    older ones it still knows how to read (README.md, "Versions").
    """

    name: str
    version: str
    description: str
    fields: tuple[FieldSpec, ...]
    reads_majors: tuple[int, ...]

    @property
    def major(self) -> int:
        return parse_version(self.version)[0]

    @property
    def field_names(self) -> list[str]:
        return [field.name for field in self.fields]

    def arrow_schema(self) -> pa.Schema:
        """The Arrow schema, with the record's name and version in its metadata."""
        return pa.schema(
            [field.arrow_field() for field in self.fields],
            metadata={
                SCHEMA_NAME_KEY: self.name.encode(),
                SCHEMA_VERSION_KEY: self.version.encode(),
            },
        )


def parse_version(version: str) -> tuple[int, int]:
    """``"1.0"`` -> ``(1, 0)``; ``ValueError`` for anything else."""
    major, dot, minor = version.partition(".")
    if not (dot and major.isdigit() and minor.isdigit()):
        raise ValueError(f"schema version must be 'MAJOR.MINOR', got {version!r}")
    return int(major), int(minor)


def load(name: str) -> RecordSchema:
    """Read ``<name>.json`` from this package."""
    text = resources.files(__package__).joinpath(f"{name}.json").read_text(encoding="utf-8")
    spec = json.loads(text)
    major, _ = parse_version(spec["schema_version"])
    reads_majors = tuple(spec.get("reads_majors", [major]))
    if major not in reads_majors or max(reads_majors) > major:
        raise ValueError(f"{name}.json: reads_majors {list(reads_majors)} must hold {major} and nothing newer")
    return RecordSchema(
        name=spec["name"],
        version=spec["schema_version"],
        description=spec["description"],
        fields=tuple(_field_spec(field) for field in spec["fields"]),
        reads_majors=reads_majors,
    )


def _field_spec(spec: dict) -> FieldSpec:
    return FieldSpec(
        name=spec["name"],
        type=spec["type"],
        nullable=spec["nullable"],
        description=spec["description"],
        fields=tuple(_field_spec(field) for field in spec.get("fields", ())),
    )


_SCALAR_TYPES = {
    "string": pa.string(),
    "bool": pa.bool_(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float64": pa.float64(),
    "large_binary": pa.large_binary(),
    "timestamp[us, UTC]": pa.timestamp("us", tz="UTC"),
}


def _arrow_type(type_name: str, struct_fields: tuple[FieldSpec, ...]) -> pa.DataType:
    type_name = type_name.strip()
    if type_name in _SCALAR_TYPES:
        return _SCALAR_TYPES[type_name]
    if type_name == "struct":
        return pa.struct([field.arrow_field() for field in struct_fields])
    if type_name.startswith("list<") and type_name.endswith(">"):
        return pa.list_(_arrow_type(type_name[len("list<") : -1], struct_fields))
    if type_name.startswith("fixed_size_list<") and type_name.endswith(">"):
        item, _, size = type_name[len("fixed_size_list<") : -1].rpartition(",")
        return pa.list_(_arrow_type(item, struct_fields), int(size))
    raise ValueError(f"unknown field type {type_name!r} in schemas/")


TOKEN_SET = load("token_set")
INDEX_ENTRY = load("index_entry")
RUN_MANIFEST = load("run_manifest")
FAILURE = load("failure")
