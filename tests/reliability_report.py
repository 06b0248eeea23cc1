"""Reliability accounting: the `scenario` fixture and the table of `make reliability`.

A reliability test registers this plugin (`pytest_plugins = ["tests.reliability_report"]`)
and, after its flow run(s), calls::

    scenario.record(name="bad input corpus", invoices_in=n, manifest=manifest,
                    expected_keys=keys, wall_s=seconds, results=result_keys, reported=row_keys)

`record` accounts for every expected invoice, appends one JSON line to the file named by the
environment variable RELIABILITY_REPORT (when set) and then asserts `lost == 0` and
`duplicated == 0`, so the test fails on either. Definitions (per scenario):

recorded
    expected keys whose manifest entry is final and complete: `done` / `needs_review` with a
    `result_key` (and that result object among `results`, when the test passes `results`),
    or `failed` with an `error_code` and a non-empty `error_message` (the reason).
unrecorded (reported)
    expected keys a failed flow run names as not recorded because the manifest itself could
    not be written (`unrecorded=`); accounted for, but not recorded.
lost
    expected keys neither recorded nor reported: no entry, a non-final entry (`processing`),
    a failure without a reason, or a `done` whose result object is missing.
duplicated
    the sum of
    - result objects beyond the first per invoice key (`results`: the `key` field of every
      object under the results prefix, one item per object);
    - outcomes reported more than once by one run (`reported`: the invoice keys of a run's
      summary rows; pass a list of lists for several runs);
    - successful LLM answers beyond one per invoice that used one (`llm_answers`: the fake
      server's count of `ok` answers; expected: entries `done`/`needs_review` whose
      extractor is `openai`).

`python -m tests.reliability_report FILE` prints the table of a report file; it exits 1 when
a row has lost or duplicated invoices or a test failed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPORT_ENV = "RELIABILITY_REPORT"
FINAL = ("done", "needs_review", "failed")


@dataclass
class Row:
    scenario: str
    invoices_in: int
    recorded: int
    lost: int
    duplicated: int
    wall_s: float
    unrecorded_reported: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    failure_codes: dict[str, int] = field(default_factory=dict)
    lost_keys: list[str] = field(default_factory=list)
    duplicate_detail: dict[str, int] = field(default_factory=dict)
    unexpected_entries: int = 0
    note: str = ""
    test: str = ""
    kind: str = "scenario"


def _field(entry: Any, name: str) -> Any:
    return entry.get(name) if isinstance(entry, Mapping) else getattr(entry, name, None)


def _entries(manifest: Any) -> Mapping[str, Any]:
    if manifest is None:
        return {}
    if isinstance(manifest, Mapping):
        return manifest.get("entries", manifest) if "entries" in manifest else manifest
    return manifest.entries


def account(
    *,
    name: str,
    invoices_in: int,
    manifest: Any,
    expected_keys: Iterable[str],
    wall_s: float,
    results: Iterable[str] | None = None,
    reported: Iterable[str] | Iterable[Iterable[str]] | None = None,
    llm_answers: int | None = None,
    unrecorded: Iterable[str] | None = None,
    note: str = "",
    test: str = "",
) -> Row:
    """The accounting of one scenario (see the module docstring for the definitions)."""
    entries = _entries(manifest)
    expected = set(expected_keys)
    result_counts = Counter(results) if results is not None else None
    unrecorded_set = set(unrecorded or ()) & expected

    recorded: set[str] = set()
    outcomes: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    for key in expected:
        entry = entries.get(key)
        if entry is None:
            continue
        status = _field(entry, "status")
        if status not in FINAL:
            continue
        if status == "failed":
            if (
                not _field(entry, "error_code")
                or not (_field(entry, "error_message") or "").strip()
            ):
                continue
            codes[_field(entry, "error_code")] += 1
        else:
            result_key = _field(entry, "result_key")
            if not result_key:
                continue
            if result_counts is not None and result_counts[key] == 0:
                continue
        recorded.add(key)
        outcomes[status] += 1

    lost = sorted(expected - recorded - unrecorded_set)

    dup: dict[str, int] = {}
    if result_counts is not None:
        dup["result_objects"] = sum(n - 1 for n in result_counts.values() if n > 1)
    if reported is not None:
        runs = list(reported)
        if runs and not isinstance(runs[0], str):
            runs_lists = [list(r) for r in runs]
        else:
            runs_lists = [runs]  # type: ignore[list-item]
        dup["reported_outcomes"] = sum(
            n - 1 for run in runs_lists for n in Counter(run).values() if n > 1
        )
    if llm_answers is not None:
        answered = sum(
            1
            for key in expected
            if (e := entries.get(key)) is not None
            and _field(e, "status") in ("done", "needs_review")
            and _field(e, "extractor") == "openai"
        )
        dup["llm_answers"] = max(0, llm_answers - answered)

    return Row(
        scenario=name,
        invoices_in=invoices_in,
        recorded=len(recorded),
        lost=len(lost),
        duplicated=sum(dup.values()),
        wall_s=round(wall_s, 2),
        unrecorded_reported=len(unrecorded_set),
        outcomes=dict(sorted(outcomes.items())),
        failure_codes=dict(sorted(codes.items())),
        lost_keys=lost[:20],
        duplicate_detail=dup,
        unexpected_entries=len(set(entries) - expected),
        note=note,
        test=test,
    )


def _append(row: dict[str, Any]) -> None:
    path = os.environ.get(REPORT_ENV)
    if not path:
        return
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps(row, ensure_ascii=False) + "\n")


class Scenario:
    """What the `scenario` fixture gives a test: `record(...)` once per scenario."""

    def __init__(self, nodeid: str) -> None:
        self.nodeid = nodeid
        self.started = time.perf_counter()
        self.rows: list[Row] = []

    def record(
        self,
        *,
        name: str,
        invoices_in: int,
        manifest: Any,
        expected_keys: Iterable[str],
        wall_s: float | None = None,
        **kwargs: Any,
    ) -> Row:
        row = account(
            name=name,
            invoices_in=invoices_in,
            manifest=manifest,
            expected_keys=expected_keys,
            wall_s=time.perf_counter() - self.started if wall_s is None else wall_s,
            test=self.nodeid,
            **kwargs,
        )
        self.rows.append(row)
        _append(asdict(row))
        assert row.lost == 0, f"{name}: {row.lost} invoices lost: {row.lost_keys}"
        assert row.duplicated == 0, f"{name}: {row.duplicated} duplicated: {row.duplicate_detail}"
        return row


@pytest.fixture
def scenario(request) -> Scenario:
    return Scenario(request.node.nodeid)


def pytest_runtest_logreport(report) -> None:
    """Record every test's outcome (the reliability command runs only reliability tests),
    so the table also shows tests that failed before or without `record`."""
    if not os.environ.get(REPORT_ENV):
        return
    if report.when == "call" or (report.when == "setup" and not report.passed):
        _append(
            {
                "kind": "test",
                "test": report.nodeid,
                "outcome": report.outcome,
                "duration_s": round(report.duration, 2),
            }
        )


# --------------------------------------------------------------------------------------------
# The table


def _detail(row: dict[str, Any]) -> str:
    parts = [f"{n} {status}" for status, n in row.get("outcomes", {}).items()]
    if row.get("unrecorded_reported"):
        parts.append(f"{row['unrecorded_reported']} reported unrecorded by the failed run")
    codes = row.get("failure_codes") or {}
    if codes:
        parts.append(
            "failed: " + ", ".join(f"{code} x{n}" if n > 1 else code for code, n in codes.items())
        )
    if row.get("note"):
        parts.append(row["note"])
    return "; ".join(parts)


def format_table(rows: list[dict[str, Any]]) -> str:
    header = (
        "scenario",
        "invoices in",
        "outcomes recorded",
        "lost",
        "duplicated",
        "wall s",
        "outcomes",
    )
    lines = [header]
    for row in rows:
        lines.append(
            (
                row["scenario"],
                str(row["invoices_in"]),
                str(row["recorded"]),
                str(row["lost"]),
                str(row["duplicated"]),
                f"{row['wall_s']:.1f}",
                _detail(row),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    widths[-1] = min(widths[-1], 100)
    numeric = {1, 2, 3, 4, 5}

    def fmt(line: tuple[str, ...]) -> str:
        cells = [
            (cell.rjust(w) if i in numeric and line is not header else cell.ljust(w))
            for i, (cell, w) in enumerate(zip(line, widths, strict=False))
        ]
        return "  ".join(cells).rstrip()

    out = [fmt(lines[0]), "  ".join("-" * w for w in widths)]
    out += [fmt(line) for line in lines[1:]]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m tests.reliability_report REPORT.jsonl", file=sys.stderr)
        return 2
    path = Path(args[0])
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    records = [json.loads(line) for line in lines if line.strip()]
    rows = [r for r in records if r.get("kind", "scenario") == "scenario"]
    tests = [r for r in records if r.get("kind") == "test"]
    failed_tests = [t for t in tests if t["outcome"] == "failed"]
    print()
    print(format_table(rows) if rows else "(no scenario recorded)")
    bad = [r for r in rows if r["lost"] or r["duplicated"]]
    total_in = sum(r["invoices_in"] for r in rows)
    print()
    print(
        f"{len(rows)} scenarios, {total_in} invoices in, "
        f"{sum(r['lost'] for r in rows)} lost, {sum(r['duplicated'] for r in rows)} duplicated; "
        f"{len(tests)} tests, {len(failed_tests)} failed"
    )
    for t in failed_tests:
        print(f"FAILED {t['test']}")
    for r in bad:
        print(
            f"NOT ACCOUNTED FOR in {r['scenario']!r}: lost {r['lost_keys']} "
            f"duplicated {r['duplicate_detail']}"
        )
    return 1 if bad or failed_tests else 0


if __name__ == "__main__":
    raise SystemExit(main())
