"""The progress of an `invoices run` on stderr while it works, so a long run is not silent
until its summary: a bar redrawn in place on a terminal, plain lines now and then in logs and
pipes. It follows the run through `tasks.report.watching_progress` and writes only to its
own stream, so stdout (the table or the JSON summary) stays as it was."""

from __future__ import annotations

import io
import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import TextIO, cast

from rich.ansi import AnsiDecoder
from rich.console import Console, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from tasks.report import ProgressSnapshot, watching_progress

# Seconds between two plain progress lines, at least: often enough to see a run move in a CI
# log, rarely enough not to drown it.
PLAIN_EVERY_SECONDS = 5.0


def duration(seconds: float) -> str:
    """`38 s`, `4 min 05 s`, `2 h 07 min`: as precise as someone waiting needs."""
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


def timing(snapshot: ProgressSnapshot, *, final: bool = False) -> str:
    """The time left while the run goes (`ETA 38 s`); once it has ended, the time it took."""
    if final:
        return f"{duration(snapshot.elapsed)} elapsed"
    eta = snapshot.eta
    return "ETA unknown" if eta is None else f"ETA {duration(eta)}"


def describe(snapshot: ProgressSnapshot, *, final: bool = False) -> str:
    """`40/120 processed (35 done, 3 needs_review, 2 failed), 2.1/s, ETA 38 s`."""
    return (
        f"{snapshot.processed}/{snapshot.total} processed ({snapshot.done} done, "
        f"{snapshot.needs_review} needs_review, {snapshot.failed} failed), "
        f"{snapshot.rate:.1f}/s, {timing(snapshot, final=final)}"
    )


def _worth_showing(snapshot: ProgressSnapshot) -> bool:
    # A run with nothing to do still reports its (empty) start: it gets no display.
    return bool(snapshot.total or snapshot.processed)


class PlainProgress:
    """Progress as lines for logs and pipes, where a redrawn bar would be noise: at most one
    every `every` seconds and only when a count moved since the last, then one last line
    when the run ends (with the time it took). The run calls `update` often and on its event
    loop, so the rate limit is here, by the clock, and an update that writes nothing costs a
    comparison."""

    def __init__(
        self,
        stream: TextIO,
        *,
        every: float = PLAIN_EVERY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream, self.every, self._clock = stream, every, clock
        self._latest: ProgressSnapshot | None = None
        self._shown: tuple[int, ...] | None = None  # the counts on the last line written
        self._shown_at = -math.inf
        self._broken = False  # the stream refused a write (a closed pipe): stop writing

    def update(self, snapshot: ProgressSnapshot) -> None:
        if not _worth_showing(snapshot):
            return
        self._latest = snapshot
        counts = (
            snapshot.total,
            snapshot.processed,
            snapshot.done,
            snapshot.needs_review,
            snapshot.failed,
        )
        now = self._clock()
        if counts != self._shown and now - self._shown_at >= self.every:
            self._write(describe(snapshot))
            self._shown, self._shown_at = counts, now

    def close(self) -> None:
        if self._latest is not None:
            self._write(describe(self._latest, final=True))

    def _write(self, text: str) -> None:
        if self._broken:
            return
        try:
            self.stream.write(f"progress: {text}\n")
            self.stream.flush()
        except (OSError, ValueError):  # progress is for watching: it must not stop the run
            self._broken = True


class LiveProgress:
    """A bar with the counts, rate and ETA, redrawn in place by rich on `console`. rich
    redraws from its own thread, so an update from the run is one assignment; the display
    starts with the first update worth showing (none: nothing is drawn). While it is up,
    log lines bound for the same stream (Prefect's console handler) print above it instead
    of through it. Not transient: the last state stays on the terminal, above the summary."""

    def __init__(self, console: Console, *, refresh_per_second: float = 4.0) -> None:
        self.console = console
        self.refresh_per_second = refresh_per_second
        self._snapshot: ProgressSnapshot | None = None
        self._finished = False
        self._live: Live | None = None
        self._undo = ExitStack()

    def update(self, snapshot: ProgressSnapshot) -> None:
        if not _worth_showing(snapshot):
            return
        self._snapshot = snapshot
        if self._live is None:
            self._live = Live(
                self,
                console=self.console,
                refresh_per_second=self.refresh_per_second,
                redirect_stdout=False,  # stdout is the summary's, maybe JSON
                redirect_stderr=self.console.file is sys.stderr,
            )
            self._live.start(refresh=True)
            self._undo.enter_context(_logs_above(self.console))

    def close(self) -> None:
        if self._live is None:
            return
        self._finished = True
        try:
            self._live.stop()  # draws the last state, with the time taken
        finally:
            self._undo.close()

    def __rich__(self) -> RenderableType:
        snapshot = self._snapshot
        if snapshot is None:
            return Text()
        grid = Table.grid(padding=(0, 1), expand=True)
        grid.add_column(ratio=1)  # the bar takes what the text leaves (15 of 80 columns)
        for _ in range(4):
            grid.add_column(no_wrap=True)
        counts = Text.assemble(
            (f"{snapshot.done} done", "green"),
            ", ",
            (f"{snapshot.needs_review} needs_review", "yellow"),
            ", ",
            (f"{snapshot.failed} failed", "red" if snapshot.failed else ""),
        )
        grid.add_row(
            ProgressBar(
                total=max(snapshot.total, snapshot.processed),
                completed=snapshot.processed,
                finished_style="green",
            ),
            Text(f"{snapshot.processed}/{snapshot.total}"),
            counts,
            Text(f"{snapshot.rate:.1f}/s"),
            Text(timing(snapshot, final=self._finished)),
        )
        return grid


class _LinesAbove(io.TextIOBase):
    """A stream whose lines `console` prints above its live display. Not rich's FileProxy,
    which a rich Console (Prefect's console handler holds one) would see through, by its
    `rich_proxied_file`, and so write across the bar; and which wraps long log lines at
    spaces instead of leaving them whole to the terminal."""

    def __init__(self, console: Console, stream: TextIO) -> None:
        self._console, self._stream = console, stream
        self._partial = ""
        self._decoder = AnsiDecoder()
        self._lock = threading.Lock()  # handlers on other threads may share this stream

    def write(self, text: str) -> int:
        with self._lock:
            *lines, self._partial = (self._partial + text).split("\n")
            if lines:
                self._print(lines)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._partial:
                self._print([self._partial])
                self._partial = ""

    def _print(self, lines: list[str]) -> None:
        # The handler's colours arrive as ANSI codes: decoded, so the console redraws them.
        self._console.print(
            Text("\n").join(self._decoder.decode_line(line) for line in lines), soft_wrap=True
        )

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:  # so the handler keeps its colours
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()


@contextmanager
def _logs_above(console: Console) -> Iterator[None]:
    """While the block runs, the logging handlers writing to `console`'s stream write above
    its live display instead (a line written under it would be overwritten or torn)."""
    stream = cast(TextIO, console.file)
    above = cast(TextIO, _LinesAbove(console, stream))
    known = list(logging.Logger.manager.loggerDict.values())  # a copy: other threads add loggers
    loggers = [
        logging.getLogger(),
        *(logger for logger in known if isinstance(logger, logging.Logger)),
    ]
    handlers = {id(handler): handler for logger in loggers for handler in logger.handlers}
    moved: list[logging.StreamHandler[TextIO]] = []
    consoles: list[Console] = []
    for handler in handlers.values():
        if isinstance(handler, logging.StreamHandler) and handler.stream is stream:
            handler.setStream(above)
            moved.append(handler)
            own = getattr(handler, "console", None)
            if isinstance(own, Console) and own.file is stream:
                own.file = above
                consoles.append(own)
    try:
        yield
    finally:
        for handler in moved:
            handler.setStream(stream)
        for own in consoles:
            own.file = stream


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


@contextmanager
def show_progress(
    stream: TextIO | None = None, *, live: bool | None = None, every: float = PLAIN_EVERY_SECONDS
) -> Iterator[None]:
    """Show the progress of a run in this process on `stream` while the block runs: redrawn
    live when it is a terminal (or `live` is true), else as plain lines at most every
    `every` seconds and a last one at the end. Nothing when no run reports progress.

    `stream` defaults to sys.stderr as it is when called, not when imported, so a capture or
    a redirection in place is the one written to."""
    stream = sys.stderr if stream is None else stream
    if live is None:
        live = _isatty(stream)
    display: LiveProgress | PlainProgress = (
        LiveProgress(Console(file=stream, force_terminal=True))
        if live
        else PlainProgress(stream, every=every)
    )
    try:
        with watching_progress(display.update):
            yield
    finally:
        display.close()
