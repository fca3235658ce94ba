"""Which hint a control model reads, its size, and how to make it from a label batch.

`HintSpec` is the one place that maps a control model (stock ``ControlNetModel``, `ALDMControlNetModel`,
``T2IAdapter``) to the `layout2image.core.hints` encoder it reads:

========================  =================  =========================  ===============================
variant                   ``kind``           hint                       SD 1.5 size (image H x W)
========================  =================  =========================  ===============================
standard ControlNet       ``"rgb"``          palette RGB in [0, 1]      (B, 3, H, W)
standard ControlNet       ``"onehot"``       one-hot (+ edge channel)   (B, N (+1), H, W)
ALDM ControlNet           ``"embedding"``    class embeddings           (B, D, H/4, W/4)
T2I-Adapter               ``"rgb"/"onehot"`` as above                   (B, 3 or N (+1), H, W)
========================  =================  =========================  ===============================

Sizes are tied to the latents: the hint is ``latent_upscale`` times the latent size (8 for the standard SD hint
block, 2 for ALDM's single stride-2 conv). With a VAE of factor ``vae_scale_factor`` the label map is subsampled by
``vae_scale_factor // latent_upscale`` before encoding (1 for the SD standard block, 4 for ALDM).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import ControlNetModel, T2IAdapter

from ..hints import class_embedding_hint, one_hot, palette_rgb
from ..labels.labelset import LabelSet
from .aldm_embedding import ALDM_HINT_DOWNSAMPLE
from .models import ALDM_HINT_ENCODING, HINT_KINDS, ALDMControlNetModel

__all__ = ["HintSpec", "hint_spec_for"]


@dataclass(frozen=True)
class HintSpec:
    """The hint a control model reads.

    Args:
        kind (`str`): ``"rgb"``, ``"onehot"`` or ``"embedding"``.
        channels (`int`): C of the hint: 3, N (+1 with edges) or D.
        latent_upscale (`int`): hint size / latent size (8 for SD's standard hint block, 2 for ALDM).
        with_edges (`bool`, defaults to False): ``"onehot"`` only: the last channel is SDM's boundary map.
    """

    kind: str
    channels: int
    latent_upscale: int
    with_edges: bool = False

    def __post_init__(self) -> None:
        if self.kind == "rgb":
            if self.channels != 3 or self.with_edges:
                raise ValueError(f"kind='rgb' reads 3 channels and no edges, got channels={self.channels}")
        elif self.kind == "onehot":
            if self.channels < 1 + int(self.with_edges):
                raise ValueError(
                    f"kind='onehot' with with_edges={self.with_edges} cannot have channels={self.channels}"
                )
        elif self.kind == "embedding":
            if self.channels < 1 or self.with_edges:
                raise ValueError(f"kind='embedding' reads D >= 1 channels and no edges, got channels={self.channels}")
        else:
            raise ValueError(
                f"kind={self.kind!r} is not a known hint encoding; expected one of {', '.join(HINT_KINDS)}"
            )
        if self.latent_upscale < 1:
            raise ValueError(f"latent_upscale={self.latent_upscale} must be a positive integer")

    def label_stride(self, vae_scale_factor: int = 8) -> int:
        """Subsampling of the image-resolution label map that gives the hint resolution.

        Raises:
            ValueError: when ``vae_scale_factor`` is not a multiple of ``latent_upscale`` (the hint would be larger
                than the image).
        """
        if vae_scale_factor < 1 or vae_scale_factor % self.latent_upscale:
            raise ValueError(
                f"vae_scale_factor={vae_scale_factor} must be a positive multiple of this {self.kind!r} hint's "
                f"latent_upscale={self.latent_upscale}; match the hint block to the VAE (e.g. a standard embedding "
                "with 2 ** (len(conditioning_embedding_out_channels) - 1) == vae_scale_factor)"
            )
        return vae_scale_factor // self.latent_upscale

    def hint_size(self, height: int, width: int, vae_scale_factor: int = 8) -> tuple[int, int]:
        """Spatial size of the hint for an image of ``height`` x ``width`` pixels (multiples of the VAE factor).

        Returns:
            `tuple[int, int]`: ``(H, W)`` for rgb/onehot on SD, ``(H / 4, W / 4)`` for the ALDM embedding.
        """
        if height % vae_scale_factor or width % vae_scale_factor:
            raise ValueError(
                f"image size {height}x{width} must be a multiple of vae_scale_factor={vae_scale_factor}; resize or "
                "crop the label map first"
            )
        stride = self.label_stride(vae_scale_factor)
        return height // stride, width // stride

    def make(
        self,
        labels: torch.Tensor,
        label_set: LabelSet,
        *,
        table: torch.Tensor | None = None,
        instances: torch.Tensor | None = None,
        vae_scale_factor: int = 8,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Encode a label batch as this hint.

        Args:
            labels (`torch.Tensor`): `(B, H, W)` int64 class ids at image resolution, ignore pixels at
                ``label_set.ignore_index``; H, W multiples of ``vae_scale_factor``.
            label_set (`LabelSet`): classes, palette and ignore id.
            table (`torch.Tensor`, *optional*): `(N + 1, D)` class embeddings with the null row last; required for
                ``"embedding"``.
            instances (`torch.Tensor`, *optional*): `(B, H, W)` instance ids for the edge channel.
            vae_scale_factor (`int`, defaults to 8): image size / latent size.
            dtype (`torch.dtype`, *optional*): cast the hint, e.g. to a half-precision ControlNet's dtype (its hint
                block does not cast its input).

        Returns:
            `torch.Tensor`: `(B, channels, *hint_size(H, W))` in ``dtype`` (default float32, ``table.dtype`` for
            embeddings): RGB in [0, 1], one-hot in {0, 1}, embeddings as stored in the table.
        """
        hint = self._encode(labels, label_set, table, instances, vae_scale_factor)
        return hint if dtype is None else hint.to(dtype)

    def _encode(self, labels, label_set, table, instances, vae_scale_factor) -> torch.Tensor:
        if labels.ndim != 3:
            raise ValueError(f"labels must have shape (B, H, W), got {tuple(labels.shape)}")
        self.hint_size(labels.shape[-2], labels.shape[-1], vae_scale_factor)  # checks the sizes
        stride = self.label_stride(vae_scale_factor)
        n = label_set.num_classes
        if instances is not None and not self.with_edges:
            raise ValueError(f"instances are only read by one-hot hints with edges, not by this {self.kind!r} hint")
        if self.kind == "embedding":
            if table is None:
                raise ValueError(
                    "table is required for the 'embedding' hint: pass the (N + 1, D) class-embedding table "
                    "(layout2image.core.hints.build_class_embedding_table)"
                )
            if tuple(table.shape) != (n + 1, self.channels):
                raise ValueError(
                    f"table has shape {tuple(table.shape)}, expected ({n + 1}, {self.channels}) for label set "
                    f"{label_set.name!r} (N = {n} classes + the null row) and this ControlNet's D = {self.channels}"
                )
            return class_embedding_hint(labels, table, label_set.ignore_index, stride=stride)
        if table is not None:
            raise ValueError(f"table is only read by the 'embedding' hint, not by {self.kind!r}; drop it")
        sub = labels[:, ::stride, ::stride]
        if self.kind == "rgb":
            return palette_rgb(sub, label_set)
        elif self.kind == "onehot":
            expected = n + int(self.with_edges)
            if expected != self.channels:
                raise ValueError(
                    f"label set {label_set.name!r} has N = {n} classes, giving {expected} one-hot channels "
                    f"(with_edges={self.with_edges}), but the control model reads {self.channels}; use the label "
                    "set it was trained with"
                )
            sub_instances = None if instances is None else instances[:, ::stride, ::stride]
            return one_hot(sub, n, label_set.ignore_index, with_edges=self.with_edges, instances=sub_instances)
        else:  # unreachable: __post_init__ checked kind
            raise ValueError(
                f"kind={self.kind!r} is not a known hint encoding; expected one of {', '.join(HINT_KINDS)}"
            )

    def check(self, hint: torch.Tensor, latent_size: tuple[int, int] | None = None) -> None:
        """Check a ready hint's channels (and size, given the latents' ``(h, w)``).

        Raises:
            ValueError: naming the expected shape and how to build the hint.
        """
        want = (
            f"(B, {self.channels}, latent_upscale * h, latent_upscale * w) with latent_upscale={self.latent_upscale}"
        )
        if hint.ndim != 4 or hint.shape[1] != self.channels:
            raise ValueError(
                f"hint has shape {tuple(hint.shape)}, but this {self.kind!r} control model reads {want}; build it "
                "with HintSpec.make"
            )
        if latent_size is not None:
            size = tuple(self.latent_upscale * s for s in latent_size)
            if tuple(hint.shape[-2:]) != size:
                raise ValueError(
                    f"hint has spatial size {tuple(hint.shape[-2:])}, but latents of size {tuple(latent_size)} need "
                    f"{size} for this {self.kind!r} control model; build it with HintSpec.make"
                )


def hint_spec_for(model, label_set: LabelSet | None = None, kind: str | None = None) -> HintSpec:
    """The `HintSpec` of a control model.

    ALDM ControlNets are recognised by class; for stock ``ControlNetModel`` and ``T2IAdapter`` the kind follows from
    the input channels and the label set (3 -> rgb, N -> onehot, N + 1 -> onehot with edges). Pass ``kind`` when
    that is ambiguous (e.g. a 3-class label set).

    Args:
        model: an `ALDMControlNetModel`, ``ControlNetModel`` or ``T2IAdapter``.
        label_set (`LabelSet`, *optional*): needed to recognise one-hot models.
        kind (`str`, *optional*): ``"rgb"``, ``"onehot"`` or ``"embedding"`` to skip the inference.

    Raises:
        ValueError: the channels fit no (or more than one) encoding, or ``kind`` disagrees with the model.
        TypeError: ``model`` is not a supported control model.
    """
    if isinstance(model, ALDMControlNetModel):
        if kind not in (None, "embedding"):
            raise ValueError(f"kind={kind!r}: an ALDMControlNetModel reads kind='embedding' hints only")
        return HintSpec("embedding", int(model.config.conditioning_channels), ALDM_HINT_DOWNSAMPLE)
    elif isinstance(model, ControlNetModel):
        if model.config.get("hint_encoding") == ALDM_HINT_ENCODING:
            raise ValueError(
                "this ControlNetModel was loaded from an ALDM folder with the stock loader, so its hint encoder is the "
                "standard one with random weights; reload it with layout2image.core.controlnet.load_controlnet"
            )
        channels = int(model.config.conditioning_channels)
        widths = model.config.conditioning_embedding_out_channels
        upscale = 2 ** (len(widths) - 1)
    elif isinstance(model, T2IAdapter):
        # T2IAdapter's config names the pixel-unshuffle factor; the first feature level is at latent size.
        channels = int(model.config.in_channels)
        upscale = int(model.config.downscale_factor)
    else:
        raise TypeError(
            f"model is a {type(model).__name__}; hint_spec_for knows ALDMControlNetModel, ControlNetModel and "
            "T2IAdapter"
        )
    n = None if label_set is None else label_set.num_classes
    candidates = []
    if channels == 3:
        candidates.append(HintSpec("rgb", 3, upscale))
    if n is not None and channels == n:
        candidates.append(HintSpec("onehot", channels, upscale))
    if n is not None and channels == n + 1:
        candidates.append(HintSpec("onehot", channels, upscale, with_edges=True))
    if kind is not None:
        if kind not in ("rgb", "onehot"):
            raise ValueError(
                f"kind={kind!r} does not fit a {type(model).__name__}; it reads 'rgb' or 'onehot' hints "
                "('embedding' needs an ALDMControlNetModel)"
            )
        candidates = [c for c in candidates if c.kind == kind]
    if len(candidates) == 1:
        return candidates[0]
    elif not candidates:
        raise ValueError(
            f"{type(model).__name__} reads {channels} hint channels, which fit no encoding for "
            f"{'no label set' if n is None else f'N = {n} classes'} (rgb: 3, onehot: N, onehot + edges: N + 1)"
            + ("" if kind is None else f" of kind={kind!r}")
            + "; pass the label set the model was trained with"
        )
    else:
        raise ValueError(
            f"{type(model).__name__} reads {channels} hint channels, which fits several encodings "
            f"({', '.join(c.kind + (' + edges' if c.with_edges else '') for c in candidates)}); pass kind= explicitly"
        )
