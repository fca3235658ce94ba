"""Errors the pack raises for bad user input.

They subclass ``ValueError`` so callers that already catch ``ValueError`` keep working; the message always says
what is wrong, where (file, pixel, entry) and what would fix it.
"""

from __future__ import annotations


class LabelSetError(ValueError):
    """A label set definition is invalid (duplicate names or colours, bad remap, malformed file)."""


class LabelMapError(ValueError):
    """A label map cannot be read or does not fit its label set (unknown colours, ids out of range, bad file)."""
