"""Soak test of the preprocessing job under faults: nothing lost, nothing doubled.

    python -m jobs.soak --videos 320 --out jobs/results/soak_cpu.json

Over ``--videos`` real videos (copies of the bundled samples with distinct bytes) plus a
few bad files, with the ``sttm preprocess`` CLI in subprocesses, each on its own local Ray:

1. run A: a decode or encode actor is SIGKILLed twice, then the driver (its whole process
   group) once, part way through;
2. runs B and C: started together on the same store, both to the end;
3. run D: once more, after them.

Checks: the manifests of B, C and D each hold every input exactly once as stored, skipped
or failed, failed only for the bad files (with a failure record each); D stores nothing;
the store holds exactly one token set object per good video and every one reads back
with its checksum verified. Prints the result and writes it as JSON; exits 1 if a check
failed.
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
    """One `sttm preprocess` subprocess with its own Ray temp dir and process group."""

    def __init__(self, name: str, corpus: Path, store: Path, frames: int):
        self.name = name
        self.ray_dir = tempfile.mkdtemp(prefix=f"soak{name}-", dir="/tmp")  # short: unix socket paths
        self.stderr_path = corpus.parent / f"run{name}.stderr"
        env = {**os.environ, "RAY_TMPDIR": self.ray_dir}
        env.pop("RAY_ADDRESS", None)
        with open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pipeline.cli", "preprocess", str(corpus), "--output", str(store),
                 "--frames", str(frames), "--max-failure-rate", "1", "--json"],
                env=env, stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True)

    def stderr_tail(self) -> str:
        return self.stderr_path.read_text()[-2000:]

    def actors(self) -> list[psutil.Process]:
        found = []
        for child in psutil.Process(self.process.pid).children(recursive=True):
            try:
                if "ray::" in " ".join(child.cmdline()) and "Stage" in " ".join(child.cmdline()):
                    found.append(child)
            except psutil.Error:
                continue
        return found

    def finish(self, timeout: float) -> dict:
        stdout, _ = self.process.communicate(timeout=timeout)
        self.cleanup()
        summary = json.loads(stdout) if stdout.strip() else None
        return dict(returncode=self.process.returncode, summary=summary,
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


def stored_count(store: Path) -> int:
    return sum(1 for _ in (store / "index").rglob("*.json")) if (store / "index").exists() else 0


def wait_for(run: Run, store: Path, count: int, deadline: float) -> None:
    while stored_count(store) < count:
        if run.process.poll() is not None or time.monotonic() > deadline:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=320)
    parser.add_argument("--frames", type=int, default=4)
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
            for fraction in (0.15, 0.3):  # a worker killed twice
                wait_for(run_a, store_dir, int(fraction * args.videos), deadline)
                victim = next(iter(run_a.actors()), None)
                if victim is not None:
                    events.append(f"A: killed {' '.join(victim.cmdline())[:60]} at {stored_count(store_dir)} stored")
                    victim.kill()
            wait_for(run_a, store_dir, int(0.5 * args.videos), deadline)
            events.append(f"A: killed the driver at {stored_count(store_dir)} stored")
            run_a.kill()
        finally:
            if run_a.process.poll() is None:
                run_a.kill()

        run_b = Run("B", corpus, store_dir, args.frames)
        # C starts once B's Ray is up (its actors exist): two Ray clusters starting at the
        # same moment on a loaded machine can miss Ray's fixed 30 s startup wait.
        deadline = time.monotonic() + 300
        while not run_b.actors() and run_b.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        run_c = Run("C", corpus, store_dir, args.frames)
        events.append(f"B and C: C started with B running, at {stored_count(store_dir)} stored")
        results = {"B": run_b.finish(args.timeout), "C": run_c.finish(args.timeout)}
        results["D"] = Run("D", corpus, store_dir, args.frames).finish(args.timeout)

        store = TokenStore(str(store_dir))
        problems = []
        for name, result in results.items():
            if result["summary"] is None or result["returncode"] != 0:
                problems.append(f"run {name}: exit code {result['returncode']}, no summary")
                continue
            problems += check_manifest(store, result["summary"]["run_id"], good, bad)
        if results["D"]["summary"] and results["D"]["summary"]["stored"] != 0:
            problems.append(f"run D stored {results['D']['summary']['stored']} videos again")
        objects = sorted((store_dir / "tokens").rglob("*.parquet"))
        if len(objects) != len(good):
            problems.append(f"{len(objects)} token set objects for {len(good)} good videos")
        unreadable = []
        for video_id in good:
            try:
                store.read(video_id)  # verifies the object's checksum against its index entry
            except Exception as error:  # noqa: BLE001 - every failure is a finding
                unreadable.append(f"{video_id}: {type(error).__name__}: {error}"[:200])
        problems += unreadable[:10]

    report = dict(videos=args.videos, bad_files=len(bad), frames=args.frames, events=events,
                  runs={name: {k: r["summary"][k] for k in ("stored", "skipped", "failed", "inputs", "seconds")}
                        if r["summary"] else r for name, r in results.items()},
                  token_set_objects=len(objects), unreadable=len(unreadable), problems=problems,
                  passed=not problems, seconds=round(time.monotonic() - started, 1))
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
