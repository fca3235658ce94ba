"""ALDM's hint encoder: five 3x3 convs that read per-pixel class embeddings at 1/4 of the image size.

The official ldm ControlNet stores this block as ``control_model.input_hint_block`` (a sequential of conv, SiLU,
conv, SiLU, conv (stride 2), SiLU, conv, SiLU, zero conv), so its weights sit at indices 0, 2, 4, 6 and 8.
``ALDMConditioningEmbedding`` is an ``nn.Sequential`` with the same layout, so its state-dict keys are exactly the
official ones with ``input_hint_block.`` replaced by ``controlnet_cond_embedding.`` (inside a ControlNet):

============  ==========================  =========  ========================
index         SD 1.5 shape                stride     role
============  ==========================  =========  ========================
0             [768, 768, 3, 3]            1          D -> hidden[0]
2             [512, 768, 3, 3]            1          hidden[0] -> hidden[1]
4             [256, 512, 3, 3]            2          hidden[1] -> hidden[2]
6             [256, 256, 3, 3]            1          hidden[2] -> hidden[3]
8             [320, 256, 3, 3]            1          hidden[3] -> C0, zero-initialised
============  ==========================  =========  ========================

diffusers' ``ControlNetConditioningEmbedding`` cannot hold this layout (it pairs a same-width conv with a stride-2
conv per level and downsamples 8x), so the ALDM ControlNet swaps its ``controlnet_cond_embedding`` for this module.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["ALDM_HINT_CONV_INDICES", "ALDM_HINT_DOWNSAMPLE", "ALDMConditioningEmbedding"]

#: Positions of the five convs inside the sequential (the SiLUs sit at the odd positions); equal to the ldm keys
#: ``input_hint_block.{0,2,4,6,8}``.
ALDM_HINT_CONV_INDICES = (0, 2, 4, 6, 8)

#: Spatial factor between the hint and the embedding output (one stride-2 conv): a hint at H/4 gives H/8.
ALDM_HINT_DOWNSAMPLE = 2

# Stride of convs 0..3 (conv 4, the zero conv, has stride 1).
_STRIDES = (1, 1, 2, 1)


class ALDMConditioningEmbedding(nn.Sequential):
    """Five 3x3 convs with SiLU between: D -> hidden[0] -> hidden[1] -> hidden[2] (stride 2) -> hidden[3] -> C0.

    The last conv is zero-initialised (weight and bias), so a fresh module outputs zeros and a fresh ControlNet
    starts as the identity on the UNet, as in ControlNet and ALDM. The other convs keep PyTorch's default init
    (ldm's ``conv_nd`` does the same).

    Args:
        conditioning_embedding_channels (`int`): C0, the output width; equals the ControlNet's first block width
            (``block_out_channels[0]``, 320 for SD 1.5) because the output is added to ``conv_in``'s output.
        conditioning_channels (`int`, *optional*, defaults to 768): D, the class-embedding width of the hint.
        block_out_channels (`Sequence[int]`, *optional*, defaults to `(768, 512, 256, 256)`): the four hidden
            widths; the stride-2 conv produces ``block_out_channels[2]``.

    Input ``(B, D, H/4, W/4)`` float (the output of `layout2image.core.hints.class_embedding_hint`), output
    ``(B, C0, H/8, W/8)`` in the same dtype. Odd hint sizes give ``ceil(h / 2)``.
    """

    def __init__(
        self,
        conditioning_embedding_channels: int,
        conditioning_channels: int = 768,
        block_out_channels: Sequence[int] = (768, 512, 256, 256),
    ):
        widths = tuple(int(c) for c in block_out_channels)
        if len(widths) != len(_STRIDES) or min(widths) < 1:
            raise ValueError(
                f"block_out_channels={tuple(block_out_channels)} must be four positive widths (ALDM's hint encoder "
                "has four hidden convs, e.g. (768, 512, 256, 256) for SD 1.5)"
            )
        if conditioning_channels < 1 or conditioning_embedding_channels < 1:
            raise ValueError(
                f"conditioning_channels={conditioning_channels} and conditioning_embedding_channels="
                f"{conditioning_embedding_channels} must be positive"
            )
        layers: list[nn.Module] = []
        in_ch = conditioning_channels
        for out_ch, stride in zip(widths, _STRIDES):
            layers += [nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1, stride=stride), nn.SiLU()]
            in_ch = out_ch
        conv_out = nn.Conv2d(in_ch, conditioning_embedding_channels, kernel_size=3, padding=1)
        nn.init.zeros_(conv_out.weight)
        nn.init.zeros_(conv_out.bias)
        layers.append(conv_out)
        super().__init__(*layers)
        self.conditioning_channels = int(conditioning_channels)
        self.conditioning_embedding_channels = int(conditioning_embedding_channels)
        self.block_out_channels = widths

    @property
    def conv_out(self) -> nn.Conv2d:
        """The zero-initialised last conv (``input_hint_block.8`` in the ldm layout)."""
        return self[ALDM_HINT_CONV_INDICES[-1]]

    def forward(self, conditioning: torch.Tensor) -> torch.Tensor:
        """Encode a class-embedding hint.

        Args:
            conditioning (`torch.Tensor`): `(B, D, h, w)` float, with h, w = H/4, W/4 of the image.

        Returns:
            `torch.Tensor`: `(B, C0, ceil(h / 2), ceil(w / 2))`.
        """
        if conditioning.ndim != 4 or conditioning.shape[1] != self.conditioning_channels:
            raise ValueError(
                f"controlnet_cond has shape {tuple(conditioning.shape)}, but this ALDM hint encoder reads "
                f"(B, {self.conditioning_channels}, H/4, W/4) class embeddings; build the hint with "
                f"layout2image.core.hints.class_embedding_hint(labels, table) from an (N + 1, "
                f"{self.conditioning_channels}) embedding table"
            )
        for layer in self:
            conditioning = layer(conditioning)
        return conditioning
