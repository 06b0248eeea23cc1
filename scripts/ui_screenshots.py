"""Screenshots of what a Prefect user sees of the invoice pipeline in the Prefect UI.

    .venv/bin/python scripts/ui_screenshots.py [--out /tmp/ui-screenshots] [--ui v2|v1]

On a temporary Prefect server (flows.local_server) it creates the `process-invoices/on-demand`
deployment from prefect.yaml, runs the flow in this process over a folder of good and broken
invoices, and takes headless-Chromium screenshots (and DOM dumps) of:

- the flow run page (its Logs tab): the WARNING lines naming each failed invoice with its
  error code, and the final state with its message;
- its Details tab;
- the deployment's run form (parameters, descriptions, credential pickers, bounds).

It shows whatever the current flow produces: nothing about the flow is assumed beyond its
parameters `source`, `output` and `extractor`, and the manifest's documented format.
It prints the PNG paths and a check: each failed invoice key and its error code on the flow
run page, each parameter name on the form. Exit codes: 0 checks passed; 1 the flow run page
lacks a failed invoice or its code; 2 no Chromium, or the set-up failed.
"""

from __future__ import annotations

import argparse
import asyncio
import html
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))  # run as a script: make `flows`, `tasks` importable

from flows.local_server import temporary_server  # noqa: E402

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
WINDOW = "1600,1200"
# The UI is a single-page app: Chromium's virtual time lets it fetch and render before the
# screenshot or the DOM dump is taken.
VIRTUAL_TIME_MS = 15_000
BROWSER_TIMEOUT_S = 180.0
UI_START_TIMEOUT_S = 90.0
GOOD_INVOICES = 4  # the 4th carries a total mismatch: one needs_review as well

# flows.local_server starts its server with the UI switched off (PREFECT_UI_ENABLED=false),
# so the UI is Prefect's own UI app (the one `prefect server start` mounts at "/") in a
# process of its own, pointed at that server's API. Its static files are copied to a temp
# folder (PREFECT_UI_STATIC_DIRECTORY), not into the venv's prefect package.
UI_APP = (
    "import sys, uvicorn\n"
    "from prefect.server.api.server import create_ui_app\n"
    "uvicorn.run(create_ui_app(ephemeral=False), host='127.0.0.1', port=int(sys.argv[1]),"
    " log_level='warning')\n"
)


class SetupError(RuntimeError):
    """Something the screenshots need could not be set up (exit 2)."""


@dataclass
class Page:
    name: str
    url: str
    png: Path
    dom: Path


# --- Chromium -------------------------------------------------------------------------------

def find_browser() -> str | None:
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    return None


def ensure_browser() -> str:
    """A headless-capable Chromium on PATH, installing Debian's `chromium` if there is none."""
    if found := find_browser():
        return found
    apt = shutil.which("apt-get")
    if apt is None:
        raise SetupError("no chromium/chromium-browser/google-chrome on PATH and no apt-get "
                         "to install one: install Chromium and run again")
    prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]  # sudo only when not root
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print("installing Debian's chromium with apt-get (no browser on PATH)...", file=sys.stderr)
    for command in ([*prefix, apt, "update", "-qq"], [*prefix, apt, "install", "-y", "-qq", "chromium"]):
        done = subprocess.run(command, env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise SetupError(f"could not install chromium ({' '.join(command)} exited "
                             f"{done.returncode}: {tail[0]}): install it and run again")
    if found := find_browser():
        return found
    raise SetupError("apt-get installed chromium but no browser is on PATH")


def browser_command(browser: str, profile: Path, *extra: str) -> list[str]:
    return [
        browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
        "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
        f"--window-size={WINDOW}", f"--virtual-time-budget={VIRTUAL_TIME_MS}", *extra,
    ]


def capture(browser: str, page: Page, profile: Path) -> str:
    """Screenshot of `page` into page.png, its rendered DOM into page.dom; the DOM's text."""
    subprocess.run(
        browser_command(browser, profile, f"--screenshot={page.png}", page.url),
        stdin=subprocess.DEVNULL, capture_output=True, timeout=BROWSER_TIMEOUT_S, check=False,
    )
    if not page.png.exists():
        raise SetupError(f"chromium wrote no screenshot of {page.url}")
    dumped = subprocess.run(
        browser_command(browser, profile, "--dump-dom", page.url),
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S,
        check=False,
    )
    page.dom.write_text(dumped.stdout)
    return visible_text(dumped.stdout)


def visible_text(dom: str) -> str:
    """The text of a DOM dump, roughly as read on screen (scripts, styles and tags dropped)."""
    dom = re.sub(r"(?is)<(script|style|noscript)\b.*?</\1>", " ", dom)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))


# --- the Prefect side -----------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def ui_server(api_url: str, static_dir: Path) -> Iterator[str]:
    """Prefect's UI app on 127.0.0.1 for the duration of the block, talking to `api_url`;
    its base URL."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "PREFECT_UI_ENABLED": "true",
        "PREFECT_UI_API_URL": api_url,
        "PREFECT_UI_STATIC_DIRECTORY": str(static_dir),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    log = static_dir.parent / "ui-server.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen([sys.executable, "-c", UI_APP, str(port)], env=env,
                                   stdin=subprocess.DEVNULL, stdout=log_file,
                                   stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + UI_START_TIMEOUT_S
        # /ui-settings answers once the app is up; index.html once the files are copied.
        while not (_answers(f"{base}/ui-settings") and _answers(f"{base}/v2/")):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SetupError(f"the Prefect UI app did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def write_source(folder: Path) -> None:
    """Good invoices plus three broken ones: empty, not a PDF, a truncated PDF."""
    from tasks.samples import write_samples

    good = write_samples(folder, GOOD_INVOICES, seed=0)
    (folder / "empty.pdf").write_bytes(b"")
    (folder / "not-a-pdf.pdf").write_text("Invoice 42\nTotal: 100.00 EUR\n(this is text, not a PDF)\n")
    whole = good[0].read_bytes()
    (folder / "truncated.pdf").write_bytes(whole[: len(whole) // 2])


async def create_on_demand_deployment() -> UUID:
    """`process-invoices/on-demand` as prefect.yaml defines it (parameters, description,
    tags, pool and queue), on the `invoices` process pool as `prepare` would make it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    from deployments.serve import load_deployment_specs
    from flows.process_invoices import process_invoices

    spec = next(s for s in load_deployment_specs() if s["name"] == "on-demand")
    pool, queue = spec["work_pool"]["name"], spec["work_pool"]["work_queue_name"]
    async with get_client() as client:
        try:
            await client.read_work_pool(pool)
        except ObjectNotFound:
            await client.create_work_pool(WorkPoolCreate(
                name=pool, type=ProcessWorker.type,
                base_job_template=ProcessWorker.get_default_base_job_template()))
        try:
            await client.read_work_queue_by_name(queue, work_pool_name=pool)
        except ObjectNotFound:
            await client.create_work_queue(name=queue, work_pool_name=pool)
    deployment = await process_invoices.ato_deployment(
        name=spec["name"], description=spec.get("description"), tags=spec.get("tags"),
        parameters=spec.get("parameters") or {}, work_pool_name=pool, work_queue_name=queue,
    )
    return await deployment.aapply()


def failed_invoices(output: Path) -> dict[str, str]:
    """Failed invoice key -> error code, from the run's manifest (the documented format)."""
    manifest = json.loads((output / "manifest.json").read_text())
    return {key: entry.get("error_code") or "?" for key, entry in manifest["entries"].items()
            if entry.get("status") == "failed"}


def form_parameters() -> list[str]:
    from flows.process_invoices import process_invoices

    return list(process_invoices.parameters.properties)


# --- the script -----------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/ui-screenshots"),
                        help="folder for the PNGs and DOM dumps (default /tmp/ui-screenshots)")
    parser.add_argument("--ui", choices=["v2", "v1"], default="v2",
                        help="which Prefect UI: v2 (what the server opens by default) or v1")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, browser: str, work: Path) -> int:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cli import flush_to_server
    from flows.process_invoices import process_invoices

    source, output = work / "invoices", work / "out"
    write_source(source)
    args.out.mkdir(parents=True, exist_ok=True)
    with temporary_server() as api_url, temporary_settings(updates={PREFECT_API_URL: api_url}):
        deployment_id = asyncio.run(create_on_demand_deployment())
        try:
            state: Any = asyncio.run(process_invoices(
                source=str(source), output=str(output), extractor="offline", return_state=True))
        finally:
            flush_to_server()  # the run's logs reach the server before the pages are read
        flow_run_id = state.state_details.flow_run_id
        print(f"flow run {flow_run_id}: {state.type.value} {state.name}: {state.message}")
        failed = failed_invoices(output)
        print("failed invoices (manifest): "
              + (", ".join(f"{key} ({code})" for key, code in failed.items()) or "none"))

        with ui_server(api_url, work / "ui-static") as ui:
            root = ui if args.ui == "v1" else f"{ui}/v2"
            pages = [
                Page("flow-run-logs", f"{root}/runs/flow-run/{flow_run_id}?tab=Logs",
                     args.out / "flow-run-logs.png", args.out / "flow-run-logs.html"),
                Page("flow-run-details", f"{root}/runs/flow-run/{flow_run_id}?tab=Details",
                     args.out / "flow-run-details.png", args.out / "flow-run-details.html"),
                Page("deployment-run-form", f"{root}/deployments/deployment/{deployment_id}/run",
                     args.out / "deployment-run-form.png", args.out / "deployment-run-form.html"),
            ]
            texts = {page.name: capture(browser, page, work / "chromium-profile") for page in pages}

    for page in pages:
        print(f"{page.png}  ({page.url}; DOM: {page.dom})")
    for name, text in texts.items():
        if len(text.strip()) < 40:
            print(f"note: the DOM dump of {name} holds almost no text: rely on its screenshot")

    run_text = texts["flow-run-logs"] + " " + texts["flow-run-details"]
    missing = [f"{key} ({code})" for key, code in failed.items()
               if key not in run_text or code not in run_text]
    ok = bool(failed) and not missing
    print(f"check flow run page: {len(failed) - len(missing)} of {len(failed)} failed invoices "
          "shown with their error code"
          + (f"; missing: {', '.join(missing)}" if missing else "")
          + ("" if failed else " (no invoice failed: the run should have had failures)"))
    if state.message:
        print(f"check flow run page: state message {state.message!r} "
              + ("shown" if state.message in run_text else "NOT shown"))
    names = form_parameters()
    absent = [name for name in names if name not in texts["deployment-run-form"]]
    print(f"check run form: {len(names) - len(absent)} of {len(names)} parameter names shown"
          + (f"; not in the DOM: {', '.join(absent)}" if absent else ""))
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        browser = ensure_browser()
        with tempfile.TemporaryDirectory(prefix="ui-screenshots-") as work:
            return run(args, browser, Path(work))
    except SetupError as exc:
        print(f"ui_screenshots: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
