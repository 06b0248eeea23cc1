"""`invoices`: run the pipeline, make sample invoices, serve a local fake LLM.

Exit codes of `invoices run`: 0 every invoice done or needs_review; 1 some invoices failed
(each recorded with its reason); 2 the run could not go ahead (a bad option, a missing source,
an output that holds another source or another tool's manifest, no manifest lock); 130 / 143
stopped by SIGINT / SIGTERM (what finished is recorded, the rest given back for the next run).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import signal
import sys
import typing
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from flows.local_server import ServerDidNotStart, temporary_server
from tasks.report import RunRefused, RunSummary

# The flow parameters `invoices run` offers as options (the others keep their defaults).
RUN_OPTIONS = (
    "source",
    "output",
    "extractor",
    "max_concurrency",
    "invoice_timeout",
    "max_attempts",
    "reprocess_needs_review",
    "parse_executor",
    "max_pages",
    "max_bytes",
    "chunk_size",
    "shard",
    "lease_seconds",
    "stop_grace_seconds",
)


def add_run_options(run: argparse.ArgumentParser) -> None:
    """The options of `invoices run`."""
    from prefect.utilities.callables import parameter_docstrings

    from flows.process_invoices import process_invoices
    from flows.progress import PLAIN_EVERY_SECONDS
    from flows.settings import RunSettings

    # Types and defaults from RunSettings, help from the flow's docstring (the run form's).
    helps = parameter_docstrings(inspect.getdoc(process_invoices.fn))
    for name in RUN_OPTIONS:
        field = RunSettings.model_fields[name]
        default = field.default
        shown = "the bundled sample invoices" if name == "source" else default
        options: dict[str, Any] = {"default": default, "help": f"{helps[name]} (default: {shown})"}
        if field.annotation is bool:
            options["action"] = "store_true"
        elif typing.get_origin(field.annotation) is typing.Literal:
            options["choices"] = typing.get_args(field.annotation)
        elif field.annotation in (int, float):
            options["type"] = field.annotation
        if name == "source":
            run.add_argument("source", nargs="?", **options)
        else:
            run.add_argument(*(["-o"] if name == "output" else []), _option(name), **options)
    run.add_argument(
        "--json", action="store_true", help="print the summary as JSON instead of a table"
    )
    run.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress on stderr (default: a live bar on a terminal, else a line "
        f"at most every {PLAIN_EVERY_SECONDS:g} s and one at the end)",
    )


def check_parameters(parameters: dict[str, Any]) -> list[str]:
    """What is wrong with `parameters` as run settings (types, bounds), one line each naming
    the option; [] when they are fine. The same check Prefect applies to the flow's
    parameters, without starting anything."""
    from flows.settings import RunSettings

    try:
        RunSettings.model_validate(parameters)
    except ValidationError as exc:
        named = [(str(error["loc"][0]), error["msg"]) for error in exc.errors()]
        return [f"{_option(name)} {parameters.get(name)!r}: {message}" for name, message in named]
    return []


def _option(parameter: str) -> str:
    return "SOURCE" if parameter == "source" else "--" + parameter.replace("_", "-")


def run_on_a_server(flow: Any, parameters: dict[str, Any]) -> Any:
    """The flow run's final state, on the Prefect API configured (PREFECT_API_URL), or else
    on a temporary server of this run's own (flows/local_server.py)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    if PREFECT_API_URL.value():
        return asyncio.run(flow(**parameters, return_state=True))
    print(
        "starting a temporary Prefect server for this run (set PREFECT_API_URL to use yours)...",
        file=sys.stderr,
    )
    # No UI on it, and it is gone when the run ends: no "View at" link to a page that is not there.
    with (
        temporary_server() as url,
        temporary_settings(updates={PREFECT_API_URL: url, PREFECT_UI_URL: ""}),
    ):
        try:
            return asyncio.run(flow(**parameters, return_state=True))
        finally:
            flush_to_server()


def flush_to_server(timeout: float = 10.0) -> None:
    """Send the log lines and events still queued to the server before it stops (they would
    otherwise be sent at exit, to a server that is gone)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=timeout)


def cmd_run(args: argparse.Namespace) -> int:
    from prefect.exceptions import TerminationSignal

    from flows.process_invoices import process_invoices
    from flows.progress import show_progress
    from tasks.report import format_table

    parameters = {name: getattr(args, name) for name in RUN_OPTIONS}
    problems = check_parameters(parameters)
    if problems:
        for problem in problems:
            print(f"invoices run: {problem}", file=sys.stderr)
        return 2
    try:
        with nullcontext() if args.no_progress else show_progress():
            state = run_on_a_server(process_invoices, parameters)
    except ServerDidNotStart as exc:
        print(f"invoices run: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the run could handle it (starting up)
        print("interrupted before any invoice was processed", file=sys.stderr)
        return 128 + signal.SIGINT
    except TerminationSignal as exc:  # SIGTERM while starting up, through Prefect's handler
        print("terminated before any invoice was processed", file=sys.stderr)
        return 128 + exc.signal
    except Exception as exc:  # the run could not even start (e.g. no Prefect API): say so
        print(
            f"run failed before processing any invoice: {type(exc).__name__}: {exc}\n"
            "nothing was processed: the manifest is only written under Prefect's lock",
            file=sys.stderr,
        )
        return 2
    summary = state.result(raise_on_failure=False)
    if isinstance(summary, RunRefused):
        print(f"invoices run: {summary.reason}", file=sys.stderr)
        return 2
    if not isinstance(summary, RunSummary):
        print(f"run failed: {state.message or summary}", file=sys.stderr)
        return 2
    print(summary.model_dump_json(indent=2) if args.json else format_table(summary))
    if summary.stopped_by:
        return 128 + signal.Signals[summary.stopped_by]
    return 1 if summary.failed else 0


def _demo_module(name: str) -> Any:
    """A module of the repository's `testing/` package (the sample generator, the fake LLM),
    which the demo commands use but the installed package leaves out: found next to `flows/`
    in a checkout, else an error saying so."""
    import importlib

    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "testing" / "__init__.py").is_file() and str(checkout) not in sys.path:
        sys.path.append(str(checkout))
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not exc.name.startswith("testing"):
            raise
        raise SystemExit(
            f"invoices: {name} is part of the repository's testing/ package, "
            "not of the installed one: run this from a checkout "
            "(pip install -e .)"
        ) from None


def cmd_samples(args: argparse.Namespace) -> int:
    write_samples = _demo_module("testing.samples").write_samples

    paths = write_samples(Path(args.folder), args.count, seed=args.seed)
    print(f"wrote {len(paths)} invoices to {args.folder}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["fake-llm"]:  # its own argparse; forward everything after the name
        return _demo_module("testing.fake_llm.server").main(argv[1:]) or 0
    parser = argparse.ArgumentParser(
        prog="invoices", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_run_options(
        sub.add_parser(
            "run",
            help="process invoices and print a summary",
            description="Process every PDF invoice under SOURCE and record each outcome in "
            "OUTPUT/manifest.json. Uses Prefect's API from PREFECT_API_URL, or a temporary "
            "local server when none is set.",
        )
    )
    samples = sub.add_parser("samples", help="generate sample invoice PDFs")
    samples.add_argument("folder", help="where to write them")
    samples.add_argument("--count", type=int, default=12)
    samples.add_argument("--seed", type=int, default=0)
    sub.add_parser(
        "fake-llm", help="serve a local OpenAI-compatible fake LLM (see: invoices fake-llm --help)"
    )
    args = parser.parse_args(argv)
    return {"run": cmd_run, "samples": cmd_samples}[args.command](args)
