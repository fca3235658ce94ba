"""Part 1: the toy world's ``AutoencoderKL`` (x8), its training loop and its reconstruction figures."""

from __future__ import annotations

import torch

from ...core.logging import get_logger
from .config import PartResult, ToyBaseConfig, ToyData
from .schedule import _generator, _run_steps

__all__ = ["autoencode", "build_autoencoder", "reconstruction_psnr", "train_autoencoder"]

logger = get_logger(__name__)


def build_autoencoder(config: ToyBaseConfig):
    """A fresh ``AutoencoderKL`` for the toy world (x ``2 ** (len(vae_channels) - 1)``, 4 latent channels)."""
    from diffusers import AutoencoderKL

    levels = len(config.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=config.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=config.vae_norm_groups,
        sample_size=config.size,
    )


def _image_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


@torch.no_grad()
def reconstruction_psnr(vae, data: ToyData, batch: int = 32) -> float:
    """Mean per-image PSNR (dB, images in [0, 1]) of ``decode(posterior mode)`` over `data`."""
    was_training = vae.training
    vae.eval()
    psnrs = []
    for lo in range(0, len(data), batch):
        x = data.image_batch(torch.arange(lo, min(lo + batch, len(data))))
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        mse = ((y - x) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
        psnrs.append(10 * torch.log10(1.0 / mse))
    vae.train(was_training)
    return float(torch.cat(psnrs).mean())


@torch.no_grad()
def _latent_std(vae, data: ToyData, generator: torch.Generator, num: int = 256, batch: int = 32) -> float:
    """Std of posterior samples of (up to) `num` training images: 1 / it is the scaling factor."""
    values = []
    for lo in range(0, min(num, len(data)), batch):
        x = data.image_batch(torch.arange(lo, min(lo + batch, num, len(data))))
        dist = vae.encode(x).latent_dist
        values.append(dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator))
    return float(torch.cat(values).std())


def train_autoencoder(
    config: ToyBaseConfig, train: ToyData, heldout: ToyData, budget_s: float | None = None
) -> PartResult:
    """Train the autoencoder on random crops; figures: held-out PSNR, latent std and the scaling factor.

    Loss per crop ``x`` in [-1, 1] with reconstruction ``y``: ``|y - x|_1 + |y - x|_2^2 + w_edge (|∂y - ∂x|_1)
    + w_kl KL(q(z|x) || N(0, I))``.
    """
    torch.manual_seed(config.seed * 7 + 1)
    vae = build_autoencoder(config).train()
    generator = _generator(config.seed, 1)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    crop, size = config.vae_crop, config.size

    def step_fn(step: int) -> float:
        index = torch.randint(len(train), (config.vae_batch,), generator=generator)
        x = train.image_batch(index)
        if crop < size:
            top, left = (int(v) for v in torch.randint(size - crop + 1, (2,), generator=generator))
            x = x[..., top : top + crop, left : left + crop]
        if bool(torch.rand((), generator=generator) < 0.5):
            x = x.flip(-1)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        y = vae.decode(z).sample
        loss = (y - x).abs().mean() + (y - x).pow(2).mean()
        if config.vae_edge_weight:
            (gy, gx), (ty, tx) = _image_gradients(y), _image_gradients(x)
            loss = loss + config.vae_edge_weight * ((gy - ty).abs().mean() + (gx - tx).abs().mean())
        loss = loss + config.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        return float(loss.detach())

    report = _run_steps(
        "autoencoder",
        step_fn,
        optimizer,
        budget_s=budget_s,
        fixed_steps=config.vae_steps,
        max_steps=config.vae_max_steps,
        warmup=100,
        log_every=config.log_every,
    )
    vae.eval().requires_grad_(False)
    std = _latent_std(vae, train, _generator(config.seed, 2))
    scaling = float(f"{1.0 / std:.5g}")
    vae.register_to_config(scaling_factor=scaling)
    psnr = reconstruction_psnr(vae, heldout)
    figures = {
        "heldout_psnr_db": round(psnr, 2),
        "latent_std": round(std, 4),
        "scaling_factor": scaling,
        "parameters": sum(p.numel() for p in vae.parameters()),
    }
    logger.info("autoencoder: held-out PSNR %.2f dB, latent std %.3f -> scaling_factor %s", psnr, std, scaling)
    return PartResult({"vae": vae}, figures, report)


@torch.no_grad()
def autoencode(vae, data: ToyData, num: int | None = None, batch: int = 32) -> ToyData:
    """The first `num` samples of `data` (all by default) with their images replaced by ``decode(mode(encode(x)))``.

    Labels, captions and domains are kept: the images a diffusion model decodes look like these, so a segmenter
    that sees them in training reads decoded images as well as real ones.
    """
    num = len(data) if num is None else min(int(num), len(data))
    images = []
    for lo in range(0, num, batch):
        x = data.image_batch(torch.arange(lo, min(lo + batch, num)))
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        images.append(((y + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1))
    return ToyData(torch.cat(images), data.labels[:num], data.captions[:num], data.domains[:num])
