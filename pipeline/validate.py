"""Checks of a command's inputs that run before any heavy work (before Ray starts, before
weights load), so that a mistake costs seconds, not a minute and a traceback.

Each check raises ``click.BadParameter`` (or ``click.UsageError``) naming the input the
way the user typed it (``--budget``, ``INPUT``, ``--config job.yaml``) and saying how to
fix it; the CLI prints it as one paragraph and exits with status 2. Only what can be
decided locally and quickly is checked here: the settings, paths, the model spec, the
store's shape, a cluster address answering at all. Whatever needs the data itself
(listing a corpus, reading the store) is checked where it is done, still before Ray.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import yaml

# The top-level prefixes of a token store (pipeline/store.py's layout); a folder holding
# none of them is not a store.
STORE_PREFIXES = ("tokens", "index", "manifests", "failures")
_ADDRESS_TIMEOUT_S = 3.0


def option_flag(field_name: str) -> str:
    """``tau_s`` -> ``--tau-s``: a PreprocessConfig field as its `sttm preprocess` option."""
    return "--" + field_name.replace("_", "-")


def with_flags(message: str, names: dict[str, str]) -> str:
    """``message`` with each Python name in ``names`` (whole words) replaced by what the
    user typed for it (``{"config_fingerprint": "--config-fingerprint"}``)."""
    for name, flag in sorted(names.items(), key=lambda item: -len(item[0])):
        message = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w-])", flag, message)
    return message


# --------------------------------------------------------------------------- settings


def check_config_file(path: str, config_class: type, flag: str | None = None) -> dict[str, Any]:
    """The settings of a YAML config file, checked against ``config_class``'s fields:
    YAML syntax, a mapping, no unknown setting (with the closest known one suggested),
    and values of the declared types. Returns the mapping. ``flag`` names the file to
    the user (default ``--config PATH``)."""
    flag = flag or f"--config {path}"
    try:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(error, "problem", None) or str(error)
        raise click.BadParameter(f"not valid YAML{line}: {problem}.", param_hint=flag) from None
    except (OSError, UnicodeDecodeError) as error:
        raise click.BadParameter(f"cannot be read: {error}.", param_hint=flag) from None
    values = values or {}
    if not isinstance(values, dict):
        raise click.BadParameter(f"expected a mapping of settings (name: value lines), got a YAML "
                                 f"{type(values).__name__}.", param_hint=flag)
    fields = {field.name: field for field in dataclasses.fields(config_class)}
    for name, value in values.items():
        if name not in fields:
            close = difflib.get_close_matches(str(name), fields, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else f"known settings: {', '.join(sorted(fields))}."
            raise click.BadParameter(f"unknown setting '{name}': {hint}", param_hint=flag)
        expected = _type_problem(value, str(fields[name].type))
        if expected:
            raise click.BadParameter(f"setting '{name}' must be {expected}, got {value!r:.80}.",
                                     param_hint=flag)
    return values


# Annotation text (the module uses `from __future__ import annotations`) -> accepted types.
_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "dict[str, Any]": (dict,)}
_TYPE_WORDS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
               "dict[str, Any]": "a mapping"}


def _type_problem(value: Any, annotation: str) -> str | None:
    """What ``value`` should have been for a field annotated ``annotation``, or None."""
    kinds = [kind.strip() for kind in annotation.split("|")]
    if value is None:
        return None if "None" in kinds else _TYPE_WORDS.get(kinds[0], kinds[0])
    for kind in kinds:
        if kind == "None":
            continue
        accepted = _TYPES.get(kind)
        if accepted is None:
            return None  # a type this check does not know: leave it to the config class
        if isinstance(value, accepted) and not (isinstance(value, bool) and bool not in accepted):
            return None
    words = [_TYPE_WORDS.get(kind, kind) for kind in kinds if kind != "None"]
    return " or ".join(words) + (" (or empty)" if "None" in kinds else "")


# --------------------------------------------------------------------------- paths


def check_output_file(path: str, flag: str) -> None:
    """A file to be written: its folder exists and is writable, and it is not a folder."""
    target = Path(path).expanduser()
    folder = target.parent
    if target.is_dir():
        raise click.BadParameter(f"{path} is a folder; give a file name.", param_hint=flag)
    if not folder.is_dir():
        raise click.BadParameter(f"folder {folder} does not exist; create it first (mkdir -p {folder}) or "
                                 f"write somewhere else.", param_hint=flag)
    if not os.access(folder, os.W_OK):
        raise click.BadParameter(f"folder {folder} is not writable.", param_hint=flag)


def _local_path(url: str) -> Path | None:
    """The local path of a store URL, or None for a remote one (s3://...)."""
    if url.startswith("file://"):
        return Path(url[len("file://"):])
    return None if "://" in url else Path(url).expanduser()


def check_store_to_write(url: str, flag: str) -> None:
    """A store a job writes into: locally, a folder (or nothing yet) under a writable
    parent, not a file. Remote stores are checked by the job (a probe write)."""
    path = _local_path(url)
    if path is None:
        return
    if path.exists() and not path.is_dir():
        raise click.BadParameter(f"{url} is a file, not a store folder; give a folder (it is created when "
                                 f"missing), e.g. --output ./sttm-store.", param_hint=flag)
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise click.BadParameter(f"{url} lies below {existing}, which is a file.", param_hint=flag)
    if not os.access(existing, os.W_OK):
        raise click.BadParameter(f"{existing} is not writable; give a store folder you can write to.",
                                 param_hint=flag)


def check_store_to_read(url: str, flag: str = "STORE") -> None:
    """A store a command reads: locally, a folder holding a token store (at least one of
    its prefixes). Remote stores are reported by the store when read."""
    path = _local_path(url)
    if path is None:
        return
    fix = "give the folder `sttm preprocess --output` wrote (default ./sttm-store)."
    if not path.exists():
        raise click.BadParameter(f"{url} does not exist; {fix}", param_hint=flag)
    if not path.is_dir():
        raise click.BadParameter(f"{url} is a file, not a store folder; {fix}", param_hint=flag)
    if not any((path / prefix).is_dir() for prefix in STORE_PREFIXES):
        raise click.BadParameter(f"{url} is not a token store (it has none of {', '.join(p + '/' for p in STORE_PREFIXES)}); "
                                 f"{fix}", param_hint=flag)


# --------------------------------------------------------------------------- model


def check_model_spec(spec: str, flag: str = "--model") -> None:
    """A model named as ``tiny-random:<family>``, a checkpoint folder or a hub id: the
    family is known, the folder exists and holds a config.json, and a hub id is in the
    local cache when the hub is offline. Loads no weights (a tiny-random model is built
    on first use, which is its normal path)."""
    from pipeline.models import resolve_model
    from pipeline.models.tiny_random import TINY_RANDOM_PREFIX

    if spec.startswith(TINY_RANDOM_PREFIX):
        try:
            resolve_model(spec)
        except ValueError as error:
            raise click.BadParameter(f"{error}.", param_hint=flag) from None
        return
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise click.BadParameter(f"{spec} is a file; give the checkpoint folder (with config.json and the "
                                     f"*.safetensors weights).", param_hint=flag)
        if not (path / "config.json").is_file():
            raise click.BadParameter(f"{spec} has no config.json: not a checkpoint folder (what save_pretrained "
                                     f"or a hub download writes).", param_hint=flag)
        return
    is_hub_id = re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec) and not spec.startswith((".", "~"))
    if not is_hub_id:
        raise click.BadParameter(f"{spec}: no such folder. Give a checkpoint folder, a hub id "
                                 f"(org/name) or tiny-random:<family>.", param_hint=flag)
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(spec, "config.json"), str):
            raise click.BadParameter(
                f"{spec}: no such folder, and no hub model of that id in the local Hugging Face cache "
                f"(HF_HUB_OFFLINE is set, so nothing is downloaded). Give a checkpoint folder, download the "
                f"model first, or use tiny-random:<family>.", param_hint=flag)


# --------------------------------------------------------------------------- cluster address


def check_address(address: str, flag: str = "--address") -> None:
    """A Ray address answers: ``http(s)://host:port`` (a dashboard, for Ray Jobs),
    ``ray://host:port`` or ``host:port``; ``auto`` and ``local`` are not checked. Only a
    TCP connection is tried, so a wrong service on that port is found later."""
    if address in ("auto", "local"):
        return
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    default_port = {"http": 80, "https": 443}.get(parts.scheme)
    port = port or default_port
    if not host or not port:
        raise click.BadParameter(f"{address} is not an address; give http://HOST:8265 (the dashboard), "
                                 f"ray://HOST:10001 or HOST:6379.", param_hint=flag)
    try:
        with socket.create_connection((host, port), timeout=_ADDRESS_TIMEOUT_S):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise click.BadParameter(
            f"nothing answers at {address} ({reason}). Is the Ray head running, and its port reachable from "
            f"here (e.g. `ray dashboard CLUSTER.yaml` or `kubectl port-forward ... 8265:8265`)?",
            param_hint=flag) from None
