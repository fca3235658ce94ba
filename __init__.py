"""layout2image: layout-to-image synthesis (ALDM ControlNets, SDM-LoRA with SPADE) for Stable Diffusion.

This file is also the ComfyUI entry point. ComfyUI imports the folder as a package and calls
``comfy_entrypoint``; the node modules (and therefore ComfyUI's own modules) are imported only then, so
``import layout2image`` works without ComfyUI. No ``NODE_CLASS_MAPPINGS`` is defined on purpose: ComfyUI would
then skip the V3 entry point.
"""

__version__ = "0.1.0"


async def comfy_entrypoint():
    """Return the ComfyUI V3 extension (imported lazily: ComfyUI must be importable when this runs)."""
    from .nodes import build_extension

    return build_extension()
