"""The architecture settings of the pixel-space SDM UNet, and the official presets (sdm.md §3).

Every field that changes a weight's shape is here, so a config and the official key names give the whole
state-dict layout (``SDMUNet(**config.to_kwargs())``). Fields that change no shape (``image_size``,
``num_head_channels``, ``dropout``) cannot be read back from a checkpoint's shapes; ``weights/sdm_file.py``
takes the official values for them.

=================  ==========  =======  ========  ======  ==================================
preset             image size  ``C_y``  channels  levels  note
=================  ==========  =======  ========  ======  ==================================
``ade20k``         256         151      256       6       150 classes + "unknown", no edges
``celebamask_hq``  256         20       256       6       19 classes + edge channel
``coco_stuff``     256         184      256       6       182 raw ids + unknown + edge
``cityscapes``     256         36       256       6       35 label ids + edge (256×512 input)
``tiny``           16          9        32        2       tests only (toy set + edge)
=================  ==========  =======  ========  ======  ==================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SDM_NORM_GROUPS", "SDM_PRESETS", "SDMConfig", "sdm_preset"]

#: GroupNorm groups everywhere in the UNet (guided-diffusion's ``normalization``; SPADE's parameter-free GN too).
SDM_NORM_GROUPS = 32


@dataclass(frozen=True)
class SDMConfig:
    """Settings of an `SDMUNet` (the names follow guided-diffusion's ``UNetModel`` arguments).

    Args:
        label_channels (`int`): ``C_y``, channels of the conditioning tensor (one-hot classes, plus an "unknown"
            and/or an instance-edge channel where the dataset has them).
        image_size (`int`, defaults to 256): training resolution (square side; Cityscapes also uses 256 and feeds
            256×512). Only used to turn ``attention_resolutions`` into downsampling factors.
        in_channels (`int`, defaults to 3): image channels.
        model_channels (`int`, defaults to 256): base width; the timestep embedding is ``4 × model_channels``.
        channel_mult (`tuple[int, ...]`, defaults to (1, 1, 2, 2, 4, 4)): width multiplier per level.
        num_res_blocks (`int`, defaults to 2): encoder resblocks per level (the decoder has one more).
        attention_resolutions (`tuple[int, ...]`, defaults to (32, 16, 8)): feature resolutions (square side, at
            ``image_size``) that get self-attention after each resblock.
        num_head_channels (`int`, defaults to 64): channels per attention head (heads = width / 64).
        learn_sigma (`bool`, defaults to True): predict the variance interpolation ``v`` too, so the output has
            ``2 × in_channels`` channels (ε, then v).
        dropout (`float`, defaults to 0.0): dropout before each resblock's last conv.
        resblock_updown (`bool`, defaults to True): resample with resblocks (no weights of their own) instead of
            strided/upsampling convs.
        use_scale_shift_norm (`bool`, defaults to True): the timestep embedding gives a scale and a shift applied
            after the second norm (``GN(h)·(1+s)+b``) instead of a bias added before it.
        spade_hidden_channels (`int`, defaults to 128): width of each SPADE module's shared conv (128 in the
            official code; smaller only for tests).
    """

    label_channels: int
    image_size: int = 256
    in_channels: int = 3
    model_channels: int = 256
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (32, 16, 8)
    num_head_channels: int = 64
    learn_sigma: bool = True
    dropout: float = 0.0
    resblock_updown: bool = True
    use_scale_shift_norm: bool = True
    spade_hidden_channels: int = field(default=128)

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attention_resolutions", tuple(int(r) for r in self.attention_resolutions))
        for name in (
            "label_channels",
            "image_size",
            "in_channels",
            "model_channels",
            "num_res_blocks",
            "spade_hidden_channels",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SDMConfig.{name}={value!r} must be a positive int")
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise ValueError(f"SDMConfig.channel_mult={self.channel_mult!r} must be a non-empty tuple of ints >= 1")
        for width in self.widths:
            if width % SDM_NORM_GROUPS:
                raise ValueError(
                    f"SDMConfig: level width {width} (model_channels {self.model_channels} × channel_mult) is not a "
                    f"multiple of the {SDM_NORM_GROUPS} GroupNorm groups; pick model_channels as a multiple of 32"
                )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"SDMConfig.dropout={self.dropout!r} must be in [0, 1)")
        for res in self.attention_resolutions:
            if res < 1 or self.image_size % res:
                raise ValueError(
                    f"SDMConfig.attention_resolutions contains {res}, which does not divide image_size "
                    f"{self.image_size}"
                )
        if isinstance(self.num_head_channels, bool) or not isinstance(self.num_head_channels, int):
            raise ValueError(f"SDMConfig.num_head_channels={self.num_head_channels!r} must be a positive int")
        # the middle block always has attention at the deepest width; the other levels where configured
        attended = {self.widths[-1]} | {w for i, w in enumerate(self.widths) if 2**i in self.attention_downsample}
        for width in sorted(attended):
            if self.num_head_channels < 1 or width % self.num_head_channels:
                raise ValueError(
                    f"SDMConfig: attention width {width} is not divisible by num_head_channels={self.num_head_channels}"
                )

    @property
    def out_channels(self) -> int:
        """Output channels: ε (``in_channels``), plus the variance interpolation v with ``learn_sigma``."""
        return self.in_channels * (2 if self.learn_sigma else 1)

    @property
    def widths(self) -> tuple[int, ...]:
        """Feature channels of each level (``model_channels × channel_mult``)."""
        return tuple(self.model_channels * m for m in self.channel_mult)

    @property
    def attention_downsample(self) -> frozenset[int]:
        """Downsampling factors (1, 2, 4, ...) at which attention blocks sit (``image_size // resolution``)."""
        return frozenset(self.image_size // r for r in self.attention_resolutions)

    @property
    def time_embed_dim(self) -> int:
        """Width of the timestep embedding MLP (``4 × model_channels``)."""
        return 4 * self.model_channels

    def to_kwargs(self) -> dict[str, Any]:
        """The fields as plain data (tuples as lists): ``SDMUNet(**config.to_kwargs())``, JSON metadata."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_kwargs(cls, data: Mapping[str, Any], source: str = "<config>") -> SDMConfig:
        """Build from `to_kwargs` output (e.g. a file's ``l2i.config``); unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown SDM config field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**dict(data))

    def replace(self, **changes: Any) -> SDMConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


#: The official configurations (README/scripts: ``num_channels 256, num_res_blocks 2, attention_resolutions
#: 32,16,8, num_head_channels 64, resblock_updown, use_scale_shift_norm, learn_sigma``) and a tiny test one.
SDM_PRESETS: dict[str, SDMConfig] = {
    "ade20k": SDMConfig(label_channels=151),
    "celebamask_hq": SDMConfig(label_channels=20),
    "coco_stuff": SDMConfig(label_channels=184),
    "cityscapes": SDMConfig(label_channels=36),
    # 2 levels of 32/64 channels at 16², attention at 8² (ds 2); 9 label channels = toy set (8) + edge.
    "tiny": SDMConfig(
        label_channels=9,
        image_size=16,
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(8,),
        num_head_channels=32,
        spade_hidden_channels=16,
    ),
}


def sdm_preset(name: str, **changes: Any) -> SDMConfig:
    """A preset from `SDM_PRESETS`, optionally with some fields changed.

    Raises:
        ValueError: an unknown preset name (the message lists them).
    """
    if name not in SDM_PRESETS:
        raise ValueError(f"unknown SDM preset {name!r}; known presets are {', '.join(sorted(SDM_PRESETS))}")
    config = SDM_PRESETS[name]
    return config.replace(**changes) if changes else config
