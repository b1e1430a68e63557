"""The README's main job, stage by stage: how long each stage of `dvc repro` takes on this machine.

A fresh clone of the committed project (git HEAD) runs `dvc repro` one stage at a time, in the
pipeline's order, with this interpreter's environment (the set-up is the README's own `./setup.sh`,
timed apart by `--setup`). Each stage's wall time is printed, and their sum. `--set KEY=VALUE`
edits the clone's params.yaml first, so two settings can be timed one after the other (the
earlier demo budget, say: `--set train.epochs=36 --set train.log_every=2 --set train.num_workers=2`).

    python -m bench.main_job                      # the demo's main job, as committed
    python -m bench.main_job --setup              # and ./setup.sh in the clone, first
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.harness import emit, parser

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str], cwd: Path, python: Path | None = None) -> float:
    """Seconds `cmd` took in `cwd`, with `python`'s folder first on PATH (dvc's stage commands say `python`)."""
    env = dict(os.environ)
    if python is not None:
        env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return time.perf_counter() - t0


def set_params(clone: Path, overrides: list[str]) -> None:
    path = clone / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for kv in overrides:
        key, _, value = kv.partition("=")
        section, name = key.split(".", 1)
        params[section][name] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=VALUE edits of the clone's params.yaml")
    ap.add_argument("--setup", action="store_true", help="also time ./setup.sh in the clone (a venv and the install)")
    ap.add_argument("--keep", action="store_true", help="keep the clone (its path is printed)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="zeroseg-main-job-"))
    clone = tmp / "zeroseg"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    times: dict[str, float] = {}
    python = Path(sys.executable)
    if args.setup:
        times["setup.sh"] = run(["bash", "setup.sh"], clone)
        python = clone / ".venv" / "bin" / "python"
    dvc = [str(python), "-m", "dvc"]
    if args.overrides:
        set_params(clone, args.overrides)
    listed = subprocess.run([*dvc, "stage", "list", "--name-only"], cwd=clone, capture_output=True, text=True, check=True).stdout
    stages = [s for s in listed.split() if ":" not in s]  # dvc.yaml's own (not ablations/ or paper/)
    for stage in stages:  # dvc stage list gives the file's order, which is the pipeline's (each stage after what it reads)
        times[stage] = run([*dvc, "repro", "--single-item", stage], clone, python)
        print(f"{stage:>16}: {times[stage]:7.1f} s", flush=True)
    total = sum(times.values())
    print(f"{'total':>16}: {total:7.1f} s ({total / 60:.1f} min){' with the set-up' if args.setup else ''}")
    emit({"stages_s": {k: round(v, 1) for k, v in times.items()}, "total_s": round(total, 1), "overrides": args.overrides}, args.json)
    if args.keep:
        print(f"clone kept: {clone}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
