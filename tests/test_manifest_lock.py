"""The manifest under real concurrency: many invoices, separate processes, bypassing
writers, injected 409s, and a lock that must exist before anything is written."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound

from flows.process_invoices import process_invoices
from tasks.manifest import InvoiceOutcome, Manifest, commit_outcomes
from tasks.orchestration.limits import LockUnavailableError, ensure_manifest_lock, tag_limit_name
from tasks.orchestration.manifest_lock import manifest_lock_tag
from tasks.storage import S3Store
from testing.fake_llm.server import FakeLLMConfig, FakeLLMServer
from testing.samples import make_invoice

MANIFEST_LIMIT = tag_limit_name(manifest_lock_tag("s3://bucket/out/manifest.json"))


@pytest.fixture(scope="session")
def invoice_pdfs(tmp_path_factory) -> list[bytes]:
    """A pool of distinct small invoices, made once."""
    return [make_invoice(seed)[0] for seed in range(120)]


def upload(s3, bucket: str, prefix: str, pdfs: dict[str, bytes]) -> None:
    for name, data in pdfs.items():
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=data)


def read_s3_manifest(s3, bucket: str, key: str = "out/manifest.json") -> Manifest:
    return Manifest.model_validate_json(s3.get_object(Bucket=bucket, Key=key)["Body"].read())


def assert_every_entry_recorded_with_a_result(s3, bucket, manifest: Manifest, keys) -> None:
    assert set(manifest.entries) == set(keys)
    results = {
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix="out/results/"
        )
        for o in page.get("Contents", [])
    }
    for key, entry in manifest.entries.items():
        assert entry.status in ("done", "needs_review"), (key, entry)
        assert f"out/{entry.result_key}" in results


@pytest.mark.usefixtures("prefect_harness")
class TestInOneProcess:
    async def test_500_invoices_with_random_delays_every_outcome_recorded(
        self, invoice_pdfs, moto_endpoint, s3_bucket, monkeypatch
    ):
        s3 = boto3.client("s3", endpoint_url=moto_endpoint)
        names = {f"inv-{i:04d}.pdf": invoice_pdfs[i % len(invoice_pdfs)] for i in range(500)}
        upload(s3, s3_bucket, "in", names)
        monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
        config = FakeLLMConfig(latency_median=0.3, latency_sigma=0.8, latency_max=2.0, seed=7)
        with FakeLLMServer(config) as llm:
            monkeypatch.setenv("OPENAI_BASE_URL", llm.base_url)
            state = await process_invoices(
                source=f"s3://{s3_bucket}/in",
                output=f"s3://{s3_bucket}/out",
                extractor="openai",
                return_state=True,
            )
            summary = await state.aresult(raise_on_failure=False)
        assert state.is_completed(), state.message
        manifest = read_s3_manifest(s3, s3_bucket)
        assert_every_entry_recorded_with_a_result(s3, s3_bucket, manifest, names)
        assert summary.processed == 500
        assert summary.manifest_writes <= 50, "group commit: writes grow with time, not invoices"
        assert manifest.version == summary.manifest_writes

    async def test_a_writer_that_bypasses_prefect_loses_nothing_and_nothing_is_lost(
        self, invoice_pdfs, moto_endpoint, s3_bucket, monkeypatch
    ):
        s3 = boto3.client("s3", endpoint_url=moto_endpoint)
        names = {f"inv-{i:03d}.pdf": invoice_pdfs[i] for i in range(60)}
        upload(s3, s3_bucket, "in", names)
        monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)

        async def outsider() -> int:
            """Writes straight to the manifest, no Prefect lock, while the run goes on."""
            async with S3Store(s3_bucket, "out/", endpoint_url=moto_endpoint) as store:
                for i in range(15):
                    await commit_outcomes(
                        store,
                        [
                            InvoiceOutcome(
                                key=f"external/{i}.pdf",
                                etag='"x"',
                                status="done",
                                result_key="elsewhere",
                            )
                        ],
                        max_attempts=100,
                    )
                    await asyncio.sleep(0.05)
            return 15

        config = FakeLLMConfig(latency_median=0.2, latency_sigma=0.8, latency_max=1.0, seed=3)
        with FakeLLMServer(config) as llm:
            monkeypatch.setenv("OPENAI_BASE_URL", llm.base_url)
            run = process_invoices(
                source=f"s3://{s3_bucket}/in",
                output=f"s3://{s3_bucket}/out",
                extractor="openai",
                return_state=True,
            )
            state, written = await asyncio.gather(run, outsider())
        assert state.is_completed(), state.message
        manifest = read_s3_manifest(s3, s3_bucket)
        external = {k for k in manifest.entries if k.startswith("external/")}
        assert len(external) == written
        pipeline = {k: v for k, v in manifest.entries.items() if not k.startswith("external/")}
        assert set(pipeline) == set(names)

    async def test_an_injected_409_on_a_manifest_write_is_retried(
        self, invoice_pdfs, moto_endpoint, s3_bucket, proxy, monkeypatch
    ):
        s3 = boto3.client("s3", endpoint_url=moto_endpoint)
        names = {f"inv-{i:02d}.pdf": invoice_pdfs[i] for i in range(20)}
        upload(s3, s3_bucket, "in", names)
        rule = proxy.inject(
            method="PUT",
            key_contains="out/manifest.json",
            times=2,
            status=409,
            code="ConditionalRequestConflict",
        )
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        state = await process_invoices(
            source=f"s3://{s3_bucket}/in",
            output=f"s3://{s3_bucket}/out",
            extractor="offline",
            return_state=True,
        )
        assert state.is_completed(), state.message
        assert rule.hits == 2
        assert_every_entry_recorded_with_a_result(
            s3, s3_bucket, read_s3_manifest(s3, s3_bucket), names
        )

    async def test_the_manifest_limit_is_created_and_repaired(self):
        async with get_client() as client:
            try:
                await client.delete_global_concurrency_limit_by_name(MANIFEST_LIMIT)
            except ObjectNotFound:
                pass
            await ensure_manifest_lock(manifest_lock_tag("s3://bucket/out/manifest.json"))
            created = await client.read_global_concurrency_limit_by_name(MANIFEST_LIMIT)
            assert (created.limit, created.active) == (1, True)

            from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

            await client.update_global_concurrency_limit(
                MANIFEST_LIMIT, GlobalConcurrencyLimitUpdate(limit=5, active=False)
            )
            await ensure_manifest_lock(manifest_lock_tag("s3://bucket/out/manifest.json"))
            repaired = await client.read_global_concurrency_limit_by_name(MANIFEST_LIMIT)
            assert (repaired.limit, repaired.active) == (1, True)


async def test_an_unreachable_server_is_a_clear_error(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        with pytest.raises(LockUnavailableError, match="Refusing to run without the manifest lock"):
            await ensure_manifest_lock("manifest:x")


def test_the_cli_refuses_to_run_without_a_server_and_writes_nothing(tmp_path: Path):
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    proc = subprocess.run(
        [sys.executable, "-m", "flows", "run", "--output", str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Failed to reach API" in proc.stderr and "nothing was processed" in proc.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_three_processes_on_one_prefect_server_overlapping_sets_nothing_lost(
    prefect_server, invoice_pdfs, moto_endpoint, s3_bucket
):
    """Three runs of one source into one output, started together, one third each (shards
    0/3, 1/3, 2/3): three writers on one manifest at once, which (under the lock and by
    compare-and-swap) ends with every invoice recorded once. (Runs that want the same
    invoices split them by claims: tests/test_claims.py and tests/test_trust.py; runs of
    other sources into one output are refused.)"""
    s3 = boto3.client("s3", endpoint_url=moto_endpoint)
    upload(s3, s3_bucket, "in", {f"inv-{i:03d}.pdf": invoice_pdfs[i] for i in range(105)})
    env = {
        **prefect_server.env,
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flows",
                "run",
                f"s3://{s3_bucket}/in",
                "--output",
                f"s3://{s3_bucket}/out",
                "--extractor",
                "offline",
                *shard,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for shard in (["--shard", "0/3"], ["--shard", "1/3"], ["--shard", "2/3"])
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for proc, output in zip(procs, outputs, strict=False):
        assert proc.returncode == 0, output[-3000:]
    keys = {f"inv-{i:03d}.pdf" for i in range(105)}
    manifest = read_s3_manifest(s3, s3_bucket)
    assert_every_entry_recorded_with_a_result(s3, s3_bucket, manifest, keys)
    assert len({e.flow_run_id for e in manifest.entries.values()}) == 3
