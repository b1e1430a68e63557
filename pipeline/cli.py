"""The `zeroseg` command line (typer). Each command reads params, calls the library, reports.

User errors (bad params, bad inputs, a store that does not match) end with one line on stderr
and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import click
import typer

import cache_schema as cs
from pipeline.config import Params, load_params
from pipeline.core.errors import ZerosegError

EXAMPLES = """Examples:

\b
  dvc repro                                          # the whole demo: cache, students, metrics
  zeroseg teacher-cache --set data.images=my/images  # stage one on your images
  zeroseg train --set data.images=my/images          # stage two, on the store stage one built
  zeroseg segment photo.jpg --classes "circle,star" --out out/
  zeroseg evaluate --set "eval.datasets={voc: data/VOCdevkit/VOC2012}"
  zeroseg cache info caches/teacher.zarr
"""

# Plain click help (rich_markup_mode None): typer's rich panels print a "<bool>" placeholder
# beside every flag, as if it took a value.
app = typer.Typer(
    help="ZeroSeg: open-vocabulary segmentation trained without human labels.",
    epilog=EXAMPLES,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)
cache_app = typer.Typer(help="Inspect and validate teacher caches.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(cache_app, name="cache")


def _version(value: bool) -> None:
    if value:
        from pipeline import __version__

        typer.echo(f"zeroseg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")] = False) -> None:
    """ZeroSeg: open-vocabulary segmentation trained without human labels."""

ParamsOpt = Annotated[Path, typer.Option("--params", help="params file (YAML)")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-S", help="override, e.g. teacher.model=ViT-B-16 (repeatable)")]

ModelParamsOpt = Annotated[Optional[Path], typer.Option("--params", help="params file (YAML) [default: params.yaml if there is one here, else the params recorded in the checkpoint]")]


def params_for_model(params: Path | None, set_: list[str] | None, checkpoint: Path) -> Params:
    """Params for using a trained student: the file given, ./params.yaml, or else the checkpoint's own
    (`pipeline.evaluation.segmenter.params_for_checkpoint`, what the Python API uses too)."""
    from pipeline.evaluation.segmenter import params_for_checkpoint

    return params_for_checkpoint(params, set_ or (), checkpoint)


@app.command("teacher-cache")
def teacher_cache(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    out: Annotated[Optional[str], typer.Option("--out", help="store path or URL (default: cache.root/MODEL-FINGERPRINT.zarr)")] = None,
    replace: Annotated[bool, typer.Option(help="rebuild a store at --out that was built for other params")] = False,
    stats_json: Annotated[Optional[Path], typer.Option(help="write the run's counts and time split here")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="exit 1 when the store holds images that could not be read (they are recorded either way)")] = False,
    repair: Annotated[bool, typer.Option("--repair", help="read every shard first and recompute exactly the damaged ones (what cache validate --deep reports)")] = False,
) -> None:
    """Stage one: embed every image's multi-scale views with the teacher, into a Zarr store."""
    from pipeline.teacher.run import run_teacher_cache

    if stats_json and not stats_json.parent.is_dir():  # found out now, not after hours of work
        raise typer.BadParameter(f"{stats_json.parent} is not a folder", param_hint="--stats-json")
    stats = run_teacher_cache(load_params(params, set_ or ()), out, replace=replace, repair=repair, progress=not quiet)
    if stats_json:
        stats_json.write_text(json.dumps(stats.as_dict(), indent=2))
    rate = stats.rows_computed / stats.wall_s if stats.wall_s else 0.0
    for line in stats.repaired:
        typer.echo(f"repaired: {line}")
    if stats.failed:  # named, not only counted: a text file called .jpg is no image
        from pipeline.cache.info import describe

        failures = describe(stats.store)["failures"]
        for f in failures[:20]:
            typer.echo(f"zeroseg: failed: {f['path']}: {f['reason']}", err=True)
        if len(failures) > 20:
            typer.echo(f"zeroseg: ... and {len(failures) - 20} more (zeroseg cache info --json lists them all)", err=True)
    typer.echo(
        f"{stats.store}: {stats.rows_computed} images processed ({stats.views_computed} views, {rate:.1f} img/s overall), "
        f"{stats.shards_written} shards written, {stats.shards_skipped} already done"
        + (f", {stats.views_recovered} views recovered from tasks whose worker died" if stats.views_recovered else "")
        + f"; the store has {stats.failed} failed rows (zeroseg cache info lists them)"
        + ("" if stats.complete else " - INCOMPLETE")
    )
    if stats.failed and strict:
        typer.echo(f"zeroseg: error: {stats.failed} images could not be read (--strict)", err=True)
        raise typer.Exit(1)


@app.command("train")
def train(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    cache: Annotated[Optional[str], typer.Option("--cache", help="teacher cache store (path or URL; default: the store teacher-cache built for these params, found by fingerprint under cache.root)")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="folder for checkpoint.pt [default: models/student for the demo's scenes, models/NAME for images in a folder NAME]")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the checkpoint in --out exactly (fail if there is none or it differs)")] = False,
    auto_resume: Annotated[bool, typer.Option("--auto-resume", help="continue the checkpoint in --out when it was made with the same config and cache, else start afresh")] = False,
    live_dir: Annotated[str, typer.Option("--live-dir", help="dvclive folder of its own for metrics and plots ('' for none)")] = "dvclive",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Stage two: train the student from the teacher cache (torchrun for several GPUs)."""
    from pipeline.training.run import run_training

    if resume and auto_resume:
        raise typer.BadParameter("--resume and --auto-resume exclude each other: --resume fails when the checkpoint differs, --auto-resume starts afresh", param_hint="--resume")
    mode = "must" if resume else "auto" if auto_resume else "never"
    loaded = load_params(params, set_ or ())
    if out is None:  # another dataset's student must not overwrite the demo's (a DVC output)
        from pipeline.config import DataConfig

        images = Path(loaded.data.images)
        out = Path("models/student") if loaded.data.images == DataConfig.images else Path("models") / (images.stem if images.suffix else images.name or "student")
    summary = run_training(loaded, cache, out, resume=mode, live_dir=live_dir, progress=not quiet)
    losses = ", ".join(f"{k} {v:.4f}" for k, v in summary.losses.items())
    typer.echo(f"{summary.checkpoint}: step {summary.step}/{summary.total_steps}, {summary.images_per_s:.1f} img/s, data wait {summary.data_wait_fraction:.1%}; {losses}")


@app.command("demo-teacher")
def demo_teacher(
    out: Annotated[Optional[Path], typer.Option("--out", help="folder for the open_clip local-dir checkpoint [default: teacher.pretrained of --params, when it names the demo teacher]")] = None,
    steps: Annotated[int, typer.Option(help="optimizer steps")] = 700,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    lr: Annotated[float, typer.Option(help="AdamW learning rate")] = 2e-3,
    threads: Annotated[int, typer.Option(help="CPU threads")] = 2,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace the files of a non-empty --out (the default --out is the shipped teacher)")] = False,
    model: Annotated[str, typer.Option("--model", help="the open_clip model to train: zeroseg-demo-rn (the demo's) or zeroseg-demo-vit (a ViT of the same size)")] = "zeroseg-demo-rn",
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Reproduce the demo's CLIP teacher: an open_clip model trained on captioned scene crops."""
    from pipeline.demo.teacher import check_out_dir, train_demo_teacher

    if out is None:
        teacher = load_params(params, set_ or ()).teacher
        if teacher.model != model or not teacher.pretrained:
            raise typer.BadParameter(f"{params} names teacher {teacher.model} + {teacher.pretrained!r}, not {model} in a folder: pass --out", param_hint="--out")
        out = Path(teacher.pretrained)
    check_out_dir(out, overwrite)

    metrics = train_demo_teacher(out, seed=seed, steps=steps, lr=lr, threads=threads, log=typer.echo, model_name=model)
    acc = ", ".join(f"{g} {100 * v:.0f}%" for g, v in metrics["zero_shot_shape_accuracy"].items())
    typer.echo(f"{out}: {metrics['steps']} steps in {metrics['seconds']:.0f} s; zero-shot shape accuracy {acc}; sha256 {metrics['weights_sha256']}")


@app.command("evaluate")
def evaluate(
    params: ModelParamsOpt = None,
    set_: SetOpt = None,
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="the student's checkpoint.pt")] = Path("models/student/checkpoint.pt"),
    base_checkpoint: Annotated[Optional[Path], typer.Option("--base-checkpoint", help="the paper's Base ablation, evaluated beside (its segments named by their group embeddings, as the paper does)")] = None,
    ablation: Annotated[Optional[list[str]], typer.Option("--ablation", help="NAME=CHECKPOINT: another student evaluated beside, as the student is (repeatable)")] = None,
    metrics: Annotated[Path, typer.Option("--metrics-dir", help="folder for one headline metrics JSON per dataset")] = Path("metrics"),
    details: Annotated[Path, typer.Option("--details-dir", help="folder for one per-class detail JSON per dataset (pixel accuracy, per-class IoU)")] = Path("metrics_detail"),
    pictures: Annotated[Optional[Path], typer.Option("--pictures", help="folder for overlay pictures")] = Path("outputs/eval"),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
) -> None:
    """Zero-shot mIoU of the student, the baselines and the grouping oracles on eval.datasets."""
    from pipeline.evaluation.run import run_evaluation

    ablations = {}
    for item in ablation or ():
        name, sep, path = item.partition("=")
        if not sep or not name.isidentifier() or not path:
            raise typer.BadParameter(f"{item!r}: expected NAME=CHECKPOINT, NAME a word such as no_crops", param_hint="--ablation")
        ablations[name] = Path(path)
    results = run_evaluation(params_for_model(params, set_, checkpoint), checkpoint, metrics, pictures, base_checkpoint=base_checkpoint, ablations=ablations,
                             progress=not quiet, echo=typer.echo, details_dir=details)
    typer.echo(f"\nmetrics written to {', '.join(str(metrics / f'{n}.json') for n in results)}, per-class detail to {details}" + (f", pictures to {pictures}" if pictures else ""))


@app.command("segment")
def segment(
    images: Annotated[list[Path], typer.Argument(help="image files or folders")],
    classes: Annotated[str, typer.Option("--classes", help="comma-separated vocabulary, or @FILE with one class per line")],
    out: Annotated[Path, typer.Option("--out", help="folder for NAME_mask.png and NAME_overlay.png (a folder's images keep their sub-folders)")],
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="the student's checkpoint.pt")] = Path("models/student/checkpoint.pt"),
    threshold: Annotated[Optional[float], typer.Option(help="background threshold under eval.bg_rule probability or cosine (default: eval.bg_threshold.default or 0.5)")] = None,
    include: Annotated[Optional[list[str]], typer.Option("--include", help="keep only images whose path inside the folder matches this glob (repeatable), e.g. '*.jpg'")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", help="leave out images whose path inside the folder matches this glob (repeatable)")] = None,
    naming: Annotated[str, typer.Option("--naming", help="student (each segment by its own embedding) | training_free | maskclip | sclip | naclip: that teacher method's scores, averaged over each student segment, name it (runs the teacher too)")] = "student",
    params: ModelParamsOpt = None,
    set_: SetOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="exit 1 when some images could not be read (the others are segmented either way)")] = False,
) -> None:
    """Zero-shot segmentation of any images with any vocabulary: a mask PNG and an overlay PNG each."""
    from pipeline.evaluation.segment import parse_classes, run_segment

    def report(r: dict) -> None:  # as each image is done; skip reasons go to stderr with the summary
        if "error" in r:
            typer.echo(f"zeroseg: skipped {r['error']}", err=True)
        else:
            typer.echo(f"{r['image']}: {r['overlay']} ({', '.join(r['legend']) or 'background only'})")

    results = run_segment(params_for_model(params, set_, checkpoint), checkpoint, images, parse_classes(classes), out, threshold=threshold, progress=not quiet, on_result=report,
                          include_globs=include or (), exclude_globs=exclude or (), naming=naming, on_note=lambda line: typer.echo(f"zeroseg: note: {line}", err=True))
    skipped = sum("error" in r for r in results)
    if skipped:
        typer.echo(f"zeroseg: {'error' if strict else 'warning'}: {skipped} of {len(results)} images could not be read (listed above); the others were segmented", err=True)
        if strict:
            raise typer.Exit(1)


@cache_app.command("info")
def cache_info(
    path: Annotated[Optional[str], typer.Argument(help="store path or URL [default: the store teacher-cache built for --params, found by fingerprint]")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    max_failures: Annotated[int, typer.Option(help="failures listed in text mode")] = 20,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Teacher identity, views, dims, rows by status, fingerprint, provenance, failures."""
    from pipeline.cache.info import describe, info_text

    if path is None:
        from pipeline.cache.identity import find_store

        path = find_store(load_params(params, set_ or ()), progress=False)
    info = describe(path)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    typer.echo(info_text(info, path, max_failures))


@cache_app.command("validate")
def cache_validate(
    path: Annotated[str, typer.Argument(help="store path or URL")],
    params: Annotated[Optional[Path], typer.Option("--params", help="also check the store matches these params (with --set alone: params.yaml)")] = None,
    set_: SetOpt = None,
    deep: Annotated[bool, typer.Option("--deep", help="also read every shard: each decodes (and matches its checksum), views agree with each row's status; lists every damaged one")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Exit 0 when the store is complete and consistent (and built for --params, when given)."""
    from tqdm.auto import tqdm

    expected, grids = None, None
    if params is None and set_:  # overrides are of params: the default file's, as in every other command
        if not Path("params.yaml").is_file():
            raise typer.BadParameter("--set overrides params, and there is no params.yaml here: pass --params FILE too", param_hint="--set")
        params = Path("params.yaml")
    if params is not None:
        from pipeline.cache.identity import identity_from_params

        loaded = load_params(params, set_ or ())
        expected, grids = identity_from_params(loaded), tuple(sorted(set(loaded.cache.grids)))
    damage = []
    if deep and cs.is_cache(path):  # the data first: a damaged status chunk would stop the metadata check
        with tqdm(desc="read", unit="row", disable=quiet) as bar:
            damage = cs.find_damage(path, grids, on_rows=bar.update)
        for d in damage:  # the whole report, one shard per line, then the one-line error
            typer.echo(f"damaged: {d}")
    try:
        attrs = cs.validate(path, expected, grids, damaged_ok=bool(damage))
    except cs.CacheSchemaError as exc:
        if not damage:
            raise
        raise cs.CacheSchemaError(f"{path}: {len(damage)} damaged shards (listed above); also {str(exc).removeprefix(f'{path}: ')}") from None
    if damage:
        raise cs.CacheSchemaError(f"{path}: {len(damage)} damaged shards (listed above); zeroseg teacher-cache --repair recomputes exactly these")
    group = cs.open_store(path)
    failed = int((group[cs.STATUS][:] == cs.STATUS_FAILED).sum())
    typer.echo(f"{path}: valid ({attrs['manifest']['n']} images, grids {', '.join(map(cs.grid_name, cs.store_grids(group)))}, fingerprint {attrs['fingerprint'][:12]})"
               + (f"; {failed} images could not be read and have no views (zeroseg cache info lists them)" if failed else ""))


@app.command("demo-data")
def demo_data(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    split: Annotated[str, typer.Option("--split", help="train (data.demo_train scenes into OUT) | val | test (data.demo_val / demo_test scenes with masks to OUT/eval)")] = "train",
    out: Annotated[Path, typer.Option("--out", help="folder to write the split into")] = Path("data/demo/images"),
) -> None:
    """Generate the built-in synthetic scenes (data.demo_*): shapes on textures, each split from a random stream of its own."""
    from pipeline.demo.data import SPLITS, write_demo_split

    if split not in SPLITS:
        raise typer.BadParameter(f"{split!r}: expected {', '.join(SPLITS)}", param_hint="--split")
    d = load_params(params, set_ or ()).data
    n = {"train": d.demo_train, "val": d.demo_val, "test": d.demo_test}[split]
    write_demo_split(out, split, n, size=d.demo_size, seed=d.demo_seed)
    typer.echo(f"{out}: {n} {'training images' if split == 'train' else 'scenes with masks (' + split + ' split)'}")


# Usage errors (a missing argument, an unknown option): click's own, or, since typer 0.26, those
# of the copy of click that typer bundles, which do not derive from click's.
USAGE_ERRORS = tuple({click.exceptions.ClickException, getattr(typer, "TyperException", click.exceptions.ClickException)})
ABORTS = tuple({click.exceptions.Abort, typer.Abort})
RESUMABLE = {
    "teacher-cache": "zeroseg: interrupted; finished shards are kept: rerun to resume",
}


def interrupted(args: list[str]) -> str:
    """What Ctrl-C leaves behind, for the command in `args` (asked when it happens)."""
    command = next((a for a in args if not a.startswith("-")), "")
    if command == "train":
        from pipeline.training.state import SAVED

        if SAVED.get("step") is not None:
            return f"zeroseg: interrupted; the checkpoint of step {SAVED['step']} is kept ({SAVED['path']}): rerun with --resume to continue"
        return "zeroseg: interrupted before the first checkpoint of this run (it comes at the end of epoch 1, or every train.checkpoint_every steps): nothing to resume"
    return RESUMABLE.get(command, "zeroseg: interrupted")


def _run_app(args: list[str] | None):
    """typer's app; a command that fails or is interrupted takes back the empty output folders it made."""
    from pipeline.core.files import remove_empty_created

    try:
        result = app(args=args, standalone_mode=False)
    except BaseException:
        remove_empty_created()
        raise
    if result not in (None, 0):
        remove_empty_created()
    return result


def main(args: list[str] | None = None) -> None:
    """Run the CLI; user errors become one line on stderr and exit code 2."""
    argv = sys.argv[1:] if args is None else args
    try:
        result = _run_app(args)
    except (ZerosegError, cs.CacheSchemaError) as exc:
        typer.echo(f"zeroseg: error: {exc}", err=True)
        sys.exit(2)
    except USAGE_ERRORS as exc:
        exc.show()
        sys.exit(getattr(exc, "exit_code", 2))
    except ABORTS:
        typer.echo("zeroseg: aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        typer.echo(interrupted(argv), err=True)
        sys.exit(130)
    except (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:  # a path that cannot be used: the message names it
        typer.echo(f"zeroseg: error: {exc}", err=True)
        sys.exit(2)
    if result == 130:  # typer turns Ctrl-C into exit code 130 before it reaches the handler above
        typer.echo(interrupted(argv), err=True)
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
