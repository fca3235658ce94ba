"""Parts 4 and 5: the SegFormer segmenters (evaluation segmenter, discriminator initialisation) and their mIoU."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ...core.metrics import MeanIoU
from ...core.toy import IGNORE_INDEX, TOY_CLASSES, toy_label_set
from .config import PartResult, ToyBaseConfig, ToyData
from .schedule import _generator, _run_steps

__all__ = [
    "IMAGENET_NORM",
    "load_segmenter",
    "save_segmenter",
    "segmenter_miou",
    "train_evaluation_segmenter",
    "train_segmenter",
]


#: ImageNet mean/std: what the saved segmenters are trained with (their preprocessor_config.json says so too).
IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


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
    from ...core.discriminator import build_discriminator

    segmenter = build_discriminator(toy_label_set(), pretrained=folder, generator=torch.Generator().manual_seed(0))
    return segmenter.eval().requires_grad_(False)
