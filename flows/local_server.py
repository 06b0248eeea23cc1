"""The temporary Prefect server of an `invoices run` that has no PREFECT_API_URL.

Prefect's own ephemeral server runs in the run's process group, so a Ctrl-C in the terminal
(SIGINT to the whole foreground group) stopped it at the moment the run needed it most: to
record the invoices in flight and give back its claims. This one is `prefect server start`
in a session of its own: a terminal's signals reach the run alone, and the run stops the
server when it is done. On Linux the server also gets SIGTERM when the run's process dies,
so a killed run does not leave it behind. No UI and no telemetry; of the services, those a
run needs (the task-run recorder, events, and the repossessor that frees the concurrency
slots of a run that died), not the ones that start or watch scheduled runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

STARTUP_TIMEOUT_S = 120.0
# Services for deployments and schedules, which a run of its own does not use.
_SERVICES_OFF = (
    "SCHEDULER",
    "LATE_RUNS",
    "FOREMAN",
    "CANCELLATION_CLEANUP",
    "PAUSE_EXPIRATIONS",
    "DB_VACUUM",
)
_PR_SET_PDEATHSIG = 1


class ServerDidNotStart(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the process that started it dies (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def start_server(
    env: Mapping[str, str],
    log_path: Path,
    *,
    timeout: float = STARTUP_TIMEOUT_S,
    die_with_parent: bool = False,
) -> tuple[str, subprocess.Popen[bytes]]:
    """`prefect server start` on a free 127.0.0.1 port with `env`, in a session of its own
    (a terminal's signals reach the caller alone), its output in `log_path`; its API URL and
    process once /health answers. If it does not within `timeout` s, it is stopped and
    `ServerDidNotStart` names the log and ends with its tail. `die_with_parent` (Linux): the
    server gets SIGTERM when the calling process dies; only safe to ask for before the
    caller starts threads (preexec_fn)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    command = ["server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "prefect"), *command],
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent if die_with_parent and sys.platform == "linux" else None,
        )
    deadline = time.monotonic() + timeout
    while not healthy(url):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process(process, timeout=5)
            tail = log_path.read_text(errors="replace")[-3000:]
            raise ServerDidNotStart(
                f"the Prefect server did not start (exit {process.returncode}; log: "
                f"{log_path}):\n{tail}"
            )
        time.sleep(0.1)
    return url, process


@contextlib.contextmanager
def temporary_server() -> Iterator[str]:
    """A `prefect server start` on 127.0.0.1 for the duration of the block; its API URL.

    Call it before anything starts threads (preexec_fn is only safe in a single-threaded
    process): the CLI does, before it runs the flow."""
    env = {
        **os.environ,
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
        **{f"PREFECT_SERVER_SERVICES_{name}_ENABLED": "false" for name in _SERVICES_OFF},
        # Leases on concurrency slots kept on disk, not in the server's memory: the next
        # run's server can then free the slots (the manifest lock) of a run that died with
        # its server; in memory they were lost and the slots held for ever.
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": os.environ.get(
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE",
            "prefect.server.concurrency.lease_storage.filesystem",
        ),
    }
    env.pop("PREFECT_API_URL", None)
    handle, name = tempfile.mkstemp(prefix="invoices-prefect-server-", suffix=".log")
    os.close(handle)
    log_path = Path(name)
    url, process = start_server(env, log_path, die_with_parent=True)  # kept: the log on failure
    try:
        yield url
    finally:
        stop_process(process, timeout=10)
        if process.returncode in (0, -signal.SIGTERM, 128 + signal.SIGTERM):
            with contextlib.suppress(OSError):
                log_path.unlink()


def stop_process(process: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM, and SIGKILL if it has not exited within `timeout` seconds."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
