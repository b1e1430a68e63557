"""What a teacher cache holds, as one JSON-able dict (for `zeroseg cache info`)."""

from __future__ import annotations

import numpy as np

import cache_schema as cs


def describe(store: str) -> dict:
    """Identity, views, rows by status, provenance and every failure of a store.

    Raises:
        CacheSchemaError: when `store` is not a zeroseg teacher cache.
    """
    group = cs.open_store(store)
    attrs = dict(group.attrs)
    if attrs.get("schema") != cs.SCHEMA_NAME:
        raise cs.CacheSchemaError(f"{store}: not a zeroseg teacher cache (schema {attrs.get('schema')!r})")
    status = group[cs.STATUS][:]  # [N] uint8
    failed = np.flatnonzero(status == cs.STATUS_FAILED)
    paths = group[cs.PATHS]
    reasons = group[cs.FAILURES]
    grids = cs.store_grids(group)
    complete = {}
    for g in grids:  # an array the attributes list but the store lacks is shown, not a crash
        try:
            complete[cs.grid_name(g)] = bool(group[cs.views_array(g)].attrs.get("complete", False))
        except KeyError:
            complete[cs.grid_name(g)] = None
    return {
        "schema": attrs["schema"],
        "schema_version": attrs["schema_version"],
        "fingerprint": attrs["fingerprint"],
        "teacher": attrs["teacher"],
        "preprocessing": attrs["preprocessing"],
        "manifest": attrs["manifest"],
        "grids": list(grids),
        "num_views": sum(g * g for g in grids),
        "grid_complete": complete,  # None: the array is missing
        "dense_grids": [g for g in grids if complete[cs.grid_name(g)] is not None and cs.grid_content(group, g) == cs.DENSE],  # the rest are crops
        "student_images": {
            str(s): {"complete": bool(arr.attrs.get("complete", False)), "bytes_per_image": arr.nbytes_stored() / max(1, arr.shape[0])}
            for s in cs.store_image_sizes(group)
            for arr in [group[cs.images_array(s)]]
        },
        "rows": {name: int(np.sum(status == code)) for code, name in cs.STATUS_NAMES.items()},
        # array -> whether each chunk carries a crc32c (stores written before chunk checksums: none)
        "chunk_checksums": {
            name: cs.chunk_checksums(group[name])
            for name in [cs.STATUS, cs.FAILURES, cs.PATHS, *map(cs.views_array, grids), *map(cs.images_array, cs.store_image_sizes(group))]
            if name in group
        },
        "complete": bool(attrs.get("complete", False)),
        "layout": attrs.get("layout", {}),
        "provenance": attrs.get("provenance", {}),
        "failures": [
            {"row": int(i), "path": str(p), "reason": str(r)}
            for i, p, r in zip(failed, paths.get_coordinate_selection(failed), reasons.get_coordinate_selection(failed))
        ]
        if failed.size
        else [],
    }
