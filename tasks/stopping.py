"""Stopping a run on SIGINT or SIGTERM without losing what it already paid for.

On the first signal no new invoice starts; the invoices in flight get `grace_seconds` to
finish (their LLM calls are already paid for) and are recorded as usual; what is still running
after that is abandoned, and its claim, like every unstarted invoice's, is given back so the
next run takes it at once. A second signal abandons what is in flight at once. The run then
records, reports, and ends with the signal named in its summary (the CLI exits 130 or 143).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Whether the run was asked to stop, and the grace period of its invoices in flight."""

    def __init__(self, grace_seconds: float = 30.0) -> None:
        if grace_seconds < 0:
            raise ValueError("grace_seconds must be >= 0")
        self.grace_seconds = grace_seconds
        self.signal: signal.Signals | None = None
        self.abandoned = 0
        self._stopping = asyncio.Event()
        self._abandon = asyncio.Event()
        self._in_flight: set[asyncio.Task[object]] = set()
        self._timer: asyncio.TimerHandle | None = None

    @property
    def requested(self) -> bool:
        return self._stopping.is_set()

    def request(self, signum: int) -> None:
        """What a stop signal does: the first stops new work, a second abandons the rest."""
        if self.signal is None:
            self.signal = signal.Signals(signum)
            self._stopping.set()
            logger.warning(
                "%s: starting no new invoices; the %d in flight get %g s to finish and be "
                "recorded (send it again to stop them now)",
                self.signal.name,
                len(self._in_flight),
                self.grace_seconds,
            )
            self._timer = asyncio.get_running_loop().call_later(self.grace_seconds, self._give_up)
        else:
            logger.warning(
                "%s again: abandoning the %d invoices in flight",
                signal.Signals(signum).name,
                len(self._in_flight),
            )
            self._give_up()

    def _give_up(self) -> None:
        self._abandon.set()
        for task in self._in_flight:
            task.cancel()

    async def guard(self, work: Awaitable[T]) -> T | None:
        """`work`'s result; None when the stop came first (not started, or abandoned)."""
        if self.requested:
            if asyncio.iscoroutine(work):
                work.close()
            return None
        task: asyncio.Task[T] = asyncio.ensure_future(work)
        self._in_flight.add(task)
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if (
                self._abandon.is_set()
                and task.cancelled()
                and (current is None or current.cancelling() == 0)
            ):
                self.abandoned += 1
                return None
            raise
        finally:
            self._in_flight.discard(task)

    async def unless_stopped(self, work: Awaitable[T]) -> tuple[bool, T | None]:
        """(True, `work`'s result), or (False, None) when a stop request came first: `work`
        is then cancelled (for waits that must not hold up a stopping run)."""
        task: asyncio.Task[T] = asyncio.ensure_future(work)
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if task.cancelled():
            return False, None
        return True, task.result()

    @contextmanager
    def on_signals(self) -> Iterator[StopRequest]:
        """Handle SIGINT and SIGTERM this way while the block runs, then put back the handlers
        there were (Prefect's SIGTERM bridge, asyncio's or Python's SIGINT handler). Outside
        the main thread signals cannot be handled, and the block runs without."""
        loop = asyncio.get_running_loop()
        installed: list[tuple[signal.Signals, Callable[[int, FrameType | None], Any] | int | None]]
        installed = []
        try:
            for signum in STOP_SIGNALS:
                previous = signal.getsignal(signum)
                loop.add_signal_handler(signum, self.request, signum)
                installed.append((signum, previous))
        except (ValueError, RuntimeError, NotImplementedError) as exc:
            logger.debug("stop signals not handled here: %r", exc)
        try:
            yield self
        finally:
            for signum, previous in installed:
                loop.remove_signal_handler(signum)
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
            if self._timer is not None:
                self._timer.cancel()
