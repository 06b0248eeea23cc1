"""The `invoices` command: help, sample generation, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from flows.cli import main


def invoices(*args: str, env=None, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_run_help_explains_every_option(capsys):
    try:
        main(["run", "--help"])
    except SystemExit as exit:
        assert exit.code == 0
    text = capsys.readouterr().out
    for option in (
        "source",
        "--output",
        "--extractor",
        "--max-concurrency",
        "--invoice-timeout",
        "--max-attempts",
        "--reprocess-needs-review",
        "--parse-executor",
        "--json",
    ):
        assert option in text


def test_samples_writes_invoices(tmp_path: Path, capsys):
    assert main(["samples", str(tmp_path), "--count", "3", "--seed", "9"]) == 0
    assert len(list(tmp_path.glob("*.pdf"))) == 3


def test_exit_code_1_when_an_invoice_failed_and_the_summary_says_why(
    prefect_server, tmp_path: Path
):
    source = tmp_path / "in"
    assert main(["samples", str(source), "--count", "2"]) == 0
    (source / "broken.pdf").write_bytes(b"%PDF-1.7\n garbage")
    proc = invoices(
        "run", str(source), "--output", str(tmp_path / "out"), "--json", env=prefect_server.env
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["counts"].get("failed") == 1
    failed = [row for row in summary["rows"] if row["status"] == "failed"]
    assert failed[0]["invoice"] == "broken.pdf" and failed[0]["reason"].startswith("pdf_damaged")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["entries"]["broken.pdf"]["error_code"] == "pdf_damaged"
