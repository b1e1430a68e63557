"""GroupViT's probability rule, each method at its own threshold, chosen on the validation split.

Under the probability rule a pixel is background where its method's best class probability
(softmax over the class words alone) is under a threshold. GroupViT fixes one per benchmark for its
own model; a method whose probabilities are calibrated otherwise (the demo teacher's logit scale is
9.4, the student ranks words at 1 / loss.anchor_tau) needs its own. This scans thresholds for the
student (at `eval.student_logit_scale`) and the teacher-alone methods (`training_free`, `maskclip`,
at their tuned settings in params.yaml) on a labelled split, and prints each one's mIoU and mIoU
over the objects per threshold, and its best with the --set that gives it (the student:
`eval.student_bg_threshold.demo`; the teacher-alone methods share `eval.bg_threshold.demo`, set to
the strongest one's best). Each method's scores are computed once per image; only the decision
changes with the threshold.

    python -m bench.science.thresholds --checkpoint models/student/checkpoint.pt --data data/demo_val
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from tqdm.auto import tqdm

from bench.harness import emit
from bench.science.split import open_split
from pipeline.clip.text import template_set
from pipeline.core.decode import load_rgb
from pipeline.evaluation import ConfusionMatrix
from pipeline.evaluation.baselines import NamedSegments, teacher_segmenter
from pipeline.evaluation.scoreboard import Scoreboard
from pipeline.evaluation.student_naming import student_segmenter
from pipeline.evaluation.vocabulary import namers, student_calibrated, student_threshold

THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 ... 0.95
TEACHERS = ("training_free", "maskclip")


def scan(sample, dataset, params, student, own, teachers, namer, board: Scoreboard) -> None:
    """One labelled image: every method's labels at every threshold, added to `board` as "METHOD T"."""
    image = load_rgb(sample.image_path, max_pixels=params.data.max_pixels, exif=False)

    def add(method: str, threshold: float, labels: np.ndarray) -> None:
        cm = ConfusionMatrix(dataset.num_classes, dataset.ignore_index)
        cm.update(labels, sample.mask)
        board.add(f"{method} {threshold:.2f}", cm.matrix)

    if isinstance(student, NamedSegments):  # its segments once; the tokens' scores are cheap
        segments = student.student.predict(image, own).segments
        for t in THRESHOLDS:
            add("student", t, student.predict(image, dataclasses.replace(own, threshold=t), segments=segments).labels)
    else:
        for t in THRESHOLDS:
            add("student", t, student.predict(image, dataclasses.replace(own, threshold=t)).labels)
    for method, segmenter in teachers.items():
        best, label = namer.decide(segmenter.scores(image, namer))  # [h, w]: the threshold changes neither
        for t in THRESHOLDS:
            add(method, t, dataclasses.replace(namer, threshold=t).finish(label, best, image.shape[:2]).labels)


def main() -> None:
    args, params, model, dataset = open_split(__doc__)
    e = params.eval
    teachers_at = e.bg_threshold.get("demo", e.bg_threshold.get("default", 0.5))
    namer = namers(model.embedder, list(dataset.class_names[1:]), template_set(e.templates), rules=["probability"],
                   thresholds={"probability": teachers_at}, logit_scale=model.embedder.logit_scale, bg_words=e.bg_words)["probability"]
    own = student_calibrated(namer, e, student_threshold(e, "demo", teachers_at))
    student = student_segmenter(model.student, e, "cpu")
    teachers = {m: teacher_segmenter(m, model.teacher, e) for m in TEACHERS}
    board = Scoreboard(dataset.num_classes)
    with torch.no_grad():  # a context, not the global switch: the bench is also called in-process (tests)
        for i in tqdm(range(len(dataset)), desc="thresholds", unit="img"):
            scan(dataset[i], dataset, params, student, own, teachers, namer, board)
    rows = {m: [{"threshold": t, "miou": board.miou(f"{m} {t:.2f}"), "miou_fg": board.miou_fg(f"{m} {t:.2f}")} for t in THRESHOLDS]
            for m in ("student", *TEACHERS)}
    print("| threshold | " + " | ".join(f"{m}: mIoU / objects" for m in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for k, t in enumerate(THRESHOLDS):
        print(f"| {t:.2f} | " + " | ".join(f"{rows[m][k]['miou']:.3f} / {rows[m][k]['miou_fg']:.3f}" for m in rows) + " |")
    best = {m: max(r, key=lambda x: x["miou"]) for m, r in rows.items()}
    strongest = max(TEACHERS, key=lambda m: best[m]["miou"])
    print(f"\nbest on {args.data} ({len(dataset)} images; the student at scale {own.logit_scale:g}, the teachers at {namer.logit_scale:g}):")
    for m, b in best.items():
        print(f"  {m}: threshold {b['threshold']:.2f}, mIoU {b['miou']:.3f}, objects {b['miou_fg']:.3f}")
    print(f"  --set eval.student_bg_threshold.demo={best['student']['threshold']} --set eval.bg_threshold.demo={best[strongest]['threshold']}"
          f" (the teacher-alone methods share one: {strongest}'s)")
    emit({"rows": rows, "best": best, "strongest_teacher": strongest, "split": args.data, "images": len(dataset)}, args.json)


if __name__ == "__main__":
    main()
