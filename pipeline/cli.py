"""The ``sttm`` command line: a thin layer over the pipeline's functions."""
from __future__ import annotations

import contextlib
import json

import click


@click.group()
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
        click.option("--budget", type=float, help="Retention budget in (0, 1] (default 0.5)."),
        click.option("--tau-s", type=float, help="Fixed spatial threshold instead of a budget."),
        click.option("--tau-t", type=float, help="Fixed temporal threshold (with --tau-s)."),
        click.option("--root-level", type=int, help="STTM root level (default 1)."),
        click.option("--frames", type=int, help="Sample this many frames uniformly."),
        click.option("--fps", type=float, help="Sample at this rate (with --max-frames)."),
        click.option("--max-frames", type=int, help="Upper bound on frames with --fps."),
        click.option("--device", help="Encoder device (default: cuda where Ray has GPUs, else cpu)."),
        click.option("--encode-workers", type=int, help="Encoder actors, one GPU each where there are GPUs."),
        click.option("--decode-concurrency", type=int, help="Parallel decode tasks (default: as CPUs allow)."),
        click.option("--max-failure-rate", type=float, help="Exit non-zero above this failed fraction (default 0)."),
        click.option("--run-id-prefix", help="Run ids are <prefix>-<UTC time>-<random>."),
        click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _preprocess_config(input_uri: str | None, config_path: str | None, **settings):
    from pipeline.config import PreprocessConfig

    settings = {key: value for key, value in settings.items() if value is not None}
    if input_uri:
        settings["input"] = input_uri
    if "tau_s" in settings:
        settings.setdefault("budget", None)
    if config_path:
        return PreprocessConfig.from_yaml(config_path, **settings)
    return PreprocessConfig(**settings)


@main.command()
@click.argument("input_uri", metavar="INPUT", required=False)
@_preprocess_options
@click.option("--address", default=None, help="Ray cluster to join (default: an embedded local one).")
def preprocess(input_uri, config_path, as_json, address, **settings):
    """Decode, encode and STTM-merge the videos of INPUT into a token store.

    INPUT is a manifest (.parquet/.jsonl/.csv with a 'uri' column), a prefix or a glob,
    local or s3://; default: the bundled sample videos. Without --model the job uses a
    TINY RANDOM model of the real LLaVA-OneVision architecture (made offline, for demos
    and tests): its tokens are real in shape and flow, not in meaning.
    """
    import ray

    from pipeline.run import EXIT_NOT_STARTED, NotStartedError, exit_code, run_preprocess, stdout_to_stderr

    # Ray and its workers write to stdout; the summary alone goes there (README "Failure handling").
    with stdout_to_stderr() as out:
        try:
            config = _preprocess_config(input_uri, config_path, **settings)
            summary = run_preprocess(config, address=address)
        except NotStartedError as error:  # bad settings, inputs or store: checked before any work
            click.echo(f"Error: {error}", err=True)
            raise SystemExit(EXIT_NOT_STARTED) from None
        finally:
            ray.shutdown()
        click.echo(json.dumps(summary.to_dict()) if as_json else summary.text(), file=out)
    for problem in summary.unwritten_records:
        click.echo(f"Error: not written: {problem}", err=True)
    raise SystemExit(exit_code(summary, config.max_failure_rate))


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
    from pipeline.submit import submit_job

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
    from pipeline.query_job import QueryKey, run_query

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
              help="Per-question results JSONL to write.")
@click.option("--video-key", default="videoID", show_default=True,
              help="Record field holding the store's video id (Video-MME videos are named <videoID>.mp4).")
@click.option("--category", "categories", multiple=True, help="Record fields to break accuracy down by "
              "(repeatable; default: duration, domain, sub_category, task_type).")
@click.option("--max-new-tokens", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def eval_(store_url, model_spec, device, dtype, config_fingerprint, address, workers, benchmark_path, out_path, video_key,
          categories, max_new_tokens, as_json) -> None:
    """Score a multiple-choice video QA benchmark over the token sets in STORE.

    Exits with status 1 when some question's video could not be used (the others are
    still scored; accuracy is over answered questions).
    """
    from pipeline.evaluate import CATEGORY_KEYS, BenchmarkError, benchmark_questions, load_benchmark, score

    try:
        benchmark = load_benchmark(benchmark_path, video_key=video_key, category_keys=categories or CATEGORY_KEYS)
    except BenchmarkError as error:
        raise click.ClickException(str(error)) from None
    answer, session = _answering(store_url, model_spec, device, dtype, config_fingerprint, address, workers,
                                 max_new_tokens=max_new_tokens)
    with session:
        report = score(benchmark, answer(benchmark_questions(benchmark)))
    with open(out_path, "w", encoding="utf-8") as out:
        for row in report.results:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    summary = report.summary()
    if as_json:
        click.echo(json.dumps(summary))
    else:
        accuracy = "n/a" if report.accuracy is None else f"{100 * report.accuracy:.1f}%"
        click.echo(f"accuracy {accuracy} over {report.num_answered} of {report.num_questions} questions "
                   f"({report.num_unparsed} answers named no option) -> {out_path}")
        for key, values in report.by_category.items():
            for value, tally in values.items():
                click.echo(f"  {key} = {value}: {100 * tally['accuracy']:.1f}% ({tally['correct']}/{tally['total']})")
        timings = report.timings
        click.echo(f"prefill {timings['prefill_s']:.3f} s for {timings['num_videos']} videos, answers "
                   f"{timings['answer_s']:.3f} s, prefix reuse saved {timings['saved_s']:.3f} s of prefill")
        for row in report.results:
            if "error" in row:
                click.echo(f"problem: question {row['question_id']} ({row['video_id']}): {row['error']}", err=True)
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
    from pipeline.store import StoreError
    from pipeline.visualize import SourceUnavailableError, visualize_stored_video

    try:
        drawn = visualize_stored_video(store_url, video_id, config_fingerprint=config_fingerprint,
                                       max_panels=panels, panel_width=panel_width)
    except (StoreError, SourceUnavailableError, ValueError) as error:
        raise click.ClickException(str(error)) from None
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

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        curve = measure_budget_curve(video_uri, model_spec, frames=frames, device=device,
                                     dtype=None if dtype == "auto" else getattr(torch, dtype), budgets=budgets,
                                     num_points=points, root_level=root_level)
    except VideoError as error:
        raise click.ClickException(str(error)) from None
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
