#!/usr/bin/env bash
# Sets up a real ComfyUI (0.8.0) with this pack, for the COMFYUI_PATH tests, the frontend test and the
# template-06 benchmark (docs/COMFYUI.md, "Setting up a real ComfyUI"). Nothing of ComfyUI is copied into
# this repository: it goes to DEST (default /work/comfyui), with a venv of its own in DEST/.venv.
#
#   tests/real_clients/setup_comfyui.sh [DEST]
#
# Environment:
#   COMFYUI_GIT_DIR  a git directory (e.g. a bare mirror) holding ComfyUI; its HEAD tree is written out blob
#                    by blob (a blob missing from a partial mirror is skipped and reported). Without it,
#                    ComfyUI v0.8.0 is cloned from GitHub.
#   TORCH_SPEC       torch pins for the venv (default "torch==2.14.1 torchvision==0.29.1").
#   WITH_BROWSER=0   skip Debian's chromium and Playwright (needed only by tests/test_frontend_templates.py).
set -euo pipefail

REPO="$(cd "$(dirname "$0")/../.." && pwd)"
DEST="${1:-/work/comfyui}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
PY="${PYTHON:-python3}"

# 1. ComfyUI's source.
if [ ! -f "$DEST/main.py" ]; then
    mkdir -p "$DEST"
    if [ -n "${COMFYUI_GIT_DIR:-}" ]; then
        echo "writing ComfyUI from $COMFYUI_GIT_DIR ($(git --git-dir="$COMFYUI_GIT_DIR" rev-parse --short HEAD)) to $DEST"
        missing=0
        while IFS=$'\t' read -r meta path; do
            read -r mode type sha <<<"$meta"
            [ "$type" = blob ] || continue
            mkdir -p "$DEST/$(dirname "$path")"
            if ! git --git-dir="$COMFYUI_GIT_DIR" cat-file blob "$sha" >"$DEST/$path" 2>/dev/null; then
                rm -f "$DEST/$path"
                echo "  missing blob, skipped: $path"
                missing=$((missing + 1))
                continue
            fi
            [ "$mode" = 100755 ] && chmod +x "$DEST/$path"
        done < <(git --git-dir="$COMFYUI_GIT_DIR" ls-tree -r HEAD)
        echo "  done ($missing missing blobs)"
    else
        git clone --depth 1 --branch v0.8.0 https://github.com/Comfy-Org/ComfyUI "$DEST"
    fi
fi
grep -h __version__ "$DEST/comfyui_version.py"

# 2. Its venv: torch first (the CUDA build runs on the CPU with --cpu), then ComfyUI's requirements without the
#    torch packages (torchaudio has no release for every torch; ComfyUI only tries to import it), then the pack's.
if [ ! -x "$DEST/.venv/bin/python" ]; then
    "$PY" -m venv "$DEST/.venv"
fi
VPY="$DEST/.venv/bin/python"
"$VPY" -m pip install $TORCH_SPEC
grep -Ev '^(torch|torchvision|torchaudio)([<>=~ ].*)?$' "$DEST/requirements.txt" >"$DEST/.requirements-no-torch.txt"
"$VPY" -m pip install -r "$DEST/.requirements-no-torch.txt"
"$VPY" -m pip install -c "$REPO/constraints.txt" -r "$REPO/requirements.txt"
# The pack's own tests in this venv need pytest and the package itself (editable, no dependency changes).
"$VPY" -m pip install -c "$REPO/constraints.txt" pytest
"$VPY" -m pip install --no-deps -e "$REPO"
mkdir -p "$DEST/custom_nodes"
[ -e "$DEST/custom_nodes/layout2image" ] || ln -s "$REPO" "$DEST/custom_nodes/layout2image"
"$VPY" -m pip show comfyui-frontend-package | grep -E '^(Name|Version)'

# 3. The browser for the frontend test: Debian's chromium, driven by Playwright for Python (never
#    `playwright install`: it downloads browser builds of its own).
if [ "${WITH_BROWSER:-1}" != 0 ]; then
    if ! command -v chromium >/dev/null; then
        apt-get update && apt-get install -y chromium
    fi
    "$VPY" -m pip install playwright
fi

echo
echo "ComfyUI ready: COMFYUI_PATH=$DEST; run tests with $VPY -m pytest"
echo "   start it by hand: $VPY $DEST/main.py --cpu"
