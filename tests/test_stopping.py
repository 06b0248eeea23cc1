"""Stopping on SIGINT/SIGTERM: what starts, what finishes within the grace period, what is
abandoned; real signals sent to this process."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from tasks.stopping import StopRequest


async def test_after_a_stop_nothing_starts_and_work_in_flight_finishes_within_the_grace():
    stop = StopRequest(grace_seconds=5)
    started = []

    async def work(name: str, seconds: float) -> str:
        started.append(name)
        await asyncio.sleep(seconds)
        return name

    in_flight = asyncio.ensure_future(stop.guard(work("in flight", 0.2)))
    await asyncio.sleep(0.05)
    stop.request(signal.SIGTERM)
    assert await stop.guard(work("too late", 0)) is None
    assert await in_flight == "in flight"
    assert started == ["in flight"] and stop.signal == signal.SIGTERM and stop.abandoned == 0


async def test_work_still_running_when_the_grace_ends_is_abandoned():
    stop = StopRequest(grace_seconds=0.2)
    cancelled = asyncio.Event()

    async def slow() -> str:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    running = asyncio.ensure_future(stop.guard(slow()))
    await asyncio.sleep(0.05)
    loop = asyncio.get_running_loop()
    stop.request(signal.SIGINT)
    began = loop.time()
    assert await running is None
    assert 0.1 < loop.time() - began < 2 and cancelled.is_set() and stop.abandoned == 1


async def test_a_second_signal_abandons_at_once():
    stop = StopRequest(grace_seconds=60)
    running = asyncio.ensure_future(stop.guard(asyncio.sleep(30, result="never")))
    await asyncio.sleep(0.05)
    stop.request(signal.SIGTERM)
    stop.request(signal.SIGTERM)
    assert await asyncio.wait_for(running, 2) is None


async def test_the_callers_own_cancellation_is_not_swallowed():
    stop = StopRequest(grace_seconds=60)
    running = asyncio.ensure_future(stop.guard(asyncio.sleep(30)))
    await asyncio.sleep(0.05)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_real_signals_are_handled_while_installed_and_the_old_handlers_come_back(signum):
    before = signal.getsignal(signum)
    stop = StopRequest(grace_seconds=5)
    with stop.on_signals():
        os.kill(os.getpid(), signum)
        for _ in range(100):
            if stop.requested:
                break
            await asyncio.sleep(0.01)
        assert stop.signal == signum
    assert signal.getsignal(signum) == before
