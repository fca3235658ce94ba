"""Layout ControlNet nodes: a loader for the stock formats and the ALDM-native one, and an apply node that encodes a
label map as the hint the file was trained with.

The nodes only adapt ComfyUI's inputs; building the ControlNet (ComfyUI's ``cldm.ControlNet``, ALDM's hint block
swapped in), the hint encoding and the apply logic are in `nodes.control_aldm`, whose public names are re-exported
here.
"""

from __future__ import annotations

from pathlib import Path

from comfy_api.latest import io

from ..core.hints import DEFAULT_TEMPLATE
from ..core.labels import LabelSet, get_label_set
from ..weights import KNOWN_FORMATS
from .control_aldm import (
    APPLY_NAME,
    COMFY_HINT_WIDTHS,
    LAYOUT_HINT_ATTR,
    LOADER_NAME,
    TABLE_SOURCES,
    ComfyALDMHintBlock,
    ControlNetLoadError,
    LayoutHint,
    apply_layout_controlnet,
    clip_encode_fn,
    layout_hint_of,
    load_layout_controlnet,
)
from .model_files import model_file_options, no_file_entry, resolve_model_path
from .types import LabelMap, LabelMapType, LabelSetType

__all__ = [
    "APPLY_NAME",
    "COMFY_HINT_WIDTHS",
    "LAYOUT_HINT_ATTR",
    "LOADER_NAME",
    "NODES",
    "TABLE_SOURCES",
    "ComfyALDMHintBlock",
    "ControlNetLoadError",
    "L2IALDMControlNetLoader",
    "L2IApplyALDMControlNet",
    "LayoutHint",
    "apply_layout_controlnet",
    "clip_encode_fn",
    "layout_hint_of",
    "load_layout_controlnet",
]

CATEGORY = "layout2image/controlnet"
#: Combo entry shown when the controlnet folder holds no file (the `path` input is then required).
NO_FILE = no_file_entry("controlnet")
_TABLE_SUFFIX = ".table.safetensors"


def _controlnet_files() -> list[str]:
    return model_file_options("controlnet", _TABLE_SUFFIX)


def _resolve_path(controlnet_name: str, path: str) -> Path:
    return resolve_model_path(
        "controlnet",
        controlnet_name,
        path,
        error=ControlNetLoadError,
        kind="ControlNet",
        name_input="controlnet_name",
        folder_allowed=True,
        wanted="a ControlNet file or diffusers folder",
    )


class L2IALDMControlNetLoader(io.ComfyNode):
    """Load a layout ControlNet: stock palette-RGB / one-hot files, or ALDM-native class-embedding files."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="L2IALDMControlNetLoader",
            display_name=LOADER_NAME,
            category=CATEGORY,
            description=(
                "Loads a layout ControlNet from models/controlnet: SD-style files with a palette-RGB or one-hot hint "
                "(through ComfyUI's own loader) and ALDM-native files whose hint is a class-embedding map at 1/4 "
                "size (their table from the companion <name>.table.safetensors, or built from class names by "
                "CLIP). The format is read from the weights; the label set and hint encoding from the metadata. "
                f"Apply it with '{APPLY_NAME}'. Known formats: " + " | ".join(KNOWN_FORMATS)
            ),
            inputs=[
                io.Combo.Input(
                    "controlnet_name",
                    options=_controlnet_files(),
                    tooltip="A ControlNet file in ComfyUI's controlnet folders (table files are hidden).",
                ),
                io.String.Input(
                    "path",
                    default="",
                    tooltip="Optional: a ControlNet file or diffusers folder anywhere; overrides controlnet_name.",
                ),
                io.Combo.Input(
                    "table_source",
                    options=list(TABLE_SOURCES),
                    default="auto",
                    tooltip=(
                        "ALDM-native files only: the class-embedding table from the companion file, or built by the "
                        "CLIP input from class names (for any label set); 'auto' = companion if present, else CLIP."
                    ),
                ),
                io.String.Input(
                    "template",
                    default=DEFAULT_TEMPLATE,
                    tooltip="CLIP tables only: the text encoded per class; {name} is the class name.",
                ),
                io.Clip.Input(
                    "clip",
                    optional=True,
                    tooltip="CLIP tables only: the text encoder (SD 1.x's, from the checkpoint loader).",
                ),
                LabelSetType.Input(
                    "label_set",
                    optional=True,
                    tooltip=(
                        "Optional: the classes of a CLIP table (new class names work), or of a third-party file that "
                        "records none. Must match the file's own label set otherwise."
                    ),
                ),
            ],
            outputs=[
                io.ControlNet.Output("control_net", tooltip=f"The ControlNet, for '{APPLY_NAME}'."),
                LabelSetType.Output(
                    "label_set",
                    tooltip=(
                        "The classes label maps must use (palette-RGB files that record none: ADE20K, the palette of "
                        "the standard segmentation ControlNets)."
                    ),
                ),
                io.String.Output("info", tooltip="What was loaded: format, hint encoding, label set, table source."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, controlnet_name: str = "", path: str = "", **kwargs):
        """Re-run when the file changes on disk."""
        try:
            stat = _resolve_path(controlnet_name, path).stat()
        except (OSError, ControlNetLoadError):
            return (controlnet_name, path)
        return (controlnet_name, path, stat.st_mtime_ns, stat.st_size)

    @classmethod
    def execute(
        cls,
        controlnet_name: str,
        path: str = "",
        table_source: str = "auto",
        template: str = DEFAULT_TEMPLATE,
        clip=None,
        label_set: LabelSet | None = None,
    ) -> io.NodeOutput:
        control, hint = load_layout_controlnet(
            _resolve_path(controlnet_name, path),
            table_source=table_source,
            clip=clip,
            label_set=label_set,
            template=template,
        )
        labels = hint.label_set or get_label_set("ade20k")
        info = f"{Path(hint.source).name}: {hint.describe()}"
        return io.NodeOutput(control, labels, info)


class L2IApplyALDMControlNet(io.ComfyNode):
    """Apply a layout ControlNet to positive and negative conditioning with a label map as the hint."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="L2IApplyALDMControlNet",
            display_name=APPLY_NAME,
            category=CATEGORY,
            description=(
                "Like ComfyUI's Apply ControlNet (advanced), but the hint is a label map, encoded as the ControlNet "
                "was trained: class embeddings (ALDM), palette colours or one-hot. The map is resized by nearest to "
                "each latent size (any resolution) and shared by both CFG branches. Inputs are not modified."
            ),
            inputs=[
                io.Conditioning.Input("positive", tooltip="Positive conditioning."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning (gets the same layout)."),
                io.ControlNet.Input("control_net", tooltip=f"From '{LOADER_NAME}' (or a stock palette one)."),
                LabelMapType.Input(
                    "label_map",
                    tooltip="The layout; its label set must be the ControlNet's. Batch 1, or one map per latent.",
                ),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=0.0,
                    max=10.0,
                    step=0.01,
                    tooltip="Scale of the ControlNet's residuals: 0 = off, 1 = as trained.",
                ),
                io.Float.Input(
                    "start_percent",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.001,
                    tooltip="Fraction of the schedule (0 = first step) where the ControlNet starts.",
                ),
                io.Float.Input(
                    "end_percent",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.001,
                    tooltip="Fraction of the schedule (1 = last step) where the ControlNet stops.",
                ),
                io.Vae.Input(
                    "vae", optional=True, tooltip="Only for ControlNets that need a VAE (not the SD layout ones)."
                ),
            ],
            outputs=[
                io.Conditioning.Output("positive", tooltip="Positive conditioning with the ControlNet."),
                io.Conditioning.Output("negative", tooltip="Negative conditioning with the ControlNet."),
            ],
        )

    @classmethod
    def execute(
        cls,
        positive,
        negative,
        control_net,
        label_map: LabelMap,
        strength: float = 1.0,
        start_percent: float = 0.0,
        end_percent: float = 1.0,
        vae=None,
    ) -> io.NodeOutput:
        pos, neg = apply_layout_controlnet(
            positive,
            negative,
            control_net,
            label_map,
            strength=float(strength),
            start_percent=float(start_percent),
            end_percent=float(end_percent),
            vae=vae,
        )
        return io.NodeOutput(pos, neg)


NODES = [L2IALDMControlNetLoader, L2IApplyALDMControlNet]
