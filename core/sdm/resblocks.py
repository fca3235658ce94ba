"""The two SDM resblocks: the encoder's SDE (plain GroupNorm) and the decoder's SDD (SPADE at both norms).

SDE (sdm.md §3; keys ``in_layers.{0,2}``, ``emb_layers.1``, ``out_layers.{0,3}``, ``skip_connection``)::

    h = Conv3×3(SiLU(GN(x)))                                   # in_layers = [GN, SiLU, Conv]
    s, b = Linear(SiLU(emb)).chunk(2)                           # emb_layers = [SiLU, Linear]
    h = GN(h)·(1 + s) + b                                       # out_layers[0]
    h = ZeroConv3×3(Dropout(SiLU(h)))                           # out_layers = [GN, SiLU, Dropout, Conv]
    out = skip(x) + h

SDD (keys ``in_norm.mlp_*``, ``in_layers.1``, ``emb_layers.1``, ``out_norm.mlp_*``, ``out_layers.2``,
``skip_connection``): the same with both GNs replaced by SPADE, and the timestep scale-shift applied on top of
SPADE's output::

    h = Conv3×3(SiLU(SPADE_in(x, y)))                           # in_norm; in_layers = [SiLU, Conv]
    h = SPADE_out(h, y)·(1 + s) + b                             # out_norm
    h = ZeroConv3×3(Dropout(SiLU(h)))                           # out_layers = [SiLU, Dropout, Conv]

so the SDD's zero conv is ``out_layers.2`` (the SDE's is ``out_layers.3``: its GN is element 0).

Up/down blocks (``resblock_updown``) resample ``h`` after the first norm+SiLU and before the conv, and ``x``
on the skip path; an up-SDD therefore runs SPADE_in at the old resolution and SPADE_out at the new one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..spade.module import SPADEModulation, spade_group_norm
from .config import SDM_NORM_GROUPS
from .layers import GroupNorm32, resample, zero_module

__all__ = ["SDMDecoderResBlock", "SDMEncoderResBlock", "SDMSpadeNorm"]


class SDMSpadeNorm(nn.Module):
    """One SPADE site of the official SDM (``SPADEGroupNorm``): affine-free GN(32) modulated by the label map.

    ``out = GN(x)·(1 + γ(m)) + β(m)``, ``m = nearest_resize(y, (H, W))``, ``γ, β = Conv3×3(ReLU(Conv3×3(m)))``.
    The formula is the project's one `spade_group_norm` (fp32 statistics, nearest resize); this class only owns
    the convs under the official names (``mlp_shared.0``, ``mlp_gamma``, ``mlp_beta``) and duck-types
    ``core.spade.SPADE`` for it. Unlike SDM-LoRA's SPADE, γ/β keep PyTorch's default init (the official code
    trains from scratch; nothing to preserve).

    Args:
        feature_channels (`int`): C of the normalised feature map (a multiple of 32).
        layout_channels (`int`): ``C_y`` of the conditioning tensor.
        hidden_channels (`int`, defaults to 128): width of the shared conv.
    """

    def __init__(self, feature_channels: int, layout_channels: int, hidden_channels: int = 128):
        super().__init__()
        self.feature_channels = feature_channels
        self.layout_channels = layout_channels
        self.mlp_shared = nn.Sequential(nn.Conv2d(layout_channels, hidden_channels, 3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(hidden_channels, feature_channels, 3, padding=1)
        self.mlp_beta = nn.Conv2d(hidden_channels, feature_channels, 3, padding=1)

    def forward(self, layout: torch.Tensor) -> SPADEModulation:
        """γ and β from the layout already at the feature size: `(B, C_y, H, W)` -> two `(B, C, H, W)`."""
        actv = self.mlp_shared(layout.to(self.mlp_gamma.weight.dtype))
        return SPADEModulation(gamma=self.mlp_gamma(actv), beta=self.mlp_beta(actv))

    def normalize(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The modulated norm: `(B, C, H, W)` features and `(B, C_y, h, w)` labels (any size) -> `(B, C, H, W)`."""
        return spade_group_norm(x, y, self, SDM_NORM_GROUPS)  # type: ignore[arg-type]  # duck-typed SPADE


def _skip(channels: int, out_channels: int) -> nn.Module:
    # identity when the width is kept, else a 1×1 conv (guided-diffusion's use_conv=False branch)
    return nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)


def _emb_to_spatial(emb_layers: nn.Module, emb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return emb_layers(emb).to(dtype)[..., None, None]


class SDMEncoderResBlock(nn.Module):
    """SDE: a guided-diffusion ``ResBlock`` (no label input). See the module docstring for the formula.

    Args:
        channels (`int`): input channels.
        emb_channels (`int`): timestep-embedding width.
        out_channels (`int`): output channels.
        dropout (`float`): dropout before the last conv.
        use_scale_shift_norm (`bool`): time scale-shift after the second GN (else a bias added before it).
        resample (`str`, *optional*): ``"down"`` for a downsampling block (``"up"`` is allowed, unused by SDM).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = True,
        resample: str | None = None,
    ):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.resample = resample
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = _skip(channels, out_channels)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """`(B, C_in, H, W)`, `(B, E)` -> `(B, C_out, H', W')` (H' = H, or H/2 when downsampling)."""
        h = self.in_layers[1](self.in_layers[0](x))
        h = self.in_layers[2](resample(h, self.resample))
        x = resample(x, self.resample)
        emb_out = _emb_to_spatial(self.emb_layers, emb, h.dtype)
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class SDMDecoderResBlock(nn.Module):
    """SDD: the official ``SDMResBlock``, SPADE-modulated at both norms. See the module docstring.

    Args:
        channels (`int`): input channels (decoder blocks read ``concat(h, skip)``).
        emb_channels (`int`): timestep-embedding width.
        out_channels (`int`): output channels.
        label_channels (`int`): ``C_y``.
        dropout (`float`): dropout before the last conv.
        use_scale_shift_norm (`bool`): time scale-shift applied to SPADE_out's output (else a bias added before
            SPADE_out).
        resample (`str`, *optional*): ``"up"`` for an upsampling block.
        spade_hidden_channels (`int`, defaults to 128): SPADE shared-conv width.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int,
        label_channels: int,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = True,
        resample: str | None = None,
        spade_hidden_channels: int = 128,
    ):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.resample = resample
        self.in_norm = SDMSpadeNorm(channels, label_channels, spade_hidden_channels)
        self.in_layers = nn.Sequential(nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_norm = SDMSpadeNorm(out_channels, label_channels, spade_hidden_channels)
        self.out_layers = nn.Sequential(
            nn.SiLU(), nn.Dropout(p=dropout), zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        )
        self.skip_connection = _skip(channels, out_channels)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """`(B, C_in, H, W)`, `(B, E)`, `(B, C_y, h, w)` -> `(B, C_out, H', W')` (H' = 2H when upsampling)."""
        h = F.silu(self.in_norm.normalize(x, y))  # SPADE_in at the input resolution
        h = self.in_layers[1](resample(h, self.resample))
        x = resample(x, self.resample)
        emb_out = _emb_to_spatial(self.emb_layers, emb, h.dtype)
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            # the time scale-shift goes on top of SPADE's own (1 + γ)·x̂ + β (sdm.md §12.3)
            h = self.out_norm.normalize(h, y) * (1 + scale) + shift
        else:
            h = self.out_norm.normalize(h + emb_out, y)
        return self.skip_connection(x) + self.out_layers(h)
