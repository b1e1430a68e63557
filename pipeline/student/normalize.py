"""The student's input normalisation (timm / MAE ViT mean and std), applied on the device."""

from __future__ import annotations

import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from pipeline.core.views import upload

# The student is normalized as timm / MAE ViTs are, so their checkpoints can initialize it.
STUDENT_MEAN, STUDENT_STD = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float [B, 3, H, W] normalized with the student's mean and std."""
    mean = upload(torch.tensor(STUDENT_MEAN), images.device).view(1, 3, 1, 1)
    std = upload(torch.tensor(STUDENT_STD), images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std
