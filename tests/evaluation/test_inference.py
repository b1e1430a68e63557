"""Zero-shot inference, the segment command, text embeddings and the evaluation harness."""

import dataclasses
import json

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli
from PIL import Image

from pipeline.clip.text import ClassEmbedder, template_set
from pipeline.config import load_params
from pipeline.core.decode import load_rgb
from pipeline.core.errors import ConfigError, InputError
from pipeline.evaluation.baselines import (
    GridTeacherSegmenter,
    MaskCLIPSegmenter,
    NamedSegments,
)
from pipeline.evaluation.models import load_model
from pipeline.evaluation.protocol import StudentSegmenter
from pipeline.evaluation.run import run_evaluation
from pipeline.evaluation.student_naming import StudentTokenScores
from pipeline.evaluation.vocabulary import Namer, namers
from pipeline.evaluation.windows import resize_short_side, window_origins
from pipeline.student.normalize import normalize_images
from pipeline.training.run import run_training

EVAL = ["eval.short_side=64", "eval.window=32", "eval.stride=16", "eval.templates=single", "eval.pictures=2", "eval.baselines=[training_free]"]


def namer(model, classes, rule="probability", threshold=0.5, bg_words=("background",), topk=0) -> Namer:
    """The vocabulary `classes` under one background rule, with the model's teacher."""
    return namers(model.embedder, classes, template_set("single"), rules=[rule], thresholds={rule: threshold}, logit_scale=model.embedder.logit_scale,
                  bg_words=bg_words, topk=topk)[rule]


@pytest.fixture(scope="module")
def trained(built_cache, tmp_path_factory, demo_dir):
    """A micro student trained for a few steps on the 8-row cache, and params pointing eval at the demo split."""
    store, params_path = built_cache
    out = tmp_path_factory.mktemp("student")
    overrides = ["student.variant=zeroseg_micro", "train.batch_size=8", "train.micro_batch=8", "train.num_workers=0",
                 "train.epochs=3", "train.warmup_epochs=0", "train.base_lr=0.01", *EVAL, f"eval.datasets.demo={demo_dir}"]
    params = load_params(params_path, overrides)
    run_training(params, str(store), out, progress=False)
    return params, out / "checkpoint.pt", params_path, overrides


@pytest.fixture(scope="module")
def model(trained):
    params, ckpt, _, _ = trained
    return load_model(params, ckpt)


def test_window_origins_cover_the_image():
    assert window_origins(448, 448, 224) == [0]
    assert window_origins(600, 448, 224) == [0, 152]
    assert window_origins(1000, 448, 224) == [0, 224, 448, 552]  # as mmseg slides: 4 windows
    assert window_origins(100, 448, 224) == [0]


@pytest.mark.parametrize("shape", [(64, 64), (50, 90), (120, 40), (33, 47)])
def test_student_predicts_every_pixel_at_any_size(model, shape):
    image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    seg = StudentSegmenter(model.student, short_side=64, window=32, stride=16)
    everything = seg.predict(image, namer(model, ["circle", "square", "star"], threshold=-1.0))
    assert everything.labels.shape == shape and everything.score.shape == shape
    assert (everything.labels >= 1).all() and everything.labels.max() <= 3  # every pixel gets a class
    assert (everything.score > 0).all()
    capped = seg.predict(image, namer(model, ["circle", "square", "star"], threshold=2.0))  # above every probability
    assert (capped.labels == 0).any()  # groups under the threshold are background ...
    assert (capped.labels > 0).any()  # ... but GroupViT caps it at each window's best score: no window is emptied


def test_training_free_baseline_paints_cells(model):
    image = np.random.default_rng(1).integers(0, 256, (40, 70, 3), dtype=np.uint8)
    pred = GridTeacherSegmenter(model.teacher, short_side=48).predict(image, namer(model, ["circle", "square"], "cosine", -2.0))
    assert pred.labels.shape == (40, 70) and set(np.unique(pred.labels)) <= {1, 2}
    assert (pred.score >= -1).all() and (pred.score <= 1).all()  # cosine scores


def test_class_rule_makes_background_words_compete_with_the_classes():
    text = F.normalize(torch.randn(4, 8), dim=-1)
    rule = Namer("class", text, 100.0, float("-inf"), background_rows=2)
    scores = torch.tensor([[0.5, 0.1, 0.2, 0.2], [0.1, 0.4, 0.3, 0.2], [0.1, 0.1, 0.7, 0.1], [0.1, 0.1, 0.2, 0.6]])
    best, label = rule.decide(scores)  # rows 0-1 are background words, rows 2-3 classes 1-2
    assert label.tolist() == [0, 0, 1, 2] and best.tolist() == pytest.approx([0.5, 0.4, 0.7, 0.6])
    best, label = Namer("probability", text[2:], 100.0, 0.5).decide(scores[:, 2:])
    assert label.tolist() == [1, 1, 1, 2]  # without them, the threshold alone decides background
    with pytest.raises(ValueError):
        Namer("probability", text, 100.0, 0.5, background_rows=1)


def test_class_rule_through_the_segmenters(model):
    classes = ["circle", "square", "star"]
    both = namers(model.embedder, classes, template_set("single"), rules=["class", "probability"], thresholds={"probability": 0.9},
                  logit_scale=model.embedder.logit_scale, bg_words=("background", "wall"))
    rule = both["class"]
    plain = model.embedder(classes, template_set("single"))
    assert rule.text.shape[0] == 5 and torch.allclose(rule.text[2:], plain, atol=1e-5) and rule.threshold == float("-inf")
    assert torch.equal(both["probability"].text, rule.text[2:]) and both["probability"].threshold == 0.9  # one vocabulary, two rules
    image = np.random.default_rng(3).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    for seg in (StudentSegmenter(model.student, short_side=48, window=32, stride=16), GridTeacherSegmenter(model.teacher, short_side=48)):
        pred = seg.predict(image, rule)
        assert pred.labels.min() >= 0 and pred.labels.max() <= 3
        assert (pred.score > 0).all() and (pred.score <= 1).all()  # probabilities over all five rows
    # with the background words' rows equal to a class's row, that class can never win
    dup = Namer("class", torch.cat([plain[:1], plain]), model.embedder.logit_scale, float("-inf"), background_rows=1)
    pred = GridTeacherSegmenter(model.teacher, short_side=48).predict(image, dup)
    assert not (pred.labels == 1).any()


def test_class_embeddings_average_normalized_prompts_and_are_cached(model, tmp_path):
    teacher = model.teacher
    embedder = ClassEmbedder(teacher, cache_dir=tmp_path)
    templates = ("a photo of a {}.", "a drawing of a {}.")
    emb = embedder(["circle", "star"], templates)
    assert emb.shape == (2, teacher.identity.embed_dim) and embedder.prompts_encoded == 4
    tok = open_clip.get_tokenizer(teacher.identity.model)
    with torch.no_grad():
        per_prompt = F.normalize(teacher.model.encode_text(tok([t.format("star") for t in templates])).float(), dim=-1)  # [T, D]
    expected = F.normalize(per_prompt.mean(0), dim=-1)
    assert torch.allclose(emb[1], expected, atol=1e-5)
    again = ClassEmbedder(teacher, cache_dir=tmp_path)
    assert torch.equal(again(["circle", "star"], templates), emb) and again.prompts_encoded == 0  # cache hit
    again(["star", "circle"], templates)
    assert again.prompts_encoded == 4  # another vocabulary order is another entry


def test_segment_command_writes_masks_and_overlays_of_the_input_size(trained, tmp_path, demo_dir):
    params, ckpt, params_path, overrides = trained
    images = sorted((demo_dir / "eval" / "JPEGImages").glob("*.jpg"))[:2]
    big = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (50, 120, 3), dtype=np.uint8)).save(big)
    args = ["segment", *map(str, images), str(big), "--classes", "circle, square,star", "--checkpoint", str(ckpt),
            "--out", str(tmp_path / "out"), "--threshold", "0", "--params", str(params_path), "-q"]
    proc = run_cli(*args, *[a for kv in overrides for a in ("--set", kv)])
    for path in [*images, big]:
        size = Image.open(path).size
        mask = Image.open(tmp_path / "out" / f"{path.stem}_mask.png")
        over = Image.open(tmp_path / "out" / f"{path.stem}_overlay.png")
        assert mask.size == size and over.size == size and mask.mode == "P"
        assert mask.text["classes"] == "0 background\n1 circle\n2 square\n3 star\n"  # the mask says what its values are
        labels = np.array(mask)
        names = ["circle", "square", "star"]
        present = {names[k - 1] for k in np.unique(labels) if k > 0}
        legend = over.text["legend"].split("\n") if over.text["legend"] else []
        assert set(legend) == present and len(present) >= 1  # threshold 0: every pixel has a class
        assert path.name in proc.stdout
    assert (tmp_path / "out" / "classes.txt").read_text() == "0 background\n1 circle\n2 square\n3 star\n"


def test_segment_keeps_every_output_and_skips_what_it_cannot_read(trained, tmp_path, demo_dir):
    params, ckpt, params_path, overrides = trained
    scene = Image.open(sorted((demo_dir / "eval" / "JPEGImages").glob("*.jpg"))[0])
    folder = tmp_path / "in"
    for rel in ("a/x.jpg", "a/x.png", "b/x.jpg"):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        scene.save(folder / rel)
    (folder / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    sets = [a for kv in overrides for a in ("--set", kv)]
    base = ["segment", str(folder), "--classes", "circle,square", "--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), "--params", str(params_path), "-q", *sets]
    # the same rule as teacher-cache: unreadable inputs are reported, and fail the command under --strict
    proc = run_cli(*base, check=False)
    assert proc.returncode == 0 and "warning: 1 of 4 images could not be read" in proc.stderr and "Traceback" not in proc.stderr
    assert f"zeroseg: skipped {folder / 'b' / 'broken.jpg'}: " in proc.stderr
    strict = run_cli(*base, "--strict", check=False)
    assert strict.returncode == 1 and "error: 1 of 4 images could not be read" in strict.stderr
    # one name per input: the extension only where two would share a name
    written = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*_mask.png"))
    assert written == ["a/x.jpg_mask.png", "a/x.png_mask.png", "b/x_mask.png"]
    # two files of one name given one by one cannot both be written
    twins = run_cli(*base[:1], str(folder / "a" / "x.jpg"), str(folder / "b" / "x.jpg"), *base[2:], check=False)
    assert twins.returncode == 2 and "two inputs are both named x.jpg" in twins.stderr
    # under bg_rule class the threshold means nothing: refused, not ignored
    cls = run_cli(*base, "--set", "eval.bg_rule=class", "--threshold", "0.3", check=False)
    assert cls.returncode == 2 and "eval.bg_rule is class" in cls.stderr
    out_of_range = run_cli(*base, "--threshold", "7", check=False)
    assert out_of_range.returncode == 2 and "a probability threshold lies in [0, 1]" in out_of_range.stderr


def test_evaluation_checks_every_dataset_before_evaluating_any(trained, tmp_path, demo_dir):
    _, ckpt, params_path, overrides = trained
    for later, message in (("vco=/data/VOC2012", "vco: unknown dataset"), (f"voc={tmp_path / 'nothing'}", "not a PASCAL VOC 2012 folder")):
        params = load_params(params_path, [*overrides, f"eval.datasets.{later}"])
        with pytest.raises(InputError, match=message):
            run_evaluation(params, ckpt, tmp_path / "metrics", None, progress=False, echo=lambda *_: None)
        assert not (tmp_path / "metrics").exists()  # the demo dataset, first in line, was not evaluated


def test_the_student_can_be_evaluated_at_its_own_short_side_and_named_by_its_tokens(trained, tmp_path):
    params, ckpt, _, _ = trained
    e = params.eval

    def student_figures(**overrides) -> dict:
        p = dataclasses.replace(params, eval=dataclasses.replace(e, baselines=(), pictures=0, **overrides))
        return run_evaluation(p, ckpt, tmp_path / str(len(overrides)) / "m", tmp_path / "pics", progress=False, echo=lambda *_: None)["demo"]

    plain = student_figures()
    same = student_figures(student_short_side=e.short_side)  # its own side, equal to the images': nothing changes
    assert same["rules"] == plain["rules"] and same["oracle"] == plain["oracle"]
    small = student_figures(student_short_side=e.window)  # one window over the whole image: at most 4 segments in it
    assert small["regions_per_image"] <= 4 < plain["regions_per_image"]
    tokens = student_figures(student_naming="tokens")
    assert tokens["segments_per_window"] == plain["segments_per_window"]  # the same segments in every window ...
    assert tokens["rules"]["probability"]["per_class_iou"]["student"] != plain["rules"]["probability"]["per_class_iou"]["student"]  # ... other names
    whole = student_figures(student_naming="tokens", token_short_side=e.window)  # named by the tokens of the whole image
    assert whole["segments_per_window"] == plain["segments_per_window"]
    assert whole["rules"]["probability"]["per_class_iou"]["student"] != tokens["rules"]["probability"]["per_class_iou"]["student"]
    with pytest.raises(ConfigError, match="eval.token_short_side"):
        student_figures(token_short_side=e.window)  # the segments' own embeddings name them: no tokens to take


def test_the_students_token_scores_classify_every_patch_of_the_whole_image(model):
    rule = namer(model, ["circle", "square", "star"])
    image = np.random.default_rng(0).integers(0, 256, (40, 72, 3), dtype=np.uint8)
    scores = StudentTokenScores(model.student, short_side=32).scores(image, rule)  # 32 x 57 px: 4 x 7 patches
    x = resize_short_side(image, 32)[:, :32, :56].round().to(torch.uint8)[None]
    tokens = model.student.token_embeddings(normalize_images(x), pos_mode="interpolate")[0]  # [4, 7, D]
    assert scores.shape == (4, 7, 3)
    torch.testing.assert_close(scores, rule.scores(tokens.flatten(0, 1)).view(4, 7, 3))
    with pytest.raises(ConfigError, match="eval.token_short_side"):
        StudentTokenScores(model.student, short_side=4)
    # Several scales (eval.token_ratios): each scale's scores resized to the image, then averaged.
    multi = StudentTokenScores(model.student, short_side=32, ratios=(0.75, 1.0, 1.25)).scores(image, rule)  # 24, 32 and 40 px
    alone = {side: StudentTokenScores(model.student, short_side=side).scores(image, rule) for side in (24, 32, 40)}
    assert [alone[side].shape[:2] for side in (24, 32, 40)] == [(3, 5), (4, 7), (5, 9)]
    resized = [F.interpolate(alone[side].permute(2, 0, 1)[None], size=(40, 72), mode="bilinear", align_corners=False)[0] for side in (24, 32, 40)]
    torch.testing.assert_close(multi, torch.stack(resized).mean(0).permute(1, 2, 0))
    with pytest.raises(ConfigError, match="x its ratios"):
        StudentTokenScores(model.student, short_side=32, ratios=(0.2, 1.0))


def test_evaluation_writes_the_science_metrics(trained, tmp_path):
    params, ckpt, _, _ = trained
    params = dataclasses.replace(params, eval=dataclasses.replace(params.eval, bg_rule="class", baselines=("training_free", "maskclip")))
    results = run_evaluation(params, ckpt, tmp_path / "metrics", tmp_path / "pics", base_checkpoint=ckpt, ablations={"again": ckpt}, progress=False,
                             echo=lambda *_: None, details_dir=tmp_path / "detail")
    headline = json.loads((tmp_path / "metrics" / "demo.json").read_text())
    detail = json.loads((tmp_path / "detail" / "demo.json").read_text())
    assert detail == results["demo"] and detail["images"] == 4
    assert list(detail["rules"]) == ["class", "probability"]  # the headline rule, then GroupViT's
    methods = {"student", "base", "again", "training_free", "maskclip", "trivial"}
    for rule, scores in detail["rules"].items():
        assert set(scores["miou"]) == set(scores["miou_fg"]) == set(scores["per_class_iou"]) == methods
        assert scores["miou"]["again"] == scores["miou"]["student"]  # the same checkpoint, evaluated as the student
        for value in [*scores["miou"].values(), *(v for v in scores["miou_fg"].values() if v is not None)]:
            assert 0 <= value <= 1
        iou = scores["per_class_iou"]["student"]
        shapes = [iou[c] for c in ("circle", "square", "triangle", "star", "cross", "ring") if iou[c] is not None]
        assert scores["miou_fg"]["student"] == pytest.approx(sum(shapes) / len(shapes))  # the objects' mean, background left out
        trivial = scores["per_class_iou"]["trivial"]
        assert scores["miou"]["trivial"] == pytest.approx(trivial["background"] / sum(v is not None for v in trivial.values()))
        assert scores["miou_fg"]["trivial"] == 0.0  # everything background names no object
        assert scores["strongest_baseline"] == max(("training_free", "maskclip"), key=scores["miou"].get)
        ci = scores["ci95"]
        assert set(ci) == methods - {"student"}
        assert ci["again"]["miou"] == {"diff": 0.0, "lo": 0.0, "hi": 0.0}  # paired resamples of the same predictions
        for other, both in ci.items():
            for key in ("miou", "miou_fg"):
                if both[key]["diff"] == both[key]["diff"]:
                    assert both[key]["lo"] <= both[key]["hi"]
                    if both[key]["diff"] != 0:
                        assert scores[key]["student"] - scores[key][other] == pytest.approx(both[key]["diff"])
    # the registered headline: the student and the strongest teacher-alone method, and the interval of their difference
    bar, scores = detail["rules"]["class"]["strongest_baseline"], detail["rules"]["class"]
    assert headline == {
        "miou": {"student": scores["miou"]["student"], bar: scores["miou"][bar]},
        "miou_fg": {"student": scores["miou_fg"]["student"], bar: scores["miou_fg"][bar]},
        "diff_ci95_lo": {"miou": scores["ci95"][bar]["miou"]["lo"], "miou_fg": scores["ci95"][bar]["miou_fg"]["lo"]},
        "diff_ci95_hi": {"miou": scores["ci95"][bar]["miou"]["hi"], "miou_fg": scores["ci95"][bar]["miou_fg"]["hi"]},
    }
    # the grouping: the student's regions against a grid and SLIC superpixels of as many regions
    assert set(detail["oracle"]) == set(detail["boundary"]) == {"student", "grid", "slic"}
    assert detail["oracle"]["grid"] > detail["rules"]["class"]["miou"]["trivial"]  # majority labels beat all-background
    for part in detail["boundary"].values():
        assert 0 <= part["precision"] <= 1 and 0 <= part["recall"] <= 1
    assert detail["regions_per_image"] >= 1
    assert 1 <= detail["segments_per_window"] <= 4  # the micro student's last stage has 4 segments
    assert len(list((tmp_path / "pics" / "demo").glob("*.png"))) == 2 * len(methods - {"trivial"})


def test_the_bootstrap_resamples_images_in_pairs_and_holds_its_seed():
    from pipeline.evaluation.scoreboard import Scoreboard, miou_of

    rng = np.random.default_rng(0)
    board = Scoreboard(3)
    for _ in range(30):
        truth = rng.integers(0, 3, 50)
        good, noisy = truth.copy(), np.where(rng.random(50) < 0.4, rng.integers(0, 3, 50), truth)
        good[rng.random(50) < 0.1] = 0
        for name, pred in (("student", good), ("other", noisy)):
            board.add(name, np.bincount(truth * 3 + pred, minlength=9).reshape(3, 3))
    ci = board.intervals("student", ["other"])["other"]
    assert ci == board.intervals("student", ["other"])["other"]  # the seed is fixed
    assert ci["miou"]["diff"] == pytest.approx(board.miou("student") - board.miou("other"))
    assert 0 < ci["miou"]["lo"] < ci["miou"]["diff"] < ci["miou"]["hi"]  # clearly better, with an interval around it
    # the objects' mIoU leaves class 0 out
    total = board.stacked("student").sum(axis=0)
    assert board.miou_fg("student") == pytest.approx(float(miou_of(total[None], slice(1, None))[0]))
    assert board.miou_fg("student") == pytest.approx(np.mean([total[k, k] / (total[k].sum() + total[:, k].sum() - total[k, k]) for k in (1, 2)]))


def test_majority_labels_and_grid_regions():
    from pipeline.evaluation.oracle import grid_regions, majority_labels

    regions = np.array([[0, 0, 1, 1], [0, 0, 1, 1]])
    target = np.array([[2, 2, 1, 255], [3, 2, 0, 0]])
    assert majority_labels(regions, target, 4).tolist() == [[2, 2, 0, 0], [2, 2, 0, 0]]
    assert grid_regions(3, 6, g=3).tolist() == [[0, 0, 1, 1, 2, 2], [3, 3, 4, 4, 5, 5], [6, 6, 7, 7, 8, 8]]


def test_a_student_is_refused_with_another_teacher(trained):
    params, ckpt, params_path, overrides = trained
    from pipeline.core.errors import InputError

    with pytest.raises(InputError, match="trained against teacher zeroseg-test-vit"):
        load_model(load_params(params_path, [*overrides, "teacher.seed=9"]), ckpt)


def test_load_rgb_names_the_bad_file(tmp_path):
    from pipeline.core.errors import InputError

    (tmp_path / "x.jpg").write_bytes(b"nope")
    with pytest.raises(InputError, match=r"x.jpg: not an image"):
        load_rgb(tmp_path / "x.jpg")


def test_maskclip_dense_features_pool_to_the_teacher_embedding_shape(model):
    seg = MaskCLIPSegmenter(model.teacher, short_side=40)
    views = torch.randn(2, 3, 32, 32)
    feats = seg.dense_features(views)
    assert feats.shape == (2, 4, 4, model.teacher.identity.embed_dim)  # 32 px / patch 8
    image = np.random.default_rng(3).integers(0, 256, (40, 70, 3), dtype=np.uint8)
    rule = namer(model, ["circle", "square"], "cosine", -2.0)
    pred = seg.predict(image, rule)
    assert pred.labels.shape == (40, 70) and set(np.unique(pred.labels)) <= {1, 2}
    # several scales (eval.dense_ratios): each scale's scores resized to the image, then averaged
    multi = MaskCLIPSegmenter(model.teacher, short_side=40, ratios=(1.0, 1.5)).scores(image, rule)
    alone = [MaskCLIPSegmenter(model.teacher, short_side=side).scores(image, rule) for side in (40, 60)]
    resized = [F.interpolate(a.permute(2, 0, 1)[None], size=(40, 70), mode="bilinear", align_corners=False)[0] for a in alone]
    torch.testing.assert_close(multi, torch.stack(resized).mean(0).permute(1, 2, 0))


def test_grouped_naming_gives_each_student_segment_the_class_of_its_mean_dense_scores(model):
    rule = namer(model, ["circle", "square", "star"], threshold=0.0)  # no pixel thresholded away
    student = StudentSegmenter(model.student, short_side=64, window=32, stride=16)
    dense = MaskCLIPSegmenter(model.teacher, short_side=40)
    grouped = NamedSegments(student, dense)
    image = np.random.default_rng(5).integers(0, 256, (40, 70, 3), dtype=np.uint8)
    own = student.predict(image, rule)
    pred = grouped.predict(image, rule)
    # the reference, written out: the dense scores at the image's pixels, averaged per segment, best class
    scores = F.interpolate(dense.scores(image, rule).permute(2, 0, 1)[None], size=(40, 70), mode="bilinear", align_corners=False)[0].numpy()  # [K, H, W]
    expected = np.zeros((40, 70), dtype=np.int64)
    for s in np.unique(own.segments):
        where = own.segments == s
        expected[where] = 1 + scores[:, where].mean(axis=1).argmax()
    np.testing.assert_array_equal(pred.segments, own.segments)  # the student's grouping, kept
    np.testing.assert_array_equal(pred.labels, expected)
    np.testing.assert_array_equal(grouped.predict(image, rule, segments=own.segments).labels, expected)  # segments given: the same
    # any grouping: two halves, one class each; one segment over the image takes the image's mean scores
    halves = np.zeros((40, 70), dtype=np.int64)
    halves[:, 35:] = 7
    split = grouped.predict(image, rule, segments=halves).labels
    assert len(np.unique(split[:, :35])) == 1 and len(np.unique(split[:, 35:])) == 1
    whole = grouped.predict(image, rule, segments=np.zeros((40, 70), dtype=np.int64)).labels
    assert (whole == 1 + scores.reshape(3, -1).mean(axis=1).argmax()).all()
    # the dense method reuses its pass over this image, under every rule
    first = dense.scores(image, rule)
    assert dense.scores(image, rule) is first and dense.scores(image.copy(), rule) is not first
    embedded = dense._embedded
    other = namer(model, ["circle", "square", "star"], "class")
    assert dense.scores(image.copy(), other).shape[-1] == 4 and dense._embedded is not embedded  # a new image: a new pass
    embedded = dense._embedded
    dense.scores(dense._image, rule)
    assert dense._embedded is embedded  # another rule, the same image: no new pass
    # the grid teacher names the same way, from its cells' averaged scores
    cells = GridTeacherSegmenter(model.teacher, short_side=40)
    by_cells = NamedSegments(student, cells).predict(image, rule, segments=halves).labels
    grid_scores = F.interpolate(cells.scores(image, rule).permute(2, 0, 1)[None], size=(40, 70), mode="bilinear", align_corners=False)[0].numpy()
    assert (by_cells[:, :35] == 1 + grid_scores[:, :, :35].reshape(3, -1).mean(axis=1).argmax()).all()
    assert (by_cells[:, 35:] == 1 + grid_scores[:, :, 35:].reshape(3, -1).mean(axis=1).argmax()).all()
    np.testing.assert_array_equal(cells.predict(image, rule).labels, 1 + grid_scores.argmax(axis=0))  # at 40 px, the image's own size


def test_grouped_naming_in_evaluate_and_segment(trained, tmp_path, demo_dir):
    _, ckpt, params_path, overrides = trained
    both = load_params(params_path, [*overrides, "eval.baselines=[maskclip, grouped_maskclip, grouped_training_free]", "eval.max_images=2"])
    miou = run_evaluation(both, ckpt, tmp_path / "metrics", None, progress=False, echo=lambda *_: None)["demo"]["rules"]["probability"]["miou"]
    assert set(miou) == {"student", "maskclip", "grouped_maskclip", "grouped_training_free", "trivial"}
    assert 0 <= miou["grouped_maskclip"] <= 1 and 0 <= miou["grouped_training_free"] <= 1
    alone = load_params(params_path, [*overrides, "eval.baselines=[grouped_maskclip]", "eval.max_images=2"])  # without maskclip's own column
    assert run_evaluation(alone, ckpt, tmp_path / "m2", None, progress=False, echo=lambda *_: None)["demo"]["rules"]["probability"]["miou"]["grouped_maskclip"] == miou["grouped_maskclip"]
    image = min((demo_dir / "eval" / "JPEGImages").glob("*.jpg"))
    sets = [a for kv in overrides for a in ("--set", kv)]
    base = ["segment", str(image), "--classes", "circle,square", "--checkpoint", str(ckpt), "--params", str(params_path), "-q", *sets]
    run_cli(*base, "--out", str(tmp_path / "student"))
    run_cli(*base, "--out", str(tmp_path / "named"), "--naming", "maskclip")
    run_cli(*base, "--out", str(tmp_path / "cells"), "--naming", "training_free")
    assert set(np.unique(np.array(Image.open(tmp_path / "cells" / f"{image.stem}_mask.png")))) <= {0, 1, 2}
    named = np.array(Image.open(tmp_path / "named" / f"{image.stem}_mask.png"))
    assert named.shape == np.array(Image.open(tmp_path / "student" / f"{image.stem}_mask.png")).shape
    assert set(np.unique(named)) <= {0, 1, 2}
    bad = run_cli(*base, "--out", str(tmp_path / "bad"), "--naming", "sam", check=False)
    assert bad.returncode == 2 and "--naming: expected student, training_free, maskclip, sclip, naclip; got 'sam'" in bad.stderr


def test_the_legend_is_drawn_in_a_font_that_scales_with_the_image():
    from pipeline.evaluation.overlay import legend_font, overlay

    labels = np.zeros((400, 300), dtype=np.int64)
    labels[:200] = 1
    small, legend = overlay(np.full((400, 300, 3), 128, np.uint8), labels, ["Ωmega"])
    assert legend == ["Ωmega"]
    big, _ = overlay(np.full((1600, 1200, 3), 128, np.uint8), np.kron(labels, np.ones((4, 4), dtype=np.int64)), ["Ωmega"])

    def legend_height(img):  # the white legend box's rows in the first column past its border
        column = np.asarray(img)[:, 3]
        return int((column == 255).all(axis=1).sum())

    assert legend_height(big) > 2 * legend_height(small) > 0
    assert legend_font(12).size == 12 and legend_font(12) is legend_font(12)


def test_topk_keeps_the_image_classes_for_every_method_and_drops_the_rest_under_any_rule(model):
    # cosine scores can be negative: a dropped class must lose to them, not win with a 0
    text = torch.eye(3, 8)
    scores = torch.tensor([[-0.2, -0.5, 0.0], [-0.9, -0.1, -0.3]])
    kept = Namer("cosine", text, 100.0, -1.0, topk=1).keep_topk(scores, torch.tensor([0.3, 0.1, 0.2, 0, 0, 0, 0, 0]))
    assert torch.equal(kept[:, 0], scores[:, 0]) and torch.isinf(kept[:, 1:]).all()
    assert torch.equal(Namer("cosine", text, 100.0, -1.0).keep_topk(scores, torch.ones(8)), scores)  # 0: all
    kept = Namer("class", text, 100.0, float("-inf"), background_rows=1, topk=1).keep_topk(scores, torch.tensor([9.0, 0.1, 0.2, 0, 0, 0, 0, 0]))
    assert torch.isfinite(kept[:, 0]).all() and torch.isfinite(kept[:, 2]).all() and torch.isinf(kept[:, 1]).all()  # background words always stay

    classes = ["circle", "square", "triangle", "star", "cross"]
    free = namer(model, classes, "cosine", -1.0)  # no pixel is background
    grid = GridTeacherSegmenter(model.teacher, short_side=32)

    def cell_winners(image):  # each cell's own top class, which a top-k per cell would keep
        return set(free.scores(grid.embed(image)["cells"]).argmax(dim=-1).tolist())

    # an image whose cells disagree on their top class
    rng = np.random.default_rng(4)
    candidates = (rng.integers(0, 256, (4, 4, 3), dtype=np.uint8).repeat(10, axis=0).repeat(10, axis=1) for _ in range(40))
    image = next((im for im in candidates if len(cell_winners(im)) > 1), None)
    assert image is not None, "no test image whose cells disagree"
    one = namer(model, classes, "cosine", -1.0, topk=1)
    labels = grid.predict(image, one).labels
    assert len(np.unique(labels)) == 1 and labels.min() >= 1  # one class for the whole image, not one per cell
    tokens = StudentTokenScores(model.student, short_side=32)
    assert len(np.unique(tokens.predict(image, one).labels)) == 1  # the student's tokens keep the class of its own image embedding


def test_windows_go_through_the_model_in_batches_with_the_same_result(model):
    rule = namer(model, ["circle", "square"])
    image = np.random.default_rng(5).integers(0, 256, (40, 200, 3), dtype=np.uint8)
    one = StudentSegmenter(model.student, short_side=32, window=32, stride=16).predict(image, rule)
    few = StudentSegmenter(model.student, short_side=32, window=32, stride=16, windows_per_forward=3).predict(image, rule)
    np.testing.assert_array_equal(one.labels, few.labels)
    np.testing.assert_allclose(one.score, few.score, atol=1e-5)


def test_protocol_values_the_model_cannot_use_are_one_line_errors(model):
    for kwargs, message in (({"window": 4}, "eval.window: 4 px is smaller than the student's patch size"),
                            ({"short_side": 4}, "eval.short_side: 4 px is smaller than the student's patch size")):
        with pytest.raises(ConfigError, match=message):
            StudentSegmenter(model.student, **kwargs)
    with pytest.raises(ConfigError, match="class 'Background' is also a background word"):
        namer(model, ["circle", "Background"], "class")
    with pytest.raises(ConfigError, match="the class rule needs at least one background word"):
        namer(model, ["circle"], "class", bg_words=())


def test_class_lists_refuse_names_the_text_encoder_cannot_tell_apart(tmp_path):
    from pipeline.evaluation.segment import parse_classes

    assert parse_classes(" cat, dog ,grass") == ["cat", "dog", "grass"]
    with pytest.raises(InputError, match="'Circle' is the same to the text encoder as 'circle'"):
        parse_classes("circle,Circle")
    with pytest.raises(InputError, match="'traffic  light' is the same to the text encoder as 'traffic light'"):
        parse_classes("traffic light,traffic  light")
    latin1 = tmp_path / "classes.txt"
    latin1.write_bytes("café\n".encode("latin-1"))
    with pytest.raises(InputError, match=f"{latin1}: not UTF-8 text"):
        parse_classes(f"@{latin1}")


def test_segment_leaves_its_own_outputs_out_of_the_inputs(trained, tmp_path, demo_dir):
    _, ckpt, params_path, overrides = trained
    sets = [a for kv in overrides for a in ("--set", kv)]
    for folder, out in ((tmp_path / "photos", tmp_path / "photos"), (tmp_path / "more", tmp_path / "more" / "seg")):  # the folder itself, or below it
        folder.mkdir()
        for src in sorted((demo_dir / "eval" / "JPEGImages").glob("*.jpg"))[:2]:
            (folder / src.name).write_bytes(src.read_bytes())
        for _ in range(2):
            run_cli("segment", str(folder), "--classes", "circle,square", "--checkpoint", str(ckpt), "--out", str(out), "--params", str(params_path), "-q", *sets)
        names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
        stems = [p.stem for p in sorted(folder.glob("*.jpg"))]
        assert names == sorted(f"{s}_{kind}.png" for s in stems for kind in ("mask", "overlay"))  # no x_mask_mask.png
    # the same files given by name (a shell glob over the folder) are left out too, and said so
    photos = tmp_path / "photos"
    given = [str(p) for p in sorted(photos.iterdir()) if p.is_file()]  # 2 images, their 2 masks and 2 overlays
    proc = run_cli("segment", *given, "--classes", "circle,square", "--checkpoint", str(ckpt), "--out", str(photos), "--params", str(params_path), "-q", *sets)
    assert "left out 4 masks and overlays under" in proc.stderr and not list(photos.glob("*_mask_mask.png"))
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    proc = run_cli("segment", str(folder), "--classes", "circle", "--checkpoint", str(ckpt), "--out", str(a_file), "--params", str(params_path), "-q", *sets, check=False)
    assert proc.returncode == 2 and f"--out {a_file}: not a folder" in proc.stderr


def test_evaluation_checks_its_output_folders_first_and_keeps_split_sub_folders(trained, tmp_path, demo_dir):
    import shutil

    params, ckpt, params_path, overrides = trained
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    with pytest.raises(InputError, match=f"--metrics-dir {a_file}: not a folder"):
        run_evaluation(params, ckpt, a_file, None, progress=False, echo=lambda *_: None)
    # a VOC-style split whose ids hold a sub-folder
    root = tmp_path / "split"
    shutil.copytree(demo_dir / "eval", root)
    shutil.copy(demo_dir / "classes.txt", root / "classes.txt")
    for kind, ext in (("JPEGImages", "jpg"), ("SegmentationClass", "png")):
        (root / kind / "sub").mkdir()
        (root / kind / f"eval_000000.{ext}").rename(root / kind / "sub" / f"eval_000000.{ext}")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("sub/eval_000000\neval_000001\n")
    params = load_params(params_path, [*overrides, f"eval.datasets={{voc_layout: {root}}}", "eval.bg_threshold.voc_layout=0.5"])
    saved = run_evaluation(params, ckpt, tmp_path / "m", tmp_path / "pics", progress=False, echo=lambda *_: None)["voc_layout"]
    assert saved["images"] == 2 and (tmp_path / "pics" / "voc_layout" / "sub" / "eval_000000_student.png").is_file()
    assert set(saved["rules"]["probability"]["pixel_accuracy"]) == {"student", "training_free", "trivial"}


def test_legends_say_what_they_leave_out_and_stay_off_tiny_pictures():
    from pipeline.evaluation.overlay import colour, legend_lines, overlay

    assert legend_lines(["a", "b", "c", "d"], 3) == ["a", "b", "+2 more"] and legend_lines(["a", "b"], 3) == ["a", "b"]
    labels = np.repeat(np.arange(1, 5), 1000)[None].repeat(50, axis=0)  # [50, 4000]: four classes side by side
    wide, legend = overlay(np.full((50, 4000, 3), 128, np.uint8), labels, ["a", "b", "c", "d"])
    assert legend == ["a", "b", "c", "d"] and (np.asarray(wide)[:, :20] == 255).all(axis=-1).any()  # the box is drawn
    tiny, _ = overlay(np.full((10, 10, 3), 128, np.uint8), np.ones((10, 10), np.int64), ["a"])
    assert not (np.asarray(tiny) == 255).all(axis=-1).any()  # no white legend box over a 10x10 picture
    scene = np.repeat(np.arange(1, 5), 32)[None].repeat(128, axis=0)  # a demo scene's size, four classes
    small, legend = overlay(np.full((128, 128, 3), 128, np.uint8), scene, ["circle", "square", "star", "ring"])
    box = (np.asarray(small) == 255).all(axis=-1)
    assert legend == ["circle", "square", "star", "ring"] and box.any()
    assert box.any(axis=1).sum() <= 128 // 4  # the legend keeps to the lower quarter; the PNG's text chunk lists every class
    assert colour(256) != (0, 0, 0) and colour(256) == colour(1) and colour(0) == (0, 0, 0)


def test_windows_larger_than_a_small_image_are_clipped_to_it_and_cover_every_pixel(model):
    image = np.random.default_rng(6).integers(0, 256, (40, 150, 3), dtype=np.uint8)  # resized to 32 x 120: windows of 32 x 64
    seg = StudentSegmenter(model.student, short_side=32, window=64, stride=48)
    assert (seg.predict(image, namer(model, ["circle", "square"], threshold=0.0)).labels >= 1).all()  # every pixel was classified


def test_the_student_is_read_at_its_own_scale_and_threshold_and_the_teachers_at_theirs(trained, model, tmp_path):
    from pipeline.evaluation.vocabulary import student_calibrated, student_threshold

    params, ckpt, _, _ = trained
    e = dataclasses.replace(params.eval, student_logit_scale=50.0, student_bg_threshold={"demo": 0.0, "default": 0.3})
    assert student_threshold(e, "demo", 0.5) == 0.0 and student_threshold(e, "voc", 0.5) == 0.3
    assert student_threshold(params.eval, "demo", 0.5) == 0.5  # none of its own: the teachers'
    teachers = namer(model, ["circle", "square"], threshold=0.5)
    own = student_calibrated(teachers, e, 0.0)
    assert (own.logit_scale, own.threshold) == (50.0, 0.0) and (teachers.logit_scale, teachers.threshold) != (50.0, 0.0)
    torch.testing.assert_close(own.text, teachers.text)
    classes = namer(model, ["circle", "square"], rule="class")
    assert student_calibrated(classes, e, 0.0) is classes  # the class rule has no threshold to read
    assert student_calibrated(teachers, dataclasses.replace(e, student_logit_scale=0.0), 0.2).logit_scale == teachers.logit_scale

    def probability_rule(eval_section, folder):
        run = dataclasses.replace(params, eval=dataclasses.replace(eval_section, bg_rule="class", baselines=("training_free",)))
        return run_evaluation(run, ckpt, folder / "m", None, progress=False, echo=lambda *_: None)["demo"]["rules"]["probability"]

    plain = probability_rule(params.eval, tmp_path / "plain")
    never = probability_rule(dataclasses.replace(e, student_bg_threshold={"demo": 0.0}), tmp_path / "never")
    assert never["miou"]["training_free"] == plain["miou"]["training_free"]  # the teachers keep eval.bg_threshold
    assert never["per_class_iou"]["trivial"] == plain["per_class_iou"]["trivial"]
    assert never["per_class_iou"]["student"]["background"] == 0.0  # at threshold 0 the student calls no pixel background


def test_the_threshold_scan_scores_each_method_as_the_evaluation_does(trained, tmp_path, monkeypatch):
    from bench.science import thresholds

    params, ckpt, params_path, overrides = trained
    out = tmp_path / "scan.json"
    sets = [a for o in [*overrides, "eval.bg_threshold.demo=0.5", "eval.student_bg_threshold.demo=0.3", "eval.student_logit_scale=50"] for a in ("--set", o)]
    monkeypatch.setattr("sys.argv", ["thresholds", "--params", str(params_path), "--checkpoint", str(ckpt),
                                     "--data", params.eval.datasets["demo"], "--json", str(out), *sets])
    thresholds.main()
    assert torch.is_grad_enabled()  # run in-process, it leaves autograd as it found it
    report = json.loads(out.read_text())
    assert set(report["rows"]) == {"student", "training_free", "maskclip"} and report["images"] == 4
    at = {m: {r["threshold"]: r for r in rows} for m, rows in report["rows"].items()}
    assert sorted(at["student"]) == list(thresholds.THRESHOLDS)
    # the scan's figures at the thresholds the evaluation is given are the evaluation's own
    run = dataclasses.replace(params, eval=dataclasses.replace(params.eval, bg_rule="class", baselines=("training_free", "maskclip"),
                                                               bg_threshold={"demo": 0.5}, student_bg_threshold={"demo": 0.3}, student_logit_scale=50.0))
    scored = run_evaluation(run, ckpt, tmp_path / "m", None, progress=False, echo=lambda *_: None)["demo"]["rules"]["probability"]
    for method, t in (("student", 0.3), ("training_free", 0.5), ("maskclip", 0.5)):
        assert at[method][t]["miou"] == pytest.approx(scored["miou"][method])
        assert at[method][t]["miou_fg"] == pytest.approx(scored["miou_fg"][method])
    assert report["best"]["maskclip"]["miou"] == max(r["miou"] for r in report["rows"]["maskclip"])
