"""What a weight file is: its container, kind, key summary, our metadata, and which tools will load it.

`inspect_weights` reads headers only where it can (safetensors headers; torch files through a memory map, whose
tensor data is never touched), so inspecting a 5.7 GB checkpoint is quick and costs no RAM. The kind comes from
our ``l2i.*`` metadata when present and otherwise from key signatures (`detect_controlnet_format`,
`detect_lora_format`, the SPADE adapter's ``sites.*.sem_*`` keys, `is_sdm_state_dict` for pixel-space SDM
UNets), never from the file name. For kohya LoRA files the ``.alpha`` scalars are read too, and the UNet keys are
run through `check_lora_state_dict` (ComfyUI's and A1111's naming rules) when the UNet layout is known (``l2i.unet_config``, or SD 1.5 when every module fits it).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .controlnet import (
    LDM_PREFIX,
    ControlNetFormat,
    UnknownFormatError,
    _check_encoding,
    _hint_convs,
    convert_controlnet_state_dict,
    detect_controlnet_format,
    infer_controlnet_config,
)
from .lora import (
    KOHYA_UNET_PREFIX,
    LoraFormatError,
    LoraSummary,
    detect_lora_format,
    kohya_names_for,
    kohya_naming_of,
    summarize_lora,
)
from .lora_convert import _nonfinite
from .metadata import WeightsMetadata, describe_label_set, has_l2i_metadata
from .safe_load import (
    TensorInfo,
    WeightsError,
    WeightsFileError,
    load_safetensors,
    load_torch_file,
    read_safetensors_header,
    sniff_file_format,
)
from .sdm_file import SDMFormatError, infer_sdm_config, is_sdm_state_dict

__all__ = ["KNOWN_KINDS", "FileReport", "inspect_weights"]

#: What `inspect_weights` can name (``FileReport.kind``).
KNOWN_KINDS = (
    "class_embedding_table",
    "controlnet",
    "controlnet_checkpoint",
    "lora",
    "sdm",
    "spade",
    "tensor",
    "unknown",
)

_LAYOUT2IMAGE = "layout2image (weights.controlnet_from_file, core.controlnet.load_controlnet, the L2I ComfyUI nodes)"
_LAYOUT2IMAGE_SDM = "layout2image (weights.load_sdm_lora with its <name>.spade.safetensors companion, the L2I nodes)"
_LAYOUT2IMAGE_PIXEL_SDM = "layout2image (weights.sdm_from_file / load_sdm_file, core.sdm.SDMUNet)"
_SPADE_KEY = re.compile(r"sites\.[^.]+\.sem_(shared|gamma|beta)\.(weight|bias)")
_LONG_FIELDS = ("config", "unet_config")
# Kohya module names have no dots: group them by block, in ldm names (lora_unet_input_blocks_1_...) or in diffusers
# names (lora_unet_down_blocks_0_..., kohya_names="diffusers").
_KOHYA_BLOCK = re.compile(
    r"(lora_unet_(?:input_blocks_\d+|output_blocks_\d+|middle_block|time_embed|out"
    r"|down_blocks_\d+|up_blocks_\d+|mid_block|time_embedding|conv_in|conv_out))_"
)
_KOHYA_LDM_BLOCK = re.compile(r"lora_unet_((?:input|output)_blocks_\d+)_")
_LDM_BLOCK_KINDS = ("input_blocks", "output_blocks")


@dataclass(frozen=True)
class FileReport:
    """What `inspect_weights` found.

    Args:
        path (`Path`): the file or folder.
        container (`str`): ``"safetensors"``, ``"torch-zip"``, ``"torch-legacy"`` or ``"diffusers-folder"``.
        kind (`str`): one of `KNOWN_KINDS`.
        summary (`str`): one line saying what the file is.
        num_tensors (`int`): tensors in the file (in the state dict, for Lightning checkpoints).
        num_parameters (`int`): their total element count.
        dtypes (`dict[str, int]`): dtype -> number of tensors.
        key_groups (`dict[str, int]`): module path cut to two components -> number of tensors.
        metadata (`WeightsMetadata`, *optional*): our metadata, None when the file has none.
        raw_metadata (`dict[str, str]`): the whole safetensors ``__metadata__`` table.
        loaders (`tuple[str, ...]`): tools that load the file as it is.
        notes (`tuple[str, ...]`): anything else worth knowing (how to convert it, what stock loaders do with it).
        controlnet_format (`ControlNetFormat`, *optional*): for ControlNets, the detected format.
        lora_summary (`LoraSummary`, *optional*): for LoRA files, modules, ranks and alphas.
    """

    path: Path
    container: str
    kind: str
    summary: str
    num_tensors: int = 0
    num_parameters: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)
    key_groups: dict[str, int] = field(default_factory=dict)
    metadata: WeightsMetadata | None = None
    raw_metadata: dict[str, str] = field(default_factory=dict)
    loaders: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    controlnet_format: ControlNetFormat | None = None
    lora_summary: LoraSummary | None = None

    def to_text(self) -> str:
        """A multi-line report for people (what ``l2i-convert inspect`` prints)."""
        lines = [
            f"file:       {self.path}",
            f"container:  {self.container}",
            f"kind:       {self.kind}",
            f"what:       {self.summary}",
            f"tensors:    {self.num_tensors} ({self.num_parameters:,} values; "
            + ", ".join(f"{d}: {n}" for d, n in sorted(self.dtypes.items()))
            + ")",
        ]
        if self.key_groups:
            lines.append("keys:")
            groups = sorted(self.key_groups.items(), key=lambda kv: (-kv[1], kv[0]))
            lines += [f"  {g}.*  ({n})" for g, n in groups[:16]]
            if len(groups) > 16:
                lines.append(f"  ... {len(groups) - 16} more groups")
        md = self.metadata
        if md is not None:
            lines.append("metadata:")
            lines.append(f"  format version:  {md.format_version}")
            lines.append(f"  kind:            {md.kind}")
            lines.append(f"  hint encoding:   {md.hint_encoding}")
            lines.append(f"  label set:       {describe_label_set(md.label_set) if md.label_set else '(unknown)'}")
            if md.label_set is not None:
                names = ", ".join(md.label_set.names[:12]) + (" ..." if md.label_set.num_classes > 12 else "")
                lines.append(f"  classes:         {names}")
            lines.append(f"  base model:      {md.base_model or '(unknown)'}")
            lines.append(f"  training config: {md.training_config_hash or '(none)'}")
            for k, v in sorted(md.extra.items()):
                if k not in _LONG_FIELDS:
                    lines.append(f"  {(k + ':').ljust(16)} {v if len(v) <= 100 else v[:97] + '...'}")
        elif self.raw_metadata:
            lines.append("metadata (not layout2image's):")
            lines += [f"  {k}: {v[:100]}" for k, v in sorted(self.raw_metadata.items())]
        else:
            lines.append("metadata:   none")
        lines.append("loads in:")
        # An empty list always comes with the reason among the notes (which keys or shapes, which loader).
        lines += [f"  - {x}" for x in self.loaders] or ["  - (no known tool; the notes say why)"]
        if self.notes:
            lines.append("notes:")
            lines += [f"  - {x}" for x in self.notes]
        return "\n".join(lines)


def _groups(keys) -> dict[str, int]:
    """Module path (without the parameter name) cut to two components -> number of tensors."""
    out: dict[str, int] = {}
    for k in keys:
        parts = str(k).split(".")
        g = ".".join(parts[:-1][:2]) or parts[0]
        out[g] = out.get(g, 0) + 1
    return out


def _controlnet_loaders(fmt: ControlNetFormat, folder: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if fmt.hint_block == "aldm":
        return (_LAYOUT2IMAGE,), (
            "ALDM-native ControlNet (class-embedding hint at H/4): stock loaders cannot use it. ComfyUI and "
            "sd-webui-controlnet/Forge fail with a shape mismatch in input_hint_block; diffusers' ControlNetModel "
            "loads it with only warnings and a random standard hint block, so always load it with layout2image",
            "needs its class-embedding table (<name>.table.safetensors) to build hints",
        )
    if folder:
        loaders = ("diffusers ControlNetModel.from_pretrained(folder)", _LAYOUT2IMAGE)
    elif fmt.layout == "diffusers":
        loaders = (
            "ComfyUI 'Load ControlNet Model' (detects controlnet_cond_embedding.conv_in and converts on load)",
            "sd-webui-controlnet / Forge (convert diffusers keys on load)",
            "diffusers ControlNetModel.from_single_file(path, config=<a diffusers ControlNet folder>)",
            _LAYOUT2IMAGE,
        )
    else:
        loaders = (
            "ComfyUI 'Load ControlNet Model'",
            "sd-webui-controlnet / Forge",
            "diffusers ControlNetModel.from_single_file(path, config=<a diffusers ControlNet folder>)",
            _LAYOUT2IMAGE,
        )
    if fmt.hint_encoding == "rgb":
        return loaders, ("standard 3-channel hint: feed the palette-RGB colour map of the label map",)
    return loaders, (
        f"one-hot hint with {fmt.hint_channels} channels: stock UIs load the weights but feed 3-channel images, so "
        "only layout2image can drive it with a label map",
    )


def _first_line(error: Exception) -> str:
    """An error's message without its list of known formats or its advice to API callers (a report says what is
    wrong; the rest is long or about arguments that ``inspect`` has not got)."""
    text = str(error).split("\n")[0].rstrip(":").removesuffix(" Known formats")
    for advice in (" The config does not describe", ". Pass strict=False"):
        text = text.split(advice)[0]
    return text.rstrip(". ") + "."


def _controlnet_problems(infos: Mapping[str, TensorInfo], fmt: ControlNetFormat, metadata) -> list[str]:
    """Why no loader takes a ControlNet whose signature keys were recognised; empty when it loads.

    The signature (a few keys and the hint block) says which format the file claims to be; the loaders build the
    model from a config (``l2i.config``, else one inferred from the shapes, as ComfyUI and layout2image do) and load
    every tensor strictly, so one tensor of another shape fails all of them. Header shapes only: no tensor is read.
    """
    problems: list[str] = []
    if metadata is not None and metadata.kind == "controlnet":
        try:
            _check_encoding(metadata, fmt, "l2i.* metadata")
        except WeightsError as e:
            problems.append(f"layout2image refuses it: {e}")
    config = None
    if metadata is not None and "config" in metadata.extra:
        try:
            config = json.loads(metadata.extra["config"])
        except json.JSONDecodeError as e:
            return problems + [f"layout2image refuses it: l2i.config is not valid JSON ({e})"]
    source = "its l2i.config" if config is not None else "the config its shapes imply"
    try:
        if config is None:
            config = infer_controlnet_config(infos)
        convert_controlnet_state_dict(infos, fmt.layout, config=config, prefix=fmt.prefix)
    except (WeightsError, KeyError, TypeError, ValueError) as e:
        problems.append(
            f"its tensors do not fit {source}, so every loader fails on them (ComfyUI, sd-webui-controlnet/Forge "
            f"and diffusers with a size mismatch, layout2image with KeyMismatchError): {_first_line(e)}"
        )
    return problems


def _tensor_infos(state: Mapping[str, Any]) -> dict[str, TensorInfo]:
    return {
        str(k): TensorInfo(str(v.dtype).replace("torch.", ""), tuple(v.shape))
        for k, v in state.items()
        if isinstance(v, torch.Tensor)
    }


def _lora_report(
    infos: Mapping[str, TensorInfo], raw: Mapping[str, str], metadata, alphas, nonfinite: list[str] | None = None
) -> dict[str, Any] | None:
    """kind/summary/loaders/notes for a UNet LoRA file, or None when the keys are no LoRA."""
    from .lora_check import check_lora_state_dict

    try:
        summary = summarize_lora(infos, alphas)
    except LoraFormatError:
        return None
    if nonfinite:
        # One NaN in up @ down spreads to the whole weight it is added to, and from there to every image.
        shown = "; ".join(nonfinite[:3]) + (f"; ... and {len(nonfinite) - 3} more" if len(nonfinite) > 3 else "")
        return dict(
            kind="lora",
            summary=summary.describe() + ", holding NaN/inf values: no loader gives usable images with it",
            loaders=(),
            notes=[
                f"{len(nonfinite)} tensor(s) hold NaN or infinite values: {shown}; every image the LoRA is applied "
                "to comes out NaN (black) in ComfyUI, A1111/Forge, diffusers and layout2image (a diverged training "
                "run?); l2i-convert lora refuses it"
            ],
            lora_summary=summary,
        )
    notes: list[str] = []
    if summary.other_keys:
        notes.append(f"{summary.other_keys} key(s) are no UNet LoRA keys (text encoder or other adapter types)")
    if summary.format == "peft":
        notes.append(
            "ComfyUI drops the attention keys of SD 1.x PEFT files ('lora key not loaded', Comfy-Org/ComfyUI#9753) "
            "and A1111 reads none of them: convert with l2i-convert lora --to kohya IN OUT [--alpha A]"
        )
        loaders = ("diffusers pipe.load_lora_weights(path) / unet.load_lora_adapter", "PEFT set_peft_model_state_dict")
        return dict(kind="lora", summary=summary.describe(), loaders=loaders, notes=notes, lora_summary=summary)
    if summary.modules_without_alpha:
        notes.append(f"{summary.modules_without_alpha} module(s) have no .alpha: loaders apply them with scale 1")
    config = None
    if metadata is not None and "unet_config" in metadata.extra:
        try:
            config = json.loads(metadata.extra["unet_config"])
        except json.JSONDecodeError as e:
            notes.append(f"l2i.unet_config is not valid JSON ({e}); checked against SD 1.5")
    unet_keys = {k: v.shape for k, v in infos.items() if k.startswith(KOHYA_UNET_PREFIX)}
    try:
        report = check_lora_state_dict(unet_keys, config)
    except WeightsError as e:
        report = None
        notes.append(f"UNet keys not checked against ComfyUI/A1111 naming: {e}")
    loaders: list[str] = []
    if report is not None:
        layout = "this file's UNet config" if config is not None else "an SD 1.5 UNet"
        if report.comfyui_ok:
            loaders.append("ComfyUI 'Load LoRA' / 'LoraLoaderModelOnly'")
        else:
            notes.append(
                f"ComfyUI ({layout}): {len(report.failing('comfyui'))} key(s) not loaded, e.g. "
                f"{report.failing('comfyui')[0].key}"
            )
        if report.a1111_ok:
            loaders.append("AUTOMATIC1111 / Forge (<lora:NAME:1> in the prompt)")
        else:
            notes.append(
                f"A1111 ({layout}): {len(report.failing('a1111'))} key(s) not loaded, e.g. "
                f"{report.failing('a1111')[0].key}"
            )
    ldm_named = kohya_naming_of(unet_keys) in ("ldm", "mixed")
    if not ldm_named:
        loaders.append("diffusers pipe.load_lora_weights(path)")
    else:
        # diffusers 0.42.1's SD pipeline, measured (docs/COMFYUI.md, "Trainer exports in the stock loaders"): ldm
        # names map only given unet_config=, whose block matching by substring (block 1 also takes 10 and 11) fails
        # on a LoRA with keys in block 1 and in block 10 or 11.
        blocks = {m[1] for k in unet_keys if (m := _KOHYA_LDM_BLOCK.match(k))}
        collides = any(f"{kind}_1" in blocks and ({f"{kind}_10", f"{kind}_11"} & blocks) for kind in _LDM_BLOCK_KINDS)
        if not collides:
            loaders.append("diffusers pipe.load_lora_weights(path, unet_config=pipe.unet.config)")
        try:
            naming = kohya_names_for(config)
        except (WeightsError, ValueError, KeyError, TypeError):
            naming = "ldm"
        if naming == "diffusers":
            notes.append(
                "ldm module names, which diffusers' SD pipeline reads only given unet_config="
                + (" and not at all here (keys in block 1 and in block 10 or 11)" if collides else "")
                + "; this UNet layout takes diffusers names, which every loader reads: l2i-convert lora --to kohya "
                "IN OUT rewrites the file with them"
            )
        else:
            notes.append(
                "ldm module names, the right ones for this UNet layout (A1111's diffusers-name rules do not fit it); "
                "diffusers' SD pipeline reads them only given unet_config="
            )
    if metadata is not None and "spade_file" in metadata.extra:
        loaders.append(_LAYOUT2IMAGE_SDM)
        notes.append(
            f"SDM-LoRA: the SPADE part is in {metadata.extra['spade_file']}; stock loaders apply the LoRA alone "
            "(no layout conditioning)"
        )
    groups: dict[str, int] = {}
    for key in infos:
        m = _KOHYA_BLOCK.match(key)
        group = m[1] if m else key.partition(".")[0]
        groups[group] = groups.get(group, 0) + 1
    return dict(
        kind="lora",
        summary=summary.describe(),
        loaders=tuple(loaders),
        notes=notes,
        lora_summary=summary,
        key_groups=groups,
    )


def _spade_report(infos: Mapping[str, TensorInfo], metadata) -> dict[str, Any] | None:
    if not infos or not all(_SPADE_KEY.fullmatch(k) for k in infos):
        return None
    shared = [v.shape for k, v in infos.items() if k.endswith("sem_shared.weight")]
    summary = f"SPADE companion of an SDM-LoRA: {len(shared)} GroupNorm sites"
    if shared:
        summary += f", {shared[0][1]} layout channels"
    notes = ["stock LoRA loaders never read it; it belongs next to its LoRA file (<name>.safetensors)"]
    if metadata is None:
        notes.append("no layout2image metadata (sites, label set, encoding): load_spade_file will refuse it")
    return dict(kind="spade", summary=summary, loaders=(_LAYOUT2IMAGE_SDM,), notes=notes)


def _sdm_report(infos: Mapping[str, TensorInfo], container: str, metadata) -> dict[str, Any] | None:
    """kind/summary/loaders/notes for a pixel-space SDM UNet (official .pt or ours), or None for other keys."""
    if not is_sdm_state_dict(infos):
        return None
    from ..core.sdm import SDM_CONDITIONS

    notes: list[str] = []
    try:
        cfg = infer_sdm_config(infos)
    except SDMFormatError as e:
        return dict(kind="sdm", summary="SDM UNet with an inconsistent layout", loaders=(), notes=[str(e)])
    official = [n for n, spec in SDM_CONDITIONS.items() if spec.channels == cfg.label_channels]
    summary = (
        f"pixel-space SDM UNet (Semantic Diffusion Model): C_y {cfg.label_channels} label channels, "
        f"{cfg.model_channels} channels x {list(cfg.channel_mult)}, {cfg.num_res_blocks} resblocks per level, "
        f"{'learned variance (6 outputs)' if cfg.learn_sigma else 'fixed variance'}"
    )
    if official and metadata is None:
        summary += f"; the official {official[0]} layout"
    if container == "safetensors":
        loaders: tuple[str, ...] = (_LAYOUT2IMAGE_PIXEL_SDM,)
        notes.append("the official code reads .pt state dicts: l2i-convert sdm --to pt IN OUT")
    else:
        loaders = (
            "the official semantic-diffusion-model code (image_sample.py --model_path FILE, same flags as training)",
            _LAYOUT2IMAGE_PIXEL_SDM,
        )
        notes.append(
            "convert to safetensors with label-set metadata: l2i-convert sdm IN OUT.safetensors [--label-set NAME]"
        )
    notes.append("not an SD/ldm UNet: stock ComfyUI/A1111 loaders cannot use it")
    return dict(kind="sdm", summary=summary, loaders=loaders, notes=notes)


def _broken_hint_block(infos: Mapping[str, TensorInfo], error: UnknownFormatError) -> str | None:
    """The note for a file with a ControlNet trunk whose hint block matches no known one (a tensor of another
    shape, as a reshaped or mis-saved file has), naming the tensors whose shapes break the chain; else None."""
    if "has a hint block that is neither" not in str(error):
        return None
    layout = "diffusers" if "controlnet_cond_embedding.conv_in.weight" in infos else "ldm"
    head = "controlnet_cond_embedding." if layout == "diffusers" else "input_hint_block."
    convs = _hint_convs(infos, layout, "")
    broken = []
    for i, (name, shape) in enumerate(convs):
        if len(shape) != 4:
            broken.append(f"{head}{name}.weight has shape {list(shape)} (a conv weight has 4 dimensions)")
        elif i and len(convs[i - 1][1]) == 4 and shape[1] != convs[i - 1][1][0]:
            before, width = convs[i - 1][0], convs[i - 1][1][0]
            broken.append(
                f"{head}{name}.weight has shape {list(shape)}: {shape[1]} input channel(s) where {head}{before} "
                f"gives {width}"
            )
    listing = ", ".join(f"{n} {list(s)}" for n, s in convs) or "none"
    where = "; ".join(broken[:3]) if broken else f"its hint convs are {listing}"
    return (
        f"its keys are a ControlNet's ({layout} layout), but its hint block matches no known one, so every loader "
        f"fails on it (ComfyUI, sd-webui-controlnet/Forge, diffusers and layout2image): {where}"
    )


def _nonfinite_lora_tensors(path: Path) -> list[str]:
    """``"<key> (n NaN, ...)"`` for each tensor of a LoRA file holding NaN or inf values (LoRAs are small: read them
    all); empty when the file is no LoRA or all values are finite."""
    try:
        detect_lora_format(read_safetensors_header(path).tensors)
    except LoraFormatError:
        return []
    state = load_safetensors(path).state_dict
    return [entry for entry in (_nonfinite(k, v) for k, v in state.items()) if entry]


def _report(
    path: Path,
    container: str,
    infos: Mapping[str, TensorInfo],
    raw: Mapping[str, str],
    notes=(),
    alphas=None,
    nonfinite: list[str] | None = None,
):
    metadata = WeightsMetadata.from_safetensors(raw, source=str(path)) if has_l2i_metadata(raw) else None
    dtypes: dict[str, int] = {}
    for info in infos.values():
        dtypes[info.dtype] = dtypes.get(info.dtype, 0) + 1
    common = dict(
        path=path,
        container=container,
        num_tensors=len(infos),
        num_parameters=sum(math.prod(i.shape) for i in infos.values()),
        dtypes=dtypes,
        key_groups=_groups(infos),
        metadata=metadata,
        raw_metadata=dict(raw),
    )
    notes = list(notes)
    found = _sdm_report(infos, container, metadata)
    if found is not None:
        return FileReport(**{**common, **found, "notes": tuple(notes + list(found["notes"]))})
    folder = container == "diffusers-folder"
    hint_note = None
    try:
        fmt = detect_controlnet_format(infos)
    except UnknownFormatError as e:
        fmt = None
        hint_note = _broken_hint_block(infos, e)
    if fmt is not None:
        loaders, more = _controlnet_loaders(fmt, folder)
        summary = f"ControlNet, {fmt.description} ({fmt.hint_encoding} hint)"
        problems = _controlnet_problems(infos, fmt, metadata)
        if problems:
            loaders, more = (), problems
            summary += ", damaged or mislabelled: no loader takes it as it is"
        return FileReport(kind="controlnet", summary=summary, loaders=loaders, notes=tuple(notes + list(more)),
                          controlnet_format=fmt, **common)  # fmt: skip
    control = {k[len(LDM_PREFIX) :]: v for k, v in infos.items() if k.startswith(LDM_PREFIX)}
    if control and len(control) < len(infos):
        try:
            fmt = detect_controlnet_format(control)
        except UnknownFormatError:
            fmt = None
        if fmt is not None:
            how = (
                "import it with: l2i-convert import-aldm CKPT OUT --label-set ... --class-embeddings ... "
                "--null-embedding ..."
                if fmt.hint_block == "aldm"
                else "take its ControlNet out with: l2i-convert controlnet --to diffusers|ldm CKPT OUT"
            )
            summary = f"whole-model checkpoint (ControlLDM) with a ControlNet inside: {fmt.description}"
            return FileReport(kind="controlnet_checkpoint", summary=summary, notes=tuple(notes + [how]), **common)
    for found in (_lora_report(infos, raw, metadata, alphas, nonfinite), _spade_report(infos, metadata)):
        if found is not None:
            found["notes"] = tuple(notes + list(found["notes"]))
            return FileReport(**{**common, **found})
    if metadata is not None:
        summary = f"layout2image {metadata.kind} file"
        loaders = (_LAYOUT2IMAGE,) if metadata.kind == "class_embedding_table" else ()
        if not loaders:
            # The metadata names a kind whose key signature the tensors do not have: say what is missing.
            why = "its keys and shapes match no known signature"
            if metadata.kind == "controlnet":
                try:
                    detect_controlnet_format(infos)
                except UnknownFormatError as e:
                    why = _first_line(e)
            summary += f" whose tensors are not a {metadata.kind}"
            notes.append(
                f"l2i.kind says {metadata.kind!r}, but no loader takes these tensors as one (layout2image, ComfyUI, "
                f"A1111/Forge and diffusers all identify a file by its keys and shapes): {why}"
            )
        return FileReport(kind=metadata.kind, summary=summary, loaders=loaders, notes=tuple(notes), **common)
    if hint_note is not None:
        notes.append(hint_note)
        summary = "ControlNet whose hint block is damaged: no loader takes it as it is"
        return FileReport(kind="unknown", summary=summary, notes=tuple(notes), **common)
    notes.append(
        "no known signature: known kinds are ControlNets (diffusers or ldm layout, standard/one-hot/ALDM hint "
        "blocks), ControlLDM checkpoints holding control_model.*, UNet LoRAs (kohya or PEFT naming), SPADE "
        "companions (sites.*.sem_*), pixel-space SDM UNets (official .pt or ours), and layout2image files with "
        "l2i.* metadata"
    )
    return FileReport(kind="unknown", summary="unrecognised weights", notes=tuple(notes), **common)


def inspect_weights(path: str | os.PathLike) -> FileReport:
    """Describe a weight file or diffusers folder without loading its tensor data.

    Raises:
        WeightsFileError: missing, empty, truncated, corrupt or unsafe file.
        MetadataError: malformed ``l2i.*`` metadata.
    """
    path = Path(path)
    if path.is_dir():
        config = path / "config.json"
        weights = path / "diffusion_pytorch_model.safetensors"
        if not config.is_file() or not weights.is_file():
            raise WeightsFileError(
                f"{str(path)!r} is a folder but not a diffusers model folder (needs config.json and "
                "diffusion_pytorch_model.safetensors)"
            )
        header = read_safetensors_header(weights)
        try:
            class_name = json.loads(config.read_text(encoding="utf-8")).get("_class_name")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightsFileError(f"cannot read {str(config)!r}: {e}") from None
        return _report(path, "diffusers-folder", header.tensors, header.metadata, [f"config.json: {class_name}"])
    container = sniff_file_format(path)
    if container == "safetensors":
        header = read_safetensors_header(path)
        alphas = None
        try:
            if detect_lora_format(header.tensors) == "kohya":  # the alphas are scalars: read them
                keys = [k for k in header.tensors if k.startswith(KOHYA_UNET_PREFIX) and k.endswith(".alpha")]
                alphas = load_safetensors(path, keys=keys).state_dict
        except LoraFormatError:
            pass
        nonfinite = _nonfinite_lora_tensors(path)
        return _report(path, container, header.tensors, header.metadata, alphas=alphas, nonfinite=nonfinite)
    obj = load_torch_file(path, mmap=True)
    if isinstance(obj, torch.Tensor):
        shape = tuple(obj.shape)
        what = f"a single {str(obj.dtype).replace('torch.', '')} tensor of shape {list(shape)}"
        notes = []
        if obj.ndim == 2 and obj.is_floating_point():
            kind_hint = "null embedding" if shape[0] == 1 else f"class embeddings ({shape[0]} classes)"
            notes.append(
                f"could be an official ALDM {kind_hint} of width {shape[1]}: pass it to l2i-convert import-aldm"
            )
        info = {"<tensor>": TensorInfo(str(obj.dtype).replace("torch.", ""), shape)}
        return FileReport(
            path=path,
            container=container,
            kind="tensor",
            summary=what,
            num_tensors=1,
            num_parameters=math.prod(shape),
            dtypes={info["<tensor>"].dtype: 1},
            notes=tuple(notes),
        )
    if not isinstance(obj, Mapping):
        raise WeightsFileError(f"{str(path)!r} holds a {type(obj).__name__}, not tensors or a state dict")
    notes = []
    state = obj
    if isinstance(obj.get("state_dict"), Mapping):
        state = obj["state_dict"]
        extras = {k: v for k, v in obj.items() if k != "state_dict" and isinstance(v, (int, float, str))}
        notes.append("Lightning checkpoint: " + ", ".join(f"{k}={v}" for k, v in sorted(extras.items())))
    return _report(path, container, _tensor_infos(state), {}, notes)
