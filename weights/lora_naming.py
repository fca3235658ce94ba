"""UNet LoRA key names: the formats (`detect_lora_format`), the diffusers <-> ldm module map of a UNet layout
(`unet_module_map`) and the kohya module naming we write (`kohya_names_for`). The conversion itself is in
`weights.lora_convert`, files in `weights.lora` (which re-exports all of these).

**Which kohya module names we write** (``kohya_names=``, `kohya_names_for`; recorded as ``l2i.kohya_names``):
``"diffusers"`` names (``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``, what kohya's
sd-scripts writes for SD 1.x/2.x) when A1111's diffusers -> ldm name arithmetic is exact for the UNet layout, else
``"ldm"`` names (``lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q``). The loaders:

* ComfyUI (``comfy/lora.py`` ``model_lora_keys_unet``) accepts ``lora_unet_<ldm path>`` for every ``.weight`` of
  the model's state dict (its SD1.x UNet *is* the ldm UNet), and also ``lora_unet_<diffusers path>`` through
  ``comfy.utils.unet_to_diffusers``, which is computed from the UNet config; both work there (its rules assume
  equal ``layers_per_block`` on every level).
* A1111 (``extensions-builtin/Lora/networks.py`` ``load_network``) first passes the name through
  ``convert_diffusers_name_to_compvis``, whose regexes hard-code SD 1.x/2.x block arithmetic (3 ldm blocks per
  level, the upsampler at ``output_blocks.{3i+2}.{2 if i > 0 else 1}``); an ldm name matches none of them, and
  the ``lora_unet`` -> ``diffusion_model`` fallback then finds the module directly in ``network_layer_mapping``
  (the ldm model's module names). The ldm form is therefore exact for any UNet layout, the diffusers form only
  for SD 1.x/2.x-shaped ones.
* diffusers (measured with 0.42.1, docs/COMFYUI.md "Trainer exports in the stock loaders"):
  ``StableDiffusionPipeline.load_lora_weights(file)`` converts diffusers-named kohya keys by plain renaming
  (``_convert_non_diffusers_lora_to_diffusers``), for any layout. It does **not** read ldm names for SD 1.x: the
  SD pipeline never passes the UNet config to ``lora_state_dict``, so ``_maybe_map_sgm_blocks_to_diffusers``
  never runs and the load fails with ``NoMatchingPeftModuleError``. Passing ``unet_config=pipe.unet.config``
  makes it run, but it collects the keys of block ``i`` by substring (``input_blocks_1`` also takes blocks 10 and
  11; written for SDXL's 9 blocks), so on SD 1.5 every LoRA with keys in block 1 and in block 10 or 11 (any
  resnet-conv LoRA) fails with a ``KeyError``; it also reads inner index 1 of an output block as ``attentions``,
  so an upsampler LoRA of an up block without attention (``output_blocks_N_1_conv``) lands on a missing module.
  On layouts with fewer than 11 input and output blocks ``unet_config=`` does map ldm names, such upsampler
  LoRAs excepted.

The automatic rule (`kohya_names_for`): diffusers names when, for every Linear/conv module of the layout (every
module of `unet_module_map` but the norms), A1111's conversion of the diffusers-named kohya name
(`lora_check.a1111_convert_name`) gives exactly our ldm module and ComfyUI's ``unet_to_diffusers``
(`lora_check.comfyui_unet_to_diffusers`) maps the diffusers path to that same ldm module. That holds for SD 1.x
and 2.x-shaped UNets (3 ldm blocks per level: ``layers_per_block=2`` on every level; no attention in
``up_blocks.0``, attention in every other up block that has an upsampler); for any other layout (e.g.
``layers_per_block=1``) ldm names are written, which ComfyUI and A1111 load exactly and diffusers only with
``unet_config=`` (above). Either naming is read as input (`kohya_naming_of` tells which one a file has).

**Module paths** (`unet_module_map`) are derived from the UNet config (levels, ``layers_per_block``, which blocks
have attention, transformer depth), not from an SD 1.5 table. With ``L`` levels and ``n_x`` resnets in down
level ``x``: ``input_blocks.0.0`` = ``conv_in``; down level ``x`` resnet/attention ``i`` -> ``input_blocks.k.0`` /
``.k.1`` with ``k`` counting up from 1 (one per resnet, one per downsampler, ``down_blocks.x.downsamplers.0.conv``
-> ``input_blocks.k.0.op``); the mid block's resnet 0, attention, resnet 1 -> ``middle_block.0/1/2``; up level
``x`` resnet/attention ``i`` -> ``output_blocks.k.0`` / ``.k.1`` (``k`` from 0), its upsampler ->
``output_blocks.k.{1, or 2 after an attention}.conv`` on the last ``k`` of the level; ``time_embedding.linear_1/2``
-> ``time_embed.0/2``; ``conv_norm_out``/``conv_out`` -> ``out.0``/``out.2``. Inside resnets ``norm1, conv1,
time_emb_proj, norm2, conv2, conv_shortcut`` are ``in_layers.0, in_layers.2, emb_layers.1, out_layers.0,
out_layers.3, skip_connection``; attention blocks keep their inner names.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .safe_load import WeightsError

__all__ = [
    "KNOWN_LORA_FORMATS",
    "KOHYA_NAMES",
    "KOHYA_UNET_PREFIX",
    "LORA_FORMATS",
    "LoraFormatError",
    "detect_lora_format",
    "kohya_module_name",
    "kohya_names_for",
    "kohya_naming_of",
    "sd15_unet_config",
    "unet_module_map",
]


#: What `convert_lora_state_dict` converts to (and ``l2i-convert lora --to``).
LORA_FORMATS = ("kohya", "peft")

#: Prefix of kohya UNet module names.
KOHYA_UNET_PREFIX = "lora_unet_"

#: The kohya module namings `convert_lora_state_dict` writes (``kohya_names=``, ``l2i-convert lora --kohya-names``):
#: ``auto`` picks ``diffusers`` or ``ldm`` from the UNet layout (`kohya_names_for`).
KOHYA_NAMES = ("auto", "diffusers", "ldm")

#: What `detect_lora_format` recognises (listed in its errors).
KNOWN_LORA_FORMATS = (
    "kohya with ldm module names: lora_unet_<ldm module path with '_'>.lora_down.weight / .lora_up.weight / .alpha "
    "(e.g. lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight; written for UNet layouts "
    "other than SD 1.x/2.x's)",
    "kohya with diffusers module names: lora_unet_down_blocks_0_attentions_0_..._to_q.lora_down.weight "
    "(written for SD 1.x/2.x-shaped UNets)",
    "PEFT/diffusers: [unet.|base_model.model.]<diffusers module path>.lora_A.weight / .lora_B.weight "
    "(e.g. down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight)",
)

_KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
_PEFT_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
_PEFT_PREFIXES = ("unet.base_model.model.", "base_model.model.", "unet.", "")
_UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "conv_norm_out", "time_embedding.")
_LDM_ROOTS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "out.")  # of `unet_module_map` values
# kohya module-name prefixes of each naming (no overlap: "time_embed_" is no prefix of "time_embedding_")
_KOHYA_NAMING_ROOTS = {
    "ldm": tuple(KOHYA_UNET_PREFIX + root.replace(".", "_") for root in _LDM_ROOTS),
    "diffusers": tuple(KOHYA_UNET_PREFIX + root.replace(".", "_") for root in _UNET_ROOTS),
}


_SD15_CONFIG = Path(__file__).resolve().parent.parent / "trainer" / "sd15_config" / "unet" / "config.json"

_RESNET_LEAVES = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)
_ATTENTION_LEAVES = ("norm", "proj_in", "proj_out")
_TRANSFORMER_LEAVES = (
    "norm1",
    "norm2",
    "norm3",
    *(f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0")),
    "ff.net.0.proj",
    "ff.net.2",
)
_DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}


class LoraFormatError(WeightsError):
    """A LoRA state dict is in no known format, mixes formats, has keys its format cannot place, or lacks what a
    conversion needs (a PEFT file without its alpha)."""


# ---------------------------------------------------------------------------------------------------- configs
@functools.lru_cache(maxsize=1)
def _sd15_config_json() -> str:
    return _SD15_CONFIG.read_text(encoding="utf-8")


def sd15_unet_config() -> dict[str, Any]:
    """SD 1.5's UNet config (a fresh copy): the default layout for files without ``l2i.unet_config``."""
    return json.loads(_sd15_config_json())


def _config_dict(unet_config: Any) -> dict[str, Any]:
    if unet_config is None:
        return sd15_unet_config()
    if hasattr(unet_config, "config") and not isinstance(unet_config, Mapping):  # a model
        unet_config = unet_config.config
    if not isinstance(unet_config, Mapping):
        raise TypeError(f"unet_config must be a UNet config mapping or a UNet, got {type(unet_config).__name__}")
    # JSON round trip: plain types (tuples -> lists), a copy the caller's config never shares; diffusers' private
    # entries (``_name_or_path`` may hold a local path, ``_use_default_values``) are dropped, ``_class_name`` kept
    kept = {k: v for k, v in dict(unet_config).items() if not k.startswith("_") or k == "_class_name"}
    return json.loads(json.dumps(kept, default=lambda v: str(v) if isinstance(v, os.PathLike) else list(v)))


def _per_level(value: Any, levels: int, name: str) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value] * levels
    if isinstance(value, (list, tuple)) and len(value) == levels and all(isinstance(v, int) for v in value):
        return [int(v) for v in value]
    raise WeightsError(
        f"unet config {name}={value!r}: expected an int or one int per level ({levels}); per-layer lists (SDXL-style) "
        "are not supported by the LoRA converter"
    )


@dataclass(frozen=True)
class _Tables:
    to_ldm: dict[str, str]  # diffusers module path -> ldm module path
    from_kohya: dict[str, str]  # kohya name (ldm or diffusers spelling) -> diffusers module path


def _build_module_map(config: Mapping[str, Any]) -> dict[str, str]:
    down_types, up_types = list(config.get("down_block_types", ())), list(config.get("up_block_types", ()))
    levels = len(down_types)
    if levels == 0 or len(up_types) != levels:
        raise WeightsError(
            f"unet config has {levels} down and {len(up_types)} up block types; a UNet2DConditionModel config with "
            "equal, non-zero counts is needed"
        )
    for kind, types, known in (("down", down_types, _DOWN_TYPES), ("up", up_types, _UP_TYPES)):
        for t in types:
            if t not in known:
                raise WeightsError(f"unet config {kind} block type {t!r} is not supported; known: {', '.join(known)}")
    mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type not in ("UNetMidBlock2DCrossAttn", None):
        raise WeightsError(f"unet config mid_block_type={mid_type!r} is not supported; known: UNetMidBlock2DCrossAttn")
    lpb = _per_level(config.get("layers_per_block", 2), levels, "layers_per_block")
    depth = _per_level(config.get("transformer_layers_per_block", 1), levels, "transformer_layers_per_block")
    reverse = config.get("reverse_transformer_layers_per_block")
    up_depth = list(reversed(depth)) if reverse is None else _per_level(reverse, levels, "reverse_transformer...")

    table: dict[str, str] = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }

    def resnet(src: str, dst: str) -> None:
        table.update({f"{src}.{a}": f"{dst}.{b}" for a, b in _RESNET_LEAVES})

    def attention(src: str, dst: str, n: int) -> None:
        table.update({f"{src}.{leaf}": f"{dst}.{leaf}" for leaf in _ATTENTION_LEAVES})
        for t in range(n):
            table.update(
                {
                    f"{src}.transformer_blocks.{t}.{leaf}": f"{dst}.transformer_blocks.{t}.{leaf}"
                    for leaf in _TRANSFORMER_LEAVES
                }
            )

    k = 1
    for x, t in enumerate(down_types):
        for i in range(lpb[x]):
            resnet(f"down_blocks.{x}.resnets.{i}", f"input_blocks.{k}.0")
            if _DOWN_TYPES[t]:
                attention(f"down_blocks.{x}.attentions.{i}", f"input_blocks.{k}.1", depth[x])
            k += 1
        if x < levels - 1:
            table[f"down_blocks.{x}.downsamplers.0.conv"] = f"input_blocks.{k}.0.op"
            k += 1
    if mid_type is not None:
        resnet("mid_block.resnets.0", "middle_block.0")
        attention("mid_block.attentions.0", "middle_block.1", depth[-1])
        resnet("mid_block.resnets.1", "middle_block.2")
    k = 0
    up_lpb = list(reversed(lpb))
    for x, t in enumerate(up_types):
        n = up_lpb[x] + 1
        for i in range(n):
            resnet(f"up_blocks.{x}.resnets.{i}", f"output_blocks.{k}.0")
            if _UP_TYPES[t]:
                attention(f"up_blocks.{x}.attentions.{i}", f"output_blocks.{k}.1", up_depth[x])
            if i == n - 1 and x < levels - 1:
                table[f"up_blocks.{x}.upsamplers.0.conv"] = f"output_blocks.{k}.{2 if _UP_TYPES[t] else 1}.conv"
            k += 1
    return table


@functools.lru_cache(maxsize=16)
def _tables(config_json: str) -> _Tables:
    to_ldm = _build_module_map(json.loads(config_json))
    from_kohya: dict[str, str] = {}
    for path, ldm in to_ldm.items():
        for name in (KOHYA_UNET_PREFIX + ldm.replace(".", "_"), KOHYA_UNET_PREFIX + path.replace(".", "_")):
            if from_kohya.setdefault(name, path) != path:  # a bug in the table, never a user error
                raise RuntimeError(f"kohya name {name!r} is claimed by {from_kohya[name]!r} and {path!r}")
    if len(set(to_ldm.values())) != len(to_ldm):
        raise RuntimeError("unet_module_map produced duplicate ldm paths")
    return _Tables(to_ldm, from_kohya)


@functools.lru_cache(maxsize=8)
def _weight_shapes(config_json: str) -> dict[str, tuple[int, ...]]:
    """diffusers module path -> weight shape of the UNet the config describes (built on the meta device)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(json.loads(config_json))
    return {k[: -len(".weight")]: tuple(v.shape) for k, v in unet.state_dict().items() if k.endswith(".weight")}


def _tables_for(unet_config: Any) -> tuple[_Tables, dict[str, Any]]:
    config = _config_dict(unet_config)
    return _tables(json.dumps(config, sort_keys=True)), config


def unet_module_map(unet_config: Any = None) -> dict[str, str]:
    """diffusers module path -> ldm module path for every weight-carrying module of the UNet the config describes.

    Args:
        unet_config (`Mapping` or `UNet2DConditionModel`, *optional*): the diffusers UNet config (or the model);
            SD 1.5's when None.

    Raises:
        WeightsError: block types the ldm layout has no place for (only the SD 1.x/2.x block types are known).
    """
    return dict(_tables_for(unet_config)[0].to_ldm)


def _is_norm(path: str) -> bool:
    """A GroupNorm/LayerNorm module of the map (no LoRA target: PEFT and both UIs' LoRA types skip norms)."""
    return path == "conv_norm_out" or re.fullmatch(r"norm\d?", path.rpartition(".")[2]) is not None


@functools.lru_cache(maxsize=16)
def _diffusers_names_exact(config_json: str) -> bool:
    """True when every Linear/conv module's diffusers-named kohya name lands on our ldm module in A1111 and ComfyUI."""
    from .lora_check import a1111_convert_name, comfyui_unet_config, comfyui_unet_to_diffusers

    comfy = comfyui_unet_to_diffusers(comfyui_unet_config(json.loads(config_json)))
    for path, ldm in _tables(config_json).to_ldm.items():
        if _is_norm(path):
            continue
        name = KOHYA_UNET_PREFIX + path.replace(".", "_")
        if a1111_convert_name(name) != "diffusion_model_" + ldm.replace(".", "_"):
            return False
        if comfy.get(f"{path}.weight") != f"{ldm}.weight":
            return False
    return True


def kohya_names_for(unet_config: Any = None) -> str:
    """The kohya module naming ``kohya_names="auto"`` writes for a UNet layout: ``"diffusers"`` or ``"ldm"``.

    ``"diffusers"`` (``lora_unet_down_blocks_0_attentions_0_...``, kohya sd-scripts' naming for SD 1.x/2.x) when, for
    every Linear/conv module of the layout (`unet_module_map` without the norms), A1111's
    ``convert_diffusers_name_to_compvis`` (`lora_check.a1111_convert_name`) turns the diffusers-named kohya name
    into exactly our ldm module and ComfyUI's ``unet_to_diffusers`` (`lora_check.comfyui_unet_to_diffusers`) maps
    the diffusers path to that same module: then ComfyUI, A1111 and diffusers' plain ``load_lora_weights`` all
    read the file. Otherwise ``"ldm"`` (``lora_unet_input_blocks_1_1_...``), which ComfyUI and A1111 read for any
    layout. SD 1.5's and SD 2.x's UNets get ``"diffusers"``.

    Args:
        unet_config (`Mapping` or `UNet2DConditionModel`, *optional*): the diffusers UNet config; SD 1.5's when None.
    """
    _, config = _tables_for(unet_config)  # raises for a config the module map refuses
    return "diffusers" if _diffusers_names_exact(json.dumps(config, sort_keys=True)) else "ldm"


def kohya_naming_of(keys) -> str:
    """The module naming of the kohya UNet keys among ``keys``: ``"diffusers"``, ``"ldm"``, ``"mixed"`` or ``""``.

    Read from the name after ``lora_unet_`` (`KOHYA_UNET_PREFIX`): ldm roots (``input_blocks_``, ``middle_block_``,
    ``output_blocks_``, ``time_embed_``, ``out_``) or diffusers roots (``down_blocks_``, ``mid_block_``,
    ``up_blocks_``, ``time_embedding_``, ``conv_in``, ``conv_out``, ``conv_norm_out``). Other keys (text-encoder
    keys, PEFT keys, unknown roots) are ignored; the suffixes are not checked.

    Args:
        keys (`Iterable[str]`): key names, e.g. a state dict.

    Returns:
        `str`: ``"diffusers"`` or ``"ldm"`` when every kohya UNet key has that naming (`KOHYA_NAMES`),
        ``"mixed"`` when both occur (`convert_lora_state_dict` reads a mix), ``""`` when no key is a kohya UNet key
        with one of these roots.
    """
    found = set()
    for key in keys:
        key = str(key)
        found.update(naming for naming, roots in _KOHYA_NAMING_ROOTS.items() if key.startswith(roots))
    return "mixed" if len(found) > 1 else next(iter(found), "")


def _check_kohya_names(kohya_names: str) -> None:
    if kohya_names not in KOHYA_NAMES:
        raise ValueError(f"kohya_names={kohya_names!r}: expected one of {', '.join(KOHYA_NAMES)}")


def _resolve_kohya_names(kohya_names: str, config: Mapping[str, Any]) -> str:
    _check_kohya_names(kohya_names)
    if kohya_names == "auto":
        return kohya_names_for(config)
    return kohya_names


def _kohya_name(path: str, tables: _Tables, naming: str) -> str:
    return KOHYA_UNET_PREFIX + (path if naming == "diffusers" else tables.to_ldm[path]).replace(".", "_")


def kohya_module_name(module_path: str, unet_config: Any = None, kohya_names: str = "auto") -> str:
    """The kohya name we write for a diffusers module path: ``lora_unet_`` + the diffusers or the ldm path with "_".

    Args:
        module_path (`str`): a diffusers module path (``down_blocks.0.resnets.0.conv1``).
        unet_config (`Mapping` or UNet, *optional*): the UNet config; SD 1.5's when None.
        kohya_names (`str`, defaults to `"auto"`): `KOHYA_NAMES`; ``auto`` is `kohya_names_for` the config.

    Raises:
        LoraFormatError: the path is not a module of this UNet layout.
    """
    tables, config = _tables_for(unet_config)
    if module_path not in tables.to_ldm:
        raise LoraFormatError(f"{module_path!r} is not a module of this UNet layout (see unet_module_map)")
    return _kohya_name(module_path, tables, _resolve_kohya_names(kohya_names, config))


# ---------------------------------------------------------------------------------------------------- detection
def _peft_split(key: str) -> tuple[str, str, str] | None:
    """``(prefix, module path, 'A'|'B')`` of a PEFT UNet key, or None."""
    for suffix in _PEFT_SUFFIXES:
        if key.endswith(suffix):
            body = key[: -len(suffix)]
            for prefix in _PEFT_PREFIXES:
                rest = body[len(prefix) :]
                if body.startswith(prefix) and rest.startswith(_UNET_ROOTS):
                    return prefix, rest, suffix[len(".lora_") : -len(".weight")]
            return None
    return None


def _kohya_split(key: str) -> tuple[str, str] | None:
    """``(module name, suffix without the dot)`` of a kohya UNet key, or None."""
    if not key.startswith(KOHYA_UNET_PREFIX):
        return None
    for suffix in _KOHYA_SUFFIXES:
        if key.endswith(suffix) and "." not in key[: -len(suffix)]:
            return key[: -len(suffix)], suffix[1:]
    return None


def detect_lora_format(keys) -> str:
    """``"kohya"`` or ``"peft"`` from key names (a state dict or any iterable of keys).

    Raises:
        LoraFormatError: empty, mixed, or no LoRA keys at all (the message lists `KNOWN_LORA_FORMATS`).
    """
    keys = [str(k) for k in keys]
    if not keys:
        raise LoraFormatError("the LoRA state dict is empty")
    kohya = [k for k in keys if _kohya_split(k)]
    peft = [k for k in keys if _peft_split(k)]
    if kohya and peft:
        raise LoraFormatError(
            f"the state dict mixes kohya keys ({kohya[0]!r}, {len(kohya)} in all) and PEFT keys ({peft[0]!r}, "
            f"{len(peft)} in all); convert each part on its own"
        )
    if kohya:
        return "kohya"
    if peft:
        return "peft"
    raise LoraFormatError(
        f"no UNet LoRA keys found among {len(keys)} keys (e.g. {keys[:3]}); known formats: "
        + "; ".join(KNOWN_LORA_FORMATS)
    )
