"""The parse workers' priority: below the flow's.

Parsing is batch work; the flow's event loop is latency work (every invoice's I/O, Prefect's
heartbeats). With as many workers as cores, workers at the flow's priority take the cores
away from the loop and stall it (bench/end_to_end.py measures the stalls); niced workers
yield to it at once and still get every cycle the loop leaves idle.
"""

from __future__ import annotations

import contextlib
import os

WORKER_NICENESS = 10


def lowered(niceness: int) -> int:
    """The niceness `WORKER_NICENESS` steps below `niceness` (19 at most)."""
    return min(niceness + WORKER_NICENESS, 19)


def lower_priority(niceness: int) -> None:
    """Set this process's niceness to `niceness`, if that lowers its priority."""
    with contextlib.suppress(OSError):  # no setpriority (some sandboxes): full priority
        if os.getpriority(os.PRIO_PROCESS, 0) < niceness:
            os.setpriority(os.PRIO_PROCESS, 0, niceness)
