"""The PASCAL VOC colour map, so masks look as VOC masks do."""

from __future__ import annotations


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (256 entries), so masks look as VOC masks do."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette
