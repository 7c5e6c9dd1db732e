"""A whole token store at a glance: what ``sttm inspect STORE`` prints.

The summary comes from the store's small objects (index entries, run manifests, failure
records) plus the thresholds of each token set. Index entries do not carry thresholds,
and a budget run picks its own ``tau`` per video, so they are read from the token-set
objects themselves: only the few metadata columns, never the features (Parquet reads the
footer and the requested column chunks, so even on S3 a token set costs a few small
range reads, not its megabytes of features).

Everything is read through :class:`TokenStore`, which only opens keys an index entry
may name (a token set's own key, inside the store). An object that cannot be read is
reported in ``problems`` and the summary goes on without it.
"""
from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
import numpy as np

from pipeline.store import NotFoundError, SchemaVersionError, StoreError, StoreProblem, TokenStore

# The token-set columns the summary needs (see schemas/token_set.json).
_SETTINGS_COLUMNS = ("tau_s", "tau_t", "budget", "root_level", "grid")
# Job settings worth showing beside each run (the rest are in the manifest).
_RUN_SETTINGS = ("model", "budget", "tau_s", "tau_t", "root_level", "frames", "fps", "max_frames")
_HISTOGRAM_BINS = 10  # retention histogram: bins of 0.1 over [0, 1]


@dataclass(frozen=True)
class VideoRow:
    """One video id's token set under one config, as the summary lists it.

    ``tau_s``/``tau_t`` are the thresholds actually used (in budget mode, the ones the
    budget search chose for this video); ``tau_t`` is None when temporal merging was off,
    ``budget`` None for fixed thresholds. ``grid`` is ``(T, H, W)`` before merging.
    """

    video_id: str
    config_fingerprint: str
    model_id: str
    source_uri: str
    num_tokens: int
    original_tokens: int
    retention: float
    bytes: int
    tau_s: float
    tau_t: float | None
    budget: float | None
    root_level: int
    grid: tuple[int, int, int]


@dataclass(frozen=True)
class StoreSummary:
    """What a store holds: runs, stored videos, failures, and their distributions.

    Attributes:
        store: the store's URL, without credentials.
        runs: one dict per run manifest, oldest first.
        videos: one row per (video id, config), sorted by video id.
        failures: one dict per failure record, oldest first; ``stored_since`` says
            whether the video id has a token set under that config now (a later run
            retried it successfully).
        problems: one ``{"key", "message"}`` per object that could not be read (an
            index entry, token set, manifest or failure record), left out of the rest.
    """

    store: str
    runs: list[dict[str, Any]]
    videos: list[VideoRow]
    failures: list[dict[str, Any]]
    problems: list[dict[str, str]] = field(default_factory=list)

    @property
    def video_ids(self) -> list[str]:
        """Distinct video ids with at least one token set, sorted."""
        return sorted({row.video_id for row in self.videos})

    def configs(self) -> list[dict[str, Any]]:
        """Per config fingerprint: model, videos, and the thresholds used (their spread
        over videos, since a budget picks ``tau`` per video)."""
        by_config: dict[str, list[VideoRow]] = defaultdict(list)
        for row in self.videos:
            by_config[row.config_fingerprint].append(row)
        configs = []
        for fingerprint, rows in sorted(by_config.items()):
            tau_t = [row.tau_t for row in rows if row.tau_t is not None]
            configs.append({
                "config_fingerprint": fingerprint,
                "model_ids": sorted({row.model_id for row in rows}),
                "num_videos": len(rows),
                "budgets": sorted({row.budget for row in rows if row.budget is not None}),
                "root_levels": sorted({row.root_level for row in rows}),
                "tau_s": _spread([row.tau_s for row in rows]),
                "tau_t": _spread(tau_t) if tau_t else None,
                "temporal_merging_off": sum(row.tau_t is None for row in rows),
            })
        return configs

    def to_dict(self) -> dict[str, Any]:
        retentions = [row.retention for row in self.videos]
        return {
            "store": self.store,
            "num_runs": len(self.runs),
            "num_videos": len(self.video_ids),
            "num_token_sets": len(self.videos),
            "num_failures": len(self.failures),
            "video_ids": self.video_ids,
            "runs": self.runs,
            "configs": self.configs(),
            "retention": _distribution(retentions),
            "retention_histogram": _histogram(retentions),
            "tokens_per_video": _distribution([row.num_tokens for row in self.videos]),
            "bytes_per_video": _distribution([row.bytes for row in self.videos]),
            "total_tokens": sum(row.num_tokens for row in self.videos),
            "total_original_tokens": sum(row.original_tokens for row in self.videos),
            "total_bytes": sum(row.bytes for row in self.videos),
            "videos": [{**asdict(row), "grid": list(row.grid)} for row in self.videos],
            "failures": self.failures,
            "problems": self.problems,
        }

    def text(self, max_videos: int = 20) -> str:
        """A human-readable report; lists at most ``max_videos`` videos (0: all)."""
        d = self.to_dict()
        lines = [f"store {self.store}",
                 f"runs: {d['num_runs']}"]
        for run in self.runs:
            settings = ", ".join(f"{key} {value}" for key, value in run["settings"].items())
            lines.append(f"  {run['run_id']}  {run['started_at'][:19]}Z  inputs {run['inputs']}: stored "
                         f"{run['stored']}, skipped {run['skipped']}, failed {run['failed']}  ({settings})")
        lines.append(f"videos: {d['num_videos']} ({d['num_token_sets']} token sets, "
                     f"{_megabytes(d['total_bytes'])} MB, {d['total_tokens']:,} of {d['total_original_tokens']:,} "
                     f"tokens kept)")
        if self.videos:
            lines.append("thresholds used:")
            for config in d["configs"]:
                lines.append(f"  config {config['config_fingerprint']}  {', '.join(config['model_ids'])}  "
                             f"{config['num_videos']} token sets  {_thresholds_text(config)}")
            lines.append(f"retention: {_distribution_text(d['retention'], '.3f')}")
            for row in d["retention_histogram"]:
                bar = "#" * round(40 * row["count"] / len(self.videos))
                lines.append(f"  {row['from']:.1f}-{row['to']:.1f}  {bar} {row['count']}")
            lines.append(f"tokens per video: {_distribution_text(d['tokens_per_video'], ',.0f')}")
            lines.append(f"bytes per video: {_distribution_text(d['bytes_per_video'], ',.0f')}")
        still_failing = sum(not failure["stored_since"] for failure in self.failures)
        lines.append(f"failures: {len(self.failures)} ({still_failing} not stored since)")
        for failure in self.failures:
            note = "" if not failure["stored_since"] else "  [stored since]"
            lines.append(f"  {failure['run_id']}  {failure['video_id']}  {failure['stage']}: "
                         f"{failure['error_type']}: {_one_line(failure['message'])}{note}")
        if self.problems:
            lines.append(f"problems: {len(self.problems)} objects could not be read (left out above)")
            lines += [f"  {self.store}/{problem['key']}: {_one_line(problem['message'])}" for problem in self.problems]
        if self.videos:
            shown = self.videos if max_videos <= 0 else self.videos[:max_videos]
            more = f" (first {len(shown)}; --json lists all)" if len(shown) < len(self.videos) else ""
            lines.append(f"token sets{more}:")
            lines.append(f"  {'video id':<24} {'config':<16} {'T x H x W':>11} {'tokens':>8} {'retention':>9} "
                         f"{'MB':>7} {'tau_s':>7} {'tau_t':>7}")
            for row in shown:
                grid = "x".join(map(str, row.grid))
                tau_t = "off" if row.tau_t is None else f"{row.tau_t:.4f}"
                lines.append(f"  {row.video_id:<24} {row.config_fingerprint:<16} {grid:>11} {row.num_tokens:>8,} "
                             f"{row.retention:>9.3f} {_megabytes(row.bytes):>7} {row.tau_s:>7.4f} {tau_t:>7}")
        return "\n".join(lines)


def summarize_store(url: str, storage_options: Mapping[str, Any] | None = None) -> StoreSummary:
    """Summarize the token store at ``url`` (local path, ``file://`` or ``s3://``).

    Raises NotFoundError when nothing exists at ``url``, and SchemaVersionError for an
    object of a major schema version this sttm-pipeline does not read (upgrade it).
    Any other object that cannot be read is listed in ``problems``.
    """
    storage_options = dict(storage_options or {})
    store = TokenStore(url, storage_options)
    fs, root = fsspec.core.url_to_fs(url, **storage_options)
    if not fs.exists(root.rstrip("/")):
        raise NotFoundError(f"no token store at {store.url}")

    problems: list[StoreProblem] = []
    summaries = store.list(problems=problems)
    settings_by_key: dict[str, dict[str, Any] | None] = {}
    for summary in summaries:  # ids sharing one video's bytes share one object: read it once
        if summary.key not in settings_by_key:
            settings_by_key[summary.key] = _token_set_settings(store, summary.key, problems)
    videos = [
        VideoRow(video_id=s.video_id, config_fingerprint=s.config_fingerprint, model_id=s.model_id,
                 source_uri=s.source_uri, num_tokens=s.num_tokens, original_tokens=s.original_tokens,
                 retention=s.retention, bytes=s.bytes, **settings_by_key[s.key])
        for s in summaries if settings_by_key[s.key] is not None
    ]

    stored = {(row.video_id, row.config_fingerprint) for row in videos}
    failures = [
        {"run_id": f.run_id, "video_id": f.video_id, "source_uri": f.source_uri, "stage": f.stage,
         "error_type": f.error_type, "message": f.message, "created_at": f.created_at.isoformat(),
         "stored_since": (f.video_id, f.config_fingerprint) in stored}
        for f in store.list_failures(problems=problems)
    ]
    runs = [
        {"run_id": m.run_id, "started_at": m.started_at.isoformat(), "finished_at": m.finished_at.isoformat(),
         "seconds": round((m.finished_at - m.started_at).total_seconds(), 3), "inputs": len(m.entries),
         "stored": m.count("stored"), "skipped": m.count("skipped"), "failed": m.count("failed"),
         "settings": {key: m.job_config[key] for key in _RUN_SETTINGS if m.job_config.get(key) is not None}}
        for m in store.list_manifests(problems=problems)
    ]
    return StoreSummary(store=store.url, runs=runs, videos=videos, failures=failures,
                        problems=[{"key": p.key, "message": p.message} for p in problems])


def _token_set_settings(store: TokenStore, key: str, problems: list[StoreProblem]) -> dict[str, Any] | None:
    """The merge settings of the token set at ``key``, reading only their columns; None
    (and a problem) when it cannot be read."""
    try:
        row = store.read_token_set_fields(key, list(_SETTINGS_COLUMNS))
    except SchemaVersionError:
        raise  # not a damaged object: this sttm-pipeline is too old (or the object too old) to read it
    except StoreError as error:
        problems.append(StoreProblem(key, str(error)))
        return None
    return {**row, "grid": tuple(row["grid"])}


def _distribution(values: list[float]) -> dict[str, float] | None:
    """min, 10th percentile, median, mean, 90th percentile and max; None for no values."""
    if not values:
        return None
    p10, median, p90 = np.percentile(values, [10, 50, 90]).tolist()
    return {"min": min(values), "p10": p10, "median": median, "mean": statistics.fmean(values), "p90": p90,
            "max": max(values)}


def _histogram(retentions: list[float]) -> list[dict[str, Any]]:
    """Counts per 0.1-wide retention bin, from the first non-empty bin to the last."""
    if not retentions:
        return []
    # A retention of exactly 1.0 belongs to the last bin.
    bins = [min(int(r * _HISTOGRAM_BINS), _HISTOGRAM_BINS - 1) for r in retentions]
    counts = np.bincount(bins, minlength=_HISTOGRAM_BINS).tolist()
    return [{"from": i / _HISTOGRAM_BINS, "to": (i + 1) / _HISTOGRAM_BINS, "count": counts[i]}
            for i in range(min(bins), max(bins) + 1)]


def _spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _thresholds_text(config: dict[str, Any]) -> str:
    parts = []
    if config["budgets"]:
        parts.append(f"budget {', '.join(f'{b:g}' for b in config['budgets'])}")
    tau_s = config["tau_s"]
    parts.append("tau_s " + (f"{tau_s['min']:.4f}" if tau_s["min"] == tau_s["max"] else
                             f"{tau_s['min']:.4f}..{tau_s['max']:.4f} (median {tau_s['median']:.4f})"))
    if config["tau_t"] is not None:
        tau_t = config["tau_t"]
        parts.append("tau_t " + (f"{tau_t['min']:.4f}" if tau_t["min"] == tau_t["max"] else
                                 f"{tau_t['min']:.4f}..{tau_t['max']:.4f} (median {tau_t['median']:.4f})"))
    if config["temporal_merging_off"]:
        parts.append(f"temporal merging off for {config['temporal_merging_off']}")
    parts.append(f"root level {', '.join(map(str, config['root_levels']))}")
    return ", ".join(parts)


def _distribution_text(distribution: dict[str, float], number_format: str) -> str:
    return "  ".join(f"{name} {format(value, number_format)}" for name, value in distribution.items())


def _megabytes(num_bytes: int) -> str:
    return f"{num_bytes / 1e6:.2f}"


def _one_line(message: str, limit: int = 160) -> str:
    line = " ".join(message.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
