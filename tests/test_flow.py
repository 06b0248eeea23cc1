"""The process-invoices flow end to end, on a local folder and on S3 (moto over HTTP)."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from pathlib import Path

import boto3
import fitz
import pytest

from flows.process_invoices import process_invoices
from tasks.manifest.model import Manifest
from testing.samples import write_samples
from tests.conftest import read_artifacts

pytestmark = pytest.mark.usefixtures("prefect_harness")


def encrypted_pdf() -> bytes:
    doc = fitz.open()
    doc.new_page().insert_text((72, 72), "Invoice INV-1 Total 10.00")
    return doc.tobytes(encryption=fitz.PDF_ENCRYPT_AES_256, owner_pw="o", user_pw="secret")


BAD_INPUTS = {
    "bad/empty.pdf": (b"", "empty_file"),
    "bad/not-a-pdf.pdf": (b"Dear customer, this is plain text.\n" * 20, "not_a_pdf"),
    "bad/encrypted.pdf": (encrypted_pdf(), "pdf_encrypted"),
}


async def run(source: str, output: str, **kw):
    state = await process_invoices(
        source=source, output=output, extractor="offline", return_state=True, **kw
    )
    return state, await state.aresult(raise_on_failure=False)


async def test_local_folder_end_to_end_then_rerun_skips_done(tmp_path: Path):
    source, output = tmp_path / "in", tmp_path / "out"
    pdfs = write_samples(source, 6, seed=11)
    state, summary = await run(str(source), str(output))
    assert state.is_completed(), state.message
    assert summary.processed == 6 and summary.failed == 0
    manifest = Manifest.model_validate_json((output / "manifest.json").read_bytes())
    assert set(manifest.entries) == {p.name for p in pdfs}
    for key, entry in manifest.entries.items():
        assert entry.status in ("done", "needs_review")
        result = json.loads((output / entry.result_key).read_text())
        assert result["key"] == key and result["invoice"]["total"] is not None
    assert summary.manifest_writes <= 6

    again, summary2 = await run(str(source), str(output))
    assert again.is_completed() and summary2.processed == 0
    assert summary2.skipped_done + summary2.skipped_review == 6


async def test_bad_inputs_are_recorded_failures_and_the_run_fails_after_recording(tmp_path: Path):
    source, output = tmp_path / "in", tmp_path / "out"
    good = write_samples(source, 3, seed=5)
    for key, (data, _) in BAD_INPUTS.items():
        (source / key).parent.mkdir(parents=True, exist_ok=True)
        (source / key).write_bytes(data)
    state, _summary = await run(str(source), str(output))
    assert state.is_failed()
    assert state.message == "3 of 6 failed: " + ", ".join(
        f"{code} 1" for code in sorted(code for _, code in BAD_INPUTS.values())
    )
    manifest = Manifest.model_validate_json((output / "manifest.json").read_bytes())
    assert len(manifest.entries) == 6
    for key, (_, code) in BAD_INPUTS.items():
        entry = manifest.entries[key]
        assert (entry.status, entry.error_code) == ("failed", code)
        assert entry.error_message and entry.result_key is None
    for path in good:
        assert manifest.entries[path.name].status in ("done", "needs_review")

    tolerant, _ = await run(str(source), str(output), fail_on_invoice_errors=False)
    assert tolerant.is_completed()
    retried = Manifest.model_validate_json((output / "manifest.json").read_bytes())
    assert retried.entries["bad/empty.pdf"].attempts == 2


async def test_s3_end_to_end_with_summary_artifact(moto_endpoint, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    s3 = boto3.client("s3", endpoint_url=moto_endpoint)
    pdfs = write_samples(tmp_path / "gen", 5, seed=3)
    for path in pdfs:
        s3.put_object(Bucket=s3_bucket, Key=f"incoming/2026/{path.name}", Body=path.read_bytes())
    s3.put_object(Bucket=s3_bucket, Key="incoming/2026/notes.txt", Body=b"not an invoice")

    state, _summary = await run(f"s3://{s3_bucket}/incoming", f"s3://{s3_bucket}/processed")
    assert state.is_completed(), state.message
    manifest = Manifest.model_validate_json(
        s3.get_object(Bucket=s3_bucket, Key="processed/manifest.json")["Body"].read()
    )
    assert set(manifest.entries) == {f"2026/{p.name}" for p in pdfs}
    results = s3.list_objects_v2(Bucket=s3_bucket, Prefix="processed/results/")["Contents"]
    assert len(results) == 5
    artifacts = await read_artifacts(
        key="invoice-run-summary", flow_run_id=state.state_details.flow_run_id
    )
    assert len(artifacts) == 1 and artifacts[0].type == "table"
    table = (
        json.loads(artifacts[0].data) if isinstance(artifacts[0].data, str) else artifacts[0].data
    )
    assert sorted(row["invoice"] for row in table) == sorted(f"2026/{p.name}" for p in pdfs)


async def test_invoices_run_in_chunks_one_task_run_each_and_all_are_recorded(tmp_path: Path):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    source, output = tmp_path / "in", tmp_path / "out"
    pdfs = write_samples(source, 7, seed=21)
    state, summary = await run(str(source), str(output), chunk_size=3, max_concurrency=2)
    assert state.is_completed(), state.message
    assert summary.processed == 7
    manifest = Manifest.model_validate_json((output / "manifest.json").read_bytes())
    assert set(manifest.entries) == {p.name for p in pdfs}
    async with get_client() as client:
        for _ in range(60):  # the server records task runs from events, which may come late
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(
                    id=FlowRunFilterId(any_=[state.state_details.flow_run_id])
                )
            )
            chunks = sorted(
                r.name
                for r in runs
                if r.task_key.startswith("process_chunk_task")
                and r.state is not None
                and r.state.is_final()
            )
            if len(chunks) >= 3:
                break
            await asyncio.sleep(0.5)
    assert chunks == [f"{pdfs[0].name} and 2 more", f"{pdfs[3].name} and 2 more", pdfs[6].name]


async def test_an_embedded_e_invoice_is_the_result_and_the_page_cross_checks_it(tmp_path: Path):
    from testing.einvoice_xml import attach_einvoice, build_cii_xml
    from testing.samples import make_invoice

    source, output = tmp_path / "in", tmp_path / "out"
    source.mkdir()
    pdf, truth = make_invoice(7)
    (source / "facturx.pdf").write_bytes(attach_einvoice(pdf, build_cii_xml(truth)))
    tampered = truth.model_copy(update={"total": truth.total + 100})  # the XML says more
    (source / "tampered.pdf").write_bytes(attach_einvoice(pdf, build_cii_xml(tampered)))

    state, _summary = await run(str(source), str(output))
    assert state.is_completed(), state.message
    manifest = Manifest.model_validate_json((output / "manifest.json").read_bytes())

    good = json.loads((output / manifest.entries["facturx.pdf"].result_key).read_text())
    assert manifest.entries["facturx.pdf"].status == "done"
    assert good["source"] == "embedded_xml"
    assert good["field_sources"]["total"] == "embedded_xml"
    assert Decimal(str(good["invoice"]["total"])) == truth.total

    bad = manifest.entries["tampered.pdf"]
    assert bad.status == "needs_review"
    assert any(r.startswith("einvoice_mismatch: total") for r in bad.reasons), bad.reasons
