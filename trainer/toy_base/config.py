"""The toy base's settings (`ToyBaseConfig`), result records and toy data in memory (`ToyData`, `make_toy_data`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...core.toy import make_sample

__all__ = ["PartResult", "StepReport", "ToyBaseConfig", "ToyBaseReport", "ToyData", "make_toy_data"]


# Index offsets of the data splits (sample i of a toy dataset depends on (seed, i) only, so disjoint index ranges
# are independent samples): training from 0, held-out evaluation from `core.toy.HELDOUT_START`, then the
# discriminator-init training and held-out splits.
_DISC_TRAIN_START = 2_000_000
_DISC_HELDOUT_START = 3_000_000


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
