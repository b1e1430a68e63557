"""Live logging to dvclive: opened for a fresh run or a resume, with no step logged twice."""

from __future__ import annotations

from pathlib import Path

from pipeline.core.errors import InputError


def open_live(live_dir: str | Path | None, *, resume_step: int | None):
    """dvclive in `live_dir` (None for no logging); resuming from `resume_step` keeps its rows up to that step."""
    if live_dir is None or str(live_dir).strip() in ("", "."):
        return None
    live_path = Path(live_dir).resolve()
    if live_path == Path.cwd().resolve() or (live_path / "dvc.yaml").exists() or (live_path / "params.yaml").exists():
        # dvclive clears metrics.json, plots/, params.yaml and dvc.yaml in its folder when it starts.
        raise InputError(f"--live-dir {live_dir}: must be a folder of its own (dvclive clears its files), not one holding params.yaml or dvc.yaml")
    from dvclive import Live

    if resume_step is not None:
        drop_rows_after(live_path / "plots" / "metrics", resume_step)
    try:
        return Live(dir=str(live_dir), resume=resume_step is not None, save_dvc_exp=False, dvcyaml=None)
    except Exception as exc:  # noqa: BLE001 - dvclive raises scmrepo errors, e.g. in a repo without commits
        raise InputError(f"dvclive could not start in {live_dir} ({type(exc).__name__}: {exc}); commit once, or pass --live-dir ''") from None


def drop_rows_after(plots: Path, step: int) -> None:
    """Remove the rows past `step` from dvclive's metric tables in `plots`.

    A run that stopped after its last checkpoint logged steps that the resumed run logs again;
    dvclive's resume only appends, so without this the plots would hold those steps twice.
    """
    for table in sorted(plots.rglob("*.tsv")):
        lines = table.read_text(encoding="utf-8").splitlines(keepends=True)
        if not lines:
            continue
        header = lines[0].rstrip("\r\n").split("\t")
        column = header.index("step") if "step" in header else 0
        kept = [lines[0]] + [line for line in lines[1:] if line.strip() and int(line.split("\t")[column]) <= step]
        if len(kept) != len(lines):
            tmp = table.with_suffix(".tsv.tmp")
            tmp.write_text("".join(kept), encoding="utf-8")
            tmp.replace(table)


def log_step(live, step: int, losses: dict[str, float], health: dict[str, float], **figures: float) -> None:
    """One row of every metric at `step`: loss terms, health figures, then `figures` (lr, throughput)."""
    live.step = step  # log_metric records at the current step: set it first
    for k, v in losses.items():
        live.log_metric(f"loss/{k}", v)
    for k, v in health.items():
        live.log_metric(f"health/{k}", v)
    for k, v in figures.items():
        live.log_metric(k, v)
    live.next_step()
