"""The event loop's health during a run: a probe that measures how late it wakes, and a
freeze of long-lived objects that keeps the garbage collector's full passes short."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class LoopStallProbe:
    """Measures how late the event loop wakes a short sleeper while the run works: CPU work
    done on the loop (parsing, JSON of a large manifest) shows up here as a stall that
    delays every other invoice."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.max_stall = 0.0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LoopStallProbe:
        self._task = asyncio.create_task(self._watch(), name="loop-stall-probe")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asleep = loop.time()
            await asyncio.sleep(self.interval)
            self.max_stall = max(self.max_stall, loop.time() - asleep - self.interval)


@contextmanager
def gc_frozen() -> Iterator[Callable[[], None]]:
    """Keep every object alive now (imported modules, botocore's service models, Prefect's
    clients and settings: several hundred thousand) out of the garbage collector's full
    collections until the block ends: each full collection walks them all while holding the
    event loop (bench/end_to_end.py --stall-log); objects made inside the block are collected as before, except those
    alive when the function it yields is called (it freezes them too: call it once the
    run's long-lived objects exist). Unfrozen at the end, so a long-lived process (a served
    deployment) still frees what the run left."""
    gc.freeze()
    try:
        yield gc.freeze
    finally:
        gc.unfreeze()
