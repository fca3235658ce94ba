"""Colour maps <-> class ids: palette lookup with nearest-colour snapping and a report of unknown colours.

Colour-coded label maps come from painting programs and from segmentation preprocessors; anti-aliased edges and
JPEG-like artefacts produce colours that are near, but not in, the palette. Decoding snaps each distinct colour
to the nearest palette colour when it lies within ``tolerance`` (Euclidean distance in RGB), and reports every
colour it cannot place: the colour, its pixel count and where it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import LabelMapError
from ..logging import get_logger, warn_once
from .labelset import LabelSet

__all__ = ["ColorDecodeReport", "UnknownColor", "colorize", "decode_colors"]

logger = get_logger(__name__)


@dataclass(frozen=True)
class UnknownColor:
    """A colour that matched no class.

    Args:
        color (`tuple[int, int, int]`): the RGB value.
        pixels (`int`): how many pixels have it.
        first (`tuple[int, int]`): (row, column) of its first pixel in reading order.
        bbox (`tuple[int, int, int, int]`): (top, left, bottom, right) inclusive bounding box of its pixels.
        nearest (`str`): name of the nearest palette class, and ``distance`` its RGB distance.
    """

    color: tuple[int, int, int]
    pixels: int
    first: tuple[int, int]
    bbox: tuple[int, int, int, int]
    nearest: str
    distance: float

    def describe(self) -> str:
        return (
            f"colour {list(self.color)}: {self.pixels} px, first at (row {self.first[0]}, col {self.first[1]}), "
            f"box rows {self.bbox[0]}..{self.bbox[2]} cols {self.bbox[1]}..{self.bbox[3]}; nearest class "
            f"{self.nearest!r} at distance {self.distance:.1f}"
        )


@dataclass(frozen=True)
class ColorDecodeReport:
    """What colour decoding did.

    Args:
        total_pixels (`int`): pixels in the map.
        exact_pixels (`int`): pixels whose colour is a palette (or alias) colour.
        snapped_pixels (`int`): pixels snapped to a palette colour within the tolerance.
        unknown (`list[UnknownColor]`): colours farther than the tolerance from every palette colour, most
            frequent first; their pixels became the ignore id (when allowed).
        aliased (`dict`): shared colour -> the class it was decoded to, for shared palette colours seen.
    """

    total_pixels: int
    exact_pixels: int
    snapped_pixels: int
    unknown: list[UnknownColor] = field(default_factory=list)
    aliased: dict[tuple[int, int, int], str] = field(default_factory=dict)

    @property
    def unknown_pixels(self) -> int:
        return sum(u.pixels for u in self.unknown)

    @property
    def unknown_fraction(self) -> float:
        return self.unknown_pixels / max(self.total_pixels, 1)

    def summary(self, limit: int = 8) -> str:
        lines = [
            f"{self.total_pixels} px: {self.exact_pixels} exact, {self.snapped_pixels} snapped, "
            f"{self.unknown_pixels} unknown ({100 * self.unknown_fraction:.2f}%)"
        ]
        lines += [f"  {u.describe()}" for u in self.unknown[:limit]]
        if len(self.unknown) > limit:
            lines.append(f"  ... and {len(self.unknown) - limit} more unknown colours")
        return "\n".join(lines)


def _pack(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def decode_colors(
    rgb: np.ndarray,
    label_set: LabelSet,
    *,
    tolerance: float = 0.0,
    unknown: str = "error",
    max_unknown_fraction: float = 0.0,
    ignore_color: tuple[int, int, int] | None = (0, 0, 0),
    source: str = "colour map",
) -> tuple[np.ndarray, ColorDecodeReport]:
    """Turn an RGB colour map into class ids.

    Args:
        rgb (`np.ndarray`): `(H, W, 3)` uint8 colour map.
        label_set (`LabelSet`): whose palette (and colour aliases) define the colours.
        tolerance (`float`, defaults to 0): colours within this RGB distance of a palette colour snap to it
            (0 = exact colours only; 10-30 absorbs anti-aliasing and mild compression).
        unknown (`str`, defaults to ``"error"``): what to do with colours beyond the tolerance. ``"error"``
            raises `LabelMapError` when their share exceeds ``max_unknown_fraction``, otherwise they become the
            ignore id; ``"ignore"`` always maps them to the ignore id.
        max_unknown_fraction (`float`, defaults to 0): allowed share of unknown pixels with ``unknown="error"``.
        ignore_color (`tuple[int, int, int]` or None, defaults to black): the colour `colorize` gives ignore
            pixels; it decodes to the ignore id unless the palette or an alias gives it to a class. None: no such
            colour.
        source (`str`): where the map came from, used in messages.

    Returns:
        `(ids, report)`: ids `(H, W)` int64 with the label set's ignore id for unknown pixels, and a
        `ColorDecodeReport`.
    """
    if unknown not in ("error", "ignore"):
        raise ValueError(f"unknown={unknown!r} is not valid; use 'error' or 'ignore'")
    if tolerance < 0:
        raise ValueError(f"tolerance={tolerance} must be >= 0 (an RGB distance)")
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise LabelMapError(f"{source}: a colour map must have shape (H, W, 3), got {tuple(rgb.shape)}")
    height, width = rgb.shape[:2]
    codes, inverse = np.unique(_pack(rgb).reshape(-1), return_inverse=True)
    counts = np.bincount(inverse, minlength=len(codes))
    table = label_set.color_table()
    if ignore_color is not None:
        table.setdefault(tuple(int(v) for v in ignore_color), label_set.ignore_index)
    table_codes = np.array([(c[0] << 16) | (c[1] << 8) | c[2] for c in table], dtype=np.int64)
    table_ids = np.array(list(table.values()), dtype=np.int64)
    table_rgb = np.array(list(table.keys()), dtype=np.float64)

    shared = label_set.shared_colors()
    code_to_id = np.full(len(codes), label_set.ignore_index, dtype=np.int64)
    exact = snapped = 0
    unknown_codes: list[int] = []
    nearest_info: dict[int, tuple[str, float]] = {}
    aliased: dict[tuple[int, int, int], str] = {}
    for k, code in enumerate(codes.tolist()):
        color = ((code >> 16) & 255, (code >> 8) & 255, code & 255)
        hit = np.nonzero(table_codes == code)[0]
        if len(hit):
            code_to_id[k] = table_ids[hit[0]]
            exact += int(counts[k])
            if color in shared:
                target = label_set.names[int(table_ids[hit[0]])]
                aliased[color] = target
                others = ", ".join(label_set.names[i] for i in shared[color])
                warn_once(
                    logger,
                    f"alias:{label_set.name}:{color}",
                    f"{source}: colour {list(color)} is shared by classes ({others}) in label set "
                    f"{label_set.name!r}; decoding it as {target!r} as the label set declares",
                )
            continue
        dist = np.sqrt(((table_rgb - np.array(color, dtype=np.float64)) ** 2).sum(axis=1))
        j = int(np.argmin(dist))
        target_id = int(table_ids[j])
        nearest_name = "ignore" if target_id == label_set.ignore_index else label_set.names[target_id]
        if dist[j] <= tolerance:
            code_to_id[k] = target_id
            snapped += int(counts[k])
        else:
            unknown_codes.append(k)
            nearest_info[k] = (nearest_name, float(dist[j]))

    unknown_list: list[UnknownColor] = []
    if unknown_codes:
        inv2d = inverse.reshape(height, width)
        for k in sorted(unknown_codes, key=lambda k: -counts[k]):
            rows, cols = np.nonzero(inv2d == k)
            code = int(codes[k])
            unknown_list.append(
                UnknownColor(
                    color=((code >> 16) & 255, (code >> 8) & 255, code & 255),
                    pixels=int(counts[k]),
                    first=(int(rows[0]), int(cols[0])),
                    bbox=(int(rows.min()), int(cols.min()), int(rows.max()), int(cols.max())),
                    nearest=nearest_info[k][0],
                    distance=nearest_info[k][1],
                )
            )
    report = ColorDecodeReport(
        total_pixels=height * width,
        exact_pixels=exact,
        snapped_pixels=snapped,
        unknown=unknown_list,
        aliased=aliased,
    )
    if unknown_list:
        if unknown == "error" and report.unknown_fraction > max_unknown_fraction:
            raise LabelMapError(
                f"{source}: {len(unknown_list)} colour(s) are not in label set {label_set.name!r} "
                f"(tolerance {tolerance}); {report.summary()}\n"
                f"Fix: raise the snapping tolerance, repaint those regions with palette colours, or map unknown "
                f"colours to ignore (unknown='ignore')."
            )
        logger.warning("%s: %d unknown pixel(s) mapped to ignore\n%s", source, report.unknown_pixels, report.summary())
    ids = code_to_id[inverse].reshape(height, width)
    return ids, report


def colorize(ids: np.ndarray, label_set: LabelSet, ignore_color: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    """Class ids -> RGB colours.

    Args:
        ids (`np.ndarray`): `(..., H, W)` integer ids (class ids or the ignore id).
        label_set (`LabelSet`): the palette.
        ignore_color (`tuple[int, int, int]`, defaults to black): colour of ignore pixels.

    Returns:
        `np.ndarray`: `(..., H, W, 3)` uint8.
    """
    from .validate import check_ids

    ids = check_ids(ids, label_set)
    lut = np.zeros((max(label_set.num_classes, label_set.ignore_index + 1), 3), dtype=np.uint8)
    lut[: label_set.num_classes] = label_set.palette
    lut[label_set.ignore_index] = ignore_color
    return lut[ids]
