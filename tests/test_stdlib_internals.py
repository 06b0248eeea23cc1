"""The CPython behaviour that `tasks.pdf.stdlib_internals` relies on, checked on the running
interpreter. A failure here means a Python upgrade broke one of those assumptions: its message
says which, and the module's docstring says what depends on it."""

from __future__ import annotations

import multiprocessing
import multiprocessing.process
import multiprocessing.spawn
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from tasks.pdf.stdlib_internals import (
    HAS_KILL_WORKERS,
    SKIP_MAIN_SPEC_NAME,
    kill_workers,
    main_module_not_reimported,
)

ROOT = Path(__file__).resolve().parents[1]
WHERE = "tasks/pdf/stdlib_internals.py (see its docstring)"


# --- 1. workers do not re-run the parent's main module -------------------------------------


def test_preparation_data_names_the_stand_in_main_module() -> None:
    main = sys.modules["__main__"]
    spec = main.__dict__.get("__spec__")
    with main_module_not_reimported():
        data = multiprocessing.spawn.get_preparation_data("probe")
    assert main.__dict__.get("__spec__") is spec, "__main__.__spec__ was not restored"
    assert (
        data.get("init_main_from_name") == SKIP_MAIN_SPEC_NAME and "init_main_from_path" not in data
    ), (
        "multiprocessing.spawn.get_preparation_data() no longer names the parent's main module "
        f"by __main__.__spec__.name (it gave {data!r}); main_module_not_reimported() relies on "
        f"that: {WHERE}"
    )


# The parent: a main module whose re-run in a worker shows (RERUN in the worker's __main__).
PROBE = """
import multiprocessing, sys
from concurrent.futures import ProcessPoolExecutor

from tasks.pdf.stdlib_internals import main_module_not_reimported

RERUN = True
CHECK = "hasattr(__import__('sys').modules['__main__'], 'RERUN')"


def worker_reran_main(method, swap):
    context = multiprocessing.get_context(method)
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as executor:
        if swap:
            with main_module_not_reimported():  # the worker starts inside submit
                future = executor.submit(eval, CHECK)
        else:
            future = executor.submit(eval, CHECK)
        return future.result(timeout=60)


if __name__ == "__main__":
    for method in sys.argv[1:]:
        print(method, worker_reran_main(method, swap=False), worker_reran_main(method, swap=True))
"""
METHODS = ["forkserver", "spawn"]


@pytest.mark.parametrize("launch", ["module", "script"])  # python -m probe_main / probe_main.py
def test_workers_do_not_rerun_the_parents_main_module(tmp_path: Path, launch: str) -> None:
    (tmp_path / "probe_main.py").write_text(PROBE)
    command = ["-m", "probe_main"] if launch == "module" else [str(tmp_path / "probe_main.py")]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(
        [sys.executable, *command, *METHODS],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in result.stdout.splitlines()]
    assert [line[0] for line in lines] == METHODS, result.stdout
    for method, unswapped, swapped in lines:
        _check_probe(method, launch, unswapped, swapped)


def _check_probe(method: str, launch: str, unswapped: str, swapped: str) -> None:
    assert unswapped == "True", (
        f"the probe is broken: without the swap, a {method} worker did not re-run the parent's "
        f"main module ({launch} launch), so this test cannot tell whether the swap works. If "
        f"multiprocessing stopped re-running it, main_module_not_reimported() may be unneeded: {WHERE}"
    )
    assert swapped == "False", (
        f"a {method} worker re-ran the parent's main module ({launch} launch) although "
        f"__main__.__spec__ was named {SKIP_MAIN_SPEC_NAME!r}: multiprocessing.spawn no longer "
        "skips main modules whose name ends in '.__main__', so under `python -m prefect.engine` "
        f"every parse worker imports all of Prefect before its first parse: {WHERE}"
    )


# --- 2. the workers of a process pool can be killed -------------------------------------------


def test_kill_workers_is_public_exactly_when_expected() -> None:
    assert hasattr(ProcessPoolExecutor, "kill_workers") == HAS_KILL_WORKERS, (
        f"ProcessPoolExecutor.kill_workers {'exists' if hasattr(ProcessPoolExecutor, 'kill_workers') else 'is missing'} "
        f"on Python {sys.version.split()[0]}, but HAS_KILL_WORKERS is {HAS_KILL_WORKERS}: {WHERE}"
    )


def _pool() -> ProcessPoolExecutor:
    # spawn, not the parser's forkserver: the forkserver is process-wide, and one started here
    # would lack the preload list that the parser's tests expect.
    return ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))


@pytest.mark.skipif(HAS_KILL_WORKERS, reason="kill_workers() is public: _processes is not read")
def test_a_process_pool_keeps_its_workers_in_processes() -> None:
    executor = _pool()
    try:
        with main_module_not_reimported():
            pid = executor.submit(os.getpid).result(timeout=60)
        processes = getattr(executor, "_processes", None)
        message = (
            f"on Python {sys.version.split()[0]}, ProcessPoolExecutor._processes is no longer a "
            f"dict of worker pid to multiprocessing process (got {processes!r}); kill_workers() "
            f"reads it to kill busy workers: {WHERE}"
        )
        assert isinstance(processes, dict) and list(processes) == [pid], message
        (process,) = processes.values()
        assert isinstance(process, multiprocessing.process.BaseProcess), message
        assert process.pid == pid and process.is_alive(), message
    finally:
        executor.shutdown(wait=True)


def test_kill_workers_kills_a_busy_worker() -> None:
    executor = _pool()
    with main_module_not_reimported():
        pid = executor.submit(os.getpid).result(timeout=60)
    (worker,) = [p for p in multiprocessing.active_children() if p.pid == pid]
    busy = executor.submit(sum, range(10**15))  # holds the worker until it is killed
    try:
        deadline = time.monotonic() + 10
        while not busy.running() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)  # the worker has taken the call
        kill_workers(executor)
        worker.join(timeout=10)
        assert not worker.is_alive(), (
            f"kill_workers() left a busy worker running on Python {sys.version.split()[0]}: "
            + (
                "ProcessPoolExecutor.kill_workers() did not kill it"
                if HAS_KILL_WORKERS
                else "ProcessPoolExecutor._processes no longer lists the workers"
            )
            + f": {WHERE}"
        )
    finally:
        if worker.is_alive():  # never leave a core busy for ever
            worker.kill()
            worker.join(timeout=10)
        executor.shutdown(wait=False, cancel_futures=True)
