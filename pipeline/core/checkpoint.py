"""Checkpoints that `torch.load(..., weights_only=True)` opens: tensors, numbers, strings only.

Loading a checkpoint never executes pickled code, so a checkpoint from another team is as safe
to open as a safetensors file. Writes go to a temporary file and are renamed into place, so a
crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.errors import InputError


@contextlib.contextmanager
def deferred_signals(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)):
    """Hold Ctrl-C and SIGTERM until the block ends, then deliver them to the handlers in force.

    A stop that lands inside `torch.save` interrupts its zip writer, whose clean-up then raises
    its own error in place of the stop: the run ended with exit code 1 and a traceback instead
    of 130/143 with its message. Outside the main thread (where handlers cannot be set) this
    does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: held.append(signum)) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(held):
            signal.raise_signal(sig)


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write atomically: `path.tmp`, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *, mmap: bool = False) -> dict[str, Any]:
    """Open a checkpoint with `weights_only=True`; one-line error when it is not one.

    `mmap`: map the tensors instead of reading them (for a look at the plain values, such as
    the recorded params, without reading a large checkpoint's weights).
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise InputError(f"{path}: checkpoint not found") from None
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
        if Path(path).is_dir():
            raise InputError(f"{path}: is a folder, not a checkpoint file") from None
        if not zipfile.is_zipfile(path):
            raise InputError(f"{path}: not a checkpoint: not the zip archive torch.save writes (or a truncated copy of one)") from None
        if "Weights only load failed" in str(exc):  # torch's advice to set weights_only=False is not ours to give
            raise InputError(f"{path}: holds pickled objects beyond tensors and plain values; zeroseg checkpoints never do, "
                             "and it is not unpickled (that could run code)") from None
        raise InputError(f"{path}: not a loadable checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None


def rng_state() -> dict[str, Any]:
    """Every RNG the training loop draws from, as tensors and plain numbers."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
