"""Small building blocks of the SDM UNet: fp32 GroupNorm, the timestep embedding, parameter-free resampling.

None of these owns state-dict keys beyond a plain ``nn.GroupNorm``'s ``weight``/``bias``; the official names
come from where the blocks put them (``in_layers.0``, ``out.0``, ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn

from .config import SDM_NORM_GROUPS

__all__ = ["GroupNorm32", "resample", "sdm_timestep_embedding", "zero_module"]


class GroupNorm32(nn.GroupNorm):
    """guided-diffusion's ``GroupNorm32``: 32 groups, eps 1e-5, affine, statistics and affine in fp32.

    fp16 GroupNorm statistics of large activations overflow or lose precision, so the input and the affine are
    cast to fp32 and the result back to the input's dtype (the official code keeps these weights fp32 under
    ``use_fp16``; here they may be any dtype).

    Args:
        num_channels (`int`): channels, a multiple of 32.
    """

    def __init__(self, num_channels: int):
        super().__init__(SDM_NORM_GROUPS, num_channels, eps=1e-5, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`(B, C, ...)` any float dtype -> the same shape and dtype."""
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def sdm_timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """guided-diffusion's sinusoidal embedding: ``[cos(t·f_i), sin(t·f_i)]``, ``f_i = exp(−ln(1e4)·i/(dim/2))``.

    This is diffusers' ``get_timestep_embedding`` with cos first and no frequency shift, which is the same
    formula (tests/test_sdm.py checks it against the written-out one).

    Args:
        timesteps (`torch.Tensor`): `(B,)` integer or float timesteps, raw (0 .. T−1, not rescaled).
        dim (`int`): embedding width (``model_channels``).

    Returns:
        `torch.Tensor`: `(B, dim)` float32.
    """
    return get_timestep_embedding(timesteps.float(), dim, flip_sin_to_cos=True, downscale_freq_shift=0)


def resample(x: torch.Tensor, mode: str | None) -> torch.Tensor:
    """The weight-free resampling of ``resblock_updown`` blocks: nearest ×2 (``"up"``), 2×2 mean (``"down"``).

    Args:
        x (`torch.Tensor`): `(B, C, H, W)`.
        mode (`str`, *optional*): ``"up"``, ``"down"`` or None (identity).

    Returns:
        `torch.Tensor`: `(B, C, 2H, 2W)`, `(B, C, H/2, W/2)` or ``x``.
    """
    if mode is None:
        return x
    if mode == "up":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    if mode == "down":
        return F.avg_pool2d(x, kernel_size=2, stride=2)
    raise ValueError(f"resample mode {mode!r} is not one of 'up', 'down', None")


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` and return it (the official zero-init of residual branch outputs)."""
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module
