"""Load an SDM-LoRA: the kohya LoRA through ComfyUI's own LoRA machinery, plus its SPADE companion.

An SDM-LoRA is two files (``weights.spade_file``): ``<name>.safetensors``, a kohya LoRA that any LoRA loader reads,
and ``<name>.spade.safetensors``, the SPADE modules. This node

1. reads the LoRA once (``weights.load_lora_file``: safetensors only, our metadata validated; a PEFT file is turned
   into kohya names first, since ComfyUI drops SD 1.x PEFT attention keys), checks that every LoRA module has a
   target in the MODEL (ComfyUI's own ``comfy.lora.model_lora_keys_unet``; a LoRA for another base model fails
   here with the modules named instead of half-loading with "lora key not loaded" warnings), and applies it with
   ``comfy.sd.load_lora_for_models`` on clones (the inputs are untouched);
2. reads the companion with Apply SPADE's reader (`nodes.spade.load_spade_weights`) and checks its sites against
   the MODEL's UNet (`nodes.spade.comfy_site_paths`), returning it on an ``L2I_SPADE`` socket for Apply SPADE,
   which patches the GroupNorms with a label map.
"""

from __future__ import annotations

import math
from pathlib import Path

from comfy_api.latest import io

from ..core.labels import LabelSet
from ..core.logging import get_logger
from ..weights import SPADE_SUFFIX, convert_lora_state_dict, load_lora_file, spade_path_for
from ..weights.metadata import describe_label_set
from .model_files import model_file_options, no_file_entry, resolve_model_path
from .spade import SpadeType, SpadeWeights, comfy_site_paths, load_spade_weights
from .types import LabelSetType

__all__ = ["NODES", "L2ISDMLoraLoader", "SDMLoraError", "load_sdm_lora_for_models"]

logger = get_logger(__name__)

CATEGORY = "layout2image/sdm"
LOADER_NAME = "Load SDM-LoRA (LoRA + SPADE)"
NO_FILE = no_file_entry("loras")


class SDMLoraError(ValueError):
    """An SDM-LoRA cannot be loaded into the given MODEL."""


def _lora_modules(state_dict) -> list[str]:
    return sorted({k[: -len(".lora_down.weight")] for k in state_dict if k.endswith(".lora_down.weight")})


def load_sdm_lora_for_models(model, clip, lora_path: str | Path, strength: float = 1.0):
    """Apply an SDM-LoRA's LoRA part to clones of ``model`` (and ``clip``) and load its SPADE part.

    Args:
        model (`ModelPatcher`): the SD 1.x MODEL; not modified.
        clip (ComfyUI ``CLIP``, *optional*): patched too when the LoRA has text-encoder keys; not modified.
        lora_path (`str` or `Path`): ``<name>.safetensors``; ``<name>.spade.safetensors`` must sit beside it.
        strength (`float`): LoRA strength (0: the inputs come back, the SPADE part is still loaded).

    Returns:
        `tuple`: ``(model, clip, spade_weights)``; ``clip`` is None when none was given.

    Raises:
        SDMLoraError: missing companion, modules or SPADE sites the MODEL lacks (named in the message).
        WeightsError, MetadataError: unreadable or inconsistent files.
    """
    import comfy.lora
    import comfy.sd

    if not math.isfinite(strength):
        raise SDMLoraError(f"`strength` must be finite, got {strength!r}")
    lora_path = Path(lora_path)
    if lora_path.name.endswith(SPADE_SUFFIX):
        raise SDMLoraError(
            f"{lora_path.name!r} is the SPADE companion; choose the LoRA file {lora_path.name[: -len(SPADE_SUFFIX)]}"
            ".safetensors (the companion is found beside it)"
        )
    spade_path = spade_path_for(lora_path)
    if not spade_path.is_file():
        raise SDMLoraError(
            f"no SPADE companion {spade_path.name!r} beside {str(lora_path)!r}: this node loads SDM-LoRAs (LoRA + "
            "SPADE file); for a plain LoRA use ComfyUI's Load LoRA"
        )
    lora = load_lora_file(lora_path)
    state_dict = lora.state_dict
    if lora.format == "peft":
        state_dict = convert_lora_state_dict(
            state_dict, "kohya", unet_config=lora.unet_config, alpha=lora.alpha
        ).state_dict
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    missing = [m for m in _lora_modules(state_dict) if m not in key_map]
    if missing:
        base = lora.metadata.base_model if lora.metadata is not None and lora.metadata.base_model else "not recorded"
        raise SDMLoraError(
            f"{lora_path.name}: {len(missing)} LoRA module(s) have no target in the MODEL, e.g. {missing[:3]}; the "
            f"LoRA was trained for another base model (the file's base model: {base})"
        )
    spade = load_spade_weights(spade_path)
    comfy_site_paths(model.get_model_object("diffusion_model"), spade.adapter.site_names)  # raises on other UNets
    if strength == 0:
        return model, clip, spade
    new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, state_dict, strength, strength)
    logger.info(
        "Loaded SDM-LoRA %s (%d modules, strength %g) and %d SPADE sites from %s",
        lora_path.name,
        len(_lora_modules(state_dict)),
        strength,
        len(spade.adapter.site_names),
        spade_path.name,
    )
    return new_model, new_clip, spade


def _lora_files() -> list[str]:
    return model_file_options("loras", SPADE_SUFFIX)


def _resolve_path(lora_name: str, path: str) -> Path:
    return resolve_model_path(
        "loras",
        lora_name,
        path,
        error=SDMLoraError,
        kind="SDM-LoRA",
        name_input="lora_name",
        folder_allowed=False,
        wanted="the SDM-LoRA's <name>.safetensors",
    )


def _describe(spade: SpadeWeights) -> str:
    labels = "no label set recorded" if spade.label_set is None else describe_label_set(spade.label_set)
    return f"SPADE: {len(spade.adapter.site_names)} GroupNorm sites, {spade.encoding} layout, label set {labels}"


class L2ISDMLoraLoader(io.ComfyNode):
    """Load an SDM-LoRA: the LoRA onto the MODEL, and its SPADE part for Apply SPADE."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="L2ISDMLoraLoader",
            display_name=LOADER_NAME,
            category=CATEGORY,
            description=(
                "Loads an SDM-LoRA from models/loras: the kohya LoRA through ComfyUI's own LoRA loader (every module "
                "must fit the MODEL) and the SPADE companion <name>.spade.safetensors beside it. Connect 'spade' "
                "and a label map to 'Apply SPADE (SDM-LoRA)'; without it the model has the LoRA but no layout."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The SD 1.x model the SDM-LoRA was trained on."),
                io.Combo.Input(
                    "lora_name",
                    options=_lora_files(),
                    tooltip="The LoRA file in ComfyUI's loras folders (SPADE companions are hidden).",
                ),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=-10.0,
                    max=10.0,
                    step=0.01,
                    tooltip="LoRA strength: 1 = as trained, 0 = base model (SPADE strength is set in Apply SPADE).",
                ),
                io.String.Input(
                    "path",
                    default="",
                    tooltip="Optional: the LoRA file anywhere (.spade.safetensors beside it); overrides lora_name.",
                ),
                io.Clip.Input(
                    "clip",
                    optional=True,
                    tooltip="Optional: the CLIP, patched if the LoRA has text-encoder keys (SDM-LoRAs have none).",
                ),
            ],
            outputs=[
                io.Model.Output("model", tooltip="A copy of the model with the LoRA."),
                io.Clip.Output("clip", tooltip="The CLIP input (with the LoRA's text part, if any); None if unset."),
                SpadeType.Output("spade", tooltip="The SPADE part, for 'Apply SPADE (SDM-LoRA)'."),
                LabelSetType.Output("label_set", tooltip="The label set the SPADE part was trained on."),
                io.String.Output("info", tooltip="What was loaded."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, lora_name: str = "", path: str = "", **kwargs):
        """Re-run when the LoRA or its companion changes on disk."""
        try:
            lora = _resolve_path(lora_name, path)
            stamps = [(p.stat().st_mtime_ns, p.stat().st_size) for p in (lora, spade_path_for(lora))]
        except (OSError, ValueError):
            return (lora_name, path)
        return (lora_name, path, *stamps)

    @classmethod
    def execute(cls, model, lora_name: str, strength: float = 1.0, path: str = "", clip=None) -> io.NodeOutput:
        lora_path = _resolve_path(lora_name, path)
        new_model, new_clip, spade = load_sdm_lora_for_models(model, clip, lora_path, float(strength))
        if spade.label_set is None:
            raise SDMLoraError(
                f"{spade.source} records no label set, so label maps cannot be checked against it; export it again "
                "with layout2image's trainer"
            )
        labels: LabelSet = spade.label_set
        info = f"{lora_path.name} (strength {float(strength):g}); {_describe(spade)}"
        return io.NodeOutput(new_model, new_clip, spade, labels, info)


NODES = [L2ISDMLoraLoader]
