"""Opening user images and label maps under a pixel limit, checked before any pixel is decoded.

A PNG of a few hundred KB can declare 12000x12000 pixels; decoding it takes gigabytes and tens of seconds before
anything can say the file is unreasonable (issue 15, C17). PIL reads only the header in ``Image.open``, so the
declared size is known for free: every place the pack reads an image or a label map (``core.labels.io``, the
trainer's datasets, the CLIs) opens it through `open_image`, which refuses a size over the limit with an error that
names the file, its size, the limit and how to raise it.

The limit, in pixels (height x width), is, first found:

1. `MAX_IMAGE_PIXELS` in this module, when a program sets it (``None``: not set);
2. the environment variable ``L2I_MAX_IMAGE_PIXELS`` (a whole number; ``0`` means no limit);
3. `DEFAULT_MAX_IMAGE_PIXELS`: 8192 x 8192 = 67,108,864 pixels, four times a 4096x4096 image and well above any
   segmentation dataset we read (Cityscapes 2048x1024, ADE20K and COCO-Stuff under 4 megapixels).

PIL's own guard (``PIL.Image.MAX_IMAGE_PIXELS``, about 89 megapixels; an error above twice that) still applies on top
of ours; its error is turned into ours so the message is the same.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import IO, Any

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "ENV_MAX_IMAGE_PIXELS",
    "MAX_IMAGE_PIXELS",
    "check_pixel_count",
    "max_image_pixels",
    "open_image",
]

DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192
ENV_MAX_IMAGE_PIXELS = "L2I_MAX_IMAGE_PIXELS"
# Set by a program (or a test) to override the environment and the default; 0 means no limit.
MAX_IMAGE_PIXELS: int | None = None


def max_image_pixels() -> int | None:
    """The pixel limit in force (see the module docstring); ``None`` means no limit.

    Raises:
        ValueError: ``L2I_MAX_IMAGE_PIXELS`` is set but not a whole number >= 0.
    """
    if MAX_IMAGE_PIXELS is not None:
        limit = int(MAX_IMAGE_PIXELS)
    else:
        text = os.environ.get(ENV_MAX_IMAGE_PIXELS, "").strip().replace("_", "")
        if not text:
            return DEFAULT_MAX_IMAGE_PIXELS
        try:
            limit = int(text)
        except ValueError:
            limit = -1
        if limit < 0:
            raise ValueError(
                f"{ENV_MAX_IMAGE_PIXELS}={os.environ[ENV_MAX_IMAGE_PIXELS]!r} is not a pixel count; "
                f"set a whole number of pixels (e.g. {DEFAULT_MAX_IMAGE_PIXELS}), or 0 for no limit"
            )
    return None if limit <= 0 else limit


def _how_to_raise(pixels: int) -> str:
    return f"to allow it, set the environment variable {ENV_MAX_IMAGE_PIXELS}={pixels} or more (0: no limit)"


_SETTING: Any = object()  # "use max_image_pixels()"


def check_pixel_count(
    height: int, width: int, source: str, *, error: type[ValueError] = ValueError, limit: int | None = _SETTING
) -> None:
    """Refuse a size of more than the pixel limit.

    Args:
        height, width (`int`): the declared size.
        source (`str`): what the size belongs to, for the message, e.g. ``"label map 'a.png'"``.
        error (`type[ValueError]`, defaults to `ValueError`): the class raised (``LabelMapError``, ``DatasetError``).
        limit (`int`, *optional*): the limit to apply; by default `max_image_pixels`; ``None`` means none.

    Raises:
        error: ``height * width`` exceeds the limit, or a side is not positive.
    """
    if limit is _SETTING:
        limit = max_image_pixels()
    if height < 1 or width < 1:
        raise error(f"{source} has size {height}x{width} (HxW); both sides must be at least 1 pixel")
    pixels = int(height) * int(width)
    if limit is not None and pixels > limit:
        raise error(
            f"{source} is {height}x{width} (HxW) = {pixels:,} pixels, over the limit of {limit:,} pixels; "
            f"{_how_to_raise(pixels)}"
        )


def open_image(fp: str | os.PathLike | IO[bytes], source: str, *, error: type[ValueError] = ValueError) -> Any:
    """Open an image lazily (header only) and check its declared size against the pixel limit.

    Args:
        fp (`str`, `os.PathLike` or a binary file object): the image.
        source (`str`): names the file in messages, e.g. ``"image 'photo.jpg'"``.
        error (`type[ValueError]`, defaults to `ValueError`): the class raised for a size over the limit.

    Returns:
        `PIL.Image.Image`: opened, not decoded (call ``load()`` or ``convert()`` next).

    Raises:
        error: the declared size is over the limit (also when PIL's own guard refuses it).
        PIL.UnidentifiedImageError, OSError: not an image PIL reads (the caller words these).
    """
    from PIL import Image

    limit = max_image_pixels()
    try:
        # PIL warns (DecompressionBombWarning) between its limit and twice it; our check below decides instead.
        # catch_warnings is not thread-safe: a race can at worst leave this one warning ignored, which is harmless.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fp)
    except Image.DecompressionBombError as e:
        # PIL says "Image size (N pixels) exceeds limit of M pixels, ..."; it does not give the sides.
        found = re.search(r"\((\d+) pixels\)", str(e))
        pixels = int(found[1]) if found else None
        guard = "PIL's own guard (PIL.Image.MAX_IMAGE_PIXELS) refuses it as well"
        if pixels is not None and limit is not None and pixels > limit:
            raise error(
                f"{source} declares {pixels:,} pixels, over the limit of {limit:,} pixels; {_how_to_raise(pixels)}; "
                f"{guard}"
            ) from None
        raise error(f"{source} is refused by PIL's own pixel guard (PIL.Image.MAX_IMAGE_PIXELS): {e}") from None
    width, height = img.size
    try:
        check_pixel_count(height, width, source, error=error, limit=limit)
    except ValueError:
        img.close()
        raise
    return img
