"""Reading the teacher cache: its attributes and its views, as stage two and any user reads them.

Reads need no write access and no teacher: a store shared read-only by another team is read
as it is."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import zarr

import cache_schema as cs
from pipeline.core.errors import InputError


def view_arrays(store: str | zarr.Group, grids: Sequence[int]) -> list[zarr.Array]:
    """The `views/GxG` arrays of `grids` in canonical order, opened (each lookup reads metadata,
    so a reader of many slices opens them once).

    Raises:
        InputError: the store has no views for one of `grids`.
    """
    group = cs.open_store(store)
    have = cs.store_grids(group)
    for g in sorted(set(grids)):
        if g not in have:
            raise InputError(f"{store}: no views for grid {g}x{g} (has {', '.join(map(cs.grid_name, have))})")
    return [group[cs.views_array(g)] for g in sorted(set(grids))]


def load_targets(store: str | zarr.Group | Sequence[zarr.Array], grids: Sequence[int] = (), rows: slice | np.ndarray | None = None) -> np.ndarray:
    """Teacher targets for `grids` in canonical order (grid ascending, row-major cells).

    Args:
        store: path, URL or open group; or the arrays `view_arrays` opened (then `grids` is unused).
        grids: which grids; their views are concatenated along V.
        rows: a slice or index array of images; None for all.
    Returns:
        [N, V, D] float16, as stored (not normalized).
    """
    arrays = store if isinstance(store, (list, tuple)) else view_arrays(store, grids)
    sel = slice(None) if rows is None else rows
    parts = [arr[sel] if isinstance(sel, slice) else arr.get_orthogonal_selection((sel, slice(None), slice(None))) for arr in arrays]
    return np.concatenate(parts, axis=1)  # [N, V, D]


def read_store_attrs(url: str) -> tuple[dict, zarr.Group | None]:
    """(attributes, group opened read-only) of whatever is at `url`; ({}, None) if it is no zarr group."""
    try:
        group = zarr.open_group(url, mode="r")
        return dict(group.attrs), group
    except Exception:  # noqa: BLE001 - anything unreadable is "not a store of ours"
        return {}, None
