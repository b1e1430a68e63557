#!/usr/bin/env bash
# Download, into .whl/, the Python 3.12 x86-64 wheels that bench/gpu/check.sh installs on a GPU
# machine without network whose python3 has torch, timm, typer, pillow and numpy but not the
# rest of the stack. .whl/ is kept out of git (add "/.whl/" to .git/info/exclude).
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 \
  google-crc32c==1.9.0 dask==2026.8.0 partd==1.4.2 locket==1.0.0 timm==1.0.31
du -sh .whl && ls .whl
