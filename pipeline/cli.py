"""The ``sttm`` command line: a thin layer over the pipeline's functions.

Every command checks its inputs first (``pipeline.validate``: settings, paths, model,
store, cluster address), before Ray starts or weights load, and reports a bad one as one
paragraph naming the option and the fix, with exit status 2. Any other error is one line
with exit status 1; ``--debug`` (``-v``) shows its traceback and Ray's own logs.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any

import click

from pipeline import validate


class _Debug:
    on = False


def _debug_option(command):
    def remember(ctx, param, value):
        _Debug.on = _Debug.on or value
        if not _Debug.on:  # before transformers is imported, which reads it once
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # its "Loading weights" bars
        return value

    return click.option("--debug", "-v", is_flag=True, expose_value=False, is_eager=True, callback=remember,
                        help="Show tracebacks and Ray's own output.")(command)


class _Failed(click.ClickException):
    """An error that is not a usage mistake, shown as one line (exit status 1)."""

    def format_message(self) -> str:
        return f"{self.message}\n(run again with --debug for the traceback)"


class _Commands(click.Group):
    """Commands whose unexpected errors are one line unless --debug."""

    def command(self, *args, **kwargs):
        decorate = super().command(*args, **kwargs)
        return lambda function: decorate(_debug_option(function))

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit, KeyboardInterrupt):
            raise
        except Exception as error:
            if _Debug.on:
                raise
            raise _Failed(f"{type(error).__name__}: {error}") from None


@click.group(cls=_Commands)
@click.version_option(package_name="sttm-pipeline")
def main() -> None:
    """sttm-pipeline: compress Video LLM visual tokens with STTM and query them fast."""


def _preprocess_options(command):
    """The job's settings as options; anything not given falls back to --config, then defaults."""
    options = [
        click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
                     help="YAML file of settings (see jobs/configs/); options override it."),
        click.option("--output", help="Token store URL (default ./sttm-store)."),
        click.option("--model", help="Checkpoint dir, hub id or tiny-random:<family> (default tiny-random:llava-onevision)."),
        click.option("--budget", type=click.FloatRange(0, 1, min_open=True),
                     help="Retention budget in (0, 1] (default 0.5)."),
        click.option("--tau-s", type=float, help="Fixed spatial threshold instead of a budget."),
        click.option("--tau-t", type=float, help="Fixed temporal threshold (with --tau-s)."),
        click.option("--root-level", type=click.IntRange(min=0), help="STTM root level (default 1)."),
        click.option("--merge-layer", type=click.IntRange(min=0),
                     help="Merge the hidden states entering this LLM decoder layer (default 0: the visual "
                          "embeddings before the LLM; 2 is the paper's 7B setting; stores more per video)."),
        click.option("--frames", type=click.IntRange(min=1), help="Sample this many frames uniformly."),
        click.option("--fps", type=click.FloatRange(min=0, min_open=True), help="Sample at this rate (with --max-frames)."),
        click.option("--max-frames", type=click.IntRange(min=1), help="Upper bound on frames with --fps."),
        click.option("--device", help="Encoder device (default: cuda where Ray has GPUs, else cpu)."),
        click.option("--encode-workers", type=click.IntRange(min=1), help="Encoder actors, one GPU each where there are GPUs."),
        click.option("--decode-concurrency", type=click.IntRange(min=1), help="Parallel decode actors (default: as CPUs allow)."),
        click.option("--max-failure-rate", type=click.FloatRange(0, 1),
                     help="Exit non-zero above this failed fraction (default 0)."),
        click.option("--run-id-prefix", help="Run ids are <prefix>-<UTC time>-<random>."),
        click.option("--json", "as_json", is_flag=True,
                     help="Print the summary as JSON (the only output on stdout; progress goes to stderr)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _preprocess_config(input_uri: str | None, config_path: str | None, **settings) -> tuple[Any, dict[str, str]]:
    """The job's config from the options over the --config file, every setting checked,
    and how to name each setting to the user (``--tau-t``, or ``'tau_t' in FILE``)."""
    from pipeline.config import ConfigError, PreprocessConfig

    settings = {key: value for key, value in settings.items() if value is not None}
    if input_uri:
        settings["input"] = input_uri
    if "tau_s" in settings:
        settings.setdefault("budget", None)
    from_file = validate.check_config_file(config_path, PreprocessConfig) if config_path else {}
    names = _setting_names(settings, from_file, config_path)
    try:
        if config_path:
            return PreprocessConfig.from_yaml(config_path, **settings), names
        return PreprocessConfig(**settings), names
    except ConfigError as error:
        raise click.UsageError(validate.with_flags(str(error), names) + ".") from None


def _setting_names(given: dict, from_file: dict, config_path: str | None) -> dict[str, str]:
    """How to name each setting to the user: its option, or its name in the --config file."""
    from pipeline.config import PreprocessConfig

    names = {}
    for field in PreprocessConfig.__dataclass_fields__:
        if field in from_file and field not in given:
            names[field] = f"'{field}' in {config_path}"
        elif field == "input":
            names[field] = "INPUT"
        else:
            names[field] = validate.option_flag(field)
    return names


@main.command()
@click.argument("input_uri", metavar="[INPUT]", required=False)
@_preprocess_options
@click.option("--address", default=None,
              help="Ray cluster to join (ray://HOST:10001, HOST:6379 or auto; default: a fresh local one).")
def preprocess(input_uri, config_path, as_json, address, **settings):
    """Decode, encode and STTM-merge the videos of INPUT into a token store.

    INPUT is a manifest (.parquet/.jsonl/.csv with a 'uri' column), a prefix or a glob,
    local or s3://; default: the bundled sample videos. Without --model the job uses a
    TINY RANDOM model of the real LLaVA-OneVision architecture (made offline, for demos
    and tests): its tokens are real in shape and flow, not in meaning. A re-run skips
    what the store holds; when it holds every input, no Ray starts and no model loads.
    Progress goes to stderr: one updating line on a terminal, a line a minute in logs.
    """
    from pipeline.progress import job_console

    if not _Debug.on:
        settings["progress"] = False  # Ray Data's own bars; ours is the Progress line
    local_ray = address is None and not os.environ.get("RAY_ADDRESS")
    with job_console(quiet=not _Debug.on, local_ray=local_ray) as progress:
        config, names = _preprocess_config(input_uri, config_path, **settings)
        validate.check_model_spec(config.model, names["model"])
        validate.check_store_to_write(config.output, names["output"])
        if address:
            validate.check_address(address)

        from pipeline.inputs import InputError
        from pipeline.models import UnsupportedModelError
        from pipeline.run import EXIT_NOT_STARTED, NotStartedError, exit_code, run_preprocess, stdout_to_stderr

        # Ray and its workers write to stdout; the summary alone goes there (README "Failure handling").
        with stdout_to_stderr() as out:
            try:
                summary = run_preprocess(config, address=address, progress=progress)
            except InputError as error:
                raise click.BadParameter(f"{error}. Give a folder of videos, a glob or a manifest (.parquet, .jsonl "
                                         f"or .csv with a 'uri' column).", param_hint=names["input"]) from None
            except UnsupportedModelError as error:
                hint = names["merge_layer"] if "merge_layer" in str(error) else names["model"]
                raise click.BadParameter(f"{error}.", param_hint=hint) from None
            except NotStartedError as error:  # run id, store or Ray unusable: checked before any work
                click.echo(f"Error: {error}", err=True)
                raise SystemExit(EXIT_NOT_STARTED) from None
            finally:
                _stop_ray()
            click.echo(json.dumps(summary.to_dict()) if as_json else summary.text(), file=out)
    for problem in summary.unwritten_records:
        click.echo(f"Error: not written: {problem}", err=True)
    raise SystemExit(exit_code(summary, config.max_failure_rate))


def _stop_ray() -> None:
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


@main.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(exists=True, dir_okay=False))
@click.option("--address", required=True, help="Ray dashboard address, e.g. http://head:8265.")
@click.option("--working-dir", default=".", show_default=True, help="Directory shipped with the job.")
@click.option("--wait/--no-wait", default=False, show_default=True, help="Follow the job until it ends.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def submit(config_path, address, working_dir, wait, as_json):
    """Submit the preprocessing job of CONFIG to the Ray cluster at --address.

    The same job as `sttm preprocess --config CONFIG`, run by Ray Jobs on the cluster
    (`python -m jobs.preprocess --config CONFIG`).
    """
    from pathlib import Path

    from pipeline.config import ConfigError, PreprocessConfig
    from pipeline.submit import submit_job

    validate.check_config_file(config_path, PreprocessConfig, flag=f"CONFIG {config_path}")
    try:
        PreprocessConfig.from_yaml(config_path)
    except ConfigError as error:
        raise click.BadParameter(f"{error}.", param_hint=f"CONFIG {config_path}") from None
    if not Path(config_path).resolve().is_relative_to(Path(working_dir).resolve()):
        raise click.BadParameter(f"{config_path} is not inside --working-dir {working_dir}, which is what ships "
                                 f"with the job; move it there or pass --working-dir.", param_hint="CONFIG")
    validate.check_address(address)
    result = submit_job(config_path, address, working_dir, wait=wait)
    click.echo(json.dumps(result) if as_json else f"submitted {result['job_id']}: {result['status']}")
    if wait and result["status"] != "SUCCEEDED":
        raise SystemExit(1)



# --------------------------------------------------------------------------- query, eval

_DTYPES = {"auto": None, "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _model_options(command):
    """Options shared by the commands that load a full model."""
    options = [
        click.option("--model", "model_spec", required=True,
                     help="Checkpoint directory, hub id or tiny-random:<family>; the model the store was made with."),
        click.option("--device", default=None, help="Torch device (default: cuda if available, else cpu)."),
        click.option("--dtype", type=click.Choice(list(_DTYPES)), default="auto", show_default=True,
                     help="Model dtype (auto: the checkpoint's)."),
        click.option("--config-fingerprint", default=None,
                     help="Which token sets to use when the store holds several configs per video."),
    ]
    for option in reversed(options):  # the first decorator applied is listed last
        command = option(command)
    return command


def _store_config(store_url: str, given: str | None, video_ids: set[str]) -> str | None:
    """The config fingerprint a query over ``video_ids`` uses: ``given`` (which the store
    must hold), else None, letting each video's only config be used. A video stored under
    several configs needs --config-fingerprint: that is a usage error, named with them."""
    from collections import defaultdict

    from pipeline.store import TokenStore

    summaries = TokenStore(store_url).list()
    configs_of = defaultdict(dict)
    for summary in summaries:
        configs_of[summary.video_id][summary.config_fingerprint] = summary.model_id
    every_config = {fp: model for configs in configs_of.values() for fp, model in configs.items()}
    if given is not None:
        if given not in every_config:
            listing = "; ".join(f"{fp} ({model})" for fp, model in sorted(every_config.items()))
            raise click.BadParameter(f"{store_url} has no token sets under config {given}; it has: "
                                     f"{listing or 'none'}.", param_hint="--config-fingerprint")
        return given
    ambiguous = sorted(video for video in video_ids if len(configs_of.get(video, ())) > 1)
    if ambiguous:
        configs = {fp: model for video in ambiguous for fp, model in configs_of[video].items()}
        listing = "; ".join(f"{fp} ({model})" for fp, model in sorted(configs.items()))
        raise click.UsageError(
            f"{len(ambiguous)} of the videos asked about ({', '.join(map(repr, ambiguous[:3]))}"
            f"{', ...' if len(ambiguous) > 3 else ''}) have token sets under several configs in {store_url}: "
            f"{listing}. Choose one with --config-fingerprint FP (`sttm inspect {store_url}` shows their settings).")
    return None


def _check_query_inputs(store_url: str, out_path: str, model_spec: str) -> None:
    """Checks of `sttm query` and `sttm eval` before anything is read."""
    validate.check_store_to_read(store_url)
    validate.check_output_file(out_path, "--out")
    validate.check_model_spec(model_spec)


def _load_engine(model_spec: str, device: str | None, dtype: str):
    import torch

    from pipeline.query import QueryEngine

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return QueryEngine(model_spec, device=device, dtype=getattr(torch, _DTYPES[dtype]) if _DTYPES[dtype] else None)


def _cluster_options(command):
    """Where the query and eval commands answer: in this process, or on Ray."""
    options = [
        click.option("--address", default=None,
                     help="Ray cluster to answer on (its nodes must reach the store); "
                          "default: this process, or a fresh local Ray with --workers > 1."),
        click.option("--workers", type=click.IntRange(min=1), default=None,
                     help="Model actors on Ray, one GPU each where there are GPUs "
                          "(default with --address: one per GPU of the cluster, else 1)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _answering(store_url, model_spec, device, dtype, config_fingerprint, address, workers, **decoding):
    """``(answer, session)``: what answers a list of questions -- this process's engine
    (loaded on first use), or model actors on Ray when --address or --workers > 1 asks for
    it -- and the context to call it in (Ray joined or started for the command, or nothing)."""
    from pipeline.query import answer_questions
    from pipeline.query_job import answer_on_ray, ray_session
    from pipeline.store import TokenStore

    if address is None and (workers or 1) == 1:
        return lambda questions: answer_questions(_load_engine(model_spec, device, dtype), TokenStore(store_url),
                                                  questions, config_fingerprint=config_fingerprint,
                                                  **decoding), contextlib.nullcontext()
    return lambda questions: answer_on_ray(questions, store_url=store_url, model_spec=model_spec, dtype=_DTYPES[dtype],
                                           device=device, workers=workers, config_fingerprint=config_fingerprint,
                                           **decoding), ray_session(address)


@main.command()
@click.argument("store_url", metavar="STORE")
@_model_options
@_cluster_options
@click.option("--questions", "questions_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help='JSONL, one {"video_id": ..., "question": ..., "id": optional} per line.')
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, writable=True),
              help="Answers JSONL to append to, one line per question; questions it already answers are skipped.")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--do-sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--seed", default=None, type=int, help="Seed of the sampler (each question starts from it).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def query(store_url, model_spec, device, dtype, config_fingerprint, address, workers, questions_path, out_path,
          max_new_tokens, do_sample, temperature, seed, as_json) -> None:
    """Answer the questions of a JSONL file about videos in STORE, prefilling each video once.

    Resumable: answers already in --out for the same store, model and decoding options
    are kept and not asked again. Exits with status 1 when some input line or video could
    not be used (the others are still answered and written).
    """
    from pipeline.query import read_questions
    from pipeline.query_job import QueryKey, run_query

    _check_query_inputs(store_url, out_path, model_spec)
    questions, _ = read_questions(questions_path)
    config_fingerprint = _store_config(store_url, config_fingerprint, {q.video_id for q in questions})
    decoding = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, seed=seed)
    key = QueryKey.of(store=store_url, config_fingerprint=config_fingerprint, model=model_spec, dtype=dtype, **decoding)
    answer, session = _answering(store_url, model_spec, device, dtype, config_fingerprint, address, workers, **decoding)
    try:
        with session:
            summary = run_query(questions_path, out_path, key, answer)
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    if as_json:
        click.echo(json.dumps(summary.to_dict()))
    else:
        timings = summary.timings
        click.echo(f"answered {summary.num_answered} of {summary.num_questions} questions on {timings['num_videos']} "
                   f"videos ({summary.num_already_answered} already answered) -> {out_path}")
        click.echo(f"prefill {timings['prefill_s']:.3f} s (once per video), answers {timings['answer_s']:.3f} s, "
                   f"prefix reuse saved {timings['saved_s']:.3f} s of prefill")
        for problem in summary.problems:
            where = f"line {problem['line']}" if "line" in problem else f"question {problem['id']} ({problem['video_id']})"
            click.echo(f"problem: {where}: {problem['error']}", err=True)
    if summary.problems:
        raise SystemExit(1)


@main.command(name="eval")
@click.argument("store_url", metavar="STORE")
@_model_options
@_cluster_options
@click.option("--benchmark", "benchmark_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="JSON list of multiple-choice records in Video-MME's layout.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, writable=True),
              help="Per-question results JSONL to append to; questions it already answers are not asked again.")
@click.option("--video-key", default="videoID", show_default=True,
              help="Record field holding the store's video id (Video-MME videos are named <videoID>.mp4).")
@click.option("--category", "categories", multiple=True, help="Record fields to break accuracy down by "
              "(repeatable; default: duration, domain, sub_category, task_type).")
@click.option("--max-new-tokens", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def eval_(store_url, model_spec, device, dtype, config_fingerprint, address, workers, benchmark_path, out_path, video_key,
          categories, max_new_tokens, as_json) -> None:
    """Score a multiple-choice video QA benchmark over the token sets in STORE.

    Resumable: answers already in --out for the same store, model and decoding options
    are kept, not asked again, and scored with the new ones. Exits with status 1 when
    some question's video could not be used (the others are still scored; accuracy is
    over answered questions).
    """
    from pipeline.evaluate import CATEGORY_KEYS, BenchmarkError, load_benchmark, run_eval
    from pipeline.query_job import QueryKey

    _check_query_inputs(store_url, out_path, model_spec)
    try:
        benchmark = load_benchmark(benchmark_path, video_key=video_key, category_keys=categories or CATEGORY_KEYS)
    except BenchmarkError as error:
        raise click.BadParameter(str(error), param_hint="--benchmark") from None
    config_fingerprint = _store_config(store_url, config_fingerprint, {item.video_id for item in benchmark})
    decoding = dict(max_new_tokens=max_new_tokens, do_sample=False, temperature=1.0, seed=None)
    key = QueryKey.of(store=store_url, config_fingerprint=config_fingerprint, model=model_spec, dtype=dtype, **decoding)
    answer, session = _answering(store_url, model_spec, device, dtype, config_fingerprint, address, workers,
                                 max_new_tokens=max_new_tokens)
    with session:
        report, already_answered = run_eval(benchmark, out_path, key, answer)
    problems = [{"id": str(row["question_id"]), "video_id": row["video_id"], "error": row["error"]}
                for row in report.results if "error" in row]
    summary = report.summary() | {"num_already_answered": already_answered, "problems": problems}
    if as_json:
        click.echo(json.dumps(summary))
    else:
        accuracy = "n/a" if report.accuracy is None else f"{100 * report.accuracy:.1f}%"
        click.echo(f"accuracy {accuracy} over {report.num_answered} of {report.num_questions} questions "
                   f"({report.num_unparsed} answers named no option; {already_answered} answered before) "
                   f"-> {out_path}")
        for key, values in report.by_category.items():
            for value, tally in values.items():
                click.echo(f"  {key} = {value}: {100 * tally['accuracy']:.1f}% ({tally['correct']}/{tally['total']})")
        timings = report.timings
        click.echo(f"prefill {timings['prefill_s']:.3f} s for {timings['num_videos']} videos, answers "
                   f"{timings['answer_s']:.3f} s, prefix reuse saved {timings['saved_s']:.3f} s of prefill")
        for problem in problems:
            click.echo(f"problem: question {problem['id']} ({problem['video_id']}): {problem['error']}", err=True)
    if report.num_failed:
        raise SystemExit(1)


# --------------------------------------------------------------------------- inspect, visualize, budget-curve


@main.command(name="inspect")
@click.argument("store_url", metavar="STORE")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=0),
              help="Token sets listed in the text report (0: all; --json always lists all).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def inspect_(store_url, limit, as_json) -> None:
    """Summarize STORE: runs, videos, failures, retention, tokens and bytes per video, thresholds."""
    from pipeline.inspect_store import summarize_store
    from pipeline.store import StoreError

    validate.check_store_to_read(store_url)
    try:
        summary = summarize_store(store_url)
    except StoreError as error:
        raise click.ClickException(str(error)) from None
    click.echo(json.dumps(summary.to_dict()) if as_json else summary.text(max_videos=limit))
    if summary.problems:  # listed in the report; the store needs a look
        raise SystemExit(1)


@main.command()
@click.argument("store_url", metavar="STORE")
@click.argument("video_id")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, writable=True),
              help="PNG file to write.")
@click.option("--config-fingerprint", default=None,
              help="Which token set to draw when the video has several configs.")
@click.option("--panels", default=8, show_default=True, type=click.IntRange(min=1),
              help="Token frames drawn, spread evenly from first to last.")
@click.option("--panel-width", default=320, show_default=True, type=click.IntRange(min=16),
              help="Width of each drawn frame in pixels.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def visualize(store_url, video_id, out_path, config_fingerprint, panels, panel_width, as_json) -> None:
    """Draw the tokens of VIDEO_ID in STORE on its frames, decoded again from its source.

    Outlines mark where each token starts: yellow one patch, cyan a coarser cell, magenta
    a token that spans later frames; a magenta tint marks patches merged into a token of
    an earlier frame.
    """
    from pipeline.store import StoreError, TokenStore
    from pipeline.visualize import SourceUnavailableError, visualize_stored_video

    validate.check_store_to_read(store_url)
    validate.check_output_file(out_path, "--out")
    if config_fingerprint is None:
        # Several configs of this video (e.g. two budgets): draw the newest, and say so.
        configs = sorted((s for s in TokenStore(store_url).list() if s.video_id == video_id),
                         key=lambda s: s.created_at)
        if len(configs) > 1:
            config_fingerprint = configs[-1].config_fingerprint
            others = ", ".join(s.config_fingerprint for s in configs[:-1])
            click.echo(f"note: {video_id} has token sets under {len(configs)} configs; drawing the newest, "
                       f"{config_fingerprint} (others: {others}; choose with --config-fingerprint).", err=True)
    try:
        drawn = visualize_stored_video(store_url, video_id, config_fingerprint=config_fingerprint,
                                       max_panels=panels, panel_width=panel_width)
    except (StoreError, SourceUnavailableError, ValueError) as error:
        raise click.ClickException(validate.with_flags(str(error), {"config_fingerprint": "--config-fingerprint"})) from None
    drawn.image.save(out_path)
    if as_json:
        click.echo(json.dumps({"path": out_path, **drawn.to_dict()}))
    else:
        click.echo(f"wrote {out_path} ({drawn.image.width}x{drawn.image.height} px): {' · '.join(drawn.caption)}")


@main.command(name="budget-curve")
@click.argument("video_uri", metavar="VIDEO")
@click.option("--model", "model_spec", required=True, help="Checkpoint directory, hub id or tiny-random:<family>.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, writable=True),
              help="PNG file to write.")
@click.option("--frames", type=click.IntRange(min=1), default=None,
              help="Sample this many frames uniformly (default: the model's own sampling).")
@click.option("--budget", "budgets", multiple=True, default=(0.5, 0.3), show_default=True,
              type=click.FloatRange(0, 1, min_open=True), help="Retention budgets to mark (repeatable).")
@click.option("--points", default=40, show_default=True, type=click.IntRange(min=0),
              help="Thresholds added where retention changes most, after a coarse pass over [-1, 1].")
@click.option("--root-level", default=1, show_default=True, type=click.IntRange(min=0), help="STTM root level.")
@click.option("--device", default=None, help="Torch device (default: cuda if available, else cpu).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="Encoder dtype (auto: the checkpoint's).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def budget_curve(video_uri, model_spec, out_path, frames, budgets, points, root_level, device, dtype, as_json) -> None:
    """Plot retention against the STTM threshold (tau_s = tau_t) for VIDEO, marking the
    thresholds the budget search picks for each --budget."""
    import torch

    from pipeline.errors import VideoError
    from pipeline.uris import sanitize_uri
    from pipeline.visualize import draw_budget_curve, measure_budget_curve

    validate.check_output_file(out_path, "--out")
    validate.check_model_spec(model_spec)
    if "://" not in video_uri and not os.path.isfile(video_uri):
        raise click.BadParameter(f"{video_uri}: no such video file.", param_hint="VIDEO")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        curve = measure_budget_curve(video_uri, model_spec, frames=frames, device=device,
                                     dtype=None if dtype == "auto" else getattr(torch, dtype), budgets=budgets,
                                     num_points=points, root_level=root_level)
    except VideoError as error:
        raise click.BadParameter(str(error), param_hint="VIDEO") from None
    video = sanitize_uri(video_uri)
    t, h, w = curve.grid
    draw_budget_curve(curve, f"{video.rsplit('/', 1)[-1]} · {model_spec} · {t}x{h}x{w} tokens").image.save(out_path)
    if as_json:
        click.echo(json.dumps({"path": out_path, "video": video, "model": model_spec, **curve.to_dict()}))
        return
    click.echo(f"wrote {out_path} ({len(curve.points)} thresholds, grid {t}x{h}x{w})")
    for budget, picked in curve.budgets.items():
        click.echo(f"  budget {budget:g}: " + ("unreachable" if picked is None else
                   f"tau {picked.tau:.4f} keeps {picked.num_tokens:,} of {t * h * w:,} tokens "
                   f"(retention {picked.retention:.3f})"))


if __name__ == "__main__":
    main()
