#!/usr/bin/env bash
# What tests/server/test_browser.py needs: Debian's headless-capable `chromium`, Playwright for Python (driving
# that Chromium through executable_path; Playwright's own browser download is not used, so this works
# offline once the packages are installed) and a second, newer ComfyUI frontend: users update the
# frontend before ComfyUI, so the browser test runs against ComfyUI's pinned one and against
# comfyui-frontend-package NEWEST_FRONTEND (served through ComfyUI's --front-end-root). The newer one goes
# into its own folder, never into the venv, whose pinned frontend ComfyUI keeps serving by default.
# Idempotent: a second run only checks.
#
#   bash scripts/setup_browser.sh          # called by scripts/run_tests.sh
#
# ELIGEN_VENV picks the virtual environment (default .venv); ELIGEN_FRONTENDS_DIR the frontends' folder
# (default .frontends/ in the repository). apt-get needs root (or sudo).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ELIGEN_VENV:-$REPO/.venv}"
NEWEST_FRONTEND=1.58.1  # tests/server/test_browser.py names the same version
FRONTENDS="${ELIGEN_FRONTENDS_DIR:-$REPO/.frontends}"
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
FRONTEND="$FRONTENDS/comfyui-frontend-package-$NEWEST_FRONTEND"
if [ ! -f "$FRONTEND/comfyui_frontend_package/static/index.html" ]; then
  say "installing comfyui-frontend-package $NEWEST_FRONTEND into $FRONTEND"
  rm -rf "$FRONTEND.part"
  "$VENV/bin/python" -m pip install --quiet --no-deps --target "$FRONTEND.part" "comfyui-frontend-package==$NEWEST_FRONTEND"
  mv "$FRONTEND.part" "$FRONTEND"
fi
say "ready: $(command -v chromium || command -v chromium-browser), playwright $("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("playwright"))'), frontend $NEWEST_FRONTEND in $FRONTEND"
