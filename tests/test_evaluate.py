"""``sttm eval``: benchmark records, letter extraction, scoring, and a run over a store."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.evaluate import BenchmarkError, evaluate, extract_letter, load_benchmark, run_eval
from pipeline.query import answer_questions
from pipeline.query_job import QueryKey
from pipeline.models import load_adapter, resolve_model
from pipeline.query import Answer
from pipeline.store import NotFoundError, TokenStore
from query_setup import decode_sample, stored_token_set

VIDEOMME_SAMPLE = Path(__file__).parent / "data" / "annotations" / "videomme_sample.json"
OPTIONS = ("A. Apples.", "B. Candles.", "C. Berries.", "D. The three kinds are of the same number.")


# ------------------------------------------------------------------- records


def test_videomme_records_load_with_their_categories_and_prompt():
    questions = load_benchmark(VIDEOMME_SAMPLE)

    assert len(questions) == 30
    first = questions[0]
    assert (first.question_id, first.video_id, first.answer, first.letters) == ("001-1", "fFjv93ACGo8", "C", "ABCD")
    assert first.categories == {
        "duration": "short",
        "domain": "Knowledge",
        "sub_category": "Humanity & History",
        "task_type": "Counting Problem",
    }
    assert first.prompt() == (
        "Select the best answer to the following multiple-choice question based on the video. "
        "Respond with only the letter (A, B, C, or D) of the correct option.\n"
        "When demonstrating the Germany modern Christmas tree is initially decorated with apples, candles and "
        "berries, which kind of the decoration has the largest number?\n"
        "A. Apples.\nB. Candles.\nC. Berries.\nD. The three kinds are of the same number.\n"
        "The best answer is:"
    )
    assert len({q.video_id for q in questions}) == 10
    assert load_benchmark(VIDEOMME_SAMPLE, video_key="video_id")[0].video_id == "001"


@pytest.mark.parametrize(
    "records, message",
    [
        ({"question": "not a list"}, "non-empty JSON list"),
        ([], "non-empty JSON list"),
        ([{"videoID": "v", "question": "q", "options": list(OPTIONS)}], r"record 0 \(None\) lacks \['answer'\]"),
        ([{"videoID": "v", "question": "q", "options": list(OPTIONS), "answer": "E", "question_id": "x-1"}],
         r"record 0 \(x-1\): answer 'E' is not one of the option letters"),
        ([{"videoID": "v", "question": "q", "options": "A. yes", "answer": "A"}], "options should be a list"),
        ([{"videoID": "v", "question": "q", "options": list(OPTIONS), "answer": "A", "question_id": "x-1"}] * 2,
         r"record 1 \(x-1\): question_id 'x-1' repeats record 0's"),
    ],
)  # fmt: skip
def test_bad_benchmark_files_are_refused_naming_the_record(tmp_path, records, message):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(records))
    with pytest.raises(BenchmarkError, match=message):
        load_benchmark(path)


# ------------------------------------------------------------------- letters


@pytest.mark.parametrize(
    "response, letter",
    [
        ("C", "C"),
        ("c", "C"),
        ("(B)", "B"),
        ("D.", "D"),
        ("C. Berries.", "C"),
        ("B) Candles", "B"),
        ("The best answer is C.", "C"),
        ("The correct option is A.", "A"),
        ("Answer: (b)", "B"),
        ("I think it is B because of the flames.", "B"),
        ("Berries.", "C"),  # the text of one option
        ("A man decorates the tree.", None),  # the article, not option A
        ("A and B", None),  # two options
        ("berries and candles", None),
        ("", None),
        ("I am not sure.", None),
    ],
)
def test_the_chosen_letter_is_extracted_from_free_text(response, letter):
    assert extract_letter(response, OPTIONS) == letter


def test_letters_beyond_the_options_are_not_chosen():
    assert extract_letter("E", OPTIONS) is None
    assert extract_letter("E", (*OPTIONS, "E. None of them.")) == "E"


# ------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class FakePrefix:
    num_visual_tokens: int
    prefill_s: float


class ScriptedEngine:
    """Answers a video's questions together with scripted responses: its prefill "takes"
    2 s (the first question rides in it), then one more answer every 0.5 s."""

    def __init__(self, responses: dict[str, str]):
        self.responses = responses
        self.prefills = 0

    def check(self, stored):
        pass

    def prefill_and_answer_all(self, stored, questions, decoding):
        self.prefills += 1
        answers = [
            Answer(self.responses[question], [1], [0.0], 5, ttft_s=2.1, total_s=2.0 + 0.5 * (index + 1))
            for index, question in enumerate(questions)
        ]
        return FakePrefix(num_visual_tokens=10, prefill_s=2.0), answers


class VideosStore:
    def __init__(self, video_ids):
        self.video_ids = video_ids

    def read(self, video_id, config_fingerprint=None):
        if video_id not in self.video_ids:
            raise NotFoundError(f"no token set for video id {video_id!r}")
        return video_id


def test_accuracy_overall_and_per_category_with_one_prefill_per_video():
    questions = load_benchmark(VIDEOMME_SAMPLE)[:9]  # videos 001, 002, 003: 3 questions each
    video_001, video_002, video_003 = (q.video_id for q in questions[::3])
    scripted = {  # right, wrong, unparsed for 001; all right for 002; 003 is missing from the store
        questions[0].prompt(): f"The best answer is {questions[0].answer}.",
        questions[1].prompt(): "D" if questions[1].answer != "D" else "A",
        questions[2].prompt(): "I cannot tell.",
        **{q.prompt(): q.answer for q in questions[3:6]},
    }
    engine = ScriptedEngine(scripted)

    report = evaluate(engine, VideosStore({video_001, video_002}), questions)

    assert engine.prefills == 2
    assert (report.num_questions, report.num_answered, report.num_unparsed, report.num_failed) == (9, 6, 1, 3)
    assert report.accuracy == pytest.approx(4 / 6, abs=1e-6)
    assert [row["correct"] for row in report.results[:6]] == [True, False, False, True, True, True]
    assert report.results[2]["predicted"] is None
    assert all("no token set for video id" in row["error"] for row in report.results[6:])
    tasks = report.by_category["task_type"]
    # Counting Problem: 001-1 right, 001-3 unparsed, 002-3 right (003-1 not answered)
    assert tasks["Counting Problem"] == {"correct": 2, "total": 3, "accuracy": pytest.approx(2 / 3, abs=1e-6)}
    assert tasks["Information Synopsis"] == {"correct": 0, "total": 1, "accuracy": 0.0}  # 001-2 wrong
    assert sum(tally["total"] for tally in tasks.values()) == 6
    assert report.by_category["duration"] == {"short": {"correct": 4, "total": 6, "accuracy": pytest.approx(4 / 6, abs=1e-6)}}
    # Two videos, three answered questions each: two prefills of 2 s saved per video; the
    # last answer came 1.5 s after each prefill.
    assert report.timings == {"num_videos": 2, "prefill_s": 4.0, "answer_s": 3.0, "saved_s": 8.0}


# ------------------------------------------------------------------- resuming


KEY = QueryKey.of(store="/stores/a", config_fingerprint=None, model="m", dtype="float32", max_new_tokens=16,
                  do_sample=False, temperature=1.0, seed=None)


class KilledAfter(Exception):
    pass


def scripted_answerer(benchmark, asked, kill_after=None):
    """``run_eval``'s answerer: the scripted engine over a store of videos 001 and 002,
    recording the questions it is asked; with ``kill_after`` it dies after yielding that
    many results, as a killed run would."""
    engine = ScriptedEngine({item.prompt(): item.answer if index % 3 else "B" for index, item in enumerate(benchmark)})
    store = VideosStore({benchmark[0].video_id, benchmark[3].video_id})

    def answer(questions):
        asked.extend(question.id for question in questions)
        for count, result in enumerate(answer_questions(engine, store, questions), start=1):
            yield result
            if count == kill_after:
                raise KilledAfter()

    return answer


def answer_rows(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    answered = [row["question_id"] for row in rows if "response" in row]
    assert len(answered) == len(set(answered)), "a question was answered twice"
    return rows


def test_a_rerun_after_a_killed_run_answers_only_the_missing_and_scores_all(tmp_path):
    benchmark = load_benchmark(VIDEOMME_SAMPLE)[:9]  # videos 001, 002 stored; 003 missing
    reference, _ = run_eval(benchmark, tmp_path / "reference.jsonl", KEY, scripted_answerer(benchmark, []))
    out = tmp_path / "results.jsonl"

    # Killed after 4 answers: they were written as they came, the rest not at all.
    with pytest.raises(KilledAfter):
        run_eval(benchmark, out, KEY, scripted_answerer(benchmark, [], kill_after=4))
    assert [row["question_id"] for row in answer_rows(out)] == ["001-1", "001-2", "001-3", "002-1"]
    assert all(row["key"] == KEY.to_json() for row in answer_rows(out))
    with open(out, "a") as file:  # and the 5th cut short while being written
        file.write('{"question_id": "002-2", "video_id": "002", "resp')

    asked = []
    report, already = run_eval(benchmark, out, KEY, scripted_answerer(benchmark, asked))

    assert already == 4 and asked == list(range(4, 9))  # 002-2 on; the cut line is answered again
    rows = answer_rows(out)  # every line whole JSON, nothing twice
    assert [row["question_id"] for row in rows] == [item.question_id for item in benchmark]
    keys = ("accuracy", "by_category", "num_questions", "num_answered", "num_unparsed", "num_failed")
    assert {key: getattr(report, key) for key in keys} == {key: getattr(reference, key) for key in keys}
    correct = sum(item.answer == ("B" if index % 3 == 0 else item.answer) for index, item in enumerate(benchmark[:6]))
    assert (report.num_answered, report.num_failed) == (6, 3) and report.accuracy == pytest.approx(correct / 6, abs=1e-6)
    def scored(rows):  # timings differ between runs (which answer rode in which prefill)
        return {row["question_id"]: {key: row.get(key) for key in ("response", "predicted", "correct", "error")}
                for row in rows}

    assert scored(report.results) == scored(reference.results)
    assert all(row["total_s"] > 0 for row in report.results if "error" not in row)  # old rows keep their timings

    # Again: only the failed questions are tried again (their video may have been stored
    # since); nothing is written (the same errors are not repeated); the same scores.
    written = out.read_bytes()
    asked = []
    again, already = run_eval(benchmark, out, KEY, scripted_answerer(benchmark, asked))
    assert (asked, already, out.read_bytes()) == ([6, 7, 8], 6, written)
    assert again.accuracy == reference.accuracy and again.num_failed == 3
    # Other decoding options are another key: all asked again, into the same file.
    asked = []
    run_eval(benchmark, out, dataclasses.replace(KEY, max_new_tokens=4), scripted_answerer(benchmark, asked))
    assert asked == list(range(9))


# ------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def videomme_store(tmp_path_factory):
    """Tiny Qwen2-VL tokens of the two bundled videos under the first two Video-MME
    records' video ids."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STTM_CACHE", str(tmp_path_factory.mktemp("sttm-cache")))
        resolve_model("tiny-random:qwen2-vl")
        adapter = load_adapter("tiny-random:qwen2-vl", dtype=torch.float32)
        store = TokenStore(str(tmp_path_factory.mktemp("store")))
        video_ids = list(dict.fromkeys(q.video_id for q in load_benchmark(VIDEOMME_SAMPLE)))[:2]
        for video_id, name in zip(video_ids, ("bigbuckbunny.mp4", "bikes.mp4")):
            store.write(stored_token_set(adapter, decode_sample("qwen2-vl", name), video_id, retention=0.5))
        yield store


def test_eval_command_scores_the_stored_videos_and_reports_the_missing(videomme_store, tmp_path):
    out = tmp_path / "results.jsonl"
    args = ["eval", videomme_store.url, "--model", "tiny-random:qwen2-vl", "--dtype", "float32",
            "--benchmark", str(VIDEOMME_SAMPLE), "--out", str(out), "--max-new-tokens", "4"]  # fmt: skip

    result = CliRunner().invoke(main, [*args, "--json"])

    assert result.exit_code == 1, result.output  # 8 of the 10 videos are not in the store
    summary = json.loads(result.stdout)
    assert (summary["num_questions"], summary["num_answered"], summary["num_failed"]) == (30, 6, 24)
    assert len(summary["problems"]) == 24 and summary["problems"][0]["id"] == "003-1"  # as in `sttm query --json`
    assert summary["timings"]["num_videos"] == 2 and summary["timings"]["saved_s"] > 0
    assert sum(t["total"] for t in summary["by_category"]["task_type"].values()) == 6
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 30
    answered = [row for row in rows if "error" not in row]
    assert [row["question_id"] for row in answered] == ["001-1", "001-2", "001-3", "002-1", "002-2", "002-3"]
    assert all(row["predicted"] in (None, "A", "B", "C", "D") and "response" in row for row in answered)

    # Killed after two answers, the third cut short: the re-run answers the other four only.
    first = out.read_text().splitlines()
    out.write_text("\n".join(first[:2]) + "\n" + first[2][: len(first[2]) // 2])
    rerun = json.loads(CliRunner().invoke(main, [*args, "--json"]).stdout)
    assert (rerun["num_already_answered"], rerun["num_answered"], rerun["timings"]["num_videos"]) == (2, 6, 2)
    assert {key: rerun[key] for key in ("accuracy", "by_category", "num_failed")} == {
        key: summary[key] for key in ("accuracy", "by_category", "num_failed")}
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(row["question_id"] for row in again if "error" not in row) == sorted(
        row["question_id"] for row in answered)  # each once
    assert {row["question_id"]: row["response"] for row in again if "error" not in row} == {
        row["question_id"]: row["response"] for row in answered}

    result = CliRunner().invoke(main, args + ["--category", "duration"])
    assert "over 6 of 30 questions" in result.stdout and "6 answered before" in result.stdout
    assert "duration = short:" in result.stdout and "task_type" not in result.stdout
    assert "problem: question 003-1 (" in result.stderr


@pytest.mark.parametrize("family", ["qwen3-vl", "qwen3.5"])
def test_eval_on_the_qwen3_families_scores_what_each_question_gets_alone(tmp_path_factory, family):
    """``pipeline.evaluate`` on tiny Qwen3-VL (DeepStack) and Qwen3.5 (recurrent state)
    stores: each response is the one its prompt gets alone on a fresh prefill, and the
    score counts the letters extracted from those responses."""
    from pipeline.query import QueryEngine

    benchmark = load_benchmark(VIDEOMME_SAMPLE)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STTM_CACHE", str(tmp_path_factory.mktemp("sttm-cache")))
        resolve_model(f"tiny-random:{family}")
        adapter = load_adapter(f"tiny-random:{family}", dtype=torch.float32)
        engine = QueryEngine(f"tiny-random:{family}", dtype=torch.float32)
        store = TokenStore(str(tmp_path_factory.mktemp("store")))
        video_ids = list(dict.fromkeys(q.video_id for q in benchmark))[:2]
        for video_id, name in zip(video_ids, ("bigbuckbunny.mp4", "bikes.mp4")):
            store.write(stored_token_set(adapter, decode_sample(family, name), video_id, retention=0.5))

        report = evaluate(engine, store, benchmark[:6], max_new_tokens=3)

    assert (report.num_questions, report.num_answered, report.num_failed) == (6, 6, 0)
    for item, row in zip(benchmark[:6], report.results):
        _, alone = engine.prefill_and_answer(store.read(item.video_id), item.prompt(), max_new_tokens=3)
        assert row["response"] == alone.text
        assert row["predicted"] == extract_letter(alone.text, item.options)
        assert row["correct"] == (row["predicted"] == item.answer)
    assert report.accuracy == pytest.approx(sum(row["correct"] for row in report.results) / 6, abs=1e-6)
    assert report.timings["num_videos"] == 2
