#!/usr/bin/env bash
# Create .venv and install zeroseg with its test and DVC extras. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The torch build is pinned here (not in pyproject.toml, which takes a range) so that installs
# are repeatable; override with TORCH_SPEC="torch==X torchvision==Y" for another build.
python -m pip install -q ${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
python -m pip install -q -e ".[test]"
