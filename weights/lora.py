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

**Where the code is**: key names, formats and module maps in `weights.lora_naming` (kohya naming, module paths),
the state-dict conversion and alphas in `weights.lora_convert`, what the stock loaders do with each key in
`weights.lora_check`; this module reads, summarises and writes LoRA files and re-exports the public names of the
first two, so ``from layout2image.weights.lora import X`` keeps working for all of them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.files import save_safetensors_atomic
from .lora_convert import (
    _DIFFUSERS_METADATA_KEY,
    LoraConversion,
    _alpha_from_peft_metadata,
    _check_finite,
    convert_lora_state_dict,
    lora_alphas_of,
    peft_adapter_metadata,
)
from .lora_naming import (
    KNOWN_LORA_FORMATS,
    KOHYA_NAMES,
    KOHYA_UNET_PREFIX,
    LORA_FORMATS,
    LoraFormatError,
    _kohya_split,
    _peft_split,
    detect_lora_format,
    kohya_module_name,
    kohya_names_for,
    kohya_naming_of,
    sd15_unet_config,
    unet_module_map,
)
from .metadata import WeightsMetadata, has_l2i_metadata
from .safe_load import load_safetensors, sniff_file_format

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
    if dtype is not None:  # float16 holds at most 65504: larger values become inf
        _check_finite(tensors.items(), f" after the cast to {dtype} (values beyond its range); keep the input's dtype")
    save_safetensors_atomic(tensors, path, metadata=raw)  # atomic, with the umask's file mode (not 0600)
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
    try:
        return _save_converted(loaded, target, to, config, use_alpha, md, keep, dtype, kohya_names)
    except LoraFormatError as e:
        if str(source) in str(e):
            raise
        # The conversion's errors name tensors and modules; say which input file they are in.
        raise LoraFormatError(f"{str(source)!r}: {e}") from None


def _save_converted(loaded, target, to, config, use_alpha, md, keep, dtype, kohya_names) -> LoraConversion:
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
