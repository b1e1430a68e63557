"""Checkpoints of earlier versions: what they carry that the student no longer has.

Options measured not to help were removed from the product (docs/findings.md names the tag where
they still run). A checkpoint trained before that still loads: the buffers and parameters of the
removed parts are dropped, and the architecture fields they set are ignored, each with a warning
that says what the loaded model leaves out.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

log = logging.getLogger(__name__)

# State-dict keys of removed parts: prefix -> what it was.
REMOVED_STATE = {
    "target_space.": "loss.target_norm's affine map of the outputs",
    "prototype_head.": "loss.token_prototypes' training-only head",
}
REMOVED_ARCH = {
    "prototypes": "loss.token_prototypes' head",
    "learnable_assign_temperature": "student.learnable_assign_temperature",
}


def upgrade_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` without the removed parts' entries (a warning per part found)."""
    out = dict(state)
    for prefix, what in REMOVED_STATE.items():
        dropped = [k for k in out if k.startswith(prefix)]
        if not dropped:
            continue
        if prefix == "target_space.":
            identity = all(not bool((out[k] != (1.0 if k.endswith("scale") else 0.0)).any()) for k in dropped)
            if identity:  # the unit-vector space: nothing is lost
                for k in dropped:
                    del out[k]
                continue
        log.warning("checkpoint written by an earlier version: dropping %s (%d tensors); the option was removed (docs/findings.md)", what, len(dropped))
        for k in dropped:
            del out[k]
    scales = [k for k in out if k.endswith(".assign.logit_scale")]
    if scales:
        log.warning("checkpoint written by an earlier version: dropping student.learnable_assign_temperature's scales (%d); "
                    "the option was removed (docs/findings.md)", len(scales))
        for k in scales:
            del out[k]
    return out


def upgrade_arch(arch: dict, arch_type) -> dict:
    """An architecture dict of any version -> the fields `arch_type` (a dataclass) has; removed
    fields that were set are named in a warning."""
    known = {f.name for f in dataclasses.fields(arch_type)}
    removed = {k: v for k, v in arch.items() if k not in known}
    used = [REMOVED_ARCH.get(k, k) for k, v in removed.items() if v]
    if used:
        log.warning("checkpoint written by an earlier version: ignoring %s (removed; docs/findings.md)", ", ".join(used))
    return {k: v for k, v in arch.items() if k in known}
