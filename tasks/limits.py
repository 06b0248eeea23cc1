"""Prefect concurrency limits the pipeline depends on, made sure of before they are needed.

A tag limit that does not exist on the server is silently not enforced (tagged task runs
go ahead unlimited with only a warning), so the flow creates or repairs the `manifest`
limit before the first manifest write and refuses to run when it cannot.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager

import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
)
from prefect.concurrency.asyncio import concurrency, rate_limit
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.settings import PREFECT_API_URL

from tasks.errors import InvoiceFailure
from tasks.manifest import MANIFEST_TAG


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
) -> None:
    """Create the global concurrency limit `name`, or (with `update_existing`) repair its
    limit, decay and active flag; without it an existing limit is left as the operator set it
    (it is still re-activated: an inactive limit is not enforced)."""
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
                    return
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
    except (httpx.HTTPError, OSError, RuntimeError) as exc:
        api = PREFECT_API_URL.value() or "the ephemeral local server"
        raise LockUnavailableError(
            f"cannot set up the concurrency limit {name!r} (limit {limit}) on the Prefect API at "
            f"{api}: {type(exc).__name__}: {exc}. Refusing to run without the manifest lock."
        ) from exc


async def ensure_manifest_lock() -> None:
    await ensure_concurrency_limit(tag_limit_name(MANIFEST_TAG), 1)


LLM_IN_FLIGHT_LIMIT = "llm-in-flight"
LLM_RATE_LIMIT = "llm-rate"


async def ensure_llm_limits(
    max_in_flight: int = 100, requests_per_minute: int = 3000, *, update_existing: bool = True
) -> None:
    """The limits every LLM call takes a slot of, shared by all runs of one account.

    `llm-in-flight` caps calls in flight; `llm-rate` is a rate limit (slots decay at
    requests_per_minute / 60 per second; its size, the burst, is at most `max_in_flight`).
    """
    await ensure_concurrency_limit(
        LLM_IN_FLIGHT_LIMIT, max_in_flight, update_existing=update_existing
    )
    await ensure_concurrency_limit(
        LLM_RATE_LIMIT, max(1, min(requests_per_minute, max_in_flight)),
        slot_decay_per_second=requests_per_minute / 60, update_existing=update_existing,
    )


def llm_call_guard(timeout: float = 600.0) -> Callable[[], AbstractAsyncContextManager[None]]:
    """Around each LLM HTTP call: a `llm-rate` slot, then a `llm-in-flight` slot held for the
    call. Waiting for slots is bounded; running out of time is a recorded failure."""

    @asynccontextmanager
    async def guard() -> AsyncIterator[None]:
        async with AsyncExitStack() as held:
            try:
                await rate_limit(LLM_RATE_LIMIT, occupy=1, timeout_seconds=timeout, strict=True)
                await held.enter_async_context(
                    concurrency(LLM_IN_FLIGHT_LIMIT, occupy=1, timeout_seconds=timeout, strict=True)
                )
            except TimeoutError:
                raise InvoiceFailure(
                    "llm_slot_timeout",
                    f"no LLM slot within {timeout:g} s (limits {LLM_IN_FLIGHT_LIMIT!r} and "
                    f"{LLM_RATE_LIMIT!r} are shared by every run)",
                    retryable=True,
                ) from None
            yield

    return guard
