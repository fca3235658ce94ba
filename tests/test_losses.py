"""Class-balanced weights and the ALDM adversarial losses against hand computations on 2x3x3 label maps."""

from __future__ import annotations

import math

import pytest
import torch

from layout2image.core.errors import LabelMapError
from layout2image.core.losses import (
    class_balance_weights,
    discriminator_loss,
    generator_adversarial_loss,
    num_valid_pixels,
    weighted_cross_entropy,
    weighted_cross_entropy_map,
)

IGNORE = 255
C = 4  # 3 layout classes + the fake class (id 3)

# Class counts: class 0 -> 5, class 1 -> 8, class 2 -> 3, class 3 (fake) -> 0; 2 ignore pixels; N_valid = 16, P = 3.
LABELS = torch.tensor(
    [
        [[0, 0, 1], [1, 1, IGNORE], [2, 0, 0]],
        [[1, 1, 1], [0, 2, 2], [IGNORE, 1, 1]],
    ],
    dtype=torch.long,
)
N_VALID = 16
# w_c = N_valid / (n_c · P · C), written out by hand.
W_BY_CLASS = {0: 16 / (5 * 3 * 4), 1: 16 / (8 * 3 * 4), 2: 16 / (3 * 3 * 4)}


def _logits(seed: int = 0, shape=(2, C, 3, 3)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).requires_grad_(True)


def _hand_ce(logits: torch.Tensor, b: int, i: int, j: int, cls: int) -> float:
    """-log softmax(logits[b, :, i, j])[cls] with plain math."""
    row = [float(v) for v in logits.detach()[b, :, i, j]]
    return math.log(sum(math.exp(v) for v in row)) - row[cls]


def _hand_weight_map() -> torch.Tensor:
    out = torch.zeros(LABELS.shape)
    for b in range(2):
        for i in range(3):
            for j in range(3):
                y = int(LABELS[b, i, j])
                out[b, i, j] = 0.0 if y == IGNORE else W_BY_CLASS[y]
    return out


def test_class_balance_weights_match_hand_values():
    weights = class_balance_weights(LABELS, num_outputs=C)
    assert weights.shape == LABELS.shape and weights.dtype == torch.float32
    torch.testing.assert_close(weights, _hand_weight_map())
    assert int(num_valid_pixels(LABELS)) == N_VALID


def test_class_balance_weights_do_not_modify_labels():
    labels = LABELS.clone()
    class_balance_weights(labels, num_outputs=C)
    assert torch.equal(labels, LABELS)


def test_weighted_ce_map_and_reduction_match_hand_values():
    logits = _logits()
    pixel = weighted_cross_entropy_map(logits, LABELS)
    expected = torch.zeros(LABELS.shape)
    for b in range(2):
        for i in range(3):
            for j in range(3):
                y = int(LABELS[b, i, j])
                if y != IGNORE:
                    expected[b, i, j] = W_BY_CLASS[y] * _hand_ce(logits, b, i, j, y)
    torch.testing.assert_close(pixel, expected, rtol=1e-5, atol=1e-6)
    assert pixel[0, 1, 2].item() == 0.0 and pixel[1, 2, 0].item() == 0.0
    reduced = weighted_cross_entropy(logits, LABELS)
    torch.testing.assert_close(reduced, expected.sum() / N_VALID, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(generator_adversarial_loss(logits, LABELS), reduced)


def test_weighted_ce_uses_precomputed_weights():
    logits = _logits(1)
    weights = class_balance_weights(LABELS, num_outputs=C)
    torch.testing.assert_close(
        weighted_cross_entropy_map(logits, LABELS, weights=3.0 * weights),
        3.0 * weighted_cross_entropy_map(logits, LABELS),
    )


def test_weighted_ce_gradient_is_zero_on_ignore_pixels():
    logits = _logits(2)
    weighted_cross_entropy(logits, LABELS).backward()
    assert torch.all(logits.grad[0, :, 1, 2] == 0) and torch.all(logits.grad[1, :, 2, 0] == 0)
    assert logits.grad.abs().sum() > 0


def test_discriminator_loss_matches_hand_values():
    real, fake = _logits(3), _logits(4)
    out = discriminator_loss(real, fake, LABELS, fake_weight=0.01)
    real_expected = (
        sum(
            W_BY_CLASS[int(LABELS[b, i, j])] * _hand_ce(real, b, i, j, int(LABELS[b, i, j]))
            for b in range(2)
            for i in range(3)
            for j in range(3)
            if int(LABELS[b, i, j]) != IGNORE
        )
        / N_VALID
    )
    # The fake term covers all 18 pixels (ignore included), target = fake class C - 1, unweighted.
    fake_expected = sum(_hand_ce(fake, b, i, j, C - 1) for b in range(2) for i in range(3) for j in range(3)) / 18
    assert out.real_loss.item() == pytest.approx(real_expected, rel=1e-5)
    assert out.fake_loss.item() == pytest.approx(fake_expected, rel=1e-5)
    assert out.loss.item() == pytest.approx(real_expected + 0.01 * fake_expected, rel=1e-5)


def test_no_valid_pixel_gives_zero_loss_and_finite_zero_gradient():
    labels = torch.full((2, 3, 3), IGNORE, dtype=torch.long)
    weights = class_balance_weights(labels, num_outputs=C)
    assert torch.equal(weights, torch.zeros(2, 3, 3))
    logits = _logits(5)
    loss = generator_adversarial_loss(logits, labels)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(logits.grad).all() and torch.all(logits.grad == 0)
    fake = _logits(6)
    d = discriminator_loss(_logits(7), fake, labels, fake_weight=0.5)
    assert d.real_loss.item() == 0.0 and torch.isfinite(d.loss)
    assert d.loss.item() == pytest.approx(0.5 * d.fake_loss.item())


@pytest.mark.parametrize("bad", [4, 7, -1])
def test_out_of_range_label_raises_with_value_and_range(bad):
    labels = LABELS.clone()
    labels[1, 0, 0] = bad
    with pytest.raises(LabelMapError, match=rf"\[{bad}\].*\[0, 3\]"):
        class_balance_weights(labels, num_outputs=C)
    with pytest.raises(ValueError, match=rf"\[{bad}\]"):
        weighted_cross_entropy(_logits(), labels)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"logits": torch.zeros(2, C, 4, 4)}, "label size"),
        ({"labels": LABELS.float()}, "integer"),
        ({"ignore_index": 2}, "collides"),
        ({"weights": torch.ones(2, 3)}, "weights"),
    ],
)
def test_weighted_ce_argument_errors(kwargs, match):
    args = {"logits": torch.zeros(2, C, 3, 3), "labels": LABELS, **kwargs}
    with pytest.raises(ValueError, match=match):
        weighted_cross_entropy(**args)


@pytest.mark.parametrize("fake_weight", [-0.1, float("nan")])
def test_discriminator_loss_rejects_bad_fake_weight(fake_weight):
    with pytest.raises(ValueError, match="fake_weight"):
        discriminator_loss(_logits(), _logits(1), LABELS, fake_weight=fake_weight)
