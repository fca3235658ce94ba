"""Confusion matrix, mIoU and error maps against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from layout2image.core.metrics import MeanIoU, confusion_matrix, error_map, segmentation_scores


def test_miou_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    conf = confusion_matrix(pred, target, num_classes=4)
    # rows target, cols pred: class 0: (0,0)=1,(0,1)=1; class 1: (1,1)=3; class 2: (2,2)=1,(2,0)=1
    expected = torch.zeros(4, 4, dtype=torch.long)
    expected[0, 0], expected[0, 1], expected[1, 1], expected[2, 2], expected[2, 0] = 1, 1, 3, 1, 1
    assert torch.equal(conf, expected)
    scores = segmentation_scores(conf)
    # IoU0 = 1/(2+2-1)=1/3; IoU1 = 3/(3+4-3)=3/4; IoU2 = 1/(2+1-1)=1/2; class 3 absent -> NaN
    assert scores.per_class_iou[:3].tolist() == pytest.approx([1 / 3, 3 / 4, 1 / 2])
    assert math.isnan(scores.per_class_iou[3])
    assert scores.miou == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert scores.pixel_accuracy == pytest.approx(5 / 7)


def test_accumulator_equals_one_shot_and_accepts_logits():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (4, 6, 6), generator=g)
    logits = torch.randn(4, 6, 6, 6, generator=g)  # 5 classes + a fake channel, which is never predicted
    logits[:, 5] = 100.0
    metric = MeanIoU(5)
    for b in range(4):
        metric.update(logits[b : b + 1], target[b : b + 1])
    pred = logits[:, :5].argmax(1)
    assert torch.equal(metric.compute().confusion, confusion_matrix(pred, target, 5))
    metric.reset()
    assert metric.confusion.sum() == 0


def test_perfect_and_errors():
    t = torch.tensor([[0, 1], [1, 255]])
    assert segmentation_scores(confusion_matrix(t.clamp(max=1), t, 2)).miou == 1.0
    assert error_map(torch.tensor([[0, 0], [1, 1]]), t).tolist() == [[0.0, 1.0], [0.0, 0.5]]
    with pytest.raises(ValueError, match="target id 7 is out of range"):
        confusion_matrix(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[7, 0]]), 2)
    with pytest.raises(ValueError, match="same shape"):
        confusion_matrix(torch.zeros(2), torch.zeros(3), 2)
    assert math.isnan(segmentation_scores(torch.zeros(2, 2, dtype=torch.long)).miou)
