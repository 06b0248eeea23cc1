"""The one harness of the tests and the benches: the real servers they run against.

- a free port on 127.0.0.1 (`free_port`);
- a real `prefect server start` with its own PREFECT_HOME and SQLite, waited for until
  healthy and stopped with `flows.local_server.stop_process` (`start_prefect_server`,
  `prefect_server`); Prefect's own test server (`prefect_test_server`); the benches' choice
  of the three, a server that is started, the test server or a URL (`PrefectAPI`), and
  `drain_prefect_workers` before a server goes away;
- moto's S3 server, in a thread of this process or in a child process of its own, with an
  optional server-side counter of PUTs (`start_moto_thread`, `moto_server`, `start_moto`,
  `PutCounter`), and an aioboto3 client for it (`s3_client`);
- the project's fake OpenAI server in a child process (`LLMProcess`; in a thread, it is
  `testing.fake_llm.server.FakeLLMServer` itself, a context manager), answering with
  `canned_answer`;
- the environment a client of these doubles reads (`FAKE_AWS_CREDENTIALS`,
  `service_env`, `patched_environ`, `with_env`).

The tests use it through the fixtures of tests/conftest.py; the bench scripts import it
(they put the repo root on sys.path). The child servers run this module:
``python -m testing.harness serve-moto|serve-llm ...`` (see `main`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any

# The temporary server's own helpers (flows/local_server.py): one copy of each.
from flows.local_server import start_server, stop_process

REPO_ROOT = Path(__file__).resolve().parents[1]
REGION = "us-east-1"
# Fake credentials for moto: they never leave the loopback.
FAKE_AWS_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": REGION,
}
# What a caller's environment may hold that would send a client elsewhere than the doubles.
AMBIENT_SERVICE_VARIABLES = (
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_ENDPOINT_URL_S3",
    "OPENAI_MODEL",
    "OPENAI_ORG_ID",
    "OPENAI_ORGANIZATION",
    "OPENAI_PROJECT_ID",
)
PREFECT_STARTUP_TIMEOUT_S = 120.0


# --------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------


def default_fake_aws_credentials() -> None:
    """The fake AWS credentials in this process's environment, where none are set."""
    for name, value in FAKE_AWS_CREDENTIALS.items():
        os.environ.setdefault(name, value)


def service_env(s3_endpoint: str, llm_base_url: str | None) -> dict[str, str | None]:
    """What a client (the flow, the CLI) reads to reach moto at `s3_endpoint` with fake
    credentials and the fake LLM at `llm_base_url` (None: no LLM at all); a None value
    means the variable is unset.

    The API key is a dummy on purpose: a real OPENAI_API_KEY from the caller's environment
    must not be sent to the fake server."""
    env: dict[str, str | None] = dict.fromkeys(AMBIENT_SERVICE_VARIABLES)
    env.update(FAKE_AWS_CREDENTIALS, AWS_ENDPOINT_URL=s3_endpoint)
    env.update(
        OPENAI_BASE_URL=llm_base_url, OPENAI_API_KEY=None if llm_base_url is None else "dummy"
    )
    return env


def _apply(env: MutableMapping[str, str], settings: Mapping[str, str | None]) -> None:
    for name, value in settings.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value


def with_env(base: Mapping[str, str], settings: Mapping[str, str | None]) -> dict[str, str]:
    """A copy of `base` with `settings` applied (None: unset), for a child process."""
    env = dict(base)
    _apply(env, settings)
    return env


@contextlib.contextmanager
def patched_environ(settings: Mapping[str, str | None]) -> Iterator[None]:
    """This process's environment with `settings` applied (None: unset), restored after."""
    saved = {name: os.environ.get(name) for name in settings}
    _apply(os.environ, settings)
    try:
        yield
    finally:
        _apply(os.environ, saved)


# --------------------------------------------------------------------------
# Prefect server
# --------------------------------------------------------------------------


@dataclasses.dataclass
class PrefectServer:
    """A running `prefect server start`."""

    url: str  # the API URL, .../api
    home: Path  # the server's PREFECT_HOME
    env: dict[str, str]  # what a client process needs to talk to this server
    process: subprocess.Popen[bytes]
    log_path: Path

    def stop(self) -> None:
        stop_process(self.process)


def start_prefect_server(
    home: Path,
    *,
    settings: Mapping[str, str] | None = None,
    inherit_prefect_env: bool = False,
    log_path: Path | None = None,
    startup_timeout: float = PREFECT_STARTUP_TIMEOUT_S,
) -> PrefectServer:
    """`prefect server start` on a free 127.0.0.1 port with PREFECT_HOME `home` (SQLite in
    it, unless `settings` say otherwise), no UI and no analytics, in a session of its own;
    returns once /health answers. `inherit_prefect_env`: the server keeps this process's
    PREFECT_* settings (not PREFECT_API_URL); by default it gets none of them. Its output
    goes to `log_path` (default `home`/server.log)."""
    home.mkdir(parents=True, exist_ok=True)
    log_path = log_path or home / "server.log"
    env = {
        k: v for k, v in os.environ.items() if inherit_prefect_env or not k.startswith("PREFECT_")
    }
    env.pop("PREFECT_API_URL", None)
    env.update(
        PREFECT_HOME=str(home), PREFECT_UI_ENABLED="false", PREFECT_SERVER_ANALYTICS_ENABLED="false"
    )
    env.update(settings or {})
    url, process = start_server(env, log_path, timeout=startup_timeout)
    client_env = {**env, "PREFECT_API_URL": url}
    for server_only in (
        "PREFECT_API_DATABASE_CONNECTION_URL",
        "PREFECT_SERVER_DATABASE_CONNECTION_URL",
    ):
        client_env.pop(server_only, None)
    return PrefectServer(url=url, home=home, env=client_env, process=process, log_path=log_path)


@contextlib.contextmanager
def prefect_server(home: Path, **options: Any) -> Iterator[PrefectServer]:
    """`start_prefect_server(home, **options)` for the duration of the block."""
    server = start_prefect_server(home, **options)
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def prefect_test_server(startup_timeout: int = 60) -> Iterator[None]:
    """Prefect's own test server (`prefect_test_harness`: SQLite, a subprocess), which this
    process's Prefect client uses for the duration of the block."""
    os.environ.pop("PREFECT_API_URL", None)
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=startup_timeout):
        yield


class PrefectAPI:
    """The Prefect API a bench runs against, by `mode`: 'start' (`start_prefect_server` in a
    temporary home, with this process's settings and `server_env`, "K=V" each), 'harness'
    (`prefect_test_server`) or the URL of a running server. Entering it points this
    process's PREFECT_HOME (a temporary client home) and PREFECT_API_URL at it: enter it
    before importing prefect."""

    def __init__(
        self,
        mode: str,
        server_env: Iterable[str] = (),
        keep_home: bool = False,
        home_prefix: str = "bench-manifest-prefect-",
    ):
        self.mode = mode
        self.server_env = dict(kv.split("=", 1) for kv in server_env)
        self.keep_home = keep_home
        self.home_prefix = home_prefix
        self.home: str | None = None
        self.server: PrefectServer | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._stack = contextlib.ExitStack()
        self.description = ""
        self.startup_s = 0.0

    def __enter__(self) -> PrefectAPI:
        t0 = time.perf_counter()
        self.home = tempfile.mkdtemp(prefix=self.home_prefix)
        os.environ["PREFECT_HOME"] = os.path.join(self.home, "client")
        if self.mode == "start":
            self.server = start_prefect_server(
                Path(self.home, "server"),
                settings=self.server_env,
                inherit_prefect_env=True,
                log_path=Path(self.home, "server.log"),
            )
            self.proc = self.server.process
            os.environ["PREFECT_API_URL"] = self.server.url
            db = self.server_env.get("PREFECT_SERVER_DATABASE_CONNECTION_URL", "SQLite")
            self.description = f"prefect server start at {self.server.url} ({db.split('://')[0]})"
        elif self.mode == "harness":
            os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
            self._stack.enter_context(prefect_test_server())
            self.description = "prefect_test_harness() (SQLite, subprocess server)"
        else:
            os.environ["PREFECT_API_URL"] = self.mode
            self.description = f"existing server {self.mode}"
        self.startup_s = time.perf_counter() - t0
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        if self.server is not None:
            self.server.stop()
        if self.home and not self.keep_home:
            shutil.rmtree(self.home, ignore_errors=True)


async def drain_prefect_workers() -> None:
    """Flush Prefect's event and log workers while the server is still up; otherwise
    they retry against a stopped server at interpreter exit."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        drained = worker.drain_all(timeout=15)  # awaitable when called from a coroutine
        if inspect.isawaitable(drained):
            await drained


# --------------------------------------------------------------------------
# Child servers: this module run as `python -m testing.harness serve-...`
# --------------------------------------------------------------------------


def spawn_server(
    what: str, *args: str, new_session: bool = False
) -> tuple[subprocess.Popen[str], int]:
    """A child server (`main`: `args` say which), and the port it listens on: it prints
    "PORT <n>" once listening and serves until its stdin closes (`stop_child`)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "testing.harness", *args],
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=new_session,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{what} did not start: {line!r}")
    return proc, int(line.split()[1])


def stop_child(proc: subprocess.Popen[str]) -> None:
    """End a child server: close its stdin, then `stop_process` it if it has not exited."""
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        stop_process(proc, timeout=5)


# --------------------------------------------------------------------------
# moto S3
# --------------------------------------------------------------------------

COUNTS_PATH = "/__put_counts__/"  # GET <endpoint>/__put_counts__/<bucket>: the counter's figures


class PutCounter:
    """WSGI wrapper counting the PUTs of keys ending in `suffix`, per bucket (accepted and
    all); GET `COUNTS_PATH`<bucket> reads them over HTTP."""

    def __init__(self, app: Callable[..., Any], suffix: str):
        self.app = app
        self.suffix = suffix
        self.lock = threading.Lock()
        self.counts: dict[str, dict[str, int]] = {}

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]):
        path = environ.get("PATH_INFO", "")
        if environ.get("REQUEST_METHOD") == "GET" and path.startswith(COUNTS_PATH):
            body = json.dumps(self.get(path[len(COUNTS_PATH) :])).encode()
            start_response(
                "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
            )
            return [body]
        if environ.get("REQUEST_METHOD") == "PUT" and path.endswith(self.suffix):
            bucket = path.lstrip("/").split("/", 1)[0]

            def _start_response(status: str, headers: Any, exc_info: Any = None):
                ok = status.startswith("2")
                with self.lock:
                    c = self.counts.setdefault(bucket, {"ok": 0, "total": 0})
                    c["total"] += 1
                    c["ok"] += int(ok)
                if exc_info is not None:
                    return start_response(status, headers, exc_info)
                return start_response(status, headers)

            return self.app(environ, _start_response)
        return self.app(environ, start_response)

    def get(self, bucket: str) -> dict[str, int]:
        with self.lock:
            return dict(self.counts.get(bucket, {"ok": 0, "total": 0}))


class RemotePutCounter:
    """The PUT counter of a moto server running in another process, read over HTTP."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint

    def get(self, bucket: str) -> dict[str, int]:
        with urllib.request.urlopen(self.endpoint + COUNTS_PATH + bucket, timeout=30) as r:
            return json.loads(r.read())


def start_moto_thread(count_puts_of: str | None = None) -> tuple[Any, str, PutCounter | None]:
    """moto's S3 server (`ThreadedMotoServer`) in a thread of this process on a free
    127.0.0.1 port: (server, endpoint URL, the `PutCounter` of keys ending in
    `count_puts_of`, or None)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no per-request access log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    counter = None
    if count_puts_of is not None:
        wsgi = server._server  # werkzeug serves wsgi.app per request
        assert wsgi is not None
        counter = PutCounter(wsgi.app, count_puts_of)
        wsgi.app = counter
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}", counter


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 server in a thread for the duration of the block; its endpoint URL."""
    server, endpoint, _ = start_moto_thread()
    try:
        yield endpoint
    finally:
        server.stop()


class MotoProcess:
    """moto's S3 server in a child process of its own, so that its request handling does
    not compete with the caller for this process's GIL (real S3 would not)."""

    def __init__(self, count_puts_of: str | None = None) -> None:
        args = ["serve-moto"] + (["--count-puts-of", count_puts_of] if count_puts_of else [])
        self.proc, port = spawn_server("moto server", *args)
        self.endpoint = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        stop_child(self.proc)


def start_moto(
    mode: str = "process", *, count_puts_of: str | None = None
) -> tuple[Any, str, PutCounter | RemotePutCounter | None]:
    """moto in a child process ('process', the default) or in a thread of this one
    ('thread'): (server with .stop(), endpoint URL, PUT counter or None)."""
    if mode == "thread":
        return start_moto_thread(count_puts_of)
    server = MotoProcess(count_puts_of)
    return server, server.endpoint, RemotePutCounter(server.endpoint) if count_puts_of else None


def serve_moto(count_puts_of: str | None) -> int:
    """Child side of MotoProcess: serve until stdin closes."""
    server, endpoint, _ = start_moto_thread(count_puts_of)
    print("PORT", endpoint.rsplit(":", 1)[1], flush=True)
    sys.stdin.read()
    server.stop()
    return 0


def s3_client(endpoint: str):
    """One aioboto3 S3 client context manager for moto (path-style, fake credentials)."""
    import aioboto3
    from aiobotocore.config import AioConfig

    return aioboto3.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=FAKE_AWS_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=FAKE_AWS_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        config=AioConfig(s3={"addressing_style": "path"}),
    )


# --------------------------------------------------------------------------
# The fake LLM
# --------------------------------------------------------------------------


def canned_answer() -> Callable[[str], Any]:
    """The fake LLM's answer in benchmarks: one valid extraction, made once. A real model
    does its work on another machine; the fake server's default answer (running the
    offline extractor per request, in its process) would bill the caller's CPU for it."""
    from testing.samples import make_invoice

    invoice = make_invoice(0)[1]
    return lambda text: invoice


class LLMProcess:
    """The fake LLM (answering with `canned_answer`) in a child process of its own, for the
    same reason as `MotoProcess`: a real model answers from another machine, so its HTTP
    handling must not compete with the caller for this process's GIL. Statistics are read
    and reset through the child's stdin."""

    def __init__(self, config: Any = None) -> None:
        from testing.fake_llm.server import FakeLLMConfig

        config = config if config is not None else FakeLLMConfig()
        self.proc, port = spawn_server(
            "fake LLM", "serve-llm", json.dumps(dataclasses.asdict(config)), new_session=True
        )
        self.base_url = f"http://127.0.0.1:{port}/v1"

    def _ask(self, command: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def reset_stats(self) -> None:
        self._ask("reset")

    def stats(self) -> dict[str, Any]:
        return json.loads(self._ask("stats"))

    def stop(self) -> None:
        stop_child(self.proc)

    def __enter__(self) -> LLMProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_llm(config_json: str) -> int:
    """Child side of LLMProcess: serve until stdin closes, answering `reset` and `stats`."""
    from testing.fake_llm.server import FakeLLMConfig, FakeLLMServer

    server = FakeLLMServer(FakeLLMConfig(**json.loads(config_json)), answer=canned_answer()).start()
    print("PORT", server.port, flush=True)
    try:
        for line in sys.stdin:
            command = line.strip()
            if command == "reset":
                server.reset_stats()
                print("OK", flush=True)
            elif command == "stats":
                print(json.dumps(server.stats()), flush=True)
    finally:
        server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    """The child servers: `serve-moto [--count-puts-of SUFFIX]`, `serve-llm CONFIG_JSON`."""
    parser = argparse.ArgumentParser(prog="python -m testing.harness")
    commands = parser.add_subparsers(dest="command", required=True)
    moto = commands.add_parser("serve-moto")
    moto.add_argument("--count-puts-of", metavar="SUFFIX")
    commands.add_parser("serve-llm").add_argument("config_json")
    args = parser.parse_args(argv)
    if args.command == "serve-moto":
        return serve_moto(args.count_puts_of)
    return serve_llm(args.config_json)


if __name__ == "__main__":
    sys.exit(main())
