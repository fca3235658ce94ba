"""Layout faithfulness metrics: confusion matrix, mean IoU, per-class IoU, pixel accuracy, error maps.

Layout mIoU is how the project shows learning: a segmenter (never the discriminator or its initialisation)
segments generated images and its prediction is compared with the input label map. Classes that appear neither in
the target nor in the prediction have no IoU (NaN) and are left out of the mean, as in the usual definition.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["MeanIoU", "SegmentationScores", "confusion_matrix", "error_map", "segmentation_scores"]


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """Count (target class, predicted class) pairs over non-ignore pixels.

    Args:
        pred (`torch.Tensor`): `(B, H, W)` or `(H, W)` int64 predicted class ids in ``[0, num_classes)``.
        target (`torch.Tensor`): same shape, int64 class ids or ``ignore_index``.
        num_classes (`int`): N.
        ignore_index (`int`, defaults to 255): target pixels with this id are skipped.

    Returns:
        `torch.Tensor`: `(N, N)` int64, rows = target class, columns = predicted class.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long()
    valid = target != ignore_index
    bad_target = valid & ((target < 0) | (target >= num_classes))
    if bool(bad_target.any()):
        raise ValueError(
            f"target id {int(target[bad_target][0])} is out of range: ids must be 0..{num_classes - 1} or {ignore_index}"
        )
    bad_pred = valid & ((pred < 0) | (pred >= num_classes))
    if bool(bad_pred.any()):
        raise ValueError(f"predicted id {int(pred[bad_pred][0])} is out of range 0..{num_classes - 1}")
    index = target[valid] * num_classes + pred[valid]
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes).cpu()


@dataclass(frozen=True)
class SegmentationScores:
    """Scores from a confusion matrix.

    Args:
        miou (`float`): mean IoU over classes present in the target or the prediction (NaN if none).
        per_class_iou (`torch.Tensor`): `(N,)` float64 IoU per class, NaN for classes absent from both.
        pixel_accuracy (`float`): correct / valid pixels.
        confusion (`torch.Tensor`): `(N, N)` int64, rows target, columns prediction.
    """

    miou: float
    per_class_iou: torch.Tensor
    pixel_accuracy: float
    confusion: torch.Tensor


def segmentation_scores(confusion: torch.Tensor) -> SegmentationScores:
    """mIoU, per-class IoU and pixel accuracy of an `(N, N)` confusion matrix."""
    conf = confusion.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    present = ~torch.isnan(iou)
    miou = float(iou[present].mean()) if bool(present.any()) else float("nan")
    total = conf.sum()
    acc = float(tp.sum() / total) if total > 0 else float("nan")
    return SegmentationScores(miou=miou, per_class_iou=iou, pixel_accuracy=acc, confusion=confusion)


class MeanIoU:
    """Accumulates a confusion matrix over batches; ``compute()`` gives `SegmentationScores`.

    Args:
        num_classes (`int`): N.
        ignore_index (`int`, defaults to 255): target id to skip.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add `(B, H, W)` predictions and targets; predictions may be logits `(B, C, H, W)` (argmax over C < N+1)."""
        if pred.ndim == target.ndim + 1:
            pred = pred[:, : self.num_classes].argmax(1)
        self.confusion += confusion_matrix(pred, target, self.num_classes, self.ignore_index)

    def compute(self) -> SegmentationScores:
        return segmentation_scores(self.confusion)

    def reset(self) -> None:
        self.confusion.zero_()


def error_map(pred: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """`(..., H, W)` float32: 1 where the prediction is wrong, 0 where right, 0.5 on ignore pixels."""
    wrong = (pred != target).float()
    return torch.where(target == ignore_index, torch.full_like(wrong, 0.5), wrong)
