"""Imported first by the parse pool's forkserver (`tasks.pdf.pool._process_context`), never by
the flow's process: lowers the forkserver's priority below its parent's, so its own start-up
(a Python process importing PyMuPDF, CPU-bound, as a run starts) and every parse worker
forked from it yield the CPU to the flow's event loop (`tasks.pdf.priority`)."""

import os

from tasks.pdf.priority import lower_priority, lowered

lower_priority(lowered(os.getpriority(os.PRIO_PROCESS, os.getppid())))
