#!/usr/bin/env bash
# One prepared GPU check: install the carried wheels, run the GPU tests and the throughput
# benchmarks, and write every figure to $OUT (gpu_check.md, stage1*.json, stage2.json, logs).
# Steps run in priority order under one time budget (BUDGET seconds, default 400): each gets
# its own limit, cut to what is left, and a step that would get under 30 s is skipped, so the
# whole check ends within about 7 minutes on one H100/H200 including the install.
# STEPS picks the steps. The default, "tests stage1 stage2 inference stage1_pure profile", is the first
# run; the torch.compile steps are a second run of their own (compilation takes minutes):
#   STEPS="stage1_compile stage2_compile" bash bench/gpu_check.sh
#   Carry:  .whl (python3.12 wheels of open_clip_torch, timm, zarr, numcodecs, dask, ...: bench/fetch_wheels.sh)
# DRY_RUN=1 runs every step on the CPU with a small teacher, the tiny student and a few images:
# the same commands, flags and report, so that a typo cannot waste the one GPU slot
# (tests/test_gpu_check.py runs it).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
BUDGET=${BUDGET:-400}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
DRY_RUN=${DRY_RUN:-0}
if [ -d .whl ] && [ "$DRY_RUN" != 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
if [ "$DRY_RUN" = 1 ]; then echo "CPU dry run (DRY_RUN=1): figures of a small teacher and the tiny student, not of a GPU" > "$OUT/gpu.txt"
else nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1; fi
python3 -c "import torch, open_clip, zarr, timm; print('torch', torch.__version__, 'open_clip', open_clip.__version__, 'zarr', zarr.__version__, 'timm', timm.__version__)" | tee -a "$OUT/gpu.txt"
STEPS=${STEPS:-tests stage1 stage2 inference stage1_pure profile}
# run_step NAME LIMIT: true when NAME is in STEPS and at least 30 s of the budget are left;
# sets LIMIT_S to min(LIMIT, seconds left).
run_step() {
  case " $STEPS " in *" $1 "*) ;; *) return 1;; esac
  local left=$(( BUDGET - SECONDS ))
  if (( left < 30 )); then echo "== $1: skipped, ${left} s of the budget left" | tee -a "$OUT/skipped.txt"; return 1; fi
  LIMIT_S=$(( $2 < left ? $2 : left ))
  echo "== $1 (limit ${LIMIT_S} s, ${SECONDS} s elapsed)"
}
if [ "$DRY_RUN" = 1 ]; then
  DEVICE=cpu TEACHER=ViT-S-32 STUDENT=zeroseg_micro JPEG=160x120 BATCH=8 SHARD=8
  N1=16 N1_NAIVE=1 N1_OPT=8 MB=8 N2_STEPS=2 E2E_IMAGES=32 E2E_STEPS=2 E2E_MB=8 WORKERS=1 N_INF=1 PROF_VIEWS=16
else
  DEVICE=cuda TEACHER=ViT-L-14 STUDENT=zeroseg_vit_b16 JPEG=500x375 BATCH=64 SHARD=256
  N1=1536 N1_NAIVE=4 N1_OPT=1024 MB=256 N2_STEPS=10 E2E_IMAGES=2048 E2E_STEPS=16 E2E_MB=128 WORKERS=8 N_INF=64 PROF_VIEWS=1920
fi
STAGE1="--model $TEACHER --device $DEVICE --batch-size $BATCH --shard-rows $SHARD --size $JPEG"
STAGE2="--variant $STUDENT --device $DEVICE --micro-batch $MB --steps $N2_STEPS"
if run_step tests 90; then
  timeout -k 10 $LIMIT_S python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_views.py tests/test_inference.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -5
fi
if run_step stage1 150; then
  timeout -k 10 $LIMIT_S python3 bench/teacher_cache_bench.py $STAGE1 --precision bf16 --images $N1 --naive-images $N1_NAIVE --json "$OUT/stage1.json" > "$OUT/stage1.log" 2>&1
  tail -3 "$OUT/stage1.log"
fi
if run_step stage2 120; then
  timeout -k 10 $LIMIT_S python3 -m bench.train_bench $STAGE2 \
    --e2e-images $E2E_IMAGES --e2e-steps $E2E_STEPS --e2e-micro-batch $E2E_MB --e2e-sources decode,cache --workers $WORKERS --json "$OUT/stage2.json" > "$OUT/stage2.log" 2>&1
  tail -3 "$OUT/stage2.log"
fi
if run_step inference 45; then
  timeout -k 10 $LIMIT_S python3 bench/inference_bench.py --variant $STUDENT --device $DEVICE --images $N_INF > "$OUT/inference.json" 2> "$OUT/inference.log"
  cat "$OUT/inference.json"
fi
# The untried speed options, on the same kind of images, against stage1's bf16 autocast figure.
if run_step stage1_pure 60; then
  timeout -k 10 $LIMIT_S python3 bench/teacher_cache_bench.py $STAGE1 --precision pure_bf16 --images $N1_OPT --naive-images 0 --json "$OUT/stage1_pure.json" > "$OUT/stage1_pure.log" 2>&1
  tail -3 "$OUT/stage1_pure.log"
fi
# Where the time goes in each hot loop: torch.profiler tables and the GPU's busy share.
if run_step profile 60; then
  timeout -k 10 $LIMIT_S python3 -m bench.gpu_profile --device $DEVICE --teacher $TEACHER --views $PROF_VIEWS --student $STUDENT --micro-batch $MB --out "$OUT" > "$OUT/profile.log" 2>&1
  tail -3 "$OUT/profile.log"
fi
if run_step stage2_compile 200; then
  timeout -k 10 $LIMIT_S python3 -m bench.train_bench $STAGE2 --compile --json "$OUT/stage2_compile.json" > "$OUT/stage2_compile.log" 2>&1
  tail -3 "$OUT/stage2_compile.log"
fi
if run_step stage1_compile 200; then
  timeout -k 10 $LIMIT_S python3 bench/teacher_cache_bench.py $STAGE1 --precision pure_bf16 --compile --images $N1_OPT --naive-images 0 --json "$OUT/stage1_compile.json" > "$OUT/stage1_compile.log" 2>&1
  tail -3 "$OUT/stage1_compile.log"
fi
echo "== done in ${SECONDS} s" | tee "$OUT/elapsed.txt"
python3 bench/gpu_report.py "$OUT" | tee "$OUT/gpu_check.md"
