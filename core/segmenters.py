"""Evaluation segmenters: load one, match its classes to a label set by name, segment images, pool its features.

A segmenter is any transformers semantic-segmentation model in a local folder (SegFormer, UperNet, or a
discriminator saved by the trainer), loaded with ``local_files_only=True``; ``builtin:toy`` names the toy world's
evaluation segmenter (``weights/toy/segmenter``). Its classes are matched to the label set by name (case, ``_``/``-``
and ``;``-separated aliases folded) and never by position, so a segmenter trained on another label set is an error
that names the classes it lacks; only the label set's classes compete in the argmax, so a segmenter with more
classes (ADE20K-150 for a subset) works. Per the project's rule, measure layout alignment with a segmenter that is
neither the discriminator nor its initialisation.

Used by the Layout Alignment node and ``l2i-eval`` (one implementation).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .discriminator import InputNorm, normalize_class_name, resolve_input_norm
from .discriminator.tables import source_aliases
from .labels import LabelSet

__all__ = [
    "BUILTIN_SEGMENTERS",
    "Segmenter",
    "SegmenterError",
    "SegmenterFeatures",
    "class_rows",
    "load_segmenter",
    "pooled_features",
    "resolve_segmenter_folder",
    "segment",
]

#: ``builtin:<name>`` -> the shipped segmenter folder (relative to the package root).
BUILTIN_SEGMENTERS = {"builtin:toy": Path("weights") / "toy" / "segmenter"}
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent


class SegmenterError(ValueError):
    """The segmenter folder cannot be loaded or its classes do not cover the label set."""


@dataclass(frozen=True)
class Segmenter:
    """A loaded evaluation segmenter.

    Args:
        model (`nn.Module`): the transformers segmentation model, fp32, eval mode, no gradients.
        folder (`Path`): where it was loaded from.
        input_norm (`InputNorm`): normalisation of [0, 1] images it expects.
        size (`tuple[int, int]` or `None`): ``(H, W)`` of its image processor, if the folder says.
    """

    model: nn.Module
    folder: Path
    input_norm: InputNorm
    size: tuple[int, int] | None = None

    @property
    def class_names(self) -> tuple[str, ...]:
        """Names of the output rows, in row order (``config.id2label``)."""
        id2label = getattr(self.model.config, "id2label", None) or {}
        return tuple(id2label[k] for k in sorted(id2label, key=int))


def resolve_segmenter_folder(path: str | Path, what: str = "segmenter") -> Path:
    """``builtin:toy`` or a local folder -> the folder, checked to hold a ``config.json``.

    Args:
        path (`str` or `Path`): the user's input.
        what (`str`): names the input in messages (``"segmenter_path"`` for the node, ``"--segmenter"`` for the CLI).
    """
    text = str(path or "").strip()
    if not text:
        raise SegmenterError(f"`{what}` is empty; give a local transformers segmentation model folder")
    if text.startswith("builtin:"):
        if text not in BUILTIN_SEGMENTERS:
            raise SegmenterError(f"`{what}` {text!r} is not known; built-in segmenters: {sorted(BUILTIN_SEGMENTERS)}")
        return _PACKAGE_ROOT / BUILTIN_SEGMENTERS[text]
    folder = Path(text).expanduser()
    if not (folder / "config.json").is_file():
        raise SegmenterError(
            f"`{what}` {str(folder)!r} has no config.json; give a local transformers segmentation model "
            "folder (save_pretrained output) or builtin:toy"
        )
    return folder


@functools.lru_cache(maxsize=2)
def _load_model(folder: str, stamp: float, what: str):
    from transformers import AutoModelForSemanticSegmentation

    try:
        model = AutoModelForSemanticSegmentation.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        # safetensors' and json's errors are ValueError/OSError subclasses; keep the message to one line
        detail = " ".join(str(e).split())
        raise SegmenterError(
            f"`{what}` {folder!r} is not a loadable transformers segmentation model folder "
            f"(config.json + weights, e.g. SegFormer or UperNet): {detail}"
        ) from None
    return model.float().eval().requires_grad_(False)


def _processor_size(folder: Path) -> tuple[int, int] | None:
    import json

    try:
        size = json.loads((folder / "preprocessor_config.json").read_text()).get("size")
    except (OSError, ValueError):
        return None
    if isinstance(size, dict) and "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    return None


def load_segmenter(path: str | Path, input_norm="auto", what: str = "segmenter") -> Segmenter:
    """Load a segmenter folder (or ``builtin:toy``); the model is cached by folder and config.json mtime.

    Args:
        path (`str` or `Path`): the folder, or ``builtin:toy``.
        input_norm (`str`, `InputNorm` or `(mean, std)`): see `resolve_input_norm`; ``"auto"`` reads a saved
            discriminator's setting, else the folder's ``preprocessor_config.json``, else ImageNet.
        what (`str`): names the input in messages.

    Raises:
        SegmenterError: no config.json, or a folder transformers cannot load.
    """
    folder = resolve_segmenter_folder(path, what)
    model = _load_model(str(folder.resolve()), (folder / "config.json").stat().st_mtime, what)
    saved = getattr(model.config, "l2i_discriminator", None)
    norm = resolve_input_norm(input_norm, folder=folder, saved=saved if isinstance(saved, dict) else None)
    return Segmenter(model=model, folder=folder, input_norm=norm, size=_processor_size(folder))


def class_rows(model_or_names, label_set: LabelSet, where: str = "the segmenter") -> list[int]:
    """For each class of the label set, the segmenter output row with the same (normalised) name.

    Args:
        model_or_names: a transformers model (its ``config.id2label``), a `Segmenter`, or row names in order.
        label_set (`LabelSet`): the classes to find.
        where (`str`): names the segmenter in the message.

    Returns:
        `list[int]`: ``N`` row indices, in label-set id order.

    Raises:
        SegmenterError: some class has no row of that name; the message names them and the segmenter's classes.
    """
    if isinstance(model_or_names, Segmenter):
        model_or_names = model_or_names.model
    if isinstance(model_or_names, nn.Module):
        id2label = getattr(model_or_names.config, "id2label", None) or {}
        names = [id2label[k] for k in sorted(id2label, key=int)]
    else:
        names = list(model_or_names)
    by_name: dict[str, int] = {}
    for row, name in enumerate(names):
        for alias in source_aliases(name):
            by_name.setdefault(alias, row)
    rows, missing = [], []
    for name in label_set.names:
        row = by_name.get(normalize_class_name(name))
        if row is None:
            missing.append(name)
        rows.append(row)
    if missing:
        raise SegmenterError(
            f"the segmenter in {where} has no class named {missing[:8]}{' ...' if len(missing) > 8 else ''} of label "
            f"set {label_set.name!r}; its classes are {names[:12]}{' ...' if len(names) > 12 else ''}. Use a "
            "segmenter trained on this label set (its config.json id2label must name the label set's classes)."
        )
    return rows


def _normalized(images: torch.Tensor, norm: InputNorm, device) -> torch.Tensor:
    mean = torch.tensor(norm.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(norm.std, device=device).view(1, 3, 1, 1)
    return (images.to(device=device, dtype=torch.float32) - mean) / std


def segment(
    model: nn.Module,
    images: torch.Tensor,
    label_set: LabelSet,
    size: Sequence[int],
    input_norm: InputNorm,
    *,
    where: str = "the segmenter",
    batch_size: int = 1,
) -> torch.Tensor:
    """Predicted class ids of the label set for images in [0, 1].

    Runs on the device the model is on; the caller places it.

    Args:
        model (`nn.Module`): transformers segmentation model (``model(pixel_values=...).logits``).
        images (`torch.Tensor`): `(B, 3, H, W)` float RGB in [0, 1].
        label_set (`LabelSet`): classes to predict (matched by name, see `class_rows`).
        size (`Sequence[int]`): `(H_label, W_label)`; logits are upsampled bilinearly to it.
        input_norm (`InputNorm`): the segmenter's normalisation.
        batch_size (`int`): images per forward pass (segmenters at full resolution are memory hungry).

    Returns:
        `torch.Tensor`: `(B, *size)` int64 ids in ``[0, N)``, on the CPU.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise SegmenterError(f"images must be (B, 3, H, W) RGB in [0, 1], got shape {tuple(images.shape)}")
    rows = class_rows(model, label_set, where)
    device = next(model.parameters()).device
    size = tuple(int(s) for s in size)
    preds = []
    with torch.no_grad():
        for lo in range(0, images.shape[0], max(1, int(batch_size))):
            pixels = _normalized(images[lo : lo + batch_size], input_norm, device)
            logits = model(pixel_values=pixels).logits
            logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
            preds.append(logits[:, rows].argmax(1).cpu())
    return torch.cat(preds)


def _stage_maps(model: nn.Module, pixel_values: torch.Tensor) -> Sequence[torch.Tensor]:
    """The encoder's feature maps `(B, C_i, h_i, w_i)` of a SegFormer or UperNet model."""
    if hasattr(model, "segformer"):
        return model.segformer(pixel_values, output_hidden_states=True).hidden_states
    if hasattr(model, "backbone"):
        return model.backbone(pixel_values).feature_maps
    raise SegmenterError(
        f"cannot take encoder features of a {type(model).__name__}; SegFormer and UperNet segmenters are supported"
    )


def pooled_features(model: nn.Module, images: torch.Tensor, input_norm: InputNorm) -> torch.Tensor:
    """Encoder features of images, each stage averaged over space and the stages concatenated.

    Args:
        images (`torch.Tensor`): `(B, 3, H, W)` float RGB in [0, 1].

    Returns:
        `torch.Tensor`: `(B, sum C_i)` float32 on the model's device.
    """
    device = next(model.parameters()).device
    with torch.no_grad():
        maps = _stage_maps(model, _normalized(images, input_norm, device))
    return torch.cat([m.float().mean(dim=(-2, -1)) for m in maps], dim=1)


class SegmenterFeatures(nn.Module):
    """A feature extractor for torchmetrics' ``FrechetInceptionDistance(feature=...)``: pooled segmenter features.

    Inputs are `(B, 3, H, W)` float RGB in [0, 1] (or uint8 0..255), resized to ``size`` (bilinear, antialiased)
    so that sets of different resolutions are compared on equal terms. Output `(B, num_features)` float32.

    This is not Inception: a Fréchet distance on these features is only comparable with another one on the same
    segmenter and size.
    """

    def __init__(self, segmenter: Segmenter, size: Sequence[int]) -> None:
        super().__init__()
        self.model = segmenter.model
        self.input_norm = segmenter.input_norm
        self.size = tuple(int(s) for s in size)
        with torch.no_grad():
            probe = torch.zeros(1, 3, *self.size, device=next(self.model.parameters()).device)
            self.num_features = int(pooled_features(self.model, probe, self.input_norm).shape[1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        if tuple(images.shape[-2:]) != self.size:
            images = F.interpolate(
                images.float(), size=self.size, mode="bilinear", align_corners=False, antialias=True
            )
        return pooled_features(self.model, images, self.input_norm)
