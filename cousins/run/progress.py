"""The project's own progress lines: rows done of total, tokens/s, errors so far and an ETA.

On a terminal a bar redrawn in place; anywhere else (a Ray job's log, a file, CI) one line every
`every_s` seconds and a last one when the stage ends. They go to stderr, beside the job's result
on stdout. A stage whose counts come from workers (engine batches) is polled from a thread
(`watch`); one whose results stream through the driver (the diff, exports) adds to it (`Bar.add`).
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, TextIO

TTY_REDRAW_S = 0.5
EVERY_S = 10.0  # between lines when not on a terminal; the job's `log.progress_s` (configure)
_LINES = threading.Event()  # set: lines even on a terminal (stages run side by side)


def configure(every_s: float) -> None:
    global EVERY_S
    EVERY_S = every_s


@contextmanager
def lines():
    """Bars made inside are lines, even on a terminal: several stages run side by side, each with
    its own bar, and bars redrawn in place would overwrite each other."""
    was = _LINES.is_set()
    _LINES.set()
    try:
        yield
    finally:
        if not was:
            _LINES.clear()


def duration(s: float) -> str:
    """3 s, 4m05s, 2h07m."""
    s = max(0, int(round(s)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Bar:
    """One stage's progress. `update` takes totals so far (`add` increments); the stage's
    rate and ETA count only what this attempt did (`start`: rows already done by an earlier one)."""

    def __init__(self, what: str, total: int | None, *, unit: str = "rows", start: int = 0, every_s: float | None = None,
                 stream: TextIO | None = None, tty: bool | None = None, clock: Callable[[], float] = time.monotonic):
        self.what, self.total, self.unit, self.start = what, total, unit, start
        self.stream = stream or sys.stderr
        self.tty = (self.stream.isatty() and not _LINES.is_set()) if tty is None else tty
        self.every_s, self.clock = EVERY_S if every_s is None else every_s, clock
        self.t0 = self.last = clock()
        self.done, self.tokens, self.errors = start, None, 0
        self._lock = threading.Lock()
        self._width = 0
        self.closed = self.failed = False
        if not self.tty:
            self._print(self.line())

    def update(self, done: int, *, tokens: int | None = None, errors: int = 0) -> None:
        with self._lock:
            self.done, self.tokens, self.errors = done, tokens, errors
            self._due()

    def _due(self) -> None:
        now = self.clock()
        complete = bool(self.total) and self.done >= self.total  # then the last line is close's
        if now - self.last >= (TTY_REDRAW_S if self.tty else self.every_s) and not (complete and not self.tty):
            self.last = now
            self._print(self.line())

    def refresh(self) -> None:
        """The line again if it is due (the elapsed time moves on even when the counts do not)."""
        with self._lock:
            self._due()

    def add(self, rows: int, *, tokens: int = 0, errors: int = 0) -> None:
        self.update(self.done + rows, tokens=self.tokens if not tokens else (self.tokens or 0) + tokens,
                    errors=self.errors + errors)

    def line(self) -> str:
        elapsed = self.clock() - self.t0
        new = self.done - self.start
        parts = [self.what]
        if self.total:
            frac = min(1.0, self.done / self.total)
            bar = "#" * int(frac * 20)
            parts.append(f"{frac * 100:3.0f}% [{bar:<20}] {self.done:,}/{self.total:,} {self.unit}")
        else:
            parts.append(f"{self.done:,} {self.unit}")
        if self.tokens is not None and elapsed > 0:
            parts.append(f"{self.tokens / elapsed:,.0f} tok/s")
        parts.append(f"{self.errors:,} error{'s' if self.errors != 1 else ''}")
        if self.closed:
            parts.append(f"{'stopped after' if self.failed else 'done in'} {duration(elapsed)}")
        elif self.total and new > 0 and self.done < self.total:
            parts.append(f"ETA {duration((self.total - self.done) * elapsed / new)}")
        else:
            parts.append(f"{duration(elapsed)}")
        return " · ".join(parts)

    def _print(self, text: str) -> None:
        if self.tty:
            pad = max(0, self._width - len(text))
            self._width = len(text)
            self.stream.write("\r" + text + " " * pad)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, kind, *_) -> None:
        self.close(failed=kind is not None)

    def close(self, failed: bool = False) -> None:
        """The last line: "done in …", or "stopped after …" when the stage failed."""
        with self._lock:
            if self.closed:
                return
            self.closed, self.failed = True, failed
            self._print(self.line())
            if self.tty:
                self.stream.write("\n")
                self.stream.flush()


class watch:
    """`with watch(bar, poll):` — calls `poll()` -> (done, tokens, errors) every `bar`'s redraw
    interval on a thread while the block runs, then once more, and closes the bar. Without
    `poll`, the block updates the bar itself and the thread only keeps its line going. A poll that
    fails (a worker-side counter not answering) is skipped: progress is never why a stage fails."""

    def __init__(self, bar: Bar, poll: Callable[[], tuple[int, int | None, int]] | None = None):
        self.bar, self.poll = bar, poll
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"progress {bar.what}")

    def _tick(self) -> None:
        if self.poll is None:
            self.bar.refresh()
            return
        try:
            done, tokens, errors = self.poll()
        except Exception:  # noqa: BLE001 - see the class docstring
            return
        self.bar.update(done, tokens=tokens, errors=errors)

    def _run(self) -> None:
        interval = TTY_REDRAW_S if self.bar.tty else min(self.bar.every_s, 2.0)
        while not self._stop.wait(interval):
            self._tick()

    def __enter__(self) -> Bar:
        self._thread.start()
        return self.bar

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if exc[0] is None:
            self._tick()
        self.bar.close(failed=exc[0] is not None)
