"""Zero-shot evaluation: the student, its ablations and the teacher-alone baselines, same images,
same protocol, under the headline background rule and GroupViT's probability rule.

For each dataset in `eval.datasets`, every method sees the same images, the same class
embeddings, the same rule and threshold, the same top-k restriction, and is scored by the same
confusion matrix (255 ignored). Each method's model runs once per image; both rules name its
output. Per image, every method's confusion matrix is kept (`Scoreboard`), so the headline can
carry the student's mIoU over the objects alone and paired bootstrap intervals of its
differences to the baselines. Results go to one headline metrics JSON per dataset (few numbers:
`dvc metrics show` reads them), the whole scoreboard beside it (`details_dir`), a table in the
terminal, and overlays of the first `eval.pictures` images.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pipeline.clip.text import template_set
from pipeline.config import Params
from pipeline.core.decode import load_rgb
from pipeline.core.device import resolve_device
from pipeline.core.errors import InputError
from pipeline.core.files import output_folder
from pipeline.evaluation import ConfusionMatrix, SegmentationScores, open_dataset
from pipeline.evaluation.baselines import NamedSegments, teacher_segmenter
from pipeline.evaluation.metrics import json_float
from pipeline.evaluation.models import load_model
from pipeline.evaluation.oracle import BoundaryScore, majority_labels, matched_grid, slic_regions
from pipeline.evaluation.overlay import write_overlay
from pipeline.evaluation.scoreboard import Scoreboard
from pipeline.evaluation.student_naming import StudentTokenScores, student_segmenter
from pipeline.evaluation.vocabulary import namers, student_calibrated, student_threshold

TEACHER_ALONE = ("training_free", "maskclip", "sclip", "naclip")
BASELINES = (*TEACHER_ALONE, *(f"grouped_{m}" for m in TEACHER_ALONE))
PAPER_RULE = "probability"  # GroupViT's, the paper's benchmarks': always scored beside eval.bg_rule
PARTITIONS = ("student", "grid", "slic")  # the grouping oracles: the student's regions, and as many content-blind / superpixel ones


def side_by_side(names: list[str], scores: dict) -> str:
    """Per-class IoU (%) of every method of one rule's scoreboard in one table, with mIoU, mIoU over
    the objects and pixel accuracy last."""
    columns = list(scores["miou"])
    width = max(12, *(len(n) for n in names))
    col = max(10, *(len(m) for m in columns))
    head = f"{'class':<{width}} " + " ".join(f"{m:>{col}}" for m in columns)
    rows = [head, "-" * len(head)]

    def pct(x: float | None) -> str:
        return f"{100 * x:{col}.1f}" if x is not None and x == x else f"{'-':>{col}}"

    for name in names:
        rows.append(f"{name:<{width}} " + " ".join(pct(scores["per_class_iou"][m][name]) for m in columns))
    rows.append("-" * len(head))
    for key, title in (("miou", "mIoU"), ("miou_fg", "mIoU objects"), ("pixel_accuracy", "pixel acc.")):
        rows.append(f"{title:<{width}} " + " ".join(pct(scores[key][m]) for m in columns))
    return "\n".join(rows)


def strongest_baseline(miou: dict[str, float]) -> str | None:
    """The teacher-alone method with the highest mIoU (the bar a trained student must clear)."""
    alone = [m for m in TEACHER_ALONE if m in miou]
    return max(alone, key=lambda m: miou[m]) if alone else None


def headline(detail: dict, rule: str) -> dict:
    """The few numbers `dvc metrics show` prints (a terminal's width for two splits): under the
    headline rule, the mIoU and the mIoU over the objects of the student and of the strongest
    teacher-alone method, and the 95% interval of the student's difference to it (`diff_ci95_lo`,
    `diff_ci95_hi`). Every method, both rules and every interval are in the detail file."""
    scores = detail["rules"][rule]
    bar = scores["strongest_baseline"]
    methods = ["student", *([bar] if bar else [])]
    out = {"miou": {m: scores["miou"][m] for m in methods}, "miou_fg": {m: scores["miou_fg"][m] for m in methods}}
    if bar:
        ci = scores["ci95"][bar]
        out["diff_ci95_lo"] = {"miou": ci["miou"]["lo"], "miou_fg": ci["miou_fg"]["lo"]}
        out["diff_ci95_hi"] = {"miou": ci["miou"]["hi"], "miou_fg": ci["miou_fg"]["hi"]}
    return out


def run_evaluation(params: Params, checkpoint: str | Path, metrics_dir: str | Path, pictures_dir: str | Path | None = None, *,
                   base_checkpoint: str | Path | None = None, ablations: dict[str, str | Path] | None = None, progress: bool = True, echo=print,
                   details_dir: str | Path | None = None) -> dict:
    """Evaluate the student (and the baselines in `eval.baselines`) on every dataset of `eval.datasets`.

    Methods: `student`; `student_1scale` (its tokens at `eval.token_short_side` alone, when
    `eval.token_ratios` has several scales: the share of its multi-scale averaging); `base`
    (the paper's Base ablation, named as the paper names segments, by their group embeddings);
    each of `ablations`, evaluated as the student is; the teacher-alone methods and the student's
    segments named by them (`grouped_*`); `trivial` (everything background). Under `eval.bg_rule`
    and, when that is another, GroupViT's probability rule.

    Writes `metrics_dir/DATASET.json` (`headline`) and, when `details_dir` is given, the whole
    scoreboard to `details_dir/DATASET.json`: per rule, every method's `miou`, `miou_fg` (the
    object classes alone), `pixel_accuracy`, `per_class_iou`, and `ci95` (the paired bootstrap
    interval of the student's difference to each other method, 1,000 resamples of the images, seed
    0); the grouping oracles (`oracle`: the student's regions, a grid and SLIC superpixels with as
    many regions per image, each labelled by its majority class; `boundary`: their edges' precision,
    recall and F against the truth's); `regions_per_image`, `segments_per_window` (the student's
    segments owning at least 1% of a window; 1 means the grouping collapsed) and `images`.

    Args:
        base_checkpoint: the paper's Base ablation, evaluated beside.
        ablations: {name: checkpoint} more students, evaluated as the student is.
        details_dir: folder for the whole scoreboard (None: not written).
    Returns:
        {dataset: the whole scoreboard}.
    """
    e = params.eval
    unknown = [b for b in e.baselines if b not in BASELINES]
    if unknown:
        raise InputError(f"eval.baselines: unknown {', '.join(unknown)} (known: {', '.join(BASELINES)})")
    if not e.datasets:
        raise InputError("eval.datasets: no dataset to evaluate on")
    # Every dataset is opened (names, layouts, splits, files) before any is evaluated: a typo in
    # the last one must not surface after hours spent on the first.
    datasets = {name: open_dataset(name, root) for name, root in e.datasets.items()}
    for folder, option in ((metrics_dir, "--metrics-dir"), (details_dir, "--details-dir"), (pictures_dir, "--pictures")):  # not found after the work
        if folder is not None:
            output_folder(folder, option)
    rules = [e.bg_rule, *([PAPER_RULE] if e.bg_rule != PAPER_RULE else [])]
    thresholds = {name: e.bg_threshold.get(name, e.bg_threshold.get("default")) for name in datasets}  # GroupViT's rule is always scored
    missing = [name for name, t in thresholds.items() if t is None]
    if missing:
        raise InputError(f"eval.bg_threshold: no threshold for dataset {missing[0]!r} and no default (have: {', '.join(e.bg_threshold)})")
    model = load_model(params, checkpoint)
    device = resolve_device(e.device, key="eval.device")
    paper_naming = dataclasses.replace(e, student_naming="segment", token_short_side=0)
    methods = {"student": student_segmenter(model.student, e, device)}
    student = methods["student"]
    windows = student.student if isinstance(student, NamedSegments) else student  # the student's own segments
    if isinstance(student, NamedSegments) and len(e.token_ratios) > 1:
        methods["student_1scale"] = NamedSegments(student.student, StudentTokenScores(model.student, short_side=e.token_short_side, device=device))
    if base_checkpoint:
        methods["base"] = student_segmenter(load_model(params, base_checkpoint).student, paper_naming, device)
    for name, path in (ablations or {}).items():
        methods[name] = student_segmenter(load_model(params, path).student, e, device)
    for alone in TEACHER_ALONE:
        if alone in e.baselines or f"grouped_{alone}" in e.baselines:
            segmenter = teacher_segmenter(alone, model.teacher, e)  # one per method: its pass is shared
            if alone in e.baselines:
                methods[alone] = segmenter
            if f"grouped_{alone}" in e.baselines:
                methods[f"grouped_{alone}"] = NamedSegments(windows, segmenter)
    students = {"student", "student_1scale", "base", *(ablations or {})}  # the methods read at the student's calibration
    templates = template_set(e.templates)
    results: dict[str, dict] = {}
    for name, dataset in datasets.items():
        classes = list(dataset.class_names[1:])  # index 0 is background, decided by the background rule
        vocab = namers(model.embedder, classes, templates, rules=rules, thresholds={r: thresholds[name] for r in rules if r != "class"},
                       logit_scale=model.embedder.logit_scale, bg_words=e.bg_words, topk=e.topk_classes)
        own = {rule: student_calibrated(namer, e, student_threshold(e, name, thresholds[name])) for rule, namer in vocab.items()}
        boards = {rule: Scoreboard(dataset.num_classes) for rule in rules}
        oracles = {p: ConfusionMatrix(dataset.num_classes, dataset.ignore_index) for p in PARTITIONS}
        boundaries = {p: BoundaryScore() for p in PARTITIONS}
        n = len(dataset) if not e.max_images else min(e.max_images, len(dataset))
        regions_total, per_window = 0, 0.0
        for i in tqdm(range(n), desc=f"evaluate {name}", unit="img", disable=not progress):
            sample = dataset[i]
            image = load_rgb(sample.image_path, max_pixels=params.data.max_pixels, exif=False)
            for rule in rules:
                grouped = windows.predict(image, own[rule])  # the student's segments under this rule
                student_segments = grouped.segments
                for method, segmenter in methods.items():
                    namer = own[rule] if method in students else vocab[rule]  # each method read at its own calibration
                    if segmenter is windows:
                        pred = grouped
                    elif isinstance(segmenter, NamedSegments) and segmenter.student is windows:  # names the student's own segments
                        pred = segmenter.predict(image, namer, segments=student_segments)
                    else:
                        pred = segmenter.predict(image, namer)
                    boards[rule].add(method, _matrix(pred.labels, sample.mask, dataset))
                    if pictures_dir is not None and i < e.pictures and rule == rules[0]:
                        picture = Path(pictures_dir) / name / f"{sample.image_id}_{method}.png"
                        picture.parent.mkdir(parents=True, exist_ok=True)  # split ids may hold sub-folders
                        write_overlay(picture, image, pred.labels, classes)
                boards[rule].add("trivial", _matrix(np.zeros_like(sample.mask), sample.mask, dataset))
                if rule == rules[0]:  # the grouping, under the headline rule (the rule only picks which overlapping window wins a pixel)
                    regions = len(np.unique(student_segments))
                    regions_total += regions
                    per_window += grouped.segments_per_window
                    h, w = sample.mask.shape
                    for part, ids in (("student", student_segments), ("grid", matched_grid(h, w, regions)), ("slic", slic_regions(image, regions))):
                        oracles[part].update(majority_labels(ids, sample.mask, dataset.num_classes, dataset.ignore_index), sample.mask)
                        boundaries[part].update(ids, sample.mask)
        names = list(dataset.class_names)
        detail = {"images": n, "rules": {rule: _rule_scores(boards[rule], names) for rule in rules},
                  "oracle": {p: oracles[p].scores().miou for p in PARTITIONS}, "boundary": {p: boundaries[p].scores() for p in PARTITIONS},
                  "regions_per_image": regions_total / max(1, n), "segments_per_window": per_window / max(1, n)}
        results[name] = detail
        for rule in rules:
            how = (f"background words {', '.join(e.bg_words)} in the vocabulary" if rule == "class" else
                   f"threshold {vocab[rule].threshold} on {rule}; the student's {own[rule].threshold} at scale {own[rule].logit_scale:g}")
            echo(f"\n{name} ({n} images, {len(classes)} classes + background, {how})")
            echo(side_by_side(names, detail["rules"][rule]))
        echo(f"grouping oracle (regions labelled by their majority class; {detail['regions_per_image']:.1f} regions per image): "
             + ", ".join(f"{p} {detail['oracle'][p]:.3f} (boundary F {detail['boundary'][p]['f']:.3f})" for p in PARTITIONS)
             + f"; student segments per window {detail['segments_per_window']:.2f} (1 means the grouping collapsed)")
        (Path(metrics_dir) / f"{name}.json").write_text(json.dumps(headline(detail, rules[0]), indent=2))
        if details_dir is not None:
            (Path(details_dir) / f"{name}.json").write_text(json.dumps(detail, indent=2))
    return results


def _matrix(pred: np.ndarray, target: np.ndarray, dataset) -> np.ndarray:
    cm = ConfusionMatrix(dataset.num_classes, dataset.ignore_index)
    cm.update(pred, target)
    return cm.matrix


def _rule_scores(board: Scoreboard, names: list[str]) -> dict:
    """One rule's scoreboard: every method's figures, the strongest teacher-alone method and the
    student's intervals against every other method."""
    scores = {m: SegmentationScores.from_matrix(board.stacked(m).sum(axis=0)).as_dict(names) for m in board.matrices}
    miou = {m: s["miou"] for m, s in scores.items()}
    return {
        "miou": miou,
        "miou_fg": {m: json_float(board.miou_fg(m)) for m in scores},
        "pixel_accuracy": {m: s["pixel_accuracy"] for m, s in scores.items()},
        "per_class_iou": {m: s["per_class_iou"] for m, s in scores.items()},
        "strongest_baseline": strongest_baseline(miou),
        "ci95": board.intervals("student", [m for m in scores if m != "student"]),
    }
