"""Where a training step's time goes on this machine: data, forward, backward, optimizer, logging.

`run_training` runs `--steps` real steps on the demo's cache under torch.profiler, once per
setting, in this one run: `before` (the demo's earlier settings: two DataLoader workers beside the
trainer's threads, logging and health figures every 2 steps) and `now` (params.yaml as it is),
plus any `--set` variant. The engine marks each part of a step (`record_function`: data,
forward, backward, optimizer, logging), so the table reads, per step, the milliseconds of each
and the fraction of the step spent outside forward and backward.

    python -m bench.step_bench --steps 120
    python -m bench.step_bench --steps 120 --variant "train.num_workers=0"
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.harness import emit, parser
from pipeline.config import load_params
from pipeline.training.run import run_training

PARTS = ("data", "forward", "backward", "optimizer", "logging")
BEFORE = ["train.num_workers=2", "train.log_every=2"]  # the demo's settings before the first-ten-minutes change


def measure(params_path: str, cache: str, overrides: list[str], steps: int, warmup: int) -> dict:
    """ms per step of each part, and of the whole step, over `steps` steps after `warmup` untimed ones."""
    with tempfile.TemporaryDirectory() as tmp:
        run_training(load_params(params_path, [*overrides, f"train.max_steps={warmup}", "train.checkpoint_every=0"]), cache, Path(tmp) / "w", progress=False)
        params = load_params(params_path, [*overrides, f"train.max_steps={warmup + steps}"])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            run_training(params, cache, Path(tmp) / "w", resume="must", progress=False)
            wall = time.perf_counter() - t0
    times = {e.key: e.cpu_time_total / 1000 for e in prof.key_averages() if e.key in PARTS}  # ms over the run
    per_step = {part: times.get(part, 0.0) / steps for part in PARTS}
    step = sum(per_step.values())
    return {**{f"{p}_ms": round(v, 1) for p, v in per_step.items()}, "step_ms": round(step, 1),
            "outside_forward_backward": round(1 - (per_step["forward"] + per_step["backward"]) / step, 3), "run_s": round(wall, 1)}


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--cache", default="caches/teacher.zarr")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps first (a checkpoint the timed run resumes from)")
    ap.add_argument("--variant", action="append", default=[], help="another setting to time: space-separated KEY=VALUE overrides")
    args = ap.parse_args()
    settings = {"before": BEFORE, "now": [], **{v: v.split() for v in args.variant}}
    rows = {}
    for name, overrides in settings.items():
        rows[name] = measure(args.params, args.cache, overrides, args.steps, args.warmup)
        print(f"{name:>8}: " + ", ".join(f"{k} {v}" for k, v in rows[name].items()), flush=True)
    base = rows["before"]["step_ms"]
    for name, row in rows.items():
        print(f"{name:>8}: {base / row['step_ms']:.2f}x the steps per second of `before` ({torch.get_num_threads()} threads)")
    emit({"steps": args.steps, "threads": torch.get_num_threads(), "rows": rows}, args.json)


if __name__ == "__main__":
    main()
