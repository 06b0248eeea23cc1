"""LLM calls in flight and their rate, capped by Prefect limits shared by every run.

A run takes `llm-in-flight` slots in blocks sized to the calls it has waiting and in flight,
gives them back as it drains, and shares the limit fairly with the other runs that use it:
each publishes what it holds and wants on its own flow run's labels, and a run holding more
than its max-min fair share gives blocks back while another run wants more. A run that
waits for slots says every 10 s how long, and which flow runs hold them.

Re-exported by `tasks.orchestration.limits` (the rest of the project's Prefect limits).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import ConcurrencyLeaseHolder, StateType
from prefect.concurrency.asyncio import (
    ConcurrencySlotAcquisitionError,
    concurrency,
    rate_limit,
)
from prefect.exceptions import ObjectNotFound

from tasks.errors import InvoiceFailure
from tasks.logs import run_logger

logger = logging.getLogger(__name__)

LLM_IN_FLIGHT_LIMIT = "llm-in-flight"
LLM_RATE_LIMIT = "llm-rate"
# Published on the flow run of a run that uses LLM slots (Prefect labels, public API).
HELD_LABEL = "invoices.llm.held"
WANTED_LABEL = "invoices.llm.wanted"
AT_LABEL = "invoices.llm.at"  # when (unix s) the run last said so

# A run that holds or wants slots says so again at least this often, even unchanged; labels
# older than STALE_AFTER are a run that died without a word (SIGKILL, a lost machine: its
# flow run stays RUNNING), and do not count in the shares.
_HEARTBEAT = 30.0
STALE_AFTER = 3 * _HEARTBEAT

_PUBLISH_EVERY = 2.0  # s, at most one label update per run this often
_DEMAND_WINDOW = 2.0  # s, the `wanted` a run publishes is its peak demand over this long
_WARM_SECONDS = 60.0  # s, how long open(expected=...) counts as demand if no call comes
_ACQUIRE_TIMEOUT = 60.0  # s, one block request (a 503 on SQLite costs a 2-8 s client backoff)
_RUNS_READ = 200  # RUNNING flow runs read to find the ones using LLM slots


def fair_shares(limit: int, wanted: Mapping[str, int]) -> dict[str, int]:
    """Max-min fair shares of `limit` slots (water-filling): every want at or under the
    level is served in full, the rest share what is left equally. Never more than a key
    wants, never more than `limit` in all. Units that cannot be split evenly go one each to
    the keys in sorted order, so every run computes the same shares from the same wants."""
    shares = {key: 0 for key in wanted}
    left = max(0, int(limit))
    hungry = sorted(key for key, want in wanted.items() if want > 0)
    while left > 0 and hungry:
        level = left // len(hungry)
        if level == 0:
            for key in hungry[:left]:
                shares[key] += 1
            break
        still: list[str] = []
        for key in hungry:
            give = min(level, wanted[key] - shares[key])
            shares[key] += give
            left -= give
            if shares[key] < wanted[key]:
                still.append(key)
        hungry = still
    return shares


@dataclass(frozen=True)
class LLMRunUse:
    """What a RUNNING flow run says (on its labels) it holds and wants of `llm-in-flight`,
    and when it last said so (unix s; None: unknown)."""

    name: str
    held: int
    wanted: int
    at: float | None = None

    def stale(self, now: float | None = None) -> bool:
        return self.at is not None and (now or time.time()) - self.at > STALE_AFTER


def live_runs(runs: Mapping[str, LLMRunUse], now: float | None = None) -> dict[str, LLMRunUse]:
    """The runs whose labels are fresh (said again within `STALE_AFTER`)."""
    return {run_id: use for run_id, use in runs.items() if not use.stale(now)}


def _label_int(value: Any) -> int:
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 0


async def read_llm_runs(client: Any) -> dict[str, LLMRunUse]:
    """The RUNNING flow runs that publish their use of LLM slots, by flow run id. A run that
    ended (or crashed) is not RUNNING, so its last labels are ignored."""
    runs = await client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))
        ),
        limit=_RUNS_READ,
    )
    uses: dict[str, LLMRunUse] = {}
    for run in runs:
        labels = run.labels or {}
        if HELD_LABEL in labels or WANTED_LABEL in labels:
            at = labels.get(AT_LABEL)
            uses[str(run.id)] = LLMRunUse(
                run.name,
                _label_int(labels.get(HELD_LABEL)),
                _label_int(labels.get(WANTED_LABEL)),
                float(at) if isinstance(at, (int, float)) else None,
            )
    return uses


async def publish_llm_use(client: Any, flow_run_id: UUID | str, held: int, wanted: int) -> None:
    """Say on the flow run's labels how many LLM slots it holds and wants, and when (merged
    into its other labels)."""
    await client.update_flow_run_labels(
        UUID(str(flow_run_id)),
        {HELD_LABEL: int(held), WANTED_LABEL: int(wanted), AT_LABEL: int(time.time())},
    )


def share_cap(
    limit: int, own_id: str, own_max: int, runs: Mapping[str, LLMRunUse]
) -> tuple[int, bool]:
    """This run's cap: its fair share of `limit` were it to want its max `own_max`, the other
    RUNNING runs wanting what they publish; and whether another run wants more than it holds
    (then a run over its cap gives slots back). Alone, a run's cap is min(own_max, limit)."""
    others = {run_id: use for run_id, use in runs.items() if run_id != own_id}
    wanted = {run_id: use.wanted for run_id, use in others.items()}
    wanted[own_id] = own_max
    contended = any(use.wanted > use.held for use in others.values())
    return fair_shares(limit, wanted)[own_id], contended


def describe_llm_holders(
    active_slots: int, runs: Mapping[str, LLMRunUse], own_id: str | None = None, most: int = 5
) -> str:
    """`flow run 'crimson-fox' (3f2a...) 4 slots; ...`: who holds the LLM slots, by their
    labels; what no labelled run accounts for is held by runs that do not publish their use."""
    holders = sorted(
        ((run_id, use) for run_id, use in runs.items() if use.held > 0 and run_id != own_id),
        key=lambda item: (-item[1].held, item[0]),
    )
    now = time.time()
    parts = [
        f"flow run {use.name!r} ({run_id}) {use.held} slots"
        + (
            f" (not heard from for {now - use.at:.0f} s)"
            if use.at is not None and use.stale(now)
            else ""
        )
        for run_id, use in holders[:most]
    ]
    if len(holders) > most:
        parts.append(
            f"{len(holders) - most} more flow runs "
            f"{sum(use.held for _, use in holders[most:])} slots"
        )
    unaccounted = active_slots - sum(use.held for use in runs.values())
    if not parts:
        return "runs that do not publish their use"
    if unaccounted > 0:
        parts.append(f"{unaccounted} slots by runs that do not publish their use")
    return "; ".join(parts)


async def report_llm_slot_wait(
    waited: float, *, own_flow_run_id: str | None = None, held: int = 0, wanted: int = 0
) -> None:
    """Say how long this run has waited for LLM slots, the limit's use, and who holds it
    (flow run name and id, from the labels of RUNNING flow runs). Never raises."""
    try:
        async with get_client() as client:
            limit = await client.read_global_concurrency_limit_by_name(LLM_IN_FLIGHT_LIMIT)
            runs = await read_llm_runs(client)
        use = f"{limit.active_slots} of {limit.limit} in use"
        held_by = describe_llm_holders(limit.active_slots, runs, own_flow_run_id)
    except Exception as exc:  # the report must not break the wait it reports on
        use = "use unknown"
        held_by = f"unknown ({type(exc).__name__}: {exc})"
    try:
        run_logger(logger).warning(
            "waited %.0f s for LLM slots (%r %s), held by %s; this run holds %d and wants %d",
            waited,
            LLM_IN_FLIGHT_LIMIT,
            use,
            held_by,
            held,
            wanted,
        )
    except Exception:  # a logging handler that fails must not break the wait either
        logger.exception("cannot report the wait for LLM slots")


def _is_refusal(exc: BaseException) -> bool:
    """A 423: the limit has no room for the block now (not an error).

    Prefect's public API has no exception of its own for this: `concurrency(...,
    max_retries=0)` raises `ConcurrencySlotAcquisitionError` for a refusal as for a failure,
    chained to the server's response. Told apart, a refusal is polled again while a failure
    (the limit does not exist) fails the waiting calls at once; the chaining is pinned by
    tests/test_limits.py::test_a_refused_block_request_is_told_from_a_failure."""
    cause = exc.__cause__
    return isinstance(cause, httpx.HTTPStatusError) and cause.response.status_code == 423


@dataclass(eq=False)
class _Block:
    """`size` slots of `llm-in-flight`, entered and exited by one holder task."""

    size: int
    release: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    draining: str | None = None  # why it is being given back: "idle" or "share"


class LLMSlots:
    """Caps LLM calls in flight and their rate through Prefect limits, without a server
    round trip per call.

    Prefect serializes slot acquisitions per limit within a process (one server round trip
    at a time), so a slot per call would make 100 concurrent calls queue behind each other
    for tens of seconds. Instead
    a run holds *blocks* of `llm-in-flight` slots, each under a renewed lease, and each call
    takes a local token of them. Blocks follow demand (calls waiting + in flight): when it
    exceeds what the run holds, one block sized to the shortfall is asked for (at most the
    run's `capacity` in all, at most a quarter of the limit per block so that runs can
    share, one request at a time); when blocks have stayed unused for `idle_seconds`, the
    smallest is given back, once the calls on its tokens have ended (so the runs together
    never exceed the limit). A run with 2 invoices holds at most 2 slots.

    Runs share the limit through Prefect: with a `flow_run_id`, a run publishes what it holds
    and wants on its flow run's labels (`invoices.llm.held`, `invoices.llm.wanted`), reads
    the other RUNNING runs' every `share_every` s, and caps itself at its max-min fair
    share (`fair_shares`); over it while another run wants more, it gives blocks back. A run
    alone gets all it wants. Without a flow run id: no labels, no sharing.

    A refused slot request gets HTTP 423 with a Retry-After of up to 30 s (the server's
    estimate from the limit's average slot occupancy), and Prefect's client sleeps it out, holding
    its per-limit acquisition queue (every other request for the limit in this process
    waits behind it) while slots given back meanwhile go unused. So a block is asked for
    only when a read of the limit shows room (a read takes no write lock on the server's
    database), for no more than is free, and without Prefect's retries (`max_retries=0`);
    while there is no room the run reads the limit every `poll_seconds`. While a call or
    `open()` waits for a block, every `report_every` s a warning says how long, the limit's
    use and who holds it. A call that gets no slot within `timeout` fails
    `llm_slot_timeout`.

    The price: block requests are made while the run works, not once at its start. On
    SQLite one that collides with the run's other writes gets a 503 and Prefect's client
    backs off ~2 s, and the calls waiting for that block wait with it.

    `llm-rate` slots are taken `capacity` at a time. Rate blocks after the first are paced:
    one is asked for only once its slots have decayed since the last grant. The server
    resets a limit's decay clock on a refused request (the refusal updates the row, whose
    `updated` stamp the decay counts from, without applying the decay), so asking early,
    and retrying after the 423 as Prefect's client does, costs up to twice the wait.
    """

    def __init__(
        self,
        capacity: int,
        *,
        timeout: float = 600.0,
        lease_seconds: float = 120.0,
        flow_run_id: UUID | str | None = None,
        report_every: float = 10.0,
        share_every: float = 5.0,
        idle_seconds: float = 2.0,
        poll_seconds: float = 1.0,
    ) -> None:
        self.capacity = max(1, capacity)
        self.timeout = timeout
        # The held slots' lease, renewed while the run lives: after a crash (SIGKILL) the
        # slots come back to the other runs this long after the last renewal. The server
        # refuses leases under 60 s (422).
        self.lease_seconds = max(60.0, lease_seconds)
        self.flow_run_id = str(flow_run_id) if flow_run_id is not None else None
        self.report_every = report_every
        self.share_every = share_every
        self.idle_seconds = idle_seconds
        self.poll_seconds = poll_seconds

        self._blocks: list[_Block] = []
        self._in_use = 0  # local tokens taken by calls
        self._waiters: collections.deque[tuple[asyncio.Future[None], float]] = collections.deque()
        self._warm = 0  # demand announced by open(expected=...) until the first call
        self._warm_until = 0.0
        self._opening_since: float | None = None  # open() waiting for its first block
        self._granted = asyncio.Event()
        self._wake = asyncio.Event()
        self._manager: asyncio.Task[None] | None = None
        self._closing = False

        self._limit_size: int | None = None  # llm-in-flight's size, last read
        self._cap: int | None = None  # fair-share cap (None: not sharing, or nobody else)
        self._contended = False
        self._refused = False  # the last block request found no room: poll before asking
        self._next_try = 0.0
        self._idle_since: float | None = None
        self._peak = 0
        self._peak_at = -math.inf
        self._next_share = 0.0
        self._published: tuple[int, int] | None = None
        self._labelled = False  # its flow run carries the labels (cleared on close)
        self._published_at = -math.inf
        self._reported_at = -math.inf
        self._background: set[asyncio.Task[None]] = set()
        self._holders: set[asyncio.Task[None]] = set()  # every block's task until it ends
        self._sharing: asyncio.Task[None] | None = None
        self._publishing: asyncio.Task[None] | None = None
        self._reporting: asyncio.Task[None] | None = None

        # This run's writes to the server (block requests and releases, rate blocks, labels)
        # one at a time: on SQLite two at once collide, and the loser's client backs off 2 s.
        self._writes = asyncio.Lock()
        self._rate_lock = asyncio.Lock()
        self._rate_tokens = 0
        self._decay_per_second: float | None = None  # llm-rate's, read at the first refill
        self._granted_at: float | None = None  # loop time of the last rate block granted

    # -- what the run holds and needs -------------------------------------------------------

    @property
    def held(self) -> int:
        """Slots of `llm-in-flight` this run holds now (blocks being given back included)."""
        return sum(block.size for block in self._blocks)

    def _kept(self) -> int:
        return sum(block.size for block in self._blocks if block.draining is None)

    def _demand(self, now: float) -> int:
        demand = len(self._waiters) + self._in_use
        if self._warm and now < self._warm_until:
            demand = max(demand, self._warm)
        return demand

    def _wanted(self) -> int:
        return min(self.capacity, self._peak)

    # -- the public side ------------------------------------------------------------------

    async def __aenter__(self) -> LLMSlots:
        return self

    async def open(self, expected: int | None = None) -> LLMSlots:
        """Start taking slots now, before the run's task runs load the server (on SQLite a
        slot request that collides with that load gets a 503 and a 2 s client backoff).
        With `expected` calls, wait (up to `timeout`) for a first block sized to them
        (min(capacity, expected), at most a quarter of the limit; they count as demand
        until the first call, or for 60 s); without, take none: calls ask for what they
        need. The first `llm-rate` block is taken either way."""
        loop = asyncio.get_running_loop()
        self._ensure_manager()
        try:
            if expected and expected > 0 and not self._blocks:
                self._warm = min(self.capacity, expected)
                self._warm_until = loop.time() + _WARM_SECONDS
                self._opening_since = loop.time()
                self._granted.clear()
                self._wake.set()
                try:
                    async with asyncio.timeout(self.timeout):
                        await self._granted.wait()
                finally:
                    self._opening_since = None
            # One after the other: on SQLite two slot increments at once collide ("database
            # is locked" at once, not after the busy timeout: both transactions read before
            # writing), and the loser's client backs off 2 s.
            await self._take_rate_block()
        except TimeoutError:
            pass  # nothing free yet; calls wait for it (bounded) and fail with a reason
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._closing = True
        tasks = [task for task in (self._manager, *self._background) if task is not None]
        for task in tasks:
            task.cancel()
        self._fail_waiters(RuntimeError("the run's LLM slots are closed"))
        for block in self._blocks:
            block.release.set()  # each holder gives its block back, even if this is cancelled
        if tasks:
            await asyncio.wait(tasks)
        # Every holder, also one whose give-back the cancelled manager left running.
        if self._holders:
            await asyncio.wait(list(self._holders))
        self._blocks.clear()
        if self.flow_run_id is not None and self._labelled:
            try:
                async with asyncio.timeout(5), get_client() as client:
                    await publish_llm_use(client, self.flow_run_id, 0, 0)
            except Exception as exc:
                logger.debug("cannot clear the LLM slot labels: %r", exc)

    @asynccontextmanager
    async def call(self) -> AsyncIterator[None]:
        self._ensure_manager()
        self._warm = 0  # real calls came: demand is theirs from now on
        try:
            await self._take_token()
        except TimeoutError:
            raise self._timed_out() from None
        try:
            try:
                await self._take_rate_token()
            except TimeoutError:
                raise self._timed_out() from None
            yield
        finally:
            self._in_use -= 1
            self._dispatch()
            self._wake.set()

    def _timed_out(self) -> InvoiceFailure:
        return InvoiceFailure(
            "llm_slot_timeout",
            f"no LLM slot within {self.timeout:g} s (limits {LLM_IN_FLIGHT_LIMIT!r} and "
            f"{LLM_RATE_LIMIT!r} are shared by every run)",
            retryable=True,
        )

    # -- local tokens ---------------------------------------------------------------------

    async def _take_token(self) -> None:
        if not self._waiters and self._in_use < self._kept():
            self._in_use += 1
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        entry = (future, loop.time())
        self._waiters.append(entry)
        self._wake.set()
        try:
            async with asyncio.timeout(self.timeout):
                await future
        except BaseException:
            if future.done() and not future.cancelled() and future.exception() is None:
                self._in_use -= 1  # granted as the wait ended: give it to the next one
                self._dispatch()
            else:
                with suppress(ValueError):
                    self._waiters.remove(entry)
            self._wake.set()
            raise

    def _dispatch(self) -> None:
        """Hand free tokens to waiting calls, first come first served."""
        while self._waiters and self._in_use < self._kept():
            future, _ = self._waiters.popleft()
            if not future.done():
                self._in_use += 1
                future.set_result(None)

    # -- the manager: one task that grows, shares and shrinks the run's blocks ---------------

    def _ensure_manager(self) -> None:
        if self._manager is None and not self._closing:
            self._manager = asyncio.create_task(self._manage(), name="llm-slots")

    async def _manage(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing:
            self._wake.clear()
            try:
                await self._step(loop.time())
            except Exception:
                logger.warning("managing the LLM slots failed; trying again", exc_info=True)
                await asyncio.sleep(self.poll_seconds)
            if not self._wake.is_set():
                busy = self._blocks or self._waiters or self._in_use or self._warm
                with suppress(TimeoutError):
                    async with asyncio.timeout(0.25 if busy else 1.0):
                        await self._wake.wait()

    async def _step(self, now: float) -> None:
        self._reap_lost_blocks()
        demand = self._demand(now)
        if demand >= self._peak or now - self._peak_at > _DEMAND_WINDOW:
            self._peak, self._peak_at = demand, now
        self._refresh_share_maybe(now, demand)
        self._publish_maybe(now)

        # Give back the blocks being drained whose tokens are free; keep those needed again
        # (demand came back; or, given back for the share, the share has grown).
        for block in [b for b in self._blocks if b.draining]:
            kept = self._kept()
            needed = demand > kept and (
                block.draining == "idle"
                or not self._contended
                or (self._cap is not None and kept + block.size <= self._cap)
            )
            if needed:
                block.draining = None
                self._dispatch()
            elif self._in_use <= self.held - block.size:
                await self._give_back(block)

        kept = self._kept()
        target = self.capacity if self._cap is None else min(self.capacity, self._cap)
        if demand > kept and kept < target:
            if now >= self._next_try:
                await self._grow(demand - kept, target - kept, now)
        else:
            self._refused = False

        kept = self._kept()
        free_blocks = [b for b in self._blocks if b.draining is None]
        if self._cap is not None and self._contended and kept > self._cap and free_blocks:
            # Over the fair share while another run waits: give back down to it.
            over = kept - self._cap
            fitting = [b for b in free_blocks if b.size <= over]
            block = (
                max(fitting, key=lambda b: b.size)
                if fitting
                else min(free_blocks, key=lambda b: b.size)
            )
            block.draining = "share"
            self._idle_since = None
        elif free_blocks and demand <= kept - min(b.size for b in free_blocks):
            if self._idle_since is None:
                self._idle_since = now
            elif now - self._idle_since >= self.idle_seconds:
                min(free_blocks, key=lambda b: b.size).draining = "idle"
        else:
            self._idle_since = None

        self._report_maybe(now)

    async def _grow(self, shortfall: int, room: int, now: float) -> None:
        """Ask for one block sized to the shortfall (bounded); only when a read of the limit
        shows room, and then for no more than is free."""
        loop = asyncio.get_running_loop()
        async with self._writes:
            started = loop.time()
            size = min(shortfall, room)
            # A refused request costs a write on the server, and Prefect logs it as an
            # ERROR: read first (a read takes no write lock).
            limit = await self._read_limit()
            read = loop.time() - started
            if limit is not None:
                self._limit_size = limit.limit
                free = limit.limit - limit.active_slots
                if free < 1:
                    self._no_room(now)
                    return
                size = min(size, free)
            if self._limit_size:
                size = min(size, max(1, self._limit_size // 4))
            size = max(1, size)

            block = _Block(size)
            granted: asyncio.Future[None] = loop.create_future()
            block.task = asyncio.create_task(self._hold(block, granted), name=f"llm-slots-{size}")
            self._holders.add(block.task)
            block.task.add_done_callback(self._holders.discard)
            try:
                await granted
            except asyncio.CancelledError:
                block.task.cancel()
                raise
            except ConcurrencySlotAcquisitionError as exc:
                if _is_refusal(exc):
                    self._no_room(now)
                    return
                self._next_try = now + self.poll_seconds
                logger.warning("cannot take %d %r slots: %s", size, LLM_IN_FLIGHT_LIMIT, exc)
                self._fail_waiters(exc)
                return
            except Exception as exc:
                self._next_try = now + self.poll_seconds
                logger.warning("cannot take %d %r slots: %r", size, LLM_IN_FLIGHT_LIMIT, exc)
                return
        self._blocks.append(block)
        logger.debug(
            "took %d %r slots in %.3f s (read %.3f s; now %d, in %d blocks)",
            size,
            LLM_IN_FLIGHT_LIMIT,
            loop.time() - started,
            read,
            self.held,
            len(self._blocks),
        )
        self._refused = False
        self._granted.set()
        self._dispatch()
        self._wake.set()  # still short? the next block at once, not at the next tick

    def _no_room(self, now: float) -> None:
        """The limit has no room for a block: read it again in `poll_seconds`; learn this
        run's fair share now, if it has just started waiting."""
        if not self._refused:
            self._next_share = min(self._next_share, now)
        self._refused = True
        self._next_try = now + self.poll_seconds

    def _fail_waiters(self, exc: BaseException) -> None:
        """A block request failed other than by a refusal (e.g. the limit does not exist):
        the calls waiting for it fail with that, rather than wait out their timeout."""
        while self._waiters:
            future, _ = self._waiters.popleft()
            if not future.done():
                future.set_exception(exc)

    async def _hold(self, block: _Block, granted: asyncio.Future[None]) -> None:
        # One task enters and exits Prefect's `concurrency()` context: an async context
        # manager (its lease renewal included) must be exited by the task that entered it.
        holder = (
            ConcurrencyLeaseHolder(type="flow_run", id=UUID(self.flow_run_id))
            if self.flow_run_id is not None
            else None
        )
        try:
            async with concurrency(
                LLM_IN_FLIGHT_LIMIT,
                occupy=block.size,
                timeout_seconds=_ACQUIRE_TIMEOUT,
                max_retries=0,
                strict=True,
                lease_duration=self.lease_seconds,
                holder=holder,
            ):
                if granted.done():  # the request was abandoned: give the slots back
                    return
                granted.set_result(None)
                await block.release.wait()
        except asyncio.CancelledError:
            if not granted.done():
                granted.cancel()
            raise
        except BaseException as exc:
            if not granted.done():
                granted.set_exception(exc)
                return
            raise

    async def _give_back(self, block: _Block) -> None:
        try:
            async with self._writes:
                block.release.set()
                if block.task is not None:
                    # Shielded: a cancelled manager must not cancel the release half-way
                    # (Prefect would then leave the slots held until their lease runs out).
                    await asyncio.shield(block.task)
        except Exception as exc:
            logger.warning(
                "giving back %d %r slots failed (%r); their lease frees them",
                block.size,
                LLM_IN_FLIGHT_LIMIT,
                exc,
            )
        finally:
            with suppress(ValueError):
                self._blocks.remove(block)
            logger.debug(
                "gave back %d %r slots (%s; now %d)",
                block.size,
                LLM_IN_FLIGHT_LIMIT,
                block.draining,
                self.held,
            )
            self._dispatch()

    def _reap_lost_blocks(self) -> None:
        """A block whose holder ended by itself (its lease could not be renewed) is gone."""
        for block in list(self._blocks):
            if block.task is not None and block.task.done() and not block.release.is_set():
                self._blocks.remove(block)
                error = None if block.task.cancelled() else block.task.exception()
                logger.warning(
                    "lost %d %r slots (their lease ended: %r)",
                    block.size,
                    LLM_IN_FLIGHT_LIMIT,
                    error,
                )

    async def _read_limit(self) -> Any:
        try:
            async with get_client() as client:
                return await client.read_global_concurrency_limit_by_name(LLM_IN_FLIGHT_LIMIT)
        except Exception as exc:
            logger.debug("cannot read the %r limit: %r", LLM_IN_FLIGHT_LIMIT, exc)
            return None

    # -- sharing, publishing, reporting: in the background, never holding the manager -------

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _refresh_share_maybe(self, now: float, demand: int) -> None:
        if self.flow_run_id is None or now < self._next_share:
            return
        if not (self._blocks or demand):
            return
        if self._sharing is not None and not self._sharing.done():
            return
        self._next_share = now + self.share_every
        self._sharing = self._spawn(self._refresh_share(), "llm-slots-share")

    async def _refresh_share(self) -> None:
        try:
            async with get_client() as client:
                limit = await client.read_global_concurrency_limit_by_name(LLM_IN_FLIGHT_LIMIT)
                runs = await read_llm_runs(client)
        except Exception as exc:
            logger.debug("cannot read the runs sharing %r: %r", LLM_IN_FLIGHT_LIMIT, exc)
            return
        assert self.flow_run_id is not None
        self._limit_size = limit.limit
        self._cap, self._contended = share_cap(
            limit.limit, self.flow_run_id, self.capacity, live_runs(runs)
        )
        self._wake.set()

    def _publish_maybe(self, now: float) -> None:
        if self.flow_run_id is None:
            return
        value = (self.held, self._wanted())
        if self._published is None and value == (0, 0):
            return  # never used the LLM slots: nothing to say
        if value == self._published and (value == (0, 0) or now - self._published_at < _HEARTBEAT):
            return  # said already, and recently enough (a heartbeat while it uses slots)
        if now - self._published_at < _PUBLISH_EVERY:
            return
        if self._publishing is not None and not self._publishing.done():
            return
        self._published, self._published_at = value, now
        self._publishing = self._spawn(self._publish(*value), "llm-slots-publish")

    async def _publish(self, held: int, wanted: int) -> None:
        assert self.flow_run_id is not None
        try:
            async with self._writes, get_client() as client:
                await publish_llm_use(client, self.flow_run_id, held, wanted)
            self._labelled = True
        except Exception as exc:
            logger.debug("cannot publish the run's use of LLM slots: %r", exc)
            self._published = None  # try again

    def _report_maybe(self, now: float) -> None:
        """Every `report_every` s while a call or open() has waited that long for a block
        that the run has none of, or that the limit has no room for."""
        starts = [
            since
            for since in (self._waiters[0][1] if self._waiters else None, self._opening_since)
            if since is not None
        ]
        if not starts or not (self._kept() == 0 or self._refused):
            return
        waited = now - min(starts)  # the oldest waiter's wait (waiters are first come first)
        if waited < self.report_every or now - self._reported_at < self.report_every:
            return
        if self._reporting is not None and not self._reporting.done():
            return
        self._reported_at = now
        self._reporting = self._spawn(
            report_llm_slot_wait(
                waited,
                own_flow_run_id=self.flow_run_id,
                held=self.held,
                wanted=min(self.capacity, max(self._peak, 1)),
            ),
            "llm-slots-report",
        )

    # -- llm-rate: local tokens of paced blocks ------------------------------------------

    async def _take_rate_token(self) -> None:
        async with self._rate_lock:
            if self._rate_tokens == 0:
                await self._take_rate_block()
            self._rate_tokens -= 1

    async def _take_rate_block(self) -> None:
        if self._rate_tokens > 0:
            return
        loop = asyncio.get_running_loop()
        if self._granted_at is not None:
            decay = await self._rate_decay_per_second()
            if decay > 0:
                # + 20 ms: the server floors the decayed slots, and its stamp of our last
                # grant is a little earlier than our clock's.
                wait = self._granted_at + self.capacity / decay + 0.02 - loop.time()
                await asyncio.sleep(min(wait, self.timeout))
        async with self._writes:
            await rate_limit(
                LLM_RATE_LIMIT, occupy=self.capacity, timeout_seconds=self.timeout, strict=True
            )
        self._granted_at = loop.time()
        self._rate_tokens = self.capacity

    async def _rate_decay_per_second(self) -> float:
        if self._decay_per_second is None:
            try:
                async with get_client() as client:
                    limit = await client.read_global_concurrency_limit_by_name(LLM_RATE_LIMIT)
            except (httpx.HTTPError, ObjectNotFound, OSError, RuntimeError) as exc:
                # Pacing only saves time; unpaced, Prefect's retries still keep the limit.
                logger.warning(
                    "cannot read the %r limit (%r); this refill is not paced", LLM_RATE_LIMIT, exc
                )
                return 0.0
            self._decay_per_second = limit.slot_decay_per_second or 0.0
        return self._decay_per_second
