"""The preprocessing job's configuration: one dataclass, from the CLI or a YAML file.

S3 credentials are best left to the environment or the node's role (s3fs reads
``AWS_*`` variables and instance profiles itself). When ``storage_options`` do carry
them (``key``, ``secret``, ``token``, ...), :meth:`PreprocessConfig.to_dict` (what the
run manifest stores) replaces every credential-like value with ``"<redacted>"`` and
strips credentials from URLs.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.decode import FpsSampling, SamplingPolicy, UniformSampling
from pipeline.samples import SAMPLE_DIR
from pipeline.uris import redact_urls

DEFAULT_MODEL = "tiny-random:llava-onevision"
DEFAULT_STORE = "./sttm-store"

# Decode cores that keep one GPU encoder busy. Measured (README "Performance"): one H100
# encodes 419 frames/s (LLaVA-OneVision-7B shapes, 128-frame videos, encode + STTM), while
# one CPU core decodes about 85 sampled 720p frames/s and resizes about 350 frames/s to
# 384x384: 68 frames/s per core, so 419 / 68 = 6.2 cores per GPU, rounded up.
CPUS_PER_GPU_WORKER = 7


# Run ids name store keys (manifests/<run id>.parquet): the store's own rule, checked
# before the run so that a bad --run-id-prefix fails in seconds, not after every video.
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Option names whose values are credentials (s3fs key/secret/token, boto's
# aws_secret_access_key, gcsfs token, adlfs account_key/sas_token, passwords).
_SECRET_NAME = re.compile(r"key|secret|token|password|passwd|credential|signature|auth", re.IGNORECASE)
REDACTED = "<redacted>"


class ConfigError(ValueError):
    """The job configuration is invalid; the message says which setting and why."""


def check_run_id(run_id: str) -> None:
    """Raise ConfigError unless ``run_id`` is 1-128 of [A-Za-z0-9._-], starting with a
    letter or digit, without '..' (a run id is part of store keys)."""
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id) or ".." in run_id:
        raise ConfigError(f"run id must be 1-128 of [A-Za-z0-9._-], starting with a letter or digit, "
                          f"without '..'; got {redact_urls(str(run_id))!r:.80}")


def redact_secrets(value: Any, name: str = "") -> Any:
    """``value`` (nested dicts and lists) with credential-like entries replaced by
    REDACTED and credentials stripped from URLs inside strings."""
    if isinstance(value, dict):
        return {k: redact_secrets(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_secrets(v, name) for v in value]
    if value is not None and _SECRET_NAME.search(name) and not isinstance(value, bool):
        return REDACTED
    return redact_urls(value) if isinstance(value, str) else value


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything one ``sttm preprocess`` run needs.

    Attributes:
        input: manifest (.parquet/.jsonl/.csv), prefix or glob, local or any fsspec URL.
        output: the token store's URL.
        model: checkpoint directory, hub id or ``tiny-random:<family>``.
        budget: retention target in (0, 1]; used unless ``tau_s`` is given.
        tau_s, tau_t: fixed STTM thresholds instead of a budget (``tau_t`` optional).
        root_level, weighted, head_dim: STTM options (see ``sttm.merge``).
        merge_layer: merge the hidden states entering this LLM decoder layer (STTM_SPEC
            section 6): 0 merges the visual embeddings before the LLM; k > 0 also runs the
            LLM's first k layers in the encode workers and stores their keys and values.
        frames: uniform sampling of this many frames, or
        fps, max_frames: fixed-rate sampling capped at ``max_frames``;
            neither: the model's own recipe.
        device, dtype: where and in what precision the encoder runs ("auto": the GPU
            when there is one; the checkpoint's dtype).
        decode_concurrency: parallel decode tasks (None: as many as CPUs allow).
        encode_workers: encoder actors (one GPU each where GPUs exist).
        cpus_per_encode_worker: CPU cores reserved beside each encoder actor.
        max_failure_rate: failed / inputs above which the job exits non-zero.
        run_id_prefix: run ids are ``<prefix>-<UTC time>-<random>`` (e.g. ``nightly``).
        storage_options: fsspec options for input and store (credentials in them are redacted
            wherever the config is stored or shown).
        progress: show Ray Data's progress bars.
        recycle_workers_after: restart each decode and encode worker process after this
            many videos (None: never), bounding the memory Ray's actors gain per video
            (``stages.WorkerLifetime``; README "Failure handling").
    """

    input: str = str(SAMPLE_DIR)
    output: str = DEFAULT_STORE
    model: str = DEFAULT_MODEL
    budget: float | None = 0.5
    tau_s: float | None = None
    tau_t: float | None = None
    root_level: int = 1
    weighted: bool = False
    head_dim: int | None = None
    merge_layer: int = 0
    frames: int | None = None
    fps: float | None = None
    max_frames: int | None = None
    device: str = "auto"
    dtype: str | None = None
    decode_concurrency: int | None = None
    encode_workers: int = 1
    cpus_per_encode_worker: float = 1.0
    max_failure_rate: float = 0.0
    run_id_prefix: str = "run"
    storage_options: dict[str, Any] = field(default_factory=dict)
    progress: bool = True
    recycle_workers_after: int | None = 200

    def __post_init__(self):
        if self.tau_s is None and self.tau_t is not None:
            raise ConfigError("tau_t needs tau_s: give both thresholds, or a budget")
        if self.tau_s is None and (self.budget is None or not 0 < self.budget <= 1):
            raise ConfigError(f"budget must be in (0, 1], got {self.budget}")
        if self.frames is not None and (self.fps is not None or self.max_frames is not None):
            raise ConfigError("give either frames (uniform sampling) or fps with max_frames, not both")
        if self.frames is not None and self.frames < 1:
            raise ConfigError(f"frames must be >= 1, got {self.frames}")
        if (self.fps is None) != (self.max_frames is None):
            raise ConfigError("fps sampling needs both fps and max_frames")
        if not 0 <= self.max_failure_rate <= 1:
            raise ConfigError(f"max_failure_rate must be in [0, 1], got {self.max_failure_rate}")
        if self.recycle_workers_after is not None and self.recycle_workers_after < 1:
            raise ConfigError(f"recycle_workers_after must be >= 1 or None, got {self.recycle_workers_after}")
        if not isinstance(self.merge_layer, int) or self.merge_layer < 0:
            raise ConfigError(f"merge_layer must be an integer >= 0, got {self.merge_layer!r}")
        if self.encode_workers < 1:
            raise ConfigError(f"encode_workers must be >= 1, got {self.encode_workers}")
        try:
            check_run_id(f"{self.run_id_prefix}-20000101T000000Z-000000")
        except ConfigError:
            raise ConfigError(f"run_id_prefix must be letters, digits, '.', '_' or '-' (starting with a letter or "
                              f"digit, without '..'), got {redact_urls(str(self.run_id_prefix))!r:.80}") from None

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "PreprocessConfig":
        """Settings from a YAML file, then ``overrides`` (None values ignored)."""
        text = Path(path).read_text()
        values = yaml.safe_load(text) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of settings, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown settings {unknown}; known: {sorted(known)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def sampling_policy(self) -> SamplingPolicy | None:
        """The policy the user asked for; None means the model's own recipe."""
        if self.frames is not None:
            return UniformSampling(self.frames)
        if self.fps is not None:
            return FpsSampling(self.fps, self.max_frames)
        return None

    def sttm_options(self) -> dict[str, Any]:
        """The merge configuration as given (part of the config fingerprint)."""
        merge = {"tau_s": self.tau_s, "tau_t": self.tau_t} if self.tau_s is not None else {"budget": self.budget}
        return {**merge, "root_level": self.root_level, "weighted": self.weighted, "head_dim": self.head_dim}

    def to_dict(self) -> dict[str, Any]:
        """The settings, JSON-able, with every secret redacted (what manifests store)."""
        return redact_secrets(dataclasses.asdict(self))
