"""Train the toy world's stand-ins for Stable Diffusion 1.5's frozen parts, plus its two segmenters.

`train_toy_base` writes one folder that `layout2image.trainer.models.load_base_models` loads like an SD 1.5
diffusers folder, so every code path that runs on SD 1.5 runs on the toy world (docs/TOY_WORLD.md)::

    out/
      model_index.json           StableDiffusionPipeline layout (no safety checker, no feature extractor)
      vae/                       AutoencoderKL, x8: 128x128x3 images <-> 16x16x4 latents
      tokenizer/                 CLIPTokenizer over the toy caption vocabulary (vocab.json, merges.txt, ...)
      text_encoder/              CLIPTextModel of width D (`ToyBaseConfig.text_width`)
      unet/                      UNet2DConditionModel, cross_attention_dim = D, attention at 16x16 and below
      scheduler/                 SD 1.5's scheduler config (scaled_linear 0.00085-0.012, 1000 steps, epsilon)
      segmenter/                 evaluation segmenter: SegFormer, N toy classes (id2label = toy class names)
      discriminator_init/        another SegFormer, trained on another data split: ALDM's discriminator start
      acceptance.json            every acceptance figure, step counts, timings, seed, machine, versions
      samples.png                base-model samples, one row per domain word (day, night, snow, fog)

The parts and their acceptance figures (`ToyBaseReport.figures`):

1. **Autoencoder** (`train_autoencoder`): ``AutoencoderKL`` with 4 levels (3 downsamplings), trained on random
   crops of toy images with L1 + L2 + an image-gradient L1 + a small KL term. Figure: reconstruction PSNR on
   held-out 128x128 images (posterior mode). ``scaling_factor`` = 1 / std of training latents, so scaled latents
   have unit variance as SD 1.5's do with 0.18215.
2. **Tokenizer** (`build_toy_tokenizer`): a CLIP BPE tokenizer whose vocabulary holds every toy caption word as one
   token (``street</w>``) plus single characters as a fallback; merges are chosen so that CLIP's BPE rebuilds each
   word (`learn_word_merges`).
3. **Text encoder + UNet** (`train_text_to_image`): trained jointly with the ε-prediction loss on latents of the
   training images (the loss back-propagates into the text encoder), captions dropped to ``""`` 10 % of the time
   for classifier-free guidance, min-SNR weighting, EMA weights saved. Both are frozen afterwards. Figures
   (`evaluate_text_to_image`, on the saved folder reloaded through `load_base_models`): image statistics per domain
   word over the same seeds and scenes (`core.toy.image_stats`), the night - day brightness margin, and how the
   evaluation segmenter sees the samples (class shares vs real images, confidence).
4. **Evaluation segmenter** (`train_segmenter`): SegFormer trained on real toy images; figure: mIoU on held-out
   real images, measured through `core.discriminator.build_discriminator` as validation loads it (and on the
   autoencoder's reconstructions of them, the ceiling for generated images).
5. **Discriminator initialisation**: the same recipe on a disjoint data split with another seed and the tiny
   config the toy preset's discriminator uses. Layout mIoU is never measured with it.

Time and determinism: each part has a share of the time budget (``minutes``). A part runs a few steps, measures the
time per step and then fixes its step count (its learning-rate schedule depends on that count only), capped by
``*_max_steps``; ``*_steps`` fixes the count and turns the time budget off for that part. Given the seed and the
step counts (recorded in ``acceptance.json``), training is deterministic on a given machine and thread count.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..core.logging import get_logger
from ..core.metrics import MeanIoU
from ..core.toy import (
    DOMAIN_PHRASES,
    DOMAINS,
    HELDOUT_START,
    IGNORE_INDEX,
    TOY_CLASSES,
    image_stats,
    make_caption,
    make_sample,
    make_scene,
    sample_rng,
    toy_label_set,
)
from .models import SD15_CONFIG_DIR, TOY_WEIGHTS_DIR

__all__ = [
    "EXTRA_VOCABULARY",
    "IMAGENET_NORM",
    "TOY_WEIGHTS_DIR",
    "PartResult",
    "StepReport",
    "ToyBaseConfig",
    "ToyBaseReport",
    "ToyData",
    "acceptance_markdown",
    "autoencode",
    "build_toy_tokenizer",
    "caption_vocabulary",
    "domain_prompts",
    "evaluate_text_to_image",
    "learn_word_merges",
    "load_segmenter",
    "make_toy_data",
    "reconstruction_psnr",
    "save_segmenter",
    "segmenter_miou",
    "train_autoencoder",
    "train_evaluation_segmenter",
    "train_segmenter",
    "train_text_to_image",
    "train_toy_base",
]

logger = get_logger(__name__)

#: Words the tokenizer knows beyond those of generated captions: class names, counts, and the words of the
#: trainer's fallback captions (``"a photo with road, car and sky"``).
EXTRA_VOCABULARY = (
    *TOY_CLASSES,
    *("skies", "roads", "sidewalks", "buildings", "trees", "cars", "people", "persons", "grass"),
    *("one", "two", "three", "four", "five", "six", "many", "a", "an", "the", "of", "with", "and", "in", "at"),
    *("on", "photo", "picture", "image", "street", "lamp", "lamps", "pole", "poles", "city", "town", "urban"),
    *DOMAINS,
)
#: Characters with a token of their own (and a word-final ``</w>`` form): the fallback for unknown words.
_CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()/&+"
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
#: Split of a lower-cased text into CLIP's pre-tokens (letters, single digits, other symbols).
_PRE_TOKENS = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")

#: ImageNet mean/std: what the saved segmenters are trained with (their preprocessor_config.json says so too).
IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

# Index offsets of the data splits (sample i of a toy dataset depends on (seed, i) only, so disjoint index ranges
# are independent samples): training, held-out evaluation, discriminator-init training, discriminator-init held-out.
_HELDOUT_START = HELDOUT_START
_DISC_TRAIN_START = 2_000_000
_DISC_HELDOUT_START = 3_000_000


# --------------------------------------------------------------------------------------------------------------------
# configuration and results
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ToyBaseConfig:
    """Sizes, budgets and optimiser settings of the toy base models (defaults: the shipped ``weights/toy``)."""

    seed: int = field(default=0, metadata={"help": "Seed of the data splits and of every initialisation."})
    minutes: float = field(default=30.0, metadata={"help": "Wall-clock budget of the whole run, in minutes."})
    size: int = field(default=128, metadata={"help": "Image size in pixels (a multiple of 8)."})
    num_train: int = field(default=3000, metadata={"help": "Training images (autoencoder, UNet, segmenter)."})
    num_heldout: int = field(default=256, metadata={"help": "Held-out images for PSNR and mIoU."})
    # shares of the budget; the UNet gets what is left after the others and `eval_reserve`
    vae_share: float = field(default=0.18, metadata={"help": "Share of the budget for the autoencoder."})
    segmenter_share: float = field(default=0.22, metadata={"help": "Share of the budget for the segmenter."})
    discriminator_share: float = field(default=0.06, metadata={"help": "Share for the discriminator init."})
    eval_reserve: float = field(default=0.04, metadata={"help": "Share kept for saving and evaluation."})
    # autoencoder
    vae_channels: tuple[int, ...] = field(
        default=(16, 32, 64, 64), metadata={"help": "AutoencoderKL block widths; len - 1 downsamplings (4 = x8)."}
    )
    vae_norm_groups: int = field(default=8, metadata={"help": "GroupNorm groups of the autoencoder."})
    vae_batch: int = field(default=16, metadata={"help": "Autoencoder batch size."})
    vae_crop: int = field(default=64, metadata={"help": "Autoencoder training crop (pixels, multiple of 8)."})
    vae_lr: float = field(default=1.5e-3, metadata={"help": "Autoencoder peak learning rate (AdamW)."})
    vae_kl_weight: float = field(default=1e-6, metadata={"help": "Weight of the KL term."})
    vae_edge_weight: float = field(default=0.5, metadata={"help": "Weight of the image-gradient L1 term."})
    vae_steps: int | None = field(default=None, metadata={"help": "Fixed step count (None: from the budget)."})
    vae_max_steps: int = field(default=6000, metadata={"help": "Most steps the budget may give."})
    # text encoder + UNet
    text_width: int = field(default=64, metadata={"help": "D: text encoder width = UNet cross_attention_dim."})
    text_layers: int = field(default=3, metadata={"help": "Text encoder layers."})
    text_heads: int = field(default=4, metadata={"help": "Text encoder attention heads."})
    max_tokens: int = field(default=32, metadata={"help": "Tokenizer model_max_length (incl. BOS and EOS)."})
    unet_channels: tuple[int, ...] = field(
        default=(32, 64, 128), metadata={"help": "UNet block widths; the last level has no attention."}
    )
    unet_attention: tuple[bool, ...] = field(
        default=(False, True, False),
        metadata={"help": "Per level: cross-attention blocks or not (the mid block always has them)."},
    )
    unet_layers_per_block: int = field(default=1, metadata={"help": "Resnets per UNet block."})
    unet_head_channels: int = field(
        default=64,
        metadata={
            "help": "Channels per attention head in the UNet (heads = width // this, at least 1). 64 as in SD 1.5: "
            "ComfyUI's model detection assumes 64-channel heads for UNets it does not know."
        },
    )
    unet_norm_groups: int = field(default=16, metadata={"help": "GroupNorm groups of the UNet."})
    unet_batch: int = field(default=32, metadata={"help": "UNet batch size."})
    unet_lr: float = field(default=2e-3, metadata={"help": "UNet and text encoder peak learning rate (AdamW)."})
    caption_dropout: float = field(default=0.1, metadata={"help": "Share of empty captions (for CFG)."})
    min_snr_gamma: float = field(default=5.0, metadata={"help": "min-SNR loss weighting gamma (0 = off)."})
    noise_offset: float = field(
        default=0.1,
        metadata={
            "help": "Offset noise: add noise_offset * N(0, 1) per image and channel to the training noise. Without "
            "it SD 1.5's schedule leaves the image mean to the initial noise and 'night' cannot darken samples."
        },
    )
    ema_decay: float = field(default=0.999, metadata={"help": "EMA decay of the saved UNet/text weights."})
    unet_steps: int | None = field(default=None, metadata={"help": "Fixed step count (None: from the budget)."})
    unet_max_steps: int = field(default=20000, metadata={"help": "Most steps the budget may give."})
    # segmenters
    segmenter_hidden: tuple[int, ...] = field(
        default=(16, 32, 64, 128), metadata={"help": "SegFormer stage widths of the evaluation segmenter."}
    )
    segmenter_decoder: int = field(default=64, metadata={"help": "SegFormer decoder width (evaluation)."})
    segmenter_strides: tuple[int, ...] = field(
        default=(4, 2, 2, 2),
        metadata={"help": "SegFormer patch-embedding strides (evaluation); (4, 2, 2, 2) predicts at H/4."},
    )
    segmenter_batch: int = field(default=16, metadata={"help": "Segmenter batch size."})
    segmenter_lr: float = field(default=4e-3, metadata={"help": "Segmenter peak learning rate (AdamW)."})
    segmenter_steps: int | None = field(default=None, metadata={"help": "Fixed step count (None: budget)."})
    segmenter_max_steps: int = field(default=8000, metadata={"help": "Most steps the budget may give."})
    num_disc_train: int = field(default=1000, metadata={"help": "Training images of the discriminator init."})
    num_autoencoded: int = field(
        default=1000, metadata={"help": "Training images also shown autoencoded to each segmenter (0 = none)."}
    )
    autoencoded_batch_share: float = field(
        default=0.35, metadata={"help": "Probability that a segmenter batch is drawn from the autoencoded images."}
    )
    discriminator_steps: int | None = field(default=None, metadata={"help": "Fixed step count (None: budget)."})
    discriminator_max_steps: int = field(default=4000, metadata={"help": "Most steps the budget may give."})
    # evaluation
    eval_per_word: int = field(default=16, metadata={"help": "Samples per domain word."})
    eval_steps: int = field(default=25, metadata={"help": "DDIM steps of the evaluation samples."})
    eval_guidance: float = field(default=3.0, metadata={"help": "Classifier-free guidance scale of the samples."})
    log_every: int = field(default=100, metadata={"help": "Log the loss every N steps."})

    def __post_init__(self) -> None:
        self.vae_channels = tuple(int(c) for c in self.vae_channels)
        self.unet_channels = tuple(int(c) for c in self.unet_channels)
        self.segmenter_hidden = tuple(int(c) for c in self.segmenter_hidden)
        self.unet_attention = tuple(bool(a) for a in self.unet_attention)
        self.segmenter_strides = tuple(int(c) for c in self.segmenter_strides)
        factor = 2 ** (len(self.vae_channels) - 1)
        for name in ("size", "vae_crop"):
            value = getattr(self, name)
            if value < factor or value % factor:
                raise ValueError(f"{name}={value} must be a positive multiple of the autoencoder factor {factor}")
        if self.vae_crop > self.size:
            raise ValueError(f"vae_crop={self.vae_crop} must not exceed size={self.size}")
        if len(self.unet_channels) < 2:
            raise ValueError(f"unet_channels={self.unet_channels} needs at least two levels")
        if len(self.unet_attention) != len(self.unet_channels):
            raise ValueError(
                f"unet_attention={self.unet_attention} must have one entry per level of unet_channels="
                f"{self.unet_channels}"
            )
        if len(self.segmenter_hidden) != 4 or len(self.segmenter_strides) != 4:
            raise ValueError(
                f"segmenter_hidden={self.segmenter_hidden} and segmenter_strides={self.segmenter_strides} must "
                "each name four SegFormer stages"
            )
        if self.minutes <= 0:
            raise ValueError(f"minutes={self.minutes} must be positive")
        shares = self.vae_share + self.segmenter_share + self.discriminator_share + self.eval_reserve
        if not 0 < shares < 1:
            raise ValueError(f"the budget shares add up to {shares:.2f}; they must leave time for the UNet (< 1)")
        if self.num_train < 1 or self.num_heldout < 1 or self.num_disc_train < 1:
            raise ValueError("num_train, num_heldout and num_disc_train must be at least 1")
        if not 0 <= self.autoencoded_batch_share <= 1:
            raise ValueError(f"autoencoded_batch_share={self.autoencoded_batch_share} must be in [0, 1]")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout={self.caption_dropout} must be in [0, 1)")
        if self.text_width % self.text_heads:
            raise ValueError(f"text_width={self.text_width} must be divisible by text_heads={self.text_heads}")
        if self.unet_head_channels < 1 or self.noise_offset < 0:
            raise ValueError(
                f"unet_head_channels={self.unet_head_channels} must be >= 1 and noise_offset={self.noise_offset} >= 0"
            )

    @property
    def latent_size(self) -> int:
        return self.size // 2 ** (len(self.vae_channels) - 1)


@dataclass
class StepReport:
    """How a part's optimisation loop went.

    Args:
        steps (`int`): optimisation steps done.
        planned (`int`): the step count the schedule was built for (from the budget or fixed).
        seconds (`float`): wall time of the loop.
        budget_seconds (`float`, *optional*): its time budget (None with a fixed step count).
        final_loss (`float`): mean loss over the last 10 % of steps.
        cut (`bool`): stopped by the hard time limit (1.3 x budget) before ``planned``.
    """

    steps: int
    planned: int
    seconds: float
    budget_seconds: float | None
    final_loss: float
    cut: bool = False


@dataclass
class PartResult:
    """A trained part (`models` by name), its acceptance figures and its step report."""

    models: dict[str, Any]
    figures: dict[str, Any]
    report: StepReport | None = None


@dataclass
class ToyBaseReport:
    """What `train_toy_base` wrote: the folder, every figure (also in ``acceptance.json``) and timings."""

    out_dir: Path
    figures: dict[str, Any]
    seconds: float


@dataclass
class ToyData:
    """Toy samples in memory.

    Args:
        images (`torch.Tensor`): `(N, H, W, 3)` uint8 RGB.
        labels (`torch.Tensor`): `(N, H, W)` uint8 class ids, 255 = ignore.
        captions (`list[str]`): one caption per sample (contains the domain word).
        domains (`list[str]`): the domain of each sample.
    """

    images: torch.Tensor
    labels: torch.Tensor
    captions: list[str]
    domains: list[str]

    def __len__(self) -> int:
        return len(self.captions)

    def image_batch(self, index: torch.Tensor) -> torch.Tensor:
        """`(B, 3, H, W)` float32 in [-1, 1] for the given sample indices."""
        return self.images[index].permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def make_toy_data(num: int, seed: int, size: int, start: int = 0) -> ToyData:
    """Generate samples ``start .. start + num - 1`` of the toy dataset with seed `seed` (see `core.toy`)."""
    images = np.empty((num, size, size, 3), dtype=np.uint8)
    labels = np.empty((num, size, size), dtype=np.uint8)
    captions, domains = [], []
    for i in range(num):
        sample = make_sample(start + i, seed, size)
        images[i], labels[i] = sample.image, sample.labels
        captions.append(sample.caption)
        domains.append(sample.domain)
    return ToyData(torch.from_numpy(images), torch.from_numpy(labels), captions, domains)


# --------------------------------------------------------------------------------------------------------------------
# step loop with a time budget
# --------------------------------------------------------------------------------------------------------------------


def _lr_factor(step: int, planned: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, constant up to `_DECAY_START` of `planned`, then cosine decay to 5 %."""
    if step < warmup:
        return (step + 1) / warmup
    decay_from = max(warmup, int(_DECAY_START * planned))
    progress = min(1.0, max(0, step - decay_from) / max(1, planned - decay_from))
    return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress))


#: Where the cosine decay starts, as a share of the planned steps. The plan is revised once, at `_REPLAN_AT` of the
#: first plan, and never below ``step / _DECAY_START``: both plans are still in the constant phase then, so the
#: learning rates used equal those of a run with the final count fixed from the start (``*_steps``).
_DECAY_START = 0.3
_REPLAN_AT = 0.2


def _run_steps(
    name: str,
    step_fn: Callable[[int], float],
    optimizer: torch.optim.Optimizer,
    *,
    budget_s: float | None,
    fixed_steps: int | None,
    max_steps: int,
    warmup: int,
    log_every: int,
    calibrate: int = 6,
) -> StepReport:
    """Run `step_fn(step)` (one optimisation step, returns the loss) with a warm-up, constant, cosine schedule.

    With `fixed_steps`, exactly that many steps. Otherwise the first `calibrate` steps (the first one not timed)
    measure the time per step and plan ``min(max_steps, steps that fit in budget_s)``; the plan is revised once with
    the rate measured up to `_REPLAN_AT` of it (other processes may have started or stopped). Warm-up covers the
    calibration, and the revision happens before the decay starts, so the schedule depends on the final count
    only. A hard limit of 1.3 x `budget_s` stops a loop that slows down badly; the report says so.
    """
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    planned = fixed_steps if fixed_steps is not None else max_steps
    if fixed_steps is not None:
        warmup = max(1, min(warmup, planned // 5))
    else:
        warmup = max(warmup, calibrate + 1)
    replan_at: int | None = None
    losses: list[float] = []
    start = time.perf_counter()
    timed_from, cut, step = start, False, 0
    while step < planned:
        factor = _lr_factor(step, planned, warmup)
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * factor
        losses.append(float(step_fn(step)))
        step += 1
        now = time.perf_counter()
        if fixed_steps is None:
            if step == 1:
                timed_from = now
            elif step == calibrate or step == replan_at:
                per_step = (now - timed_from) / (step - 1)
                fit = int((budget_s - (now - start)) / max(per_step, 1e-6)) + step
                floor = step + 1 if step == calibrate else math.ceil(step / _DECAY_START) + 1
                planned = max(floor, min(max_steps, fit))
                if step == calibrate:
                    replan_at = max(calibrate + 1, int(_REPLAN_AT * planned))
                logger.info("%s: %.3f s/step, planning %d steps in %.0f s", name, per_step, planned, budget_s)
            if now - start > 1.3 * budget_s and step < planned:
                cut = True
                logger.warning(
                    "%s: over 1.3x its %.0f s budget after %d/%d steps; stopping", name, budget_s, step, planned
                )
                break
        if log_every and (step % log_every == 0 or step == planned):
            recent = losses[-log_every:]
            logger.info(
                "%s step %d/%d: loss %.4f (%.0f s)", name, step, planned, sum(recent) / len(recent), now - start
            )
    tail = losses[-max(1, len(losses) // 10) :]
    return StepReport(
        steps=step,
        planned=planned,
        seconds=round(time.perf_counter() - start, 1),
        budget_seconds=None if fixed_steps is not None else round(budget_s, 1),
        final_loss=round(sum(tail) / len(tail), 5),
        cut=cut,
    )


def _generator(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + stream)


# --------------------------------------------------------------------------------------------------------------------
# 1. autoencoder
# --------------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------------
# 2. tokenizer
# --------------------------------------------------------------------------------------------------------------------


def _pre_tokens(text: str) -> list[str]:
    return _PRE_TOKENS.findall(text.lower())


def caption_vocabulary(captions: Iterable[str] = ()) -> list[str]:
    """The toy vocabulary: every word of `captions`, of the domain phrases and `EXTRA_VOCABULARY`, sorted."""
    words: set[str] = set(EXTRA_VOCABULARY)
    for text in (*captions, *(p for phrases in DOMAIN_PHRASES.values() for p in phrases)):
        words.update(t for t in _pre_tokens(text) if t.isalpha())
    return sorted(words)


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: merge the lowest-ranked adjacent pair (all its occurrences) until none is left."""
    word = list(symbols)
    while len(word) > 1:
        pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
        best = min(pairs, key=lambda p: ranks.get(p, math.inf))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(word):
            if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                merged.append(word[i] + word[i + 1])
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = merged
    return word


def learn_word_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """BPE merges under which CLIP's tokenizer turns each of `words` into one token (``word</w>``).

    Each new merge has the lowest priority so far, so it never changes how a word that is already whole splits;
    the words' splits are recomputed with the real BPE rule (`_bpe`) after each merge, so the result holds by
    construction. Merges are picked by how many words still need them (ties broken alphabetically): deterministic.
    """
    ranks: dict[tuple[str, str], int] = {}
    merges: list[tuple[str, str]] = []
    splits = {w: [*w[:-1], w[-1] + "</w>"] for w in words if w}
    while True:
        open_words = [s for s in splits.values() if len(s) > 1]
        if not open_words:
            return merges
        counts: dict[tuple[str, str], int] = {}
        for s in open_words:
            for pair in {(s[i], s[i + 1]) for i in range(len(s) - 1)}:
                counts[pair] = counts.get(pair, 0) + 1
        pair = min(counts, key=lambda p: (-counts[p], p))
        ranks[pair] = len(merges)
        merges.append(pair)
        splits = {w: _bpe(s, ranks) for w, s in splits.items()}


def build_toy_tokenizer(folder: str | os.PathLike, words: Sequence[str], max_tokens: int = 32):
    """Write a CLIP tokenizer for `words` into `folder` (vocab.json, merges.txt, tokenizer files) and load it.

    Vocabulary: single characters (``a``, ``a</w>``, ... for `_CHARACTERS`), the merge results (every caption word
    as ``word</w>`` among them), then ``<|startoftext|>`` and ``<|endoftext|>`` last (as in CLIP; the end token is
    also the padding and unknown token).

    Returns:
        `transformers.CLIPTokenizer` with ``model_max_length = max_tokens``.
    """
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = learn_word_merges(words)
    vocab: dict[str, int] = {}
    for ch in _CHARACTERS:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab[_BOS] = len(vocab)
    vocab[_EOS] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=0, ensure_ascii=False) + "\n", encoding="utf-8")
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"),
        str(folder / "merges.txt"),
        model_max_length=max_tokens,
        bos_token=_BOS,
        eos_token=_EOS,
        pad_token=_EOS,
        unk_token=_EOS,
    )
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def _tokenize(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    return tokenizer(
        list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


# --------------------------------------------------------------------------------------------------------------------
# 3. text encoder + UNet
# --------------------------------------------------------------------------------------------------------------------


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


def domain_prompts(num: int, seed: int, size: int, start: int = _HELDOUT_START) -> dict[str, list[str]]:
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
    from ..core.sampling import decode_to_images, encode_prompts, sample_latents

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


# --------------------------------------------------------------------------------------------------------------------
# 4./5. segmenters
# --------------------------------------------------------------------------------------------------------------------


def _segformer_config(hidden: Sequence[int], decoder: int, strides: Sequence[int] = (4, 2, 2, 2)):
    from transformers import SegformerConfig

    names = dict(enumerate(TOY_CLASSES))
    return SegformerConfig(
        hidden_sizes=list(hidden),
        strides=list(strides),
        patch_sizes=[7 if s >= 4 else 3 for s in strides],
        depths=[1, 1, 1, 1],
        num_attention_heads=[1, 1, 2, 2] if hidden[0] <= 8 else [1, 2, 4, 8],
        sr_ratios=[2, 2, 1, 1] if hidden[0] <= 8 else [4, 2, 1, 1],
        decoder_hidden_size=decoder,
        num_labels=len(TOY_CLASSES),
        id2label=names,
        label2id={v: k for k, v in names.items()},
        semantic_loss_ignore_index=IGNORE_INDEX,
    )


def _normalize(images: torch.Tensor) -> torch.Tensor:
    """`(B, 3, H, W)` in [-1, 1] -> ImageNet normalisation (what `IMAGENET_NORM` and the saved processor say)."""
    mean = torch.tensor(IMAGENET_NORM[0]).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_NORM[1]).view(1, 3, 1, 1)
    return ((images + 1) * 0.5 - mean) / std


@torch.no_grad()
def segmenter_miou(segmenter, data: ToyData, batch: int = 32) -> float:
    """mIoU of a loaded segmenter (a `SegmenterDiscriminator`, argmax over the N class channels) on `data`."""
    metric = MeanIoU(len(TOY_CLASSES), IGNORE_INDEX)
    for lo in range(0, len(data), batch):
        index = torch.arange(lo, min(lo + batch, len(data)))
        target = data.labels[index].long()
        metric.update(segmenter(data.image_batch(index), size=target.shape[-2:]), target)
    return float(metric.compute().miou)


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


def train_segmenter(
    config: ToyBaseConfig,
    train: ToyData,
    *,
    hidden: Sequence[int],
    decoder: int,
    strides: Sequence[int] = (4, 2, 2, 2),
    seed: int,
    fixed_steps: int | None,
    max_steps: int,
    budget_s: float | None,
    name: str,
    autoencoded: ToyData | None = None,
) -> PartResult:
    """Train a SegFormer on toy images with cross-entropy (ignore id skipped) and horizontal flips.

    Args:
        autoencoded (`ToyData`, *optional*): the same kind of images passed through the autoencoder (`autoencode`);
            each batch is drawn from them instead of `train` with probability ``config.autoencoded_batch_share``,
            so that the segmenter also reads the softer images a decoder produces.

    Returns:
        `PartResult` with the transformers model (N outputs, ``id2label`` = toy class names) under
        ``models["model"]``; the figures are filled in by the caller, which measures through the saved folder.
    """
    from transformers import SegformerForSemanticSegmentation

    torch.manual_seed(seed)
    model = SegformerForSemanticSegmentation(_segformer_config(hidden, decoder, strides)).train()
    generator = _generator(seed, 5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.segmenter_lr, weight_decay=0.01)

    def step_fn(step: int) -> float:
        use_autoencoded = autoencoded is not None and bool(
            torch.rand((), generator=generator) < config.autoencoded_batch_share
        )
        source = autoencoded if use_autoencoded else train
        index = torch.randint(len(source), (config.segmenter_batch,), generator=generator)
        x, y = source.image_batch(index), source.labels[index].long()
        if bool(torch.rand((), generator=generator) < 0.5):
            x, y = x.flip(-1), y.flip(-1)
        logits = model(pixel_values=_normalize(x)).logits
        logits = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    report = _run_steps(
        name,
        step_fn,
        optimizer,
        budget_s=budget_s,
        fixed_steps=fixed_steps,
        max_steps=max_steps,
        warmup=50,
        log_every=config.log_every,
    )
    model.eval().requires_grad_(False)
    figures = {"parameters": sum(p.numel() for p in model.parameters())}
    return PartResult({"model": model}, figures, report)


def train_evaluation_segmenter(
    config: ToyBaseConfig,
    train: ToyData,
    autoencoded: ToyData | None,
    *,
    fixed_steps: int | None,
    budget_s: float | None,
) -> PartResult:
    """`train_segmenter` with the evaluation segmenter's recipe from ``config`` (size, strides, step cap, its seed
    stream): what `train_toy_base` ships, and what benchmarks/toy_segmenter_recipe.py varies."""
    return train_segmenter(
        config,
        train,
        hidden=config.segmenter_hidden,
        decoder=config.segmenter_decoder,
        strides=config.segmenter_strides,
        seed=config.seed * 7 + 5,
        fixed_steps=fixed_steps,
        max_steps=config.segmenter_max_steps,
        budget_s=budget_s,
        name="segmenter",
        autoencoded=autoencoded,
    )


def save_segmenter(model, folder: Path, size: int) -> None:
    """Write a toy segmenter as a transformers folder (model + SegFormer image processor for ``size``² images)."""
    from transformers import SegformerImageProcessor

    model.save_pretrained(str(folder))
    processor = SegformerImageProcessor(
        size={"height": size, "width": size},
        image_mean=list(IMAGENET_NORM[0]),
        image_std=list(IMAGENET_NORM[1]),
        do_reduce_labels=False,
    )
    processor.save_pretrained(str(folder))


def load_segmenter(folder: Path):
    """Load a toy segmenter folder written by `save_segmenter`, in eval mode without gradients."""
    from ..core.discriminator import build_discriminator

    segmenter = build_discriminator(toy_label_set(), pretrained=folder, generator=torch.Generator().manual_seed(0))
    return segmenter.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------------------------
# the whole run
# --------------------------------------------------------------------------------------------------------------------


def _write_model_index(out_dir: Path) -> None:
    import diffusers

    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def _save_grid(path: Path, rows: np.ndarray, pad: int = 2) -> None:
    from PIL import Image

    n_rows, n_cols, h, w, _ = rows.shape
    grid = np.full((n_rows * (h + pad) + pad, n_cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for r in range(n_rows):
        for c in range(n_cols):
            grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = rows[
                r, c
            ]
    Image.fromarray(grid).save(path, format="PNG", optimize=True)


def _machine() -> dict[str, Any]:
    import diffusers
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min_at_end": None if load is None else round(load, 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


def _fmt(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def acceptance_markdown(acceptance: dict[str, Any], title: bool = False) -> str:
    """The acceptance figures of a run (the content of ``acceptance.json``) as Markdown, for README.md and docs."""
    fig, steps, times = acceptance["figures"], acceptance["steps"], acceptance["timings_seconds"]
    ae, seg, disc, t2i = (fig[k] for k in ("autoencoder", "segmenter", "discriminator_init", "text_to_image"))
    machine, loads = acceptance["machine"], acceptance.get("load_average_1min_after", {})

    def run(part: str) -> str:
        s = steps[part]
        load = f", load {loads[part]}" if part in loads else ""
        return f"{s['steps']} steps, {times.get(part, s['seconds']):.0f} s{load}{' (cut)' if s['cut'] else ''}"

    lines = []
    if title:
        lines += [
            "# Toy base models",
            "",
            "The toy world's stand-ins for SD 1.5's frozen parts (load with "
            "`layout2image.trainer.models.load_base_models`), its evaluation segmenter and the discriminator "
            "initialisation. Written by `layout2image.trainer.toy_base.train_toy_base`; see docs/TOY_WORLD.md. "
            "All figures below are also in `acceptance.json`; `samples.png` shows samples per domain word (rows: "
            + ", ".join(DOMAINS)
            + ").",
            "",
        ]
    lines += [
        "| part | acceptance figure | training |",
        "|---|---|---|",
        f"| autoencoder | held-out reconstruction PSNR **{ae['heldout_psnr_db']:.2f} dB** (posterior mode, "
        f"{acceptance['config']['num_heldout']} images); scaling_factor {ae['scaling_factor']} | {run('autoencoder')} |",
        f"| evaluation segmenter | held-out mIoU **{seg['heldout_miou']:.3f}** on real images, "
        f"{seg['heldout_miou_autoencoded']:.3f} on their autoencoded versions | {run('segmenter')} |",
        f"| discriminator init | mIoU {disc['own_heldout_miou']:.3f} on its own held-out split (never used for "
        f"layout mIoU) | {run('discriminator_init')} |",
        f"| text encoder + UNet | night − day sample brightness **{t2i['night_minus_day_brightness']:+.3f}**; "
        f"snow − day white fraction {t2i['snow_minus_day_white_fraction']:+.3f}; fog − day contrast "
        f"{t2i['fog_minus_day_contrast']:+.3f} | {run('text_to_image')} |",
        "",
        f"Samples: {t2i['per_word']} per domain word, the same scenes, wording and noise for every word, DDIM "
        f"{t2i['steps']} steps, guidance {t2i['guidance_scale']}. Image statistics (`core.toy.image_stats`):",
        "",
        "| domain word | brightness (samples / real) | saturation | contrast | white fraction |",
        "|---|---|---|---|---|",
    ]
    for d in DOMAINS:
        a, r = t2i[d], t2i.get(f"real_{d}", {})
        cells = [
            f"{_fmt(a[k])} / {_fmt(r.get(k, '-'))}" for k in ("brightness", "saturation", "contrast", "white_fraction")
        ]
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    if "class_share_distance_to_real" in t2i:
        lines += [
            "",
            f"The evaluation segmenter on the samples: class shares at total-variation distance "
            f"{t2i['class_share_distance_to_real']:.3f} from those of real images, mean confidence "
            f"{t2i['segmenter_confidence_on_samples']:.3f}.",
        ]
    lines += [
        "",
        f"Run: seed {acceptance['seed']}, {acceptance['wall_seconds'] / 60:.1f} min wall time for a "
        f"{acceptance['budget_minutes']:g}-minute budget, on {machine['cpu']} ({machine['cpu_count']} cores, "
        f"{machine['torch_threads']} torch threads), torch {machine['torch']}, diffusers {machine['diffusers']}, "
        f"transformers {machine['transformers']}."
        + (
            " 1-minute load average after each part: " + ", ".join(f"{k} {v}" for k, v in loads.items()) + "."
            if loads
            else ""
        ),
    ]
    if acceptance.get("command"):
        lines += ["", "Command:", "", "```bash", acceptance["command"], "```"]
    return "\n".join(lines) + "\n"


def train_toy_base(
    out_dir: str | os.PathLike,
    config: ToyBaseConfig | None = None,
    *,
    minutes: float | None = None,
    seed: int | None = None,
    threads: int | None = 2,
    samples_png: bool = True,
    command: str | None = None,
) -> ToyBaseReport:
    """Train and save every toy base part into `out_dir` (layout in the module docstring).

    Args:
        out_dir (`str` or `os.PathLike`): the folder to write (created; existing files of the same names are
            replaced).
        config (`ToyBaseConfig`, *optional*): sizes and budgets; defaults to the shipped recipe.
        minutes (`float`, *optional*): overrides ``config.minutes``.
        seed (`int`, *optional*): overrides ``config.seed``.
        threads (`int`, *optional*, defaults to 2): torch CPU threads during the run (restored afterwards); None
            keeps the current setting.
        samples_png (`bool`, defaults to True): also write ``samples.png``.
        command (`str`, *optional*): the command line that ran this, recorded in acceptance.json and README.md.

    Returns:
        `ToyBaseReport`; the same figures are in ``out_dir/acceptance.json`` and ``out_dir/README.md``.
    """
    config = config or ToyBaseConfig()
    overrides = {k: v for k, v in (("minutes", minutes), ("seed", seed)) if v is not None}
    if overrides:
        config = ToyBaseConfig(**{**asdict(config), **overrides})
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        return _train_toy_base(Path(out_dir), config, samples_png, command)
    finally:
        torch.set_num_threads(previous)


def _train_toy_base(out_dir: Path, config: ToyBaseConfig, samples_png: bool, command: str | None) -> ToyBaseReport:
    from diffusers import PNDMScheduler

    from .models import load_base_models

    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    total_s = config.minutes * 60.0
    timings: dict[str, float] = {}

    loads: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 1)
        if hasattr(os, "getloadavg"):  # how busy the machine was: other processes slow every part down
            loads[name] = round(os.getloadavg()[0], 2)
        return now

    t = time.perf_counter()
    train = make_toy_data(config.num_train, config.seed, config.size)
    heldout = make_toy_data(config.num_heldout, config.seed, config.size, start=_HELDOUT_START)
    disc_train = make_toy_data(config.num_disc_train, config.seed, config.size, start=_DISC_TRAIN_START)
    disc_heldout = make_toy_data(config.num_heldout, config.seed, config.size, start=_DISC_HELDOUT_START)
    t = lap("data", t)
    logger.info("generated %d + %d + %d + %d toy samples in %.0f s", len(train), len(heldout), len(disc_train),
                len(disc_heldout), timings["data"])  # fmt: skip
    figures: dict[str, Any] = {}
    steps: dict[str, Any] = {}

    # 1. autoencoder
    result = train_autoencoder(config, train, heldout, config.vae_share * total_s)
    vae = result.models["vae"]
    vae.save_pretrained(str(out_dir / "vae"), safe_serialization=True)
    figures["autoencoder"], steps["autoencoder"] = result.figures, asdict(result.report)
    t = lap("autoencoder", t)

    # 4. evaluation segmenter (before the UNet so that the samples can be scored with it), on real images and, for
    # a share of the batches, on their autoencoded versions (what decoded samples look like)
    result = train_evaluation_segmenter(
        config,
        train,
        autoencode(vae, train, config.num_autoencoded) if config.num_autoencoded else None,
        fixed_steps=config.segmenter_steps,
        budget_s=config.segmenter_share * total_s,
    )
    save_segmenter(result.models["model"], out_dir / "segmenter", config.size)
    segmenter = load_segmenter(out_dir / "segmenter")
    result.figures["heldout_miou"] = round(segmenter_miou(segmenter, heldout), 4)
    result.figures["heldout_miou_autoencoded"] = round(segmenter_miou(segmenter, autoencode(vae, heldout)), 4)
    logger.info(
        "evaluation segmenter: held-out mIoU %.4f (on autoencoded images %.4f)",
        result.figures["heldout_miou"],
        result.figures["heldout_miou_autoencoded"],
    )
    figures["segmenter"], steps["segmenter"] = result.figures, asdict(result.report)
    t = lap("segmenter", t)

    # 5. discriminator initialisation: another data split, another seed, the tiny config
    from ..core.discriminator import tiny_segmenter_config

    tiny = tiny_segmenter_config("segformer")
    result = train_segmenter(
        config,
        disc_train,
        hidden=tiny.hidden_sizes,
        decoder=tiny.decoder_hidden_size,
        seed=config.seed * 7 + 6,
        fixed_steps=config.discriminator_steps,
        max_steps=config.discriminator_max_steps,
        budget_s=config.discriminator_share * total_s,
        name="discriminator-init",
        autoencoded=autoencode(vae, disc_train, config.num_autoencoded) if config.num_autoencoded else None,
    )
    save_segmenter(result.models["model"], out_dir / "discriminator_init", config.size)
    result.figures["own_heldout_miou"] = round(
        segmenter_miou(load_segmenter(out_dir / "discriminator_init"), disc_heldout), 4
    )
    result.figures["data"] = (
        f"samples {_DISC_TRAIN_START}..{_DISC_TRAIN_START + config.num_disc_train - 1} of seed {config.seed} "
        f"(the evaluation segmenter: 0..{config.num_train - 1})"
    )
    figures["discriminator_init"], steps["discriminator_init"] = result.figures, asdict(result.report)
    t = lap("discriminator_init", t)

    # 2./3. tokenizer, text encoder, UNet: whatever time is left, less the reserve for saving and evaluation
    tokenizer = build_toy_tokenizer(out_dir / "tokenizer", caption_vocabulary(train.captions), config.max_tokens)
    lengths = [len(ids) for ids in tokenizer(train.captions).input_ids]
    budget = total_s * (1 - config.eval_reserve) - (time.perf_counter() - start)
    result = train_text_to_image(config, vae, tokenizer, train, max(budget, 10.0))
    result.models["unet"].save_pretrained(str(out_dir / "unet"), safe_serialization=True)
    result.models["text_encoder"].save_pretrained(str(out_dir / "text_encoder"), safe_serialization=True)
    PNDMScheduler.from_pretrained(str(SD15_CONFIG_DIR), subfolder="scheduler").save_pretrained(
        str(out_dir / "scheduler")
    )
    _write_model_index(out_dir)
    result.figures["longest_caption_tokens"] = max(lengths)
    figures["text_to_image"], steps["text_to_image"] = result.figures, asdict(result.report)
    t = lap("text_to_image", t)

    # evaluation through the saved folder, as the rest of the system loads it
    bundle = load_base_models(out_dir)
    sample_figures, rows = evaluate_text_to_image(bundle, config, segmenter, heldout)
    figures["text_to_image"].update(sample_figures)
    if samples_png:
        _save_grid(out_dir / "samples.png", rows[:, : min(8, rows.shape[1])])
    t = lap("evaluation", t)

    seconds = round(time.perf_counter() - start, 1)
    acceptance = {
        "format": 1,
        "seed": config.seed,
        "wall_seconds": seconds,
        "budget_minutes": config.minutes,
        "timings_seconds": timings,
        "load_average_1min_after": loads,
        "steps": steps,
        "figures": figures,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()},
        "machine": _machine(),
        "command": command,
    }
    (out_dir / "acceptance.json").write_text(json.dumps(acceptance, indent=2) + "\n")
    (out_dir / "README.md").write_text(acceptance_markdown(acceptance, title=True))
    logger.info("toy base models written to %s in %.0f s", out_dir, seconds)
    return ToyBaseReport(out_dir=out_dir, figures=figures, seconds=seconds)
