"""The two places where the parse pool (`tasks.pdf.pool`) relies on CPython behaviour that is
not public API. Both are guarded by tests/test_stdlib_internals.py, which fails with a message
naming the broken assumption; run it after any Python upgrade.

1. `main_module_not_reimported()`: while worker processes start, `__main__.__spec__` is set to
   a spec named "invoice_pdf_worker.__main__".

   Relied on: with the forkserver and spawn start methods, every new process runs
   `multiprocessing.spawn.prepare()` on the data from `spawn.get_preparation_data()`, which
   names the parent's main module by `__main__.__spec__.name` ("init_main_from_name"); the
   child then re-runs that module as `__mp_main__` (`spawn._fixup_main_from_name`) unless the
   name is "__main__" or ends in ".__main__" (meant for `python -m package`, whose
   `__main__.py` is all "main only" code). None of this is documented: the multiprocessing
   docs only say that the main module must be safely importable.

   Why: a Prefect worker runs the flow under `python -m prefect.engine`, so without this
   every parse worker would import prefect.engine, i.e. all of Prefect, before its first
   parse; the workers need nothing from the parent's main module. The only documented way
   to start a process without that step is the "fork" start method, which is unsafe in the
   flow's process (Prefect runs threads, and a forked child can deadlock on a lock one of
   them held). CPython has no option to skip the step (checked up to its 3.14 source).

   Known for: CPython 3.4 (bpo-19946, which added the ".__main__" case) to 3.14; checked on
   3.11, this project's interpreter, by the tests.

2. `kill_workers(executor)`: shut a `ProcessPoolExecutor` down and kill its workers, including
   those busy with work nobody waits for any more.

   Relied on, before Python 3.14: `ProcessPoolExecutor._processes`, a dict of worker pid to
   `multiprocessing.Process` holding every worker started and not yet reaped (set to None by
   `shutdown()`). Python 3.14 made this public as `ProcessPoolExecutor.kill_workers()`, which
   does exactly what the fallback here does, and is used there.

   Why: `shutdown(cancel_futures=True)` only cancels calls that have not started; a busy
   worker finishes its call first, and an abandoned call can run for ever (an endless loop
   in MuPDF). Public routes considered and rejected: `multiprocessing.Pool.terminate()`
   sends SIGTERM, which the workers ignore on purpose (the run handles it), and a Pool
   whose worker dies loses the call instead of failing it the way `BrokenProcessPool`
   does; `multiprocessing.active_children()` lists the workers but cannot tell them from
   other children started meanwhile in the same process; workers reporting their own pid
   miss those still starting. A pool of our own on `multiprocessing.Process` would
   re-implement ProcessPoolExecutor's crash handling for one attribute read.

   Known for: CPython 3.11 (this project's interpreter, checked by the tests) and 3.14's source,
   whose `kill_workers` reads the same dict; 3.14 and later take the public method here.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

__all__ = ["HAS_KILL_WORKERS", "SKIP_MAIN_SPEC_NAME", "kill_workers", "main_module_not_reimported"]

# ProcessPoolExecutor.kill_workers() exists (added in 3.14).
HAS_KILL_WORKERS = sys.version_info >= (3, 14)

# What __main__'s spec is called while workers start: a name ending in ".__main__".
SKIP_MAIN_SPEC_NAME = "invoice_pdf_worker.__main__"
_SKIP_MAIN_SPEC = importlib.machinery.ModuleSpec(SKIP_MAIN_SPEC_NAME, None)

# Callers start workers from more than one thread: two swaps must never interleave, or the
# second would save (and later restore) the first one's stand-in spec.
_MAIN_SWAP = threading.Lock()


@contextlib.contextmanager
def main_module_not_reimported() -> Iterator[None]:
    """Within this block, processes started by multiprocessing (forkserver, spawn) do not
    re-run the parent's main module. Hold it around the calls that start processes, and no
    longer: other code may read `__main__.__spec__`. A ProcessPoolExecutor starts its workers
    synchronously inside `submit` (the pool's `run_in_executor`)."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    with _MAIN_SWAP:
        saved = main.__dict__.get("__spec__")
        main.__spec__ = _SKIP_MAIN_SPEC
        try:
            yield
        finally:
            main.__spec__ = saved


def kill_workers(executor: ProcessPoolExecutor) -> None:
    """`executor.shutdown(wait=False, cancel_futures=True)`, then kill every worker still
    alive (busy or not). The executor is unusable afterwards."""
    if HAS_KILL_WORKERS:
        executor.kill_workers()  # type: ignore[attr-defined]
        return
    # Snapshot first: shutdown() sets _processes to None.
    processes = list((getattr(executor, "_processes", None) or {}).values())
    executor.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        try:
            if not process.is_alive():  # also reaps it: a reaped pid could be reused
                continue
        except ValueError:  # already closed
            continue
        process.kill()  # a process that ends meanwhile is not an error
