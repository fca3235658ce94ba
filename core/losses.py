"""Adversarial segmentation losses for ALDM: class-balanced weights, weighted cross-entropy, D and G losses.

The discriminator D is a semantic segmenter with ``C = N + 1`` outputs: the ``N`` layout classes plus one "fake"
class with id ``N`` (OASIS-style). All losses work on logits already upsampled to the label size.

Symbols (aldm.md §5-§6):

- ``y`` label map, ``(B, H, W)`` int64, ids in ``[0, C - 1)`` or the ignore index (255 by default).
- ``N_valid`` number of non-ignore pixels in the batch; ``n_c`` pixel count of class ``c``; ``P`` number of classes
  present in the batch; ``C`` number of D outputs.
- ``w_c = N_valid / (n_c · P · C)`` ("loss sampler V1"), 0 on ignore pixels.
- ``ℓ(p) = w_{y_p} · CE(D(x)_p, y_p)`` the per-pixel weighted CE map; ``L_wCE = (1 / N_valid) · Σ_p ℓ(p)``.
- ``L_D = L_wCE(D(real), y) + w_fake · mean_p CE(D(fake)_p, N)`` (every pixel, ignore included, unweighted).
- ``L_adv = L_wCE(D(x̂0), y)`` for the generator.

A batch without any valid pixel gives a loss of exactly 0 with an all-zero (defined, finite) gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import LabelMapError

__all__ = [
    "DEFAULT_IGNORE_INDEX",
    "DiscriminatorLoss",
    "class_balance_weights",
    "discriminator_loss",
    "generator_adversarial_loss",
    "num_valid_pixels",
    "weighted_cross_entropy",
    "weighted_cross_entropy_map",
]

DEFAULT_IGNORE_INDEX = 255


@dataclass
class DiscriminatorLoss:
    """Output of [`discriminator_loss`].

    Args:
        loss (`torch.Tensor`): ``()`` float32, ``real_loss + fake_weight · fake_loss``; the value to backpropagate.
        real_loss (`torch.Tensor`): ``()`` float32, ``L_wCE(D(real), y)``.
        fake_loss (`torch.Tensor`): ``()`` float32, unweighted mean CE of ``D(fake)`` against the fake class on every
            pixel (before multiplying by ``fake_weight``).
    """

    loss: torch.Tensor
    real_loss: torch.Tensor
    fake_loss: torch.Tensor


def _check_labels(labels: torch.Tensor, num_outputs: int, ignore_index: int, param: str = "labels") -> None:
    """Raise if ``labels`` is not a ``(B, H, W)`` integer map with ids in ``[0, num_outputs - 1]`` or ``ignore_index``."""
    if not isinstance(num_outputs, int) or isinstance(num_outputs, bool) or num_outputs < 2:
        raise ValueError(f"`num_outputs` must be an int >= 2 (N layout classes + 1 fake class), got {num_outputs!r}.")
    if 0 <= ignore_index < num_outputs:
        raise ValueError(
            f"`ignore_index`={ignore_index} collides with a class id in [0, {num_outputs - 1}]; use an index outside "
            f"that range (255 by default)."
        )
    if labels.ndim != 3:
        raise ValueError(f"`{param}` must be a (B, H, W) label map, got shape {tuple(labels.shape)}.")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"`{param}` must be an integer tensor (int64), got dtype {labels.dtype}.")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_outputs))
    if bool(bad.any()):
        bad_values = torch.unique(labels[bad]).tolist()
        raise LabelMapError(
            f"`{param}` holds id(s) {bad_values[:10]} outside the allowed range [0, {num_outputs - 1}] "
            f"(C={num_outputs} discriminator outputs) and different from the ignore index {ignore_index}. "
            f"Remap them to a class id or to the ignore index."
        )


def _check_logits(logits: torch.Tensor, labels: torch.Tensor, param: str = "logits") -> None:
    """Raise if ``logits`` is not ``(B, C, H, W)`` matching the label map's ``(B, H, W)``."""
    if logits.ndim != 4 or logits.shape[0] != labels.shape[0] or logits.shape[2:] != labels.shape[1:]:
        raise ValueError(
            f"`{param}` must be (B, C, H, W) logits at the label size; got {tuple(logits.shape)} for labels "
            f"{tuple(labels.shape)}. Upsample the discriminator output to the label size first."
        )


def num_valid_pixels(labels: torch.Tensor, ignore_index: int = DEFAULT_IGNORE_INDEX) -> torch.Tensor:
    """Count the non-ignore pixels ``N_valid`` of a label map.

    Args:
        labels (`torch.Tensor`): ``(B, H, W)`` int64 label map.
        ignore_index (`int`, *optional*, defaults to 255): id of pixels that carry no label.

    Returns:
        `torch.Tensor`: ``()`` int64 on the labels' device.
    """
    return (labels != ignore_index).sum()


def class_balance_weights(
    labels: torch.Tensor, num_outputs: int, ignore_index: int = DEFAULT_IGNORE_INDEX
) -> torch.Tensor:
    """Per-pixel class-balance weights ``w_{y_p}`` with ``w_c = N_valid / (n_c · P · C)`` (ALDM "loss sampler V1").

    Computed once per batch from the real label map and reused for every loss on that batch (D real term, and every
    unrolled step of the generator loss).

    Args:
        labels (`torch.Tensor`): ``(B, H, W)`` int64 label map, ids in ``[0, num_outputs - 1]`` or ``ignore_index``.
        num_outputs (`int`): ``C``, the number of discriminator outputs (N layout classes + 1 fake class).
        ignore_index (`int`, *optional*, defaults to 255): id of unlabeled pixels; they get weight 0.

    Returns:
        `torch.Tensor`: ``(B, H, W)`` float32 weights, ``>= 0``, no grad; 0 on ignore pixels and everywhere when the
        batch has no valid pixel.

    Raises:
        `LabelMapError` (a `ValueError`): an id is neither in ``[0, num_outputs - 1]`` nor the ignore index.
    """
    _check_labels(labels, num_outputs, ignore_index)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    # 1. n_c: pixel count per class over the whole batch (ignore pixels excluded).
    counts = torch.bincount(labels[valid].long(), minlength=num_outputs).to(torch.float32)
    # 2. N_valid and P (classes present); P is clamped so that an all-ignore batch gives 0 / 1, not 0 / 0.
    n_valid = counts.sum()
    present = (counts > 0).sum().clamp(min=1).to(torch.float32)
    # 3. w_c = N_valid / (n_c · P · C) for present classes, 0 for absent ones.
    class_weights = torch.where(
        counts > 0, n_valid / (counts.clamp(min=1.0) * present * num_outputs), torch.zeros_like(counts)
    )
    # 4. Look up w_{y_p}; ignore pixels get 0.
    return torch.where(valid, class_weights[safe.long()], torch.zeros((), dtype=torch.float32, device=labels.device))


def weighted_cross_entropy_map(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | None = None,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
) -> torch.Tensor:
    """Per-pixel class-balanced cross-entropy ``ℓ(p) = w_{y_p} · CE(logits_p, y_p)``.

    Args:
        logits (`torch.Tensor`): ``(B, C, H, W)`` raw discriminator logits (any float dtype; CE is computed in
            float32) at the label size.
        labels (`torch.Tensor`): ``(B, H, W)`` int64 label map, ids in ``[0, C - 1]`` or ``ignore_index``.
        weights (`torch.Tensor`, *optional*): ``(B, H, W)`` float per-pixel weights from [`class_balance_weights`]
            (pass them to reuse one batch's weights across unrolled steps). Computed from ``labels`` when omitted.
        ignore_index (`int`, *optional*, defaults to 255): id of unlabeled pixels.

    Returns:
        `torch.Tensor`: ``(B, H, W)`` float32 map, ``>= 0``, exactly 0 on ignore pixels; differentiable in ``logits``.
    """
    _check_logits(logits, labels)
    num_outputs = logits.shape[1]
    if weights is None:
        weights = class_balance_weights(labels, num_outputs, ignore_index)
    else:
        _check_labels(labels, num_outputs, ignore_index)
        if weights.shape != labels.shape:
            raise ValueError(
                f"`weights` must have the label map's shape {tuple(labels.shape)}, got {tuple(weights.shape)}."
            )
    # F.cross_entropy already returns 0 on ignore pixels; the weight map is 0 there too.
    ce = F.cross_entropy(logits.float(), labels.long(), reduction="none", ignore_index=ignore_index)
    return ce * weights.to(device=ce.device, dtype=torch.float32)


def weighted_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | None = None,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
) -> torch.Tensor:
    """Reduced class-balanced cross-entropy ``L_wCE = (1 / N_valid) · Σ_p ℓ(p)``.

    Args:
        logits (`torch.Tensor`): ``(B, C, H, W)`` raw discriminator logits at the label size.
        labels (`torch.Tensor`): ``(B, H, W)`` int64 label map, ids in ``[0, C - 1]`` or ``ignore_index``.
        weights (`torch.Tensor`, *optional*): ``(B, H, W)`` float weights from [`class_balance_weights`].
        ignore_index (`int`, *optional*, defaults to 255): id of unlabeled pixels.

    Returns:
        `torch.Tensor`: ``()`` float32. 0 (with a zero gradient) when no pixel is valid.
    """
    pixel_loss = weighted_cross_entropy_map(logits, labels, weights, ignore_index)
    n_valid = num_valid_pixels(labels, ignore_index).clamp(min=1).to(pixel_loss.dtype)
    return pixel_loss.sum() / n_valid


def discriminator_loss(
    real_logits: torch.Tensor,
    fake_logits: torch.Tensor,
    labels: torch.Tensor,
    fake_weight: float,
    weights: torch.Tensor | None = None,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
) -> DiscriminatorLoss:
    """Discriminator loss ``L_D = L_wCE(D(real), y) + w_fake · mean_p CE(D(fake)_p, N)``.

    The fake class is the last output, ``N = C - 1``. The fake term covers every pixel (ignore pixels included) and
    is neither class-weighted nor masked.

    Args:
        real_logits (`torch.Tensor`): ``(B, C, H, W)`` logits of D on real images (ALDM: the VAE reconstruction).
        fake_logits (`torch.Tensor`): ``(B', C, H', W')`` logits of D on generated images (decoded x̂0).
        labels (`torch.Tensor`): ``(B, H, W)`` int64 label map of the real images.
        fake_weight (`float`): ``w_fake >= 0`` (ALDM: 0.01 Cityscapes, 0.001 ADE20K).
        weights (`torch.Tensor`, *optional*): ``(B, H, W)`` float weights from [`class_balance_weights`].
        ignore_index (`int`, *optional*, defaults to 255): id of unlabeled pixels.

    Returns:
        [`DiscriminatorLoss`]: the total, real and (unweighted) fake terms, each ``()`` float32.
    """
    if not (isinstance(fake_weight, (int, float)) and math.isfinite(fake_weight) and fake_weight >= 0):
        raise ValueError(f"`fake_weight` must be a finite number >= 0 (ALDM uses 0.01 or 0.001), got {fake_weight!r}.")
    if fake_logits.ndim != 4 or fake_logits.shape[1] != real_logits.shape[1]:
        raise ValueError(
            f"`fake_logits` must be (B, C, H, W) with the same C as `real_logits` ({real_logits.shape[1]}), got "
            f"{tuple(fake_logits.shape)}."
        )
    real_loss = weighted_cross_entropy(real_logits, labels, weights, ignore_index)
    fake_class = fake_logits.shape[1] - 1
    fake_target = torch.full(
        (fake_logits.shape[0], *fake_logits.shape[2:]), fake_class, dtype=torch.long, device=fake_logits.device
    )
    fake_loss = F.cross_entropy(fake_logits.float(), fake_target)
    return DiscriminatorLoss(loss=real_loss + fake_weight * fake_loss, real_loss=real_loss, fake_loss=fake_loss)


def generator_adversarial_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | None = None,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
) -> torch.Tensor:
    """Generator adversarial loss ``L_adv = L_wCE(D(x̂0), y)``: D should give the generated pixels their true classes.

    Args:
        logits (`torch.Tensor`): ``(B, C, H, W)`` logits of D on the decoded prediction x̂0.
        labels (`torch.Tensor`): ``(B, H, W)`` int64 target layout.
        weights (`torch.Tensor`, *optional*): ``(B, H, W)`` float weights from [`class_balance_weights`].
        ignore_index (`int`, *optional*, defaults to 255): id of unlabeled pixels.

    Returns:
        `torch.Tensor`: ``()`` float32.
    """
    return weighted_cross_entropy(logits, labels, weights, ignore_index)
