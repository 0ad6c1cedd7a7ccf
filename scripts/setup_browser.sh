#!/usr/bin/env bash
# What tests/server/test_browser.py needs: Debian's headless-capable `chromium` and Playwright for Python
# (driving that Chromium through executable_path; Playwright's own browser download is not used, so
# this works offline once the packages are installed). Idempotent: a second run only checks.
#
#   bash scripts/setup_browser.sh          # called by scripts/run_tests.sh
#
# ELIGEN_VENV picks the virtual environment (default .venv). apt-get needs root (or sudo).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ELIGEN_VENV:-$REPO/.venv}"
say() { printf '[setup-browser] %s\n' "$*"; }

if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "[setup-browser] no chromium and no apt-get: install Chromium and set ELIGEN_CHROMIUM=/path/to/it" >&2
    exit 2
  fi
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  say "installing chromium (apt-get)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi

if ! "$VENV/bin/python" -c "import playwright.sync_api" >/dev/null 2>&1; then
  say "installing playwright into $VENV"
  "$VENV/bin/python" -m pip install --quiet "playwright>=1.40"
fi
say "ready: $(command -v chromium || command -v chromium-browser), playwright $("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("playwright"))')"
