"""Screenshots of what a Prefect user sees of the invoice pipeline in the Prefect UI.

    .venv/bin/python scripts/ui_screenshots.py [--out /tmp/ui-screenshots] [--ui v2|v1]

On a temporary Prefect server (flows.local_server, with a Prefect home of its own) it creates
the deployment `process-invoices/on-demand` as prefect.yaml defines it, runs the flow in this
process over a folder of good and broken invoices, and takes headless-Chromium screenshots
(and DOM dumps) into --out of:

- flow-run-logs.png: the flow run page, Logs tab (a line per invoice, the final state);
- flow-run-details.png: its Details tab (the state message);
- run-form-on-demand.png: the deployment's run form as it opens (parameters, descriptions,
  bounds; credentials default to None);
- run-form-on-demand-blocks.png: the same form after choosing each credential parameter's
  block type, so its block picker shows (with placeholder blocks on the server to pick).

It shows whatever the current flow produces: nothing about the flow is assumed beyond its
parameters `source`, `output` and `extractor`, and the manifest's documented format.
It prints the PNG paths and a check: each failed invoice key and its error code on the flow
run page, each parameter name on the form. Exit codes: 0 checks passed; 1 the flow run page
lacks a failed invoice or its code; 2 no Chromium, or the set-up failed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import html
import json
import os
import re
import shutil
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

from flows.local_server import free_port, stop_process, temporary_server  # noqa: E402

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
WIDTH, HEIGHT = 1600, 1200
# The logs list and the run form are long columns: taller windows show them whole.
LOGS_HEIGHT, FORM_HEIGHT = 1900, 2600
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
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
    height: int = HEIGHT


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
        raise SetupError(
            "no chromium/chromium-browser/google-chrome on PATH and no apt-get "
            "to install one: install Chromium and run again"
        )
    prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]  # sudo only when not root
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print("installing Debian's chromium with apt-get (no browser on PATH)...", file=sys.stderr)
    for command in (
        [*prefix, apt, "update", "-qq"],
        [*prefix, apt, "install", "-y", "-qq", "chromium"],
    ):
        done = subprocess.run(
            command, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True
        )
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise SetupError(
                f"could not install chromium ({' '.join(command)} exited "
                f"{done.returncode}: {tail[0]}): install it and run again"
            )
    if found := find_browser():
        return found
    raise SetupError("apt-get installed chromium but no browser is on PATH")


def browser_command(browser: str, profile: Path, height: int, *extra: str) -> list[str]:
    return [
        browser,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        f"--window-size={WIDTH},{height}",
        *extra,
    ]


def capture(browser: str, page: Page, profile: Path) -> str:
    """Screenshot of `page` into page.png, its rendered DOM into page.dom; the DOM's text."""
    budget = f"--virtual-time-budget={VIRTUAL_TIME_MS}"
    subprocess.run(
        browser_command(
            browser, profile, page.height, budget, f"--screenshot={page.png}", page.url
        ),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=BROWSER_TIMEOUT_S,
        check=False,
    )
    if not page.png.exists():
        raise SetupError(f"chromium wrote no screenshot of {page.url}")
    dumped = subprocess.run(
        browser_command(browser, profile, page.height, budget, "--dump-dom", page.url),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=BROWSER_TIMEOUT_S,
        check=False,
    )
    page.dom.write_text(dumped.stdout)
    return visible_text(dumped.stdout)


# The type switch of an `X | None` parameter: tabs in the v2 UI (Radix: they switch on
# mousedown, not on click, so both are sent, as a mouse would), a button group in v1.
CHOOSE_TABS_JS = """(names) => {
  const tabs = [...document.querySelectorAll('[role=tab], .p-button-group__button')]
    .filter((tab) => names.includes(tab.textContent.trim()));
  for (const tab of tabs) {
    tab.dispatchEvent(new MouseEvent('mousedown', {bubbles: true, cancelable: true, button: 0}));
    tab.click();
  }
  return tabs.length;
}"""


def capture_with_tabs_chosen(browser: str, page: Page, tabs: list[str], profile: Path) -> str:
    """Like `capture`, after choosing the form's tabs named `tabs` (the block type of each
    `Block | None` parameter, None by default), through Chromium's DevTools protocol: what a
    user sees after picking "AwsCredentials" rather than "None"."""
    from websockets.sync.client import connect

    port = free_port()
    process = subprocess.Popen(
        browser_command(
            browser, profile, page.height, f"--remote-debugging-port={port}", "about:blank"
        ),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        targets: list[dict[str, Any]] = []
        while not targets:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SetupError("chromium's DevTools endpoint did not come up")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                    targets = [t for t in json.load(r) if t.get("type") == "page"]
            except OSError:
                time.sleep(0.2)
        with connect(targets[0]["webSocketDebuggerUrl"], max_size=None) as ws:
            ids = iter(range(1, 1_000_000))

            def call(method: str, **params: Any) -> dict[str, Any]:
                sent = next(ids)
                ws.send(json.dumps({"id": sent, "method": method, "params": params}))
                while True:  # skip events until the answer to this call
                    message = json.loads(ws.recv(timeout=BROWSER_TIMEOUT_S))
                    if message.get("id") == sent:
                        return message.get("result", {})

            def evaluate(expression: str) -> Any:
                result = call("Runtime.evaluate", expression=expression, returnByValue=True)
                return result.get("result", {}).get("value")

            call("Page.navigate", url=page.url)
            chosen, deadline = 0, time.monotonic() + VIRTUAL_TIME_MS / 1000
            while chosen < len(tabs) and time.monotonic() < deadline:  # the form renders late
                time.sleep(0.5)
                chosen = evaluate(f"({CHOOSE_TABS_JS})({json.dumps(tabs)})") or 0
            if chosen < len(tabs):
                print(f"note: {page.name}: found {chosen} of the tabs {', '.join(tabs)} to choose")
            time.sleep(3)  # the pickers fetch the block documents of their type
            shot = call("Page.captureScreenshot", format="png")
            page.png.write_bytes(base64.b64decode(shot["data"]))
            dom = evaluate("document.documentElement.outerHTML") or ""
            call("Browser.close")
    finally:
        if process.poll() is None:
            process.terminate()
        process.wait(timeout=30)
    page.dom.write_text(dom)
    return visible_text(dom)


def visible_text(dom: str) -> str:
    """The text of a DOM dump, roughly as read on screen (scripts, styles and tags dropped)."""
    dom = re.sub(r"(?is)<(script|style|noscript)\b.*?</\1>", " ", dom)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))


# --- the Prefect side -----------------------------------------------------------------------


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
    port = free_port()
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
        process = subprocess.Popen(
            [sys.executable, "-c", UI_APP, str(port)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + UI_START_TIMEOUT_S
        # /ui-settings answers once the app is up; index.html once the files are copied.
        while not (_answers(f"{base}/ui-settings") and _answers(f"{base}/v2/")):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SetupError(f"the Prefect UI app did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield base
    finally:
        stop_process(process, timeout=10)


def write_source(folder: Path) -> None:
    """Good invoices plus three broken ones: empty, not a PDF, a truncated PDF."""
    from testing.samples import write_samples

    good = write_samples(folder, GOOD_INVOICES, seed=0)
    (folder / "empty.pdf").write_bytes(b"")
    (folder / "not-a-pdf.pdf").write_text(
        "Invoice 42\nTotal: 100.00 EUR\n(this is text, not a PDF)\n"
    )
    whole = good[0].read_bytes()
    (folder / "truncated.pdf").write_bytes(whole[: len(whole) // 2])


async def ensure_pool_and_queue(pool: str, queue: str) -> None:
    """The `process` work pool and queue a deployment names, as `prepare` would make them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    async with get_client() as client:
        try:
            await client.read_work_pool(pool)
        except ObjectNotFound:
            await client.create_work_pool(
                WorkPoolCreate(
                    name=pool,
                    type=ProcessWorker.type,
                    base_job_template=ProcessWorker.get_default_base_job_template(),
                )
            )
        try:
            await client.read_work_queue_by_name(queue, work_pool_name=pool)
        except ObjectNotFound:
            await client.create_work_queue(name=queue, work_pool_name=pool)


async def create_deployment(name: str) -> UUID:
    """The deployment `name` of prefect.yaml (parameters, description, tags, pool and
    queue; schedules left out: this server schedules no runs); its id."""
    from prefect.deployments.runner import DeploymentApplyError

    from deployments.serve import load_deployment_specs
    from flows.process_invoices import process_invoices

    spec = next((s for s in load_deployment_specs() if s["name"] == name), None)
    if spec is None:
        raise SetupError(f"prefect.yaml defines no deployment {name!r}")
    pool, queue = spec["work_pool"]["name"], spec["work_pool"]["work_queue_name"]
    parameters = spec.get("parameters") or {}
    await ensure_pool_and_queue(pool, queue)
    # prefect.yaml and the flow are edited apart: say when a default names a parameter the
    # flow no longer has.
    unknown = sorted(set(parameters) - set(flow_parameters()))
    if unknown:
        print(
            f"note: prefect.yaml's {name} sets parameters the flow does not have: "
            f"{', '.join(unknown)}"
        )
    deployment = await process_invoices.ato_deployment(
        name=name,
        description=spec.get("description"),
        tags=spec.get("tags"),
        parameters=parameters,
        work_pool_name=pool,
        work_queue_name=queue,
    )
    try:
        return await deployment.aapply()
    except DeploymentApplyError as exc:
        raise SetupError(f"the server refused the deployment {name!r}: {str(exc)[:500]}") from exc


async def create_placeholder_blocks() -> list[str]:
    """Blocks of the credential types, named as deployments/README.md names them, so the
    pickers have something to offer, as on a server `deployments.prepare` has set up. No
    keys in them: this server lives only as long as the script."""
    from prefect.blocks.system import Secret
    from prefect_aws import AwsCredentials

    await AwsCredentials(region_name="eu-central-1").asave("invoices-aws", overwrite=True)
    await Secret(value="placeholder, not a key").asave("openai-api-key", overwrite=True)
    return ["invoices-aws", "openai-api-key"]


def failed_invoices(output: Path) -> dict[str, str]:
    """Failed invoice key -> error code, from the run's manifest (the documented format)."""
    manifest = json.loads((output / "manifest.json").read_text())
    return {
        key: entry.get("error_code") or "?"
        for key, entry in manifest["entries"].items()
        if entry.get("status") == "failed"
    }


def flow_parameters() -> dict[str, dict[str, Any]]:
    """The flow's parameter schema, name -> JSON schema, in the order of its signature."""
    from flows.process_invoices import process_invoices

    properties = process_invoices.parameters.model_dump()["properties"]
    return dict(sorted(properties.items(), key=lambda item: item[1].get("position", 0)))


def block_type_titles() -> list[str]:
    """The titles of the block types the flow's parameters take (AwsCredentials, Secret):
    the names of their tabs in the run form."""
    from flows.process_invoices import process_invoices

    definitions = process_invoices.parameters.model_dump().get("definitions") or {}
    return [d.get("title", name) for name, d in definitions.items() if "block_type_slug" in d]


def shown_on_a_log_line(text: str, key: str, code: str) -> str | None:
    """The level of the first log line naming `key` with `code` after it, "?" when the
    level is not just before it, None when no such line is on the page."""
    # The v1 UI writes the level as "Warning" (upper case by its style sheet).
    for found in re.finditer(
        rf"(?:\b({'|'.join(LEVELS)})\s+)?{re.escape(key)}\b.{{0,300}}?"
        rf"\b{re.escape(code)}\b",
        text,
        flags=re.IGNORECASE,
    ):
        return (found.group(1) or "?").upper()
    return None


def form_bounds(dom: str, parameters: dict[str, dict[str, Any]]) -> list[str]:
    """`name: min..max` of each number input of the form beside the schema's bounds; the
    form renders the numeric parameters' inputs in signature order."""
    numeric = [
        name for name, schema in parameters.items() if schema.get("type") in ("integer", "number")
    ]
    inputs = re.findall(r'<input\b[^>]*\btype="number"[^>]*>', dom)
    if len(inputs) != len(numeric):
        return [f"{len(inputs)} number inputs for {len(numeric)} numeric parameters: not matched"]
    lines = []
    for name, tag in zip(numeric, inputs, strict=False):
        attrs = dict(re.findall(r'\b(min|max)="([^"]*)"', tag))
        schema = parameters[name]
        wanted = {
            k: schema[k]
            for k in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")
            if k in schema
        }
        form = f"{attrs.get('min', '')}..{attrs.get('max', '')}" if attrs else "no bounds"
        lines.append(f"{name}: form {form}; schema {wanted or 'none'}")
    return lines


# --- the script -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("/tmp/ui-screenshots"),
        help="folder for the PNGs and DOM dumps (default /tmp/ui-screenshots)",
    )
    parser.add_argument(
        "--ui",
        choices=["v2", "v1"],
        default="v2",
        help="which Prefect UI: v2 (what the server opens by default) or v1",
    )
    return parser.parse_args(argv)


def run(args: argparse.Namespace, browser: str, work: Path) -> int:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cli import flush_to_server
    from flows.process_invoices import process_invoices

    source, output = work / "invoices", work / "out"
    write_source(source)
    args.out.mkdir(parents=True, exist_ok=True)
    with temporary_server() as api_url, temporary_settings(updates={PREFECT_API_URL: api_url}):
        deployment_id = asyncio.run(create_deployment("on-demand"))
        try:
            state: Any = asyncio.run(
                process_invoices(
                    source=str(source), output=str(output), extractor="offline", return_state=True
                )
            )
        finally:
            flush_to_server()  # the run's logs reach the server before the pages are read
        flow_run_id = state.state_details.flow_run_id
        print(f"flow run {flow_run_id}: {state.type.value} {state.name}: {state.message}")
        failed = failed_invoices(output)
        print(
            "failed invoices (manifest): "
            + (", ".join(f"{key} ({code})" for key, code in failed.items()) or "none")
        )

        with ui_server(api_url, work / "ui-static") as ui:
            root = ui if args.ui == "v1" else f"{ui}/v2"
            pages = [
                Page(
                    "flow-run-logs",
                    f"{root}/runs/flow-run/{flow_run_id}?tab=Logs",
                    args.out / "flow-run-logs.png",
                    args.out / "flow-run-logs.html",
                    height=LOGS_HEIGHT,
                ),
                Page(
                    "flow-run-details",
                    f"{root}/runs/flow-run/{flow_run_id}?tab=Details",
                    args.out / "flow-run-details.png",
                    args.out / "flow-run-details.html",
                ),
                Page(
                    "run-form-on-demand",
                    f"{root}/deployments/deployment/{deployment_id}/run",
                    args.out / "run-form-on-demand.png",
                    args.out / "run-form-on-demand.html",
                    height=FORM_HEIGHT,
                ),
            ]
            texts = {page.name: capture(browser, page, work / "chromium-profile") for page in pages}
            # The credential parameters default to None: their block pickers show only once
            # their block type is chosen, so one more picture with those tabs chosen (and
            # blocks on the server to pick from).
            if blocks := block_type_titles():
                print("blocks to pick from: " + ", ".join(asyncio.run(create_placeholder_blocks())))
                chosen = Page(
                    "run-form-on-demand-blocks",
                    pages[2].url,
                    args.out / "run-form-on-demand-blocks.png",
                    args.out / "run-form-on-demand-blocks.html",
                    height=FORM_HEIGHT,
                )
                texts[chosen.name] = capture_with_tabs_chosen(
                    browser, chosen, blocks, work / "chromium-profile"
                )
                pages.append(chosen)

    for page in pages:
        print(f"{page.png}  ({page.url}; DOM: {page.dom})")
    for name, text in texts.items():
        if len(text.strip()) < 40:
            print(f"note: the DOM dump of {name} holds almost no text: rely on its screenshot")

    # The failures must be on the run's log lines (key, then its code), not just counted.
    levels = {
        key: shown_on_a_log_line(texts["flow-run-logs"], key, code) for key, code in failed.items()
    }
    missing = [f"{key} ({failed[key]})" for key, level in levels.items() if level is None]
    ok = bool(failed) and not missing
    print(
        f"check flow run page: {len(failed) - len(missing)} of {len(failed)} failed invoices "
        "on a log line with their error code"
        + "".join(f"\n  {level} {key} ({failed[key]})" for key, level in levels.items() if level)
        + (f"\n  missing: {', '.join(missing)}" if missing else "")
        + ("" if failed else " (no invoice failed: the run should have had failures)")
    )
    if state.message:
        for name in ("flow-run-logs", "flow-run-details"):
            print(
                f"check flow run page: state message {state.message!r} "
                + ("shown" if state.message in texts[name] else "NOT shown")
                + f" on {name}"
            )
    parameters = flow_parameters()
    absent = [name for name in parameters if name not in texts["run-form-on-demand"]]
    print(
        f"check run form: {len(parameters) - len(absent)} of {len(parameters)} parameter names "
        "shown" + (f"; not in the DOM: {', '.join(absent)}" if absent else "")
    )
    print(
        "check run form: numeric bounds (form input min..max; flow schema)"
        + "".join(
            f"\n  {line}"
            for line in form_bounds((args.out / "run-form-on-demand.html").read_text(), parameters)
        )
    )
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        browser = ensure_browser()
        with tempfile.TemporaryDirectory(prefix="ui-screenshots-") as work:
            # A Prefect home of its own: without it the server would use ~/.prefect/prefect.db
            # (other runs' deployments, flow runs and concurrency slots), and the pictures
            # would not be those of a fresh machine. Set before Prefect is imported.
            assert "prefect" not in sys.modules, "Prefect imported before PREFECT_HOME was set"
            os.environ["PREFECT_HOME"] = str(Path(work) / "prefect-home")
            return run(args, browser, Path(work))
    except SetupError as exc:
        print(f"ui_screenshots: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
