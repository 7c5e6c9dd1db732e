"""Soak test of the preprocessing job under faults: nothing lost, nothing doubled.

    python -m jobs.soak --videos 320 --out jobs/results/soak_cpu_320videos.json

Over ``--videos`` real videos (copies of the bundled samples with distinct bytes) plus a
few bad files, with the ``sttm preprocess`` CLI in subprocesses, each on its own local Ray:

1. run A: a decode or encode actor is SIGKILLed twice, then the driver (its whole process
   group) once, early (by default with a tenth of the videos stored), so that most of the
   corpus is left to the next two runs;
2. runs B and C: started at the same moment on the same store, both to the end. The store
   is sampled while they run (its count of token sets every second) and the index entries
   say which run wrote each and when;
3. run D: once more, after them.

Checks: the manifests of B, C and D each hold every input exactly once as stored, skipped
or failed, failed only for the bad files (with a failure record each); B and C overlapped
(both running while token sets were added, and each wrote index entries while the other
was writing them) and every good video A left is stored by B or C;
nothing is doubled: the store holds exactly one token set object and one index entry per
good video, and the bytes of the token sets added while B and C ran equal B's plus C's
``bytes_written`` (token sets are create-only: of two runs racing on one video, one
creates the object, the other finds it in place, verifies it and writes no token-set
bytes, both count the video stored); every index entry was written by A, B or C; every
stored token set reads back with its checksum verified; D stores nothing. Prints the result
and writes it as JSON; exits 1 if a check failed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil

from pipeline.samples import SAMPLE_VIDEOS
from pipeline.store import TokenStore

BAD_FILES = {"empty": b"", "text": b"this is not a video\n" * 50}


def make_corpus(directory: Path, count: int) -> tuple[list[str], list[str]]:
    """``count`` good videos and the bad files; returns (good ids, bad ids)."""
    directory.mkdir(parents=True)
    good = []
    for i in range(count):
        data = SAMPLE_VIDEOS[i % len(SAMPLE_VIDEOS)].read_bytes() + i.to_bytes(4, "little")
        (directory / f"clip{i:04d}.mp4").write_bytes(data)
        good.append(f"clip{i:04d}")
    for name, data in BAD_FILES.items():
        (directory / f"{name}.mp4").write_bytes(data)
    data = SAMPLE_VIDEOS[0].read_bytes()
    (directory / "truncated.mp4").write_bytes(data[: len(data) // 50])
    return good, sorted([*BAD_FILES, "truncated"])


class Run:
    """One `sttm preprocess` subprocess with its own Ray temp dir and process group.

    Ray waits a fixed 30 s for a new node to register; on this loaded machine a second
    cluster starting beside a busy one can miss that, and the CLI then exits 2 having done
    nothing ("a local Ray cluster could not be started"). Such a run is started again (up
    to ``RAY_START_ATTEMPTS`` times; ``restarts`` counts them): it is the machine, not the
    job, being tested there."""

    RAY_START_ATTEMPTS = 4

    def __init__(self, name: str, corpus: Path, store: Path, frames: int):
        self.name, self.restarts = name, 0
        self.command = [sys.executable, "-m", "pipeline.cli", "preprocess", str(corpus), "--output", str(store),
                        "--frames", str(frames), "--max-failure-rate", "1", "--json"]
        self.scratch = corpus.parent
        self._start()

    def _start(self) -> None:
        self.ray_dir = tempfile.mkdtemp(prefix=f"soak{self.name}-", dir="/tmp")  # short: unix socket paths
        self.stderr_path = self.scratch / f"run{self.name}.{self.restarts}.stderr"
        env = {**os.environ, "RAY_TMPDIR": self.ray_dir}
        env.pop("RAY_ADDRESS", None)
        with open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen(self.command, env=env, stdout=subprocess.PIPE, stderr=stderr,
                                            text=True, start_new_session=True)

    def poll(self) -> int | None:
        """The exit code, or None while running (a run whose Ray did not start is started again)."""
        returncode = self.process.poll()
        if (returncode == 2 and self.restarts + 1 < self.RAY_START_ATTEMPTS
                and "Ray cluster could not be started" in self.stderr_tail()):
            self.process.communicate()
            self.cleanup()
            self.restarts += 1
            self._start()
            return None
        return returncode

    def stderr_tail(self) -> str:
        return self.stderr_path.read_text()[-2000:]

    def actors(self) -> list[psutil.Process]:
        found = []
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            return found
        for child in children:
            try:
                if "ray::" in " ".join(child.cmdline()) and "Stage" in " ".join(child.cmdline()):
                    found.append(child)
            except psutil.Error:
                continue
        return found

    def finish(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(1)
        stdout, _ = self.process.communicate(timeout=max(1.0, deadline - time.monotonic()))
        self.cleanup()
        summary = json.loads(stdout) if stdout.strip() else None
        return dict(returncode=self.process.returncode, summary=summary, ray_restarts=self.restarts,
                    stderr_tail=None if summary and self.process.returncode == 0 else self.stderr_tail())

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.cleanup()

    def cleanup(self) -> None:
        for process in psutil.process_iter(["cmdline"]):
            try:
                if any(self.ray_dir in part for part in process.info["cmdline"] or []):
                    process.kill()
            except psutil.Error:
                pass
        shutil.rmtree(self.ray_dir, ignore_errors=True)


def token_sets(store: Path) -> dict[str, int]:
    """Token set objects in place (temp files of unfinished writes left out): key -> bytes."""
    found = {}
    for path in (store / "tokens").glob("*/sha256-*.parquet"):
        try:
            found[str(path.relative_to(store))] = path.stat().st_size
        except FileNotFoundError:
            continue
    return found


def stored_count(store: Path) -> int:
    return len(token_sets(store))


def index_entries(store: Path) -> list[Path]:
    return sorted((store / "index").glob("*/*.parquet"))


def wait_for(run: Run, store: Path, count: int, deadline: float) -> None:
    while stored_count(store) < count:
        if run.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"run {run.name} ended or stalled before {count} videos were stored; its stderr "
                               f"ends:\n{run.stderr_tail()}")
        time.sleep(0.5)


def check_manifest(store: TokenStore, run_id: str, good: list[str], bad: list[str]) -> list[str]:
    """Problems with one run's manifest and failure records (empty: none)."""
    manifest = next(m for m in store.list_manifests() if m.run_id == run_id)
    problems = []
    ids = Counter(entry.video_id for entry in manifest.entries)
    if ids != Counter(good + bad):
        problems.append(f"{run_id}: manifest ids differ from the inputs "
                        f"(missing {sorted(set(good + bad) - set(ids))[:5]}, "
                        f"twice {[i for i, n in ids.items() if n > 1][:5]})")
    failed = sorted(entry.video_id for entry in manifest.entries if entry.status == "failed")
    if failed != bad:
        problems.append(f"{run_id}: failed {failed[:10]}, expected exactly the bad files {bad}")
    records = sorted(record.video_id for record in store.list_failures(run_id))
    if records != failed:
        problems.append(f"{run_id}: failure records {records[:10]} do not match the failed entries")
    return problems


def run_together(run_b: Run, run_c: Run, store: Path, timeout: float, events: list[str]) -> tuple[dict, list]:
    """Wait for B and C, counting the store's token sets every second; returns their
    results and the timeline: [seconds since they started, B running, C running, token sets]."""
    timeline, started = [], time.monotonic()
    while (run_b.poll() is None or run_c.poll() is None) and time.monotonic() - started < timeout:
        timeline.append([round(time.monotonic() - started, 1), run_b.process.poll() is None,
                         run_c.process.poll() is None, stored_count(store)])
        time.sleep(1)
    timeline.append([round(time.monotonic() - started, 1), False, False, stored_count(store)])
    results = {"B": run_b.finish(60), "C": run_c.finish(60)}
    for name, column in (("B", 1), ("C", 2)):
        ended = next((sample[0] for sample in timeline if not sample[column]), None)
        events.append(f"{name}: ended {ended} s after B and C started, its Ray started again {results[name]['ray_restarts']} times")
    return results, timeline


def writes_interleaved(summaries: list, run_ids: dict[str, str]) -> dict:
    """When B and C wrote their index entries (from the entries' created_at): each run's
    first and last write, and how many of each run's writes fall inside the other's span."""
    times = {name: sorted(s.created_at for s in summaries if s.run_id == run_ids.get(name)) for name in "BC"}
    if not times["B"] or not times["C"]:
        return dict(entries_b=len(times["B"]), entries_c=len(times["C"]))
    origin = min(times["B"][0], times["C"][0])
    span = {name: ((t[0] - origin).total_seconds(), (t[-1] - origin).total_seconds()) for name, t in times.items()}

    def inside(name: str, other: str) -> int:
        return sum(span[other][0] <= (t - origin).total_seconds() <= span[other][1] for t in times[name])

    return dict(entries_b=len(times["B"]), entries_c=len(times["C"]),
                b_writes_seconds=[round(x, 1) for x in span["B"]], c_writes_seconds=[round(x, 1) for x in span["C"]],
                b_entries_written_while_c_wrote=inside("B", "C"), c_entries_written_while_b_wrote=inside("C", "B"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=320)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--kill-driver-at", type=float, default=0.1,
                        help="Fraction of the videos stored when run A's driver is killed (its actors "
                             "are killed at a third and two thirds of that).")
    parser.add_argument("--timeout", type=float, default=3600, help="Seconds each phase may take.")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    started = time.monotonic()
    with tempfile.TemporaryDirectory() as scratch:
        corpus, store_dir = Path(scratch) / "videos", Path(scratch) / "store"
        good, bad = make_corpus(corpus, args.videos)
        events = []

        run_a = Run("A", corpus, store_dir, args.frames)
        try:
            deadline = time.monotonic() + args.timeout
            driver_at = max(3, int(args.kill_driver_at * args.videos))
            for count in (driver_at // 3, 2 * driver_at // 3):  # a worker killed twice
                wait_for(run_a, store_dir, count, deadline)
                victim = next(iter(run_a.actors()), None)
                if victim is not None:
                    events.append(f"A: killed {' '.join(victim.cmdline())[:60]} at {stored_count(store_dir)} stored")
                    victim.kill()
            wait_for(run_a, store_dir, driver_at, deadline)
            events.append(f"A: killed the driver at {stored_count(store_dir)} stored")
            run_a.kill()
        finally:
            if run_a.poll() is None:
                run_a.kill()

        before_b_and_c = token_sets(store_dir)
        run_b, run_c = Run("B", corpus, store_dir, args.frames), Run("C", corpus, store_dir, args.frames)
        events.append(f"B and C: started together at {len(before_b_and_c)} token sets stored")
        results, timeline = run_together(run_b, run_c, store_dir, args.timeout, events)
        added = {key: size for key, size in token_sets(store_dir).items() if key not in before_b_and_c}
        results["D"] = Run("D", corpus, store_dir, args.frames).finish(args.timeout)

        store = TokenStore(str(store_dir))
        problems = []
        manifests = {}
        for name, result in results.items():
            if result["summary"] is None or result["returncode"] != 0:
                problems.append(f"run {name}: exit code {result['returncode']}, no summary")
                continue
            run_id = result["summary"]["run_id"]
            problems += check_manifest(store, run_id, good, bad)
            manifests[name] = next(m for m in store.list_manifests() if m.run_id == run_id)
        if results["D"]["summary"] and results["D"]["summary"]["stored"] != 0:
            problems.append(f"run D stored {results['D']['summary']['stored']} videos again")

        # B and C overlapped for real: token sets were added while both ran, and each wrote
        # index entries while the other was writing.
        both = [count for _, b_running, c_running, count in timeline if b_running and c_running]
        summaries = store.list()
        run_ids = {name: r["summary"]["run_id"] for name, r in results.items() if r["summary"]}
        both_running = [t for t, b_running, c_running, _ in timeline if b_running and c_running]
        overlap = dict(seconds_both_running=round(both_running[-1] - both_running[0], 1) if both_running else 0,
                       token_sets_added_while_both_ran=both[-1] - both[0] if both else 0,
                       **writes_interleaved(summaries, run_ids),
                       timeline=timeline[::30] + timeline[-1:])  # every 30th sample
        if (not overlap["token_sets_added_while_both_ran"] or not overlap.get("b_entries_written_while_c_wrote")
                or not overlap.get("c_entries_written_while_b_wrote")):
            problems.append("B and C did not write at the same time")
        race = {}
        if "B" in manifests and "C" in manifests:
            stored_by = {name: {e.video_id for e in manifests[name].entries if e.status == "stored"} for name in "BC"}
            for name in "BC":
                if not stored_by[name]:
                    problems.append(f"run {name} stored nothing: the runs did not race")
            race = dict(stored_by_b_only=len(stored_by["B"] - stored_by["C"]),
                        stored_by_c_only=len(stored_by["C"] - stored_by["B"]),
                        stored_by_both=len(stored_by["B"] & stored_by["C"]),
                        bytes_written_b=results["B"]["summary"]["bytes_written"],
                        bytes_written_c=results["C"]["summary"]["bytes_written"],
                        token_sets_added=len(added), bytes_added=sum(added.values()))
            # Each token set added while B and C ran was written by exactly one of them.
            if race["bytes_written_b"] + race["bytes_written_c"] != race["bytes_added"]:
                problems.append(f"B and C wrote {race['bytes_written_b']} + {race['bytes_written_c']} token-set "
                                f"bytes, the token sets added meanwhile hold {race['bytes_added']}")

        objects = token_sets(store_dir)
        if len(objects) != len(good):
            problems.append(f"{len(objects)} token set objects for {len(good)} good videos")
        entries = index_entries(store_dir)
        if len(entries) != len(good):
            problems.append(f"{len(entries)} index entries for {len(good)} good videos")
        if sorted(s.video_id for s in summaries) != sorted(good):
            problems.append("the index's video ids are not the good videos, each once")
        writer = {s.video_id: next((name for name, rid in run_ids.items() if rid == s.run_id), "A")
                  for s in summaries}
        writers = Counter(writer.values())
        if race:
            if writers["B"] == 0 or writers["C"] == 0:
                problems.append(f"index entries by writer {dict(writers)}: B or C wrote none")
            # An entry's writer counts its video stored: B or C (the last of the two to write
            # it, if both raced on it), or A for the videos both skipped.
            storers = {v: {name for name in "BC" if v in stored_by[name]} for v in writer}
            wrong = [v for v, name in writer.items() if name not in (storers[v] or {"A"})]
            if wrong:
                problems.append(f"index entries written by a run that did not store the video: {wrong[:5]}")
        leftover_temp_files = sum(1 for _ in store_dir.rglob("*.tmp"))
        unreadable = []
        for video_id in good:
            try:
                store.read(video_id)  # verifies the object's checksum against its index entry
            except Exception as error:  # noqa: BLE001 - every failure is a finding
                unreadable.append(f"{video_id}: {type(error).__name__}: {error}"[:200])
        problems += unreadable[:10]

    report = dict(videos=args.videos, bad_files=len(bad), frames=args.frames, events=events,
                  runs={name: {k: r["summary"][k]
                               for k in ("stored", "skipped", "failed", "repaired", "inputs", "bytes_written", "seconds")}
                        if r["summary"] else r for name, r in results.items()},
                  b_and_c=dict(overlap, **race), token_set_objects=len(objects), index_entries=len(entries),
                  index_entries_by_writer=dict(sorted(writers.items())),
                  temp_files_left_by_killed_writers=leftover_temp_files, unreadable=len(unreadable),
                  problems=problems, passed=not problems, seconds=round(time.monotonic() - started, 1))
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
