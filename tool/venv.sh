# Sourced by run_pipeline.sh and tests/run_tests.sh: make .venv and install requirements.txt into it,
# again only when requirements.txt has changed since the last install.
set -e
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON_BIN="${PYTHON_BIN:-python3}"
[ -x "$VENV/bin/python" ] || "$PYTHON_BIN" -m venv "$VENV"
STAMP="$VENV/.requirements.sha256"
WANT="$(sha256sum "$ROOT/requirements.txt" | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$ROOT/requirements.txt"
    echo "$WANT" > "$STAMP"
fi
PY="$VENV/bin/python"
