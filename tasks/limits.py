"""Prefect concurrency limits the pipeline depends on, made sure of before they are needed.

A tag limit that does not exist on the server is silently not enforced (tagged task runs
go ahead unlimited with only a warning), so the flow creates or repairs the `manifest`
limit before the first manifest write and refuses to run when it cannot.
"""

from __future__ import annotations

import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
)
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.settings import PREFECT_API_URL

from tasks.manifest import MANIFEST_TAG


class LockUnavailableError(RuntimeError):
    """The orchestrator-side lock could not be set up; the run must not go ahead unlocked."""


def tag_limit_name(tag: str) -> str:
    # Prefect 3 enforces a task tag's limit through the global concurrency limit "tag:<tag>".
    return f"tag:{tag}"


async def ensure_concurrency_limit(name: str, limit: int) -> None:
    """Create the global concurrency limit `name` with `limit` slots, or repair it (limit, active)."""
    try:
        async with get_client() as client:
            try:
                existing = await client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                try:
                    await client.create_global_concurrency_limit(
                        GlobalConcurrencyLimitCreate(name=name, limit=limit, active=True)
                    )
                    return
                except ObjectAlreadyExists:  # another run created it between our read and create
                    existing = await client.read_global_concurrency_limit_by_name(name)
            if existing.limit != limit or not existing.active:
                await client.update_global_concurrency_limit(
                    name, GlobalConcurrencyLimitUpdate(limit=limit, active=True)
                )
    except (httpx.HTTPError, OSError, RuntimeError) as exc:
        api = PREFECT_API_URL.value() or "the ephemeral local server"
        raise LockUnavailableError(
            f"cannot set up the concurrency limit {name!r} (limit {limit}) on the Prefect API at "
            f"{api}: {type(exc).__name__}: {exc}. Refusing to run without the manifest lock."
        ) from exc


async def ensure_manifest_lock() -> None:
    await ensure_concurrency_limit(tag_limit_name(MANIFEST_TAG), 1)
