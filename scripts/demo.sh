#!/usr/bin/env bash
# Quick start 1: set up, then process the bundled sample invoices into ./out on Prefect's
# local server. Extra arguments go to `invoices run` (see `.venv/bin/invoices run --help`).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec .venv/bin/invoices run "$@"
