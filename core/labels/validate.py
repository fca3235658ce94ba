"""Checks that a label map's ids fit a label set, with messages that say which id and where."""

from __future__ import annotations

import numpy as np

from ..errors import LabelMapError
from .labelset import LabelSet

__all__ = ["check_ids"]


def check_ids(ids: np.ndarray, label_set: LabelSet, source: str = "label map") -> np.ndarray:
    """Return ``ids`` as int64 after checking every value is a class id or the ignore id.

    Args:
        ids (`np.ndarray`): `(..., H, W)` integer ids.
        label_set (`LabelSet`): the classes the ids must index.
        source (`str`): where the ids came from, for the message.

    Raises:
        LabelMapError: for a non-integer array or an out-of-range id; the message names the first bad id, its
            position, how many pixels are bad and the valid range.
    """
    arr = np.asarray(ids)
    if arr.dtype.kind == "b" or arr.dtype.kind not in "iu":
        if arr.dtype.kind == "f" and arr.size and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise LabelMapError(f"{source}: class ids must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    bad = (arr < 0) | ((arr >= label_set.num_classes) & (arr != label_set.ignore_index))
    if bad.any():
        where = np.argwhere(bad)
        first = tuple(int(v) for v in where[0])
        value = int(arr[first])
        pos = f"(row {first[-2]}, col {first[-1]})" if arr.ndim >= 2 else f"index {first}"
        if arr.ndim > 2:
            pos = f"batch index {first[:-2]}, {pos}"
        values = np.unique(arr[bad])
        listed = ", ".join(str(v) for v in values[:8].tolist()) + (", ..." if len(values) > 8 else "")
        raise LabelMapError(
            f"{source}: id {value} at {pos} is out of range for label set {label_set.name!r} "
            f"({label_set.num_classes} classes: ids 0..{label_set.num_classes - 1}, ignore {label_set.ignore_index}); "
            f"{int(bad.sum())} pixel(s) are out of range, with ids [{listed}]. If these are raw dataset ids, "
            f"read the map with the label set's remap; otherwise pick the label set the map was made for."
        )
    return arr
