"""ControlNet (and T2I-Adapter) variants for layouts, built from a diffusers ``UNet2DConditionModel``.

Three hint encodings, one builder (`build_controlnet`):

* ``"rgb"``: a stock ``ControlNetModel`` with the standard conditioning embedding reading the palette colours
  `(B, 3, H, W)`; loads anywhere a diffusers ControlNet loads.
* ``"onehot"``: a stock ``ControlNetModel`` whose standard embedding reads `(B, N, H, W)` one-hot maps, or
  `(B, N + 1, H, W)` with SDM's boundary channel.
* ``"embedding"``: `ALDMControlNetModel`, ALDM's native variant: the standard trunk with its
  ``controlnet_cond_embedding`` replaced by `ALDMConditioningEmbedding`, reading `(B, D, H/4, W/4)` per-pixel class
  embeddings. Its config carries ``hint_encoding="class_embedding"`` and ``_class_name="ALDMControlNetModel"``.

All variants copy ``conv_in``, the time embedding, the down blocks and the mid block from the UNet
(``ControlNetModel.from_unet``) and zero every zero conv, so a fresh ControlNet adds nothing to the UNet. The UNet,
its config and its parameters are only read.

**Loading an ALDM folder with a stock loader** (measured with diffusers 0.42). ``ControlNetModel.from_pretrained`` on
a folder written by ``ALDMControlNetModel.save_pretrained`` does *not* raise. It logs three warnings (the config
attribute ``hint_encoding`` is ignored; ``controlnet_cond_embedding.{0,2,4,6,8}.*`` were not used; the standard
embedding's ``conv_in``/``blocks``/``conv_out`` are "newly initialized") and returns a stock model whose hint
encoder is the standard 8x one with *no* weights: left on the meta device by default, uninitialised memory (NaN
outputs seen) with ``low_cpu_mem_usage=False``. An H/4 hint then fails at the add with a size mismatch; a
full-size hint runs and gives meaningless residuals. The stock-loaded config keeps ``hint_encoding`` as a hidden
key, which `hint_spec_for` and `load_controlnet` (on a re-saved folder) detect. Use `load_controlnet`, which reads
the config's ``_class_name``/``hint_encoding`` marker first and picks the class, or
``ALDMControlNetModel.from_pretrained``, which refuses folders without the marker.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import ControlNetModel, T2IAdapter, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config

from .aldm_embedding import ALDM_HINT_DOWNSAMPLE, ALDMConditioningEmbedding

__all__ = [
    "ALDM_HINT_ENCODING",
    "HINT_KINDS",
    "ALDMControlNetModel",
    "build_controlnet",
    "build_t2i_adapter",
    "load_controlnet",
]

#: Valid values of the ``hint`` option of the builders.
HINT_KINDS = ("embedding", "onehot", "rgb")

#: Value of the ``hint_encoding`` config key that marks an ALDM class-embedding ControlNet.
ALDM_HINT_ENCODING = "class_embedding"

# Config keys of the ALDM variant whose *value* must always be written (never listed in `_use_default_values`,
# which diffusers drops before reading a config): the marker and the two keys that describe the hint encoder.
_EXPLICIT_KEYS = ("conditioning_channels", "conditioning_embedding_out_channels", "hint_encoding")

# Keys that ControlNetModel.__init__ accepts; the ALDM subclass forwards exactly these to it.
_CONTROLNET_INIT_KEYS = tuple(p for p in inspect.signature(ControlNetModel.__init__).parameters if p != "self")

# Hub/file options that `load_controlnet` also passes to `load_config`.
_CONFIG_KWARGS = ("subfolder", "revision", "cache_dir", "local_files_only", "token", "force_download", "proxies")


class ALDMControlNetModel(ControlNetModel):
    """ControlNet whose hint is ALDM's per-pixel class embedding at 1/4 resolution.

    Same trunk, zero convs, forward and outputs as diffusers' ``ControlNetModel``; only ``controlnet_cond_embedding``
    differs (`ALDMConditioningEmbedding`, whose state-dict keys ``controlnet_cond_embedding.{0,2,4,6,8}`` are the
    ldm keys ``input_hint_block.{0,2,4,6,8}``). All ``ControlNetModel`` arguments are accepted; these differ:

    Args:
        conditioning_channels (`int`, *optional*, defaults to 768): D, the embedding width of the hint.
        conditioning_embedding_out_channels (`tuple[int, ...]`, *optional*, defaults to `(768, 512, 256, 256)`):
            the four hidden widths of the hint encoder.
        controlnet_conditioning_channel_order (`str`, *optional*, defaults to `"rgb"`): must stay ``"rgb"`` (a
            ``"bgr"`` order would flip the embedding channels).
        hint_encoding (`str`, *optional*, defaults to `"class_embedding"`): the config marker; the only valid value.

    ``forward`` takes ``controlnet_cond`` as `(B, D, 2 * h, 2 * w)` float for latents `(B, C, h, w)` (that is
    `(B, D, H/4, W/4)` for SD's 8x VAE) and returns ``ControlNetOutput`` like the stock model.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        conditioning_channels: int = 768,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: tuple[str, ...] = (
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        mid_block_type: str | None = "UNetMidBlock2DCrossAttn",
        only_cross_attention: bool | tuple[bool] = False,
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        act_fn: str = "silu",
        norm_num_groups: int | None = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 1280,
        transformer_layers_per_block: int | tuple[int, ...] = 1,
        encoder_hid_dim: int | None = None,
        encoder_hid_dim_type: str | None = None,
        attention_head_dim: int | tuple[int, ...] = 8,
        num_attention_heads: int | tuple[int, ...] | None = None,
        use_linear_projection: bool = False,
        class_embed_type: str | None = None,
        addition_embed_type: str | None = None,
        addition_time_embed_dim: int | None = None,
        num_class_embeds: int | None = None,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        projection_class_embeddings_input_dim: int | None = None,
        controlnet_conditioning_channel_order: str = "rgb",
        conditioning_embedding_out_channels: tuple[int, ...] | None = (768, 512, 256, 256),
        global_pool_conditions: bool = False,
        addition_embed_type_num_heads: int = 64,
        hint_encoding: str = ALDM_HINT_ENCODING,
    ):
        base_kwargs = {name: value for name, value in locals().items() if name in _CONTROLNET_INIT_KEYS}
        if hint_encoding != ALDM_HINT_ENCODING:
            raise ValueError(
                f"hint_encoding={hint_encoding!r}: ALDMControlNetModel only reads {ALDM_HINT_ENCODING!r} hints; "
                "for palette-RGB or one-hot hints build a stock ControlNetModel (build_controlnet(unet, hint='rgb' "
                "or 'onehot'))"
            )
        if controlnet_conditioning_channel_order != "rgb":
            raise ValueError(
                f"controlnet_conditioning_channel_order={controlnet_conditioning_channel_order!r}: the ALDM hint is "
                "a class embedding, whose channels must not be flipped; use 'rgb' (the identity order)"
            )
        if conditioning_embedding_out_channels is None:
            raise ValueError(
                "conditioning_embedding_out_channels=None: ALDMControlNetModel needs the four hidden widths of its "
                "hint encoder, e.g. (768, 512, 256, 256) for SD 1.5"
            )
        # Build the stock trunk with a one-channel stub embedding (the real one would be ~20 M throw-away parameters
        # at SD 1.5 widths), then swap in ALDM's encoder and re-register the real values in the config.
        base_kwargs["conditioning_embedding_out_channels"] = (1,)
        super().__init__(**base_kwargs)
        self.controlnet_cond_embedding = ALDMConditioningEmbedding(
            conditioning_embedding_channels=block_out_channels[0],
            conditioning_channels=conditioning_channels,
            block_out_channels=conditioning_embedding_out_channels,
        )
        used_defaults = [k for k in self.config.get("_use_default_values", []) if k not in _EXPLICIT_KEYS]
        self.register_to_config(
            conditioning_channels=conditioning_channels,
            conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
            hint_encoding=hint_encoding,
            _use_default_values=used_defaults,
        )

    @classmethod
    def from_unet(
        cls,
        unet: UNet2DConditionModel,
        controlnet_conditioning_channel_order: str = "rgb",
        conditioning_embedding_out_channels: tuple[int, ...] | None = (768, 512, 256, 256),
        load_weights_from_unet: bool = True,
        conditioning_channels: int = 768,
    ) -> ALDMControlNetModel:
        """Build from a UNet like ``ControlNetModel.from_unet``, with ALDM's defaults (D = 768, SD 1.5 widths).

        Reads ``unet.config`` and copies ``conv_in``, the time embedding, the down and mid blocks; never writes to
        the UNet.
        """
        return super().from_unet(
            unet,
            controlnet_conditioning_channel_order=controlnet_conditioning_channel_order,
            conditioning_embedding_out_channels=conditioning_embedding_out_channels,
            load_weights_from_unet=load_weights_from_unet,
            conditioning_channels=conditioning_channels,
        )

    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs):
        """``ConfigMixin.from_config`` that first checks the ALDM marker (also used by ``from_pretrained``).

        Raises:
            ValueError: when the config lacks ``hint_encoding="class_embedding"`` or names another class, e.g. a
                stock ControlNet folder.
        """
        if isinstance(config, dict) or hasattr(config, "keys"):
            _check_aldm_marker(config)
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        *args,
        **kwargs,
    ):
        """``ControlNetModel.forward`` after checking the hint's size against the latents.

        Args:
            sample (`torch.Tensor`): `(B, C, h, w)` noisy latents.
            controlnet_cond (`torch.Tensor`): `(B, D, ALDM_HINT_DOWNSAMPLE * h, ALDM_HINT_DOWNSAMPLE * w)` class
                embeddings, i.e. `(B, D, H/4, W/4)` for SD.

        Other arguments and the ``ControlNetOutput`` result are those of ``ControlNetModel.forward``.
        """
        expected = tuple(ALDM_HINT_DOWNSAMPLE * s for s in sample.shape[-2:])
        if controlnet_cond.ndim != 4 or tuple(controlnet_cond.shape[-2:]) != expected:
            raise ValueError(
                f"controlnet_cond has shape {tuple(controlnet_cond.shape)} but latents of spatial size "
                f"{tuple(sample.shape[-2:])} need a (B, {self.config.conditioning_channels}, {expected[0]}, "
                f"{expected[1]}) class-embedding hint (H/4 x W/4 of the image); build it with HintSpec.make or "
                "class_embedding_hint(labels, table, stride=vae_scale_factor // 2)"
            )
        return super().forward(sample, timestep, encoder_hidden_states, controlnet_cond, *args, **kwargs)


def _check_aldm_marker(config: Any) -> None:
    class_name = config.get("_class_name", ALDMControlNetModel.__name__)
    encoding = config.get("hint_encoding")
    if class_name != ALDMControlNetModel.__name__ or encoding != ALDM_HINT_ENCODING:
        raise ValueError(
            f"config has _class_name={class_name!r} and hint_encoding={encoding!r}, so it is not an ALDM "
            f"class-embedding ControlNet (expected _class_name='ALDMControlNetModel' and hint_encoding="
            f"{ALDM_HINT_ENCODING!r}); load it with layout2image.core.controlnet.load_controlnet, which picks the "
            "class from the config, or with diffusers' ControlNetModel.from_pretrained"
        )


def _check_unet(unet: Any) -> None:
    if not isinstance(unet, UNet2DConditionModel):
        raise TypeError(
            f"unet must be a diffusers UNet2DConditionModel, got {type(unet).__name__}; load one with "
            "UNet2DConditionModel.from_pretrained(<model>, subfolder='unet')"
        )


def _hint_channels(hint: str, num_classes: int | None, with_edges: bool) -> int:
    if num_classes is None or int(num_classes) < 1:
        raise ValueError(
            f"hint={hint!r} needs num_classes (N >= 1, the label set's class count), got num_classes={num_classes!r}"
        )
    return int(num_classes) + int(with_edges)


def build_controlnet(
    unet: UNet2DConditionModel,
    hint: str = "embedding",
    *,
    num_classes: int | None = None,
    with_edges: bool = False,
    embedding_dim: int = 768,
    hint_block_out_channels: Sequence[int] = (768, 512, 256, 256),
    conditioning_embedding_out_channels: Sequence[int] = (16, 32, 96, 256),
    load_weights_from_unet: bool = True,
) -> ControlNetModel:
    """Build a layout ControlNet from a UNet (trunk copied, zero convs zero).

    Args:
        unet (`UNet2DConditionModel`): the base UNet; only read.
        hint (`str`, defaults to `"embedding"`): ``"rgb"`` (palette colours, 3 channels), ``"onehot"`` (N or N + 1
            channels) or ``"embedding"`` (ALDM: D-channel class embeddings at H/4).
        num_classes (`int`, *optional*): N; required for ``"onehot"``.
        with_edges (`bool`, defaults to False): ``"onehot"`` only: one extra boundary channel.
        embedding_dim (`int`, defaults to 768): ``"embedding"`` only: D, the width of the class-embedding table.
        hint_block_out_channels (`Sequence[int]`, defaults to `(768, 512, 256, 256)`): ``"embedding"`` only: the
            four hidden widths of ALDM's hint encoder.
        conditioning_embedding_out_channels (`Sequence[int]`, defaults to `(16, 32, 96, 256)`): ``"rgb"`` and
            ``"onehot"`` only: widths of the standard embedding; it downsamples by ``2 ** (len - 1)``, which must
            equal the VAE's factor (8 for SD; tiny test worlds use e.g. `(16, 32)` with a 2x VAE).
        load_weights_from_unet (`bool`, defaults to True): copy the trunk weights (False: random trunk).

    Returns:
        `ControlNetModel`: a stock ``ControlNetModel`` for ``"rgb"``/``"onehot"``, an `ALDMControlNetModel` for
        ``"embedding"``, in fp32 on the CPU (move it yourself).

    Raises:
        ValueError: unknown ``hint``, missing ``num_classes``, or an option that the chosen variant does not read.
    """
    _check_unet(unet)
    if hint == "rgb":
        if with_edges:
            raise ValueError("with_edges=True only applies to hint='onehot' (the RGB hint has no edge channel)")
        return ControlNetModel.from_unet(
            unet,
            conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
            load_weights_from_unet=load_weights_from_unet,
            conditioning_channels=3,
        )
    elif hint == "onehot":
        return ControlNetModel.from_unet(
            unet,
            conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
            load_weights_from_unet=load_weights_from_unet,
            conditioning_channels=_hint_channels(hint, num_classes, with_edges),
        )
    elif hint == "embedding":
        if with_edges:
            raise ValueError(
                "with_edges=True only applies to hint='onehot' (ALDM's class-embedding hint has no edge channel)"
            )
        if int(embedding_dim) < 1:
            raise ValueError(f"embedding_dim={embedding_dim!r} must be the positive width D of the embedding table")
        return ALDMControlNetModel.from_unet(
            unet,
            conditioning_embedding_out_channels=tuple(int(c) for c in hint_block_out_channels),
            load_weights_from_unet=load_weights_from_unet,
            conditioning_channels=int(embedding_dim),
        )
    else:
        raise ValueError(f"hint={hint!r} is not a known hint encoding; expected one of {', '.join(HINT_KINDS)}")


def build_t2i_adapter(
    unet: UNet2DConditionModel,
    hint: str = "rgb",
    *,
    num_classes: int | None = None,
    with_edges: bool = False,
    downscale_factor: int = 8,
    num_res_blocks: int = 2,
    adapter_type: str = "full_adapter",
) -> T2IAdapter:
    """Build a diffusers ``T2IAdapter`` whose levels match the UNet's down blocks, for RGB or one-hot hints.

    The adapter is randomly initialised (T2I-Adapters have no zero convs); its features are fed to the UNet as
    ``down_intrablock_additional_residuals``.

    Args:
        unet (`UNet2DConditionModel`): the base UNet; only its config is read (``block_out_channels``).
        hint (`str`, defaults to `"rgb"`): ``"rgb"`` or ``"onehot"``; the class-embedding hint is ControlNet-only.
        num_classes (`int`, *optional*): N; required for ``"onehot"``.
        with_edges (`bool`, defaults to False): ``"onehot"`` only: one extra boundary channel.
        downscale_factor (`int`, defaults to 8): pixel-unshuffle factor from the hint to the first UNet level; must
            equal the VAE's factor (the hint is at image resolution).
        num_res_blocks (`int`, defaults to 2): residual blocks per level.
        adapter_type (`str`, defaults to `"full_adapter"`): ``"full_adapter"`` or ``"light_adapter"``.

    Returns:
        `T2IAdapter`: fp32 on the CPU.
    """
    _check_unet(unet)
    if hint == "rgb":
        if with_edges:
            raise ValueError("with_edges=True only applies to hint='onehot' (the RGB hint has no edge channel)")
        in_channels = 3
    elif hint == "onehot":
        in_channels = _hint_channels(hint, num_classes, with_edges)
    elif hint == "embedding":
        raise ValueError(
            "hint='embedding' is not available for T2I-Adapters (the class-embedding hint is read at H/4 by ALDM's "
            "ControlNet encoder); use hint='rgb' or 'onehot', or build_controlnet(unet, hint='embedding')"
        )
    else:
        raise ValueError(f"hint={hint!r} is not a known hint encoding; expected one of {', '.join(HINT_KINDS)}")
    if adapter_type not in ("full_adapter", "light_adapter"):
        raise ValueError(
            f"adapter_type={adapter_type!r} is not supported for SD-style UNets; use 'full_adapter' or 'light_adapter'"
        )
    return T2IAdapter(
        in_channels=in_channels,
        channels=list(unet.config.block_out_channels),
        num_res_blocks=num_res_blocks,
        downscale_factor=downscale_factor,
        adapter_type=adapter_type,
    )


def load_controlnet(pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> ControlNetModel:
    """Load a ControlNet folder (or Hub repo) as the class its config names.

    Reads ``config.json`` first: ``_class_name="ALDMControlNetModel"`` with ``hint_encoding="class_embedding"``
    gives an `ALDMControlNetModel`, ``_class_name="ControlNetModel"`` (no marker) a stock ``ControlNetModel``.

    Args:
        pretrained_model_name_or_path (`str` or `os.PathLike`): folder or Hub id.
        **kwargs: passed to ``from_pretrained`` (``subfolder``, ``torch_dtype``, ``revision``, ...).

    Raises:
        ValueError: the config names another class, or its marker and class disagree.
    """
    config_kwargs = {k: kwargs[k] for k in _CONFIG_KWARGS if k in kwargs}
    config = ControlNetModel.load_config(pretrained_model_name_or_path, **config_kwargs)
    class_name = config.get("_class_name")
    encoding = config.get("hint_encoding")
    if class_name == ALDMControlNetModel.__name__:
        _check_aldm_marker(config)
        return ALDMControlNetModel.from_pretrained(pretrained_model_name_or_path, **kwargs)
    elif class_name == ControlNetModel.__name__:
        if encoding is not None:
            raise ValueError(
                f"{pretrained_model_name_or_path}: config names ControlNetModel but carries hint_encoding="
                f"{encoding!r}; the folder was edited by hand or written by another tool. Set _class_name to "
                "'ALDMControlNetModel' for an ALDM ControlNet or remove hint_encoding for a stock one"
            )
        return ControlNetModel.from_pretrained(pretrained_model_name_or_path, **kwargs)
    else:
        raise ValueError(
            f"{pretrained_model_name_or_path}: config has _class_name={class_name!r}; load_controlnet knows "
            "'ControlNetModel' (rgb / one-hot hints) and 'ALDMControlNetModel' (class-embedding hints)"
        )
