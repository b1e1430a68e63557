"""What a student's grouping is worth to the teacher's dense naming.

On labelled scenes (the validation split by default; masks used to score, never to fit), the
teacher's MaskCLIP class scores (`eval.baselines: maskclip`, at `eval.dense_short_side`) are
taken per pixel, and each segment of the student (its segmentation under the evaluation's
protocol) gets the class whose scores, summed over its pixels, are best; background words
compete as in the evaluation's rule. Beside it: MaskCLIP alone (each pixel its own best class)
and the student's own zero-shot naming. If the segments follow the objects better than
MaskCLIP's coarse map does, the grouped naming beats MaskCLIP alone.

    python -m bench.science.grouped_naming --checkpoint models/student/checkpoint.pt --data data/demo_val
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.harness import emit
from bench.science.split import open_split
from pipeline.core.decode import load_rgb
from pipeline.evaluation.baselines import MaskCLIPSegmenter, _normalize
from pipeline.evaluation.inference import (
    StudentSegmenter,
    class_scores,
    resize_short_side,
    vocabulary,
)
from pipeline.evaluation.metrics import ConfusionMatrix
from pipeline.clip.text import template_set


def main() -> None:
    args, params, model, dataset = open_split(__doc__)
    e = params.eval
    text, rule = vocabulary(model.embedder, list(dataset.class_names[1:]), template_set(e.templates), mode=e.bg_rule,
                            threshold=e.bg_threshold.get("demo", 0.0), bg_words=e.bg_words)
    scale = model.embedder.logit_scale
    student = StudentSegmenter(model.student, text, scale, rule, short_side=e.short_side, window=e.window, stride=e.stride,
                               topk_classes=e.topk_classes, protocol=e.protocol)
    dense = MaskCLIPSegmenter(model.teacher, text, scale, rule, short_side=e.dense_short_side or e.short_side)
    scores = {m: ConfusionMatrix(dataset.num_classes, dataset.ignore_index) for m in ("student", "maskclip", "student_segments_named_by_maskclip")}
    with torch.inference_mode():
        for sample in dataset:
            image = load_rgb(sample.image_path, max_pixels=params.data.max_pixels, exif=False)
            pred = student.predict(image)
            scores["student"].update(pred.labels, sample.mask)
            x = resize_short_side(image, dense.short_side).round_()
            feats = dense.dense_features(_normalize(model.teacher, x[None]))[0]  # [gh, gw, D]
            gh, gw, _ = feats.shape
            probs = class_scores(feats.reshape(gh * gw, -1), text, scale, rule.mode)  # [gh*gw, K']
            probs = F.interpolate(probs.T.reshape(1, -1, gh, gw), size=image.shape[:2], mode="bilinear", align_corners=False)[0]  # [K', H, W]
            _, own = rule.decide(probs.permute(1, 2, 0))
            scores["maskclip"].update(own.numpy(), sample.mask)
            ids, inverse = torch.unique(torch.from_numpy(pred.segments), return_inverse=True)
            summed = torch.zeros(len(ids), probs.shape[0]).index_add_(0, inverse.flatten(), probs.flatten(1).T)  # [segments, K']
            _, named = rule.decide(summed)
            scores["student_segments_named_by_maskclip"].update(named[inverse].numpy(), sample.mask)
    names = list(dataset.class_names)
    report = {"checkpoint": args.checkpoint, "scenes": len(dataset), "dense_short_side": dense.short_side}
    for method, matrix in scores.items():
        d = matrix.scores().as_dict(names)
        report[f"miou_{method}"] = round(d["miou"], 4)
        report[f"per_class_iou_{method}"] = {k: round(v, 3) for k, v in d["per_class_iou"].items()}
    emit(report, args.json)


if __name__ == "__main__":
    main()
