"""Serve the deployments of prefect.yaml from this process: no work pool, no worker.

    python -m deployments.serve [--only on-demand] [--suffix=-dev] [--limit N]

Registers the deployments that prefect.yaml defines (same names, parameters, descriptions,
tags and cron schedules; the work pool and queue do not apply) with the server in
PREFECT_API_URL, then runs their flow runs as subprocesses of this process until it is
stopped (Ctrl-C). Triggering is the same as with a worker:

    prefect deployment run 'process-invoices/on-demand' --watch

Run the server preparation first (python -m deployments.prepare): the flow needs the
manifest lock, and blocks named in parameters must exist. Served deployments replace the
worker-based ones of the same name on that server; use --suffix to keep both.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = PROJECT_ROOT / "prefect.yaml"
ENTRYPOINT = "flows/process_invoices.py:process_invoices"


def load_deployment_specs(path: Path = PREFECT_YAML) -> list[dict[str, Any]]:
    """The `deployments` of prefect.yaml whose entrypoint is the invoice flow."""
    config = yaml.safe_load(path.read_text())
    specs = [
        spec for spec in config.get("deployments") or [] if spec.get("entrypoint") == ENTRYPOINT
    ]
    if not specs:
        raise ValueError(f"{path} defines no deployment of {ENTRYPOINT}")
    return specs


def schedules_of(spec: dict[str, Any]) -> list[Any]:
    from prefect.schedules import Cron

    schedules = []
    for schedule in spec.get("schedules") or []:
        if "cron" not in schedule:
            raise ValueError(
                f"deployment {spec['name']!r}: only cron schedules are served, got {schedule}"
            )
        schedules.append(
            Cron(
                schedule["cron"],
                timezone=schedule.get("timezone"),
                active=schedule.get("active", True),
            )
        )
    return schedules


def build_deployments(
    specs: list[dict[str, Any]], *, suffix: str = "", only: list[str] | None = None
) -> list[Any]:
    from flows.process_invoices import process_invoices

    chosen = [spec for spec in specs if not only or spec["name"] in only]
    missing = set(only or ()) - {spec["name"] for spec in chosen}
    if missing:
        raise ValueError(f"no deployment named {', '.join(sorted(missing))} in prefect.yaml")
    return [
        process_invoices.to_deployment(
            name=spec["name"] + suffix,
            description=spec.get("description"),
            tags=spec.get("tags"),
            parameters=spec.get("parameters") or {},
            schedules=schedules_of(spec),
        )
        for spec in chosen
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deployments.serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="serve only this deployment of prefect.yaml (repeatable)",
    )
    parser.add_argument(
        "--suffix",
        default="",
        help="append to the deployment names, e.g. --suffix=-dev, to keep the worker-based "
        "deployments of the same server untouched",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="flow runs at once in this process (default: no limit)",
    )
    args = parser.parse_args(argv)

    from prefect import serve
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        print(
            "PREFECT_API_URL is not set: point it at a running server "
            "(served deployments need one to be triggered)",
            file=sys.stderr,
        )
        return 2
    # Relative parameters (samples/invoices, out) and the entrypoint resolve from the root,
    # in this process and in the flow-run subprocesses it starts.
    os.chdir(PROJECT_ROOT)
    deployments = build_deployments(load_deployment_specs(), suffix=args.suffix, only=args.only)
    serve(*deployments, limit=args.limit)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
