"""Part 3: the toy text encoder and UNet, trained jointly on the autoencoder's latents, and their sample figures."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from ...core.toy import (
    DOMAINS,
    HELDOUT_START,
    IGNORE_INDEX,
    TOY_CLASSES,
    image_stats,
    make_caption,
    make_scene,
    sample_rng,
)
from ..models import SD15_CONFIG_DIR
from .config import PartResult, ToyBaseConfig, ToyData
from .schedule import _generator, _run_steps
from .tokenizer import _tokenize

__all__ = ["build_text_encoder", "build_unet", "domain_prompts", "evaluate_text_to_image", "train_text_to_image"]


def build_text_encoder(config: ToyBaseConfig, tokenizer):
    """A fresh ``CLIPTextModel`` of width D over the tokenizer's vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel

    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.text_width,
        intermediate_size=4 * config.text_width,
        projection_dim=config.text_width,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        max_position_embeddings=config.max_tokens,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="quick_gelu",
    )
    return CLIPTextModel(text_config)


def build_unet(config: ToyBaseConfig):
    """A fresh ``UNet2DConditionModel`` working on the latents (<= 16x16): cross-attention where `unet_attention`
    says and in the mid block."""
    from diffusers import UNet2DConditionModel

    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in config.unet_attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.unet_attention))
    return UNet2DConditionModel(
        sample_size=config.latent_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=config.unet_channels,
        layers_per_block=config.unet_layers_per_block,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=config.text_width,
        # diffusers' SD naming: `attention_head_dim` is the number of heads per level (the mid block uses the last).
        attention_head_dim=tuple(max(1, c // config.unet_head_channels) for c in config.unet_channels),
        norm_num_groups=config.unet_norm_groups,
    )


def _training_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(DDPMScheduler.load_config(str(SD15_CONFIG_DIR), subfolder="scheduler"))


@torch.no_grad()
def _encode_posteriors(vae, data: ToyData, batch: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std `(2N, 4, h, w)` of every image and of its mirror image (rows N..2N-1)."""
    means, stds = [], []
    for flip in (False, True):
        for lo in range(0, len(data), batch):
            x = data.image_batch(torch.arange(lo, min(lo + batch, len(data))))
            dist = vae.encode(x.flip(-1) if flip else x).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


class _EMA:
    """Exponential moving average of a module's parameters, with the usual ``(1 + n) / (10 + n)`` warm-up."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for k, v in module.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v, 1 - decay)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, module: torch.nn.Module) -> None:
        module.load_state_dict(self.shadow)


def train_text_to_image(
    config: ToyBaseConfig, vae, tokenizer, train: ToyData, budget_s: float | None = None
) -> PartResult:
    """Train the text encoder and the UNet jointly on the autoencoder's latents of `train`.

    Per step: ``z0 = scaling_factor · (μ + σ ε')`` of a random (possibly mirrored) training image, ``t ~ U[0, 1000)``,
    ``x_t = √ᾱ_t z0 + √(1-ᾱ_t) ε``, loss ``w(t) ‖ε̂(x_t, t, E(c)) - ε‖²`` with the min-SNR weight
    ``w = min(SNR, γ) / SNR``; the caption ``c`` is ``""`` with probability `caption_dropout`. The text encoder
    ``E`` gets the gradient too. The saved weights are EMAs; both models come back frozen.
    """
    torch.manual_seed(config.seed * 7 + 3)
    text_encoder = build_text_encoder(config, tokenizer).train()
    unet = build_unet(config).train()
    scheduler = _training_scheduler()
    generator = _generator(config.seed, 3)
    start = time.perf_counter()
    means, stds = _encode_posteriors(vae, train)
    encode_s = time.perf_counter() - start
    scaling = float(vae.config.scaling_factor)
    ids = _tokenize(tokenizer, train.captions)
    empty = _tokenize(tokenizer, [""])[0]
    alphas = scheduler.alphas_cumprod.float()
    snr = alphas / (1 - alphas)
    weights = torch.clamp(snr, max=config.min_snr_gamma) / snr if config.min_snr_gamma > 0 else torch.ones_like(snr)
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.unet_lr, weight_decay=0.01)
    ema_unet, ema_text = _EMA(unet, config.ema_decay), _EMA(text_encoder, config.ema_decay)
    n = len(train)

    def step_fn(step: int) -> float:
        index = torch.randint(2 * n, (config.unet_batch,), generator=generator)
        mu, sigma = means[index], stds[index]
        z0 = scaling * (mu + sigma * torch.randn(mu.shape, generator=generator))
        noise = torch.randn(z0.shape, generator=generator)
        if config.noise_offset:
            noise = noise + config.noise_offset * torch.randn((*z0.shape[:2], 1, 1), generator=generator)
        t = torch.randint(scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        noisy = scheduler.add_noise(z0, noise, t)
        tokens = ids[index % n].clone()
        drop = torch.rand(len(index), generator=generator) < config.caption_dropout
        tokens[drop] = empty
        states = text_encoder(tokens)[0]
        pred = unet(noisy, t, states).sample
        per_sample = (pred - noise).pow(2).flatten(1).mean(1)
        loss = (weights[t] * per_sample).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema_unet.update(unet, step)
        ema_text.update(text_encoder, step)
        return float(loss.detach())

    remaining = None if budget_s is None else max(1.0, budget_s - encode_s)
    report = _run_steps(
        "text-to-image",
        step_fn,
        optimizer,
        budget_s=remaining,
        fixed_steps=config.unet_steps,
        max_steps=config.unet_max_steps,
        warmup=200,
        log_every=config.log_every,
    )
    ema_unet.copy_to(unet)
    ema_text.copy_to(text_encoder)
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    figures = {
        "latent_encoding_seconds": round(encode_s, 1),
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "text_encoder_parameters": sum(p.numel() for p in text_encoder.parameters()),
        "vocabulary_size": len(tokenizer),
    }
    return PartResult({"unet": unet, "text_encoder": text_encoder}, figures, report)


def domain_prompts(num: int, seed: int, size: int, start: int = HELDOUT_START) -> dict[str, list[str]]:
    """Scenes ``start .. start + num - 1`` (default: the held-out range) captioned once per domain word with the
    same wording: ``{domain: [prompt, ...]}``.

    Prompt ``i`` differs between domains only by the domain phrase, so per-word statistics compare like with like;
    the prompt of a scene's own domain is its dataset caption (``make_sample``).
    """
    prompts: dict[str, list[str]] = {d: [] for d in DOMAINS}
    for i in range(start, start + num):
        scene = make_scene(size, seed, i)
        for domain in DOMAINS:
            prompts[domain].append(make_caption(scene, domain, sample_rng(seed, i, 2)))
    return prompts


@torch.no_grad()
def evaluate_text_to_image(
    bundle, config: ToyBaseConfig, segmenter=None, real: ToyData | None = None
) -> tuple[dict[str, Any], np.ndarray]:
    """Sample `eval_per_word` images per domain word (same seeds and scenes for every word) and measure them.

    Args:
        bundle (`ModelBundle`): the toy base model (e.g. reloaded with `load_base_models`).
        config (`ToyBaseConfig`): evaluation settings.
        segmenter (`SegmenterDiscriminator`, *optional*): the evaluation segmenter, to compare the class shares it
            sees in samples with those in `real` images.
        real (`ToyData`, *optional*): real images for the comparison.

    Returns:
        `(figures, images)`: figures per domain word (`ImageStats` of samples and of real images of that domain),
        the night - day brightness margin; images `(4, eval_per_word, H, W, 3)` uint8 (rows in `DOMAINS` order).
    """
    from ...core.sampling import decode_to_images, encode_prompts, sample_latents

    num = config.eval_per_word
    prompts = domain_prompts(num, config.seed, config.size)
    negative = encode_prompts(bundle.text_encoder, bundle.tokenizer, [""] * num)
    size = config.size // bundle.vae_scale_factor
    figures: dict[str, Any] = {"guidance_scale": config.eval_guidance, "steps": config.eval_steps, "per_word": num}
    rows = []
    shares_fake = torch.zeros(len(TOY_CLASSES))
    confidence = []
    for domain in DOMAINS:
        embeds = encode_prompts(bundle.text_encoder, bundle.tokenizer, prompts[domain])
        latents = sample_latents(
            bundle.unet,
            bundle.noise_scheduler,
            embeds,
            negative,
            latent_size=(size, size),
            num_steps=config.eval_steps,
            guidance_scale=config.eval_guidance,
            generator=torch.Generator().manual_seed(config.seed + 4242),  # the same noise for every word
        )
        images = decode_to_images(bundle.vae, latents)
        array = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        rows.append(array)
        figures[domain] = {k: round(v, 4) for k, v in image_stats(array).as_dict().items()}
        if real is not None:
            picked = [i for i, d in enumerate(real.domains) if d == domain]
            figures[f"real_{domain}"] = {
                k: round(v, 4) for k, v in image_stats(real.images[picked].numpy()).as_dict().items()
            }
        if segmenter is not None:
            probs = segmenter(images * 2 - 1)[:, : len(TOY_CLASSES)].softmax(1)
            confidence.append(float(probs.max(1).values.mean()))
            shares_fake += torch.bincount(probs.argmax(1).flatten(), minlength=len(TOY_CLASSES)).float()
    figures["night_minus_day_brightness"] = round(figures["night"]["brightness"] - figures["day"]["brightness"], 4)
    figures["snow_minus_day_white_fraction"] = round(
        figures["snow"]["white_fraction"] - figures["day"]["white_fraction"], 4
    )
    figures["fog_minus_day_contrast"] = round(figures["fog"]["contrast"] - figures["day"]["contrast"], 4)
    if segmenter is not None and real is not None:
        shares_fake = shares_fake / shares_fake.sum()
        labels = real.labels.long().flatten()
        shares_real = torch.bincount(labels[labels != IGNORE_INDEX], minlength=len(TOY_CLASSES)).float()
        shares_real = shares_real[: len(TOY_CLASSES)] / shares_real[: len(TOY_CLASSES)].sum()
        figures["segmenter_confidence_on_samples"] = round(sum(confidence) / len(confidence), 4)
        figures["class_share_distance_to_real"] = round(0.5 * float((shares_fake - shares_real).abs().sum()), 4)
        figures["class_shares_samples"] = {n: round(float(v), 4) for n, v in zip(TOY_CLASSES, shares_fake)}
        figures["class_shares_real"] = {n: round(float(v), 4) for n, v in zip(TOY_CLASSES, shares_real)}
    return figures, np.stack(rows)
