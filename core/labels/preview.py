"""Pictures of label maps for people: a legend of the classes present, label | image grids, and the text that makes a
grid explain itself (column headers, a caption, one line of text per row such as its prompt).

A picture a user gets must be readable without the docs: every grid the pack writes for people names its columns,
says what produced it, and its legend lists every colour drawn, the ignore id's included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .colors import colorize
from .labelset import LabelSet

__all__ = [
    "AnnotatedGrid",
    "annotate_grid",
    "header_strip",
    "legend_entries",
    "legend_image",
    "preview_grid",
    "text_block",
    "text_font",
]

_WHITE = (255, 255, 255)
_INK = (0, 0, 0)
#: Font sizes in pixels: headers, and body text (legend, captions, per-row text).
HEADER_SIZE, TEXT_SIZE = 14, 12


def text_font(size: int = TEXT_SIZE):
    """PIL's built-in font at ``size`` pixels (no font file is needed or downloaded)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size only
        return ImageFont.load_default()


def _line_height(font) -> int:
    top, bottom = font.getbbox("Ag|")[1::2]
    return int(bottom - min(top, 0)) + 3


def wrap_text(text: str, font, width: int) -> list[str]:
    """Greedy word wrap of ``text`` (newlines kept) to lines at most ``width`` pixels wide in ``font``; a single word
    wider than that gets a line of its own."""
    lines: list[str] = []
    for paragraph in str(text).split("\n"):
        line = ""
        for word in paragraph.split():
            trial = f"{line} {word}" if line else word
            if line and font.getlength(trial) > width:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return lines


def text_block(text: str, width: int, *, size: int = TEXT_SIZE, margin: int = 4) -> np.ndarray:
    """``text`` wrapped to ``width`` pixels, black on white: `(H, width, 3)` uint8 (H from the number of lines)."""
    from PIL import Image, ImageDraw

    font = text_font(size)
    lines = wrap_text(text, font, max(1, width - 2 * margin))
    step = _line_height(font)
    img = Image.new("RGB", (width, len(lines) * step + 2 * margin), _WHITE)
    draw = ImageDraw.Draw(img)
    for k, line in enumerate(lines):
        draw.text((margin, margin + k * step), line, fill=_INK, font=font)
    return np.asarray(img)


def header_strip(columns: Sequence[tuple[str, int, int]], width: int, *, size: int = HEADER_SIZE) -> np.ndarray:
    """Column titles over a grid: each ``(title, x, column_width)`` centred over its column, wrapped to its width.

    Returns:
        `np.ndarray`: `(H, width, 3)` uint8, H fitting the longest wrapped title.
    """
    from PIL import Image, ImageDraw

    font = text_font(size)
    step = _line_height(font)
    wrapped = [(wrap_text(title, font, max(1, w - 4)), x, w) for title, x, w in columns]
    rows = max([len(lines) for lines, _, _ in wrapped] + [1])
    img = Image.new("RGB", (width, rows * step + 6), _WHITE)
    draw = ImageDraw.Draw(img)
    for lines, x, w in wrapped:
        for k, line in enumerate(lines):
            draw.text((x + max(0, (w - font.getlength(line)) / 2), 3 + k * step), line, fill=_INK, font=font)
    return np.asarray(img)


def _row_texts(texts: Sequence[str], *, row_height: int, pad: int, width: int, size: int = TEXT_SIZE) -> np.ndarray:
    """A column with ``texts[r]`` beside tile row ``r`` (rows ``row_height`` tall, ``pad`` apart), cut to its row."""
    from PIL import Image, ImageDraw

    font = text_font(size)
    step = _line_height(font)
    fit = max(1, row_height // step)
    img = Image.new("RGB", (width, len(texts) * (row_height + pad) + pad), _WHITE)
    draw = ImageDraw.Draw(img)
    for r, text in enumerate(texts):
        lines = wrap_text(text, font, width - 8)
        if len(lines) > fit:
            lines = lines[: fit - 1] + [lines[fit - 1] + " …"]
        for k, line in enumerate(lines):
            draw.text((4, pad + r * (row_height + pad) + k * step), line, fill=_INK, font=font)
    return np.asarray(img)


def _hstack_top(parts: Sequence[np.ndarray]) -> np.ndarray:
    height = max(p.shape[0] for p in parts)
    out = np.full((height, sum(p.shape[1] for p in parts), 3), 255, dtype=np.uint8)
    x = 0
    for p in parts:
        out[: p.shape[0], x : x + p.shape[1]] = p
        x += p.shape[1]
    return out


def _vstack_left(parts: Sequence[np.ndarray]) -> np.ndarray:
    width = max(p.shape[1] for p in parts)
    out = np.full((sum(p.shape[0] for p in parts), width, 3), 255, dtype=np.uint8)
    y = 0
    for p in parts:
        out[y : y + p.shape[0], : p.shape[1]] = p
        y += p.shape[0]
    return out


@dataclass
class AnnotatedGrid:
    """A grid with its text.

    Args:
        image (`np.ndarray`): `(H, W, 3)` uint8: the caption, the header, then the grid with the per-row text and
            the legend at its right.
        caption_height (`int`): rows of the caption at the top (0 without one).
        header_height (`int`): rows of the column headers below it; the grid starts at
            ``caption_height + header_height``.
    """

    image: np.ndarray
    caption_height: int
    header_height: int


def annotate_grid(
    grid: np.ndarray,
    titles: Sequence[str],
    *,
    tile_width: int,
    tile_height: int,
    pad: int,
    row_texts: Sequence[str] | None = None,
    row_title: str = "prompt",
    row_text_width: int | None = None,
    legend: np.ndarray | None = None,
    caption: str | None = None,
) -> AnnotatedGrid:
    """Add column headers, optional per-row text, a legend and a caption to a grid of tiles.

    Args:
        grid (`np.ndarray`): `(H, W, 3)` uint8 tiles ``tile_height`` x ``tile_width`` on a white background, ``pad``
            pixels apart and from the edges (as `preview_grid` and the trainer's validation grid lay them out).
        titles (`Sequence[str]`): one header per tile column, left to right.
        tile_width (`int`), tile_height (`int`), pad (`int`): the grid's geometry in pixels.
        row_texts (`Sequence[str]`, *optional*): one text per tile row (e.g. its prompt), shown in a column at the
            right of the grid under the header ``row_title``; cut with "…" when longer than a row.
        row_text_width (`int`, *optional*): that column's width (default ``max(240, 2 * tile_width)``).
        legend (`np.ndarray`, *optional*): `(h, w, 3)` uint8 (`legend_image`), placed at the far right.
        caption (`str`, *optional*): text above everything, wrapped to the picture's width.

    Returns:
        `AnnotatedGrid`.
    """
    parts = [grid]
    columns = [(t, pad + c * (tile_width + pad), tile_width) for c, t in enumerate(titles)]
    if row_texts is not None:
        rows = (grid.shape[0] - pad) // (tile_height + pad)
        if len(row_texts) != rows:
            raise ValueError(f"got {len(row_texts)} row texts for a grid of {rows} rows; give one per row")
        width = row_text_width or max(240, 2 * tile_width)
        columns.append((row_title, grid.shape[1], width))
        parts.append(_row_texts(row_texts, row_height=tile_height, pad=pad, width=width))
    if legend is not None:
        parts.append(legend)
    body = _hstack_top(parts)
    header = header_strip(columns, body.shape[1])
    top = [text_block(caption, body.shape[1])] if caption else []
    image = _vstack_left([*top, header, body])
    return AnnotatedGrid(image, top[0].shape[0] if top else 0, header.shape[0])


def legend_entries(
    label_set: LabelSet, classes: Sequence[int] | None = None, *, ignore: bool = False
) -> list[tuple[tuple[int, int, int], str]]:
    """The legend's rows: ``(colour, text)`` per class (``"3: grass"``), then, with ``ignore``, the colour `colorize`
    draws for the ignore id, as ``"ignore (255)"``.

    Args:
        label_set (`LabelSet`): names and palette.
        classes (`Sequence[int]`, *optional*): the class ids to list (e.g. those present in a map); all if None.
        ignore (`bool`, defaults to False): add the ignore id's row (when a map shows ignore pixels).
    """
    ids = list(range(label_set.num_classes)) if classes is None else [int(c) for c in classes]
    rows = [
        (tuple(int(v) for v in label_set.palette[c]), f"{c}: {label_set.names[c]}")
        for c in ids
        if 0 <= c < label_set.num_classes
    ]
    if ignore:
        # Ask colorize for the colour so the legend always matches what the tiles show.
        drawn = colorize(np.array([[label_set.ignore_index]]), label_set)[0, 0]
        rows.append((tuple(int(v) for v in drawn), f"ignore ({label_set.ignore_index})"))
    return rows


def legend_image(
    label_set: LabelSet,
    classes: Sequence[int] | None = None,
    *,
    swatch: int = 14,
    columns: int = 1,
    width: int = 200,
    ignore: bool = False,
) -> np.ndarray:
    """A legend: one row per class with its colour swatch, id and name (`legend_entries`).

    Args:
        label_set (`LabelSet`): names and palette.
        classes (`Sequence[int]`, *optional*): the class ids to list (e.g. those present in a map); all if None.
        swatch (`int`, defaults to 14): swatch and row height in pixels.
        columns (`int`, defaults to 1): number of columns (large sets such as ADE20K need several).
        width (`int`, defaults to 200): width of one column in pixels.
        ignore (`bool`, defaults to False): add a row for the ignore id's colour, ``"ignore (255)"``.

    Returns:
        `np.ndarray`: `(H, W, 3)` uint8 image on a white background.
    """
    from PIL import Image, ImageDraw

    entries = legend_entries(label_set, classes, ignore=ignore)
    columns = max(1, int(columns))
    rows = max(1, -(-len(entries) // columns))
    row_h = swatch + 4
    img = Image.new("RGB", (columns * width, rows * row_h + 4), _WHITE)
    draw = ImageDraw.Draw(img)
    font = text_font(TEXT_SIZE)
    for k, (color, text) in enumerate(entries):
        col, row = divmod(k, rows)
        x, y = col * width + 4, row * row_h + 4
        draw.rectangle([x, y, x + swatch, y + swatch], fill=color, outline=_INK)
        draw.text((x + swatch + 6, y + max(0, (swatch - TEXT_SIZE) // 2)), text, fill=_INK, font=font)
    return np.asarray(img)


def preview_grid(
    label_maps: Sequence[np.ndarray],
    label_set: LabelSet,
    images: Sequence[np.ndarray] | None = None,
    *,
    pad: int = 2,
    legend: bool = True,
) -> np.ndarray:
    """Rows of [colourised label | image], optionally with a legend at the right of the classes present (and of the
    ignore id's colour when a map has ignore pixels).

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
    has_ignore = False
    for r, ids in enumerate(label_maps):
        ids = np.asarray(ids)
        if ids.shape[-2:] != (h, w):
            raise ValueError(f"label map {r} has size {ids.shape[-2:]}, expected {(h, w)} like the first")
        values = np.unique(ids)
        present.update(int(v) for v in values if v != label_set.ignore_index)
        has_ignore = has_ignore or bool((values == label_set.ignore_index).any())
        y = pad + r * (h + pad)
        grid[y : y + h, pad : pad + w] = colorize(ids, label_set)
        if images is not None:
            img = np.asarray(images[r])
            if img.shape != (h, w, 3):
                raise ValueError(f"image {r} has shape {img.shape}, expected {(h, w, 3)} uint8")
            grid[y : y + h, 2 * pad + w : 2 * pad + 2 * w] = img
    if not legend:
        return grid
    entries = len(present) + has_ignore
    leg = legend_image(
        label_set, sorted(present), columns=max(1, -(-entries // max(1, grid.shape[0] // 18))), ignore=has_ignore
    )
    out_h = max(grid.shape[0], leg.shape[0])
    out = np.full((out_h, grid.shape[1] + leg.shape[1], 3), 255, dtype=np.uint8)
    out[: grid.shape[0], : grid.shape[1]] = grid
    out[: leg.shape[0], grid.shape[1] :] = leg
    return out
