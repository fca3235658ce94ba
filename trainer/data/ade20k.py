"""ADE20K SceneParsing (ADEChallengeData2016): 150 classes.

Layout (``ADEChallengeData2016.zip``)::

    root/images/{training,validation}/ADE_train_00000001.jpg
    root/annotations/{training,validation}/ADE_train_00000001.png

``root`` may be the ``ADEChallengeData2016`` folder or the folder holding it. Raw label 0 ('other') becomes
255 and raw k becomes class k - 1, through the built-in ``ade20k`` label set's remap. The ALDM recipe
(`default_transform`): resize to 512x512 ignoring the aspect ratio, no crop, flip 0.5.
"""

from __future__ import annotations

import os
from pathlib import Path

from ...core.labels import LabelSet, get_label_set
from .base import SampleFiles, SegmentationDataset, pair_files
from .captions import CaptionTable
from .errors import DatasetError
from .transforms import TransformConfig, default_transform

__all__ = ["ADE20KDataset", "list_ade20k"]

SPLITS = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def list_ade20k(root: str | os.PathLike, split: str = "training") -> list[SampleFiles]:
    """Pair the images and annotations of one ADE20K split (``"training"``/``"train"``, ``"validation"``/``"val"``)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not an ADE20K split; use one of {sorted(SPLITS)}")
    root = Path(root)
    if not (root / "images").is_dir() and (root / "ADEChallengeData2016").is_dir():
        root = root / "ADEChallengeData2016"
    image_dir, label_dir = root / "images" / SPLITS[split], root / "annotations" / SPLITS[split]
    for folder in (image_dir, label_dir):
        if not folder.is_dir():
            raise DatasetError(
                f"ADE20K folder {str(folder)!r} does not exist; root should be the ADEChallengeData2016 folder "
                "(with images/ and annotations/) or the folder that holds it"
            )
    images = {p.stem: p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()}
    labels = {p.stem: p for p in label_dir.glob("*.png")}
    pairs = pair_files(
        images,
        labels,
        f"ADE20K {SPLITS[split]!r} split at {str(root)!r}",
        label_hint=str(label_dir / "<stem>.png"),
        image_hint=str(image_dir / "<stem>.jpg"),
    )
    return [SampleFiles(stem=stem, image=image, label=label) for stem, image, label in pairs]


class ADE20KDataset(SegmentationDataset):
    """ADE20K with raw 0 -> ignore and k -> k - 1 (module docstring).

    Args:
        root (`str` or `os.PathLike`): ``ADEChallengeData2016`` or its parent.
        split (`str`, defaults to ``"training"``): ``"training"``/``"train"`` or ``"validation"``/``"val"``.
        transform (`TransformConfig`, *optional*): defaults to ``default_transform("ade20k")``.
        captions (`str`, `Path` or `CaptionTable`, *optional*): e.g. ALDM's ``ade20k_caption_train.json``.
        label_set (`LabelSet` or `str`, *optional*): defaults to the built-in ``ade20k`` set.
        fallback_max_names (`int`, defaults to 4), check_sizes (`bool`, defaults to True): see
            `SegmentationDataset`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "training",
        *,
        transform: TransformConfig | None = None,
        captions: CaptionTable | str | os.PathLike | None = None,
        label_set: LabelSet | str | os.PathLike | None = None,
        fallback_max_names: int = 4,
        check_sizes: bool = True,
    ) -> None:
        files = list_ade20k(root, split)
        super().__init__(
            files,
            label_set if label_set is not None else get_label_set("ade20k"),
            transform=transform if transform is not None else default_transform("ade20k"),
            captions=captions,
            label_mode="ids",
            apply_remap=True,
            fallback_max_names=fallback_max_names,
            check_sizes=check_sizes,
            root=root,
            name=f"ADE20K {SPLITS[split]}",
        )
