"""Pictures that explain themselves: column headers, per-row text, a caption, and a legend with the ignore colour."""

from __future__ import annotations

import numpy as np
import pytest

from layout2image.core.labels import colorize, get_label_set, preview_grid
from layout2image.core.labels.preview import annotate_grid, header_strip, legend_entries, legend_image, text_block

TOY = get_label_set("toy")
H, W, PAD, ROWS, COLS = 40, 48, 2, 3, 3


def _grid() -> np.ndarray:
    """A grid of grey tiles (value 100) on white, in the validation grid's geometry."""
    grid = np.full((ROWS * (H + PAD) + PAD, COLS * (W + PAD) + PAD, 3), 255, dtype=np.uint8)
    for r in range(ROWS):
        for c in range(COLS):
            y, x = PAD + r * (H + PAD), PAD + c * (W + PAD)
            grid[y : y + H, x : x + W] = 100
    return grid


def _inked(area: np.ndarray) -> bool:
    return bool((area != 255).any())


def test_header_strip_sits_above_the_grid_and_names_every_column():
    grid = _grid()
    out = annotate_grid(grid, ["layout", "sample", "seg"], tile_width=W, tile_height=H, pad=PAD)
    image, top = out.image, out.caption_height + out.header_height
    assert out.caption_height == 0 and out.header_height > 10
    # Taller than the grid by exactly the header; the grid is unchanged below it.
    assert image.shape == (grid.shape[0] + out.header_height, grid.shape[1], 3)
    assert np.array_equal(image[top:], grid)
    # Text is drawn over each tile column (not just somewhere in the strip).
    for c in range(COLS):
        x = PAD + c * (W + PAD)
        assert _inked(image[: out.header_height, x : x + W]), f"no header text over column {c}"


def test_caption_row_texts_and_legend_are_placed_beside_and_above():
    grid = _grid()
    legend = legend_image(TOY, [0, 1], ignore=True)
    texts = ["a road on a sunny day", "a road at night", "a road in fog"]
    out = annotate_grid(
        grid, ["a", "b", "c"], tile_width=W, tile_height=H, pad=PAD, row_texts=texts, legend=legend, caption="cap"
    )
    image, top = out.image, out.caption_height + out.header_height
    assert out.caption_height > 0 and _inked(image[: out.caption_height])
    text_width = max(240, 2 * W)
    assert image.shape[1] == grid.shape[1] + text_width + legend.shape[1]
    assert np.array_equal(image[top : top + grid.shape[0], : grid.shape[1]], grid)
    for r in range(ROWS):  # each row's text is beside its row
        y = top + PAD + r * (H + PAD)
        assert _inked(image[y : y + H, grid.shape[1] : grid.shape[1] + text_width])
    x = grid.shape[1] + text_width
    assert np.array_equal(image[top : top + legend.shape[0], x:], legend)
    # The row-text column has a header too ("prompt" by default).
    assert _inked(image[out.caption_height : top, grid.shape[1] : x])
    with pytest.raises(ValueError, match="got 2 row texts for a grid of 3 rows"):
        annotate_grid(grid, ["a"], tile_width=W, tile_height=H, pad=PAD, row_texts=texts[:2])


def test_legend_lists_the_colour_drawn_for_the_ignore_id():
    entries = legend_entries(TOY, [0, 5], ignore=True)
    drawn = tuple(int(v) for v in colorize(np.array([[TOY.ignore_index]]), TOY)[0, 0])
    assert entries[-1] == (drawn, f"ignore ({TOY.ignore_index})")
    assert [text for _, text in entries[:-1]] == [f"0: {TOY.names[0]}", f"5: {TOY.names[5]}"]
    assert all(text != f"ignore ({TOY.ignore_index})" for _, text in legend_entries(TOY, [0, 5]))
    plain, with_ignore = legend_image(TOY, [0, 5]), legend_image(TOY, [0, 5], ignore=True)
    assert with_ignore.shape[0] == plain.shape[0] + 18  # one more row of swatch + gap
    # The third swatch's inside is the ignore colour.
    assert tuple(with_ignore[4 + 2 * 18 + 7, 4 + 7]) == drawn


def test_preview_grid_legend_shows_ignore_only_when_a_map_has_it():
    ids = np.zeros((16, 16), dtype=np.int64)
    without = preview_grid([ids], TOY)
    ids[4:8, 4:8] = TOY.ignore_index
    with_ignore = preview_grid([ids], TOY)
    # One more legend entry (a row or, for a short grid, a column): the picture grows.
    assert with_ignore.shape[0] * with_ignore.shape[1] > without.shape[0] * without.shape[1]
    assert np.array_equal(preview_grid([ids], TOY, legend=False), with_ignore[:20, :20])


def test_text_is_wrapped_to_the_width_and_legible_sizes():
    narrow = text_block("a town street on a sunny day with three trees and two cars", 120)
    wide = text_block("a town street on a sunny day with three trees and two cars", 600)
    assert narrow.shape[1] == 120 and narrow.shape[0] > wide.shape[0]
    header = header_strip([("segmentation of the sample", 0, 60)], 60)
    assert header.shape[0] > header_strip([("layout", 0, 60)], 60).shape[0]  # wrapped onto more lines
    # Glyphs of the body text are at least ~8 pixels tall (legible at 100 %).
    rows = np.where((wide != 255).any(axis=(1, 2)))[0]
    assert rows.max() - rows.min() >= 8
