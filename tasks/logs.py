"""Where a line about a run goes: the run's own log, which Prefect sends to the API.

Prefect sends only its run loggers' records to the API under its default logging; the
pipeline's module loggers (`tasks.*`) reach the flow run page only with
deployments/logging.yml. So what a person must see (a failed invoice, a wait on a shared
limit) goes through `run_logger`, which is the run's logger inside a flow or task run and
the module's logger outside one (plain function calls, unit tests).
"""

from __future__ import annotations

import logging

from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

RunLogger = logging.Logger | logging.LoggerAdapter


def run_logger(fallback: logging.Logger) -> RunLogger:
    try:
        return get_run_logger()
    except MissingContextError:
        return fallback
