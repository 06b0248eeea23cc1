"""The progress display of `invoices run`: plain lines for logs and pipes, a live bar on a
terminal, and the command end to end with stderr captured."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import pytest
from prefect.logging.handlers import PrefectConsoleHandler
from rich.console import Console

from flows.cli import main
from flows.progress import (
    PLAIN_EVERY_SECONDS,
    LiveProgress,
    PlainProgress,
    duration,
    show_progress,
)
from tasks.report import ProgressSnapshot, RunProgress
from testing.samples import write_samples


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def snap(
    processed: int = 0,
    *,
    total: int = 120,
    done: int | None = None,
    needs_review: int = 0,
    failed: int = 0,
    elapsed: float = 0.0,
) -> ProgressSnapshot:
    done = processed - needs_review - failed if done is None else done
    return ProgressSnapshot(
        total=total,
        processed=processed,
        done=done,
        needs_review=needs_review,
        failed=failed,
        elapsed=elapsed,
    )


def screen(raw: str) -> list[str]:
    """The lines a terminal would show after `raw`, for what rich's live display writes: a
    line erased and rewritten in place (`\\r` + erase line), colours and cursor codes."""
    lines, line = [], ""
    for token in re.split(r"(\n|\r\x1b\[2K|\x1b\[[0-9;?]*[A-Za-z])", raw):
        if token == "\n":
            lines.append(line)
            line = ""
        elif token == "\r\x1b[2K":
            line = ""
        elif not token.startswith("\x1b"):
            line += token
    return [*lines, line] if line else lines


def test_duration_reads_like_a_person_would_say_it():
    assert [duration(s) for s in (0, 38.4, 59.6, 245, 7620)] == [
        "0 s",
        "38 s",
        "1 min 00 s",
        "4 min 05 s",
        "2 h 07 min",
    ]


def test_plain_lines_are_throttled_and_skip_unchanged_counts():
    out, clock = io.StringIO(), Clock()
    display = PlainProgress(out, every=5.0, clock=clock)
    display.update(snap(0))  # the work starts: one line with the total
    for second in range(1, 5):  # moving, but within 5 s of the last line
        clock.now += 1
        display.update(snap(second * 10, elapsed=second * 5.0))
    assert out.getvalue().splitlines() == [
        "progress: 0/120 processed (0 done, 0 needs_review, 0 failed), 0.0/s, ETA unknown"
    ]

    clock.now += 1.5  # 5.5 s after the first line
    display.update(snap(40, needs_review=3, failed=2, elapsed=20.0))
    assert out.getvalue().splitlines()[-1] == (
        "progress: 40/120 processed (35 done, 3 needs_review, 2 failed), 2.0/s, ETA 40 s"
    )

    clock.now += 60  # long after, but the counts have not moved: no line
    display.update(snap(40, needs_review=3, failed=2, elapsed=80.0))
    assert len(out.getvalue().splitlines()) == 2

    clock.now += 1  # they move: a line, since the last was more than 5 s ago
    display.update(snap(41, needs_review=3, failed=2, elapsed=82.0))
    assert len(out.getvalue().splitlines()) == 3


def test_plain_final_line_says_where_the_run_ended_and_what_it_took():
    out, clock = io.StringIO(), Clock()
    display = PlainProgress(out, every=5.0, clock=clock)
    display.update(snap(0, total=6))
    clock.now += 1
    display.update(snap(6, total=6, needs_review=1, failed=1, elapsed=3.2))  # throttled
    display.close()
    assert out.getvalue().splitlines() == [
        "progress: 0/6 processed (0 done, 0 needs_review, 0 failed), 0.0/s, ETA unknown",
        "progress: 6/6 processed (4 done, 1 needs_review, 1 failed), 1.9/s, 3 s elapsed",
    ]


def test_plain_says_nothing_when_no_run_reports_work():
    out = io.StringIO()
    PlainProgress(out).close()  # never called: a refused run
    empty = PlainProgress(out)
    empty.update(ProgressSnapshot(total=0))  # a run with nothing to do
    empty.close()
    assert out.getvalue() == ""


def test_plain_default_interval_is_the_constant():
    out, clock = io.StringIO(), Clock()
    display = PlainProgress(out, clock=clock)
    display.update(snap(0))
    clock.now += PLAIN_EVERY_SECONDS - 0.01
    display.update(snap(1, elapsed=1.0))
    clock.now += 0.01
    display.update(snap(2, elapsed=2.0))
    assert [line.split(" processed")[0] for line in out.getvalue().splitlines()] == [
        "progress: 0/120",
        "progress: 2/120",
    ]


def test_a_stream_that_breaks_does_not_break_the_run():
    class ClosedPipe(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    display = PlainProgress(ClosedPipe(), every=0.0)
    display.update(snap(0))
    display.update(snap(1, elapsed=1.0))
    display.close()


def terminal(width: int = 120) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=width), out


def test_live_shows_the_bar_counts_rate_and_eta_then_the_time_taken():
    console, out = terminal()
    display = LiveProgress(console)
    display.update(snap(40, needs_review=3, failed=2, elapsed=20.0))  # drawn at once
    try:
        first = screen(out.getvalue())[-1]
        assert "━" in first
        for text in ("40/120", "35 done", "3 needs_review", "2 failed", "2.0/s", "ETA 40 s"):
            assert text in first
        display.update(snap(120, needs_review=5, failed=2, elapsed=61.0))
    finally:
        display.close()
    last = screen(out.getvalue())
    assert len(last) == 1, last  # redrawn in place, not a line per update
    assert "120/120" in last[0] and "113 done" in last[0] and "1 min 01 s elapsed" in last[0]
    assert "ETA" not in last[0]


def test_live_draws_nothing_when_no_run_reports_work():
    console, out = terminal()
    display = LiveProgress(console)
    display.update(ProgressSnapshot(total=0))
    display.close()
    assert out.getvalue() == ""


@pytest.mark.parametrize("handler_type", [logging.StreamHandler, PrefectConsoleHandler])
def test_live_prints_log_lines_above_the_bar_not_through_it(handler_type):
    console, out = terminal()
    handler = handler_type(out)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger(f"test-progress-{handler_type.__name__}")
    log.addHandler(handler)
    log.propagate = False
    try:
        display = LiveProgress(console)
        display.update(snap(1, elapsed=1.0))
        log.warning("invoice-0001.pdf done in 1.2 s")
        display.update(snap(2, elapsed=2.0))
        display.close()
        assert handler.stream is out  # given back
        log.warning("after the display")
    finally:
        log.removeHandler(handler)
    lines = screen(out.getvalue())
    assert lines[0] == "invoice-0001.pdf done in 1.2 s", lines
    assert "━" in lines[1] and "2/120" in lines[1]
    assert lines[2:] == ["after the display"]


def test_show_progress_plain_on_a_pipe_live_on_a_terminal_and_only_while_open():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for stream in (io.StringIO(), Terminal()):
        run = RunProgress(None, total=3)
        with show_progress(stream, every=0.0):
            run.processed("done")
            run.processed("failed")
        run.processed("done")  # after the block: not shown
        text = stream.getvalue()
        if isinstance(stream, Terminal):
            assert "\x1b[" in text and "━" in text
            assert "2/3" in screen(text)[-1] and "1 failed" in screen(text)[-1]
        else:
            assert text.splitlines()[-1].startswith(
                "progress: 2/3 processed (1 done, 0 needs_review, 1 failed)"
            )
            assert "\x1b" not in text


@pytest.mark.usefixtures("prefect_harness")
def test_invoices_run_reports_progress_on_stderr_and_keeps_json_on_stdout(tmp_path: Path, capsys):
    source = tmp_path / "in"
    write_samples(source, 4, seed=7)
    (source / "broken.pdf").write_bytes(b"%PDF-1.7\n garbage")
    code = main(
        ["run", str(source), "--output", str(tmp_path / "out"), "--extractor", "offline", "--json"]
    )
    captured = capsys.readouterr()
    assert code == 1, captured.err[-2000:]
    summary = json.loads(captured.out)
    counts = summary["counts"]
    assert summary["processed"] == 5 and counts["failed"] == 1
    lines = [line for line in captured.err.splitlines() if line.startswith("progress:")]
    assert lines[-1].startswith(
        f"progress: 5/5 processed ({counts.get('done', 0)} done, "
        f"{counts.get('needs_review', 0)} needs_review, 1 failed), "
    )
    assert lines[-1].endswith(" elapsed")

    code = main(
        [
            "run",
            str(source),
            "--output",
            str(tmp_path / "quiet"),
            "--extractor",
            "offline",
            "--json",
            "--no-progress",
        ]
    )
    captured = capsys.readouterr()
    assert code == 1 and json.loads(captured.out)["processed"] == 5
    assert "progress:" not in captured.err
