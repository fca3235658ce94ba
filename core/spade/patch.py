"""Patch a diffusers UNet's GroupNorm sites with SPADE wrappers, in place, and undo it.

``patch_unet`` mutates the UNet it is given (PEFT's ``inject_adapter_in_model`` does the same): each site's
``nn.GroupNorm`` is replaced by a ``SPADEGroupNorm`` holding it as ``base_layer``. The UNet's state dict then
has ``<site>.base_layer.{weight,bias}`` and ``<site>.spade.sem_*`` keys; save LoRA and SPADE weights through
``core.sdm_lora`` / ``SPADEAdapter`` rather than ``unet.save_pretrained``, or unpatch first. ``unpatch_unet``
puts the original GroupNorm objects back (same identity), so keys and outputs are exactly those of before.

A second ``patch_unet`` is refused: one adapter per UNet, swap it by unpatching first.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..logging import get_logger
from .adapter import SPADEAdapter
from .context import SPADELayoutContext
from .module import SPADEGroupNorm, dispatch_spade_wrapper
from .sites import find_spade_sites

logger = get_logger(__name__)

__all__ = [
    "SPADEPatchError",
    "clear_spade_layout",
    "get_spade_adapter",
    "get_spade_context",
    "is_spade_patched",
    "patch_unet",
    "set_spade_layout",
    "spade_layout",
    "unpatch_unet",
]

# Attribute on the patched UNet holding the patch state (plain attribute, not a submodule: no state-dict keys).
_STATE_ATTR = "_l2i_spade_patch"


class SPADEPatchError(RuntimeError):
    """A UNet is patched twice, unpatched while not patched, or its patched sites were replaced since."""


@dataclass
class _PatchState:
    adapter: SPADEAdapter
    context: SPADELayoutContext
    site_names: list[str]


def _state(unet: nn.Module) -> _PatchState | None:
    return unet.__dict__.get(_STATE_ATTR)


def _require_state(unet: nn.Module, action: str) -> _PatchState:
    state = _state(unet)
    if state is None:
        raise SPADEPatchError(
            f"cannot {action}: this {type(unet).__name__} is not SPADE-patched; call patch_unet first."
        )
    return state


def _split(name: str) -> tuple[str, str]:
    parent, _, attr = name.rpartition(".")
    return parent, attr


def is_spade_patched(unet: nn.Module) -> bool:
    """Whether ``patch_unet`` was applied to ``unet`` (and not undone)."""
    return _state(unet) is not None


def get_spade_adapter(unet: nn.Module) -> SPADEAdapter:
    """The ``SPADEAdapter`` whose modules are patched into ``unet``."""
    return _require_state(unet, "get the SPADE adapter").adapter


def get_spade_context(unet: nn.Module) -> SPADELayoutContext:
    """The layout context shared by the wrappers of ``unet``."""
    return _require_state(unet, "get the layout context").context


def patch_unet(unet: nn.Module, adapter: SPADEAdapter) -> list[str]:
    """Replace the GroupNorm at each of ``adapter``'s sites by a ``SPADEGroupNorm`` (in place).

    Every site is checked before anything is replaced, so a failed patch leaves the UNet untouched. The
    adapter is moved to the UNet's device (its dtype is kept: trainable weights stay fp32).

    Args:
        unet (`nn.Module`): a diffusers ``UNet2DConditionModel``; mutated.
        adapter (`SPADEAdapter`): e.g. ``SPADEAdapter.from_unet(unet, layout_channels)``; its
            ``site_names`` say which sites are patched (all of ``find_spade_sites`` for ``from_unet``).

    Returns:
        `list[str]`: the patched site names, in the adapter's order.

    Raises:
        `SPADEPatchError`: the UNet is already patched.
        `ValueError`: a site is missing, is not a GroupNorm, or its channel count differs from the adapter's.
    """
    if _state(unet) is not None:
        raise SPADEPatchError(
            f"this {type(unet).__name__} is already SPADE-patched ({len(_state(unet).site_names)} sites); patching "
            "twice would wrap the wrappers. Call unpatch_unet(unet) first to swap adapters."
        )
    if not isinstance(adapter, SPADEAdapter):
        raise TypeError(f"`adapter` must be a SPADEAdapter, got {type(adapter).__name__}.")
    found = {site.name: site for site in find_spade_sites(unet)}
    context = SPADELayoutContext()
    problems: list[str] = []
    wrappers: dict[str, nn.Module] = {}
    for name in adapter.site_names:
        site = found.get(name)
        if site is None:
            problems.append(f"{name}: not a SPADE site of this UNet")
            continue
        if isinstance(site.module, SPADEGroupNorm):
            problems.append(f"{name}: already wrapped by SPADEGroupNorm (patched by another path?)")
            continue
        spade = adapter.spade_for(name)
        if site.num_channels != spade.feature_channels:
            problems.append(
                f"{name}: GroupNorm has {site.num_channels} channels, adapter has {spade.feature_channels}"
            )
            continue
        wrapper = dispatch_spade_wrapper(site.module, spade, context, name)
        if wrapper is None:
            problems.append(f"{name}: unsupported module type {type(site.module).__name__} (expected nn.GroupNorm)")
            continue
        wrappers[name] = wrapper
    if problems:
        raise ValueError(
            "`adapter` does not fit this UNet, nothing was patched:\n  "
            + "\n  ".join(problems)
            + "\nBuild the adapter with SPADEAdapter.from_unet(unet, ...) for this UNet's architecture."
        )

    device = next(unet.parameters()).device
    adapter.to(device=device)
    for name, wrapper in wrappers.items():
        parent, attr = _split(name)
        setattr(unet.get_submodule(parent), attr, wrapper)
    unet.__dict__[_STATE_ATTR] = _PatchState(adapter=adapter, context=context, site_names=list(wrappers))
    logger.debug("SPADE-patched %d GroupNorm sites of %s", len(wrappers), type(unet).__name__)
    return list(wrappers)


def unpatch_unet(unet: nn.Module) -> SPADEAdapter:
    """Put the original GroupNorm objects back at every patched site (in place).

    Returns:
        `SPADEAdapter`: the adapter that was patched in (its weights are untouched).

    Raises:
        `SPADEPatchError`: the UNet is not patched, or a patched site no longer holds its wrapper.
    """
    state = _require_state(unet, "unpatch")
    current = {name: unet.get_submodule(name) for name in state.site_names}
    replaced = [name for name, module in current.items() if not isinstance(module, SPADEGroupNorm)]
    if replaced:
        raise SPADEPatchError(
            f"cannot unpatch: these sites no longer hold their SPADEGroupNorm (replaced since patching): {replaced}."
        )
    for name, wrapper in current.items():
        parent, attr = _split(name)
        setattr(unet.get_submodule(parent), attr, wrapper.base_layer)
    state.context.clear()
    del unet.__dict__[_STATE_ATTR]
    logger.debug("SPADE unpatched %d sites of %s", len(current), type(unet).__name__)
    return state.adapter


def set_spade_layout(
    unet: nn.Module, layout: torch.Tensor, chunks: Sequence[str] = ("layout",), strength: float = 1.0
) -> None:
    """Set the layout for the following calls of a patched ``unet`` (until ``clear_spade_layout``).

    Args:
        unet (`nn.Module`): a SPADE-patched UNet.
        layout (`torch.Tensor`): `(L, C_m, H, W)` float layout encoding, any resolution.
        chunks (`Sequence[str]`, *optional*, defaults to `("layout",)`): what each consecutive equal chunk of
            the UNet batch gets, ``"layout"`` or ``"null"``; ``CFG_UNCOND_COND`` for a `[uncond, cond]` batch.
            See ``core.spade.context`` for the batch rule.
        strength (`float`, *optional*, defaults to 1.0): scales γ and β.
    """
    _require_state(unet, "set a layout").context.set(layout, chunks=chunks, strength=strength)


def clear_spade_layout(unet: nn.Module) -> None:
    """Forget the layout of a patched ``unet``."""
    _require_state(unet, "clear the layout").context.clear()


@contextmanager
def spade_layout(
    unet: nn.Module, layout: torch.Tensor, chunks: Sequence[str] = ("layout",), strength: float = 1.0
) -> Iterator[SPADELayoutContext]:
    """Use ``layout`` for the patched ``unet``'s calls inside the block; the previous setting comes back after.

    With gradient checkpointing, call ``backward`` inside the block too (the resnets are recomputed then).
    ``unet`` is the patched model itself; once it is wrapped (DDP, accelerate), use
    ``get_spade_context(unet).use(...)`` with the context taken before wrapping.

    Example::

        with spade_layout(unet, layout, chunks=CFG_UNCOND_COND):
            eps = unet(torch.cat([latents] * 2), t, encoder_hidden_states=torch.cat([uncond, cond])).sample

    Args: as ``set_spade_layout``.
    """
    context = _require_state(unet, "set a layout").context
    with context.use(layout, chunks=chunks, strength=strength):
        yield context
