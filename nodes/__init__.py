"""ComfyUI nodes: thin adapters from ComfyUI types to ``core`` and ``weights``.

Only imported by ``comfy_entrypoint`` (the package root), i.e. inside a running ComfyUI. Node modules are listed
in ``NODE_MODULES``; each exposes ``NODES``, a list of ``io.ComfyNode`` classes.
"""

from __future__ import annotations

import importlib

NODE_MODULES: tuple[str, ...] = ("label_maps", "controlnet", "sdm_lora", "spade", "guidance", "alignment", "toy")


def node_classes() -> list[type]:
    """All node classes of the pack, in menu order."""
    classes: list[type] = []
    for name in NODE_MODULES:
        classes.extend(importlib.import_module(f".{name}", __name__).NODES)
    return classes


def build_extension():
    """The ``ComfyExtension`` that ComfyUI's V3 loader asks for."""
    try:
        from comfy_api.latest import ComfyExtension
    except ImportError as e:  # pragma: no cover - only inside a ComfyUI too old for the V3 API
        raise ImportError("layout2image needs ComfyUI's V3 node API (comfy_api.latest); please update ComfyUI") from e

    class LayoutToImageExtension(ComfyExtension):
        async def get_node_list(self) -> list[type]:
            return node_classes()

    return LayoutToImageExtension()
