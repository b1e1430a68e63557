"""Where each method's objectness lives: in its shape scores, or in the word "background".

The demo's rule (`eval.bg_rule: class`) lets the background words compete with the class words;
GroupViT's probability rule drops them and calls a pixel background where its best class
probability (softmax over the class words only, cosine x logit scale) is under a threshold. The
second rule works only if a method's best class probability is higher on objects than on
background. Per pixel of a labelled split (masks used to score, never to fit), for the student's
token naming (`eval.student_naming: tokens`, at `eval.token_short_side` x `eval.token_ratios`)
and for the teacher alone (`training_free` grid cells, `maskclip`), this prints:

- `p_best_class`: the best class probability under the probability rule, its 10/50/90th
  percentiles on object and on background pixels, and its AUC as an object detector (0.5: blind,
  below 0.5: higher on background than on objects);
- `p_background`: the background words' probability under the class rule, the same figures, the
  AUC taken for 1 - p;
- `class_accuracy_on_objects`: on object pixels, how often the best class word is the true one.

    python -m bench.science.background_rule --checkpoint models/student/checkpoint.pt --data data/demo_val
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from bench.harness import emit
from bench.science.split import open_split
from pipeline.clip.text import template_set
from pipeline.core.decode import load_rgb
from pipeline.evaluation.baselines import teacher_segmenter
from pipeline.evaluation.student_naming import StudentTokenScores
from pipeline.evaluation.vocabulary import namers

METHODS = ("student", "training_free", "maskclip")


def object_auc(score: np.ndarray, positive: np.ndarray) -> float:
    """The probability that a random object pixel scores above a random background pixel (ties count half)."""
    order = np.argsort(score, kind="stable")
    ranks = np.empty(len(score))
    sorted_scores = score[order]
    # average ranks over ties, so that a constant score gives 0.5
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    n_pos = int(positive.sum())
    n_neg = len(score) - n_pos
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def quantiles(x: np.ndarray) -> list[float]:
    return [round(float(v), 3) for v in np.quantile(x, [0.1, 0.5, 0.9])]


def at_pixels(scores: torch.Tensor, shape: tuple[int, int], keep: np.ndarray) -> np.ndarray:
    """[h, w, K] scores at a method's resolution -> [kept pixels, K] at the mask's (bilinear, as the evaluation resizes)."""
    full = F.interpolate(scores.permute(2, 0, 1)[None].float(), size=shape, mode="bilinear", align_corners=False)[0]
    return full.permute(1, 2, 0).numpy()[keep]


def summary(score: np.ndarray, is_object: np.ndarray, *, higher_means_object: bool) -> dict:
    return {
        "objects_p10_p50_p90": quantiles(score[is_object]),
        "background_p10_p50_p90": quantiles(score[~is_object]),
        "object_auc": round(object_auc(score if higher_means_object else -score, is_object), 3),
    }


def main() -> None:
    args, params, model, dataset = open_split(__doc__)
    e = params.eval
    n_bg = len(e.bg_words)
    rules = namers(model.embedder, list(dataset.class_names[1:]), template_set(e.templates), rules=["probability", "class"], thresholds={"probability": 0.5},
                   logit_scale=model.embedder.logit_scale, bg_words=e.bg_words)
    scorers = {m: StudentTokenScores(model.student, short_side=e.token_short_side or e.short_side, ratios=e.token_ratios) if m == "student"
               else teacher_segmenter(m, model.teacher, e) for m in METHODS}
    gathered: dict[str, dict[str, list[np.ndarray]]] = {m: {"best": [], "bg": [], "right": []} for m in METHODS}
    object_pixels = []
    with torch.inference_mode():
        for sample in dataset:
            image = load_rgb(sample.image_path, max_pixels=params.data.max_pixels, exif=False)
            mask = sample.mask
            keep = mask != dataset.ignore_index
            is_object = mask[keep] > 0
            object_pixels.append(is_object)

            for m in METHODS:
                fg = at_pixels(scorers[m].scores(image, rules["probability"]), mask.shape, keep)  # softmax over the class words
                both = at_pixels(scorers[m].scores(image, rules["class"]), mask.shape, keep)  # background words first
                gathered[m]["best"].append(fg.max(-1))
                gathered[m]["bg"].append(both[:, :n_bg].sum(-1))
                gathered[m]["right"].append(fg.argmax(-1)[is_object] + 1 == mask[keep][is_object])
    is_object = np.concatenate(object_pixels)
    report = {"checkpoint": args.checkpoint, "scenes": len(dataset), "object_pixel_share": round(float(is_object.mean()), 3)}
    for m in METHODS:
        g = {k: np.concatenate(v) for k, v in gathered[m].items()}
        report[m] = {
            "p_best_class": summary(g["best"], is_object, higher_means_object=True),
            "p_background": summary(g["bg"], is_object, higher_means_object=False),
            "class_accuracy_on_objects": round(float(g["right"].mean()), 3),
        }
    emit(report, args.json)


if __name__ == "__main__":
    main()
