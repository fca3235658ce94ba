"""UNet LoRA state dicts: PEFT/diffusers naming <-> kohya naming (what ComfyUI's and A1111's loaders read).

**Formats** (recognised from key names, never from file names; `detect_lora_format`):

=========  =============================================================  =========================================
format     keys (one module)                                              written by
=========  =============================================================  =========================================
``peft``   ``[unet.]<diffusers module path>.lora_A.weight``, ``.lora_B``   ``get_peft_model_state_dict``, diffusers
           (no alpha: it lives in the LoRA config)                        ``save_lora_weights`` (``unet.`` prefix)
``kohya``  ``lora_unet_<module path, "." -> "_">.lora_down.weight``,      kohya sd-scripts, this module
           ``.lora_up.weight``, ``.alpha`` (0-dim tensor); the module
           path is the diffusers one or the ldm (CompVis) one
=========  =============================================================  =========================================

``lora_down`` is PEFT's ``lora_A`` (a Linear ``(r, in)``, or a conv ``(r, in, k, k)`` with the base conv's kernel),
``lora_up`` is ``lora_B`` (``(out, r)`` or a 1x1 conv ``(out, r, 1, 1)``); the shapes are the same in both formats.
Both stock loaders add ``(alpha / r) * up @ down`` to the base weight, with ``r = lora_down.shape[0]``
(ComfyUI ``comfy/weight_adapter/lora.py`` ``LoRAAdapter.calculate_weight``; A1111 ``network.py``
``NetworkModule.calc_scale``), exactly PEFT's ``scaling = lora_alpha / r``. So ``.alpha`` must be the configured
``lora_alpha``, not the rank; a module without ``.alpha`` is applied with scale 1 by both, i.e. as alpha = r.

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
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.logging import get_logger
from .metadata import WeightsMetadata, has_l2i_metadata
from .safe_load import WeightsError, load_safetensors, sniff_file_format

__all__ = [
    "KNOWN_LORA_FORMATS",
    "KOHYA_NAMES",
    "KOHYA_UNET_PREFIX",
    "LORA_FORMATS",
    "LoraConversion",
    "LoraFile",
    "LoraFormatError",
    "LoraSummary",
    "convert_lora_file",
    "convert_lora_state_dict",
    "detect_lora_format",
    "kohya_module_name",
    "kohya_names_for",
    "kohya_naming_of",
    "load_lora_file",
    "lora_alphas_of",
    "peft_adapter_metadata",
    "save_lora_file",
    "sd15_unet_config",
    "summarize_lora",
    "unet_module_map",
]

logger = get_logger(__name__)

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
_DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
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


# ---------------------------------------------------------------------------------------------------- conversion
@dataclass(frozen=True)
class LoraConversion:
    """Result of `convert_lora_state_dict`.

    Args:
        state_dict (`dict[str, torch.Tensor]`): the converted dict (new; LoRA tensors shared with the input, kohya
            ``.alpha`` tensors new 0-dim float32).
        source (`str`): the input's format (`LORA_FORMATS`).
        target (`str`): the output's format.
        modules (`tuple[str, ...]`): diffusers paths of the LoRA modules, in input order.
        ranks (`dict[str, int]`): module path -> rank ``r`` (``lora_down``/``lora_A`` rows).
        alphas (`dict[str, float]`): module path -> alpha; empty for PEFT -> PEFT without ``alpha``.
        alpha_defaulted (`tuple[str, ...]`): kohya modules that had no ``.alpha`` (read as alpha = r, like the
            stock loaders do).
        unexpected (`tuple[str, ...]`): input keys that are no UNet LoRA key of this layout (dropped; only
            with ``strict=False``).
        unet_config (`dict`): the UNet config used for the module paths.
        conv_modules (`tuple[str, ...]`): the modules whose down projection is a conv (LoCon).
        kohya_names (`str`): the module naming of a kohya output, ``"diffusers"`` or ``"ldm"`` (`KOHYA_NAMES`);
            empty for a PEFT output.
    """

    state_dict: dict[str, torch.Tensor]
    source: str
    target: str
    modules: tuple[str, ...]
    ranks: dict[str, int]
    alphas: dict[str, float]
    alpha_defaulted: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    unet_config: dict[str, Any] = field(default_factory=dict)
    conv_modules: tuple[str, ...] = ()
    kohya_names: str = ""


def _short(items, n: int = 6) -> str:
    items = list(items)
    return ", ".join(map(str, items[:n])) + (f" ... ({len(items)} in all)" if len(items) > n else "")


def _check_pair(path: str, down: torch.Tensor, up: torch.Tensor) -> int:
    if down.ndim not in (2, 4) or up.ndim != down.ndim:
        raise LoraFormatError(
            f"{path}: lora_down/lora_A has shape {list(down.shape)} and lora_up/lora_B {list(up.shape)}; expected "
            "(r, in) and (out, r) for a Linear, (r, in, k, k) and (out, r, 1, 1) for a conv"
        )
    if up.shape[1] != down.shape[0] or (up.ndim == 4 and tuple(up.shape[2:]) != (1, 1)):
        raise LoraFormatError(
            f"{path}: lora_up/lora_B {list(up.shape)} does not fit lora_down/lora_A {list(down.shape)} (the rank "
            "must agree and a conv's up projection must be 1x1)"
        )
    return int(down.shape[0])


def _alpha_for(alpha: float | Mapping[str, float], path: str) -> float:
    if isinstance(alpha, Mapping):
        if path not in alpha:
            raise ValueError(f"alpha has no entry for module {path!r}; give one per LoRA module, or a single float")
        return float(alpha[path])
    return float(alpha)


def convert_lora_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    to: str,
    *,
    unet_config: Any = None,
    alpha: float | Mapping[str, float] | None = None,
    prefix: str | None = None,
    strict: bool = True,
    check_shapes: bool = True,
    kohya_names: str = "auto",
) -> LoraConversion:
    """Rename a UNet LoRA state dict between the PEFT and the kohya format.

    Pure: neither the input dict nor its tensors are modified. Idempotent: a kohya input already in the naming asked
    for comes back unchanged by ``to="kohya"`` (same keys, same tensors), a PEFT input by ``to="peft"`` (unless
    ``prefix`` asks for another prefix). PEFT -> kohya -> PEFT gives back the same keys and tensors, with either
    kohya naming; a kohya input in either naming (or a mix) converts to PEFT.

    Args:
        state_dict (`Mapping[str, torch.Tensor]`): a LoRA in a format `detect_lora_format` knows.
        to (`str`): ``"kohya"`` or ``"peft"``.
        unet_config (`Mapping` or UNet, *optional*): the base UNet's diffusers config; SD 1.5's when None.
        alpha (`float` or `Mapping[str, float]`, *optional*): the LoRA alpha (PEFT ``lora_alpha``), one value or
            one per diffusers module path. Required for PEFT -> kohya (PEFT state dicts carry no alpha); refused
            for a kohya input (it carries its own).
        prefix (`str`, *optional*): key prefix of a PEFT output: ``""`` (as ``get_peft_model_state_dict``) or
            ``"unet."`` (as diffusers ``save_lora_weights``). Default: the input's prefix, ``""`` from kohya.
        strict (`bool`, defaults to True): raise on keys that are no UNet LoRA key of this layout; when False
            they are dropped, logged and listed in ``unexpected``.
        check_shapes (`bool`, defaults to True): check every module's shapes against the UNet the config describes
            (built on the meta device), which catches a LoRA converted with the wrong config: module names alone
            often fit several layouts.
        kohya_names (`str`, defaults to `"auto"`): the module names of a kohya output (`KOHYA_NAMES`):
            ``"diffusers"`` (``lora_unet_down_blocks_0_...``), ``"ldm"`` (``lora_unet_input_blocks_1_...``) or
            ``"auto"``: `kohya_names_for` the UNet config (diffusers names for SD 1.x/2.x-shaped UNets, which
            ComfyUI, A1111 and diffusers all read; ldm names otherwise). Ignored for ``to="peft"``.

    Raises:
        LoraFormatError: unknown or mixed format, unknown modules or suffixes, unpaired or ill-shaped tensors.
        ValueError: bad ``to``/``prefix``/``alpha``/``kohya_names`` arguments.
    """
    if to not in LORA_FORMATS:
        raise ValueError(f"to={to!r}: expected one of {', '.join(LORA_FORMATS)}")
    if prefix not in (None, "", "unet."):
        raise ValueError(f"prefix={prefix!r}: expected '' or 'unet.'")
    _check_kohya_names(kohya_names)
    tables, config = _tables_for(unet_config)
    source = detect_lora_format(state_dict)
    if source == "kohya" and alpha is not None:
        raise ValueError("alpha is only for PEFT input; a kohya state dict carries its alphas in '.alpha' keys")
    naming = _resolve_kohya_names(kohya_names, config) if to == "kohya" else ""
    if to == "kohya" and kohya_names == "diffusers" and kohya_names_for(config) != "diffusers":
        logger.warning(
            "kohya_names='diffusers' for a UNet layout that is not SD 1.x/2.x-shaped: A1111 maps diffusers-named "
            "kohya keys with SD 1.x block arithmetic and will put some of them on the wrong modules or drop them "
            "(kohya_names='auto' writes ldm names here)"
        )

    # module path -> {"down"/"up"/"alpha": (key, tensor)}
    parts: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    unexpected: list[str] = []
    prefixes: set[str] = set()
    kohya_named_as_asked = True  # every kohya input key already has the name a kohya output would give it
    for key, value in state_dict.items():
        if source == "kohya":
            split = _kohya_split(key)
            path = tables.from_kohya.get(split[0]) if split else None
            part = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[split[1]] if path else None
            if path is not None and split[0] != _kohya_name(path, tables, naming or "ldm"):
                kohya_named_as_asked = False
        else:
            split = _peft_split(key)
            path = split[1] if split and split[1] in tables.to_ldm else None
            part = {"A": "down", "B": "up"}[split[2]] if path else None
            if path:
                prefixes.add(split[0])
        if path is None:
            unexpected.append(key)
            continue
        if not isinstance(value, torch.Tensor):
            raise LoraFormatError(f"{key!r} holds a {type(value).__name__}, not a tensor")
        slot = parts.setdefault(path, {})
        if part in slot:
            raise LoraFormatError(f"{key!r} and {slot[part][0]!r} both name the {part} part of module {path!r}")
        slot[part] = (key, value)
    if unexpected:
        message = (
            f"{len(unexpected)} key(s) are no UNet LoRA key of this UNet layout ({source} format): "
            f"{_short(unexpected)}. Text-encoder LoRA keys, other adapter types (LoHa, LoKr, DoRA magnitudes, "
            "mid weights) and modules the UNet config does not have are not converted (is it the config of the "
            "UNet the LoRA was trained on? unet_config=..., l2i-convert lora --unet-config). Known formats: "
            + "; ".join(KNOWN_LORA_FORMATS)
        )
        if strict:
            raise LoraFormatError(message + ". Pass strict=False to drop them")
        logger.warning("%s; dropping them", message)
    if not parts:
        raise LoraFormatError(f"no LoRA module of this UNet layout in the {source} state dict")
    if len(prefixes) > 1:
        raise LoraFormatError(f"the PEFT keys use several prefixes {sorted(prefixes)}; use one")
    unpaired = [f"{p} (has only {', '.join(sorted(s))})" for p, s in parts.items() if not {"down", "up"} <= set(s)]
    if unpaired:
        raise LoraFormatError(f"{len(unpaired)} module(s) lack lora_down/lora_A or lora_up/lora_B: {_short(unpaired)}")

    ranks = {p: _check_pair(p, s["down"][1], s["up"][1]) for p, s in parts.items()}
    if check_shapes:
        weights = _weight_shapes(json.dumps(config, sort_keys=True))
        wrong = []
        for p, s in parts.items():
            w, down, up = weights.get(p), tuple(s["down"][1].shape), tuple(s["up"][1].shape)
            r = ranks[p]
            if w is None:
                wrong.append(f"{p} (no such weight in this UNet)")
            elif down != (r, *w[1:]) or up != (w[0], r, *((1, 1) if len(w) == 4 else ())):
                wrong.append(f"{p}: down {list(down)}, up {list(up)} for a weight {list(w)}")
        if wrong:
            raise LoraFormatError(
                f"the LoRA does not fit the UNet config ({config.get('_class_name', 'UNet')} with block_out_channels "
                f"{config.get('block_out_channels')}, layers_per_block {config.get('layers_per_block')}): "
                f"{_short(wrong, 4)}. Pass the config of the UNet it was trained on (unet_config=..., "
                "l2i-convert lora --unet-config)"
            )
    alphas: dict[str, float] = {}
    defaulted: list[str] = []
    if source == "kohya":
        for p, s in parts.items():
            if "alpha" in s:
                a = s["alpha"][1]
                if a.numel() != 1:
                    raise LoraFormatError(f"{s['alpha'][0]!r} has shape {list(a.shape)}; an alpha is one number")
                alphas[p] = float(a.reshape(()).item())
            else:
                alphas[p] = float(ranks[p])
                defaulted.append(p)
        if defaulted:
            logger.info(
                "%d kohya module(s) have no .alpha; read as alpha = rank (scale 1), as stock loaders do",
                len(defaulted),
            )
    elif alpha is not None:
        alphas = {p: _alpha_for(alpha, p) for p in parts}
    elif to == "kohya":
        raise ValueError(
            "PEFT -> kohya needs alpha (the LoRA config's lora_alpha): PEFT state dicts carry none, and kohya files "
            "must store it (ComfyUI and A1111 scale by alpha / rank; writing alpha = rank, as "
            "diffusers.convert_state_dict_to_kohya does, changes the LoRA's strength whenever lora_alpha != r)"
        )
    for p, a in alphas.items():
        if not (math.isfinite(a) and a > 0):
            raise LoraFormatError(f"module {p!r}: alpha={a!r}; expected a finite positive number")

    out: dict[str, torch.Tensor] = {}
    if to == source and (to == "kohya" and kohya_named_as_asked or to == "peft" and prefix in (None, *prefixes)):
        dropped = set(unexpected)
        out = {k: v for k, v in state_dict.items() if k not in dropped}
    elif to == "kohya":
        for p, s in parts.items():
            name = _kohya_name(p, tables, naming)
            out[f"{name}.lora_down.weight"] = s["down"][1]
            out[f"{name}.lora_up.weight"] = s["up"][1]
            if source == "peft" or "alpha" in s:
                out[f"{name}.alpha"] = torch.tensor(alphas[p], dtype=torch.float32)
    else:
        pre = prefix if prefix is not None else (next(iter(prefixes)) if prefixes else "")
        for p, s in parts.items():
            out[f"{pre}{p}.lora_A.weight"] = s["down"][1]
            out[f"{pre}{p}.lora_B.weight"] = s["up"][1]
    return LoraConversion(
        state_dict=out,
        source=source,
        target=to,
        modules=tuple(parts),
        ranks=ranks,
        alphas=alphas,
        alpha_defaulted=tuple(defaulted),
        unexpected=tuple(unexpected),
        unet_config=config,
        conv_modules=tuple(p for p, s in parts.items() if s["down"][1].ndim == 4),
        kohya_names=naming,
    )


def lora_alphas_of(unet: torch.nn.Module, adapter_name: str = "default") -> dict[str, float]:
    """Module path -> ``lora_alpha`` of every PEFT LoRA layer of ``adapter_name`` in a model.

    Read from the layers (so ``alpha_pattern`` is honoured), checked against their ``scaling``.

    Raises:
        LoraFormatError: the adapter uses rsLoRA or DoRA, which the kohya format cannot express.
        ValueError: no LoRA layer of that adapter.
    """
    from peft.tuners.lora import LoraLayer

    alphas: dict[str, float] = {}
    for name, module in unet.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        if module.use_dora.get(adapter_name, False):
            raise LoraFormatError(f"{name}: DoRA layers have no kohya LoRA equivalent; train without use_dora")
        a, r = float(module.lora_alpha[adapter_name]), int(module.r[adapter_name])
        if not math.isclose(float(module.scaling[adapter_name]), a / r, rel_tol=1e-6):
            raise LoraFormatError(
                f"{name}: scaling {module.scaling[adapter_name]} != lora_alpha / r = {a / r} (rsLoRA?); kohya loaders "
                "scale by alpha / r only, so train without use_rslora"
            )
        alphas[name] = a
    if not alphas:
        raise ValueError(f"no PEFT LoRA layers of adapter {adapter_name!r} in this model")
    return alphas


def peft_adapter_metadata(conversion: LoraConversion, prefix: str = "unet") -> dict[str, Any]:
    """The LoraConfig fields diffusers stores as ``lora_adapter_metadata`` (keys ``<prefix>.r`` etc.).

    With these, ``load_lora_weights``/``load_lora_adapter`` rebuild the exact LoRA config (rank and alpha per
    module) instead of guessing alpha from the weights.
    """
    if not conversion.alphas:
        raise ValueError("the conversion has no alphas (PEFT input without alpha); pass alpha to the conversion")
    ranks, alphas = conversion.ranks, conversion.alphas
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    a = max(set(alphas.values()), key=list(alphas.values()).count)
    fields = {
        "r": r,
        "lora_alpha": a,
        "target_modules": sorted(conversion.modules),
        "rank_pattern": {p: v for p, v in ranks.items() if v != r},
        "alpha_pattern": {p: v for p, v in alphas.items() if v != a},
    }
    return {f"{prefix}.{k}" if prefix else k: v for k, v in fields.items()}


def _alpha_from_peft_metadata(raw: Mapping[str, str]) -> float | dict[str, float] | None:
    """lora_alpha (and alpha_pattern) from diffusers' ``lora_adapter_metadata`` table, or None."""
    text = raw.get(_DIFFUSERS_METADATA_KEY)
    if not text:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    for pre in ("unet.", ""):
        if f"{pre}lora_alpha" in data:
            base = float(data[f"{pre}lora_alpha"])
            pattern = data.get(f"{pre}alpha_pattern") or {}
            if not pattern:
                return base
            return _PatternAlpha(base, {str(k): float(v) for k, v in pattern.items()})
    return None


def _fullmatch(pattern: str, key: str) -> bool:
    try:
        return re.fullmatch(pattern, key) is not None
    except re.error:
        return False


class _PatternAlpha(dict):
    """A module -> alpha mapping that falls back to the base alpha and PEFT's suffix-matching ``alpha_pattern``."""

    def __init__(self, base: float, pattern: Mapping[str, float]):
        super().__init__()
        self.base, self.pattern = base, dict(pattern)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str)

    def __getitem__(self, key: str) -> float:
        for name, value in self.pattern.items():
            if key == name or key.endswith("." + name) or _fullmatch(name, key):
                return value
        return self.base


# ---------------------------------------------------------------------------------------------------- summaries
@dataclass(frozen=True)
class LoraSummary:
    """What a UNet LoRA holds, from key names and shapes (no tensor data but the alphas).

    Args:
        format (`str`): ``"kohya"`` or ``"peft"``.
        num_modules (`int`): LoRA modules (down/up pairs).
        ranks (`tuple[int, ...]`): distinct ranks, ascending.
        alphas (`tuple[float, ...]`): distinct alphas (kohya; empty when unknown).
        conv_modules (`int`): modules whose down projection is a conv (LoCon).
        modules_without_alpha (`int`): kohya modules with no ``.alpha`` (applied with scale 1).
        other_keys (`int`): keys that are not UNet LoRA keys (text encoder, other adapters).
    """

    format: str
    num_modules: int
    ranks: tuple[int, ...]
    alphas: tuple[float, ...]
    conv_modules: int
    modules_without_alpha: int
    other_keys: int

    def describe(self) -> str:
        ranks = "/".join(map(str, self.ranks)) or "?"
        text = f"{self.format} UNet LoRA, {self.num_modules} modules ({self.conv_modules} conv), rank {ranks}"
        if self.alphas:
            alphas = "/".join(f"{a:g}" for a in self.alphas)
            scale = f", scale {self.alphas[0] / self.ranks[0]:g}" if len(self.alphas) == len(self.ranks) == 1 else ""
            text += f", alpha {alphas}{scale}"
        elif self.format == "peft":
            text += ", alpha in the LoRA config (not in the tensors)"
        return text


def summarize_lora(shapes: Mapping[str, Any], alphas: Mapping[str, Any] | None = None) -> LoraSummary:
    """Summarise a LoRA from ``key -> shape`` (tuples, `TensorInfo`s or tensors) and the ``.alpha`` values.

    Raises:
        LoraFormatError: no UNet LoRA keys (see `detect_lora_format`).
    """
    fmt = detect_lora_format(shapes)

    def shape_of(v: Any) -> tuple[int, ...]:
        return tuple(v.shape) if hasattr(v, "shape") else tuple(v)

    downs: dict[str, tuple[int, ...]] = {}
    with_alpha: set[str] = set()
    other = 0
    for key, value in shapes.items():
        split = _kohya_split(key) if fmt == "kohya" else _peft_split(key)
        if split is None:
            other += 1
        elif fmt == "kohya" and split[1] == "lora_down.weight":
            downs[split[0]] = shape_of(value)
        elif fmt == "kohya" and split[1] == "alpha":
            with_alpha.add(split[0])
        elif fmt == "peft" and split[2] == "A":
            downs[split[1]] = shape_of(value)
    values = sorted({float(torch.as_tensor(v).reshape(-1)[0]) for v in (alphas or {}).values()})
    return LoraSummary(
        format=fmt,
        num_modules=len(downs),
        ranks=tuple(sorted({s[0] for s in downs.values() if s})),
        alphas=tuple(values),
        conv_modules=sum(1 for s in downs.values() if len(s) == 4),
        modules_without_alpha=len(set(downs) - with_alpha) if fmt == "kohya" else 0,
        other_keys=other,
    )


# ---------------------------------------------------------------------------------------------------- files
@dataclass(frozen=True)
class LoraFile:
    """A LoRA file read by `load_lora_file`.

    Args:
        state_dict (`dict[str, torch.Tensor]`): the tensors as stored.
        format (`str`): ``"kohya"`` or ``"peft"``.
        raw_metadata (`dict[str, str]`): the whole ``__metadata__`` table.
        metadata (`WeightsMetadata`, *optional*): our ``l2i.*`` metadata, None for third-party files.
        unet_config (`dict`): ``l2i.unet_config`` when stored, else SD 1.5's.
        alpha (`float` or `Mapping`, *optional*): for PEFT files, the alpha from diffusers' ``lora_adapter_metadata``
            or our ``l2i.lora_alpha``; None when the file does not say.
        path (`Path`): the file read.
    """

    state_dict: dict[str, torch.Tensor]
    format: str
    raw_metadata: dict[str, str]
    metadata: WeightsMetadata | None
    unet_config: dict[str, Any]
    alpha: float | Mapping[str, float] | None
    path: Path


def load_lora_file(path: str | os.PathLike) -> LoraFile:
    """Read a LoRA safetensors file (our metadata is parsed and validated when present).

    Raises:
        WeightsFileError: missing, empty, truncated, corrupt, or not a safetensors file.
        LoraFormatError: no UNet LoRA keys.
        MetadataError: malformed ``l2i.*`` metadata, or a file of another kind.
    """
    from .metadata import MetadataError
    from .safe_load import WeightsFileError

    path = Path(path)
    container = sniff_file_format(path)
    if container != "safetensors":
        raise WeightsFileError(
            f"{str(path)!r} is a {container} file; LoRA files are read from safetensors only (convert it first)"
        )
    loaded = load_safetensors(path)
    raw = loaded.metadata
    metadata = WeightsMetadata.from_safetensors(raw, source=str(path)) if has_l2i_metadata(raw) else None
    if metadata is not None and metadata.kind != "lora":
        raise MetadataError(f"{path}: holds a {metadata.kind!r} file, not a LoRA")
    fmt = detect_lora_format(loaded.state_dict)
    unet_config = sd15_unet_config()
    alpha: float | Mapping[str, float] | None = None
    if metadata is not None:
        if "unet_config" in metadata.extra:
            try:
                unet_config = json.loads(metadata.extra["unet_config"])
            except json.JSONDecodeError as e:
                raise MetadataError(f"{path}: l2i.unet_config is not valid JSON ({e})") from None
        if "lora_alpha" in metadata.extra:
            try:
                alpha = float(metadata.extra["lora_alpha"])
            except ValueError:
                raise MetadataError(f"{path}: l2i.lora_alpha={metadata.extra['lora_alpha']!r} is no number") from None
    if alpha is None and fmt == "peft":
        alpha = _alpha_from_peft_metadata(raw)
    return LoraFile(loaded.state_dict, fmt, raw, metadata, unet_config, alpha, path)


def _kohya_metadata(conv: LoraConversion) -> dict[str, str]:
    """kohya ``ss_*`` fields (A1111 shows them and reads the SD version from them)."""
    ranks, alphas = set(conv.ranks.values()), set(conv.alphas.values())
    out = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(next(iter(ranks))) if len(ranks) == 1 else "dynamic",
        "ss_network_alpha": f"{next(iter(alphas)):g}" if len(alphas) == 1 else "dynamic",
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
    }
    if conv.conv_modules:
        first = conv.conv_modules[0]
        out["ss_network_args"] = json.dumps(
            {"conv_dim": str(conv.ranks[first]), "conv_alpha": f"{conv.alphas[first]:g}"}
        )
    return out


def save_lora_file(
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    to: str = "kohya",
    *,
    unet_config: Any = None,
    alpha: float | Mapping[str, float] | None = None,
    metadata: WeightsMetadata | None = None,
    extra_metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype | None = None,
    kohya_names: str = "auto",
) -> LoraConversion:
    """Convert a UNet LoRA (any known format) to ``to`` and write it as safetensors.

    kohya files get kohya's ``ss_*`` fields and ``l2i.kohya_names`` (the module naming written, ``diffusers`` or
    ``ldm``); PEFT files get diffusers' ``lora_adapter_metadata`` (so ``load_lora_weights`` uses the right alpha)
    and the ``unet.`` key prefix diffusers expects. Both get our ``l2i.*`` metadata (``metadata``, or a bare
    ``lora`` record) with ``l2i.unet_config``.

    Args:
        path (`str` or `os.PathLike`): the output file.
        state_dict, to, unet_config, alpha, kohya_names: as in `convert_lora_state_dict` (``kohya_names="auto"``:
            diffusers module names for SD 1.x/2.x-shaped UNets, ldm names otherwise; `kohya_names_for`).
        metadata (`WeightsMetadata`, *optional*): our metadata (kind ``lora``).
        extra_metadata (`Mapping[str, str]`, *optional*): more raw ``__metadata__`` entries.
        dtype (`torch.dtype`, *optional*): cast the LoRA matrices (alphas stay float32); None keeps them.

    Returns:
        `LoraConversion`: what was written (before the cast).
    """
    from safetensors.torch import save_file

    conv = convert_lora_state_dict(
        state_dict,
        to,
        unet_config=unet_config,
        alpha=alpha,
        prefix="unet." if to == "peft" else None,
        kohya_names=kohya_names,
    )
    if metadata is None:
        metadata = WeightsMetadata(kind="lora")
    if metadata.kind != "lora":
        raise ValueError(f"metadata.kind={metadata.kind!r}; a LoRA file needs kind 'lora'")
    metadata = metadata.replace(extra={k: v for k, v in metadata.extra.items() if k != "kohya_names"})
    metadata = metadata.with_extra(unet_config=json.dumps(conv.unet_config, sort_keys=True))
    if to == "kohya":
        metadata = metadata.with_extra(kohya_names=conv.kohya_names)
    raw = metadata.to_safetensors()
    if to == "kohya":
        raw.update(_kohya_metadata(conv))
    elif conv.alphas:
        raw[_DIFFUSERS_METADATA_KEY] = json.dumps(peft_adapter_metadata(conv), indent=2, sort_keys=True)
    raw.update(dict(extra_metadata or {}))
    tensors = {
        k: (v.to(dtype) if dtype is not None and v.ndim > 0 and v.is_floating_point() else v).contiguous()
        for k, v in conv.state_dict.items()
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=raw)
    return conv


def convert_lora_file(
    source: str | os.PathLike,
    target: str | os.PathLike,
    to: str,
    *,
    unet_config: Any = None,
    alpha: float | None = None,
    dtype: torch.dtype | None = None,
    kohya_names: str = "auto",
) -> LoraConversion:
    """Read a LoRA file once and write it as ``to`` (``"kohya"`` or ``"peft"``).

    The UNet layout comes from ``unet_config``, else the file's ``l2i.unet_config``, else SD 1.5. For a PEFT input
    the alpha comes from ``alpha``, else the file's metadata; with neither the conversion to kohya fails (it never
    guesses alpha = rank). A kohya output gets the module names ``kohya_names`` asks for (`KOHYA_NAMES`; ``auto``:
    `kohya_names_for` the layout), whatever the input's naming. Our metadata is carried over.
    """
    loaded = load_lora_file(source)
    config = unet_config if unet_config is not None else loaded.unet_config
    if loaded.format == "kohya":
        if alpha is not None:
            raise LoraFormatError(f"{source}: is a kohya file, which stores its alphas; alpha is only for PEFT input")
        use_alpha = None
    else:
        use_alpha = alpha if alpha is not None else loaded.alpha
        if use_alpha is None and to == "kohya":
            raise LoraFormatError(
                f"{source}: a PEFT LoRA without its alpha (no diffusers lora_adapter_metadata, no l2i.lora_alpha); "
                "pass the lora_alpha it was trained with (l2i-convert lora --alpha A)"
            )
    md = loaded.metadata
    if md is not None:
        md = md.replace(extra={k: v for k, v in md.extra.items() if k not in ("unet_config", "lora_alpha")})
    keep = {k: v for k, v in loaded.raw_metadata.items() if not k.startswith(("l2i.", "ss_")) and k != "format"}
    keep.pop(_DIFFUSERS_METADATA_KEY, None)
    return save_lora_file(
        target,
        loaded.state_dict,
        to,
        unet_config=config,
        alpha=use_alpha,
        metadata=md,
        extra_metadata=keep,
        dtype=dtype,
        kohya_names=kohya_names,
    )
