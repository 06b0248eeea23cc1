"""Failures where a Prefect user looks: the flow run's logs, its state message, its task
runs; and runs on one server that do not hold each other up. Every test runs the `invoices`
CLI against a real `prefect server start` and reads back through the Prefect API."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testing.fake_llm.server import FakeLLMConfig, FakeLLMServer
from testing.samples import write_samples
from tests.conftest import on_server

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples" / "invoices"
NEEDS_REVIEW = "invoice-0004-compact-total-mismatch.pdf"  # its total does not add up
BROKEN = {
    "empty.pdf": (b"", "empty_file"),
    "not-a-pdf.pdf": (b"Dear customer, plain text.\n" * 20, "not_a_pdf"),
}


@pytest.fixture
def batch(tmp_path: Path) -> Path:
    """Two good invoices, one that needs review and two broken ones."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("invoice-0001-classic.pdf", "invoice-0003-german.pdf", NEEDS_REVIEW):
        (folder / name).write_bytes((SAMPLES / name).read_bytes())
    for name, (data, _) in BROKEN.items():
        (folder / name).write_bytes(data)
    return folder


def invoices_run(
    prefect_server, source: Path, output: Path, *args: str, env=None, wait: bool = True
):
    command = [
        sys.executable,
        "-m",
        "flows",
        "run",
        str(source),
        "--output",
        str(output),
        "--json",
        *args,
    ]
    environment = {**prefect_server.env, **(env or {})}
    if not wait:
        return subprocess.Popen(
            command,
            cwd=ROOT,
            env=environment,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    return subprocess.run(
        command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300
    )


def run_logs(prefect_server, flow_run_id: str):
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async def read(client):
        return await client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )

    return on_server(prefect_server, read)


def task_runs(prefect_server, flow_run_id: str, *, final: int):
    """The flow run's task runs, once `final` of them are in a final state: the server
    records task runs from their events, which may arrive after the run has ended."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read(client):
        for _ in range(60):
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            if sum(run.state is not None and run.state.is_final() for run in runs) >= final:
                break
            await asyncio.sleep(0.5)
        return runs

    return on_server(prefect_server, read)


def test_each_failure_is_a_warning_of_the_run_and_the_state_names_the_codes(
    prefect_server, batch, tmp_path
):
    proc = invoices_run(prefect_server, batch, tmp_path / "out", "--extractor", "offline")
    assert proc.returncode == 1, proc.stderr[-3000:]
    flow_run_id = json.loads(proc.stdout)["flow_run_id"]

    flow_run = on_server(prefect_server, lambda client: client.read_flow_run(flow_run_id))
    assert flow_run.state.is_failed()
    assert flow_run.state.message == "2 of 5 failed: empty_file 1, not_a_pdf 1"

    # Under Prefect's default logging (no PREFECT_LOGGING_SETTINGS_PATH): what the flow run
    # page shows, at WARNING or above.
    warnings = [log.message for log in run_logs(prefect_server, flow_run_id) if log.level >= 30]
    for name, (_, code) in BROKEN.items():
        assert any(line.startswith(f"{name} failed") and code in line for line in warnings), (
            warnings
        )
    review = [line for line in warnings if line.startswith(f"{NEEDS_REVIEW} needs_review")]
    assert review and "total" in review[0], warnings
    assert "2 of 5 failed: empty_file 1, not_a_pdf 1" in warnings

    # The chunk's task run holding the failures is not Completed.
    # 3 task runs: the chunk, update-manifest, publish-summary.
    [chunk] = [
        run
        for run in task_runs(prefect_server, flow_run_id, final=3)
        if run.name.startswith(sorted(p.name for p in batch.iterdir())[0])
    ]
    assert chunk.state.is_failed() and chunk.state.message.startswith("2 of 5 failed")


def test_chunk_size_one_gives_a_task_run_per_invoice_in_its_outcome_state(
    prefect_server, batch, tmp_path
):
    proc = invoices_run(
        prefect_server, batch, tmp_path / "out", "--extractor", "offline", "--chunk-size", "1"
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    flow_run_id = json.loads(proc.stdout)["flow_run_id"]
    runs = {
        run.name: run
        for run in task_runs(prefect_server, flow_run_id, final=7)
        if run.task_key.startswith("process_chunk_task")
    }
    assert set(runs) == {path.name for path in batch.iterdir()}
    for name, (_, code) in BROKEN.items():
        assert runs[name].state.is_failed() and runs[name].state.message.startswith(code)
    assert (
        runs[NEEDS_REVIEW].state.is_completed() and runs[NEEDS_REVIEW].state.name == "NeedsReview"
    )
    for name in ("invoice-0001-classic.pdf", "invoice-0003-german.pdf"):
        assert runs[name].state.is_completed() and runs[name].state.name == "Completed"


def test_a_run_on_another_output_is_not_held_up_by_a_long_runs_lock_session(
    prefect_server, tmp_path
):
    """Run A keeps its manifest lock session busy (LLM answers trickle in for ~15 s); run B,
    on another output, starts once A holds its lock and must finish while A still runs."""
    write_samples(tmp_path / "a", 30, seed=1)
    write_samples(tmp_path / "b", 2, seed=2)
    with FakeLLMServer(FakeLLMConfig(latency=1.5)) as llm:
        long_run = invoices_run(
            prefect_server,
            tmp_path / "a",
            tmp_path / "out-a",
            "--extractor",
            "openai",
            "--max-concurrency",
            "3",
            env={"OPENAI_BASE_URL": llm.base_url},
            wait=False,
        )
        try:
            deadline = time.monotonic() + 120
            while not (tmp_path / "out-a" / "manifest.json").exists():  # A holds its lock
                assert long_run.poll() is None and time.monotonic() < deadline, (
                    long_run.communicate()
                )
                time.sleep(0.2)
            other = invoices_run(
                prefect_server, tmp_path / "b", tmp_path / "out-b", "--extractor", "offline"
            )
            a_still_running = long_run.poll() is None
        finally:
            out, err = long_run.communicate(timeout=300)
    assert other.returncode == 0, other.stderr[-3000:]
    assert a_still_running, "run A ended before B: the test did not overlap them"
    assert "for the manifest lock" not in other.stderr
    assert long_run.returncode == 0, err[-3000:]
    assert json.loads(out)["processed"] == 30 and json.loads(other.stdout)["processed"] == 2


def test_a_run_on_its_own_temporary_server_shows_progress_and_no_dead_link(tmp_path):
    """Without PREFECT_API_URL the run has a server of its own, without a UI and gone when
    it ends: it links to no page there, and its progress is shown on stderr instead."""
    import os

    write_samples(tmp_path / "in", 2, seed=3)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "home")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows",
            "run",
            str(tmp_path / "in"),
            "--output",
            str(tmp_path / "out"),
            "--extractor",
            "offline",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "View at" not in proc.stderr
    assert "progress: 2/2 processed (2 done, 0 needs_review, 0 failed)" in proc.stderr


@pytest.fixture
def small_llm_limit(prefect_server):
    """The server's `llm-in-flight` limit at 4 for one test, then back to the default."""
    from tasks.orchestration.limits import ensure_llm_limits

    on_server(
        prefect_server,
        lambda client: ensure_llm_limits(max_in_flight=4, requests_per_minute=60_000),
    )
    yield 4
    on_server(prefect_server, lambda client: ensure_llm_limits())


def test_two_llm_runs_on_one_server_both_progress(prefect_server, small_llm_limit, tmp_path):
    """Run A has plenty of LLM work for the 4 slots of the server; run B (another output,
    a few invoices) starts while A is busy and must finish while A still runs: A shares."""
    write_samples(tmp_path / "a", 40, seed=4)
    write_samples(tmp_path / "b", 4, seed=5)
    with FakeLLMServer(FakeLLMConfig(latency=1.5)) as llm:
        env = {"OPENAI_BASE_URL": llm.base_url}
        long_run = invoices_run(
            prefect_server,
            tmp_path / "a",
            tmp_path / "out-a",
            "--extractor",
            "openai",
            env=env,
            wait=False,
        )
        try:
            deadline = time.monotonic() + 120
            while not (tmp_path / "out-a" / "manifest.json").exists():  # A is at work
                assert long_run.poll() is None and time.monotonic() < deadline, (
                    long_run.communicate()
                )
                time.sleep(0.2)
            started = time.monotonic()
            other = invoices_run(
                prefect_server, tmp_path / "b", tmp_path / "out-b", "--extractor", "openai", env=env
            )
            b_seconds = time.monotonic() - started
            a_still_running = long_run.poll() is None
        finally:
            out, err = long_run.communicate(timeout=300)
    assert other.returncode == 0, other.stderr[-3000:]
    assert long_run.returncode == 0, err[-3000:]
    assert json.loads(other.stdout)["processed"] == 4 and json.loads(out)["processed"] == 40
    assert a_still_running, f"B took {b_seconds:.0f} s and ended after A: it waited for A's slots"
