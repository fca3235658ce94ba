"""Stand-in for ``comfy_api.latest`` (ComfyUI 0.8.0): ``ComfyExtension``, ``io``/``IO`` and ``ui``/``UI``."""

from __future__ import annotations

from abc import ABC, abstractmethod

from . import _io as io
from . import _ui as ui


class ComfyExtension(ABC):
    async def on_load(self) -> None:  # noqa: B027 - optional hook, as in ComfyUI
        """Called when the extension is loaded."""

    @abstractmethod
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        """The node classes this extension provides."""


IO = io
UI = ui

__all__ = ["IO", "UI", "ComfyExtension", "io", "ui"]
