"""Stand-in for ``comfy.cldm.cldm.ControlNet`` (ComfyUI 0.8.0): same constructor, same ``input_hint_block`` (the
standard eight convs 16/16/32/32/96/96/256/C0 with stride 2 at convs 2, 4 and 6) called as
``input_hint_block(hint, emb, context)``, and the same ``forward`` result ``{"middle": [...], "output": [...]}``.

Only the hint path of the trunk is modelled: ``time_embed``, ``input_blocks.0`` (conv_in) and ``zero_convs.0``;
``forward`` adds the encoded hint to conv_in's output and returns ``zero_convs.0`` of it as the only residual.
``load_state_dict`` loads those modules and keeps every other trunk tensor as given (``self.trunk``), so whole
ControlNet state dicts load; an ``input_hint_block`` key the block does not have is reported as unexpected, and a
shape mismatch raises, as in torch.
"""

from __future__ import annotations

import comfy.ops
import torch
from torch import nn


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x, emb=None, context=None, *args, **kwargs):
        for layer in self:
            x = layer(x)
        return x


class ControlNet(nn.Module):
    def __init__(self, image_size, in_channels, model_channels, hint_channels, num_res_blocks, dropout=0,
                 channel_mult=(1, 2, 4, 8), conv_resample=True, dims=2, num_classes=None, use_checkpoint=False,
                 dtype=torch.float32, num_heads=-1, num_head_channels=-1, context_dim=None, device=None,
                 operations=comfy.ops.disable_weight_init, **kwargs):  # fmt: skip
        super().__init__()
        self.dims = dims
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.context_dim = context_dim
        self.dtype = dtype
        ops = operations
        kw = {"dtype": dtype, "device": device}
        width = 4 * model_channels
        self.time_embed = nn.Sequential(
            ops.Linear(model_channels, width, **kw), nn.SiLU(), ops.Linear(width, width, **kw)
        )
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(ops.conv_nd(dims, in_channels, model_channels, 3, padding=1, **kw))]
        )
        self.zero_convs = nn.ModuleList(
            [TimestepEmbedSequential(ops.conv_nd(dims, model_channels, model_channels, 1, **kw))]
        )
        widths = [
            (hint_channels, 16, 1),
            (16, 16, 1),
            (16, 32, 2),
            (32, 32, 1),
            (32, 96, 2),
            (96, 96, 1),
            (96, 256, 2),
        ]
        layers: list[nn.Module] = []
        for cin, cout, stride in widths:
            layers += [ops.conv_nd(dims, cin, cout, 3, padding=1, stride=stride, **kw), nn.SiLU()]
        layers.append(ops.conv_nd(dims, 256, model_channels, 3, padding=1, **kw))
        self.input_hint_block = TimestepEmbedSequential(*layers)
        self.trunk: dict[str, torch.Tensor] = {}

    def load_state_dict(self, state_dict, strict=True, assign=False):
        own = set(self.state_dict())
        modelled = {k: v for k, v in state_dict.items() if k in own or k.startswith("input_hint_block.")}
        self.trunk = {k: v for k, v in state_dict.items() if k not in modelled}
        return super().load_state_dict(modelled, strict=strict, assign=assign)

    def forward(self, x, hint, timesteps, context, y=None, **kwargs):
        guided_hint = self.input_hint_block(hint, None, context)
        h = self.input_blocks[0](x, None, context)
        h = h + guided_hint
        return {"middle": [], "output": [self.zero_convs[0](h, None, context)]}
