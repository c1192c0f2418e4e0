#!/usr/bin/env bash
# One-command, idempotent environment for running and testing Consistent Story headless.
#
#   bash scripts/setup.sh            # creates/updates the venv; prints its python at the end
#
# - venv: $CONSISTENT_STORY_VENV, default <repo>/.venv
# - torch: PyPI's default torch + torchvision builds (they also run on a CPU; a CPU-only
#   torch wheel without a matching torchvision cannot import ComfyUI)
# - frontend: $CONSISTENT_STORY_FRONTEND, when set, replaces the host's pinned
#   comfyui-frontend-package with that version
# - ComfyUI: found by scripts/comfy_host.py; if absent, comfy-cli is tried, and if that cannot
#   reach the internet the script stops and says where to put a checkout.
# A second run only checks stamps and takes seconds.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CONSISTENT_STORY_VENV:-$repo/.venv}"
torch_spec=(torch==2.13.0 torchvision==0.28.0)
py="$venv/bin/python"
say() { printf '[setup] %s\n' "$*" >&2; }

if [ ! -x "$py" ]; then
  say "creating virtual environment at $venv"
  python3 -m venv "$venv"
fi

# --isolated: PyPI's default builds, ignoring a machine's pip config that would point at a
# local CPU-only torch wheel for which no torchvision exists.
# Checked from package metadata: importing torch just to read its version costs seconds.
if ! "$py" -c 'import sys
from importlib.metadata import version
sys.exit(0 if [version(n).split("+")[0] for n in ("torch", "torchvision")] == ["2.13.0", "0.28.0"] else 1)' 2>/dev/null; then
  say "installing ${torch_spec[*]} (several GB, once)"
  "$py" -m pip install --isolated --quiet "${torch_spec[@]}"
fi

if ! comfy_dir="$("$py" "$repo/scripts/comfy_host.py" 2>/dev/null)"; then
  if [ -n "${COMFYUI_PATH:-}" ]; then
    "$py" "$repo/scripts/comfy_host.py" || exit 1   # an explicit path that is wrong: say so, install nothing
  fi
  say "ComfyUI not found; trying comfy-cli to install it into ~/comfy/ComfyUI"
  if "$py" -m pip install --quiet comfy-cli >/dev/null 2>&1 &&
     timeout 900 "$venv/bin/comfy" --skip-prompt --workspace="$HOME/comfy/ComfyUI" install --cpu --skip-manager --skip-torch-or-directml >&2; then
    comfy_dir="$("$py" "$repo/scripts/comfy_host.py")" || true
  fi
  if [ -z "${comfy_dir:-}" ]; then
    "$py" "$repo/scripts/comfy_host.py" || true   # prints where it looked and what to do
    say "comfy-cli could not install ComfyUI (no internet access?). Put a ComfyUI checkout at ~/comfy/ComfyUI or set COMFYUI_PATH, then run this again."
    exit 1
  fi
fi
say "ComfyUI: $comfy_dir"

# Requirements are re-installed only when one of the files changes (stamp = their hash).
host_reqs="$(grep -viE '^\s*(torch|torchvision|torchaudio)\s*($|[<>=~!#])' "$comfy_dir/requirements.txt")"
stamp_src="$host_reqs$(cat "$repo/requirements.txt" "$repo/tests/requirements.txt")"
stamp="$(printf '%s' "$stamp_src" | sha256sum | cut -c1-16)"
if [ "$(cat "$venv/.consistent-story-stamp" 2>/dev/null)" != "$stamp" ]; then
  say "installing ComfyUI's, the pack's and the tests' requirements"
  printf '%s\n' "$host_reqs" > "$venv/comfyui-requirements.txt"
  "$py" -m pip install --quiet -r "$venv/comfyui-requirements.txt" -r "$repo/requirements.txt" -r "$repo/tests/requirements.txt"
  echo "$stamp" > "$venv/.consistent-story-stamp"
fi

# A frontend other than the host's pinned one (.ci/run tests v0.33.0 with the newest frontend
# that runs on it): CONSISTENT_STORY_FRONTEND=<comfyui-frontend-package version>.
frontend="${CONSISTENT_STORY_FRONTEND:-}"
if [ -n "$frontend" ] && ! "$py" -c 'import sys
from importlib.metadata import version
sys.exit(0 if version("comfyui-frontend-package") == sys.argv[1] else 1)' "$frontend" 2>/dev/null; then
  say "installing comfyui-frontend-package==$frontend"
  "$py" -m pip install --quiet "comfyui-frontend-package==$frontend"
fi

# ComfyUI 0.8 and newer import torchaudio from core model code. PyPI has no torchaudio for this
# torch; 2.11.1 imports and works beside it (installed without its torch pin). Older hosts only
# lose their audio nodes without it, as before.
if ! "$py" -c 'import torchaudio' 2>/dev/null && "$py" - "$comfy_dir" <<'PYEOF'
import re, sys
from pathlib import Path
text = (Path(sys.argv[1]) / "comfyui_version.py").read_text()
major, minor = (int(p) for p in re.search(r'"(\d+)\.(\d+)', text).groups())
sys.exit(0 if (major, minor) >= (0, 8) else 1)
PYEOF
then
  say "installing torchaudio 2.11.1 (without dependencies) for ComfyUI >= 0.8"
  "$py" -m pip install --isolated --quiet --no-deps torchaudio==2.11.1
fi
# ComfyUI-Distributed, the engine tests/integration/test_distributed.py spreads a story over two
# servers with (its source only: pure Python on ComfyUI's own packages). Found at
# $COMFYUI_DISTRIBUTED_PATH or ~/comfy/ComfyUI-Distributed; fetched there at the tested commit if absent.
distributed_dir="${COMFYUI_DISTRIBUTED_PATH:-$HOME/comfy/ComfyUI-Distributed}"
distributed_commit=a91f9fb081eb5fc27db429a7c3f35d2ef7ce4a50
if [ ! -f "$distributed_dir/nodes/collector.py" ]; then
  say "ComfyUI-Distributed not found; cloning it into $distributed_dir"
  if ! { git clone --quiet https://github.com/robertvoy/ComfyUI-Distributed "$distributed_dir" &&
         git -C "$distributed_dir" checkout --quiet "$distributed_commit"; } >&2; then
    say "could not fetch ComfyUI-Distributed (no internet access?): put a checkout of commit $distributed_commit at $distributed_dir or set COMFYUI_DISTRIBUTED_PATH; test_distributed.py fails without it."
  fi
fi
echo "$py"
