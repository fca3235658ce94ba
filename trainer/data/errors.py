"""The error the data loaders raise for a bad dataset (missing files, size mismatches, bad caption files)."""

from __future__ import annotations

__all__ = ["DatasetError"]


class DatasetError(ValueError):
    """A dataset folder or file does not fit its format; the message names the file(s) and the fix.

    Ids out of range in a label map raise `layout2image.core.errors.LabelMapError` instead (from
    `read_label_map`), which also names the file.
    """
