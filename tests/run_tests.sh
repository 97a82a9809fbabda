#!/usr/bin/env bash
# The test command: installs what it needs (.venv from requirements.txt), then runs the whole suite,
# the full-size reference-fidelity tests (marked slow) included. Extra arguments go to pytest.
set -e
source "$(dirname "${BASH_SOURCE[0]}")/../tool/venv.sh"
cd "$ROOT"
exec "$PY" -m pytest -q "$@"
