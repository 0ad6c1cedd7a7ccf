#!/usr/bin/env bash
# Run the test suite against a real ComfyUI: set up (fast when already done), then pytest.
#
#   bash scripts/run_tests.sh                               # everything
#   bash scripts/run_tests.sh tests/test_x.py::test_y -x    # arguments go to pytest
#
# Exits non-zero when a test fails and also when no test ran (pytest's exit code 5).
# COMFYUI_DIR=/path/to/ComfyUI runs the bench on that ComfyUI instead of .comfyui/ComfyUI.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ELIGEN_VENV:-$REPO/.venv}"

bash "$REPO/scripts/setup.sh" || { echo "[tests] set-up failed" >&2; exit 2; }
bash "$REPO/scripts/setup_browser.sh" || { echo "[tests] browser set-up failed (tests/test_browser.py needs it)" >&2; exit 2; }

cd "$REPO"
"$VENV/bin/python" -m pytest -q "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "[tests] no test ran: that is a failure" >&2
fi
exit "$status"
