"""The demo's science: which recipe lets the student both group and name, over seeds.

Trains one student per (recipe, seed) on the same teacher cache and budget, evaluates each with
the project's harness (`run_evaluation`) under every background rule and evaluation-time
calibration asked for, and prints one table: the mean, spread (population std) and minimum over
seeds of the student's zero-shot mIoU, its grouping oracle (segments labelled by their majority
true class) beside a fixed 3x3 grid's, segments per window (1: collapsed), and the last logged
label-free health figures (pipeline/student/health.py). The teacher alone (the training-free
grid baseline) is evaluated once per rule and calibration: it does not depend on the recipe.

Recipes are chosen on a validation split of our own, never on the held-out scenes docs/demo.md
reports: `--datasets` points the evaluation elsewhere (the default is the demo's validation
split, written by the `demo_val` stage with another seed). A finished (recipe, seed) is reused
(resume "auto"), so an interrupted sweep picks up where it stopped.

    dvc repro teacher_cache demo_val
    python bench/demo_science.py --recipes default,standardize --seeds 0,1,2 --out outputs/science
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from pipeline.config import load_params
from pipeline.evaluation.run import run_evaluation
from pipeline.training.run import run_training

_PAPER = ["loss.infomax=0", "loss.bidirectional_matching=false", "loss.region_match=0", "loss.infomax_usage=image", "loss.target_norm=none"]
_V1 = ["loss.region_match=4.0", "loss.infomax=1.0", "loss.bidirectional_matching=true"]  # the stabilizers, unit vectors
RECIPES = {
    "default": [],  # params.yaml as it is
    "paper": _PAPER,
    "paper+standardize": [*_PAPER, "loss.target_norm=standardize"],
    "unit": [*_V1, "loss.target_norm=none", "loss.contrastive=0"],
    "unit+contrastive": [*_V1, "loss.target_norm=none", "loss.contrastive=1.0"],
    "center": [*_V1, "loss.target_norm=center", "loss.contrastive=0"],
    "standardize": [*_V1, "loss.target_norm=standardize", "loss.contrastive=0"],
    "standardize+contrastive": [*_V1, "loss.target_norm=standardize", "loss.contrastive=1.0"],
    "unit+contrastive0.1": [*_V1, "loss.target_norm=none", "loss.contrastive=0.1"],
    "unit-reconstruction0.25": [*_V1, "loss.target_norm=none", "loss.contrastive=0", "loss.reconstruction=0.25"],
    "unit-reconstruction0": [*_V1, "loss.target_norm=none", "loss.contrastive=0", "loss.reconstruction=0"],
    "unit+crop4": [*_V1, "loss.target_norm=none", "loss.contrastive=0", "loss.segment_crop=4.0"],
    "unit+crop8": [*_V1, "loss.target_norm=none", "loss.contrastive=0", "loss.segment_crop=8.0"],
    "crop4-region1": ["loss.region_match=1.0", "loss.infomax=1.0", "loss.bidirectional_matching=true", "loss.target_norm=none", "loss.contrastive=0", "loss.segment_crop=4.0"],
    "standardize-region1": ["loss.region_match=1.0", "loss.infomax=1.0", "loss.bidirectional_matching=true", "loss.target_norm=standardize", "loss.contrastive=0"],
}
HEALTH = ("segments_per_image", "segment_resultant", "teacher_resultant", "segment_retrieval", "segment_rank", "teacher_rank")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--cache", default="caches/teacher.zarr")
    ap.add_argument("--out", type=Path, default=Path("outputs/science"))
    ap.add_argument("--recipes", default="default", help="comma-separated subset of: " + ", ".join(RECIPES))
    ap.add_argument("--seeds", default="0,1,2", help="train.seed values, comma-separated")
    ap.add_argument("--datasets", default="{demo: data/demo_val}", help="eval.datasets for choosing (default: the validation split)")
    ap.add_argument("--bg-rules", default="class,probability", help="eval.bg_rule values to evaluate under")
    ap.add_argument("--calibrations", default="none,center", help="eval.calibration values to evaluate under")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra KEY=VALUE for every run (e.g. train.epochs=20)")
    args = ap.parse_args()
    recipes, seeds = args.recipes.split(","), [int(s) for s in args.seeds.split(",")]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        ap.error(f"unknown recipe(s) {', '.join(unknown)}; known: {', '.join(RECIPES)}")
    evals = [(rule, cal) for rule in args.bg_rules.split(",") for cal in args.calibrations.split(",")]
    rows: list[dict] = []
    teacher: dict[str, float] = {}
    for name in recipes:
        for seed in seeds:
            sets = [*args.overrides, *RECIPES[name], f"train.seed={seed}"]
            run = args.out / name / f"seed{seed}"
            t0 = time.perf_counter()
            summary = run_training(load_params(args.params, sets), args.cache, run, live_dir=None, progress=False, resume="auto")
            train_s = time.perf_counter() - t0
            for rule, cal in evals:
                key = f"{rule}/{cal}"
                with_teacher = key not in teacher
                ev = [*sets, f"eval.datasets={args.datasets}", f"eval.bg_rule={rule}", f"eval.calibration={cal}",
                      f"eval.baselines={'[training_free]' if with_teacher else '[]'}"]
                (metrics,) = run_evaluation(load_params(args.params, ev), run / "checkpoint.pt", run / f"metrics-{rule}-{cal}", None,
                                            progress=False, echo=lambda *_: None).values()
                if with_teacher:
                    teacher[key] = metrics["miou"]["training_free"]
                row = {"recipe": name, "seed": seed, "rule": rule, "calibration": cal, "student": metrics["miou"]["student"],
                       "trivial": metrics["miou"]["trivial"], "oracle_student": metrics["oracle"]["student"], "oracle_grid": metrics["oracle"]["grid"],
                       "segments_per_window": metrics["segments_per_window"], "train_s": train_s,
                       **{f"health_{k}": summary.health.get(k, float("nan")) for k in HEALTH}}
                rows.append(row)
                print(json.dumps(row), flush=True)
    table = summarize(rows, teacher)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "science.json").write_text(json.dumps({"rows": rows, "teacher_alone": teacher, "overrides": args.overrides, "datasets": args.datasets}, indent=2))
    (args.out / "science.md").write_text(table + "\n")


def summarize(rows: list[dict], teacher: dict[str, float]) -> str:
    """Markdown: one line per (recipe, rule, calibration), mean +- std (min) over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["recipe"], r["rule"], r["calibration"]), []).append(r)
    lines = ["| recipe | rule / calibration | seeds | student mIoU mean +- std (min) | teacher alone | oracle student (min) | oracle grid | segments/window (min) | segment retrieval | segment / teacher resultant |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (recipe, rule, cal), rs in groups.items():
        def col(k: str) -> list[float]:
            return [r[k] for r in rs]
        s = col("student")
        lines.append(
            f"| {recipe} | {rule} / {cal} | {len(rs)} | {statistics.mean(s):.3f} +- {statistics.pstdev(s):.3f} ({min(s):.3f}) | {teacher.get(f'{rule}/{cal}', float('nan')):.3f} "
            f"| {statistics.mean(col('oracle_student')):.3f} ({min(col('oracle_student')):.3f}) | {rs[0]['oracle_grid']:.3f} "
            f"| {statistics.mean(col('segments_per_window')):.2f} ({min(col('segments_per_window')):.2f}) | {statistics.mean(col('health_segment_retrieval')):.3f} "
            f"| {statistics.mean(col('health_segment_resultant')):.2f} / {rs[0]['health_teacher_resultant']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
