"""Prefect limits the pipeline relies on, against a real (test harness) Prefect server."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import pytest
from prefect import flow
from prefect.client.orchestration import PrefectClient, get_client
from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError, concurrency
from prefect.states import Completed, Running

from tasks.orchestration.limits import (
    AT_LABEL,
    HELD_LABEL,
    LLM_IN_FLIGHT_LIMIT,
    WANTED_LABEL,
    LLMRunUse,
    LLMSlots,
    describe_llm_holders,
    ensure_llm_limits,
    fair_shares,
    live_runs,
    publish_llm_use,
    share_cap,
)

pytestmark = pytest.mark.usefixtures("prefect_harness")


# -- fair shares, without Prefect ----------------------------------------------------------


def test_a_run_alone_gets_all_it_wants_up_to_the_limit():
    assert fair_shares(10, {"a": 4}) == {"a": 4}
    assert fair_shares(10, {"a": 25}) == {"a": 10}


def test_two_equal_wants_split_the_limit():
    assert fair_shares(10, {"a": 8, "b": 8}) == {"a": 5, "b": 5}
    assert fair_shares(4, {"a": 4, "b": 4}) == {"a": 2, "b": 2}
    # An odd unit goes to the first key in sorted order: every run computes the same.
    assert fair_shares(5, {"b": 9, "a": 9}) == {"a": 3, "b": 2}


def test_a_small_want_is_served_in_full_and_the_rest_goes_to_the_big_one():
    assert fair_shares(100, {"big": 100, "small": 3}) == {"big": 97, "small": 3}
    assert fair_shares(10, {"a": 1, "b": 2, "c": 20}) == {"a": 1, "b": 2, "c": 7}


def test_zero_wants_get_nothing():
    assert fair_shares(10, {}) == {}
    assert fair_shares(10, {"a": 0, "b": 0}) == {"a": 0, "b": 0}
    assert fair_shares(10, {"a": 0, "b": 6}) == {"a": 0, "b": 6}
    assert fair_shares(0, {"a": 5}) == {"a": 0}


def test_shares_never_sum_over_the_limit_nor_over_a_want():
    import random

    rng = random.Random(7)
    for _ in range(2000):
        limit = rng.randint(0, 40)
        wanted = {f"run{i}": rng.randint(0, 30) for i in range(rng.randint(0, 8))}
        shares = fair_shares(limit, wanted)
        assert sum(shares.values()) == min(limit, sum(wanted.values()))
        assert all(0 <= shares[key] <= wanted[key] for key in wanted)
        # Max-min fair: a run short of its want has at least as much as any other run
        # has, give or take the one unit that cannot be split.
        for key, share in shares.items():
            if share < wanted[key]:
                assert all(other <= share + 1 for other in shares.values())


def test_a_runs_cap_is_its_share_were_it_to_want_its_max():
    """And it gives back down to it only while another run wants more than it holds."""
    others = {"b": LLMRunUse("b-run", held=0, wanted=4)}
    assert share_cap(4, "a", 4, others) == (2, True)
    # Its own labels are replaced by what it could use (its max).
    assert share_cap(4, "a", 4, {**others, "a": LLMRunUse("a-run", 4, 1)}) == (2, True)
    assert share_cap(4, "a", 4, {"b": LLMRunUse("b-run", held=2, wanted=2)}) == (2, False)
    assert share_cap(100, "a", 100, {}) == (100, False)
    assert share_cap(100, "a", 100, {"b": LLMRunUse("b-run", 3, 3)}) == (97, False)


def test_holders_are_named_by_flow_run_and_the_rest_is_said():
    runs = {
        "id-1": LLMRunUse("crimson-fox", 3, 3),
        "id-2": LLMRunUse("quiet-owl", 1, 2),
        "me": LLMRunUse("me", 0, 4),
    }
    text = describe_llm_holders(6, runs, own_id="me")
    assert text == (
        "flow run 'crimson-fox' (id-1) 3 slots; flow run 'quiet-owl' (id-2) 1 "
        "slots; 2 slots by runs that do not publish their use"
    )
    assert describe_llm_holders(4, {}) == "runs that do not publish their use"


def test_labels_not_said_again_for_long_are_a_dead_run_and_do_not_count():
    """A run killed without a word stays RUNNING; its labels stop being renewed."""
    now = 1_000_000.0
    runs = {
        "live": LLMRunUse("live", 2, 4, at=now - 20),
        "dead": LLMRunUse("dead", 2, 4, at=now - 200),
        "no-time": LLMRunUse("no-time", 1, 1),
    }
    assert set(live_runs(runs, now)) == {"live", "no-time"}
    text = describe_llm_holders(5, {"dead": LLMRunUse("ghost", 3, 3, at=1.0)})
    assert text.startswith("flow run 'ghost' (dead) 3 slots (not heard from for ")


# -- against the server ----------------------------------------------------------------------


@flow(name="llm-slots-test-run")
def _a_run() -> None:
    pass


async def running_flow_run(client, name: str):
    """A flow run in state RUNNING (as a run using LLM slots would be)."""
    run = await client.create_flow_run(_a_run, name=f"{name}-{uuid.uuid4().hex[:6]}")
    await client.set_flow_run_state(run.id, Running(), force=True)
    return run


async def until(condition: Callable[[], object], timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.05)


async def active_slots(client) -> int:
    return (await client.read_global_concurrency_limit_by_name(LLM_IN_FLIGHT_LIMIT)).active_slots


@dataclass
class HeldCalls:
    """Calls through an `LLMSlots`, each in flight (holding its token) until `end()`."""

    release: asyncio.Event
    tasks: list[asyncio.Task[None]]

    async def end(self) -> None:
        self.release.set()
        await asyncio.gather(*self.tasks)


async def hold_calls(slots: LLMSlots, count: int, what: str, timeout: float = 20) -> HeldCalls:
    """`count` calls through `slots`, returned once all of them are in flight."""
    release = asyncio.Event()
    running = 0

    async def call() -> None:
        nonlocal running
        async with slots.call():
            running += 1
            await release.wait()

    tasks = [asyncio.create_task(call()) for _ in range(count)]
    try:
        await until(lambda: running == count, timeout, what)
    except BaseException:
        for task in tasks:
            task.cancel()
        raise
    return HeldCalls(release, tasks)


async def test_two_runs_together_stay_within_the_shared_in_flight_limit():
    """Two runs (two LLMSlots of capacity 3) with 6 calls each on a limit of 4: both go
    ahead, and calls in flight across both never exceed the limit."""
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
        # Without the shared limit 6 would be in flight at once.
        assert 3 <= peak <= 4
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
            await holder.open(expected=2)  # holds both slots until it ends
            await until(lambda: holder.held == 2, 10, "the holder holds both slots")
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
    await ensure_llm_limits(max_in_flight=4, requests_per_minute=20 * 60)
    try:
        async with LLMSlots(4, timeout=60) as slots:
            await slots.open()
            with monkeypatch.context() as patched:
                for name, method in client_methods.items():
                    patched.setattr(PrefectClient, name, method)

                async def call() -> None:
                    async with slots.call():
                        pass

                await asyncio.gather(*(call() for _ in range(calls)))
    finally:
        await ensure_llm_limits()


async def test_a_run_alone_on_the_rate_limit_is_never_refused_a_block(monkeypatch):
    """A refused slot request resets the rate limit's decay clock on the server, so each
    block after the first is asked for only once its slots have decayed: a run alone on the
    limit then gets every later block at the first request (no 423)."""
    refused: list[int] = []
    real_increment = PrefectClient.increment_concurrency_slots

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


async def test_a_refused_block_request_is_told_from_a_failure():
    """`LLMSlots` asks for a block with `concurrency(..., max_retries=0)`: a refusal (no room
    now: poll again) and a failure (no such limit: fail the waiting calls) both raise
    Prefect's `ConcurrencySlotAcquisitionError`, told apart by `_is_refusal`. If Prefect stops
    chaining the server's 423 to it, this fails, rather than every wait failing its calls."""
    from tasks.orchestration.llm_slots import _is_refusal

    await ensure_llm_limits(max_in_flight=2, requests_per_minute=60_000)
    try:
        async with concurrency(
            LLM_IN_FLIGHT_LIMIT, occupy=2, timeout_seconds=30, strict=True, lease_duration=60
        ):
            with pytest.raises(ConcurrencySlotAcquisitionError) as refused:
                async with concurrency(
                    LLM_IN_FLIGHT_LIMIT,
                    occupy=1,
                    timeout_seconds=30,
                    max_retries=0,
                    strict=True,
                    lease_duration=60,
                ):
                    pytest.fail("granted a slot of a full limit")
        assert _is_refusal(refused.value), repr(refused.value.__cause__)

        with pytest.raises(ConcurrencySlotAcquisitionError) as failed:
            async with concurrency(
                f"llm-no-such-limit-{uuid.uuid4().hex[:8]}",
                occupy=1,
                timeout_seconds=30,
                max_retries=0,
                strict=True,
                lease_duration=60,
            ):
                pytest.fail("granted a slot of a limit that does not exist")
        assert not _is_refusal(failed.value)
    finally:
        await ensure_llm_limits()


async def test_a_run_holds_slots_for_the_calls_it_has_and_gives_them_back_when_idle():
    """2 calls in flight on a limit of 10 (the run could take 10): 2 slots held while they
    run, none once they have ended and the idle delay has passed, the LLMSlots still open."""
    await ensure_llm_limits(max_in_flight=10, requests_per_minute=60_000)
    try:
        async with get_client() as client, LLMSlots(10, timeout=60) as slots:
            await slots.open()
            assert await active_slots(client) == 0, "open() without expected work takes none"
            calls = await hold_calls(slots, 2, "both calls got a slot")
            seen = []
            for _ in range(6):  # over 1.2 s: no growth past the demand
                seen.append(await active_slots(client))
                await asyncio.sleep(0.2)
            assert seen == [2] * 6 and slots.held == 2
            await calls.end()
            loop = asyncio.get_running_loop()
            ended = loop.time()
            while await active_slots(client) and loop.time() - ended < 10:
                await asyncio.sleep(0.2)
            assert await active_slots(client) == 0 and slots.held == 0
            assert loop.time() - ended >= slots.idle_seconds - 0.3  # not before the delay
            async with slots.call():  # and it takes a slot again when a call comes
                assert slots.held == 1
    finally:
        await ensure_llm_limits()


async def test_two_runs_share_the_limit_and_the_later_one_is_not_starved():
    """Run A keeps 8 calls of 1 s going on a limit of 4 and takes all 4 slots; run B comes
    then with 8 calls. A gives back down to its fair share (2), B gets its 2 and finishes
    while A is still busy, A takes all 4 again once B is done; never more than 4 calls in
    flight, never more than 4 slots held."""
    await ensure_llm_limits(max_in_flight=4, requests_per_minute=60_000)
    in_flight = {"a": 0, "b": 0}
    peaks = {"a": 0, "b": 0}
    total_peak = 0
    samples: list[int] = []
    b_calls_done = 0
    stop_a = asyncio.Event()

    async def one(slots: LLMSlots, name: str) -> None:
        nonlocal total_peak
        async with slots.call():
            in_flight[name] += 1
            peaks[name] = max(peaks[name], in_flight[name])
            total_peak = max(total_peak, sum(in_flight.values()))
            await asyncio.sleep(1.0)
            in_flight[name] -= 1

    async def a_worker(slots: LLMSlots) -> None:
        while not stop_a.is_set():
            await one(slots, "a")

    async def b_call(slots: LLMSlots) -> None:
        nonlocal b_calls_done
        await one(slots, "b")
        b_calls_done += 1

    async with get_client() as client:
        run_a = await running_flow_run(client, "llm-share-a")
        run_b = await running_flow_run(client, "llm-share-b")
        stop_sampling = asyncio.Event()

        async def sample() -> None:
            while not stop_sampling.is_set():
                samples.append(await active_slots(client))
                await asyncio.sleep(0.25)

        sampler = asyncio.create_task(sample())
        try:
            async with LLMSlots(4, timeout=120, flow_run_id=run_a.id, share_every=1.0) as a:
                a_workers = [asyncio.create_task(a_worker(a)) for _ in range(8)]
                await until(lambda: in_flight["a"] == 4, 15, "alone, A takes the whole limit")
                async with LLMSlots(4, timeout=120, flow_run_id=run_b.id, share_every=1.0) as b:
                    async with asyncio.timeout(60):  # starved, B would wait for A's end
                        await asyncio.gather(*(b_call(b) for _ in range(8)))
                assert not any(worker.done() for worker in a_workers)
                # B's labels now say it holds and wants nothing: A takes the limit again.
                await until(
                    lambda: in_flight["a"] == 4, 20, "with B gone, A takes the whole limit again"
                )
                stop_a.set()
                await asyncio.gather(*a_workers)
        finally:
            stop_a.set()
            stop_sampling.set()
            await sampler
            for run in (run_a, run_b):
                await client.set_flow_run_state(run.id, Completed(), force=True)
            await ensure_llm_limits()

    assert b_calls_done == 8
    assert peaks["b"] == 2, "B got its fair share (2 of 4), not just what A left over"
    assert total_peak <= 4 and max(samples) <= 4, "the runs together never exceed the limit"


async def test_a_run_killed_without_a_word_does_not_keep_its_share():
    """A RUNNING flow run whose labels say it wants the whole limit, but said so long ago
    (it was SIGKILLed): a live run alone gets all it wants regardless."""
    import time

    await ensure_llm_limits(max_in_flight=4, requests_per_minute=60_000)
    async with get_client() as client:
        ghost = await running_flow_run(client, "llm-ghost")
        live = await running_flow_run(client, "llm-live")
        await client.update_flow_run_labels(
            ghost.id, {HELD_LABEL: 0, WANTED_LABEL: 4, AT_LABEL: int(time.time()) - 600}
        )
        try:
            async with LLMSlots(4, timeout=60, flow_run_id=live.id, share_every=0.5) as slots:
                calls = await hold_calls(slots, 4, "the live run got all 4 slots")
                await asyncio.sleep(1.5)  # several share refreshes: it keeps them
                assert slots.held == 4 and slots._cap == 4
                # Said again now, the same labels count: the live run is capped at half.
                await publish_llm_use(client, ghost.id, 0, 4)
                await until(
                    lambda: slots._cap == 2 and slots._kept() == 2,
                    10,
                    "the live run gives back down to its share",
                )
                assert slots.held == 4  # once the calls on those slots have ended
                await calls.end()
                await until(lambda: slots.held <= 2, 10, "the live run gave back 2 slots")
        finally:
            for run in (ghost, live):
                await client.set_flow_run_state(run.id, Completed(), force=True)
            await ensure_llm_limits()


async def test_a_run_waiting_for_slots_says_who_holds_them(caplog):
    """The limit is full, held by a run that publishes its use: a run waiting for a slot
    logs, every `report_every` s, how long it has waited, the limit's use, and the holder's
    flow run name and id."""
    caplog.set_level(logging.WARNING, logger="tasks.orchestration.llm_slots")
    await ensure_llm_limits(max_in_flight=4, requests_per_minute=60_000)
    async with get_client() as client:
        holder_run = await running_flow_run(client, "llm-holder")
        try:
            async with LLMSlots(4, timeout=60, flow_run_id=holder_run.id) as holder:
                holding = await hold_calls(holder, 4, "the holder holds the limit")
                assert holder.held == 4
                for _ in range(100):  # its labels say so within ~2 s
                    labels = (await client.read_flow_run(holder_run.id)).labels
                    if labels.get(HELD_LABEL) == 4:
                        break
                    await asyncio.sleep(0.1)
                assert labels.get(HELD_LABEL) == 4 and labels.get(WANTED_LABEL) == 4
                assert isinstance(labels.get(AT_LABEL), int)

                async with LLMSlots(2, timeout=30, report_every=2.0) as waiter:

                    async def wait_for_a_slot() -> None:
                        async with waiter.call():
                            pass

                    waiting = asyncio.create_task(wait_for_a_slot())

                    def reports() -> list[str]:
                        return [
                            r.getMessage()
                            for r in caplog.records
                            if r.levelno == logging.WARNING and r.getMessage().startswith("waited")
                        ]

                    await until(lambda: len(reports()) >= 2, 12, "two reports of the wait")
                    assert not waiting.done()
                    first, second = reports()[:2]
                    assert f"flow run {holder_run.name!r} ({holder_run.id}) 4 slots" in first
                    assert "'llm-in-flight' 4 of 4 in use" in first
                    waits = [int(text.split()[1]) for text in (first, second)]
                    assert 2 <= waits[0] <= 3 and 1 <= waits[1] - waits[0] <= 3, waits
                    await holding.end()
                    await waiting  # the holder gives its slots back once idle
        finally:
            await client.set_flow_run_state(holder_run.id, Completed(), force=True)
            await ensure_llm_limits()


async def test_the_wait_report_never_breaks_the_wait(monkeypatch, caplog):
    from tasks.orchestration.limits import report_llm_slot_wait

    async def unreadable(self, name):
        raise httpx.ConnectError("the server is gone")

    monkeypatch.setattr(PrefectClient, "read_global_concurrency_limit_by_name", unreadable)
    caplog.set_level(logging.WARNING, logger="tasks.orchestration.llm_slots")
    await report_llm_slot_wait(10.2)
    assert (
        "waited 10 s for LLM slots ('llm-in-flight' use unknown), held by unknown "
        "(ConnectError: the server is gone)" in caplog.text
    )
