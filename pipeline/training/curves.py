"""Static PNG pictures of a training run's curves, from dvclive's tables.

`dvc plots show` writes HTML that loads Vega from a CDN, so it renders blank offline. These
PNGs are plain images: any viewer shows them, and `dvc plots diff` puts two experiments'
pictures side by side without a network. One picture per group of dvclive metrics (`loss/*`,
`health/*`, and the run's other figures), one panel per metric against the step.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

CURVES_DIR = "curves"  # under dvclive's plots/ folder, beside its metrics/ tables


def read_tables(metrics: Path) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """{group: {metric: (steps, values)}} from dvclive's `plots/metrics` folder (TSV per metric)."""
    groups: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for table in sorted(metrics.rglob("*.tsv")):
        rel = table.relative_to(metrics).with_suffix("")
        group = rel.parts[0] if len(rel.parts) > 1 else "run"
        steps, values = [], []
        with table.open(newline="") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                value = row.get(rel.name)
                if value is None or row.get("step") is None:
                    continue
                steps.append(float(row["step"]))
                values.append(float(value))
        if steps:
            groups.setdefault(group, {})[rel.name] = (steps, values)
    return groups


def write_curves(live_dir: str | Path, title: str = "") -> list[Path]:
    """Write `live_dir/plots/curves/GROUP.png` for each group of logged metrics; returns them."""
    import matplotlib

    matplotlib.use("Agg")  # no display, no GUI toolkit: a file is all that is wanted
    import matplotlib.pyplot as plt

    plots = Path(live_dir) / "plots"
    out_dir = plots / CURVES_DIR
    written = []
    for group, metrics in read_tables(plots / "metrics").items():
        cols = min(4, len(metrics))
        rows = math.ceil(len(metrics) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
        for ax, (name, (steps, values)) in zip(axes.flat, sorted(metrics.items())):
            ax.plot(steps, values, linewidth=1.2)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(metrics):]:
            ax.axis("off")
        fig.suptitle(f"{title} {group}".strip(), fontsize=10)
        fig.tight_layout()
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{group}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
