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


def info_text(info: dict, path: str, max_failures: int = 20) -> str:
    """`zeroseg cache info`'s text: `describe`'s answer, one aspect a line, failures listed up to `max_failures`."""
    t, m, p = info["teacher"], info["manifest"], info.get("provenance", {})
    dense = {f"{g}x{g}" for g in info["dense_grids"]}
    grids_text = ", ".join(f"{g}{' dense' if g in dense else ''} ({'MISSING' if done is None else 'complete' if done else 'incomplete'})" for g, done in info["grid_complete"].items())
    lines = [
        f"store        {path}",
        f"schema       {info['schema']} v{info['schema_version']}  fingerprint {info['fingerprint']}",
        f"teacher      {t['library']} {t['model']} pretrained={t['pretrained'] or '(random init)'} precision={t['precision']} D={t['embed_dim']}",
        f"weights      sha256 {t['weights_sha256']}",
        f"views        {grids_text}  V={info['num_views']}",
        *[f"images       {size}x{size} ({'complete' if im['complete'] else 'incomplete'}), {im['bytes_per_image'] / 1024:.1f} KiB per image stored"
          for size, im in info["student_images"].items()],
        f"manifest     {m['n']} images, {m['hash_mode']} hash {m['hash']}",
        "rows         " + ", ".join(f"{k} {v}" for k, v in info["rows"].items()),
        f"checksums    {checksum_text(info['chunk_checksums'])}",
        f"complete     {info['complete']}",
        f"built by     {p.get('tool', '?')} {p.get('tool_version', '?')} on {p.get('host', '?')} ({p.get('user', '')}) at {p.get('created', '?')}",
    ]
    failures = info["failures"]
    if failures:
        lines.append(f"failures     {len(failures)}:")
        lines += [f"  {f['path']}: {f['reason']}" for f in failures[:max_failures]]
        if len(failures) > max_failures:
            lines.append(f"  ... and {len(failures) - max_failures} more (--json lists all)")
    return "\n".join(lines)


def checksum_text(checksums: dict[str, bool]) -> str:
    """`cache info`'s line on chunk checksums: all, none (an older store) or which arrays lack them."""
    if all(checksums.values()):
        return "crc32c on every chunk"
    if not any(checksums.values()):
        return "none (written before chunk checksums: cache validate --deep finds chunks that do not decode, not flipped bits that still do)"
    return "crc32c, except " + ", ".join(name for name, has in checksums.items() if not has) + " (written before chunk checksums)"
