"""JSON log lines (deployments/logging.yml) and the human default, on real runs of the CLI."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from deployments.log_context import CONTEXT_FIELDS, JsonLinesFormatter, RunContextFilter

ROOT = Path(__file__).resolve().parents[1]
LOGGING_YML = ROOT / "deployments" / "logging.yml"
SAMPLES = ROOT / "samples" / "invoices"
INVOICES = ["invoice-0001-classic.pdf", "invoice-0004-compact-total-mismatch.pdf"]


@pytest.fixture
def batch(tmp_path: Path) -> Path:
    """Two sample invoices and a broken one, in a folder."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name in INVOICES:
        (folder / name).write_bytes((SAMPLES / name).read_bytes())
    (folder / "broken.pdf").write_bytes(b"not a pdf\n" * 20)
    return folder


def run_cli(prefect_server, source: Path, output: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "flows",
            "run",
            str(source),
            "--output",
            str(output),
            "--extractor",
            "offline",
            "--no-progress",
        ],
        cwd=ROOT,
        env={**prefect_server.env, **env},
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_json_lines_carry_run_ids_invoice_stage_and_duration(prefect_server, batch, tmp_path):
    proc = run_cli(
        prefect_server, batch, tmp_path / "out", PREFECT_LOGGING_SETTINGS_PATH=str(LOGGING_YML)
    )
    assert proc.returncode == 1, proc.stderr[-4000:]  # broken.pdf failed, and was recorded
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines
    records = []
    for line in lines:  # every line on stderr is one JSON object
        record = json.loads(line)
        assert isinstance(record, dict) and {"timestamp", "level", "logger", "message"} <= set(
            record
        )
        records.append(record)

    flow_run_ids = {r["flow_run_id"] for r in records if r["logger"] == "prefect.flow_runs"}
    assert len(flow_run_ids) == 1 and None not in flow_run_ids
    [flow_run_id] = flow_run_ids
    uuid.UUID(flow_run_id)

    # One line per invoice, from the run's own logger (so it reaches the API under any logging).
    ours = [r for r in records if r.get("invoice_key") and r["logger"] == "prefect.task_runs"]
    assert {r["invoice_key"] for r in ours} == {*INVOICES, "broken.pdf"}
    for r in ours:
        assert r["flow_run_id"] == flow_run_id
        uuid.UUID(r["task_run_id"])
        assert r["task_run_name"].startswith(sorted([*INVOICES, "broken.pdf"])[0])
        assert r["stage"] in ("done", "needs_review", "failed")
        assert isinstance(r["duration_s"], float) and r["duration_s"] >= 0
        assert r["invoice_key"] in r["message"]
    assert len({r["task_run_id"] for r in ours}) == 1  # one chunk: fewer invoices than chunk_size
    broken = next(r for r in ours if r["invoice_key"] == "broken.pdf")
    assert broken["stage"] == "failed" and broken["error_code"]
    assert broken["level"] == "WARNING"
    # The pipeline's module records are joined on the same ids.
    stages = [r for r in records if r["logger"] == "tasks.pipeline"]
    assert {r["task_run_id"] for r in stages} <= {r["task_run_id"] for r in ours}


def test_without_the_switch_the_console_stays_human(prefect_server, batch, tmp_path):
    proc = run_cli(prefect_server, batch, tmp_path / "out")
    assert proc.returncode == 1, proc.stderr[-4000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert any(" | INFO    | Flow run " in line for line in lines), proc.stderr[-3000:]
    for line in lines:
        assert not line.lstrip().startswith("{"), line
    assert "broken.pdf" in proc.stdout  # the summary table


def make_record(msg: str, *args, **extra) -> logging.LogRecord:
    record = logging.getLogger("tasks.pipeline").makeRecord(
        "tasks.pipeline", logging.INFO, __file__, 1, msg, args, None, extra=extra or None
    )
    return record


def test_filter_outside_runs_sets_empty_context_and_keeps_existing_values():
    record = make_record("x")
    assert RunContextFilter().filter(record) is True
    assert all(getattr(record, name) is None for name in CONTEXT_FIELDS)
    given = make_record("y", flow_run_id="abc")
    RunContextFilter().filter(given)
    assert given.flow_run_id == "abc" and given.task_run_id is None


def test_formatter_renders_the_message_and_survives_odd_arguments():
    class Opaque:
        def __repr__(self) -> str:
            return "<opaque>"

    record = make_record(
        "%s took %.1fs", Opaque(), 1.25, invoice_key="a.pdf", stage="parse", duration_s=1.25
    )
    RunContextFilter().filter(record)
    line = JsonLinesFormatter().format(record)
    assert "\n" not in line
    data = json.loads(line)
    assert data["message"] == "<opaque> took 1.2s"
    assert (
        data["invoice_key"] == "a.pdf" and data["stage"] == "parse" and data["duration_s"] == 1.25
    )
    assert "args" not in data and "msg" not in data and data["flow_run_id"] is None
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("tasks").makeRecord(
            "tasks", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    data = json.loads(JsonLinesFormatter().format(record))
    assert data["exc_info"]["type"] == "ValueError" and "boom" in data["exc_info"]["message"]
