"""Run context on every log record, and JSON lines built on Prefect's JSON formatter.

Used by deployments/logging.yml (select it with PREFECT_LOGGING_SETTINGS_PATH). Records from
Prefect's run loggers already carry `flow_run_id` / `task_run_id`; records from our own
module loggers (`tasks.*`, `flows.*`) do not: `RunContextFilter` adds them from Prefect's
run context, so every line of a run can be joined on the flow run and task run ids.
`tasks.pipeline` adds `invoice_key`, `stage` and `duration_s` itself (`extra=`).

This module is imported while Prefect configures logging, that is during `import prefect`:
it must not import Prefect's run machinery at import time.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

from prefect.logging.formatters import JsonFormatter

CONTEXT_FIELDS = ("flow_run_id", "flow_run_name", "task_run_id", "task_run_name")

# LogRecord attributes that are noise in a JSON line, or unsafe to serialize as they are:
# `args` may hold any object (its rendering is already in `message`), `msg` is the template.
_DROPPED = ("args", "msg", "exc_text", "stack_info", "relativeCreated", "msecs")


def run_context() -> dict[str, str | None]:
    """The ids and names of the flow run and task run the caller is in (None outside runs)."""
    fields: dict[str, str | None] = dict.fromkeys(CONTEXT_FIELDS)
    context = sys.modules.get("prefect.context")
    if context is None:  # Prefect's run machinery not loaded yet: no run to be in
        return fields
    task_ctx = context.TaskRunContext.get()
    if task_ctx is not None and task_ctx.task_run is not None:
        fields["task_run_id"] = str(task_ctx.task_run.id)
        fields["task_run_name"] = task_ctx.task_run.name
    flow_ctx = context.FlowRunContext.get()
    if flow_ctx is not None and flow_ctx.flow_run is not None:
        fields["flow_run_id"] = str(flow_ctx.flow_run.id)
        fields["flow_run_name"] = flow_ctx.flow_run.name
    elif task_ctx is not None and task_ctx.task_run is not None and task_ctx.task_run.flow_run_id:
        fields["flow_run_id"] = str(task_ctx.task_run.flow_run_id)
    return fields


class RunContextFilter(logging.Filter):
    """Adds flow_run_id, flow_run_name, task_run_id, task_run_name to each record.

    Values a record already has (Prefect's run loggers set them) are kept. Never drops a
    record. Attach it to handlers: a filter on a logger does not see its children's records.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        missing = [name for name in CONTEXT_FIELDS if getattr(record, name, None) is None]
        if missing:
            try:
                context = run_context()
            except Exception:  # logging must never fail because the context could not be read
                context = dict.fromkeys(CONTEXT_FIELDS)
            for name in missing:
                setattr(record, name, context[name])
        return True


class JsonLinesFormatter(JsonFormatter):
    """Prefect's `JsonFormatter`, one object per line, with the rendered `message`.

    Prefect's formatter serializes the record's attributes as they are; this adds what a
    reader needs first (`timestamp` in UTC ISO 8601, `level`, `logger`, `message`) and drops
    the raw `msg`/`args` pair, whose arguments may be objects that do not serialize.
    """

    def __init__(self, fmt: str = "default", dmft: str | None = None, style: str = "%") -> None:
        super().__init__(fmt, dmft, style)  # type: ignore[arg-type]

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        original = record.__dict__
        view: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.message,
        }
        view.update((k, v) for k, v in original.items() if k not in _DROPPED)
        shadow = logging.makeLogRecord({})
        shadow.__dict__.clear()
        shadow.__dict__.update(view)
        return super().format(shadow)
