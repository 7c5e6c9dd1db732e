"""What `sttm preprocess` shows while it runs: progress in videos, and Ray kept quiet.

On a terminal, one line redrawn every second::

    sttm: 37/120 videos | 30 stored, 5 skipped, 2 failed | 4.1 videos/min | 9m02s | ETA 20m15s

In logs (stderr not a terminal), the same line once per ``interval`` seconds, stamped
with the time. Either way a failed video gets a line of its own when it fails, and the
display writes only to stderr, so ``--json`` leaves exactly one JSON document on stdout.

Ray's own output is mostly for Ray's developers; ``job_console`` turns it off unless
``--debug``: the token-auth notice of a fresh local cluster, Ray Data's "Starting
execution" lines, the C++ core worker's log lines on stderr and transformers' "Loading
weights" bars (Ray Data's progress bars are off through ``PreprocessConfig.progress``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import time
from collections import deque
from datetime import datetime
from typing import IO, Iterator

# Completions counted for the rate (and so the ETA): the last few minutes, so the figure
# follows the pipeline's current speed rather than its warm-up.
RATE_WINDOW_S = 300.0
LOG_INTERVAL_S = 60.0


class Progress:
    """Counts videos as the job reports them and shows the count on ``stream``.

    The job calls ``phase(text)`` before each start-up step, ``start(total, failed)`` when
    the videos begin to flow (``failed`` of them already failed: repeated ids), and
    ``result(video_id, status, message)`` for each finished video (``stored``,
    ``skipped`` or ``failed``; a video reported twice counts once). ``close()`` draws the
    last line.
    """

    def __init__(self, stream: IO[str], *, terminal: bool | None = None, interval: float = LOG_INTERVAL_S,
                 clock=time.monotonic):
        self.stream = stream
        self.terminal = stream.isatty() if terminal is None else terminal
        self.interval = 1.0 if self.terminal else interval
        self.clock = clock
        self.begun = clock()
        self.started: float | None = None  # when the videos began to flow
        self.total = 0
        self.counts = {"stored": 0, "skipped": 0, "failed": 0}
        self.seen: set[str] = set()
        self.finished_at: deque[float] = deque()
        self.current_phase = "starting"
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._line_shown = False
        self._ticker: threading.Thread | None = None

    # -- what the job reports

    def phase(self, text: str) -> None:
        with self._lock:
            self.current_phase = text
            if self.terminal:
                self._draw()
            else:
                self._log(f"{text} ...")
        self._start_ticker()

    def start(self, total: int, failed: int = 0) -> None:
        with self._lock:
            self.started = self.clock()
            self.total = total
            self.counts["failed"] += failed
            self.current_phase = "running"
            self._draw() if self.terminal else self._log(self.line())
        self._start_ticker()

    def result(self, video_id: str, status: str, message: str | None = None) -> None:
        with self._lock:
            if video_id in self.seen or status not in self.counts:
                return
            self.seen.add(video_id)
            self.counts[status] += 1
            self.finished_at.append(self.clock())
            if status == "failed":
                self._print(f"failed {video_id}: {message or 'no reason given'}")
            elif self.terminal:
                self._draw()

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        with self._lock:
            if self.terminal and self._line_shown:
                self.stream.write("\r\x1b[2K")
                self.stream.flush()
                self._line_shown = False
            elif not self.terminal and self.started is not None:
                self._log(self.line())

    # -- what is shown

    def done(self) -> int:
        return sum(self.counts.values())

    def rate_per_minute(self) -> float | None:
        """Videos finished per minute over the last RATE_WINDOW_S (None before any)."""
        if self.started is None:
            return None
        now = self.clock()
        while self.finished_at and self.finished_at[0] < now - RATE_WINDOW_S:
            self.finished_at.popleft()
        span = min(now - self.started, RATE_WINDOW_S)
        if not self.finished_at or span <= 0:
            return None
        return 60.0 * len(self.finished_at) / span

    def line(self) -> str:
        elapsed = _duration(self.clock() - self.begun)
        if self.started is None:
            return f"sttm: {self.current_phase} ... | {elapsed}"
        counts = ", ".join(f"{count} {status}" for status, count in self.counts.items())
        rate = self.rate_per_minute()
        remaining = self.total - self.done()
        parts = [f"sttm: {self.done()}/{self.total} videos", counts,
                 "-- videos/min" if rate is None else f"{rate:.1f} videos/min", elapsed]
        if remaining and rate:
            parts.append(f"ETA {_duration(60.0 * remaining / rate)}")
        return " | ".join(parts)

    # -- drawing

    def _start_ticker(self) -> None:
        if self._ticker is None:
            self._ticker = threading.Thread(target=self._tick, name="sttm-progress", daemon=True)
            self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                if self.terminal:
                    self._draw()
                elif self.started is not None:
                    self._log(self.line())

    def _draw(self) -> None:
        width = _terminal_width(self.stream)
        self.stream.write("\r\x1b[2K" + self.line()[: width - 1])
        self.stream.flush()
        self._line_shown = True

    def print_above(self, text: str) -> None:
        """Show ``text`` (other output) above the progress line, which stays the last one."""
        with self._lock:
            if self.terminal and self._line_shown:
                self.stream.write("\r\x1b[2K" + text + "\n")
                self._draw()
            else:
                self.stream.write(text + "\n")
                self.stream.flush()

    def _print(self, text: str) -> None:
        if self.terminal:
            self.stream.write("\r\x1b[2K" + text + "\n")
            self._draw()
        else:
            self._log(text)

    def _log(self, text: str) -> None:
        self.stream.write(f"{datetime.now().strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
        self.stream.flush()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _terminal_width(stream: IO[str]) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 200


# --------------------------------------------------------------------------- Ray's noise

# Log lines Ray writes to the console below ERROR, kept in its session's log files anyway:
# its C++ core's glog lines ("[2026-12-01 21:43:26,714 E 6505 6505] core_worker.cc:2465: ...",
# any level: they are about Ray's internals) and its Python loggers' INFO/WARNING lines
# ("2026-12-01 22:00:22,342\tINFO streaming_executor.py:215 -- Starting execution ...").
_RAY_LOG_LINE = re.compile(rb"^(\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\] "
                           rb"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(DEBUG|INFO|WARNING) \S+:\d+ -- )")


@contextlib.contextmanager
def job_console(quiet: bool, local_ray: bool) -> Iterator[Progress]:
    """The progress display of a job, on stderr, with Ray's own output off when ``quiet``.

    Enter it before anything imports transformers or starts Ray. ``local_ray``: the job
    starts its own local Ray, whose token-auth notice is then silenced (token auth stays
    on: the mode is set explicitly to Ray's own default). Ray's log lines reach file
    descriptor 2 from native code and from processes it starts, so while the block runs
    stderr is a pipe read by a thread that drops them and passes everything else on,
    above the progress line.
    """
    if not quiet:
        progress = Progress(sys.stderr)
        try:
            yield progress
        finally:
            progress.close()
        return
    quiet_settings = {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}  # transformers' "Loading weights" bars
    if local_ray:
        quiet_settings["RAY_AUTH_MODE"] = "token"
    saved_environment = {name: os.environ.get(name) for name in quiet_settings}
    for name, value in quiet_settings.items():
        os.environ.setdefault(name, value)

    sys.stderr.flush()
    real_stderr = os.dup(2)
    progress = Progress(os.fdopen(os.dup(real_stderr), "w", encoding="utf-8", errors="replace"))
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    forwarder = threading.Thread(target=_forward, args=(read_end, progress.print_above), name="sttm-stderr",
                                 daemon=True)
    forwarder.start()
    try:
        yield progress
    finally:
        sys.stderr.flush()
        os.dup2(real_stderr, 2)  # drops this process's write end of the pipe
        os.close(real_stderr)
        # Ends when every process holding the pipe has closed it (Ray's are stopped by now);
        # a straggler only delays the exit by the timeout.
        forwarder.join(timeout=2)
        progress.close()
        progress.stream.close()
        for name, value in saved_environment.items():
            if value is None:
                os.environ.pop(name, None)


def _forward(read_end: int, emit) -> None:
    """Pass the lines read from ``read_end`` to ``emit``, less Ray's log lines."""
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        pending = b""
        while chunk := pipe.read(65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            kept = [line for line in lines if not _RAY_LOG_LINE.match(line)]
            if kept:
                emit(b"\n".join(kept).decode("utf-8", "replace"))
        if pending and not _RAY_LOG_LINE.match(pending):
            emit(pending.decode("utf-8", "replace"))
