#!/usr/bin/env bash
# One prepared GPU check: install the carried wheels, run the GPU tests and the throughput
# benchmarks, and write every figure to $OUT (gpu_check.md, stage1*.json, stage2.json, logs).
# Steps run in priority order under one time budget (BUDGET seconds, default 400): each gets
# its own limit, cut to what is left, and a step that would get under 30 s is skipped, so the
# whole check ends within about 7 minutes on one H100/H200 including the install.
# STEPS picks the steps. The default, "tests stage1 stage2 inference stage1_pure profile", is the first
# run; the torch.compile steps are a second run of their own (compilation takes minutes):
#   STEPS="stage1_compile stage2_compile" bash bench/gpu/check.sh
#   Carry:  .whl (python3.12 wheels of open_clip_torch, timm, zarr, numcodecs, dask, ...: bench/gpu/fetch_wheels.sh)
# DRY_RUN=1 runs every step on the CPU with a small teacher, the tiny student and a few images:
# the same commands, flags and report, so that a typo cannot waste the one GPU slot
# (tests/test_gpu_check.py runs it).
set -uo pipefail
cd "$(dirname "$0")/../.."
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
# Every step named in STEPS ends in exactly one outcome, one line of $OUT/steps.tsv
# (name, outcome, seconds, detail):
#   ok       its figures were written (the file the step exists to produce, non-empty);
#   skipped  under 30 s of the budget were left for it (also listed in $OUT/skipped.txt);
#   failed   it exited non-zero, ran past its limit, or wrote no figures (also in $OUT/failed.txt,
#            with the last lines of its log).
# The exit status says which: 0 every step ok, 1 a step failed, 2 none failed but one was skipped.
# LIMIT_SCALE multiplies every step's limit (the CPU dry run on a busy machine needs more time);
# LIMIT_CAP caps it (tests use it to force a time-out).
LIMIT_SCALE=${LIMIT_SCALE:-$([ "$DRY_RUN" = 1 ] && echo 4 || echo 1)}
LIMIT_CAP=${LIMIT_CAP:-0}
: > "$OUT/steps.tsv"
rm -f "$OUT/skipped.txt" "$OUT/failed.txt"
record() {  # record NAME OUTCOME SECONDS DETAIL
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$OUT/steps.tsv"
  echo "== $1: $2 ($4)"
}
# step NAME LIMIT FIGURES FUNCTION: run FUNCTION (its output to $OUT/NAME.log) when NAME is in
# STEPS, under min(LIMIT x LIMIT_SCALE, budget left) seconds, exported as LIMIT_S, then record
# its outcome.
step() {
  local name=$1 limit=$2 figures=$3 fn=$4
  case " $STEPS " in *" $name "*) ;; *) return 0;; esac
  local left=$(( BUDGET - SECONDS ))
  if (( left < 30 )); then
    record "$name" skipped 0 "${left} s of the budget left"
    echo "== $name: skipped, ${left} s of the budget left" >> "$OUT/skipped.txt"
    return 0
  fi
  LIMIT_S=$(( limit * LIMIT_SCALE ))
  (( LIMIT_CAP > 0 && LIMIT_CAP < LIMIT_S )) && LIMIT_S=$LIMIT_CAP
  (( left < LIMIT_S )) && LIMIT_S=$left
  echo "== $name (limit ${LIMIT_S} s, ${SECONDS} s elapsed)"
  rm -f "$OUT/$figures"
  local t0=$SECONDS rc=0 why=""
  "$fn" > "$OUT/$name.log" 2>&1 || rc=$?
  local took=$(( SECONDS - t0 ))
  if (( rc == 124 || rc == 137 )); then why="ran past its limit of ${LIMIT_S} s"
  elif (( rc != 0 )); then why="exited with status $rc"
  elif [ ! -s "$OUT/$figures" ]; then why="exited 0 but wrote no $figures"
  fi
  if [ -z "$why" ]; then
    record "$name" ok "$took" "$figures"
    tail -3 "$OUT/$name.log"
  else
    record "$name" failed "$took" "$why"
    { echo "== $name: failed after ${took} s: $why; last lines of $name.log:"; tail -8 "$OUT/$name.log" | sed 's/^/    /'; } >> "$OUT/failed.txt"
    tail -8 "$OUT/$name.log"
  fi
}
if [ "$DRY_RUN" = 1 ]; then
  DEVICE=cpu TEACHER=ViT-S-32 STUDENT=zeroseg_micro JPEG=160x120 BATCH=8 SHARD=8
  N1=8 N1_NAIVE=1 N1_OPT=4 MB=8 N2_STEPS=2 E2E_IMAGES=16 E2E_STEPS=2 E2E_MB=8 WORKERS=1 N_INF=1 PROF_VIEWS=8
else
  DEVICE=cuda TEACHER=ViT-L-14 STUDENT=zeroseg_vit_b16 JPEG=500x375 BATCH=64 SHARD=256
  N1=1536 N1_NAIVE=4 N1_OPT=1024 MB=256 N2_STEPS=10 E2E_IMAGES=2048 E2E_STEPS=16 E2E_MB=128 WORKERS=8 N_INF=64 PROF_VIEWS=1920
fi
STAGE1="--model $TEACHER --device $DEVICE --batch-size $BATCH --shard-rows $SHARD --size $JPEG"
STAGE2="--variant $STUDENT --device $DEVICE --micro-batch $MB --steps $N2_STEPS"
run() { timeout -k 10 "$LIMIT_S" "$@"; }
tests() { run python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/core/test_views.py tests/evaluation/test_inference.py; }  # figures: its log
stage1() { run python3 -m bench.teacher_cache_bench $STAGE1 --precision bf16 --images $N1 --naive-images $N1_NAIVE --json "$OUT/stage1.json"; }
stage2() {
  run python3 -m bench.train_bench $STAGE2 \
    --e2e-images $E2E_IMAGES --e2e-steps $E2E_STEPS --e2e-micro-batch $E2E_MB --e2e-sources decode,cache --workers $WORKERS --json "$OUT/stage2.json"
}
inference() { run python3 -m bench.inference_bench --variant $STUDENT --device $DEVICE --images $N_INF --json "$OUT/inference.json"; }
# The untried speed options, on the same kind of images, against stage1's bf16 autocast figure.
stage1_pure() { run python3 -m bench.teacher_cache_bench $STAGE1 --precision pure_bf16 --images $N1_OPT --naive-images 0 --json "$OUT/stage1_pure.json"; }
# Where the time goes in each hot loop: torch.profiler tables and the GPU's busy share.
profile() { run python3 -m bench.gpu.profile --device $DEVICE --teacher $TEACHER --views $PROF_VIEWS --student $STUDENT --micro-batch $MB --out "$OUT"; }
stage2_compile() { run python3 -m bench.train_bench $STAGE2 --compile --json "$OUT/stage2_compile.json"; }
stage1_compile() { run python3 -m bench.teacher_cache_bench $STAGE1 --precision pure_bf16 --compile --images $N1_OPT --naive-images 0 --json "$OUT/stage1_compile.json"; }
step tests 90 tests.log tests
step stage1 150 stage1.json stage1
step stage2 120 stage2.json stage2
step inference 45 inference.json inference
step stage1_pure 60 stage1_pure.json stage1_pure
step profile 60 profile.json profile
step stage2_compile 200 stage2_compile.json stage2_compile
step stage1_compile 200 stage1_compile.json stage1_compile
echo "== done in ${SECONDS} s" | tee "$OUT/elapsed.txt"
python3 -m bench.gpu.report "$OUT" | tee "$OUT/gpu_check.md"
if [ -s "$OUT/failed.txt" ]; then exit 1; fi
if [ -s "$OUT/skipped.txt" ]; then exit 2; fi
exit 0
