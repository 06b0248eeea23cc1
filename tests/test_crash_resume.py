"""Crash and resume: a run SIGKILLed mid-batch, then a rerun that finishes the batch.

Real parts: `invoices run` processes on one real `prefect server start`, the project's fake
OpenAI server (whose request count tells what was extracted), a local-folder bucket.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tasks.manifest.model import Manifest
from testing.fake_llm.server import FakeLLMConfig, FakeLLMServer
from testing.samples import write_samples

pytest_plugins = ["tests.reliability_report"]

N = 30
LEASE = 10.0  # claims and LLM slots of a dead run come free after this


def manifest_of(output: Path) -> Manifest:
    path = output / "manifest.json"
    return Manifest.model_validate_json(path.read_bytes()) if path.exists() else Manifest()


def start_run(source: Path, output: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows",
            "run",
            str(source),
            "--output",
            str(output),
            "--extractor",
            "openai",
            "--max-concurrency",
            "5",
            "--lease-seconds",
            str(LEASE),
            "--json",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the kill takes the parse workers too
    )


def test_a_killed_run_is_finished_by_the_next_without_redoing_done_invoices(
    prefect_server, tmp_path: Path, scenario
):
    source, output = tmp_path / "in", tmp_path / "out"
    keys = {p.name for p in write_samples(source, N, seed=40)}
    with FakeLLMServer(FakeLLMConfig(latency=1.5)) as llm:
        env = {
            **prefect_server.env,
            "OPENAI_BASE_URL": llm.base_url,
            "OPENAI_API_KEY": "sk-test-crash-resume",
        }

        first = start_run(source, output, env)
        deadline = time.monotonic() + 120
        while True:  # kill once some invoices are done and others are claimed in flight
            entries = manifest_of(output).entries.values()
            done = sum(e.status in ("done", "needs_review") for e in entries)
            if done >= 5 and any(e.status == "processing" for e in entries):
                break
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the first run made no progress"
            time.sleep(0.1)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()

        at_kill = manifest_of(output)
        finished = {k for k, e in at_kill.entries.items() if e.status in ("done", "needs_review")}
        claimed = {k for k, e in at_kill.entries.items() if e.status == "processing"}
        assert finished and claimed and finished | claimed <= keys
        requests_before = llm.stats()["total_requests"]

        started = time.monotonic()
        second = start_run(source, output, env)
        stdout, stderr = second.communicate(timeout=300)
        waited = time.monotonic() - started
        assert second.returncode == 0, stderr[-3000:]
        summary = json.loads(stdout)

        # Every invoice recorded once, final; what was done before the kill was not redone.
        final = manifest_of(output)
        assert set(final.entries) == keys
        assert all(e.status in ("done", "needs_review") for e in final.entries.values())
        assert llm.stats()["total_requests"] - requests_before == N - len(finished)
        assert summary["processed"] == N - len(finished)
        assert summary["skipped_done"] + summary["skipped_review"] == len(finished)
        assert summary["taken_over"] == len(claimed)
        for key in finished:  # untouched by the second run
            assert final.entries[key].flow_run_id == at_kill.entries[key].flow_run_id
        scenario.record(
            name="crash (SIGKILL mid-batch) and resume",
            invoices_in=N,
            manifest=final,
            expected_keys=keys,
            wall_s=waited,
            results=[json.loads(p.read_text())["key"] for p in (output / "results").glob("*.json")],
            note=f"{len(finished)} done before the kill, {len(claimed)} claimed in flight "
            f"(taken over), rerun {waited:.0f} s incl. the wait for the dead run's lock",
        )

    # The dead run's manifest-lock slot was freed by its Prefect lease, and the wait was
    # reported while it lasted, naming the holder: its task run and the dead flow run.
    assert re.search(
        r"for the manifest lock 'manifest:[^']+', held by task run 'update-manifest"
        r"[^']*' \([0-9a-f-]{36}, \w+\) of flow run '[\w-]+' \([0-9a-f-]{36}\)",
        stderr,
    ), stderr[-3000:]
    assert waited < 150
