"""The ``layout2image`` logger tree.

Every module logs through ``get_logger(__name__)`` so users can silence or raise the whole pack with one
``logging.getLogger("layout2image")``. ``warn_once`` exists because some warnings (a decoded colour alias,
a deprecated option) would otherwise repeat once per pixel batch.
"""

from __future__ import annotations

import logging

_ROOT = "layout2image"
_warned: set[str] = set()


def get_logger(name: str) -> logging.Logger:
    """Return a logger below the ``layout2image`` tree, whatever package name the checkout was imported under.

    Args:
        name (`str`): usually ``__name__``; inside ComfyUI that is ``<folder>.core.x``, so the part before the
            first subpackage is replaced by ``layout2image``.
    """
    parts = name.split(".")
    for anchor in ("core", "weights", "trainer", "nodes", "cli"):
        if anchor in parts:
            parts = [_ROOT] + parts[parts.index(anchor) :]
            break
    else:
        parts = [_ROOT] + [p for p in parts if p != _ROOT]
    return logging.getLogger(".".join(parts))


def warn_once(logger: logging.Logger, key: str, message: str) -> None:
    """Log ``message`` as a warning the first time ``key`` is seen in this process."""
    if key in _warned:
        return
    _warned.add(key)
    logger.warning(message)


def reset_warn_once() -> None:
    """Forget which warnings were given (tests use this to check that a warning appears)."""
    _warned.clear()
