#!/usr/bin/env bash
# Run the test suite against a real ComfyUI: set up (fast when already done), then pytest.
#
#   bash scripts/run_tests.sh                               # everything
#   bash scripts/run_tests.sh tests/unit/test_x.py::test_y -x    # arguments go to pytest
#   bash scripts/run_tests.sh --comfyui 0.3.52 -m compat    # on another ComfyUI version (set up beside)
#
# Exits non-zero when a test fails and also when no test ran (pytest's exit code 5).
# COMFYUI_DIR=/path/to/ComfyUI runs the bench on that ComfyUI instead of the set-up one.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ELIGEN_VENV:-$REPO/.venv}"

setup_args=()
if [ "${1:-}" = "--comfyui" ]; then
  setup_args=(--comfyui "${2:?--comfyui needs a version}"); shift 2
fi
bash "$REPO/scripts/setup.sh" "${setup_args[@]}" || { echo "[tests] set-up failed" >&2; exit 2; }
bash "$REPO/scripts/setup_browser.sh" || { echo "[tests] browser set-up failed (tests/server/test_browser.py needs it)" >&2; exit 2; }
if [ ${#setup_args[@]} -gt 0 ] && [ -z "${COMFYUI_DIR:-}" ]; then
  COMFYUI_DIR="$(cat "$REPO/.comfyui/path-${setup_args[1]}")"
  export COMFYUI_DIR
fi

cd "$REPO"
"$VENV/bin/python" -m pytest -q "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "[tests] no test ran: that is a failure" >&2
fi
exit "$status"
