"""Pictures of label maps for people: a legend of the classes present, and label | image grids."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .colors import colorize
from .labelset import LabelSet

__all__ = ["legend_image", "preview_grid"]


def legend_image(
    label_set: LabelSet,
    classes: Sequence[int] | None = None,
    *,
    swatch: int = 14,
    columns: int = 1,
    width: int = 200,
) -> np.ndarray:
    """A legend: one row per class with its colour swatch, id and name.

    Args:
        label_set (`LabelSet`): names and palette.
        classes (`Sequence[int]`, *optional*): the class ids to list (e.g. those present in a map); all if None.
        swatch (`int`, defaults to 14): swatch and row height in pixels.
        columns (`int`, defaults to 1): number of columns (large sets such as ADE20K need several).
        width (`int`, defaults to 200): width of one column in pixels.

    Returns:
        `np.ndarray`: `(H, W, 3)` uint8 image on a white background.
    """
    from PIL import Image, ImageDraw, ImageFont

    ids = list(range(label_set.num_classes)) if classes is None else [int(c) for c in classes]
    ids = [c for c in ids if 0 <= c < label_set.num_classes]
    columns = max(1, int(columns))
    rows = max(1, -(-len(ids) // columns))
    row_h = swatch + 4
    img = Image.new("RGB", (columns * width, rows * row_h + 4), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for k, c in enumerate(ids):
        col, row = divmod(k, rows)
        x, y = col * width + 4, row * row_h + 4
        color = tuple(int(v) for v in label_set.palette[c])
        draw.rectangle([x, y, x + swatch, y + swatch], fill=color, outline=(0, 0, 0))
        draw.text(
            (x + swatch + 6, y + max(0, (swatch - 11) // 2)), f"{c}: {label_set.names[c]}", fill=(0, 0, 0), font=font
        )
    return np.asarray(img)


def preview_grid(
    label_maps: Sequence[np.ndarray],
    label_set: LabelSet,
    images: Sequence[np.ndarray] | None = None,
    *,
    pad: int = 2,
    legend: bool = True,
) -> np.ndarray:
    """Rows of [colourised label | image], optionally with a legend of the classes present at the right.

    Args:
        label_maps (`Sequence[np.ndarray]`): `(H, W)` id maps, all of one size.
        label_set (`LabelSet`): the palette.
        images (`Sequence[np.ndarray]`, *optional*): `(H, W, 3)` uint8 images, one per map.
        pad (`int`, defaults to 2): white gap in pixels.
        legend (`bool`, defaults to True): append a legend column.

    Returns:
        `np.ndarray`: `(H_total, W_total, 3)` uint8.
    """
    if not label_maps:
        raise ValueError("preview_grid needs at least one label map")
    if images is not None and len(images) != len(label_maps):
        raise ValueError(f"got {len(images)} images for {len(label_maps)} label maps; give one image per map")
    h, w = np.asarray(label_maps[0]).shape[-2:]
    cols = 1 if images is None else 2
    grid = np.full((len(label_maps) * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    present: set[int] = set()
    for r, ids in enumerate(label_maps):
        ids = np.asarray(ids)
        if ids.shape[-2:] != (h, w):
            raise ValueError(f"label map {r} has size {ids.shape[-2:]}, expected {(h, w)} like the first")
        present.update(int(v) for v in np.unique(ids) if v != label_set.ignore_index)
        y = pad + r * (h + pad)
        grid[y : y + h, pad : pad + w] = colorize(ids, label_set)
        if images is not None:
            img = np.asarray(images[r])
            if img.shape != (h, w, 3):
                raise ValueError(f"image {r} has shape {img.shape}, expected {(h, w, 3)} uint8")
            grid[y : y + h, 2 * pad + w : 2 * pad + 2 * w] = img
    if not legend:
        return grid
    leg = legend_image(label_set, sorted(present), columns=max(1, -(-len(present) // max(1, grid.shape[0] // 18))))
    out_h = max(grid.shape[0], leg.shape[0])
    out = np.full((out_h, grid.shape[1] + leg.shape[1], 3), 255, dtype=np.uint8)
    out[: grid.shape[0], : grid.shape[1]] = grid
    out[: leg.shape[0], grid.shape[1] :] = leg
    return out
