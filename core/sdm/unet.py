"""``SDMUNet``: the pixel-space Semantic Diffusion Model UNet, with the official state-dict names and shapes.

Our own implementation of WeilunWang/semantic-diffusion-model's ``UNetModel`` (a guided-diffusion UNet whose
decoder and middle resblocks are SPADE-conditioned on the label map); ``state_dict()`` has exactly the key names
and shapes of the released ``.pt`` files, so they load with ``strict=True`` (``weights/sdm_file.py``).

Layout (sdm.md §3; ``ds`` = downsampling factor, attention where ``ds`` is in ``config.attention_downsample``)::

    time_embed.{0,2}            Linear(C→4C), SiLU, Linear(4C→4C) on the sinusoidal embedding of raw t
    input_blocks.0.0            Conv3×3 in→C·mult[0]
    input_blocks.i.0            SDE (+ input_blocks.i.1 attention); each level but the last ends with a
                                down-SDE (``resblock_updown``) or a stride-2 conv ``input_blocks.i.0.op``
    middle_block.{0,1,2}        SDD, attention, SDD (the middle block is conditioned)
    output_blocks.i.0           SDD on concat(h, skip) (+ .1 attention); each level but 0 ends with an up-SDD
                                (or a nearest ×2 + conv ``.conv``)
    out.{0,2}                   GN, SiLU, zero-init Conv3×3 C→out (ε, then v with learn_sigma)

The label map never enters the encoder: `encode` has no ``y`` argument.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .attention import AttentionBlock
from .config import SDMConfig
from .layers import GroupNorm32, sdm_timestep_embedding, zero_module
from .resblocks import SDMDecoderResBlock, SDMEncoderResBlock

__all__ = ["SDMUNet"]


class _Downsample(nn.Module):
    """Stride-2 conv (``op``), used only when ``resblock_updown`` is off."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class _Upsample(nn.Module):
    """Nearest ×2 then a conv (``conv``), used only when ``resblock_updown`` is off."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Stage(nn.Sequential):
    """One ``input_blocks.i`` / ``middle_block`` / ``output_blocks.i`` entry: feeds each layer what it reads."""

    def forward(self, h: torch.Tensor, emb: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, SDMDecoderResBlock):
                h = layer(h, emb, y)
            elif isinstance(layer, SDMEncoderResBlock):
                h = layer(h, emb)
            else:
                h = layer(h)
        return h


class SDMUNet(ModelMixin, ConfigMixin):
    """The SDM UNet. The arguments are the fields of `SDMConfig` (see there); build from a config with
    ``SDMUNet.from_sdm_config(sdm_preset("ade20k"))``.

    ``forward(x, timesteps, y)`` reads:
        x (`torch.Tensor`): `(B, in_channels, H, W)` noisy image ``x_t`` in about [−1, 1]; H and W divisible by
            ``2 ** (len(channel_mult) − 1)``.
        timesteps (`torch.Tensor`): `(B,)` raw integer timesteps in [0, T) (or a scalar for the whole batch).
        y (`torch.Tensor`): `(B, C_y, H_y, W_y)` float conditioning tensor (`core.sdm.sdm_condition`; zeros for the
            null label), any size (nearest-resized at each SPADE site), normally the image size.
    and returns `(B, out_channels, H, W)` in ``x``'s dtype: ε (the first ``in_channels``), then the variance
    interpolation v in about [−1, 1] when ``learn_sigma``.
    """

    @register_to_config
    def __init__(
        self,
        label_channels: int,
        image_size: int = 256,
        in_channels: int = 3,
        model_channels: int = 256,
        channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4),
        num_res_blocks: int = 2,
        attention_resolutions: tuple[int, ...] = (32, 16, 8),
        num_head_channels: int = 64,
        learn_sigma: bool = True,
        dropout: float = 0.0,
        resblock_updown: bool = True,
        use_scale_shift_norm: bool = True,
        spade_hidden_channels: int = 128,
    ):
        super().__init__()
        cfg = SDMConfig(
            label_channels=label_channels,
            image_size=image_size,
            in_channels=in_channels,
            model_channels=model_channels,
            channel_mult=tuple(channel_mult),
            num_res_blocks=num_res_blocks,
            attention_resolutions=tuple(attention_resolutions),
            num_head_channels=num_head_channels,
            learn_sigma=learn_sigma,
            dropout=dropout,
            resblock_updown=resblock_updown,
            use_scale_shift_norm=use_scale_shift_norm,
            spade_hidden_channels=spade_hidden_channels,
        )
        self._sdm_config = cfg
        emb = cfg.time_embed_dim
        attn_ds = cfg.attention_downsample

        def sde(cin: int, cout: int, resample: str | None = None) -> SDMEncoderResBlock:
            return SDMEncoderResBlock(cin, emb, cout, cfg.dropout, cfg.use_scale_shift_norm, resample)

        def sdd(cin: int, cout: int, resample: str | None = None) -> SDMDecoderResBlock:
            return SDMDecoderResBlock(
                cin, emb, cout, cfg.label_channels, cfg.dropout, cfg.use_scale_shift_norm, resample,
                cfg.spade_hidden_channels,
            )  # fmt: skip

        def attention(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, cfg.num_head_channels)

        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb), nn.SiLU(), nn.Linear(emb, emb))

        # ---- encoder: widths of every stage's output are the skips the decoder pops, last first
        ch = cfg.widths[0]
        self.input_blocks = nn.ModuleList([_Stage(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        ds = 1
        last_level = len(cfg.channel_mult) - 1
        for level, width in enumerate(cfg.widths):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [sde(ch, width)]
                ch = width
                if ds in attn_ds:
                    layers.append(attention(ch))
                self.input_blocks.append(_Stage(*layers))
                skip_channels.append(ch)
            if level != last_level:
                self.input_blocks.append(_Stage(sde(ch, ch, "down") if resblock_updown else _Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = _Stage(sdd(ch, ch), attention(ch), sdd(ch, ch))

        # ---- decoder: num_res_blocks + 1 SDDs per level, each reading concat(h, popped skip)
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(cfg.widths))):
            width = cfg.widths[level]
            for i in range(num_res_blocks + 1):
                layers = [sdd(ch + skip_channels.pop(), width)]
                ch = width
                if ds in attn_ds:
                    layers.append(attention(ch))
                if level and i == num_res_blocks:
                    layers.append(sdd(ch, ch, "up") if resblock_updown else _Upsample(ch))
                    ds //= 2
                self.output_blocks.append(_Stage(*layers))

        self.out = nn.Sequential(
            GroupNorm32(ch), nn.SiLU(), zero_module(nn.Conv2d(ch, cfg.out_channels, 3, padding=1))
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_sdm_config(cls, config: SDMConfig) -> SDMUNet:
        """A fresh (randomly initialised) UNet for ``config``; the config is not modified."""
        return cls(**config.to_kwargs())

    @property
    def sdm_config(self) -> SDMConfig:
        """The `SDMConfig` this UNet was built from."""
        return self._sdm_config

    # ------------------------------------------------------------------ forward
    def embed_time(self, timesteps: torch.Tensor, batch_size: int) -> torch.Tensor:
        """`(B,)` (or scalar) raw timesteps -> `(B, 4C)` embedding in the model's dtype."""
        t = torch.as_tensor(timesteps, device=self.device)
        if t.ndim == 0:
            t = t.expand(batch_size)
        return self.time_embed(sdm_timestep_embedding(t, self.config.model_channels).to(self.dtype))

    def encode(self, x: torch.Tensor, emb: torch.Tensor) -> list[torch.Tensor]:
        """Run the encoder (no label input).

        Returns:
            `list[torch.Tensor]`: every ``input_blocks`` output, first to last (the decoder's skips; the last one
            also feeds the middle block).
        """
        hs = []
        h = x
        for stage in self.input_blocks:
            h = stage(h, emb)
            hs.append(h)
        return hs

    def decode(self, hs: list[torch.Tensor], emb: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Middle block and decoder on the encoder outputs ``hs`` (read, not modified) -> features before ``out``."""
        skips = list(hs)
        h = self.middle_block(skips[-1], emb, y)
        for stage in self.output_blocks:
            h = stage(torch.cat([h, skips.pop()], dim=1), emb, y)
        return h

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """See the class docstring."""
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"`x` must be (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        factor = 2 ** (len(cfg.channel_mult) - 1)
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(f"`x` spatial size {tuple(x.shape[-2:])} must be divisible by {factor}")
        if y.ndim != 4 or y.shape[0] != x.shape[0] or y.shape[1] != cfg.label_channels:
            raise ValueError(
                f"`y` must be (B={x.shape[0]}, C_y={cfg.label_channels}, H, W), got {tuple(y.shape)}; build it with "
                "core.sdm.sdm_condition (zeros for the null label)"
            )
        dtype = self.dtype
        emb = self.embed_time(timesteps, x.shape[0])
        h = self.decode(self.encode(x.to(dtype), emb), emb, y.to(dtype))
        return self.out(h).to(x.dtype)
