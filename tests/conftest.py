"""Shared test harness: real servers on 127.0.0.1, never mocks of the thing under test."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
import pytest_asyncio
from moto.server import ThreadedMotoServer

from flows.local_server import stop_process

# Prefect state of the test run stays out of the user's ~/.prefect.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="invoices-test-prefect-"))
os.environ.pop("PREFECT_API_URL", None)
# The LLM is only used where a test asks for it (against the project's fake server).
for _name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODEL"):
    os.environ.pop(_name, None)

# Tests talk to moto over HTTP; these fake credentials never leave the loopback.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture(scope="session")
def moto_endpoint():
    """A moto S3 server as a real HTTP server on 127.0.0.1 (random port)."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(moto_endpoint):
    """A fresh, empty bucket on the moto server; its name."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
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
            request.getfixturevalue("s3_bucket"), "root/",
            endpoint_url=request.getfixturevalue("moto_endpoint"), page_size=3,
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
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class PrefectServer:
    url: str
    home: Path
    env: dict[str, str]  # what a client process needs to talk to this server


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` on 127.0.0.1 with its own PREFECT_HOME and SQLite."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home}/prefect.db",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2",  # tests/test_schedule.py: not 60 s
        # As the operators' guide sets up a server: `--watch` streams the run's logs.
        PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED="true",
        PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED="true",
    )
    log = open(home / "server.log", "wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "prefect"), "server", "start",
         "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"prefect server did not start:\n{(home / 'server.log').read_text()[-3000:]}")
        time.sleep(0.3)
    client_env = {**env, "PREFECT_API_URL": url}
    client_env.pop("PREFECT_API_DATABASE_CONNECTION_URL")
    yield PrefectServer(url=url, home=home, env=client_env)
    stop_process(proc)
    log.close()


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
        ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId,
    )

    async with get_client() as client:
        return await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])) if key else None,
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])) if flow_run_id else None,
        )
