"""COCO-Stuff 164k: 171 classes (80 things + 91 stuff).

Layout (COCO 2017 images + ``stuffthingmaps_trainval2017.zip``)::

    root/images/{train2017,val2017}/000000000009.jpg
    root/stuffthingmaps_trainval2017/{train2017,val2017}/000000000009.png

The maps hold raw ids 0..181 (0-based COCO category ids; 11 ids are unused) and 255 for unlabelled pixels; the
built-in ``coco_stuff`` label set's remap makes them the 171 contiguous classes, and the unused ids and 255
become 255. The ALDM recipe (`default_transform`): 512x512, no crop, flip 0.5.
"""

from __future__ import annotations

import os
from pathlib import Path

from ...core.labels import LabelSet, get_label_set
from .base import SampleFiles, SegmentationDataset, pair_files
from .captions import CaptionTable
from .errors import DatasetError
from .transforms import TransformConfig, default_transform

__all__ = ["COCOStuffDataset", "list_coco_stuff"]

SPLITS = {"train": "train2017", "train2017": "train2017", "val": "val2017", "val2017": "val2017"}
LABEL_DIRS = ("stuffthingmaps_trainval2017", "stuffthingmaps")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def list_coco_stuff(root: str | os.PathLike, split: str = "train2017") -> list[SampleFiles]:
    """Pair the images and stuff+thing maps of one COCO-Stuff split (``"train2017"``/``"train"``, ``"val2017"``/``"val"``)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not a COCO-Stuff split; use one of {sorted(SPLITS)}")
    root = Path(root)
    split_name = SPLITS[split]
    image_dir = root / "images" / split_name
    label_base = next((root / d for d in LABEL_DIRS if (root / d).is_dir()), root / LABEL_DIRS[0])
    label_dir = label_base / split_name
    for folder in (image_dir, label_dir):
        if not folder.is_dir():
            raise DatasetError(
                f"COCO-Stuff folder {str(folder)!r} does not exist; root should hold images/{split_name}/ and "
                f"{LABEL_DIRS[0]}/{split_name}/ (or stuffthingmaps/{split_name}/)"
            )
    images = {p.stem: p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()}
    labels = {p.stem: p for p in label_dir.glob("*.png")}
    pairs = pair_files(
        images,
        labels,
        f"COCO-Stuff {split_name!r} split at {str(root)!r}",
        label_hint=str(label_dir / "<stem>.png"),
        image_hint=str(image_dir / "<stem>.jpg"),
    )
    return [SampleFiles(stem=stem, image=image, label=label) for stem, image, label in pairs]


class COCOStuffDataset(SegmentationDataset):
    """COCO-Stuff with raw ids remapped to 171 classes (module docstring).

    Args:
        root (`str` or `os.PathLike`): the folder holding ``images/`` and ``stuffthingmaps_trainval2017/``.
        split (`str`, defaults to ``"train2017"``): ``"train2017"``/``"train"`` or ``"val2017"``/``"val"``.
        transform (`TransformConfig`, *optional*): defaults to ``default_transform("coco_stuff")``.
        captions (`str`, `Path` or `CaptionTable`, *optional*): a stem -> caption ``.json`` or a ``.jsonl``.
        label_set (`LabelSet` or `str`, *optional*): defaults to the built-in ``coco_stuff`` set.
        fallback_max_names (`int`, defaults to 4), check_sizes (`bool`, defaults to True): see
            `SegmentationDataset`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train2017",
        *,
        transform: TransformConfig | None = None,
        captions: CaptionTable | str | os.PathLike | None = None,
        label_set: LabelSet | str | os.PathLike | None = None,
        fallback_max_names: int = 4,
        check_sizes: bool = True,
    ) -> None:
        files = list_coco_stuff(root, split)
        super().__init__(
            files,
            label_set if label_set is not None else get_label_set("coco_stuff"),
            transform=transform if transform is not None else default_transform("coco_stuff"),
            captions=captions,
            label_mode="ids",
            apply_remap=True,
            fallback_max_names=fallback_max_names,
            check_sizes=check_sizes,
            root=root,
            name=f"COCO-Stuff {SPLITS[split]}",
        )
