"""The flow on the LLM path: the unmodified openai client against the project's fake server."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client

from flows.process_invoices import process_invoices
from tasks.manifest.model import Manifest
from tasks.orchestration.limits import LLM_IN_FLIGHT_LIMIT, LLM_RATE_LIMIT
from testing.fake_llm.server import FakeLLMConfig, FakeLLMServer
from testing.samples import write_samples
from tests.conftest import read_artifacts

pytestmark = pytest.mark.usefixtures("prefect_harness")

API_KEY = "sk-test-" + "k3y" * 12


@pytest.fixture
def llm(monkeypatch):
    with FakeLLMServer(
        FakeLLMConfig(latency=0.05, require_api_key=API_KEY, retry_after=0.1)
    ) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
        monkeypatch.setenv("INVOICES_LLM_BACKOFF_BASE", "0.05")
        monkeypatch.setenv("INVOICES_LLM_TIMEOUT", "2")
        yield server


async def test_llm_flow_records_every_outcome_and_never_leaks_the_key(llm, tmp_path: Path, caplog):
    caplog.set_level(logging.DEBUG)
    source, output = tmp_path / "in", tmp_path / "out"
    write_samples(source, 8, seed=21)
    llm.fail_next("rate_limit", 2)  # retried, honouring Retry-After
    llm.fail_next("quota", 1)  # final: one invoice fails with llm_quota
    state = await process_invoices(
        source=str(source), output=str(output), extractor="auto", return_state=True
    )
    summary = await state.aresult(raise_on_failure=False)

    manifest = Manifest.model_validate_json((output / "manifest.json").read_bytes())
    assert len(manifest.entries) == 8
    failed = [e for e in manifest.entries.values() if e.status == "failed"]
    assert [e.error_code for e in failed] == ["llm_quota"]
    assert all(e.extractor == "openai" for e in manifest.entries.values())
    assert state.is_failed() and summary.failed == 1
    assert summary.prompt_tokens > 0 and summary.completion_tokens > 0
    assert llm.total_requests == 8 + 2  # 2 retried 429s; the quota failure is not retried
    for path in (output / "results").rglob("*.json"):
        result = json.loads(path.read_text())
        assert result["source"] == "llm" and result["prompt_tokens"] > 0

    # The key is nowhere: not in the manifest, results, logs or artifacts.
    written = [p.read_text() for p in output.rglob("*.json")]
    artifacts = await read_artifacts(flow_run_id=state.state_details.flow_run_id)
    assert {a.key for a in artifacts} >= {
        "invoice-run-summary",
        "invoice-run-report",
        "invoice-run-progress",
    }
    assert not any(API_KEY in text for text in written)
    assert API_KEY not in caplog.text
    assert not any(API_KEY in json.dumps(a.data, default=str) for a in artifacts)


async def test_llm_limits_are_created_and_cap_calls_in_flight(llm, tmp_path: Path):
    source, output = tmp_path / "in", tmp_path / "out"
    write_samples(source, 12, seed=4)
    llm.config.latency = 0.3
    async with get_client() as client:
        for name in (LLM_IN_FLIGHT_LIMIT, LLM_RATE_LIMIT):
            try:
                await client.delete_global_concurrency_limit_by_name(name)
            except Exception:
                pass
    from tasks.orchestration.limits import ensure_llm_limits

    await ensure_llm_limits(max_in_flight=3, requests_per_minute=6000)
    try:
        state = await process_invoices(
            source=str(source), output=str(output), extractor="openai", return_state=True
        )
        assert state.is_completed(), state.message
        assert llm.max_in_flight <= 3
        async with get_client() as client:
            limit = await client.read_global_concurrency_limit_by_name(LLM_IN_FLIGHT_LIMIT)
        assert limit.limit == 3  # the run used the operator's limit and did not override it
    finally:
        await ensure_llm_limits()  # the defaults again, for the other tests on this server


async def test_an_embedded_e_invoice_costs_no_llm_call(llm, tmp_path: Path):
    from testing.einvoice_xml import attach_einvoice, build_cii_xml
    from testing.samples import make_invoice

    source, output = tmp_path / "in", tmp_path / "out"
    source.mkdir()
    pdf, truth = make_invoice(3)
    (source / "facturx.pdf").write_bytes(attach_einvoice(pdf, build_cii_xml(truth)))
    (source / "plain.pdf").write_bytes(make_invoice(4)[0])
    state = await process_invoices(
        source=str(source), output=str(output), extractor="openai", return_state=True
    )
    assert state.is_completed(), state.message
    manifest = Manifest.model_validate_json((output / "manifest.json").read_bytes())
    result = json.loads((output / manifest.entries["facturx.pdf"].result_key).read_text())
    assert result["source"] == "embedded_xml" and result["prompt_tokens"] == 0
    assert llm.stats()["total_requests"] == 1  # only plain.pdf went to the LLM
