"""Reading and writing label maps: id PNGs (L, P, I;16), colour PNGs through a palette, and .npy arrays.

Id maps are written as palette-mode PNGs so any image viewer shows the label colours while the pixel values
stay the class ids; sets with more than 256 ids fall back to 16-bit greyscale PNGs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import LabelMapError
from ..files import atomic_path
from ..image_files import check_pixel_count, open_image
from .colors import ColorDecodeReport, decode_colors
from .labelset import LabelSet
from .validate import check_ids

__all__ = ["LabelMapRead", "load_label_map", "read_label_map", "save_label_map"]

_ID_MODES = ("L", "P", "I;16", "I;16B", "I;16L", "I")


@dataclass(frozen=True)
class LabelMapRead:
    """The result of reading a label map.

    Args:
        ids (`np.ndarray`): `(H, W)` int64 class ids with the ignore id.
        kind (`str`): ``"ids"`` (an id PNG or array) or ``"colors"`` (decoded through the palette).
        report (`ColorDecodeReport`, *optional*): the colour decoding report, for colour maps.
    """

    ids: np.ndarray
    kind: str
    report: ColorDecodeReport | None = None


def _open_image(path: Path):
    from PIL import UnidentifiedImageError

    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise LabelMapError(f"label map {str(path)!r} does not exist") from None
    if path.is_dir():
        raise LabelMapError(f"label map {str(path)!r} is a folder, not an image file")
    if size == 0:
        raise LabelMapError(f"label map {str(path)!r} is empty (0 bytes)")
    source = f"label map {str(path)!r}"
    try:
        img = open_image(path, source, error=LabelMapError)  # the pixel limit, before any pixel is decoded
        img.load()
    except LabelMapError:
        raise
    except IsADirectoryError:
        raise LabelMapError(f"{source} is a folder, not an image file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise LabelMapError(f"{source} is not a readable image ({size} bytes): {e}") from None
    return img


def _read_npy(path: Path) -> np.ndarray:
    source = f"label map {str(path)!r}"
    try:
        if path.stat().st_size == 0:
            raise LabelMapError(f"{source} is empty (0 bytes)")
        # A memory map reads only the header: shape and dtype are checked before the array is read.
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise LabelMapError(f"{source} does not exist") from None
    except LabelMapError:
        raise
    except (ValueError, OSError, EOFError) as e:
        raise LabelMapError(f"{source} is not a readable .npy array: {e}") from None
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise LabelMapError(f"{source}: a .npy label map must be 2-D (H, W) class ids, got shape {tuple(arr.shape)}")
    check_pixel_count(arr.shape[0], arr.shape[1], source, error=LabelMapError)
    try:
        arr = np.array(arr)
    except (ValueError, OSError) as e:
        raise LabelMapError(f"{source} is not a readable .npy array: {e}") from None
    return _integer_ids(arr, source)


# The largest id a label map may hold before conversion to int64 (ids are 0..65535 plus -1 for raw Cityscapes maps).
_MAX_ID_MAGNITUDE = 2**31


def _first_pixel(mask: np.ndarray) -> str:
    y, x = (int(v[0]) for v in np.nonzero(mask))
    return f"pixel (y={y}, x={x})"


def _integer_ids(arr: np.ndarray, source: str) -> np.ndarray:
    """Check that an array holds class ids and return it as int64.

    Integer arrays are taken as they are. Float arrays are accepted only when every value is a whole number
    (``7.0``; what a float tensor saved with ``np.save`` holds); a fraction (``6.7``), NaN or infinity is refused
    with the pixel, since casting would silently truncate it (6.7 -> 6) or make it -9223372036854775808. Booleans,
    complex numbers, strings and records are refused: they are not class ids.
    """
    kind = arr.dtype.kind
    if kind == "b":
        raise LabelMapError(
            f"{source} holds booleans (dtype bool), not class ids; save integer ids, e.g. mask.astype(np.uint8)"
        )
    if kind in "iu":
        if arr.size and kind == "u" and arr.dtype.itemsize == 8 and int(arr.max()) >= _MAX_ID_MAGNITUDE:
            raise LabelMapError(f"{source} holds id {int(arr.max())}, far beyond any class id (0..65535)")
        return arr.astype(np.int64)
    if kind != "f":
        raise LabelMapError(f"{source} has dtype {arr.dtype}, not integer class ids; save an integer array")
    nan, inf = np.isnan(arr), np.isinf(arr)
    if nan.any():
        raise LabelMapError(
            f"{source} holds NaN at {_first_pixel(nan)} ({int(nan.sum())} pixels); a label map holds integer class ids"
        )
    if inf.any():
        raise LabelMapError(
            f"{source} holds infinity at {_first_pixel(inf)} ({int(inf.sum())} pixels); "
            f"a label map holds integer class ids"
        )
    fraction = arr != np.round(arr)
    if fraction.any():
        at = tuple(int(v[0]) for v in np.nonzero(fraction))
        raise LabelMapError(
            f"{source} holds {float(arr[at]):g} at {_first_pixel(fraction)} ({int(fraction.sum())} pixels are not "
            f"whole numbers); class ids are integers: round or fix the map and save it as integers"
        )
    huge = np.abs(arr) >= _MAX_ID_MAGNITUDE
    if huge.any():
        at = tuple(int(v[0]) for v in np.nonzero(huge))
        raise LabelMapError(f"{source} holds {float(arr[at]):g} at {_first_pixel(huge)}, far beyond any class id")
    return arr.astype(np.int64)


def read_label_map(
    path: str | os.PathLike,
    label_set: LabelSet | None = None,
    *,
    mode: str = "auto",
    apply_remap: bool = False,
    tolerance: float = 0.0,
    unknown: str = "error",
    max_unknown_fraction: float = 0.0,
) -> LabelMapRead:
    """Read a label map file.

    Args:
        path (`str` or `os.PathLike`): a PNG (or other image PIL reads) or a ``.npy`` array.
        label_set (`LabelSet`, *optional*): required for colour maps and for ``apply_remap``; when given, ids are
            checked against it.
        mode (`str`, defaults to ``"auto"``): ``"ids"`` reads pixel values as ids, ``"colors"`` decodes RGB
            through the palette; ``"auto"`` picks ids for 1-channel and palette-mode images and ``.npy``, colours
            for RGB images.
        apply_remap (`bool`, defaults to False): the file holds raw dataset ids (e.g. Cityscapes labelIds); map
            them through the label set's remap.
        tolerance, unknown, max_unknown_fraction: colour snapping settings, see `decode_colors`.

    Returns:
        `LabelMapRead` with ids `(H, W)` int64.

    Raises:
        LabelMapError: missing, empty or corrupt file; wrong channel count (RGBA, LA, 2 channels); ids out of
            range; unknown colours (unless mapped to ignore).
    """
    if mode not in ("auto", "ids", "colors"):
        raise ValueError(f"mode={mode!r} is not valid; use 'auto', 'ids' or 'colors'")
    path = Path(path)
    source = f"label map {str(path)!r}"
    if path.suffix.lower() == ".npy":
        if mode == "colors":
            raise LabelMapError(f"{source}: .npy label maps hold class ids; mode='colors' needs an RGB image")
        raw = _read_npy(path)
        kind = "ids"
    else:
        img = _open_image(path)
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info and mode == "colors"):
            bands = len(img.getbands()) if img.mode != "P" else 4
            raise LabelMapError(
                f"{source} has {bands} channels (mode {img.mode}, with alpha); a label map needs 1 channel of "
                f"class ids or 3 channels of palette colours. Save it without the alpha channel (as RGB or greyscale)."
            )
        if img.mode == "1" or img.mode not in _ID_MODES + ("RGB",):
            raise LabelMapError(
                f"{source} has image mode {img.mode} ({len(img.getbands())} channels); label maps must be 1-channel "
                f"ids (L, P, I;16) or 3-channel RGB colours"
            )
        use_colors = mode == "colors" or (mode == "auto" and img.mode == "RGB")
        if use_colors:
            if label_set is None:
                raise LabelMapError(f"{source} is a colour image; pass the label set whose palette it uses")
            rgb = np.asarray(img.convert("RGB"))
            with _lossy_hint(img):
                ids, report = decode_colors(
                    rgb,
                    label_set,
                    tolerance=tolerance,
                    unknown=unknown,
                    max_unknown_fraction=max_unknown_fraction,
                    source=source,
                )
            if apply_remap:
                raise LabelMapError(f"{source}: apply_remap is for raw id maps, not colour maps")
            return LabelMapRead(ids=ids, kind="colors", report=report)
        if img.mode == "RGB":
            raise LabelMapError(f"{source} is an RGB image; mode='ids' needs a 1-channel or palette-mode image")
        raw = np.asarray(img)
        kind = "ids"
    ids = raw.astype(np.int64, copy=False)
    if apply_remap:
        if label_set is None:
            raise LabelMapError(f"{source}: apply_remap needs the label set that defines the remap")
        lut = label_set.remap_lut()
        outside = (ids < -1) | (ids >= len(lut) - 1)
        ids = np.where(outside, label_set.ignore_index, lut[np.clip(ids, -1, len(lut) - 2)])
    if label_set is not None:
        with _lossy_hint(img if path.suffix.lower() != ".npy" else None):
            ids = check_ids(ids, label_set, source=source)
    return LabelMapRead(ids=ids, kind=kind)


@contextmanager
def _lossy_hint(img) -> Iterator[None]:
    """Add to a `LabelMapError` about ids or colours that a JPEG file cannot hold a label map: its lossy compression
    blurs the edges between regions into ids and colours that no class has."""
    try:
        yield
    except LabelMapError as e:
        if img is None or getattr(img, "format", None) != "JPEG":
            raise
        raise LabelMapError(
            f"{e} The file is a JPEG: its lossy compression changes the pixel values at region edges, so it cannot "
            "hold a label map; save label maps as PNG (or .npy)."
        ) from None


def load_label_map(path: str | os.PathLike, label_set: LabelSet | None = None, **kwargs) -> np.ndarray:
    """Shortcut for ``read_label_map(...).ids``: `(H, W)` int64 class ids."""
    return read_label_map(path, label_set, **kwargs).ids


def save_label_map(path: str | os.PathLike, ids: np.ndarray, label_set: LabelSet) -> Path:
    """Write class ids as a palette-mode PNG (or ``.npy``), checked against the label set.

    Args:
        path (`str` or `os.PathLike`): ``.png`` or ``.npy``.
        ids (`np.ndarray`): `(H, W)` integer class ids with the label set's ignore id.
        label_set (`LabelSet`): palette and valid range. The ignore id is shown black.

    Ids up to 255 go into a palette PNG whose colours are the label set's palette; larger ids (sets of more than
    255 classes, or an ignore id above 255) go into a 16-bit greyscale PNG.
    """
    from PIL import Image

    path = Path(path)
    arr = check_ids(ids, label_set, source=f"label map for {str(path)!r}")
    if arr.ndim != 2:
        raise LabelMapError(f"cannot save {str(path)!r}: a label map must be 2-D (H, W), got shape {tuple(arr.shape)}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, arr.astype(np.int64))
        return path
    if suffix != ".png":
        raise LabelMapError(f"cannot save label map to {str(path)!r}: use a .png or .npy file name")
    if max(label_set.num_classes - 1, label_set.ignore_index) <= 255:
        img = Image.fromarray(arr.astype(np.uint8), mode="P")
        pal = np.zeros((256, 3), dtype=np.uint8)
        pal[: label_set.num_classes] = label_set.palette
        img.putpalette(pal.reshape(-1).tolist())
    else:
        img = Image.fromarray(arr.astype(np.uint16))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path
