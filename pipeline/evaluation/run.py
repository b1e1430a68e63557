"""Zero-shot evaluation: the student and the training-free baseline, same images, same protocol.

For each dataset in `eval.datasets`, every segmenter sees the same images at the same
resolution, the same class embeddings (the dataset's background class is not in the
vocabulary: the background rule decides it, by a threshold or by `eval.bg_words`), the same
rule and threshold, the same top-k restriction, and is scored by the same confusion matrix
(255 ignored). Results go to one metrics JSON per dataset (`dvc metrics show` reads
them), a per-class table in the terminal, and overlay pictures of the first `eval.pictures`
images.
"""

from __future__ import annotations

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
from pipeline.evaluation.baselines import TeacherNamedSegmenter, teacher_segmenter
from pipeline.evaluation.inference import vocabulary
from pipeline.evaluation.models import calibration_center, load_model
from pipeline.evaluation.oracle import grid_regions, majority_labels
from pipeline.evaluation.overlay import write_overlay
from pipeline.evaluation.student_naming import student_segmenter

TEACHER_ALONE = ("training_free", "maskclip", "sclip", "naclip")
BASELINES = (*TEACHER_ALONE, *(f"grouped_{m}" for m in TEACHER_ALONE))


def side_by_side(names: list[str], columns: dict[str, SegmentationScores]) -> str:
    """Per-class IoU (%) of every method in one table, with mIoU and pixel accuracy last."""
    width = max(12, *(len(n) for n in names))
    head = f"{'class':<{width}} " + " ".join(f"{m:>14}" for m in columns)
    rows = [head, "-" * len(head)]

    def pct(x: float) -> str:
        return f"{100 * x:14.1f}" if x == x else f"{'-':>14}"

    for k, name in enumerate(names):
        rows.append(f"{name:<{width}} " + " ".join(pct(s.iou[k]) for s in columns.values()))
    rows.append("-" * len(head))
    rows.append(f"{'mIoU':<{width}} " + " ".join(pct(s.miou) for s in columns.values()))
    rows.append(f"{'pixel acc.':<{width}} " + " ".join(pct(s.pixel_accuracy) for s in columns.values()))
    return "\n".join(rows)


HEADLINE = ("miou", "oracle", "segments_per_image", "segments_per_window", "images")  # the registered metrics


DETAIL = ("pixel_accuracy", "per_class_iou", "images")  # beside them, not registered: 42 more columns on the demo


def run_evaluation(params: Params, checkpoint: str | Path, metrics_dir: str | Path, pictures_dir: str | Path | None = None, *, base_checkpoint: str | Path | None = None, progress: bool = True, echo=print,
                   details_dir: str | Path | None = None) -> dict:
    """Evaluate the student (and the baselines in `eval.baselines`) on every dataset of `eval.datasets`.

    Writes the headline `metrics_dir/DATASET.json` per dataset (what DVC registers as metrics):
    `miou.{student, base, training_free, maskclip, sclip, naclip, grouped_*, trivial}` (those that ran; `grouped_maskclip`
    is the student's segments named by the teacher's MaskCLIP, `grouped_training_free` by its grid cells: `TeacherNamedSegmenter`), `oracle.{student,
    grid}` (segments labelled by their majority true class: the grouping alone, beside a
    content-blind 3x3 grid), `segments_per_image` (distinct student segments per image),
    `segments_per_window` (segments owning at least 1% of a window, averaged: 1 means the
    grouping collapsed) and `images`. The detail goes to `details_dir/DATASET.json` when given:
    `pixel_accuracy.*` and `per_class_iou.*` (of all of them, the oracles as `oracle_student`
    and `oracle_grid`, as the printed table shows them) and `images`.

    Args:
        base_checkpoint: a second student (the paper's "Base" ablation), evaluated beside.
        details_dir: folder for the per-class detail (None: not written).
    Returns:
        {dataset: headline and detail together}.
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
    missing = [name for name in datasets if name not in e.bg_threshold]
    if missing and e.bg_rule != "class":
        raise InputError(f"eval.bg_threshold: no threshold for dataset {missing[0]!r} (have: {', '.join(e.bg_threshold)})")
    model = load_model(params, checkpoint)
    base = load_model(params, base_checkpoint) if base_checkpoint else None
    device = resolve_device(e.device, key="eval.device")
    center = calibration_center(params, model, checkpoint)  # one mean for every method: the teacher's
    templates = template_set(e.templates)
    results: dict[str, dict] = {}
    for name, dataset in datasets.items():
        classes = list(dataset.class_names[1:])  # index 0 is background, decided by the background rule
        text, rule = vocabulary(model.embedder, classes, templates, mode=e.bg_rule, threshold=e.bg_threshold.get(name, 0.0), bg_words=e.bg_words)
        methods = {"student": student_segmenter(model.student, text, model.embedder.logit_scale, rule, e, device, center)}
        if base is not None:
            methods["base"] = student_segmenter(base.student, text, model.embedder.logit_scale, rule, e, device, center)
        for alone in TEACHER_ALONE:
            if alone in e.baselines or f"grouped_{alone}" in e.baselines:
                segmenter = teacher_segmenter(alone, model.teacher, text, model.embedder.logit_scale, rule, e, center)  # one per method: its pass is shared
                if alone in e.baselines:
                    methods[alone] = segmenter
                if f"grouped_{alone}" in e.baselines:
                    methods[f"grouped_{alone}"] = TeacherNamedSegmenter(methods["student"], segmenter)
        scored = [*methods, "trivial", "oracle_student", "oracle_grid"]
        matrices = {m: ConfusionMatrix(dataset.num_classes, dataset.ignore_index) for m in scored}
        n = len(dataset) if not e.max_images else min(e.max_images, len(dataset))
        segments_used, per_window = 0, 0.0
        for i in tqdm(range(n), desc=f"evaluate {name}", unit="img", disable=not progress):
            sample = dataset[i]
            image = load_rgb(sample.image_path, max_pixels=params.data.max_pixels, exif=False)
            student_segments = None
            for method, segmenter in methods.items():
                # the grouped methods name the student's own segments (the student runs first)
                pred = segmenter.predict(image, segments=student_segments) if method.startswith("grouped_") else segmenter.predict(image)
                matrices[method].update(pred.labels, sample.mask)
                if method == "student":
                    student_segments = pred.segments
                    matrices["oracle_student"].update(majority_labels(pred.segments, sample.mask, dataset.num_classes, dataset.ignore_index), sample.mask)
                    segments_used += len(np.unique(pred.segments))
                    per_window += pred.segments_per_window
                if pictures_dir is not None and i < e.pictures:
                    picture = Path(pictures_dir) / name / f"{sample.image_id}_{method}.png"
                    picture.parent.mkdir(parents=True, exist_ok=True)  # split ids may hold sub-folders
                    write_overlay(picture, image, pred.labels, classes)
            matrices["trivial"].update(np.zeros_like(sample.mask), sample.mask)
            grid = grid_regions(*sample.mask.shape, g=3)
            matrices["oracle_grid"].update(majority_labels(grid, sample.mask, dataset.num_classes, dataset.ignore_index), sample.mask)
        scores = {m: cm.scores() for m, cm in matrices.items()}
        names = list(dataset.class_names)
        ran = [m for m in scored if not m.startswith("oracle")]
        results[name] = {
            "miou": {m: scores[m].as_dict(names)["miou"] for m in ran},
            "oracle": {"student": scores["oracle_student"].as_dict(names)["miou"], "grid": scores["oracle_grid"].as_dict(names)["miou"]},
            "pixel_accuracy": {m: scores[m].as_dict(names)["pixel_accuracy"] for m in scored},
            "per_class_iou": {m: scores[m].as_dict(names)["per_class_iou"] for m in scored},
            "segments_per_image": segments_used / max(1, n),
            "segments_per_window": per_window / max(1, n),
            "images": n,
        }
        how = f"background words {', '.join(e.bg_words)} in the vocabulary" if rule.mode == "class" else f"threshold {rule.threshold} on {rule.mode}"
        echo(f"\n{name} ({n} images, {len(classes)} classes + background, {how})")
        echo(side_by_side(names, {m: scores[m] for m in scored}))
        echo(f"student segments per image: {segments_used / max(1, n):.1f}, per window: {per_window / max(1, n):.2f} (1 means the grouping collapsed)")
        (Path(metrics_dir) / f"{name}.json").write_text(json.dumps({k: results[name][k] for k in HEADLINE}, indent=2))
        if details_dir is not None:
            (Path(details_dir) / f"{name}.json").write_text(json.dumps({k: results[name][k] for k in DETAIL}, indent=2))
    return results
