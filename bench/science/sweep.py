"""The demo's science as DVC experiments: each recipe over seeds, scored on the validation split.

Each (recipe, seed) is one DVC experiment, `dvc exp run --temp -n RECIPE-sSEED -S KEY=VALUE ...`
(with `--queue`, queued for `dvc queue start -j N` instead), so every row of the table is
reproduced by its own `dvc exp apply NAME && dvc repro`. An experiment runs what its params make
stale (the student and both evaluations; the teacher cache too when a `cache` key changes); the
demo data come from the DVC cache, and an experiment whose params equal an earlier run's is
restored from DVC's run cache. Experiments already there (by name) are skipped, so an
interrupted sweep picks up where it stopped.

The table is read from `dvc exp show --json`: per recipe, the mean, spread (population std) and
minimum over seeds of the student's mIoU and mIoU over the objects on the validation split
(`metrics_val/`, the `evaluate_val` stage on data/demo_val), beside the strongest teacher-alone
method's and the 95% interval of the student's difference to it (per seed). Recipes are chosen
on that split only: the held-out split is not read here.

    dvc repro                                                              # the default, seed 0
    python -m bench.science.sweep run --recipes default --seeds 1,2
    python -m bench.science.sweep table --recipes default
    python -m bench.science.sweep table --recipes default --all-commits     # experiments of earlier commits too
    python -m bench.science.sweep run --recipes default --seeds 0,1,2 --tag e40 --set train.epochs=40
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

from bench.harness import emit, parser

# Each recipe is a delta from params.yaml (`default`); the measurements behind each are in
# docs/demo.md. Recipes of options since removed are in docs/findings.md (git tag lab-2026-12).
RECIPES = {
    "default": [],
    "no_crop_targets": ["loss.token_crop_weight=0"],  # the token targets: the dense cell alone
    "no_prior": ["loss.anchor_prior=none"],  # the targets' word prior left in
    "dense256": ["cache.dense_side=0"],  # the dense grid at the teacher's own 32 px per cell (256 px)
    "no_token_background": ["loss.token_background=0"],  # no background score of the student's own (the probability rule)
    "e36": ["train.epochs=36"],  # the earlier budget: 1,656 steps
    "e20": ["train.epochs=20"],  # the ten-minute main job: 920 steps, 5 minutes of training on two cores (docs/demo.md "The budget")
    "e120": ["train.epochs=120"],  # twice the default's budget: 5,520 steps, 25 minutes
    "no_hflip": ["train.hflip=false"],  # no mirrored scenes (docs/demo.md "Mirrored scenes")
    "views": ["loss.view_anchors=4"],  # the wordless anchors beside the words (docs/demo.md "Open vocabulary")
    # open vocabulary: star, cross and ring left out of the anchors, without and with the wordless anchors
    "open": ['loss.anchor_vocabulary="background, circle, square, triangle"'],
    "open_views": ['loss.anchor_vocabulary="background, circle, square, triangle"', "loss.view_anchors=4"],
    "paper": ["loss.infomax=0", "loss.bidirectional_matching=false", "loss.region_match=0"],  # the paper's losses beside the token term
}
VAL = "metrics_val/demo.json"


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
    """One row per experiment of `recipes` (named RECIPE-sSEED[-TAG]) with its validation figures."""
    out = []
    for name, exp in experiments(repo, all_commits).items():
        recipe, _, rest = name.rpartition("-s")
        seed, _, exp_tag = rest.partition("-")
        if recipe not in recipes or exp_tag != tag or not seed.isdigit() or VAL not in exp["metrics"]:
            continue
        val = exp["metrics"][VAL]
        bar = next((k for k in val["miou"] if k != "student"), None)
        nan = float("nan")
        lo, hi = val.get("diff_ci95_lo", {}), val.get("diff_ci95_hi", {})
        out.append({
            "experiment": name, "recipe": recipe, "seed": int(seed), "baseline": bar,
            "student": val["miou"]["student"], "student_fg": val["miou_fg"]["student"],
            "baseline_miou": val["miou"].get(bar, nan), "baseline_fg": val["miou_fg"].get(bar, nan),
            "ci_lo": lo.get("miou", nan), "ci_hi": hi.get("miou", nan), "ci_fg_lo": lo.get("miou_fg", nan), "ci_fg_hi": hi.get("miou_fg", nan),
        })
    return sorted(out, key=lambda r: (recipes.index(r["recipe"]), r["seed"]))


def table(rows: list[dict]) -> str:
    """Markdown: one line per recipe, mean +- std (min) over its seeds."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["recipe"], []).append(r)
    lines = ["| recipe | seeds | student mIoU: mean +- std (min) | objects only (min) | strongest teacher-alone: mIoU / objects "
             "| 95% interval of the difference, mIoU / objects (each seed) |",
             "|---|---|---|---|---|---|"]
    for recipe, rs in groups.items():
        def col(k: str) -> list[float]:
            return [r[k] for r in rs]
        s, fg = col("student"), col("student_fg")
        intervals = "; ".join(f"[{r['ci_lo']:+.3f}, {r['ci_hi']:+.3f}] / [{r['ci_fg_lo']:+.3f}, {r['ci_fg_hi']:+.3f}]" for r in rs)
        lines.append(
            f"| {recipe} | {','.join(str(r['seed']) for r in rs)} | {statistics.mean(s):.3f} +- {statistics.pstdev(s):.3f} ({min(s):.3f}) "
            f"| {statistics.mean(fg):.3f} ({min(fg):.3f}) | {rs[0]['baseline']} {statistics.mean(col('baseline_miou')):.3f} / {statistics.mean(col('baseline_fg')):.3f} "
            f"| {intervals} |"
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
