"""Prefect concurrency limits the pipeline depends on, made sure of before they are needed.

A tag limit that does not exist on the server is silently not enforced (tagged task runs
go ahead unlimited with only a warning), so the flow creates or repairs the `manifest`
limit before the first manifest write and refuses to run when it cannot.
"""

from __future__ import annotations

import asyncio
import logging

import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
)
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.settings import PREFECT_API_URL

from tasks.logs import run_logger

# The LLM limits' slots live in tasks/orchestration/llm_slots.py; re-exported here.
from tasks.orchestration.llm_slots import (  # noqa: F401
    AT_LABEL,
    HELD_LABEL,
    LLM_IN_FLIGHT_LIMIT,
    LLM_RATE_LIMIT,
    WANTED_LABEL,
    LLMRunUse,
    LLMSlots,
    describe_llm_holders,
    fair_shares,
    live_runs,
    publish_llm_use,
    read_llm_runs,
    report_llm_slot_wait,
    share_cap,
)

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
                            name=name,
                            limit=limit,
                            active=True,
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


# Prefect's task engine gives a tag-limit slot a fixed 60 s lease (not configurable); the
# server's repossessor frees expired ones every 15 s (PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS).
TAG_SLOT_LEASE_NOTE = (
    "a holder that died keeps it until its 60 s slot lease runs out (+ up to 15 s)"
)


async def report_manifest_lock_wait(tag: str, waited: float) -> None:
    """Say who holds the manifest lock `tag` while this run waits for it (never silent):
    the task run and its flow run, by name and id."""
    try:
        async with get_client() as client:
            limit = await client.read_concurrency_limit_by_tag(tag)
            holders = []
            for run_id in limit.active_slots[:3]:
                run = await client.read_task_run(run_id)
                owner = (
                    (await client.read_flow_run(run.flow_run_id)).name if run.flow_run_id else "?"
                )
                holders.append(
                    f"task run {run.name!r} ({run.id}, {run.state_name}) of flow run "
                    f"{owner!r} ({run.flow_run_id})"
                )
        held_by = "; ".join(holders) or "no task run (being granted)"
    except Exception as exc:  # the report must not break the wait it reports on
        held_by = f"unknown ({type(exc).__name__}: {exc})"
    run_logger(logger).warning(
        "waited %.0f s for the manifest lock %r, held by %s; %s",
        waited,
        tag,
        held_by,
        TAG_SLOT_LEASE_NOTE,
    )


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
            LLM_IN_FLIGHT_LIMIT,
            max_in_flight,
            update_existing=update_existing,
            purpose="the LLM limits",
        ),
        ensure_concurrency_limit(
            LLM_RATE_LIMIT,
            max(1, min(requests_per_minute, max_in_flight)),
            slot_decay_per_second=requests_per_minute / 60,
            update_existing=update_existing,
            purpose="the LLM limits",
        ),
    )
    return in_flight, rate
