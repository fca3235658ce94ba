"""Converting a UNet LoRA state dict between the PEFT and the kohya format (`convert_lora_state_dict`), and the
alphas that conversion needs (`lora_alphas_of`, `peft_adapter_metadata`, diffusers' ``lora_adapter_metadata``).

Key names and module paths come from `weights.lora_naming`; `weights.lora` reads and writes files and re-exports
these names.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.logging import get_logger
from .lora_naming import (
    KNOWN_LORA_FORMATS,
    LORA_FORMATS,
    LoraFormatError,
    _check_kohya_names,
    _kohya_name,
    _kohya_split,
    _peft_split,
    _resolve_kohya_names,
    _tables_for,
    _weight_shapes,
    detect_lora_format,
    kohya_names_for,
)

__all__ = ["LoraConversion", "convert_lora_state_dict", "lora_alphas_of", "peft_adapter_metadata"]

logger = get_logger(__name__)

_DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY


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


def _nonfinite(key: str, tensor: torch.Tensor) -> str:
    """``"<key> (n NaN, m inf of k values)"`` for a float tensor holding NaN or inf values, else ``""``."""
    if not tensor.is_floating_point() or tensor.is_meta or bool(torch.isfinite(tensor).all()):
        return ""
    counts = ((int(torch.isnan(tensor).sum()), "NaN"), (int(torch.isinf(tensor).sum()), "inf"))
    return f"{key} ({', '.join(f'{n} {what}' for n, what in counts if n)} of {tensor.numel()} values)"


def _check_finite(tensors, why: str) -> None:
    """Raise `LoraFormatError` naming the ``(key, tensor)`` pairs with NaN or inf values (count, first three)."""
    bad = [entry for entry in (_nonfinite(k, v) for k, v in tensors) if entry]
    if bad:
        raise LoraFormatError(f"{len(bad)} LoRA tensor(s) hold NaN or infinite values: {_short(bad, 3)}{why}")


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
        LoraFormatError: unknown or mixed format, unknown modules or suffixes, unpaired or ill-shaped tensors, NaN or
            inf values in a LoRA matrix.
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
    # A NaN or inf anywhere in up @ down spreads to the whole weight it is added to, and from there to every image
    # the LoRA touches: a diverged training run's file, never something to pass on to a UI.
    _check_finite(
        (s[part] for s in parts.values() for part in ("down", "up")),
        "; such a LoRA turns every image it is applied to into NaN (a diverged training run?), so it is not converted",
    )
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
