"""The demo's science: which stabilizers let the student's grouping and zero-shot signal emerge.

Trains one student per recipe on the same teacher cache and budget, evaluates each on the
held-out scenes with the same harness (`zeroseg evaluate`), and prints one table: zero-shot
mIoU (student, Base, teacher-only baseline, everything-background), the grouping oracles
(student segments vs a fixed 3x3 grid, each labelled by its majority true class) and the
number of segments a student uses per image.

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

RECIPES = {
    "paper": ["loss.infomax=0", "loss.bidirectional_matching=false"],
    "infomax": ["loss.infomax=1.0", "loss.bidirectional_matching=false"],
    "bidirectional": ["loss.infomax=0", "loss.bidirectional_matching=true"],
    "infomax+bidirectional": ["loss.infomax=1.0", "loss.bidirectional_matching=true"],
}
BASE = ["loss.grids=[1]", "loss.segment_match=0", "loss.bidirectional_matching=false", "loss.infomax=0"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--cache", default="caches/teacher.zarr")
    ap.add_argument("--out", type=Path, default=Path("outputs/science"))
    ap.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated subset of: " + ", ".join(RECIPES))
    ap.add_argument("--base-checkpoint", type=Path, help="reuse a trained Base student (e.g. models/student_base/checkpoint.pt)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra KEY=VALUE for every run (e.g. train.epochs=20)")
    args = ap.parse_args()
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
        t0 = time.perf_counter()
        summary = run_training(params, args.cache, args.out / name, live_dir=None, progress=False)
        timings[name] = time.perf_counter() - t0
        metrics = run_evaluation(params, args.out / name / "checkpoint.pt", args.out / name / "metrics", None,
                                 base_checkpoint=base_ckpt, progress=False, echo=lambda *_: None)["demo"]
        rows[name] = {**metrics["miou"], **{f"oracle_{k}": v for k, v in metrics["oracle"].items()},
                      "segments_per_image": metrics["segments_per_image"], "final_losses": summary.losses, "train_s": timings[name]}
        print(name, json.dumps(rows[name]), flush=True)
    cols = ["student", "base", "training_free", "trivial", "oracle_student", "oracle_grid", "segments_per_image"]
    lines = ["| recipe | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[c]:.3f}" if c != "segments_per_image" else f"{r[c]:.1f}" for c in cols) + " |")
    table = "\n".join(lines)
    print(table)
    (args.out / "science.json").write_text(json.dumps({"recipes": rows, "overrides": args.overrides, "timings_s": timings}, indent=2))
    (args.out / "science.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
