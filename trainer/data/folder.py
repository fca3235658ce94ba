"""The folder dataset format (what `l2i-toy` writes and what users make for their own data).

Layout::

    root/
      images/<stem>.png|jpg|jpeg|webp    RGB images
      labels/<stem>.png|npy               class ids (palette/greyscale PNG or a 2-D array), 255 = ignore
      labelset.yaml                       the label set (or pass one; also .yml/.json)
      captions.jsonl                      optional: {"file": "<stem>.png", "caption": "...", ...} per line
      captions/<stem>.txt                 optional: one caption per image (images/<stem>.txt works too)

Captions are taken from ``captions.jsonl`` first, then the ``.txt`` file; a sample with neither gets a caption
built from the classes in its (cropped) label map.
"""

from __future__ import annotations

import os
from pathlib import Path

from ...core.labels import LabelSet
from ...core.logging import get_logger
from .base import SampleFiles, SegmentationDataset, pair_files
from .captions import CaptionTable
from .errors import DatasetError
from .transforms import TransformConfig

__all__ = ["IMAGE_SUFFIXES", "LABEL_SET_FILES", "LABEL_SUFFIXES", "FolderDataset", "list_folder"]

logger = get_logger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
LABEL_SUFFIXES = (".png", ".npy")
LABEL_SET_FILES = ("labelset.yaml", "labelset.yml", "labelset.json")


def _by_stem(folder: Path, suffixes: tuple[str, ...], what: str) -> dict[str, Path]:
    found: dict[str, Path] = {}
    skipped: list[str] = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        if path.suffix.lower() not in suffixes:
            if path.suffix.lower() != ".txt":
                skipped.append(path.name)
            continue
        if path.stem in found:
            raise DatasetError(
                f"{what} {str(found[path.stem])!r} and {str(path)!r} have the same stem; keep one file per sample"
            )
        found[path.stem] = path
    if skipped:
        logger.warning(
            "%s: skipped %d file(s) that are not %s (%s), e.g. %s",
            folder,
            len(skipped),
            what + "s",
            "/".join(suffixes),
            skipped[:3],
        )
    return found


def list_folder(root: str | os.PathLike) -> list[SampleFiles]:
    """Pair ``images/`` and ``labels/`` of a folder dataset by file stem.

    Raises:
        DatasetError: a folder is missing, an image has no label map or a label map has no image (the message
            lists the files), or there are no images.
    """
    root = Path(root)
    images_dir, labels_dir = root / "images", root / "labels"
    if root.exists() and not root.is_dir():
        raise DatasetError(
            f"dataset folder {str(root)!r} is a file, not a folder; give the folder holding images/ and labels/"
        )
    if not root.is_dir():
        raise DatasetError(f"dataset folder {str(root)!r} does not exist")
    missing = [str(d) for d in (images_dir, labels_dir) if not d.is_dir()]
    if missing:
        raise DatasetError(
            f"dataset folder {str(root)!r} has no {' or '.join(repr(Path(m).name + '/') for m in missing)} "
            "folder; the folder format is images/<stem>.png plus labels/<stem>.png (see `l2i-toy` for an example)"
        )
    images = _by_stem(images_dir, IMAGE_SUFFIXES, "image")
    labels = _by_stem(labels_dir, LABEL_SUFFIXES, "label map")
    if not images and not labels:
        raise DatasetError(
            f"dataset folder {str(root)!r} is empty: no images ({'/'.join(IMAGE_SUFFIXES)}) in "
            f"{str(images_dir)!r} and no label maps in {str(labels_dir)!r}"
        )
    pairs = pair_files(
        images,
        labels,
        f"dataset folder {str(root)!r}",
        label_hint=f"{str(labels_dir / '<stem>.png')!r} or .npy",
        image_hint=f"{str(images_dir / '<stem>')!r} with {'/'.join(IMAGE_SUFFIXES)}",
    )
    files = []
    for stem, image, label in pairs:
        caption_file = None
        for candidate in (root / "captions" / f"{stem}.txt", images_dir / f"{stem}.txt"):
            if candidate.is_file():
                caption_file = candidate
                break
        files.append(SampleFiles(stem=stem, image=image, label=label, caption_file=caption_file))
    return files


def find_label_set_file(root: str | os.PathLike) -> Path | None:
    """The ``labelset.yaml`` (or ``.yml``/``.json``) of a folder dataset, if there is one."""
    for name in LABEL_SET_FILES:
        path = Path(root) / name
        if path.is_file():
            return path
    return None


class FolderDataset(SegmentationDataset):
    """A dataset in the folder format (module docstring).

    Args:
        root (`str` or `os.PathLike`): the dataset folder.
        label_set (`LabelSet`, `str` or `Path`, *optional*): overrides ``root/labelset.yaml``; a built-in name
            or a file.
        transform (`TransformConfig`, *optional*): defaults to `TransformConfig()` (shorter side to 512, random
            512 crop, flip 0.5).
        captions (`str` or `Path`, *optional*): a caption file to use instead of ``root/captions.jsonl``.
        label_mode (`str`, defaults to ``"auto"``): ``"ids"`` for id PNGs, ``"colors"`` to decode colour PNGs
            through the palette; ``"auto"`` decides per file (see `read_label_map`).
        fallback_max_names (`int`, defaults to 4): class names in a built caption.
        check_sizes (`bool`, defaults to True): check image and label sizes at construction.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        label_set: LabelSet | str | os.PathLike | None = None,
        *,
        transform: TransformConfig | None = None,
        captions: CaptionTable | str | os.PathLike | None = None,
        label_mode: str = "auto",
        fallback_max_names: int = 4,
        check_sizes: bool = True,
    ) -> None:
        root = Path(root)
        files = list_folder(root)
        if label_set is None:
            label_set = find_label_set_file(root)
            if label_set is None:
                raise DatasetError(
                    f"dataset folder {str(root)!r} has no labelset.yaml; add one (the label set format is in "
                    "layout2image.core.labels.labelset; LabelSet.save writes one) or pass label_set= (a built-in name "
                    "such as 'cityscapes', or a YAML/JSON file)"
                )
        if captions is None and (root / "captions.jsonl").is_file():
            captions = root / "captions.jsonl"
        super().__init__(
            files,
            label_set,
            transform=transform,
            captions=captions,
            label_mode=label_mode,
            apply_remap=False,
            fallback_max_names=fallback_max_names,
            check_sizes=check_sizes,
            root=root,
            name="folder",
            warn_unused_captions=True,
        )
