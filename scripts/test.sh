#!/usr/bin/env bash
# The test command (README "Set-up commands"; .ci/run calls it). Two tiers:
#  1. tests/ on the CPU in the current Python (torch 2.13.0 CPU build, the pack's [test] extra);
#  2. tests/comfyui against a real ComfyUI: $COMFYUI_PATH, else a temporary copy of ../shared/comfyui,
#     in its own venv (tests/comfyui/requirements.txt + ComfyUI's requirements.txt without torch);
#     tier 3's browser test uses Debian's chromium (installed with apt-get when possible) and runs on
#     ComfyUI's pinned front end and on a current one (tests/comfyui/requirements-frontend-current.txt).
#     Without a ComfyUI the tier is skipped with a message saying so.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
banner() { printf '\n==== %s ====\n' "$*"; }

banner "tier 1: tests/ (CPU, no ComfyUI)"
python -c "import torch" 2>/dev/null || pip install torch==2.13.0  # never replaces an installed torch
pip install -e ".[test]"
COMFYUI_PATH= python -m pytest -q tests --ignore=tests/comfyui

comfy_src=${COMFYUI_PATH:-}
if [ -z "$comfy_src" ] && [ -f ../shared/comfyui/main.py ]; then
  comfy_src=$(cd ../shared/comfyui && pwd)
fi
if [ -z "$comfy_src" ] || [ ! -f "$comfy_src/main.py" ]; then
  banner "tier 2/3: SKIPPED - no ComfyUI (set COMFYUI_PATH or lay ../shared/comfyui beside the repository)"
  exit 0
fi

banner "tier 2/3: tests/comfyui against $comfy_src"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r "$comfy_src" "$work/comfyui"  # ComfyUI writes into its own folders; CI's copy is read-only
chmod -R u+w "$work/comfyui"
venv=${FS_COMFY_VENV:-$repo/.venv-comfyui}
[ -x "$venv/bin/python" ] || python -m venv "$venv"
grep -v -E '^[[:space:]]*(torch|torchvision|torchaudio)([^A-Za-z0-9_-]|$)' "$work/comfyui/requirements.txt" > "$work/comfy-requirements.txt"
"$venv/bin/pip" install -q -r tests/comfyui/requirements.txt -r "$work/comfy-requirements.txt"
"$venv/bin/pip" install -q -e ".[test]"
front_end=$venv/frontend-current
if [ "$(cat "$front_end/.requirements" 2>/dev/null)" != "$(cat tests/comfyui/requirements-frontend-current.txt)" ]; then
  rm -rf "$front_end"
  "$venv/bin/pip" install -q --no-deps --target "$front_end" -r tests/comfyui/requirements-frontend-current.txt \
    && cp tests/comfyui/requirements-frontend-current.txt "$front_end/.requirements" \
    || echo "the current front end could not be installed (tier 3 skips it with a message)"
fi
export FS_FRONTEND_CURRENT=$front_end/comfyui_frontend_package/static
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >"$work/apt.log" 2>&1 \
    || echo "chromium could not be installed (see the browser test's skip reason)"
fi
COMFYUI_PATH="$work/comfyui" "$venv/bin/python" -m pytest -q tests/comfyui
