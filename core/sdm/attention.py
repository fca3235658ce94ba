"""The SDM UNet's self-attention block (guided-diffusion ``AttentionBlock`` with the legacy qkv order).

``x + proj_out(Attn(qkv(GN(x))))`` over the H·W positions, with state-dict keys ``norm``, ``qkv`` (Conv1d
C→3C) and ``proj_out`` (Conv1d C→C, zero-initialised so a new block is the identity).

"Legacy" order: the 3C qkv channels are grouped per head first, ``[head 0: q k v | head 1: q k v | ...]``, so
they are reshaped to `(B·heads, 3·d, T)` and then split into q, k, v (each `(B·heads, d, T)`). Reading the same
weights in the other order (split q/k/v first) gives a different model. The paper's eq. 7 (cosine attention)
is not what the released code does; this is plain softmax(qᵀk/√d)v.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import GroupNorm32, zero_module

__all__ = ["AttentionBlock", "legacy_qkv_attention"]


def legacy_qkv_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Multi-head attention on a legacy-ordered qkv tensor.

    The official code scales q and k by ``d^−¼`` each and takes the softmax in fp32; scaled-dot-product
    attention with scale ``1/√d`` is the same function (and its fused kernels also accumulate the softmax in
    fp32), without building the `(T, T)` weight matrix in memory.

    Args:
        qkv (`torch.Tensor`): `(B, 3·C, T)`, channels in the legacy order (per head: q, k, v of ``d = C/heads``).
        num_heads (`int`): heads.

    Returns:
        `torch.Tensor`: `(B, C, T)`, heads concatenated along channels, same dtype as ``qkv``.
    """
    batch, width, length = qkv.shape
    if width % (3 * num_heads):
        raise ValueError(f"qkv width {width} is not divisible by 3 × {num_heads} heads")
    d = width // (3 * num_heads)
    q, k, v = qkv.reshape(batch * num_heads, 3 * d, length).split(d, dim=1)
    # (B·heads, d, T) -> (B·heads, T, d) for scaled_dot_product_attention
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).reshape(batch, num_heads * d, length)


class AttentionBlock(nn.Module):
    """Residual self-attention over all spatial positions.

    Args:
        channels (`int`): C, a multiple of ``num_head_channels`` and of 32.
        num_head_channels (`int`): channels per head (64 in the official models).
    """

    def __init__(self, channels: int, num_head_channels: int):
        super().__init__()
        if channels % num_head_channels:
            raise ValueError(f"attention width {channels} is not divisible by num_head_channels={num_head_channels}")
        self.num_heads = channels // num_head_channels
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`(B, C, H, W)` -> `(B, C, H, W)`, same dtype."""
        b, c, *spatial = x.shape
        flat = x.reshape(b, c, -1)
        h = legacy_qkv_attention(self.qkv(self.norm(flat)), self.num_heads)
        return (flat + self.proj_out(h)).reshape(b, c, *spatial)
