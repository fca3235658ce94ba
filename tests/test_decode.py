"""Decoding x̂0 latents for the discriminator: full VAE and TAESD, clamp, gradients, random crops, checkpointing."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny

from layout2image.core.decode import (
    CropBox,
    DecodedLatents,
    decode_latents,
    latent_scale_factor,
    random_latent_crop,
)
from layout2image.testing import tiny_vae_config

TINY_KL = tiny_vae_config()
TINY_TAESD = dict(
    encoder_block_out_channels=(8, 8),
    decoder_block_out_channels=(8, 8),
    num_encoder_blocks=(1, 1),
    num_decoder_blocks=(1, 1),
)
FACTOR = 2  # both tiny decoders upsample 2x
LATENT = 16


def _make(kind: str):
    torch.manual_seed(0)
    if kind == "kl":
        return AutoencoderKL(**TINY_KL).eval()
    elif kind == "tiny":
        return AutoencoderTiny(**TINY_TAESD).eval()
    else:
        raise ValueError(kind)


@pytest.fixture(scope="module", params=["kl", "tiny"])
def decoder(request):
    return _make(request.param)


@pytest.fixture
def latents():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, LATENT, LATENT, generator=g)


def _raw_decode(decoder, latents):
    with torch.no_grad():
        return decoder.decode(latents / decoder.config.scaling_factor).sample


def test_full_decode_shape_range_and_reference(decoder, latents):
    out = decode_latents(latents, decoder)
    assert isinstance(out, DecodedLatents)
    assert out.pixel_box is None and out.latent_box is None
    assert out.images.shape == (2, 3, LATENT * FACTOR, LATENT * FACTOR)
    assert out.images.dtype == latents.dtype
    assert out.images.min() >= -1 and out.images.max() <= 1
    torch.testing.assert_close(out.images, _raw_decode(decoder, latents).clamp(-1, 1))
    torch.testing.assert_close(decode_latents(latents, decoder, clamp="none").images, _raw_decode(decoder, latents))


def test_tiny_decoder_reads_scaled_latents_directly():
    taesd = _make("tiny")
    assert taesd.config.scaling_factor == 1.0  # so latents / scaling_factor is the identity for TAESD
    g = torch.Generator().manual_seed(2)
    z = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(decode_latents(z, taesd, clamp="none").images, taesd.decode(z).sample)


def test_gradients_reach_latents(decoder, latents):
    latents = latents.clone().requires_grad_(True)
    out = decode_latents(latents, decoder)
    out.images.square().mean().backward()
    assert latents.grad is not None
    assert torch.isfinite(latents.grad).all()
    assert latents.grad.abs().sum() > 0


def test_hard_clamp_zero_gradient_outside():
    taesd = _make("tiny")
    with torch.no_grad():  # push part of the output above 1
        taesd.decoder.layers[-1].bias.fill_(2.0)
    z = torch.zeros(1, 4, 4, 4, requires_grad=True)
    raw = decode_latents(z, taesd, clamp="none").images
    assert (raw > 1).all()
    decode_latents(z, taesd).images.sum().backward()
    assert torch.count_nonzero(z.grad) == 0


def test_random_crop_box_and_content(decoder, latents):
    g = torch.Generator().manual_seed(3)
    out = decode_latents(latents, decoder, latent_crop_size=8, generator=g)
    lb, pb = out.latent_box, out.pixel_box
    assert (lb.height, lb.width) == (8, 8)
    assert 0 <= lb.top <= LATENT - 8 and 0 <= lb.left <= LATENT - 8
    assert pb == CropBox(lb.top * FACTOR, lb.left * FACTOR, 8 * FACTOR, 8 * FACTOR)
    assert out.images.shape == (2, 3, 8 * FACTOR, 8 * FACTOR)
    # The image is the decode of exactly that latent crop, and the box crops a label map to the image's size.
    torch.testing.assert_close(out.images, decode_latents(lb.crop(latents), decoder).images)
    labels = torch.zeros(2, LATENT * FACTOR, LATENT * FACTOR, dtype=torch.long)
    assert pb.crop(labels).shape == (2, 8 * FACTOR, 8 * FACTOR)
    # Same seed, same box; crop draws use only the generator.
    again = decode_latents(latents, decoder, latent_crop_size=8, generator=torch.Generator().manual_seed(3))
    assert again.latent_box == lb
    torch.testing.assert_close(again.images, out.images)


def test_random_crop_boxes_cover_range_and_clip():
    z = torch.zeros(1, 4, 10, 12)
    g = torch.Generator().manual_seed(4)
    boxes = [random_latent_crop(z, (4, 6), g)[1] for _ in range(200)]
    assert {b.top for b in boxes} == set(range(7)) and {b.left for b in boxes} == set(range(7))
    crop, box = random_latent_crop(z, 64, g)  # larger than the latents: whole dims
    assert box == CropBox(0, 0, 10, 12) and crop.shape == z.shape
    crop, box = random_latent_crop(z, (3, 64), g)
    assert (box.height, box.width, box.left) == (3, 12, 0)


def test_crop_gradients_only_inside_box():
    taesd = _make("tiny")
    z = torch.randn(1, 4, 12, 12, generator=torch.Generator().manual_seed(5), requires_grad=True)
    out = decode_latents(z, taesd, latent_crop_size=4, generator=torch.Generator().manual_seed(6))
    out.images.sum().backward()
    inside = torch.zeros_like(z, dtype=torch.bool)
    inside[..., out.latent_box.top : out.latent_box.top + 4, out.latent_box.left : out.latent_box.left + 4] = True
    assert torch.count_nonzero(z.grad[~inside]) == 0
    assert torch.count_nonzero(z.grad[inside]) > 0


def test_gradient_checkpointing_is_temporary_and_equal():
    vae = _make("kl")
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    z1, z2 = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    a = decode_latents(z1, vae).images
    b = decode_latents(z2, vae, gradient_checkpointing=True).images
    assert not vae.is_gradient_checkpointing  # restored after the call
    a.square().sum().backward()
    b.square().sum().backward()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(z1.grad, z2.grad)
    vae.enable_gradient_checkpointing()
    decode_latents(z, vae, gradient_checkpointing=False)
    assert vae.is_gradient_checkpointing  # the caller's own setting survives too


def test_dtype_round_trip(decoder, latents):
    out = decode_latents(latents.double(), decoder)
    assert out.images.dtype == torch.float64
    torch.testing.assert_close(out.images.float(), decode_latents(latents, decoder).images)


def test_latent_scale_factor_from_config():
    sd_like = AutoencoderKL(
        block_out_channels=(4, 4, 4, 4),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=2,
    )
    assert latent_scale_factor(sd_like) == 8
    assert latent_scale_factor(AutoencoderTiny()) == 8  # TAESD's defaults
    assert latent_scale_factor(_make("kl")) == FACTOR
    assert latent_scale_factor(_make("tiny")) == FACTOR


def test_errors(latents):
    vae = _make("kl")
    with pytest.raises(ValueError, match="clamp='soft'"):
        decode_latents(latents, vae, clamp="soft")
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        decode_latents(latents[:, :3], vae)
    with pytest.raises(TypeError, match="AutoencoderKL"):
        decode_latents(latents, torch.nn.Identity())
    with pytest.raises(ValueError, match="latent_crop_size=0"):
        decode_latents(latents, vae, latent_crop_size=0)
    with pytest.raises(ValueError, match="does not fit"):
        CropBox(10, 0, 8, 8).crop(latents)
