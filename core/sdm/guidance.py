"""Classifier-free guidance over the label map, as the official SDM sampler does it (sdm.md §6).

Symbols: ``s`` = ``guidance_scale``; ε_y, ε_∅ = the ε channels of the conditional and null-label (y = 0) passes;
v = the variance channels::

    ε̂ = ε_∅ + s · (ε_y − ε_∅)            (code convention: s = 1 is no guidance; paper eq. 11's s is s − 1 here)
    v̂ = v_y                              (the variance is not guided: taken from the conditional pass)

The published scales follow this convention: 1.5 (ADE20K, CelebAMask-HQ, COCO-Stuff), 2.0 (Cityscapes).
"""

from __future__ import annotations

import torch

from ..hints.encoders import null_layout_like

__all__ = ["SDM_GUIDANCE_SCALES", "guided_sdm_output", "sdm_guidance"]

#: The guidance scale of each official model (code convention), keyed by our label-set name.
SDM_GUIDANCE_SCALES = {"ade20k": 1.5, "celebamask_hq": 1.5, "cityscapes": 2.0, "coco_stuff": 1.5}


def sdm_guidance(
    cond_output: torch.Tensor, uncond_output: torch.Tensor, guidance_scale: float, eps_channels: int = 3
) -> torch.Tensor:
    """Combine a conditional and a null-label model output (the formula above).

    Args:
        cond_output (`torch.Tensor`): `(B, C_out, H, W)` model output for the label map (ε, then v).
        uncond_output (`torch.Tensor`): `(B, C_out, H, W)` model output for the null label.
        guidance_scale (`float`): ``s``.
        eps_channels (`int`, defaults to 3): how many leading channels are ε (the image channels).

    Returns:
        `torch.Tensor`: `(B, C_out, H, W)`: guided ε, then the conditional pass's remaining channels unchanged.
    """
    if cond_output.shape != uncond_output.shape:
        raise ValueError(
            f"conditional output {tuple(cond_output.shape)} and null-label output {tuple(uncond_output.shape)} "
            "must have the same shape"
        )
    if not 0 < eps_channels <= cond_output.shape[1]:
        raise ValueError(f"eps_channels={eps_channels} must be in 1..{cond_output.shape[1]}")
    eps_y, rest = cond_output[:, :eps_channels], cond_output[:, eps_channels:]
    eps_null = uncond_output[:, :eps_channels]
    eps = eps_null + guidance_scale * (eps_y - eps_null)
    return torch.cat([eps, rest], dim=1)


def guided_sdm_output(
    unet, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor, guidance_scale: float = 1.0
) -> torch.Tensor:
    """One guided SDM prediction; the conditional and null-label passes run as one batch ``[y; 0]``.

    Args:
        unet (`SDMUNet`): the model.
        x (`torch.Tensor`): `(B, 3, H, W)` ``x_t``.
        timesteps (`torch.Tensor`): `(B,)` or scalar raw timesteps.
        y (`torch.Tensor`): `(B, C_y, H, W)` conditioning tensor.
        guidance_scale (`float`, defaults to 1.0): ``s``; exactly 1 runs the conditional pass only.

    Returns:
        `torch.Tensor`: `(B, C_out, H, W)`.
    """
    if guidance_scale == 1.0:
        return unet(x, timesteps, y)
    t = torch.as_tensor(timesteps, device=x.device)
    t = t.expand(x.shape[0]) if t.ndim == 0 else t
    out = unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null_layout_like(y)]))
    cond, uncond = out.chunk(2)
    return sdm_guidance(cond, uncond, guidance_scale, eps_channels=unet.config.in_channels)
