"""Prefect limits the pipeline relies on, against a real (test harness) Prefect server."""

from __future__ import annotations

import asyncio
import threading

import httpx

import pytest
from prefect.client.orchestration import get_client
from prefect.concurrency.services import (
    ConcurrencySlotAcquisitionService,
    ConcurrencySlotAcquisitionWithLeaseService,
)

from tasks.limits import LLM_IN_FLIGHT_LIMIT, LLMSlots, ensure_llm_limits

pytestmark = pytest.mark.usefixtures("prefect_harness")


async def test_two_runs_together_stay_within_the_shared_in_flight_limit():
    """Two runs (two LLMSlots) asking for 3 slots each of a limit of 4: the second waits for
    the first to end, so calls in flight across both never exceed the limit."""
    await ensure_llm_limits(max_in_flight=4, requests_per_minute=60_000)
    in_flight = peak = 0

    async def run(name: str, calls: int) -> None:
        nonlocal in_flight, peak
        async with LLMSlots(3, timeout=60) as slots:

            async def call() -> None:
                nonlocal in_flight, peak
                async with slots.call():
                    in_flight += 1
                    peak = max(peak, in_flight)
                    await asyncio.sleep(0.2)
                    in_flight -= 1

            await asyncio.gather(*(call() for _ in range(calls)))

    try:
        await asyncio.gather(run("first", 6), run("second", 6))
        # The limit admits one run's 3 slots at a time (3 + 3 > 4): calls never overlap,
        # where without the shared limit 6 would be in flight at once.
        assert peak == 3
        async with get_client() as client:
            limit = await client.read_global_concurrency_limit_by_name(LLM_IN_FLIGHT_LIMIT)
        assert limit.active_slots == 0, "both runs gave their slots back"
    finally:
        await ensure_llm_limits()


async def test_a_run_that_cannot_get_slots_fails_its_calls_with_a_reason():
    from tasks.errors import InvoiceFailure

    await ensure_llm_limits(max_in_flight=2, requests_per_minute=60_000)
    try:
        async with LLMSlots(2, timeout=60) as holder:
            await holder.open()
            async with LLMSlots(2, timeout=1) as starved:
                with pytest.raises(InvoiceFailure) as caught:
                    async with starved.call():
                        pass
        assert caught.value.code == "llm_slot_timeout"
    finally:
        await ensure_llm_limits()


async def calls_on_a_small_rate_limit(monkeypatch, calls: int, **client_methods) -> None:
    """`calls` LLM calls through one run's `LLMSlots(4)`, on a rate limit of 4 slots refilled
    at 20/s (0.2 s per block). `client_methods` replace methods of Prefect's concurrency-limit
    client once the first block is taken (that one may wait for slots earlier tests left)."""
    from prefect.client.orchestration._concurrency_limits.client import (
        ConcurrencyLimitAsyncClient,
    )

    await ensure_llm_limits(max_in_flight=4, requests_per_minute=20 * 60)
    try:
        async with LLMSlots(4, timeout=60) as slots:
            await slots.open()
            with monkeypatch.context() as patched:
                for name, method in client_methods.items():
                    patched.setattr(ConcurrencyLimitAsyncClient, name, method)

                async def call() -> None:
                    async with slots.call():
                        pass

                await asyncio.gather(*(call() for _ in range(calls)))
    finally:
        await ensure_llm_limits()


async def test_a_run_alone_on_the_rate_limit_is_never_refused_a_block(monkeypatch):
    """On Prefect 3.8.8 a refused slot request resets the rate limit's decay clock, so each
    block after the first is asked for only once its slots have decayed: a run alone on the
    limit then gets every later block at the first request (no 423)."""
    from prefect.client.orchestration._concurrency_limits.client import (
        ConcurrencyLimitAsyncClient,
    )

    refused: list[int] = []
    real_increment = ConcurrencyLimitAsyncClient.increment_concurrency_slots

    async def increment(self, *args, **kwargs):
        try:
            return await real_increment(self, *args, **kwargs)
        except httpx.HTTPStatusError as exc:
            refused.append(exc.response.status_code)
            raise

    await calls_on_a_small_rate_limit(monkeypatch, 12, increment_concurrency_slots=increment)
    assert refused == []  # three blocks, each granted at the first request


async def test_refills_go_on_unpaced_when_the_rate_limit_cannot_be_read(monkeypatch, caplog):
    async def unreadable(self, name):
        raise httpx.ConnectError("the server is gone")

    # A second block, asked for without pacing: the calls still go through.
    await calls_on_a_small_rate_limit(
        monkeypatch, 8, read_global_concurrency_limit_by_name=unreadable
    )
    assert "this refill is not paced" in caplog.text


async def test_open_starts_prefects_slot_services_off_the_event_loop(monkeypatch):
    """Prefect starts a slot service by blocking the calling thread until its own loop has
    started it; `open()` must do that from a worker thread, never from the event loop."""
    from prefect._internal.concurrency.services import _QueueServiceBase

    started_on: list[tuple[str, bool]] = []
    new_instance = _QueueServiceBase._new_instance.__func__

    def recording(cls, *args):
        started_on.append((cls.__name__, threading.get_ident() == loop_thread))
        return new_instance(cls, *args)

    loop_thread = threading.get_ident()
    monkeypatch.setattr(_QueueServiceBase, "_new_instance", classmethod(recording))
    # Services left running by earlier tests would hide the start: begin with none.
    for service in (ConcurrencySlotAcquisitionService, ConcurrencySlotAcquisitionWithLeaseService):
        for instance in list(service._instances.values()):
            instance._remove_instance()
    await ensure_llm_limits(max_in_flight=4, requests_per_minute=60_000)
    try:
        async with LLMSlots(2, timeout=60) as slots:
            await slots.open()
            async with slots.call():
                pass
        slot_services = [(name, on_loop) for name, on_loop in started_on
                         if name.startswith("ConcurrencySlotAcquisition")]
        assert sorted(slot_services) == [("ConcurrencySlotAcquisitionService", False),
                                         ("ConcurrencySlotAcquisitionWithLeaseService", False)]
    finally:
        await ensure_llm_limits()
