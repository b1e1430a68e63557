"""The ZeroSeg student (stage two): masked ViT encoder, MAE decoder, grouping head, losses."""

from pipeline.student.config import VARIANTS, StudentArch, student_arch
from pipeline.student.grouping import Grouped, GroupingBlock, compose_assignments
from pipeline.student.head import HeadOutput, SegmentationHead
from pipeline.student.cells import local_view_mask
from pipeline.student.losses import (
    AssignmentInfoMaxLoss,
    DistillationLoss,
    ReconstructionLoss,
    SegmentMatchingLoss,
)
from pipeline.student.masking import Masked, random_masking
from pipeline.student.model import (
    EncoderOutput,
    SegmentPrediction,
    StudentOutput,
    ZeroSegStudent,
)
from pipeline.student.patches import patchify, unpatchify
from pipeline.student.pos_embed import resize_sincos_pos_embed, sincos_2d
from pipeline.student.pretrained import LoadReport, load_encoder_state_dict
from pipeline.student.weight_decay import param_groups_for_weight_decay

__all__ = [
    "VARIANTS",
    "AssignmentInfoMaxLoss",
    "DistillationLoss",
    "EncoderOutput",
    "Grouped",
    "GroupingBlock",
    "HeadOutput",
    "LoadReport",
    "Masked",
    "ReconstructionLoss",
    "SegmentMatchingLoss",
    "SegmentPrediction",
    "SegmentationHead",
    "StudentArch",
    "StudentOutput",
    "ZeroSegStudent",
    "compose_assignments",
    "load_encoder_state_dict",
    "local_view_mask",
    "param_groups_for_weight_decay",
    "patchify",
    "random_masking",
    "resize_sincos_pos_embed",
    "sincos_2d",
    "student_arch",
    "unpatchify",
]
