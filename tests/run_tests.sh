#!/usr/bin/env bash
# The test command: installs what it needs (.venv from requirements.txt), then runs the whole suite,
# the full-size reference-fidelity tests (marked slow) included, and lists the reason of every
# skipped test (-rs). Extra arguments go to pytest.
set -e
source "$(dirname "${BASH_SOURCE[0]}")/../tool/venv.sh"
cd "$ROOT"
# The optional whole-slide extra (OpenSlide), so that the slide tests run instead of skipping.
"$PY" -c 'import openslide' 2>/dev/null || "$PY" -m pip install --quiet --disable-pip-version-check -r requirements-wsi.txt
exec "$PY" -m pytest -q -rs "$@"
