"""The demo's science: which stabilizers let the student's grouping and zero-shot signal emerge.

Trains one student per recipe on the same teacher cache and budget, evaluates each on the
held-out scenes with the same harness (`zeroseg evaluate`) under each background rule, and
prints one table: zero-shot mIoU (student, Base, teacher-only baseline, everything-background),
the grouping oracles (student segments vs a fixed 3x3 grid, each labelled by its majority true
class) and the segments a student uses per window (1: collapsed). A finished recipe's
checkpoint is reused (resume "auto"), so an interrupted run picks up where it stopped.

    dvc repro teacher_cache   # the demo cache first
    python bench/demo_science.py --cache caches/teacher.zarr --out outputs/science
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pipeline.config import load_params
from pipeline.evaluate import run_evaluation
from pipeline.train import run_training

_PAPER = ["loss.infomax=0", "loss.bidirectional_matching=false", "loss.region_match=0", "loss.infomax_usage=image"]
RECIPES = {
    "paper": _PAPER,
    "infomax": [*_PAPER, "loss.infomax=1.0"],
    "bidirectional": [*_PAPER, "loss.bidirectional_matching=true"],
    "infomax+bidirectional": [*_PAPER, "loss.infomax=1.0", "loss.bidirectional_matching=true"],
    "infomax-batch+bidirectional": [*_PAPER, "loss.infomax=1.0", "loss.infomax_usage=batch", "loss.bidirectional_matching=true"],
    "region+infomax+bidirectional": [*_PAPER, "loss.region_match=1.0", "loss.infomax=1.0", "loss.bidirectional_matching=true"],
    "region+infomax-batch+bidirectional": [*_PAPER, "loss.region_match=1.0", "loss.infomax=1.0", "loss.infomax_usage=batch", "loss.bidirectional_matching=true"],
}
BASE = ["loss.grids=[1]", "loss.segment_match=0", "loss.bidirectional_matching=false", "loss.infomax=0", "loss.region_match=0"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--cache", default="caches/teacher.zarr")
    ap.add_argument("--out", type=Path, default=Path("outputs/science"))
    ap.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated subset of: " + ", ".join(RECIPES))
    ap.add_argument("--bg-rules", default="probability,class", help="evaluate every student under each of these eval.bg_rule values")
    ap.add_argument("--base-checkpoint", type=Path, help="reuse a trained Base student (e.g. models/student_base/checkpoint.pt)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra KEY=VALUE for every run (e.g. train.epochs=20)")
    args = ap.parse_args()
    unknown = [r for r in args.recipes.split(",") if r not in RECIPES]
    if unknown:
        ap.error(f"unknown recipe(s) {', '.join(unknown)}; known: {', '.join(RECIPES)}")
    base_ckpt = args.base_checkpoint
    timings = {}
    if base_ckpt is None:  # train the Base ablation under the same budget
        t0 = time.perf_counter()
        run_training(load_params(args.params, [*args.overrides, *BASE]), args.cache, args.out / "base", live_dir=None, progress=False)
        timings["base"] = time.perf_counter() - t0
        base_ckpt = args.out / "base" / "checkpoint.pt"
    rows = {}
    for name in args.recipes.split(","):
        params = load_params(args.params, [*args.overrides, *RECIPES[name]])
        ckpt = args.out / name / "checkpoint.pt"
        t0 = time.perf_counter()
        summary = run_training(params, args.cache, args.out / name, live_dir=None, progress=False, resume="auto")
        timings[name] = time.perf_counter() - t0
        for rule in args.bg_rules.split(","):
            ruled = load_params(args.params, [*args.overrides, *RECIPES[name], f"eval.bg_rule={rule}"])
            metrics = run_evaluation(ruled, ckpt, args.out / name / f"metrics-{rule}", None,
                                     base_checkpoint=base_ckpt, progress=False, echo=lambda *_: None)["demo"]
            rows[f"{name} / {rule}"] = {**metrics["miou"], **{f"oracle_{k}": v for k, v in metrics["oracle"].items()},
                                        "segments_per_window": metrics["segments_per_window"], "pixel_accuracy": metrics["pixel_accuracy"]["student"],
                                        "final_losses": summary.losses, "train_s": timings[name]}
            print(f"{name} / {rule}", json.dumps(rows[f"{name} / {rule}"]), flush=True)
    cols = ["student", "base", "training_free", "trivial", "oracle_student", "oracle_grid", "segments_per_window"]
    lines = ["| recipe / background rule | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[c]:.3f}" if c != "segments_per_window" else f"{r[c]:.2f}" for c in cols) + " |")
    table = "\n".join(lines)
    print(table)
    (args.out / "science.json").write_text(json.dumps({"rows": rows, "overrides": args.overrides, "timings_s": timings}, indent=2))
    (args.out / "science.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
