#!/usr/bin/env bash
# One prepared GPU check: install the carried wheels, run the GPU tests and both throughput
# benchmarks, and write every figure to $OUT (gpu_check.md, stage1.json, stage2.json, logs).
# Sized to finish in about 6 minutes on one H100/H200; each step has its own time limit.
# STEPS="tests stage1 stage2 inference" (the default) picks the steps to run.
#   Carry:  .whl (python3.12 wheels of open_clip_torch, timm, zarr, numcodecs, dask, ...; see README)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, open_clip, zarr, timm; print('torch', torch.__version__, 'open_clip', open_clip.__version__, 'zarr', zarr.__version__, 'timm', timm.__version__)" | tee -a "$OUT/gpu.txt"
STEPS=${STEPS:-tests stage1 stage2 inference}
run_step() { case " $STEPS " in *" $1 "*) return 0;; *) return 1;; esac; }
if run_step tests; then
  echo "== GPU tests"
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_views.py tests/test_inference.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -5
fi
if run_step stage1; then
echo "== stage one: ViT-L-14 bf16"
timeout 170 python3 bench/teacher_cache_bench.py --model ViT-L-14 --precision bf16 --device cuda --images 1536 \
  --naive-images 4 --batch-size 64 --shard-rows 256 --json "$OUT/stage1.json" > "$OUT/stage1.log" 2>&1
tail -3 "$OUT/stage1.log"
fi
if run_step stage2; then
echo "== stage two: ViT-B/16 student bf16"
timeout 150 python3 -m bench.train_bench --variant zeroseg_vit_b16 --device cuda --micro-batch 256 --steps 10 \
  --e2e-images 2048 --e2e-steps 16 --e2e-micro-batch 128 --e2e-sources decode,cache --workers 8 --json "$OUT/stage2.json" > "$OUT/stage2.log" 2>&1
tail -3 "$OUT/stage2.log"
fi
if run_step inference; then
  echo "== inference: ViT-B/16 student, short side 448, sliding window"
  timeout 90 python3 bench/inference_bench.py --variant zeroseg_vit_b16 --device cuda --images 64 > "$OUT/inference.json" 2> "$OUT/inference.log"
  cat "$OUT/inference.json"
fi
python3 bench/gpu_report.py "$OUT" | tee "$OUT/gpu_check.md"
