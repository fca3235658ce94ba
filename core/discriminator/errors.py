"""The error the discriminator package raises for bad user input (a ``ValueError``, like the rest of the pack)."""

from __future__ import annotations

__all__ = ["DiscriminatorError"]


class DiscriminatorError(ValueError):
    """A discriminator cannot be built as asked: unknown backbone, unreadable folder, head without class names,
    a name table that does not fit the label sets, bad input normalisation."""
