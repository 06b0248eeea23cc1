"""Group commit: outcomes that arrive while a manifest write is in flight go out together in
the next one, so lock acquisitions grow with sessions and writes with time, not invoices.

Plain asyncio: the writer is given a `session` callable that holds the manifest lock while
it commits the batches it is handed (in the flow, `run_locked_session` of
tasks/orchestration/manifest_lock.py; in tests, anything that commits).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from tasks.errors import ConfigurationError
from tasks.manifest.model import FINAL_STATUSES, InvoiceOutcome

logger = logging.getLogger(__name__)


class ManifestWriteError(RuntimeError):
    def __init__(self, unrecorded: list[InvoiceOutcome], cause: BaseException) -> None:
        super().__init__(
            f"the manifest could not be written: {len(unrecorded)} outcomes are not recorded "
            f"({cause!r})"
        )
        self.unrecorded = unrecorded
        self.cause = cause


Session = Callable[[AsyncIterator[list[InvoiceOutcome]]], Awaitable[object]]


class ManifestWriter:
    """Group commit: one writer per flow run; each write carries everything that queued up.

    Writes are at least `min_interval` seconds apart (the manifest is rewritten whole, so
    fewer, larger batches are cheaper); closing flushes at once.

    The writer runs lock sessions (`session(batches)`: in the flow, one `update-manifest`
    task run holding the output's manifest lock). A session commits batch after batch: each
    batch is what arrived while the previous write was in flight. Lock acquisitions therefore
    grow with sessions, not with batches or invoices: a session ends when the writer closes
    or, to let other runs' writers in, when it has held the lock for `max_hold` seconds and
    has nothing to write. `open()` starts the first session at once, so the lock is taken
    before the run's own task runs load the server.

    `submit` never blocks the invoice that reports. A failed session puts its batch back and
    a new session is tried with backoff; after `max_failures` consecutive failures the writer
    stops and `close()` raises `ManifestWriteError` naming what was not recorded.
    """

    def __init__(
        self,
        session: Session,
        *,
        max_hold: float = 10.0,
        min_interval: float = 1.0,
        max_failures: int = 3,
        retry_delay: float = 1.0,
        on_commit: Callable[[int], Awaitable[object]] | None = None,
        on_lock_wait: Callable[[float], Awaitable[object]] | None = None,
        lock_wait_report_every: float = 10.0,
    ) -> None:
        self._session = session
        self._on_commit = on_commit
        self._on_lock_wait = on_lock_wait
        self.lock_wait_report_every = lock_wait_report_every
        self._pending: list[InvoiceOutcome] = []
        self._in_flight: list[InvoiceOutcome] = []
        self._wakeup = asyncio.Event()
        self._held = asyncio.Event()
        self._closing = False
        self._no_linger = asyncio.Event()  # set while closing or flushing
        self._drained = asyncio.Event()
        self._last_write = float("-inf")
        self._task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        self.max_hold = max_hold
        self.min_interval = min_interval
        self.max_failures = max_failures
        self.retry_delay = retry_delay
        self.batches: list[int] = []
        self.sessions = 0
        self.recorded = 0
        # How long leaving `async with` may wait for the lock and the last writes; None: as
        # long as it takes (a run that is stopping sets a bound).
        self.give_up_after: float | None = None

    def submit(self, outcome: InvoiceOutcome) -> None:
        # Never raises, even after the writer gave up: the outcome joins the unrecorded ones
        # that close() names, and the invoice that reported it is not torn down with it.
        self._pending.append(outcome)
        self._drained.clear()
        self._wakeup.set()

    async def flush(self) -> None:
        """Wait until everything submitted so far is committed (without the linger)."""
        self._no_linger.set()
        self._wakeup.set()
        try:
            while self._pending or self._in_flight:
                if self._error is not None or self._task is None or self._task.done():
                    raise ManifestWriteError(
                        self.unrecorded,
                        self._error or RuntimeError("the manifest writer is not running"),
                    )
                drained = asyncio.ensure_future(self._drained.wait())
                try:
                    await asyncio.wait([drained, self._task], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    drained.cancel()
        finally:
            if not self._closing:
                self._no_linger.clear()

    async def open(self, wait_for_lock: float = 0.0) -> ManifestWriter:
        """Start the first session now; wait up to `wait_for_lock` s for it to hold the lock."""
        self._task = asyncio.create_task(self._run(eager=True), name="manifest-writer")
        if wait_for_lock > 0:
            try:
                await asyncio.wait_for(asyncio.shield(self._held.wait()), wait_for_lock)
            except TimeoutError:
                logger.info("manifest lock not held after %.1fs; processing goes on", wait_for_lock)
        return self

    async def __aenter__(self) -> ManifestWriter:
        if self._task is None:
            self._task = asyncio.create_task(self._run(eager=False), name="manifest-writer")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close(self.give_up_after)

    async def close(self, give_up_after: float | None = None) -> None:
        """Flush everything submitted so far, then stop; raises if anything is unrecorded.

        `give_up_after` bounds the wait (a stopping run must end): past it the session is
        cancelled; claims and releases not written are dropped (a claim that never reached
        the manifest holds nothing), and any outcome not written makes close() raise."""
        self._closing = True
        self._no_linger.set()
        self._wakeup.set()
        task = self._task
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), give_up_after)
            except TimeoutError:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                lost = [o for o in self.unrecorded if o.status in FINAL_STATUSES]
                self._pending, self._in_flight = lost, []
                if lost and self._error is None:
                    self._error = TimeoutError(
                        f"the manifest was not written within {give_up_after:g} s of stopping"
                    )
        if self._error is not None:
            raise ManifestWriteError(self.unrecorded, self._error)

    @property
    def unrecorded(self) -> list[InvoiceOutcome]:
        """Per invoice, the last outcome submitted but not (yet) committed: its final outcome,
        or its claim when it never got further (a claim renewal does not hide an outcome)."""
        last: dict[str, InvoiceOutcome] = {}
        for outcome in self._in_flight + self._pending:
            if (
                outcome.status != "processing"
                or last.get(outcome.key) is None
                or last[outcome.key].status == "processing"
            ):
                last[outcome.key] = outcome
        return list(last.values())

    async def _batches(self) -> AsyncIterator[list[InvoiceOutcome]]:
        held_since = time.monotonic()
        self._held.set()
        while True:
            if self._in_flight:  # the consumer asked for more: the previous batch is committed
                committed, self._in_flight = self._in_flight, []
                self.batches.append(len(committed))
                final = sum(o.status in FINAL_STATUSES for o in committed)  # not claims
                self.recorded += final
                if not self._pending:
                    self._drained.set()
                if self._on_commit is not None and final:
                    await self._on_commit(final)
            if not self._pending:
                if self._closing or time.monotonic() - held_since >= self.max_hold:
                    return
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(
                        self._wakeup.wait(),
                        max(0.0, self.max_hold - (time.monotonic() - held_since)),
                    )
                except TimeoutError:
                    pass
                continue
            # Linger: a rewrite costs O(manifest), so writes are spaced by at least
            # min_interval and each carries everything that arrived meanwhile.
            linger = self.min_interval - (time.monotonic() - self._last_write)
            if linger > 0 and not self._no_linger.is_set():
                try:
                    await asyncio.wait_for(self._no_linger.wait(), linger)
                except TimeoutError:
                    pass
            self._last_write = time.monotonic()
            self._in_flight, self._pending = self._pending, []
            yield self._in_flight

    async def _report_lock_wait(self) -> None:
        """While a session waits for the lock, say so every `lock_wait_report_every` s: a
        wait on a lock held by a dead run lasts until Prefect's slot lease runs out."""
        started = time.monotonic()
        while not self._held.is_set():
            try:
                await asyncio.wait_for(self._held.wait(), self.lock_wait_report_every)
            except TimeoutError:
                waited = time.monotonic() - started
                if self._on_lock_wait is not None:
                    await self._on_lock_wait(waited)
                else:
                    logger.warning("waiting %.0f s for the manifest lock", waited)

    async def _run(self, *, eager: bool) -> None:
        failures = 0
        while True:
            if not self._pending and not eager:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            eager = False
            self.sessions += 1
            reporter = asyncio.create_task(self._report_lock_wait(), name="manifest-lock-wait")
            try:
                await self._session(self._batches())
            except ConfigurationError as exc:  # retrying cannot help: close() says why
                self._pending = self._in_flight + self._pending
                self._in_flight = []
                self._error = exc
                return
            except Exception as exc:  # recorded below and re-raised by close(): never silent
                failures += 1
                self._pending = self._in_flight + self._pending
                self._in_flight = []
                logger.warning(
                    "manifest session failed (%d/%d), %d outcomes waiting: %r",
                    failures,
                    self.max_failures,
                    len(self._pending),
                    exc,
                )
                if failures >= self.max_failures:
                    self._error = exc
                    return
                await asyncio.sleep(self.retry_delay * failures)
                continue
            finally:
                reporter.cancel()
                self._held.clear()
            failures = 0
