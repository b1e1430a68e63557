"""Devices by name: `auto` picks CUDA when there is one."""

from __future__ import annotations

import torch

from pipeline.core.errors import InputError


def resolve_device(device: str, key: str = "teacher.device") -> torch.device:
    """`auto` picks CUDA when there is one; anything else must be a usable torch device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"{key}: {device!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{key}: {device!r} asked for, but no CUDA device is available")
    return dev
