"""The command line and the loading shared by the diagnostics that read a trained student on a
labelled split (`grouped_naming`, `probe`, `background_rule`)."""

from __future__ import annotations

import argparse

from bench.harness import parser
from pipeline.config import Params, load_params
from pipeline.evaluation.datasets import SegmentationDataset, open_dataset
from pipeline.evaluation.models import LoadedModel, load_model


def split_parser(doc: str | None) -> argparse.ArgumentParser:
    """`--params`, `--checkpoint`, `--data` (and the harness's `--json`)."""
    ap = parser(doc)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("-S", "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a param, as zeroseg's --set (repeatable)")
    ap.add_argument("--checkpoint", default="models/student/checkpoint.pt")
    ap.add_argument("--data", default="data/demo_val", help="a split with masks in the demo's (VOC) layout")
    return ap


def open_split(doc: str | None) -> tuple[argparse.Namespace, Params, LoadedModel, SegmentationDataset]:
    """(args, params, the loaded model, the split as a `demo` dataset) from the command line."""
    args = split_parser(doc).parse_args()
    params = load_params(args.params, args.set)
    return args, params, load_model(params, args.checkpoint), open_dataset("demo", args.data)
