"""The demo's science as DVC experiments: which recipe lets the student both group and name, over seeds.

Each (recipe, seed) is one DVC experiment, `dvc exp run --temp -n RECIPE-sSEED -S KEY=VALUE ...`
(with `--queue`, queued for `dvc queue start -j N` instead), so every row of the table is
reproduced by its own `dvc exp apply NAME && dvc repro`. An experiment runs what its params make
stale: both students and both evaluations; the teacher cache and the demo data come from the DVC
cache, and an experiment whose params equal an earlier run's is restored from DVC's run cache.
Experiments already there (by name) are skipped, so an interrupted sweep picks up where it
stopped.

The table is read from `dvc exp show --json`: per recipe, the mean, spread (population std) and
minimum over seeds of the student's zero-shot mIoU on the validation split of our own
(`metrics_val/`, the `evaluate_val` stage on data/demo_val) beside the teacher alone (on grid
cells, and dense where `eval.baselines` runs maskclip), its grouping oracle beside a fixed
3x3 grid's, segments per window (1: collapsed) and the last logged label-free health figures
(dvclive). Recipes are chosen on that split, never on the held-out scenes (`metrics/`), whose
mean is shown last, for the record only.

    dvc repro                                                              # the baseline
    python -m bench.science.sweep run --recipes default,standardize --seeds 0,1,2
    python -m bench.science.sweep table --recipes default,standardize
    python -m bench.science.sweep table --recipes default --all-commits     # experiments of earlier commits too
    python -m bench.science.sweep run --recipes default --seeds 0,1,2 --tag e36 --set train.epochs=36
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

from bench.harness import emit, parser

# Every recipe but `default` is a delta from the earlier default below (the crops-only student,
# named by its segment embeddings), so its rows stay what they were measured as when params.yaml
# moved on to the dense token-anchor recipe: `crops` is that earlier default itself.
_CROPS = ["student.variant=zeroseg_tiny", "loss.grids=[1,2,3,4]", "loss.region_grids=[]", "loss.token_anchors=0", "loss.anchor_tau=0.05",
          "loss.anchor_vocabulary=imagenet", "loss.anchor_prior=none", "train.base_lr=1e-3", "train.epochs=12", "train.warmup_epochs=1",
          "eval.student_naming=segment", "eval.token_short_side=0"]
_PAPER = ["loss.infomax=0", "loss.bidirectional_matching=false", "loss.region_match=0", "loss.infomax_usage=image", "loss.target_norm=none"]
_V1 = ["loss.region_match=4.0", "loss.infomax=1.0", "loss.bidirectional_matching=true"]  # the stabilizers, unit vectors
_UNIT = [*_V1, "loss.target_norm=none", "loss.contrastive=0"]  # the `unit` recipe, which the rows below add one term to
RECIPES = {
    "default": [],  # params.yaml as it is (the dense token-anchor recipe)
    "paper": _PAPER,
    "paper+standardize": [*_PAPER, "loss.target_norm=standardize"],
    "unit": _UNIT,
    "unit+contrastive": [*_V1, "loss.target_norm=none", "loss.contrastive=1.0"],
    "center": [*_V1, "loss.target_norm=center", "loss.contrastive=0"],
    "standardize": [*_V1, "loss.target_norm=standardize", "loss.contrastive=0"],
    "standardize+contrastive": [*_V1, "loss.target_norm=standardize", "loss.contrastive=1.0"],
    "unit+contrastive0.1": [*_V1, "loss.target_norm=none", "loss.contrastive=0.1"],
    "unit-reconstruction0.25": [*_UNIT, "loss.reconstruction=0.25"],
    "unit-reconstruction0": [*_UNIT, "loss.reconstruction=0"],
    "unit+crop4": [*_UNIT, "loss.segment_crop=4.0"],
    "unit+crop8": [*_UNIT, "loss.segment_crop=8.0"],
    "unit+token1": [*_UNIT, "loss.token_distill=1.0"],
    "unit+token4": [*_UNIT, "loss.token_distill=4.0"],
    "unit+relation1": [*_UNIT, "loss.token_relation=1.0"],
    "unit+relation0.25": [*_UNIT, "loss.token_relation=0.25"],
    "unit+tokproto1": [*_UNIT, "loss.token_prototypes=1.0"],
    "unit+tokproto4": [*_UNIT, "loss.token_prototypes=4.0"],
    "unit+segproto1": [*_UNIT, "loss.segment_prototypes=1.0"],
    "unit+segproto0.1": [*_UNIT, "loss.segment_prototypes=0.1"],
    "unit+segproto0.02": [*_UNIT, "loss.segment_prototypes=0.02"],
    "unit+segproto1+tokproto1": [*_UNIT, "loss.segment_prototypes=1.0", "loss.token_prototypes=1.0"],
    "crop4-region1": ["loss.region_match=1.0", "loss.infomax=1.0", "loss.bidirectional_matching=true", "loss.target_norm=none", "loss.contrastive=0", "loss.segment_crop=4.0"],
    "standardize-region1": ["loss.region_match=1.0", "loss.infomax=1.0", "loss.bidirectional_matching=true", "loss.target_norm=standardize", "loss.contrastive=0"],
}
RECIPES = {"default": [], "crops": _CROPS, **{name: [*_CROPS, *delta] for name, delta in RECIPES.items() if name != "default"}}
VAL, HELD_OUT, LIVE = "metrics_val/demo.json", "metrics/demo.json", "dvclive/train/metrics.json"


def experiment_name(recipe: str, seed: int, tag: str = "") -> str:
    return f"{recipe}-s{seed}" + (f"-{tag}" if tag else "")


def dvc(repo: Path, *args: str) -> str:
    """`dvc ARGS` in `repo` with this interpreter; exits with dvc's own last lines when it fails."""
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"dvc {' '.join(args)} failed in {repo}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout


def experiments(repo: Path, all_commits: bool = False) -> dict[str, dict]:
    """The finished experiments of the workspace's commit (`all_commits`: of every commit, the
    newest of a name kept), by name: {"metrics": {file: data}, "params": params.yaml}.

    One still running or queued (it has an executor) is left out: until it ends, `dvc exp show`
    reads its figures from the files its baseline had.
    """
    found = {}
    for commit in json.loads(dvc(repo, "exp", "show", "--json", *(["--all-commits"] if all_commits else []))):  # newest commit first
        for exp in commit.get("experiments") or []:
            if exp.get("executor"):
                continue
            for rev in exp.get("revs") or []:
                data = rev.get("data") or {}
                name = rev.get("name") or exp.get("name")
                if name and not rev.get("error"):
                    found.setdefault(name, {"metrics": {f: (m or {}).get("data", {}) for f, m in (data.get("metrics") or {}).items()},
                                            "params": ((data.get("params") or {}).get("params.yaml") or {}).get("data", {})})
    return found


def run(repo: Path, recipes: list[str], seeds: list[int], tag: str, sets: list[str], queue: bool) -> None:
    done = experiments(repo)
    for recipe in recipes:
        for seed in seeds:
            name = experiment_name(recipe, seed, tag)
            overrides = [*RECIPES[recipe], *sets, f"train.seed={seed}"]
            overrides = list({kv.partition("=")[0]: kv for kv in overrides}.values())  # a key once, its last value: --set overrides the recipe
            if name in done:
                differ = [kv for kv in overrides if not _holds(done[name]["params"], kv)]
                if differ:
                    sys.exit(f"experiment {name} exists with other params ({', '.join(differ)} differ): "
                             f"`dvc exp remove {name}` first, or pass another --tag")
                print(f"{name}: already there, skipped", flush=True)
                continue
            flags = [arg for kv in overrides for arg in ("-S", dvc_override(kv))]
            dvc(repo, "exp", "run", "--queue" if queue else "--temp", "-n", name, *flags)
            print(f"{name}: {'queued' if queue else 'done'} ({' '.join(overrides)})", flush=True)


def dvc_override(override: str) -> str:
    """`KEY=VALUE` as `dvc exp run -S` must see it: DVC reads -S in Hydra's grammar, where a bare
    comma makes a sweep ("a, b" would be two runs, refused without --queue), so a VALUE with a
    comma that is not already a list, a dict or quoted is single-quoted (a vocabulary "a, b, c")."""
    key, _, value = override.partition("=")
    text = value.strip()
    if "," not in text or text[:1] in "[{'\"":
        return override
    return f"{key}='" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _holds(params: dict, override: str) -> bool:
    """Whether `params` (params.yaml as dvc reads it) hold `KEY=VALUE` (VALUE read as YAML, as -S does)."""
    key, _, value = override.partition("=")
    node = params
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return node == yaml.safe_load(value)


def rows(repo: Path, recipes: list[str], tag: str, all_commits: bool = False) -> list[dict]:
    """One row per experiment of `recipes` (named RECIPE-sSEED[-TAG]) with its figures."""
    out = []
    for name, exp in experiments(repo, all_commits).items():
        recipe, _, rest = name.rpartition("-s")
        seed, _, exp_tag = rest.partition("-")
        if recipe not in recipes or exp_tag != tag or not seed.isdigit() or VAL not in exp["metrics"]:
            continue
        val, held, live = exp["metrics"][VAL], exp["metrics"].get(HELD_OUT, {}), exp["metrics"].get(LIVE, {})
        health = live.get("health", {})
        out.append({
            "experiment": name, "recipe": recipe, "seed": int(seed),
            "student": val["miou"]["student"], "teacher_alone": val["miou"]["training_free"],
            "teacher_dense": val["miou"].get("maskclip", float("nan")), "grouped_dense": val["miou"].get("grouped_maskclip", float("nan")), "trivial": val["miou"]["trivial"],
            "oracle_student": val["oracle"]["student"], "oracle_grid": val["oracle"]["grid"],
            "segments_per_window": val["segments_per_window"], "held_out_student": held.get("miou", {}).get("student", float("nan")),
            "segment_retrieval": health.get("segment_retrieval", float("nan")), "segment_resultant": health.get("segment_resultant", float("nan")),
            "teacher_resultant": health.get("teacher_resultant", float("nan")),
        })
    return sorted(out, key=lambda r: (recipes.index(r["recipe"]), r["seed"]))


def table(rows: list[dict]) -> str:
    """Markdown: one line per recipe, mean +- std (min) over its seeds."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["recipe"], []).append(r)
    lines = ["| recipe | seeds | student mIoU, validation: mean +- std (min) | teacher alone: grid / dense | student's segments, dense naming (min) "
             "| oracle student (min) | oracle grid | segments/window (min) | segment retrieval | segment / teacher resultant | student, held-out (record only) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for recipe, rs in groups.items():
        def col(k: str) -> list[float]:
            return [r[k] for r in rs]
        s = col("student")
        lines.append(
            f"| {recipe} | {','.join(str(r['seed']) for r in rs)} | {statistics.mean(s):.3f} +- {statistics.pstdev(s):.3f} ({min(s):.3f}) "
            f"| {statistics.mean(col('teacher_alone')):.3f} / {statistics.mean(col('teacher_dense')):.3f} | {statistics.mean(col('grouped_dense')):.3f} ({min(col('grouped_dense')):.3f}) "
            f"| {statistics.mean(col('oracle_student')):.3f} ({min(col('oracle_student')):.3f}) "
            f"| {statistics.mean(col('oracle_grid')):.3f} | {statistics.mean(col('segments_per_window')):.2f} ({min(col('segments_per_window')):.2f}) "
            f"| {statistics.mean(col('segment_retrieval')):.3f} | {statistics.mean(col('segment_resultant')):.2f} / {statistics.mean(col('teacher_resultant')):.2f} "
            f"| {statistics.mean(col('held_out_student')):.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("action", choices=["run", "table"])
    ap.add_argument("--repo", type=Path, default=Path("."), help="the DVC project (default: here)")
    ap.add_argument("--recipes", default="default", help="comma-separated subset of: " + ", ".join(RECIPES))
    ap.add_argument("--seeds", default="0,1,2", help="train.seed values, comma-separated")
    ap.add_argument("--tag", default="", help="appended to the experiment names (a sweep with other --set values)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra KEY=VALUE for every experiment (e.g. train.epochs=36)")
    ap.add_argument("--queue", action="store_true", help="queue the experiments (then `dvc queue start -j N`) instead of running them")
    ap.add_argument("--all-commits", action="store_true",
                    help="table: also the experiments of earlier commits (the newest of a name); run always looks at this commit's only")
    args = ap.parse_args()
    recipes = args.recipes.split(",")
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        ap.error(f"unknown recipe(s) {', '.join(unknown)}; known: {', '.join(RECIPES)}")
    if args.action == "run":
        run(args.repo, recipes, [int(s) for s in args.seeds.split(",")], args.tag, args.overrides, args.queue)
    found = rows(args.repo, recipes, args.tag, args.all_commits)
    if args.action == "table" or not args.queue:
        print(table(found))
        if args.json:
            emit({"rows": found}, args.json)


if __name__ == "__main__":
    main()
