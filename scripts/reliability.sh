#!/usr/bin/env bash
# The reliability suite, slow variants included, then its table: scenario, invoices in,
# outcomes recorded, lost, duplicated, wall time. Exits non-zero if a test failed or any
# scenario lost or duplicated an invoice. Extra arguments go to pytest. The JSON lines behind
# the table go to $RELIABILITY_REPORT when it is set (kept), else to a temporary file.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"  # cds to the project and installs .venv

tests=(tests/test_reliability.py tests/test_crash_resume.py tests/test_trust.py)

if [ -n "${RELIABILITY_REPORT:-}" ]; then
  : > "$RELIABILITY_REPORT"
else
  RELIABILITY_REPORT=$(mktemp "${TMPDIR:-/tmp}/reliability.XXXXXX.jsonl")
  trap 'rm -f "$RELIABILITY_REPORT"' EXIT
fi
export RELIABILITY_REPORT

started=$SECONDS
status=0
.venv/bin/python -m pytest -m "slow or not slow" "${tests[@]}" "$@" || status=$?
.venv/bin/python -m tests.reliability_report "$RELIABILITY_REPORT" || { [ "$status" -ne 0 ] || status=1; }
echo "reliability suite: $((SECONDS - started)) s, pytest exit status $status"
exit "$status"
