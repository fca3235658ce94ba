"""``SPADEAdapter``: the SPADE modules of all sites of one UNet, with stable state-dict names.

State-dict keys are ``sites.<site key>.sem_{shared,gamma,beta}.{weight,bias}`` where the site key is the
site's module path with "." replaced by "_" (``sites.up_blocks_0_resnets_1_norm2.sem_gamma.weight``). The
adapter's config records the site paths, so the weights can be rebuilt and placed without the UNet at hand.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .module import SPADE
from .sites import find_spade_sites, site_key

__all__ = ["SPADEAdapter"]


class SPADEAdapter(ModelMixin, ConfigMixin):
    """One ``SPADE`` module per GroupNorm site, in an ``nn.ModuleDict`` keyed by ``site_key(site)``.

    Args:
        site_names (`list[str]`): module paths of the sites in the UNet (e.g. ``"mid_block.resnets.0.norm1"``).
        feature_channels (`list[int]`): channel count of each site's GroupNorm, in the same order.
        layout_channels (`int`): ``C_m``, channels of the layout encoding.
        hidden_channels (`int`, *optional*, defaults to 128): width of each site's shared conv.
        kernel_size (`int`, *optional*, defaults to 3): kernel size of the γ/β convs.
        shared_kernel_size (`int`, *optional*, defaults to 3): kernel size of the shared convs.
    """

    @register_to_config
    def __init__(
        self,
        site_names: list[str],
        feature_channels: list[int],
        layout_channels: int,
        hidden_channels: int = 128,
        kernel_size: int = 3,
        shared_kernel_size: int = 3,
    ):
        super().__init__()
        if len(site_names) == 0:
            raise ValueError("`site_names` is empty: a SPADEAdapter needs at least one site.")
        if len(site_names) != len(feature_channels):
            raise ValueError(
                f"`site_names` ({len(site_names)}) and `feature_channels` ({len(feature_channels)}) must have the "
                "same length."
            )
        keys = [site_key(name) for name in site_names]
        if len(set(keys)) != len(keys):
            raise ValueError(f"`site_names` map to duplicate keys: {sorted(k for k in keys if keys.count(k) > 1)}.")
        self.sites = nn.ModuleDict(
            {
                key: SPADE(layout_channels, int(channels), hidden_channels, kernel_size, shared_kernel_size)
                for key, channels in zip(keys, feature_channels)
            }
        )

    @classmethod
    def from_unet(
        cls,
        unet: nn.Module,
        layout_channels: int,
        hidden_channels: int = 128,
        kernel_size: int = 3,
        shared_kernel_size: int = 3,
        dtype: torch.dtype = torch.float32,
    ) -> SPADEAdapter:
        """Build an adapter for every SPADE site of ``unet`` (``find_spade_sites``), on the UNet's device.

        Only reads ``unet``. γ/β start at zero, so patching with a fresh adapter leaves the outputs unchanged.

        Args:
            unet (`nn.Module`): a diffusers ``UNet2DConditionModel``.
            layout_channels (`int`): ``C_m`` of the layout encoding.
            hidden_channels (`int`, *optional*, defaults to 128): shared conv width.
            kernel_size (`int`, *optional*, defaults to 3): γ/β conv kernel size.
            shared_kernel_size (`int`, *optional*, defaults to 3): shared conv kernel size.
            dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): trainable weights stay fp32.
        """
        sites = find_spade_sites(unet)
        unsupported = [f"{s.name} ({type(s.module).__name__})" for s in sites if s.num_channels is None]
        if unsupported:
            raise ValueError(f"these SPADE sites have no `num_channels` (unsupported norm type): {unsupported}.")
        adapter = cls(
            site_names=[s.name for s in sites],
            feature_channels=[int(s.num_channels) for s in sites],
            layout_channels=layout_channels,
            hidden_channels=hidden_channels,
            kernel_size=kernel_size,
            shared_kernel_size=shared_kernel_size,
        )
        adapter.to(device=next(unet.parameters()).device)
        if dtype != adapter.sites[site_key(sites[0].name)].sem_gamma.weight.dtype:
            adapter.to(dtype=dtype)  # only when asked: ModelMixin.to(dtype) logs a float32 warning every time
        return adapter

    @property
    def site_names(self) -> list[str]:
        return list(self.config.site_names)

    def spade_for(self, site_name: str) -> SPADE:
        """The SPADE module of the site at module path ``site_name``."""
        key = site_key(site_name)
        if key not in self.sites:
            raise KeyError(f"no SPADE module for site {site_name!r}; known sites: {self.site_names}.")
        return self.sites[key]

    def reset_modulation(self) -> None:
        """Zero γ/β of every site (the patched UNet then equals the original)."""
        for spade in self.sites.values():
            spade.reset_modulation()
