#!/usr/bin/env bash
# Creates .venv and installs the project with its test and lint extras; a no-op when pyproject.toml
# has not changed since the last install. Sourced by demo.sh and test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "installing into .venv (first run takes about a minute)..." >&2
  log=.venv/install.log
  if ! { .venv/bin/python -m pip install --upgrade pip && .venv/bin/python -m pip install -e ".[test,lint]"; } > "$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "install failed; the whole log is $log" >&2
    exit 1
  fi
  rm -f .venv/.installed-*
  touch "$stamp"
fi
