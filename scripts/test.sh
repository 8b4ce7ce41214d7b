#!/usr/bin/env bash
# Set up .venv with the dev tools, lint, and run the whole test suite.
# The report test renders HTML in headless Chromium: Debian's package, installed when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get install -y -q chromium >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } \
    || echo "warning: could not install chromium; the report rendering test will be skipped or fail" >&2
fi
.venv/bin/python -m ruff check adtr tests bench
.venv/bin/python -m pytest -q "$@"
