"""Test fixtures over testing/harness.py: real servers on 127.0.0.1, never mocks of the thing under test."""

from __future__ import annotations

import asyncio
import os
import tempfile
import uuid

import boto3
import pytest
import pytest_asyncio

from flows.local_server import stop_process  # noqa: F401  (tests import it from here)
from testing import harness

# Prefect state of the test run stays out of the user's ~/.prefect.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="invoices-test-prefect-"))
os.environ.pop("PREFECT_API_URL", None)
# The LLM is only used where a test asks for it (against the project's fake server).
for _name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODEL"):
    os.environ.pop(_name, None)

# Tests talk to moto over HTTP; these fake credentials never leave the loopback.
harness.default_fake_aws_credentials()


@pytest.fixture(scope="session")
def moto_endpoint():
    """A moto S3 server as a real HTTP server on 127.0.0.1 (random port)."""
    with harness.moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(moto_endpoint):
    """A fresh, empty bucket on the moto server; its name."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name=harness.REGION).create_bucket(
        Bucket=name
    )
    return name


@pytest_asyncio.fixture(params=["local", "s3"], loop_scope="function")
async def store(request, tmp_path):
    """An opened store on each backend: a local folder, and a prefix of a moto bucket.

    The S3 store lists in pages of 3 so that every list() in a test paginates."""
    from tasks.storage import LocalStore, S3Store

    if request.param == "local":
        opened = LocalStore(tmp_path / "store")
    else:
        opened = S3Store(
            request.getfixturevalue("s3_bucket"),
            "root/",
            endpoint_url=request.getfixturevalue("moto_endpoint"),
            page_size=3,
        )
    async with opened:
        yield opened


@pytest.fixture
def proxy(moto_endpoint):
    """A fault-injecting HTTP proxy in front of the moto server."""
    from tests.s3_faults import S3FaultProxy

    with S3FaultProxy(moto_endpoint) as running:
        yield running


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server (SQLite) for every test that runs flows."""
    with harness.prefect_test_server(startup_timeout=60):
        yield


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` on 127.0.0.1 with its own PREFECT_HOME and SQLite
    (`harness.PrefectServer`: .url, .home, .env for a client process)."""
    home = tmp_path_factory.mktemp("prefect-server")
    with (
        harness.prefect_server(
            home,
            settings={
                "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
                "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",  # tests/test_schedule.py: not 60 s
                # As the operators' guide sets up a server: `--watch` streams the run's logs.
                "PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED": "true",
                "PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED": "true",
            },
        ) as server
    ):
        yield server


def on_server(prefect_server, fn):
    """Run `await fn(client)` against the test's real server, from a sync test."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def go():
        with temporary_settings({PREFECT_API_URL: prefect_server.url}):
            async with get_client() as client:
                return await fn(client)

    return asyncio.run(go())


async def read_artifacts(*, key: str | None = None, flow_run_id=None) -> list:
    """Artifacts through the Prefect API, by key and/or flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterId,
    )

    async with get_client() as client:
        return await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])) if key else None,
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            if flow_run_id
            else None,
        )
