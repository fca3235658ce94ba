"""Differentiable decoding of predicted latents x̂0 into images for the discriminator (ALDM §5, trainers §3).

Two decoders share one interface:

* the full VAE (``AutoencoderKL``): latents are divided by ``config.scaling_factor`` (0.18215 for SD 1.5) before
  ``decode``; ``gradient_checkpointing=True`` checkpoints its mid and up blocks for this call (~5x less saved
  activation memory, one extra decoder forward in backward);
* TAESD (``AutoencoderTiny``): decodes the *scaled* UNet latents directly; its config's ``scaling_factor`` is 1.0,
  so the same ``latents / scaling_factor (+ shift_factor)`` rule applies unchanged. Its decoder squashes the input
  with ``3 * tanh(z / 3)`` and maps its [0, 1] output to [-1, 1] without clamping.

The image is then **hard-clamped to [-1, 1]** as in ALDM: values outside get exactly the boundary and a zero
gradient (``clamp="none"`` keeps the raw decoder output, e.g. for a caller that applies its own squash).

Decoding a random latent crop (``latent_crop_size``) cuts the decoder cost by the area ratio; the returned
`CropBox` (pixel units) crops the label map the same way. The crop is not exactly the matching region of a full
decode: the VAE's mid block attends over the whole latent and both decoders' convs see zero padding at the crop
border, so borders differ slightly (fine for a per-pixel loss).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, AutoencoderTiny

__all__ = ["CLAMP_MODES", "CropBox", "DecodedLatents", "decode_latents", "latent_scale_factor", "random_latent_crop"]

#: Valid values of ``decode_latents(..., clamp=)``.
CLAMP_MODES = ("hard", "none")


@dataclass(frozen=True)
class CropBox:
    """A rectangle shared by the whole batch, as ``tensor[..., top : top + height, left : left + width]``.

    Args:
        top (`int`), left (`int`): corner, in the units of the tensor it applies to.
        height (`int`), width (`int`): size.
    """

    top: int
    left: int
    height: int
    width: int

    def scaled(self, factor: int) -> CropBox:
        """The same box in a space ``factor`` times larger (latent -> pixel)."""
        return CropBox(self.top * factor, self.left * factor, self.height * factor, self.width * factor)

    def crop(self, tensor: torch.Tensor) -> torch.Tensor:
        """Crop the last two dims: a `(B, H, W)` label map or a `(B, C, H, W)` image.

        Raises:
            ValueError: when the box does not fit inside the tensor.
        """
        h, w = tensor.shape[-2:]
        if self.top < 0 or self.left < 0 or self.top + self.height > h or self.left + self.width > w:
            raise ValueError(
                f"crop box {self} does not fit a tensor of spatial size {h}x{w}; crop the tensor that matches the "
                "decoded latents (labels at image resolution for a pixel box)"
            )
        return tensor[..., self.top : self.top + self.height, self.left : self.left + self.width]


@dataclass
class DecodedLatents:
    """Result of `decode_latents`.

    Args:
        images (`torch.Tensor`): `(B, 3, h, w)` in [-1, 1] (hard clamp) in the latents' dtype; differentiable
            w.r.t. the latents. ``h, w`` = full image size, or the crop size.
        pixel_box (`CropBox`, *optional*): the decoded region in image pixels (None without a crop); apply it to
            the label map with ``pixel_box.crop(labels)``.
        latent_box (`CropBox`, *optional*): the same region in latent units.
    """

    images: torch.Tensor
    pixel_box: CropBox | None = None
    latent_box: CropBox | None = None


def latent_scale_factor(decoder: AutoencoderKL | AutoencoderTiny) -> int:
    """Image size / latent size of a decoder, read from its config.

    ``2 ** (len(block_out_channels) - 1)`` for ``AutoencoderKL`` (8 for SD), ``upsampling_scaling_factor **
    (len(decoder_block_out_channels) - 1)`` for ``AutoencoderTiny`` (8 for TAESD).

    Raises:
        TypeError: for other decoders.
    """
    if isinstance(decoder, AutoencoderTiny):
        return int(decoder.config.upsampling_scaling_factor) ** (len(decoder.config.decoder_block_out_channels) - 1)
    elif isinstance(decoder, AutoencoderKL):
        return 2 ** (len(decoder.config.block_out_channels) - 1)
    else:
        raise TypeError(
            f"decoder is a {type(decoder).__name__}; decode_latents supports diffusers AutoencoderKL (the SD VAE) and "
            "AutoencoderTiny (TAESD)"
        )


def _pair(size: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or any(int(s) < 1 for s in pair):
        raise ValueError(f"{name}={size!r} must be a positive int or a (height, width) pair of positive ints")
    return int(pair[0]), int(pair[1])


def random_latent_crop(
    latents: torch.Tensor,
    size: int | tuple[int, int],
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, CropBox]:
    """Take one random crop (shared by the batch) of the latents.

    Args:
        latents (`torch.Tensor`): `(B, C, h, w)`.
        size (`int` or `tuple[int, int]`): crop size in latent units; a size at least the latent size keeps that
            dimension whole.
        generator (`torch.Generator`, *optional*): draws the offsets (CPU generators work for any latent device).

    Returns:
        `tuple[torch.Tensor, CropBox]`: the cropped latents (a view) and the box in latent units.
    """
    if latents.ndim != 4:
        raise ValueError(f"latents must have shape (B, C, h, w), got {tuple(latents.shape)}")
    ch, cw = _pair(size, "latent_crop_size")
    h, w = latents.shape[-2:]
    ch, cw = min(ch, h), min(cw, w)
    device = generator.device if generator is not None else torch.device("cpu")
    top = int(torch.randint(0, h - ch + 1, (1,), generator=generator, device=device))
    left = int(torch.randint(0, w - cw + 1, (1,), generator=generator, device=device))
    box = CropBox(top, left, ch, cw)
    return box.crop(latents), box


@contextlib.contextmanager
def _checkpointing(decoder: torch.nn.Module, enabled: bool | None):
    """Set the decoder's gradient checkpointing for one call and restore every module's flag afterwards."""
    if enabled is None:
        yield
        return
    saved = {m: m.gradient_checkpointing for m in decoder.modules() if hasattr(m, "gradient_checkpointing")}
    try:
        if enabled:
            decoder.enable_gradient_checkpointing()
        else:
            decoder.disable_gradient_checkpointing()
        yield
    finally:
        for module, flag in saved.items():
            module.gradient_checkpointing = flag


def decode_latents(
    latents: torch.Tensor,
    decoder: AutoencoderKL | AutoencoderTiny,
    *,
    latent_crop_size: int | tuple[int, int] | None = None,
    generator: torch.Generator | None = None,
    gradient_checkpointing: bool | None = None,
    clamp: str = "hard",
) -> DecodedLatents:
    """Decode scaled latents (the UNet's space, e.g. x̂0) to images, keeping the graph.

    Steps: (1) optionally crop the latents at random; (2) ``z = latents / scaling_factor + shift_factor`` (the VAE
    convention; TAESD has scaling_factor 1); (3) ``decoder.decode(z)``; (4) clamp to [-1, 1].

    Args:
        latents (`torch.Tensor`): `(B, 4, h, w)` scaled latents, any float dtype; cast to the decoder's dtype for the
            decode and the image cast back.
        decoder (`AutoencoderKL` or `AutoencoderTiny`): frozen or not; never modified (checkpointing flags are
            restored on return).
        latent_crop_size (`int` or `tuple[int, int]`, *optional*): decode only a random crop of this many latent
            pixels (one box for the batch); None decodes everything.
        generator (`torch.Generator`, *optional*): for the crop offsets.
        gradient_checkpointing (`bool`, *optional*): force the decoder's gradient checkpointing on/off for this call;
            None leaves its current setting. Only has an effect while grad is enabled.
        clamp (`str`, defaults to `"hard"`): ``"hard"`` clamps to [-1, 1] (ALDM; zero gradient outside),
            ``"none"`` returns the raw decoder output.

    Returns:
        `DecodedLatents`: images `(B, 3, f * h', f * w')` with f = `latent_scale_factor(decoder)` and ``h', w'`` the
        (cropped) latent size, plus the crop boxes.
    """
    factor = latent_scale_factor(decoder)
    if clamp not in CLAMP_MODES:
        raise ValueError(f"clamp={clamp!r} is not a clamp mode; expected one of {', '.join(CLAMP_MODES)}")
    if latents.ndim != 4 or latents.shape[1] != decoder.config.latent_channels:
        raise ValueError(
            f"latents have shape {tuple(latents.shape)}, but this {type(decoder).__name__} decodes "
            f"(B, {decoder.config.latent_channels}, h, w)"
        )
    latent_box = None
    if latent_crop_size is not None:
        latents, latent_box = random_latent_crop(latents, latent_crop_size, generator)
    out_dtype = latents.dtype
    # The decoder may run in half precision while x̂0 comes out of an fp32 DDIM step: cast in, cast the image back.
    z = latents.to(decoder.dtype) / decoder.config.scaling_factor
    shift = decoder.config.get("shift_factor")
    if shift:
        z = z + shift
    with _checkpointing(decoder, gradient_checkpointing):
        images = decoder.decode(z).sample
    if clamp == "hard":
        images = images.clamp(-1.0, 1.0)
    elif clamp == "none":
        pass
    else:  # unreachable: checked above
        raise ValueError(f"clamp={clamp!r} is not a clamp mode; expected one of {', '.join(CLAMP_MODES)}")
    return DecodedLatents(
        images=images.to(out_dtype),
        pixel_box=None if latent_box is None else latent_box.scaled(factor),
        latent_box=latent_box,
    )
