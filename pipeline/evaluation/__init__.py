"""Zero-shot evaluation: benchmark readers and segmentation scores."""

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
