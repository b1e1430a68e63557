#!/usr/bin/env bash
# Create .venv and install zeroseg with its test and DVC extras. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
# With the default torch build the environment takes about 6.2 GB (the CUDA build alone 4.4 GB):
# say so in one line before pip fails halfway with "No space left on device" (pip's temporary
# files go to TMPDIR, on this same disk unless set). Another TORCH_SPEC is not checked.
if [ -z "${TORCH_SPEC:-}" ] && { ! [ -x .venv/bin/python ] || ! .venv/bin/python -c "import torch" 2>/dev/null; }; then
  "$PYTHON" - <<'PY'
import os, shutil, sys
free = shutil.disk_usage(".").free / 1e9
if free < 7:
    sys.exit(f"setup.sh: {free:.1f} GB free under {os.getcwd()}; the environment (.venv, torch's CUDA build) needs about 7 GB")
PY
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The torch build is pinned here (not in pyproject.toml, which takes a range) so that installs
# are repeatable; override with TORCH_SPEC="torch==X torchvision==Y" for another build.
python -m pip install -q ${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
python -m pip install -q -e ".[test]"
