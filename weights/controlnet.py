"""ControlNet weight files: diffusers folder <-> single-file diffusers layout <-> the original ldm layout.

Three hint blocks are handled, each in both layouts:

* **standard, 3 channels** (palette RGB): diffusers ``controlnet_cond_embedding.{conv_in, blocks.N, conv_out}``
  <-> ldm ``input_hint_block.{0, 2, ..., 14}``; the file every stock loader (ComfyUI, sd-webui-controlnet, Forge,
  diffusers) reads;
* **standard, N channels** (one-hot, or N + 1 with an edge channel): the same block with other input channels;
  stock loaders read the weights, but only our pipeline feeds them an N-channel hint;
* **ALDM-native** (`ALDMControlNetModel`: five convs reading class embeddings at H/4): diffusers
  ``controlnet_cond_embedding.{0,2,4,6,8}`` <-> ldm ``input_hint_block.{0,2,4,6,8}``. Only our loaders build the
  right model for it; a stock diffusers/ComfyUI loader fails or (diffusers) silently gives a random standard hint
  block, see `layout2image.core.controlnet.models`. Such files carry ``l2i.class_name = "ALDMControlNetModel"``.

**Key mapping** (`controlnet_key_map`). It is derived from the model config, not written out for SD 1.5: the
diffusers model is built from the config on the meta device (no memory), and each of its keys is renamed:

==============================================  ===============================================================
diffusers                                       ldm (``control_model.`` prefix, or none)
==============================================  ===============================================================
``time_embedding.linear_1`` / ``linear_2``      ``time_embed.0`` / ``time_embed.2``
``conv_in``                                     ``input_blocks.0.0``
``down_blocks.i.resnets.j``                     ``input_blocks.(1 + i (L + 1) + j).0``  (L = layers_per_block)
``down_blocks.i.attentions.j``                  ``input_blocks.(1 + i (L + 1) + j).1``
``down_blocks.i.downsamplers.0.conv``           ``input_blocks.((i + 1) (L + 1)).0.op``
``mid_block.resnets.0`` / ``attentions.0`` /    ``middle_block.0`` / ``.1`` / ``.2``
``resnets.1``
``controlnet_down_blocks.k``                    ``zero_convs.k.0``
``controlnet_mid_block``                        ``middle_block_out.0``
``controlnet_cond_embedding.conv_in``           ``input_hint_block.0``
``controlnet_cond_embedding.blocks.k``          ``input_hint_block.(2k + 2)``
``controlnet_cond_embedding.conv_out``          ``input_hint_block.(2 * num_blocks + 2)``  (14 for SD 1.5)
``controlnet_cond_embedding.k`` (ALDM)          ``input_hint_block.k``
==============================================  ===============================================================

Inside resnets ``norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut`` are ``in_layers.0, in_layers.2,
emb_layers.1, out_layers.0, out_layers.3, skip_connection``; attention blocks keep their inner names.

**Format detection** (`detect_controlnet_format`) reads key names and shapes only, never file names: a layout
signature (`_LAYOUT_SIGNATURES`) and then the hint block's conv chain (conv names and the in/out channels of every
conv). A state dict that fits none raises `UnknownFormatError` listing `KNOWN_FORMATS`.

**Configs.** Weights do not fix every config value (GroupNorm groups, attention heads). Files we write store the
config as JSON in ``l2i.config``; for other files `infer_controlnet_config` reads what the shapes say and fills the
rest with SD conventions (32 groups; 8 heads, or 64-wide heads when ``cross_attention_dim`` is 1024 as in SD 2.x).
"""

from __future__ import annotations

import functools
import inspect as _inspect
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.controlnet import ALDM_HINT_CONV_INDICES, ALDM_HINT_ENCODING, ALDMControlNetModel
from ..core.files import atomic_write_text, save_safetensors_atomic
from ..core.labels import LabelSet
from ..core.logging import get_logger
from .metadata import MetadataError, WeightsMetadata, has_l2i_metadata
from .safe_load import WeightsError, WeightsFileError, load_safetensors, load_torch_file, sniff_file_format

__all__ = [
    "CONVERSION_TARGETS",
    "KNOWN_FORMATS",
    "LDM_PREFIX",
    "ControlNetConversion",
    "ControlNetFile",
    "ControlNetFormat",
    "KeyMismatchError",
    "UnknownFormatError",
    "cast_state_dict",
    "controlnet_config_of",
    "controlnet_from_file",
    "controlnet_key_map",
    "convert_controlnet_file",
    "convert_controlnet_state_dict",
    "detect_controlnet_format",
    "extract_controlnet_state_dict",
    "infer_controlnet_config",
    "load_controlnet_file",
    "save_controlnet",
    "save_controlnet_file",
]

logger = get_logger(__name__)

#: Prefix of ControlNet keys in original (lllyasviel / ldm) checkpoints.
LDM_PREFIX = "control_model."

#: Targets of `convert_controlnet_file` / ``l2i-convert controlnet --to``.
CONVERSION_TARGETS = ("diffusers", "diffusers-folder", "ldm")

#: What `detect_controlnet_format` recognises (listed in its error).
KNOWN_FORMATS = (
    "diffusers layout, standard hint block: controlnet_cond_embedding.{conv_in, blocks.N, conv_out}, "
    "controlnet_down_blocks.N, controlnet_mid_block (3-channel palette RGB or N-channel one-hot hint)",
    "diffusers layout, ALDM hint block: controlnet_cond_embedding.{0,2,4,6,8} (class embeddings at H/4)",
    "ldm layout with the 'control_model.' prefix (or none): time_embed.*, input_blocks.*, middle_block.*, "
    "zero_convs.*, middle_block_out.*, with the standard input_hint_block.{0,2,...,14}",
    "ldm layout with the ALDM input_hint_block.{0,2,4,6,8}",
    "a whole-model checkpoint (ControlLDM / Lightning .ckpt) holding control_model.* beside other parts",
)

_FOLDER_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_CONFIG_NAME = "config.json"

_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


class UnknownFormatError(WeightsError):
    """A state dict matches none of the ControlNet formats in `KNOWN_FORMATS`."""


class KeyMismatchError(WeightsError):
    """A state dict misses keys of, has keys beyond, or has shapes other than the model its config describes."""


# ---------------------------------------------------------------------------------------------------- formats
@dataclass(frozen=True)
class ControlNetFormat:
    """The format of a ControlNet state dict.

    Args:
        layout (`str`): ``"diffusers"`` or ``"ldm"``.
        hint_block (`str`): ``"standard"`` (diffusers' ``ControlNetConditioningEmbedding``) or ``"aldm"`` (five
            convs, `layout2image.core.controlnet.ALDMConditioningEmbedding`).
        hint_channels (`int`): input channels of the hint block (3, N, N + 1 or D).
        prefix (`str`, defaults to `""`): key prefix, ``"control_model."`` or ``""`` (ldm only).
    """

    layout: str
    hint_block: str
    hint_channels: int
    prefix: str = ""

    @property
    def hint_encoding(self) -> str:
        """``"embedding"`` (ALDM), ``"rgb"`` (3-channel standard) or ``"onehot"`` (other standard)."""
        if self.hint_block == "aldm":
            return "embedding"
        return "rgb" if self.hint_channels == 3 else "onehot"

    @property
    def description(self) -> str:
        """One line for people, e.g. ``ldm layout (control_model.*), standard hint block, 3 hint channels``."""
        where = f" ({self.prefix}*)" if self.prefix else (" (no prefix)" if self.layout == "ldm" else "")
        return f"{self.layout} layout{where}, {self.hint_block} hint block, {self.hint_channels} hint channels"


@dataclass(frozen=True)
class _LayoutSignature:
    layout: str
    prefix: str
    keys: tuple[tuple[str, int], ...]  # key -> number of dims


_LAYOUT_SIGNATURES = (
    _LayoutSignature(
        "diffusers",
        "",
        (
            ("time_embedding.linear_1.weight", 2),
            ("conv_in.weight", 4),
            ("controlnet_down_blocks.0.weight", 4),
            ("controlnet_mid_block.weight", 4),
        ),
    ),
    *(
        _LayoutSignature(
            "ldm",
            prefix,
            (
                (f"{prefix}time_embed.0.weight", 2),
                (f"{prefix}input_blocks.0.0.weight", 4),
                (f"{prefix}zero_convs.0.0.weight", 4),
                (f"{prefix}middle_block_out.0.weight", 4),
                (f"{prefix}input_hint_block.0.weight", 4),
            ),
        )
        for prefix in (LDM_PREFIX, "")
    ),
)


def _shape(value: Any) -> tuple[int, ...]:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if hasattr(value, "shape"):  # TensorInfo from a header
        return tuple(value.shape)
    return tuple(int(s) for s in value)


def _prefixes(keys, depth: int = 2, limit: int = 8) -> str:
    counts: dict[str, int] = {}
    for k in keys:
        p = ".".join(k.split(".")[:depth])
        counts[p] = counts.get(p, 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:limit]
    return ", ".join(f"{p}.* ({n})" for p, n in top) + (" ..." if len(counts) > limit else "")


def _unknown(state_dict: Mapping[str, Any], why: str) -> UnknownFormatError:
    known = "\n".join(f"  - {f}" for f in KNOWN_FORMATS)
    return UnknownFormatError(
        f"not a ControlNet state dict this pack knows: {why}. It has {len(state_dict)} keys: "
        f"{_prefixes(state_dict) or 'none'}. Known formats:\n{known}"
    )


def _hint_convs(state_dict: Mapping[str, Any], layout: str, prefix: str) -> list[tuple[str, tuple[int, ...]]]:
    """The hint block's conv weights as (name, shape), in order (name: ``conv_in``/``blocks.k``/``conv_out``/index)."""
    if layout == "diffusers":
        head = "controlnet_cond_embedding."
        names = [k[len(head) : -len(".weight")] for k in state_dict if k.startswith(head) and k.endswith(".weight")]

        def order(n: str) -> tuple[int, int]:
            if n == "conv_in":
                return (0, 0)
            if n == "conv_out":
                return (2, 0)
            if n.startswith("blocks.") and n[7:].isdigit():
                return (1, int(n[7:]))
            return (1, int(n)) if n.isdigit() else (3, 0)

        return [(n, _shape(state_dict[f"{head}{n}.weight"])) for n in sorted(names, key=order)]
    head = f"{prefix}input_hint_block."
    found = []
    for k in state_dict:
        rest = k[len(head) :] if k.startswith(head) else None
        if rest is not None and rest.endswith(".weight") and rest[: -len(".weight")].isdigit():
            found.append(int(rest[: -len(".weight")]))
    return [(str(i), _shape(state_dict[f"{head}{i}.weight"])) for i in sorted(found)]


def _chain_ok(shapes: list[tuple[int, ...]], out_channels: int) -> bool:
    if any(len(s) != 4 for s in shapes) or shapes[-1][0] != out_channels:
        return False
    return all(shapes[i][1] == shapes[i - 1][0] for i in range(1, len(shapes)))


def _classify_hint(convs: list[tuple[str, tuple[int, ...]]], layout: str, out_channels: int) -> str | None:
    names = [n for n, _ in convs]
    shapes = [s for _, s in convs]
    if not convs or not _chain_ok(shapes, out_channels):
        return None
    if names == [str(i) for i in ALDM_HINT_CONV_INDICES]:
        return "aldm"
    if layout == "diffusers":
        m = len(names) - 2
        standard = names == ["conv_in", *(f"blocks.{k}" for k in range(m)), "conv_out"]
    else:
        m = len(names) - 2
        standard = names == [str(2 * i) for i in range(len(names))]
    # standard: pairs of (same width, stride-2 change of width) between conv_in and conv_out
    if standard and m >= 0 and m % 2 == 0 and all(shapes[1 + 2 * k][0] == shapes[1 + 2 * k][1] for k in range(m // 2)):
        return "standard"
    return None


def detect_controlnet_format(state_dict: Mapping[str, Any]) -> ControlNetFormat:
    """Identify a ControlNet state dict by key names and shapes.

    Args:
        state_dict (`Mapping[str, Any]`): key -> tensor, or key -> shape (e.g. from a file header).

    Raises:
        UnknownFormatError: no signature matches; the message lists the keys found and `KNOWN_FORMATS`.
    """
    prefixed = sum(1 for k in state_dict if k.startswith(LDM_PREFIX))
    if 0 < prefixed < len(state_dict):
        raise _unknown(
            state_dict,
            "it holds control_model.* beside other parts (a whole-model checkpoint such as ControlLDM); take the "
            "ControlNet out first with extract_controlnet_state_dict (load_controlnet_file does)",
        )
    for sig in _LAYOUT_SIGNATURES:
        if all(k in state_dict and len(_shape(state_dict[k])) == nd for k, nd in sig.keys):
            break
    else:
        raise _unknown(state_dict, "no layout signature matches")
    conv_in = sig.keys[1][0]
    out_channels = _shape(state_dict[conv_in])[0]
    convs = _hint_convs(state_dict, sig.layout, sig.prefix)
    hint_block = _classify_hint(convs, sig.layout, out_channels)
    if hint_block is None:
        listing = ", ".join(f"{n}: {list(s)}" for n, s in convs) or "none"
        raise _unknown(
            state_dict,
            f"its {sig.layout} trunk has a hint block that is neither the standard one (conv_in, pairs of convs, "
            f"conv_out, channels chained and ending in conv_in's {out_channels}) nor ALDM's five convs; hint convs "
            f"found: {listing}",
        )
    return ControlNetFormat(sig.layout, hint_block, convs[0][1][1], sig.prefix)


# ---------------------------------------------------------------------------------------------------- configs
def controlnet_config_of(model: torch.nn.Module) -> dict[str, Any]:
    """The config of a ControlNet model as plain JSON-able data, with ``_class_name``.

    Only ``__init__`` arguments are kept (no ``_use_default_values``/``_name_or_path``), tuples become lists.
    """
    cls = type(model)
    params = set(_inspect.signature(cls.__init__).parameters) - {"self"}
    config = {k: v for k, v in dict(model.config).items() if k in params}
    return {"_class_name": cls.__name__, **json.loads(json.dumps(config))}


def _model_class(config: Mapping[str, Any]):
    from diffusers import ControlNetModel

    name = config.get("_class_name", "ControlNetModel")
    if name == ALDMControlNetModel.__name__ or config.get("hint_encoding") == ALDM_HINT_ENCODING:
        return ALDMControlNetModel
    if name == ControlNetModel.__name__:
        return ControlNetModel
    raise WeightsError(
        f"config names _class_name={name!r}; ControlNet files hold 'ControlNetModel' or 'ALDMControlNetModel'"
    )


def _build_model(config: Mapping[str, Any], device: str | torch.device = "meta") -> torch.nn.Module:
    cls = _model_class(config)
    params = set(_inspect.signature(cls.__init__).parameters) - {"self"}
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items() if k in params}
    dropped = sorted(k for k in config if k not in params and not k.startswith("_"))
    if dropped:
        logger.warning("config keys %s are not %s arguments; ignored", dropped, cls.__name__)
    if cls is ALDMControlNetModel:
        kwargs["hint_encoding"] = ALDM_HINT_ENCODING
    with torch.device(device):
        return cls(**kwargs)


@functools.lru_cache(maxsize=16)
def _expected_shapes_cached(config_json: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    model = _build_model(json.loads(config_json))
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def _config_json(config: Mapping[str, Any]) -> str:
    return json.dumps(dict(config), sort_keys=True, default=list)


def _expected_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return dict(_expected_shapes_cached(_config_json(config)))


@dataclass(frozen=True)
class _Arch:
    in_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    attention: tuple[bool, ...]
    depth: tuple[int, ...]
    mid_depth: int
    cross_attention_dim: int | None
    linear_projection: bool
    hint_channels: int
    hint_widths: tuple[int, ...]


def _count(state_dict, head: str) -> int:
    """Number of distinct integer children ``head.<i>.*``."""
    found = {k[len(head) :].split(".")[0] for k in state_dict if k.startswith(head)}
    return len({int(s) for s in found if s.isdigit()})


def _arch(state_dict: Mapping[str, Any], fmt: ControlNetFormat) -> _Arch:
    p = fmt.prefix
    if fmt.layout == "diffusers":
        nb = _count(state_dict, "down_blocks.")
        lpb = _count(state_dict, "down_blocks.0.resnets.")
        blocks = [f"down_blocks.{i}." for i in range(nb)]
        first_res = [f"{b}resnets.0.conv2.weight" for b in blocks]
        first_attn = [f"{b}attentions.0." for b in blocks]
        mid_attn = "mid_block.attentions.0."
        conv_in = "conv_in.weight"
    else:
        n_in = _count(state_dict, f"{p}input_blocks.")
        head = f"{p}input_blocks."
        downs = sorted(
            int(k[len(head) :].split(".")[0]) for k in state_dict if k.startswith(head) and k.endswith(".0.op.weight")
        )
        lpb = (downs[0] - 1) if downs else n_in - 1
        if lpb < 1 or n_in % (lpb + 1):
            raise _unknown(state_dict, f"its {n_in} input_blocks do not form blocks of layers_per_block={lpb}")
        nb = n_in // (lpb + 1)
        firsts = [1 + i * (lpb + 1) for i in range(nb)]
        first_res = [f"{p}input_blocks.{b}.0.out_layers.3.weight" for b in firsts]
        first_attn = [f"{p}input_blocks.{b}.1." for b in firsts]
        mid_attn = f"{p}middle_block.1."
        conv_in = f"{p}input_blocks.0.0.weight"
    missing = [k for k in first_res if k not in state_dict]
    if nb < 1 or missing:
        raise _unknown(state_dict, f"its down blocks cannot be read (missing {missing[:3]})")
    attention = tuple(f"{a}proj_in.weight" in state_dict for a in first_attn)
    depth = tuple(_count(state_dict, f"{a}transformer_blocks.") if has else 1 for a, has in zip(first_attn, attention))
    to_k = [k for k in state_dict if k.endswith("attn2.to_k.weight")]
    proj = [k for k in state_dict if k.endswith("proj_in.weight")]
    convs = _hint_convs(state_dict, fmt.layout, p)
    if fmt.hint_block == "aldm":
        hint_widths = tuple(s[0] for _, s in convs[:-1])
    else:
        hint_widths = (convs[0][1][0],) + tuple(s[0] for _, s in convs[2:-1:2])
    if f"{mid_attn}proj_in.weight" not in state_dict:
        raise _unknown(state_dict, "its middle block has no attention (only UNetMidBlock2DCrossAttn is supported)")
    return _Arch(
        in_channels=_shape(state_dict[conv_in])[1],
        block_out_channels=tuple(_shape(state_dict[k])[0] for k in first_res),
        layers_per_block=lpb,
        attention=attention,
        depth=depth,
        mid_depth=_count(state_dict, f"{mid_attn}transformer_blocks."),
        cross_attention_dim=_shape(state_dict[to_k[0]])[1] if to_k else None,
        linear_projection=bool(proj) and len(_shape(state_dict[proj[0]])) == 2,
        hint_channels=fmt.hint_channels,
        hint_widths=hint_widths,
    )


def infer_controlnet_config(state_dict: Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """A diffusers ControlNet config read from a state dict's keys and shapes (either layout).

    Read from the weights: ``in_channels``, ``block_out_channels``, ``layers_per_block``, ``down_block_types``,
    ``transformer_layers_per_block``, ``cross_attention_dim``, ``use_linear_projection``, ``conditioning_channels``,
    ``conditioning_embedding_out_channels`` and the class (ALDM or stock). Not in the weights, so set by SD
    convention unless given in ``overrides``: ``norm_num_groups=32``; ``attention_head_dim=8`` (SD 1.x), or
    ``block_out_channels[i] // 64`` when ``cross_attention_dim == 1024`` (SD 2.x). Everything else keeps diffusers'
    defaults.

    Args:
        state_dict (`Mapping[str, Any]`): tensors or shapes, in a format `detect_controlnet_format` knows.
        **overrides: config values that replace the inferred ones (e.g. ``norm_num_groups=8``).

    Returns:
        `dict`: JSON-able config with ``_class_name`` (``"ControlNetModel"`` or ``"ALDMControlNetModel"``).
    """
    fmt = detect_controlnet_format(state_dict)
    a = _arch(state_dict, fmt)
    depths = [d for d, has in zip(a.depth, a.attention) if has] or [1]
    if len(set(depths)) == 1 and a.mid_depth == depths[0]:
        transformer_layers: int | list[int] = depths[0]
    else:
        transformer_layers = [d if has else 1 for d, has in zip(a.depth, a.attention)]
        if a.mid_depth != transformer_layers[-1]:
            raise _unknown(
                state_dict,
                f"its middle block has {a.mid_depth} transformer layers but the last down block "
                f"{transformer_layers[-1]}; diffusers' ControlNetModel ties the two",
            )
    if a.cross_attention_dim == 1024:
        heads: int | list[int] = [c // 64 for c in a.block_out_channels]
    else:
        heads = 8
    config: dict[str, Any] = {
        "_class_name": ALDMControlNetModel.__name__ if fmt.hint_block == "aldm" else "ControlNetModel",
        "in_channels": a.in_channels,
        "conditioning_channels": a.hint_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if has else "DownBlock2D" for has in a.attention],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": list(a.block_out_channels),
        "layers_per_block": a.layers_per_block,
        "norm_num_groups": 32,
        "cross_attention_dim": a.cross_attention_dim if a.cross_attention_dim is not None else 1280,
        "transformer_layers_per_block": transformer_layers,
        "attention_head_dim": heads,
        "use_linear_projection": a.linear_projection,
        "conditioning_embedding_out_channels": list(a.hint_widths),
    }
    if fmt.hint_block == "aldm":
        config["hint_encoding"] = ALDM_HINT_ENCODING
    config.update(json.loads(json.dumps(overrides)))
    return config


# ---------------------------------------------------------------------------------------------------- key mapping
_DOWN_RE = re.compile(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)")
_MID_RE = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def _resnet_to_ldm(rest: str) -> str | None:
    head, _, tail = rest.partition(".")
    return f"{_RESNET_TO_LDM[head]}.{tail}" if head in _RESNET_TO_LDM else None


def _to_ldm_key(key: str, lpb: int, hint_blocks: int) -> str | None:
    if key.startswith("time_embedding.linear_1."):
        return "time_embed.0." + key[len("time_embedding.linear_1.") :]
    if key.startswith("time_embedding.linear_2."):
        return "time_embed.2." + key[len("time_embedding.linear_2.") :]
    if key.startswith("conv_in."):
        return "input_blocks.0.0." + key[len("conv_in.") :]
    if m := _DOWN_RE.fullmatch(key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "downsamplers":
            return (
                f"input_blocks.{(i + 1) * (lpb + 1)}.0.op.{rest[len('conv.') :]}" if rest.startswith("conv.") else None
            )
        index = 1 + i * (lpb + 1) + j
        if kind == "resnets":
            inner = _resnet_to_ldm(rest)
            return None if inner is None else f"input_blocks.{index}.0.{inner}"
        return f"input_blocks.{index}.1.{rest}"
    if m := _MID_RE.fullmatch(key):
        kind, j, rest = m[1], int(m[2]), m[3]
        if kind == "attentions":
            return f"middle_block.1.{rest}" if j == 0 else None
        inner = _resnet_to_ldm(rest)
        return None if inner is None or j > 1 else f"middle_block.{2 * j}.{inner}"
    if m := re.fullmatch(r"controlnet_down_blocks\.(\d+)\.(.+)", key):
        return f"zero_convs.{m[1]}.0.{m[2]}"
    if key.startswith("controlnet_mid_block."):
        return "middle_block_out.0." + key[len("controlnet_mid_block.") :]
    if m := re.fullmatch(r"controlnet_cond_embedding\.(conv_in|conv_out|blocks\.\d+|\d+)\.(.+)", key):
        name, rest = m[1], m[2]
        if name == "conv_in":
            index = 0
        elif name == "conv_out":
            index = 2 * hint_blocks + 2
        elif name.startswith("blocks."):
            index = 2 * int(name[len("blocks.") :]) + 2
        else:
            index = int(name)
        return f"input_hint_block.{index}.{rest}"
    return None


def controlnet_key_map(config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers key -> ldm key (without prefix) for every tensor of the ControlNet ``config`` describes.

    The model is built on the meta device to list its keys; the renaming follows the module table, with the
    ``input_blocks`` indices computed from ``layers_per_block`` and the number of down blocks.

    Raises:
        WeightsError: the config has parts the ldm layout cannot express (e.g. SDXL's ``add_embedding``).
    """
    expected = _expected_shapes(config)
    lpb = int(config.get("layers_per_block", 2))
    hint_blocks = sum(1 for k in expected if re.fullmatch(r"controlnet_cond_embedding\.blocks\.\d+\.weight", k))
    key_map, unmapped = {}, []
    for key in expected:
        ldm = _to_ldm_key(key, lpb, hint_blocks)
        if ldm is None:
            unmapped.append(key)
        else:
            key_map[key] = ldm
    if unmapped:
        raise WeightsError(
            f"the ldm ControlNet layout has no place for {len(unmapped)} key(s) of this config, e.g. {unmapped[:5]}; "
            "only SD 1.x/2.x-style ControlNets (no class or addition embeddings) convert to ldm"
        )
    if len(set(key_map.values())) != len(key_map):  # a bug in the table, never a user error
        raise RuntimeError("controlnet_key_map produced duplicate ldm keys")
    return key_map


# ---------------------------------------------------------------------------------------------------- conversion
@dataclass(frozen=True)
class ControlNetConversion:
    """Result of `convert_controlnet_state_dict`.

    Args:
        state_dict (`dict[str, torch.Tensor]`): the converted dict (a new dict; the tensors are shared with the input).
        config (`dict`): the diffusers config used for the mapping.
        source (`ControlNetFormat`): the input's format.
        target (`ControlNetFormat`): the output's format.
        missing (`tuple[str, ...]`): keys the config's model has but the input lacks (target names).
        unexpected (`tuple[str, ...]`): input keys the config's model does not have (dropped).
    """

    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]
    source: ControlNetFormat
    target: ControlNetFormat
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()


def _short(keys, n: int = 8) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


def convert_controlnet_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    to: str,
    *,
    config: Mapping[str, Any] | None = None,
    prefix: str = LDM_PREFIX,
    strict: bool = True,
) -> ControlNetConversion:
    """Rename a ControlNet state dict to the diffusers or the ldm layout.

    Pure: the input dict and its tensors are not modified (the output shares the tensors). Idempotent: an input
    already in the target layout (and, for ldm, with ``prefix``) comes back as an equal dict with the same tensors.

    Args:
        state_dict (`Mapping[str, torch.Tensor]`): a ControlNet in any format `detect_controlnet_format` knows.
        to (`str`): ``"diffusers"`` or ``"ldm"``.
        config (`Mapping`, *optional*): the diffusers config of the model; inferred from the weights when None.
        prefix (`str`, defaults to `"control_model."`): ldm key prefix of the output (``""`` for none).
        strict (`bool`, defaults to True): raise on missing or unexpected keys; when False they are reported in
            the result and logged, and unexpected keys are dropped. Shape mismatches always raise.

    Raises:
        UnknownFormatError: the input matches no known format.
        KeyMismatchError: keys or shapes do not fit the config's model (the message lists them).
    """
    if to not in ("diffusers", "ldm"):
        raise ValueError(f"to={to!r}: expected 'diffusers' or 'ldm'")
    if prefix not in (LDM_PREFIX, ""):
        raise ValueError(f"prefix={prefix!r}: expected {LDM_PREFIX!r} or '' (no prefix)")
    source = detect_controlnet_format(state_dict)
    config = dict(config) if config is not None else infer_controlnet_config(state_dict)
    key_map = controlnet_key_map(config)
    expected = _expected_shapes(config)
    if source.layout == "diffusers":
        to_diffusers = {k: k for k in key_map}
    else:
        to_diffusers = {source.prefix + v: k for k, v in key_map.items()}
    unexpected = tuple(k for k in state_dict if k not in to_diffusers)
    present = {to_diffusers[k] for k in state_dict if k in to_diffusers}
    missing_diffusers = [k for k in key_map if k not in present]
    wrong = [
        f"{k}: {list(_shape(state_dict[k]))} (config expects {list(expected[to_diffusers[k]])})"
        for k in state_dict
        if k in to_diffusers and _shape(state_dict[k]) != expected[to_diffusers[k]]
    ]
    target_prefix = prefix if to == "ldm" else ""
    target = ControlNetFormat(to, source.hint_block, source.hint_channels, target_prefix)

    def target_name(diffusers_key: str) -> str:
        return diffusers_key if to == "diffusers" else target_prefix + key_map[diffusers_key]

    missing = tuple(target_name(k) for k in missing_diffusers)
    if wrong:
        raise KeyMismatchError(
            f"{len(wrong)} tensor(s) have shapes other than the config's model: {_short(wrong, 5)}. The config does "
            "not describe these weights; pass the right config (or none, to infer it from the weights)"
        )
    if missing or unexpected:
        message = (
            f"the {source.description} state dict does not fit the config's {config.get('_class_name')}: "
            + (f"{len(missing)} missing key(s): {_short(missing)}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"{len(unexpected)} unexpected key(s): {_short(unexpected)}" if unexpected else "")
        )
        if strict:
            raise KeyMismatchError(message + ". Pass strict=False to convert anyway (unexpected keys are dropped)")
        logger.warning("%s; converting anyway", message)
    if source.layout == to and (to == "diffusers" or source.prefix == target_prefix):
        out = dict(state_dict)
    else:
        by_diffusers = {to_diffusers[k]: v for k, v in state_dict.items() if k in to_diffusers}
        out = {target_name(k): by_diffusers[k] for k in key_map if k in by_diffusers}
    return ControlNetConversion(out, config, source, target, missing, unexpected)


def cast_state_dict(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """A new dict with floating-point tensors cast to ``dtype`` (integer tensors and ``None`` dtype: unchanged)."""
    if dtype is None:
        return dict(state_dict)
    if not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype}: weights can only be cast to a floating-point dtype (float16, float32, ...)")
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state_dict.items()}


# ---------------------------------------------------------------------------------------------------- checkpoints
def extract_controlnet_state_dict(obj: Any, source: str = "<checkpoint>", *, copy: bool = True) -> dict[str, Any]:
    """The ControlNet tensors of a loaded torch checkpoint.

    Accepts a plain state dict, or a Lightning-style dict with a ``"state_dict"`` entry. When any key starts with
    ``control_model.`` only those keys are taken (a ControlLDM checkpoint also holds ``model.diffusion_model.*``,
    ``first_stage_model.*``, ``cond_stage_model.*``), and with ``copy=True`` each is cloned, so nothing keeps the
    (memory-mapped) rest of the file alive and only the ControlNet's bytes are ever read.

    Raises:
        WeightsFileError: ``obj`` is not a mapping of tensors.
    """
    if not isinstance(obj, Mapping):
        raise WeightsFileError(f"{source}: holds a {type(obj).__name__}, not a state dict (a mapping of tensors)")
    state = obj.get("state_dict") if isinstance(obj.get("state_dict"), Mapping) else obj
    control = [k for k in state if isinstance(k, str) and k.startswith(LDM_PREFIX)]
    if control:
        others = [k for k in state if k not in set(control)]
        if others:
            logger.info("%s: taking %d control_model.* tensors, skipping %d others", source, len(control), len(others))
        selected = {k: state[k] for k in control}
    else:
        selected = dict(state)
    bad = [k for k, v in selected.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsFileError(f"{source}: entries {bad[:5]} are not tensors, so this is not a weights state dict")
    return {k: v.clone() for k, v in selected.items()} if copy and control else selected


# ---------------------------------------------------------------------------------------------------- files
@dataclass(frozen=True)
class ControlNetFile:
    """A ControlNet read from disk by `load_controlnet_file`.

    Args:
        state_dict (`dict[str, torch.Tensor]`): the tensors as stored (layout of ``format``).
        config (`dict`): the diffusers config: from ``l2i.config``, the folder's ``config.json``, or inferred.
        format (`ControlNetFormat`): detected from the keys and shapes.
        metadata (`WeightsMetadata`, *optional*): our metadata, None for third-party files.
        path (`Path`): the file or folder read.
    """

    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]
    format: ControlNetFormat
    metadata: WeightsMetadata | None
    path: Path


def _read_folder(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, Any]]:
    config_path = path / _CONFIG_NAME
    if not config_path.is_file():
        raise WeightsFileError(f"{str(path)!r} is a folder without {_CONFIG_NAME}, so not a diffusers model folder")
    try:
        folder_config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsFileError(f"cannot read {str(config_path)!r}: {e}") from None
    for name in _FOLDER_WEIGHTS:
        weights = path / name
        if weights.is_file():
            break
    else:
        present = sorted(p.name for p in path.iterdir())
        raise WeightsFileError(
            f"{str(path)!r} has no {' or '.join(_FOLDER_WEIGHTS)} (it holds {present}); sharded or variant "
            "folders are not supported here, load them with diffusers and save_pretrained them first"
        )
    if sniff_file_format(weights) == "safetensors":
        loaded = load_safetensors(weights)
        state_dict, raw = loaded.state_dict, loaded.metadata
    else:
        state_dict, raw = extract_controlnet_state_dict(load_torch_file(weights), str(weights), copy=False), {}
    config = {k: v for k, v in folder_config.items() if not k.startswith("_") or k == "_class_name"}
    return state_dict, raw, config


def load_controlnet_file(path: str | os.PathLike) -> ControlNetFile:
    """Read a ControlNet from a diffusers folder, a safetensors file, or a torch file (``weights_only``).

    The container is recognised by content, the format by key signature. A whole-model ldm checkpoint (e.g. a
    ControlLDM ``.ckpt``) contributes only its ``control_model.*`` tensors.

    Raises:
        WeightsFileError: unreadable, truncated or unsafe file.
        UnknownFormatError: the tensors are no known ControlNet format.
        MetadataError: malformed ``l2i.*`` metadata.
    """
    path = Path(path)
    config: dict[str, Any] | None = None
    if path.is_dir():
        state_dict, raw, config = _read_folder(path)
    elif sniff_file_format(path) == "safetensors":
        loaded = load_safetensors(path)
        state_dict, raw = loaded.state_dict, loaded.metadata
    else:
        state_dict, raw = extract_controlnet_state_dict(load_torch_file(path), str(path)), {}
    metadata = WeightsMetadata.from_safetensors(raw, source=str(path)) if has_l2i_metadata(raw) else None
    fmt = detect_controlnet_format(state_dict)
    if metadata is not None:
        if metadata.kind != "controlnet":
            raise MetadataError(f"{path}: holds a {metadata.kind!r} file, not a ControlNet")
        if "config" in metadata.extra:
            try:
                config = json.loads(metadata.extra["config"])
            except json.JSONDecodeError as e:
                raise MetadataError(f"{path}: l2i.config is not valid JSON ({e})") from None
        _check_encoding(metadata, fmt, str(path))
    if config is None:
        config = infer_controlnet_config(state_dict)
    return ControlNetFile(state_dict, config, fmt, metadata, path)


def _check_encoding(metadata: WeightsMetadata, fmt: ControlNetFormat, source: str) -> None:
    ok = {"embedding": ("embedding",), "rgb": ("rgb",), "onehot": ("onehot", "onehot_edges")}[fmt.hint_encoding]
    if metadata.hint_encoding not in ok:
        raise MetadataError(
            f"{source}: metadata says hint_encoding={metadata.hint_encoding!r}, but the weights are a "
            f"{fmt.description} ({fmt.hint_encoding!r} hints); the file was edited or mislabelled"
        )
    ls = metadata.label_set
    if ls is not None and fmt.hint_encoding == "onehot":
        channels = ls.num_classes + int(metadata.hint_encoding == "onehot_edges")
        if channels != fmt.hint_channels:
            raise MetadataError(
                f"{source}: the hint block reads {fmt.hint_channels} channels, but label set {ls.name!r} with "
                f"{metadata.hint_encoding!r} gives {channels}"
            )


def _output_metadata(metadata: WeightsMetadata | None, conv: ControlNetConversion, layout: str) -> WeightsMetadata:
    if metadata is None:
        metadata = WeightsMetadata(kind="controlnet", hint_encoding=conv.source.hint_encoding)
    _check_encoding(metadata, conv.source, "metadata")
    return metadata.with_extra(
        config=json.dumps(conv.config, sort_keys=True),
        class_name=str(conv.config.get("_class_name", "ControlNetModel")),
        layout=layout,
    )


def save_controlnet_file(
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping[str, Any] | None = None,
    *,
    to: str = "diffusers",
    metadata: WeightsMetadata | None = None,
    dtype: torch.dtype | None = None,
    prefix: str = LDM_PREFIX,
) -> Path:
    """Write a ControlNet state dict (any known format) as ``to``, with metadata.

    Args:
        path (`str` or `os.PathLike`): the output file, or folder for ``"diffusers-folder"``.
        state_dict (`Mapping[str, torch.Tensor]`): the weights, in any format `detect_controlnet_format` knows.
        config (`Mapping`, *optional*): the diffusers config; inferred when None.
        to (`str`, defaults to `"diffusers"`): one of `CONVERSION_TARGETS`: a single diffusers-layout safetensors,
            a diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors``), or an ldm-layout
            safetensors (``control_model.*`` keys unless ``prefix=""``).
        metadata (`WeightsMetadata`, *optional*): written with ``l2i.config``/``l2i.class_name``/``l2i.layout``
            added; a bare ``controlnet`` record when None.
        dtype (`torch.dtype`, *optional*): cast floating tensors (e.g. ``torch.float16``); None keeps them.
        prefix (`str`, defaults to `"control_model."`): ldm key prefix.

    Returns:
        `Path`: the file or folder written.
    """
    if to not in CONVERSION_TARGETS:
        raise ValueError(f"to={to!r}: expected one of {', '.join(CONVERSION_TARGETS)}")
    path = Path(path)
    conv = convert_controlnet_state_dict(
        state_dict, "ldm" if to == "ldm" else "diffusers", config=config, prefix=prefix
    )
    tensors = {k: v.contiguous() for k, v in cast_state_dict(conv.state_dict, dtype).items()}
    md = _output_metadata(metadata, conv, to).to_safetensors()
    if to == "diffusers-folder":
        import diffusers

        path.mkdir(parents=True, exist_ok=True)
        folder_config = {**conv.config, "_diffusers_version": diffusers.__version__}
        atomic_write_text(path / _CONFIG_NAME, json.dumps(folder_config, indent=2, sort_keys=True) + "\n")
        save_safetensors_atomic(tensors, path / _FOLDER_WEIGHTS[0], metadata=md)
    else:
        save_safetensors_atomic(tensors, path, metadata=md)
    return path


def save_controlnet(
    model: torch.nn.Module,
    path: str | os.PathLike,
    *,
    to: str = "diffusers",
    metadata: WeightsMetadata | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a ``ControlNetModel``/`ALDMControlNetModel` as ``to`` (see `save_controlnet_file`) with its config."""
    return save_controlnet_file(
        path, model.state_dict(), controlnet_config_of(model), to=to, metadata=metadata, dtype=dtype
    )


def convert_controlnet_file(
    source: str | os.PathLike, target: str | os.PathLike, to: str, *, dtype: torch.dtype | None = None
) -> Path:
    """Read a ControlNet file or folder once and write it as ``to`` (one of `CONVERSION_TARGETS`).

    Our metadata is carried over (with the target layout); third-party files get a bare ``controlnet`` record.
    """
    loaded = load_controlnet_file(source)
    return save_controlnet_file(target, loaded.state_dict, loaded.config, to=to, metadata=loaded.metadata, dtype=dtype)


def controlnet_from_file(
    path: str | os.PathLike,
    *,
    label_set: LabelSet | None = None,
    hint_encoding: str | None = None,
    base_model: str | None = None,
    torch_dtype: torch.dtype | None = None,
):
    """Build the ControlNet a file or folder holds (stock ``ControlNetModel`` or `ALDMControlNetModel`).

    Our metadata is checked against ``label_set``, ``hint_encoding`` and ``base_model`` when given; a file
    without our metadata skips those checks. The model is built on the meta device and the file's tensors are
    assigned to it (no second copy), then cast to ``torch_dtype`` if given.

    Raises:
        MetadataError: the file was trained for another label set, hint or base model (the message names both).
    """
    loaded = load_controlnet_file(path)
    if loaded.metadata is not None:
        loaded.metadata.check(
            kind="controlnet",
            label_set=label_set,
            hint_encoding=hint_encoding,
            base_model=base_model,
            source=str(path),
        )
    conv = convert_controlnet_state_dict(loaded.state_dict, "diffusers", config=loaded.config)
    model = _build_model(conv.config, device="meta")
    model.load_state_dict(conv.state_dict, strict=True, assign=True)
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    return model.eval()
