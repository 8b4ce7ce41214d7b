#!/usr/bin/env bash
# Set up .venv with the dev tools, lint, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
.venv/bin/python -m ruff check adtr tests bench
.venv/bin/python -m pytest -q "$@"
