"""Every method's inference settings, tuned on the validation split by one grid of choices.

The student's naming scale and multi-scale averaging were chosen on the validation split; a fair
scoreboard offers the teacher-alone methods the same search (the scoreboard issue's item 4):

- dense CLIP (`maskclip`): the short side the teacher sees (`eval.dense_short_side`) and the
  multi-scale ratios around it (`eval.dense_ratios`);
- the grid teacher (`training_free`): which grids' cells it classifies (`eval.grid_grids`; the
  cells are resized to the teacher's input whatever the image's side, so the grids are its scales);
- the student, given `--checkpoint`: the short side its tokens name at (`eval.token_short_side`)
  and the same multi-scale ratios (`eval.token_ratios`).

Each setting is scored on the validation split (never the held-out one) under the headline rule
(eval.bg_rule) and GroupViT's probability rule; the best by mIoU under the headline rule is
printed per method, with the params that reproduce it.

    python -m bench.science.tune                                         # the teacher-alone methods
    python -m bench.science.tune --checkpoint models/student/checkpoint.pt   # and the student's naming
"""

from __future__ import annotations

import dataclasses
import itertools

import torch
from tqdm.auto import tqdm

from bench.harness import emit
from bench.science.split import split_parser
from pipeline.clip.model import Teacher
from pipeline.clip.text import ClassEmbedder, template_set
from pipeline.config import load_params
from pipeline.core.decode import load_rgb
from pipeline.evaluation import ConfusionMatrix, open_dataset
from pipeline.evaluation.baselines import GridTeacherSegmenter, MaskCLIPSegmenter, NamedSegments
from pipeline.evaluation.models import load_model
from pipeline.evaluation.run import PAPER_RULE
from pipeline.evaluation.scoreboard import Scoreboard
from pipeline.evaluation.student_naming import StudentTokenScores, student_segmenter
from pipeline.evaluation.vocabulary import namers

RATIOS = {"1": (1.0,), "3 near": (0.875, 1.0, 1.125), "3 wide": (0.75, 1.0, 1.25), "5": (0.667, 0.833, 1.0, 1.167, 1.333)}
DENSE_SIDES = (128, 160, 192, 224, 256)
TOKEN_SIDES = (48, 56, 64, 72, 80)
GRIDS = ((2, 3, 4), (1, 2, 3, 4), (3, 4), (2, 3, 4, 6), (3, 4, 5, 6), (4, 6, 8))


def settings(teacher, student, e, device) -> dict[str, tuple[str, dict, object]]:
    """name -> (method, the eval params that reproduce it, its segmenter); the student's only when given."""
    out = {}
    for side, (label, ratios) in itertools.product(DENSE_SIDES, RATIOS.items()):
        out[f"maskclip {side} x {label}"] = ("maskclip", {"eval.dense_short_side": side, "eval.dense_ratios": list(ratios)},
                                             MaskCLIPSegmenter(teacher, short_side=side, ratios=ratios))
    for grids in GRIDS:
        out[f"training_free {grids}"] = ("training_free", {"eval.grid_grids": list(grids)}, GridTeacherSegmenter(teacher, short_side=e.short_side, grids=grids))
    if student is not None:  # one forward over the windows for every naming scale: their segments are the same
        windows = student_segmenter(student, dataclasses.replace(e, student_naming="tokens", token_short_side=0), device)
        for side, (label, ratios) in itertools.product(TOKEN_SIDES, RATIOS.items()):
            out[f"student tokens {side} x {label}"] = ("student", {"eval.token_short_side": side, "eval.token_ratios": list(ratios)},
                                                       NamedSegments(windows, StudentTokenScores(student, short_side=side, ratios=ratios, device=device)))
    return out


def main() -> None:
    ap = split_parser(__doc__)
    ap.set_defaults(checkpoint=None)
    ap.add_argument("--max-images", type=int, default=0, help="the split's first N images (0: all)")
    args = ap.parse_args()
    params = load_params(args.params, args.set)
    e = params.eval
    if args.checkpoint:
        model = load_model(params, args.checkpoint)
        teacher, embedder, student = model.teacher, model.embedder, model.student
    else:
        teacher = Teacher.load(params.teacher)
        embedder, student = ClassEmbedder(teacher), None
    dataset = open_dataset("demo", args.data)
    torch.set_grad_enabled(False)
    rules = [e.bg_rule, *([PAPER_RULE] if e.bg_rule != PAPER_RULE else [])]
    vocab = namers(embedder, list(dataset.class_names[1:]), template_set(e.templates), rules=rules,
                   thresholds={r: e.bg_threshold["demo"] for r in rules if r != "class"}, logit_scale=embedder.logit_scale, bg_words=e.bg_words)
    grid = settings(teacher, student, e, "cpu")
    boards = {rule: Scoreboard(dataset.num_classes) for rule in rules}
    n = min(args.max_images or len(dataset), len(dataset))
    for i in tqdm(range(n), desc="tune", unit="img"):
        sample = dataset[i]
        image = load_rgb(sample.image_path, exif=False)
        for rule in rules:
            for name, (_, _, segmenter) in grid.items():
                cm = ConfusionMatrix(dataset.num_classes, dataset.ignore_index)
                cm.update(segmenter.predict(image, vocab[rule]).labels, sample.mask)
                boards[rule].add(name, cm.matrix)
    rows = [{"setting": name, "method": method, "params": sets, **{f"{r}_{k}": getattr(boards[r], k)(name) for r in rules for k in ("miou", "miou_fg")}}
            for name, (method, sets, _) in grid.items()]
    head = rules[0]
    print(f"| setting | mIoU ({head}) | mIoU objects ({head}) | " + " | ".join(f"mIoU ({r})" for r in rules[1:]) + " |")
    print("|---|---|---|" + "---|" * len(rules[1:]))
    for r in rows:
        print(f"| {r['setting']} | {r[f'{head}_miou']:.3f} | {r[f'{head}_miou_fg']:.3f} | " + " | ".join(f"{r[f'{x}_miou']:.3f}" for x in rules[1:]) + " |")
    print(f"\nbest per method on {args.data} ({n} images, {head} rule):")
    best = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        top = max((r for r in rows if r["method"] == method), key=lambda r: r[f"{head}_miou"])
        best[method] = top
        sets = " ".join(f"--set {k}={str(v).replace(' ', '')}" for k, v in top["params"].items())
        print(f"  {method}: {top['setting']} ({top[f'{head}_miou']:.3f}, objects {top[f'{head}_miou_fg']:.3f}): {sets}")
    if args.json:
        emit({"rows": rows, "best": best, "images": n, "split": args.data}, args.json)


if __name__ == "__main__":
    main()
