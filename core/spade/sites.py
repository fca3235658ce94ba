"""Where SPADE goes in a diffusers UNet: norm1 and norm2 of every ``ResnetBlock2D`` of the decoder.

Mirrors SDM (sdm.md §10.4): the mid block and the up blocks are modulated, never the encoder
(``down_blocks``), the transformers' GroupNorms or ``conv_norm_out``. The sites are found by walking the
model, so any ``UNet2DConditionModel`` layout works; SD 1.5's gives 28 sites.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffusers.models.resnet import ResnetBlock2D
from torch import nn

__all__ = ["SPADESite", "find_spade_sites", "site_key"]

_NORM_ATTRS = ("norm1", "norm2")


@dataclass
class SPADESite:
    """One GroupNorm site.

    Args:
        name (`str`): module path in the UNet, e.g. ``"up_blocks.0.resnets.1.norm2"``.
        module (`nn.Module`): the module now at that path (the GroupNorm, or its SPADE wrapper once patched).
        num_channels (`int | None`): the norm's channel count, None when the module type has none.
    """

    name: str
    module: nn.Module
    num_channels: int | None


def site_key(name: str) -> str:
    """The state-dict-safe key of a site (``"up_blocks.0.resnets.1.norm2"`` -> ``"up_blocks_0_resnets_1_norm2"``)."""
    return name.replace(".", "_")


def find_spade_sites(unet: nn.Module) -> list[SPADESite]:
    """List the SPADE sites of a diffusers UNet in forward order: the mid block's resnets, then the up blocks'.

    Args:
        unet (`nn.Module`): a diffusers ``UNet2DConditionModel`` (or any model with ``mid_block`` and
            ``up_blocks`` built from ``ResnetBlock2D``).

    Returns:
        `list[SPADESite]`: norm1 and norm2 of each ``ResnetBlock2D`` found.
    """
    up_blocks = getattr(unet, "up_blocks", None)
    if up_blocks is None:
        raise ValueError(
            f"`unet` must be a diffusers UNet with `up_blocks` (e.g. UNet2DConditionModel), got {type(unet).__name__}."
        )
    roots: list[tuple[str, nn.Module]] = []
    mid_block = getattr(unet, "mid_block", None)
    if mid_block is not None:
        roots.append(("mid_block", mid_block))
    roots.extend((f"up_blocks.{i}", block) for i, block in enumerate(up_blocks))

    sites: list[SPADESite] = []
    for prefix, root in roots:
        for path, module in root.named_modules(prefix=prefix):
            if not isinstance(module, ResnetBlock2D):
                continue
            for attr in _NORM_ATTRS:
                norm = getattr(module, attr)
                # A wrapper exposes its base layer's channel count (SPADEGroupNorm does).
                channels = getattr(norm, "num_channels", None)
                sites.append(SPADESite(name=f"{path}.{attr}", module=norm, num_channels=channels))
    return sites
