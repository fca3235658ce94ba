"""Cityscapes: ``leftImg8bit`` images with ``gtFine`` label ids, mapped to the 19 train ids.

Layout (as downloaded, ``leftImg8bit_trainvaltest.zip`` + ``gtFine_trainvaltest.zip``)::

    root/leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
    root/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png

The 35 raw label ids become train ids 0..18 through the built-in ``cityscapes`` label set's remap; every other
id (and the license plate's -1) becomes 255. Files converted by cityscapesScripts (``*_gtFine_labelTrainIds.png``)
are read as they are with ``label_kind="labelTrainIds"``. The ALDM recipe (`default_transform`): resize to
512x1024, random 512x512 crop, flip 0.5; validation takes the centre crop.
"""

from __future__ import annotations

import os
from pathlib import Path

from ...core.labels import LabelSet, get_label_set
from .base import SampleFiles, SegmentationDataset, pair_files
from .captions import CaptionTable
from .errors import DatasetError
from .transforms import TransformConfig, default_transform

__all__ = ["LABEL_KINDS", "CityscapesDataset", "list_cityscapes"]

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_KINDS = ("labelIds", "labelTrainIds")


def _split_dir(base: Path, split: str, what: str) -> Path:
    folder = base / split
    if not folder.is_dir():
        available = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
        raise DatasetError(
            f"Cityscapes {what} folder {str(folder)!r} does not exist"
            + (f"; splits found: {available}" if available else f" (and neither does {str(base)!r})")
        )
    return folder


def list_cityscapes(root: str | os.PathLike, split: str = "train", label_kind: str = "labelIds") -> list[SampleFiles]:
    """Pair the images and fine label maps of one Cityscapes split (stems like ``aachen_000000_000019``)."""
    if label_kind not in LABEL_KINDS:
        raise ValueError(f"label_kind={label_kind!r} is not valid; use one of {list(LABEL_KINDS)}")
    root = Path(root)
    image_dir = _split_dir(root / "leftImg8bit", split, "image")
    label_dir = _split_dir(root / "gtFine", split, "label")
    label_suffix = f"_gtFine_{label_kind}.png"
    images = {p.name[: -len(IMAGE_SUFFIX)]: p for p in image_dir.glob(f"*/*{IMAGE_SUFFIX}")}
    labels = {p.name[: -len(label_suffix)]: p for p in label_dir.glob(f"*/*{label_suffix}")}
    pairs = pair_files(
        images,
        labels,
        f"Cityscapes {split!r} split at {str(root)!r}",
        label_hint=str(label_dir / "{city}" / f"<stem>{label_suffix}"),
        image_hint=str(image_dir / "{city}" / f"<stem>{IMAGE_SUFFIX}"),
    )
    return [SampleFiles(stem=stem, image=image, label=label) for stem, image, label in pairs]


class CityscapesDataset(SegmentationDataset):
    """Cityscapes fine annotations as 19 train ids (module docstring).

    Args:
        root (`str` or `os.PathLike`): the folder holding ``leftImg8bit/`` and ``gtFine/``.
        split (`str`, defaults to ``"train"``): ``"train"``, ``"val"`` or ``"test"``.
        transform (`TransformConfig`, *optional*): defaults to ALDM's recipe, ``default_transform("cityscapes")``.
        captions (`str`, `Path` or `CaptionTable`, *optional*): e.g. ALDM's ``cityscapes_caption_train.json``
            (stem -> caption); keys may be the stem, the image file name or its stem. Samples without one get a
            caption built from their classes.
        label_kind (`str`, defaults to ``"labelIds"``): ``"labelIds"`` (raw ids, remapped) or
            ``"labelTrainIds"`` (already train ids).
        label_set (`LabelSet` or `str`, *optional*): defaults to the built-in ``cityscapes`` set.
        fallback_max_names (`int`, defaults to 4), check_sizes (`bool`, defaults to True): see
            `SegmentationDataset`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        *,
        transform: TransformConfig | None = None,
        captions: CaptionTable | str | os.PathLike | None = None,
        label_kind: str = "labelIds",
        label_set: LabelSet | str | os.PathLike | None = None,
        fallback_max_names: int = 4,
        check_sizes: bool = True,
    ) -> None:
        files = list_cityscapes(root, split, label_kind)
        super().__init__(
            files,
            label_set if label_set is not None else get_label_set("cityscapes"),
            transform=transform if transform is not None else default_transform("cityscapes"),
            captions=captions,
            label_mode="ids",
            apply_remap=label_kind == "labelIds",
            fallback_max_names=fallback_max_names,
            check_sizes=check_sizes,
            root=root,
            name=f"Cityscapes {split}",
        )
