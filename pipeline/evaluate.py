"""Multiple-choice video QA evaluation over a token store (``sttm eval``).

A benchmark file is a JSON list of records in Video-MME's layout (one record per
question; the bundled ``tests/data/annotations/videomme_sample.json`` is an example)::

    {"videoID": "fFjv93ACGo8", "question_id": "001-1", "question": "...",
     "options": ["A. Apples.", "B. Candles.", ...], "answer": "C",
     "duration": "short", "domain": "Knowledge", "sub_category": "...", "task_type": "..."}

The store's video id is read from ``video_key`` (Video-MME's videos are files named
``<videoID>.mp4``, and the pipeline names a video by its file name). Questions are grouped
by video and answered from one shared prefix per video (``pipeline.query``), greedily, with
Video-MME's frames-only prompt; the chosen letter is extracted from the free-text answer
(``extract_letter``) and scored against ``answer``: accuracy overall and per value of
each category field.

``run_eval`` is ``sttm eval``'s resumable run: one row per question is appended to the
output file as its answer comes in, keyed by the question's ``question_id`` and what the
answer depends on besides (``pipeline.query_job.QueryKey``: store, config, model, dtype,
decoding), so re-running the same command answers only the questions whose rows are
missing, and scores all answers, old and new.
"""
from __future__ import annotations

import json
import re
import string
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.fingerprint import canonical_json
from pipeline.query import QueryEngine, Question, QuestionResult, answer_questions, prefix_reuse_timings
from pipeline.query_job import Answerer, QueryKey, open_for_appending, read_output
from pipeline.store import TokenStore

# Video-MME's category fields; each is reported where the records have it.
CATEGORY_KEYS = ("duration", "domain", "sub_category", "task_type")

# Video-MME's prompt for frames without subtitles ({letters}: "A, B, C, or D").
PROMPT_HEAD = (
    "Select the best answer to the following multiple-choice question based on the video. "
    "Respond with only the letter ({letters}) of the correct option."
)
PROMPT_TAIL = "The best answer is:"

# "A. " or "A) " opening an option string
_OPTION_LABEL = re.compile(r"^\s*[A-Z][.)]\s*")
# what follows the article "A" ("A man"), as opposed to option A ("A and B", "A.")
_ARTICLE_A = re.compile(r"\s+(?!(?:and|or)\b)[a-z]")


class BenchmarkError(ValueError):
    """The benchmark file cannot be read as a list of multiple-choice records."""


@dataclass(frozen=True)
class MultipleChoiceQuestion:
    """One benchmark question. ``options`` are shown as given (``"A. Apples."``);
    ``answer`` is the correct letter; ``categories`` maps category fields to values."""

    question_id: str
    video_id: str
    question: str
    options: tuple[str, ...]
    answer: str
    categories: dict[str, str]

    @property
    def letters(self) -> str:
        """The option letters, ``"ABCD"`` for four options."""
        return string.ascii_uppercase[: len(self.options)]

    def prompt(self) -> str:
        """The question as put to the model: instruction, question, options, answer cue."""
        letters = self.letters
        listed = ", ".join(letters[:-1]) + f", or {letters[-1]}" if len(letters) > 1 else letters
        return "\n".join([PROMPT_HEAD.format(letters=listed), self.question, *self.options, PROMPT_TAIL])


def load_benchmark(
    path: str | Path, *, video_key: str = "videoID", category_keys: tuple[str, ...] = CATEGORY_KEYS
) -> list[MultipleChoiceQuestion]:
    """The records of a benchmark JSON file (a list of objects).

    Raises BenchmarkError naming the first bad record (by index and question id); question
    ids (``question_id``, else the record's index) must be unique.
    """
    try:
        with open(path, encoding="utf-8") as file:
            records = json.load(file)
    except ValueError as error:
        raise BenchmarkError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(records, list) or not records:
        raise BenchmarkError(f"{path} should hold a non-empty JSON list of question records")

    questions = []
    first_index: dict[str, int] = {}
    for index, record in enumerate(records):
        where = f"{path} record {index}" + (f" ({record.get('question_id')})" if isinstance(record, dict) else "")
        if not isinstance(record, dict):
            raise BenchmarkError(f"{where} is not an object")
        missing = [key for key in (video_key, "question", "options", "answer") if key not in record]
        if missing:
            raise BenchmarkError(f"{where} lacks {missing}")
        options = record["options"]
        if not (isinstance(options, list) and 2 <= len(options) <= 26 and all(isinstance(o, str) for o in options)):
            raise BenchmarkError(f"{where}: options should be a list of 2 to 26 strings")
        answer = str(record["answer"]).strip().upper()
        if answer not in string.ascii_uppercase[: len(options)]:
            raise BenchmarkError(f"{where}: answer {record['answer']!r} is not one of the option letters")
        question_id = str(record.get("question_id", index))
        if question_id in first_index:  # answers are kept and resumed by question id
            raise BenchmarkError(f"{where}: question_id {question_id!r} repeats record {first_index[question_id]}'s")
        first_index[question_id] = index
        questions.append(
            MultipleChoiceQuestion(
                question_id=question_id,
                video_id=str(record[video_key]),
                question=str(record["question"]),
                options=tuple(options),
                answer=answer,
                categories={key: str(record[key]) for key in category_keys if key in record},
            )
        )
    return questions


def extract_letter(response: str, options: tuple[str, ...] | list[str]) -> str | None:
    """The option letter a free-text ``response`` chooses, or ``None`` when it names no
    option or several.

    Tried in order: the whole response is a letter (``"C"``, ``"(c)"``, ``"C."``); an
    explicit ``"answer is C"`` / ``"Answer: (C)"`` / ``"option C"``; the response opens
    with a letter (``"C. Berries."``, ``"C) ..."``); exactly one option letter stands alone
    in it; it repeats exactly one option's text. A capital ``A`` before a lowercase word
    (``"A man walks"``) is the article, not option A.
    """
    letters = string.ascii_uppercase[: len(options)]
    text = response.strip()
    rules = (
        rf"^\s*[(\[]?([{letters}{letters.lower()}])[)\]]?[.:]?\s*$",
        rf"(?i:answer|option|choice)\s*(?:(?i:is)\s*)?:?\s*[(\[]?([{letters}{letters.lower()}])(?![A-Za-z])(?!\s+[a-z])",
        rf"^[(\[]?([{letters}])(?:[)\].:,]|$)",
    )
    for rule in rules:
        if match := re.search(rule, text):
            return match.group(1).upper()
    standing_alone = {
        match.group(1)
        for match in re.finditer(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])", text)
        if not (match.group(1) == "A" and _ARTICLE_A.match(text, match.end()))
    }
    if len(standing_alone) == 1:
        return standing_alone.pop()
    texts = [_OPTION_LABEL.sub("", option).strip(" .").lower() for option in options]
    repeated = [letter for letter, option_text in zip(letters, texts) if option_text and option_text in text.lower()]
    return repeated[0] if len(repeated) == 1 else None


@dataclass(frozen=True)
class EvalReport:
    """What ``evaluate`` found.

    Attributes:
        results: one row per question (``run_eval``: the rows answered before first),
            in answering order (grouped by video):
            ``question_id``, ``video_id``, categories, ``response``, ``predicted`` (letter
            or ``None``), ``answer``, ``correct`` and the query timings; or ``error`` when
            its video could not be used.
        accuracy: correct / answered questions (``None`` when none was answered).
        by_category: ``{field: {value: {"correct", "total", "accuracy"}}}``.
        num_questions, num_answered, num_unparsed (answered, no letter found), num_failed.
        timings: ``pipeline.query.prefix_reuse_timings`` of the run.
    """

    results: list[dict[str, Any]]
    accuracy: float | None
    by_category: dict[str, dict[str, dict[str, Any]]]
    num_questions: int
    num_answered: int
    num_unparsed: int
    num_failed: int
    timings: dict[str, float | int]

    def summary(self) -> dict[str, Any]:
        """Everything but the per-question rows."""
        return {
            "accuracy": self.accuracy,
            "num_questions": self.num_questions,
            "num_answered": self.num_answered,
            "num_unparsed": self.num_unparsed,
            "num_failed": self.num_failed,
            "by_category": self.by_category,
            "timings": self.timings,
        }


def evaluate(
    engine: QueryEngine,
    store: TokenStore,
    benchmark: list[MultipleChoiceQuestion],
    *,
    config_fingerprint: str | None = None,
    max_new_tokens: int = 16,
) -> EvalReport:
    """Answer every ``benchmark`` question greedily from the store's token sets, one
    shared prefix per video, and score the extracted letters."""
    questions = benchmark_questions(benchmark)
    return score(benchmark, answer_questions(engine, store, questions, config_fingerprint=config_fingerprint,
                                             max_new_tokens=max_new_tokens))


def benchmark_questions(benchmark: list[MultipleChoiceQuestion]) -> list[Question]:
    """The questions to put to the model; a question's id is its record's index."""
    return [Question(id=index, video_id=item.video_id, text=item.prompt()) for index, item in enumerate(benchmark)]


def score(benchmark: list[MultipleChoiceQuestion], results: Iterable[QuestionResult]) -> EvalReport:
    """Score the ``results`` of ``benchmark_questions(benchmark)``, answered greedily
    wherever (in this process or on Ray), against the records' answers."""
    results = list(results)
    rows = [result_row(benchmark[result.question.id], result) for result in results]
    return score_rows(benchmark, rows, prefix_reuse_timings(results))


def result_row(item: MultipleChoiceQuestion, result: QuestionResult) -> dict[str, Any]:
    """The output row of one question: its record's fields and the scored response with
    the query timings, or the ``error`` that kept it from being answered."""
    if result.answer is None:
        return _record_fields(item) | {"error": result.error}
    return _scored(item, result.answer.text) | _timings(result)


def _record_fields(item: MultipleChoiceQuestion) -> dict[str, Any]:
    return {"question_id": item.question_id, "video_id": item.video_id, **item.categories, "answer": item.answer}


def _scored(item: MultipleChoiceQuestion, response: str) -> dict[str, Any]:
    predicted = extract_letter(response, item.options)
    return _record_fields(item) | {"response": response, "predicted": predicted, "correct": predicted == item.answer}


def score_rows(benchmark: list[MultipleChoiceQuestion], rows: list[dict[str, Any]],
               timings: dict[str, float | int]) -> EvalReport:
    """The report over ``rows`` (``result_row``s, at most one per question)."""
    tallies: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    categories = {item.question_id: item.categories for item in benchmark}
    answered = [row for row in rows if "error" not in row]
    for row in answered:
        for key, value in categories[row["question_id"]].items():
            tallies[key][value][0] += row["correct"]
            tallies[key][value][1] += 1
    by_category = {
        key: {value: _accuracy(correct, total) for value, (correct, total) in sorted(values.items())}
        for key, values in tallies.items()
    }
    return EvalReport(
        results=rows,
        accuracy=_accuracy(sum(row["correct"] for row in answered), len(answered))["accuracy"],
        by_category=by_category,
        num_questions=len(benchmark),
        num_answered=len(answered),
        num_unparsed=sum(row["predicted"] is None for row in answered),
        num_failed=len(rows) - len(answered),
        timings=timings,
    )


def run_eval(benchmark: list[MultipleChoiceQuestion], out_path: str | Path, key: QueryKey,
             answer: Answerer) -> tuple[EvalReport, int]:
    """Answer the ``benchmark`` questions that ``out_path`` holds no answer row for under
    ``key`` (``answer`` is called once with those, not at all when none is left), append
    each question's row (with ``key``) as its result comes in, and score all answers, the
    file's and this run's. An error row is written unless the file already holds the same
    one; a re-run tries those questions again. A last line cut short (a killed run) is
    dropped and its question answered again.

    Returns the report (``results``: the rows answered before first, in benchmark order,
    then this run's in answering order; ``timings``: this run's answers) and the number of
    questions answered before.
    """
    key_json = key.to_json()
    earlier, written_errors = read_output(out_path, canonical_json(key_json), id_field="question_id", answer_field="response")
    rows = [_scored(item, earlier[item.question_id]["response"]) | _kept_timings(earlier[item.question_id])
            for item in benchmark if item.question_id in earlier]
    pending = [question for question, item in zip(benchmark_questions(benchmark), benchmark)
               if item.question_id not in earlier]
    results: list[QuestionResult] = []
    with open_for_appending(out_path) as out:
        for result in answer(pending) if pending else ():
            row = result_row(benchmark[result.question.id], result)
            rows.append(row)
            line = json.dumps(row | {"key": key_json}, ensure_ascii=False)
            if result.answer is not None:
                results.append(result)
            elif canonical_json(row | {"key": key_json}) in written_errors:
                continue  # a re-run does not repeat the same report
            out.write(line + "\n")
            out.flush()
    return score_rows(benchmark, rows, prefix_reuse_timings(results)), len(earlier)


_TIMING_KEYS = ("num_visual_tokens", "load_s", "prefill_s", "ttft_s", "total_s", "prefix_reused")


def _kept_timings(row: dict[str, Any]) -> dict[str, Any]:
    return {key: row.get(key) for key in _TIMING_KEYS}


def _timings(result: QuestionResult) -> dict[str, Any]:
    line = result.to_json()
    return {key: line[key] for key in _TIMING_KEYS}


def _accuracy(correct: int, total: int) -> dict[str, Any]:
    return {"correct": correct, "total": total, "accuracy": round(correct / total, 6) if total else None}
