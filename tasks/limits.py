"""Prefect concurrency limits the pipeline depends on, made sure of before they are needed.

A tag limit that does not exist on the server is silently not enforced (tagged task runs
go ahead unlimited with only a warning), so the flow creates or repairs the `manifest`
limit before the first manifest write and refuses to run when it cannot.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
)
from prefect.concurrency.asyncio import concurrency, rate_limit
from prefect.concurrency.services import (
    ConcurrencySlotAcquisitionService,
    ConcurrencySlotAcquisitionWithLeaseService,
)
from prefect.exceptions import MissingContextError, ObjectAlreadyExists, ObjectNotFound
from prefect.logging import get_run_logger
from prefect.settings import PREFECT_API_URL

from tasks.errors import InvoiceFailure

logger = logging.getLogger(__name__)


class LockUnavailableError(RuntimeError):
    """The orchestrator-side lock could not be set up; the run must not go ahead unlocked."""


def tag_limit_name(tag: str) -> str:
    # Prefect 3 enforces a task tag's limit through the global concurrency limit "tag:<tag>".
    return f"tag:{tag}"


async def ensure_concurrency_limit(
    name: str,
    limit: int,
    *,
    slot_decay_per_second: float | None = None,
    update_existing: bool = True,
    purpose: str = "this limit",
) -> int:
    """Create the global concurrency limit `name`, or (with `update_existing`) repair its
    limit, decay and active flag; without it an existing limit is left as the operator set it
    (it is still re-activated: an inactive limit is not enforced). Returns the limit in force."""
    try:
        async with get_client() as client:
            try:
                existing = await client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                try:
                    await client.create_global_concurrency_limit(
                        GlobalConcurrencyLimitCreate(
                            name=name, limit=limit, active=True,
                            slot_decay_per_second=slot_decay_per_second or 0.0,
                        )
                    )
                    return limit
                except ObjectAlreadyExists:  # another run created it between our read and create
                    existing = await client.read_global_concurrency_limit_by_name(name)
            decay = slot_decay_per_second or 0.0
            differs = existing.limit != limit or existing.slot_decay_per_second != decay
            if not existing.active or (update_existing and differs):
                update = GlobalConcurrencyLimitUpdate(active=True)
                if update_existing:
                    update = GlobalConcurrencyLimitUpdate(
                        limit=limit, active=True, slot_decay_per_second=decay
                    )
                await client.update_global_concurrency_limit(name, update)
                if update_existing:
                    return limit
            return existing.limit
    except (httpx.HTTPError, OSError, RuntimeError) as exc:
        api = PREFECT_API_URL.value() or "the ephemeral local server"
        raise LockUnavailableError(
            f"cannot set up the concurrency limit {name!r} (limit {limit}) on the Prefect API at "
            f"{api}: {type(exc).__name__}: {exc}. Refusing to run without {purpose}."
        ) from exc


async def ensure_manifest_lock(tag: str) -> None:
    """The lock of one output's manifest: the tag limit of `tag` (`manifest_lock_tag`), one slot."""
    await ensure_concurrency_limit(tag_limit_name(tag), 1, purpose="the manifest lock")


# Prefect 3.8.8 gives a tag-limit slot a 60 s lease (task_engine.py, not configurable); the
# server's repossessor frees expired ones every 15 s (PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS).
TAG_SLOT_LEASE_NOTE = "a holder that died keeps it until its 60 s slot lease runs out (+ up to 15 s)"


async def report_manifest_lock_wait(tag: str, waited: float) -> None:
    """Say who holds the manifest lock `tag` while this run waits for it (never silent):
    the task run and its flow run, by name and id."""
    try:
        async with get_client() as client:
            limit = await client.read_concurrency_limit_by_tag(tag)
            holders = []
            for run_id in limit.active_slots[:3]:
                run = await client.read_task_run(run_id)
                owner = (await client.read_flow_run(run.flow_run_id)).name if run.flow_run_id else "?"
                holders.append(
                    f"task run {run.name!r} ({run.id}, {run.state_name}) of flow run "
                    f"{owner!r} ({run.flow_run_id})"
                )
        held_by = "; ".join(holders) or "no task run (being granted)"
    except Exception as exc:  # the report must not break the wait it reports on
        held_by = f"unknown ({type(exc).__name__}: {exc})"
    _run_logger().warning(
        "waited %.0f s for the manifest lock %r, held by %s; %s", waited, tag, held_by,
        TAG_SLOT_LEASE_NOTE,
    )


def _run_logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:
        return logger


LLM_IN_FLIGHT_LIMIT = "llm-in-flight"
LLM_RATE_LIMIT = "llm-rate"


async def ensure_llm_limits(
    max_in_flight: int = 100, requests_per_minute: int = 3000, *, update_existing: bool = True
) -> tuple[int, int]:
    """The limits LLM calls take slots of, shared by all runs of one account; returns the
    sizes in force on the server (in flight, rate burst).

    `llm-in-flight` caps calls in flight; `llm-rate` is a rate limit (slots decay at
    requests_per_minute / 60 per second; its size, the burst, is at most `max_in_flight`).
    """
    in_flight, rate = await asyncio.gather(
        ensure_concurrency_limit(
            LLM_IN_FLIGHT_LIMIT, max_in_flight, update_existing=update_existing,
            purpose="the LLM limits",
        ),
        ensure_concurrency_limit(
            LLM_RATE_LIMIT, max(1, min(requests_per_minute, max_in_flight)),
            slot_decay_per_second=requests_per_minute / 60, update_existing=update_existing,
            purpose="the LLM limits",
        ),
    )
    return in_flight, rate


def _start_slot_services() -> None:
    """Start the Prefect services that acquire the LLM limits' slots, from a worker thread.
    Prefect starts one on its first use by blocking the calling thread until its own event
    loop thread has started it (`QueueService._new_instance`); from the flow's event loop
    that held the loop for 30-120 ms while a run started (bench/end_to_end.py --stall-log).
    Started here, the calls on the loop find them running."""
    ConcurrencySlotAcquisitionWithLeaseService.instance(frozenset([LLM_IN_FLIGHT_LIMIT]))
    ConcurrencySlotAcquisitionService.instance(frozenset([LLM_RATE_LIMIT]))


class LLMSlots:
    """Caps LLM calls in flight and their rate through Prefect limits, without a server
    round trip per call.

    Prefect 3.8.8 serializes slot acquisitions per limit (one at a time, ~0.1-0.7 s each
    here), so a slot per call would make 100 concurrent calls wait tens of seconds. Instead
    a run takes its `capacity` of `llm-in-flight` slots once (`open()` at flow start, or
    the first call) and holds them under a renewed lease until it ends; `llm-rate` slots
    are taken `capacity` at a time. Each call takes only local tokens. Runs together never
    exceed the limits. `open()` waits for the slots (up to `timeout`) while another run
    holds them all.

    Rate blocks after the first are paced: one is asked for only once its slots have decayed
    since the last grant. On Prefect 3.8.8 a refused request resets the limit's decay clock
    (the refusal updates the row, whose `updated` stamp the decay counts from, without
    applying the decay), so asking early, and retrying after the 423 as Prefect does, cost
    up to twice the wait: 100-slot blocks at 50/s took 2.4-4.1 s instead of 2 s, and 1000
    calls under the default limits 25.9 s instead of 19.8 s (measured).
    """

    def __init__(self, capacity: int, *, timeout: float = 600.0, lease_seconds: float = 120.0) -> None:
        self.capacity = capacity
        self.timeout = timeout
        # The held slots' lease, renewed while the run lives: after a crash (SIGKILL) the
        # slots come back to the other runs this long after the last renewal. The server
        # refuses leases under 60 s (422).
        self.lease_seconds = max(60.0, lease_seconds)
        self._local = asyncio.Semaphore(capacity)
        self._holder: asyncio.Task[None] | None = None
        self._release = asyncio.Event()
        self._hold_lock = asyncio.Lock()
        self._rate_lock = asyncio.Lock()
        self._rate_tokens = 0
        self._decay_per_second: float | None = None  # llm-rate's, read at the first refill
        self._granted_at: float | None = None  # loop time of the last block granted

    async def __aenter__(self) -> LLMSlots:
        return self

    async def open(self) -> LLMSlots:
        """Take the run's slots now, before its task runs load the server (on SQLite a slot
        request that collides with that load gets a 503 and a 2 s client backoff)."""
        await asyncio.to_thread(_start_slot_services)
        try:
            # One after the other: on SQLite two slot increments at once collide ("database
            # is locked" at once, not after the busy timeout: both transactions read before
            # writing), and the loser's client backs off 2 s (bench/manifest_lock.py).
            await self._hold_in_flight_slots()
            await self._take_rate_block()
        except TimeoutError:
            pass  # nothing free yet; calls wait for it (bounded) and fail with a reason
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._release.set()
        if self._holder is not None:
            await self._holder

    @asynccontextmanager
    async def call(self) -> AsyncIterator[None]:
        try:
            await self._hold_in_flight_slots()
            await self._take_rate_token()
        except TimeoutError:
            raise InvoiceFailure(
                "llm_slot_timeout",
                f"no LLM slot within {self.timeout:g} s (limits {LLM_IN_FLIGHT_LIMIT!r} and "
                f"{LLM_RATE_LIMIT!r} are shared by every run)",
                retryable=True,
            ) from None
        async with self._local:
            yield

    async def _hold_in_flight_slots(self) -> None:
        async with self._hold_lock:
            if self._holder is None:
                held = asyncio.get_running_loop().create_future()
                self._holder = asyncio.create_task(self._hold(held), name="llm-slots")
                try:
                    await held
                except BaseException:
                    self._holder = None  # not held: the next call tries again
                    raise

    async def _hold(self, held: asyncio.Future[None]) -> None:
        # One task enters and exits Prefect's concurrency context (it holds a cancel scope
        # for lease renewal, which must be exited by the task that entered it).
        try:
            async with concurrency(LLM_IN_FLIGHT_LIMIT, occupy=self.capacity,
                                   timeout_seconds=self.timeout, strict=True,
                                   lease_duration=self.lease_seconds):
                held.set_result(None)
                await self._release.wait()
        except BaseException as exc:
            if not held.done():
                held.set_exception(exc)
                return
            raise

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
        await rate_limit(LLM_RATE_LIMIT, occupy=self.capacity, timeout_seconds=self.timeout,
                         strict=True)
        self._granted_at = loop.time()
        self._rate_tokens = self.capacity

    async def _rate_decay_per_second(self) -> float:
        if self._decay_per_second is None:
            try:
                async with get_client() as client:
                    limit = await client.read_global_concurrency_limit_by_name(LLM_RATE_LIMIT)
            except (httpx.HTTPError, ObjectNotFound, OSError, RuntimeError) as exc:
                # Pacing only saves time; unpaced, Prefect's retries still keep the limit.
                logger.warning("cannot read the %r limit (%r); this refill is not paced",
                               LLM_RATE_LIMIT, exc)
                return 0.0
            self._decay_per_second = limit.slot_decay_per_second or 0.0
        return self._decay_per_second
