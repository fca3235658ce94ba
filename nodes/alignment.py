"""Layout alignment: segment generated images and score them against the label map they were made from.

The segmenter is any transformers semantic-segmentation model in a local folder (SegFormer, UperNet, or a
discriminator saved by the trainer) or ``builtin:toy``; loading it and matching its classes to the label set by
name live in ``core.segmenters`` (shared with ``l2i-eval``). Scoring is ``core.metrics``.
Per the project's rule, measure with a segmenter that is neither the discriminator nor its initialisation.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from comfy_api.latest import io

from ..core.labels import LabelSet
from ..core.metrics import MeanIoU, error_map
from ..core.segmenters import Segmenter, SegmenterError, class_rows, load_segmenter, segment
from .model_files import clean_path_input
from .types import LabelMap, LabelMapType, LabelSetType

__all__ = ["NODES", "L2ILayoutAlignment", "L2ISegmentImage", "SegmenterError", "segment_to_label_set"]

CATEGORY = "layout2image/evaluation"
INPUT_NORM_OPTIONS = ("auto", "imagenet", "half")


def _segmenter(path: str, input_norm: str = "auto") -> Segmenter:
    return load_segmenter(clean_path_input(path), input_norm, what="segmenter_path")


def _device():
    try:
        import comfy.model_management as mm  # ComfyUI's device choice
    except ImportError:
        return torch.device("cpu")
    return mm.get_torch_device()


def segment_to_label_set(
    model, images: torch.Tensor, label_set: LabelSet, size: tuple[int, int], input_norm, where: str = "the segmenter"
) -> torch.Tensor:
    """Predicted class ids of the label set for IMAGE batch `images` `(B, H, W, 3)`: `(B, *size)` int64 (CPU).

    Logits are upsampled bilinearly to ``size`` and the argmax runs over the label set's rows only
    (`core.segmenters.segment`, on ComfyUI's device, one image at a time).
    """
    class_rows(model, label_set, where)  # a mismatch is reported before the model is moved
    model.to(_device())
    try:
        return segment(model, images[..., :3].permute(0, 3, 1, 2), label_set, size, input_norm, where=where)
    finally:
        model.to("cpu")


def _iou_table(scores, label_set: LabelSet, target: torch.Tensor) -> str:
    present_target = set(torch.unique(target).tolist())
    lines = [
        f"mIoU {scores.miou:.4f}, pixel accuracy {scores.pixel_accuracy:.4f} "
        f"(classes in the map or the prediction; label set {label_set.name!r})",
        f"{'id':>4}  {'IoU':>6}  class",
    ]
    for c, iou in enumerate(scores.per_class_iou.tolist()):
        if math.isnan(iou):
            continue
        mark = "" if c in present_target else "  (not in the map)"
        lines.append(f"{c:>4}  {iou:6.3f}  {label_set.names[c]}{mark}")
    return "\n".join(lines)


def _error_image(errors: torch.Tensor) -> torch.Tensor:
    """`(B, H, W)` error map (1 wrong, 0 right, 0.5 ignore) -> IMAGE: red wrong, black right, grey ignore."""
    wrong = (errors == 1.0).float()
    ignore = (errors == 0.5).float() * 0.5
    return torch.stack([wrong + ignore, ignore, ignore], dim=-1)


def _input_norm_input():
    """The ``input_norm`` combo both segmenter nodes show (one wording for one setting)."""
    return io.Combo.Input(
        "input_norm",
        options=list(INPUT_NORM_OPTIONS),
        default="auto",
        tooltip=(
            "Pixel normalisation the segmenter expects: 'auto' reads the folder's "
            "preprocessor_config.json (ImageNet if absent); 'imagenet'; 'half' ((x - 0.5) / 0.5)."
        ),
    )


class L2ILayoutAlignment(io.ComfyNode):
    """Score how well generated images follow their label map: mIoU, per-class IoU, error heat-map."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="L2ILayoutAlignment",
            display_name="Layout Alignment (mIoU)",
            category=CATEGORY,
            description=(
                "Segment the IMAGE with a local transformers segmentation model (SegFormer/UperNet folder) and "
                "compare with the label map: mean IoU, IoU per class, and a map of wrong pixels. The segmenter's "
                "class names must cover the label set's."
            ),
            inputs=[
                io.Image.Input("image", tooltip="Generated image(s), (B, H, W, 3) in [0, 1]."),
                LabelMapType.Input(
                    "label_map",
                    tooltip="The layout the images were made from: batch 1 (shared) or one map per image.",
                ),
                io.String.Input(
                    "segmenter_path",
                    default="",
                    tooltip=(
                        "Local folder of a transformers semantic-segmentation model (config.json with id2label "
                        "naming the label set's classes); loaded offline."
                    ),
                ),
                _input_norm_input(),
            ],
            outputs=[
                io.Float.Output("miou", tooltip="Mean IoU over classes in the map or the prediction, 0-1."),
                io.String.Output("per_class_iou", tooltip="IoU of each class, as a text table."),
                io.Image.Output(
                    "error_map", tooltip="Red where the segmentation disagrees with the map, grey on ignore."
                ),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, segmenter_path: str = "", **kwargs):
        """Re-run when the segmenter folder's config or weights change on disk."""
        folder = Path(clean_path_input(segmenter_path)).expanduser()
        try:
            return (segmenter_path, *sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()))
        except OSError:
            return segmenter_path

    @classmethod
    def execute(
        cls, image: torch.Tensor, label_map: LabelMap, segmenter_path: str, input_norm: str = "auto"
    ) -> io.NodeOutput:
        if input_norm not in INPUT_NORM_OPTIONS:
            raise SegmenterError(f"`input_norm` {input_norm!r} is not known; use one of {list(INPUT_NORM_OPTIONS)}")
        if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] < 3:
            got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise SegmenterError(f"`image` must be a ComfyUI IMAGE (B, H, W, 3), got {got}")
        b, labels = image.shape[0], label_map.batch_size
        if b % labels != 0:
            raise SegmenterError(
                f"{b} image(s) for {labels} label maps: give one map, or one map per image (or per group of images)"
            )
        target = label_map.ids.repeat_interleave(b // labels, dim=0)
        seg = _segmenter(segmenter_path, input_norm)
        pred = segment_to_label_set(
            seg.model, image, label_map.label_set, label_map.size, seg.input_norm, where=str(seg.folder)
        )
        metric = MeanIoU(label_map.label_set.num_classes, label_map.ignore_index)
        metric.update(pred, target)
        scores = metric.compute()
        miou = 0.0 if math.isnan(scores.miou) else float(scores.miou)
        table = _iou_table(scores, label_map.label_set, target)
        heat = _error_image(error_map(pred, target, label_map.ignore_index))
        return io.NodeOutput(miou, table, heat)


class L2ISegmentImage(io.ComfyNode):
    """Turn a photo into a label map with a segmenter: how most users start, from a photo rather than a painting."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="L2ISegmentImage",
            display_name="Label Map from Image (segmenter)",
            category="layout2image/label maps",
            description=(
                "Segment each IMAGE with a local transformers segmentation model (SegFormer/UperNet folder, or "
                "builtin:toy) into a label map of the label set, at the image's size. The segmenter's class names "
                "must cover the label set's; only those classes are predicted."
            ),
            inputs=[
                io.Image.Input("image", tooltip="Photo(s), (B, H, W, 3) in [0, 1]; one label map per image."),
                LabelSetType.Input(
                    "label_set", tooltip="The classes of the label map (matched to the segmenter by name)."
                ),
                io.String.Input(
                    "segmenter_path",
                    default="builtin:toy",
                    tooltip=(
                        "Local folder of a transformers semantic-segmentation model (config.json with id2label "
                        "naming the label set's classes), or builtin:toy; loaded offline."
                    ),
                ),
                _input_norm_input(),
            ],
            outputs=[LabelMapType.Output("label_map", tooltip="The predicted label map, one per image.")],
        )

    @classmethod
    def fingerprint_inputs(cls, segmenter_path: str = "", **kwargs):
        return L2ILayoutAlignment.fingerprint_inputs(segmenter_path=segmenter_path)

    @classmethod
    def execute(
        cls, image: torch.Tensor, label_set: LabelSet, segmenter_path: str = "builtin:toy", input_norm: str = "auto"
    ) -> io.NodeOutput:
        if input_norm not in INPUT_NORM_OPTIONS:
            raise SegmenterError(f"`input_norm` {input_norm!r} is not known; use one of {list(INPUT_NORM_OPTIONS)}")
        if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] < 3:
            got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise SegmenterError(f"`image` must be a ComfyUI IMAGE (B, H, W, 3), got {got}")
        seg = _segmenter(segmenter_path, input_norm)
        size = (int(image.shape[1]), int(image.shape[2]))
        pred = segment_to_label_set(seg.model, image, label_set, size, seg.input_norm, where=str(seg.folder))
        return io.NodeOutput(LabelMap(pred, label_set))


NODES = [L2ILayoutAlignment, L2ISegmentImage]
