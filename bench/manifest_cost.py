"""What one manifest commit costs as the manifest grows: when must it be sharded?

    .venv/bin/python bench/manifest_cost.py                     # 1k, 10k, 50k, 100k entries
    .venv/bin/python bench/manifest_cost.py --entries 1000 --entries 200000

A commit (`tasks.manifest.model.commit_outcomes`) reads the whole object, parses it, merges the
batch, serializes it and writes it back conditionally. For each size this script builds a
manifest of that many realistic entries in moto S3 (a child process, as in the other
benches) and times, on the best of `--repeat` rounds: the GET, the parse, the merge of a
batch of `--batch` outcomes, the serialization, the conditional PUT, and the whole
`commit_outcomes` call (the real code path). It prints the object's size and the commit's
share of a second: the writer commits at most once per `min_interval` (1 s), so a commit
near a second means the one writer of a run is saturated and the manifest must be sharded.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testing.harness import default_fake_aws_credentials, s3_client, start_moto


def outcomes(n: int, start: int = 0, status: str = "done"):
    from tasks.manifest.model import InvoiceOutcome, utcnow

    now = utcnow()
    return [
        InvoiceOutcome(
            key=f"invoices/2026/11/vendor-{i % 97:02d}/inv-{i:07d}.pdf",
            etag=f'"{i:032x}"',
            status=status,
            sha256=f"{i:064x}",
            result_key=f"results/invoices/inv-{i:07d}.json",
            flow_run_id="9af117c2-6a1e-4f7b-9d1e-2b7a3c4d5e6f",
            extractor="openai",
            finished_at=now - timedelta(seconds=n - i),
        )
        for i in range(start, start + n)
    ]


def best(samples: list[float]) -> float:
    return min(samples)


async def measure(endpoint: str, bucket: str, entries: int, batch: int, repeat: int) -> dict:
    from tasks.manifest import Manifest, apply_outcomes, commit_outcomes, read_manifest
    from tasks.storage import open_store

    async with open_store(f"s3://{bucket}/cost-{entries}", endpoint_url=endpoint) as store:
        await commit_outcomes(store, outcomes(entries))  # the manifest as it stands
        t: dict[str, list[float]] = {
            k: [] for k in ("get", "parse", "merge", "dump", "put", "commit")
        }
        size = 0
        for r in range(repeat):
            fresh = outcomes(batch, start=entries + r * batch, status="failed")
            t0 = time.perf_counter()
            stored = await store.get("manifest.json")
            t1 = time.perf_counter()
            manifest = Manifest.model_validate_json(stored.data)
            t2 = time.perf_counter()
            merged = apply_outcomes(manifest, fresh)
            t3 = time.perf_counter()
            data = merged.model_dump_json().encode()
            t4 = time.perf_counter()
            await store.put(f"copy-{r}.json", data)  # same size, unconditional, not the manifest
            t5 = time.perf_counter()
            await commit_outcomes(store, fresh)
            t6 = time.perf_counter()
            size = len(data)
            for name, value in zip(
                t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5), strict=False
            ):
                t[name].append(value)
        (final, _) = await read_manifest(store)
        assert len(final.entries) == entries + repeat * batch
    return {"entries": entries, "bytes": size, **{k: best(v) for k, v in t.items()}}


async def main_async(args: argparse.Namespace) -> None:
    moto, endpoint, _ = start_moto()
    try:
        bucket = await ml_bucket(endpoint)
        print(
            f"{'entries':>8} {'MB':>6} {'get s':>7} {'parse s':>8} {'merge s':>8} "
            f"{'dump s':>7} {'put s':>7} {'commit s':>9} {'share of 1 s':>12}"
        )
        for n in args.entries:
            row = await measure(endpoint, bucket, n, args.batch, args.repeat)
            print(
                f"{row['entries']:>8} {row['bytes'] / 1e6:>6.1f} {row['get']:>7.3f} "
                f"{row['parse']:>8.3f} {row['merge']:>8.3f} {row['dump']:>7.3f} "
                f"{row['put']:>7.3f} {row['commit']:>9.3f} {row['commit'] / 1.0:>11.0%}",
                flush=True,
            )
    finally:
        moto.stop()


async def ml_bucket(endpoint: str) -> str:
    async with s3_client(endpoint) as client:
        await client.create_bucket(Bucket="manifest-cost")
    return "manifest-cost"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--entries", type=int, action="append")
    p.add_argument("--batch", type=int, default=50, help="outcomes per commit (default 50)")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    args.entries = sorted(set(args.entries or [1000, 10_000, 50_000, 100_000]))
    default_fake_aws_credentials()
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
