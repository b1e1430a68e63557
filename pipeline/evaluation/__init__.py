"""Zero-shot evaluation: benchmark readers, segmentation scores, and `Segmenter`, a trained student from Python."""

from pipeline.evaluation.datasets import (
    COCO_OBJECT,
    COCO_OBJECT_CLASSES,
    CONTEXT_CLASSES,
    DATASETS,
    PASCAL_CONTEXT,
    VOC2012,
    VOC_CLASSES,
    Layout,
    Sample,
    SegmentationDataset,
    open_dataset,
    open_layout,
    open_voc_layout,
    read_class_names,
)
from pipeline.evaluation.metrics import (
    ConfusionMatrix,
    SegmentationScores,
    format_table,
)

__all__ = [
    "COCO_OBJECT",
    "COCO_OBJECT_CLASSES",
    "CONTEXT_CLASSES",
    "DATASETS",
    "PASCAL_CONTEXT",
    "VOC2012",
    "VOC_CLASSES",
    "ConfusionMatrix",
    "Layout",
    "Sample",
    "SegmentationDataset",
    "SegmentationScores",
    "format_table",
    "open_dataset",
    "open_layout",
    "open_voc_layout",
    "read_class_names",
]


def __getattr__(name: str):
    """`from pipeline.evaluation import Segmenter`: imported on first use, after the package itself
    (`segmenter.py` reads the modules this package's readers live beside)."""
    if name in ("Segmenter", "Segmentation"):
        from pipeline.evaluation import segmenter

        return getattr(segmenter, name)
    raise AttributeError(f"module 'pipeline.evaluation' has no attribute {name!r}")
