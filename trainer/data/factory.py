"""`DataConfig` (the ``data:`` section of a training config) and `build_dataset`, which picks the loader."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .ade20k import ADE20KDataset
from .base import SegmentationDataset
from .cityscapes import LABEL_KINDS, CityscapesDataset
from .coco_stuff import COCOStuffDataset
from .folder import FolderDataset
from .transforms import TransformConfig, default_transform

__all__ = ["DEFAULT_SPLITS", "FORMATS", "DataConfig", "build_dataset"]

FORMATS = ("folder", "cityscapes", "ade20k", "coco_stuff")
# (training split, validation split) per format; None means the folder itself.
DEFAULT_SPLITS: dict[str, tuple[str | None, str | None]] = {
    "folder": (None, None),
    "cityscapes": ("train", "val"),
    "ade20k": ("training", "validation"),
    "coco_stuff": ("train2017", "val2017"),
}


@dataclass
class DataConfig:
    """Where the training data is and how samples are made from it."""

    format: str = field(
        default="folder",
        metadata={"help": f"Dataset format: one of {', '.join(FORMATS)}. 'folder' is images/ + labels/ (l2i-toy)."},
    )
    root: str | None = field(
        default=None,
        metadata={
            "help": "Dataset folder: the folder-format root, the Cityscapes root (leftImg8bit/, gtFine/), "
            "ADEChallengeData2016 (or its parent), or the COCO-Stuff root (images/, stuffthingmaps_trainval2017/)."
        },
    )
    split: str | None = field(
        default=None,
        metadata={
            "help": "Training split; default per format: cityscapes 'train', ade20k 'training', coco_stuff "
            "'train2017'. For 'folder', a subfolder of root (default: root itself)."
        },
    )
    val_split: str | None = field(
        default=None,
        metadata={
            "help": "Validation split; default: cityscapes 'val', ade20k 'validation', coco_stuff 'val2017'; for "
            "'folder' a subfolder of root (default: the training folder)."
        },
    )
    label_set: str | None = field(
        default=None,
        metadata={
            "help": "Label set: a built-in name or a YAML/JSON file. Default: root/labelset.yaml for 'folder', "
            "the built-in set of the format otherwise."
        },
    )
    captions: str | None = field(
        default=None,
        metadata={
            "help": "Caption file for the training split: .jsonl (one {file, caption} per line) or .json (stem -> "
            "caption, as ALDM ships). Default: root/captions.jsonl for 'folder'. Samples without a caption "
            "get one built from their class names."
        },
    )
    val_captions: str | None = field(
        default=None, metadata={"help": "Caption file for the validation split (default: as for training)."}
    )
    transform: TransformConfig | None = field(
        default=None,
        metadata={
            "help": "Resize/crop/flip settings (TransformConfig). Default: ALDM's recipe for the format at 512 "
            "(Cityscapes 512x1024 + random 512 crop; ADE20K/COCO-Stuff 512x512; folder: shorter side 512 + "
            "random crop). Validation uses the centre crop and no flip."
        },
    )
    fallback_max_names: int = field(
        default=4, metadata={"help": "At most this many class names in a caption built for a sample without one."}
    )
    check_sizes: bool = field(
        default=True,
        metadata={"help": "Read every image and label header when the dataset is built, to report size mismatches."},
    )
    label_mode: str = field(
        default="auto",
        metadata={"help": "'folder' only: 'ids' (id PNG/.npy), 'colors' (palette colours) or 'auto' (per file)."},
    )
    label_kind: str = field(
        default="labelIds",
        metadata={"help": "'cityscapes' only: 'labelIds' (raw, remapped) or 'labelTrainIds' (cityscapesScripts)."},
    )

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"data.format={self.format!r} is not valid; use one of {list(FORMATS)}")
        if isinstance(self.transform, Mapping):
            self.transform = _transform_from_dict(self.transform)
        elif self.transform is not None and not isinstance(self.transform, TransformConfig):
            raise ValueError(
                f"data.transform must be a mapping of TransformConfig fields, got {type(self.transform).__name__}"
            )
        if (
            isinstance(self.fallback_max_names, bool)
            or not isinstance(self.fallback_max_names, int)
            or self.fallback_max_names < 1
        ):
            raise ValueError(f"data.fallback_max_names={self.fallback_max_names!r} must be a positive integer")
        if self.label_mode not in ("auto", "ids", "colors"):
            raise ValueError(f"data.label_mode={self.label_mode!r} is not valid; use 'auto', 'ids' or 'colors'")
        if self.label_kind not in LABEL_KINDS:
            raise ValueError(f"data.label_kind={self.label_kind!r} is not valid; use one of {list(LABEL_KINDS)}")
        for name in ("root", "split", "val_split", "label_set", "captions", "val_captions"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, Path)):
                raise ValueError(f"data.{name}={value!r} must be a string (a path or a name) or null")
            if isinstance(value, Path):
                setattr(self, name, str(value))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataConfig:
        """Build from the ``data:`` mapping of a YAML/TOML config; unknown keys are an error naming them."""
        if not isinstance(data, Mapping):
            raise ValueError(f"the data section must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown data setting(s) {unknown}; known settings are {sorted(known)}")
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, not tuples) for writing the resolved config as YAML/JSON."""

        def plain(value: Any) -> Any:
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            return value

        return plain(dataclasses.asdict(self))

    def resolved_transform(self, validation: bool = False) -> TransformConfig:
        """The transform in use: the configured one or the format's default, made deterministic for validation."""
        transform = self.transform if self.transform is not None else default_transform(self.format)
        return transform.for_validation() if validation else transform


def _transform_from_dict(data: Mapping[str, Any]) -> TransformConfig:
    known = {f.name for f in dataclasses.fields(TransformConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown data.transform setting(s) {unknown}; known settings are {sorted(known)}")
    return TransformConfig(**dict(data))


def build_dataset(config: DataConfig | Mapping[str, Any], *, validation: bool = False) -> SegmentationDataset:
    """Make the dataset a `DataConfig` describes.

    Args:
        config (`DataConfig` or `Mapping`): the data settings (a mapping goes through `DataConfig.from_dict`).
        validation (`bool`, defaults to False): build the validation split, with the validation transform
            (centre crop, no flip) and ``val_captions``.

    Returns:
        `SegmentationDataset` (a `FolderDataset`, `CityscapesDataset`, `ADE20KDataset` or `COCOStuffDataset`).
    """
    if not isinstance(config, DataConfig):
        config = DataConfig.from_dict(config)
    if not config.root:
        raise ValueError("data.root is not set; give the dataset folder (e.g. --data.root path/to/dataset)")
    root = Path(config.root)
    default_train, default_val = DEFAULT_SPLITS[config.format]
    train_split = config.split if config.split is not None else default_train
    split, captions = train_split, config.captions
    if validation:
        if config.val_split is not None:
            split = config.val_split
        elif config.format != "folder":
            split = default_val
        # The training caption file only serves validation when both read the same split.
        captions = (
            config.val_captions
            if config.val_captions is not None
            else (config.captions if split == train_split else None)
        )
    transform = config.resolved_transform(validation)
    common = {
        "transform": transform,
        "captions": captions,
        "label_set": config.label_set,
        "fallback_max_names": config.fallback_max_names,
        "check_sizes": config.check_sizes,
    }
    if config.format == "folder":
        return FolderDataset(root / split if split else root, label_mode=config.label_mode, **common)
    if config.format == "cityscapes":
        return CityscapesDataset(root, split, label_kind=config.label_kind, **common)
    if config.format == "ade20k":
        return ADE20KDataset(root, split, **common)
    if config.format == "coco_stuff":
        return COCOStuffDataset(root, split, **common)
    else:
        raise ValueError(f"data.format={config.format!r} is not valid; use one of {list(FORMATS)}")
