"""The map-style dataset shared by every format: pairs of (image, label map) files plus captions.

The format modules (`folder`, `cityscapes`, `ade20k`, `coco_stuff`) only list files; reading, checking,
transforming and captioning happen here. Construction checks what can be checked from file listings and
image headers (missing partners, image/label size mismatches, crops that do not fit); ids are checked when a
label map is read, by `read_label_map`, whose `LabelMapError` names the file.

A sample is a dict (see `SegmentationDataset.get`); `collate` batches them.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ...core.image_files import check_pixel_count, open_image
from ...core.labels import LabelSet, load_label_set, read_label_map
from ...core.logging import get_logger
from .captions import CaptionTable, fallback_caption, load_captions, pick_caption, read_caption_file
from .errors import DatasetError
from .transforms import TransformConfig

__all__ = ["SampleFiles", "SegmentationDataset", "collate", "image_size", "label_size", "pair_files"]

logger = get_logger(__name__)

# How many mismatches one error message lists before "and N more".
_MAX_LISTED = 5
# Header reads of this many samples or more run in a thread pool (they are I/O bound).
_PARALLEL_FROM = 64


@dataclass(frozen=True)
class SampleFiles:
    """The files of one sample.

    Args:
        stem (`str`): the sample's name (image file name without extension and dataset suffix).
        image (`Path`): the RGB image.
        label (`Path`): the label map (id PNG or ``.npy``).
        caption_file (`Path`, *optional*): a ``.txt`` caption.
    """

    stem: str
    image: Path
    label: Path
    caption_file: Path | None = None


def image_size(path: Path) -> tuple[int, int]:
    """`(H, W)` of an image file from its header (PIL opens lazily, no pixels are decoded)."""
    from PIL import UnidentifiedImageError

    try:
        with open_image(path, f"image {str(path)!r}", error=DatasetError) as img:  # the pixel limit, header only
            w, h = img.size
    except FileNotFoundError:
        raise DatasetError(f"image {str(path)!r} does not exist") from None
    except DatasetError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"image {str(path)!r} is not a readable image: {e}") from None
    return (h, w)


def label_size(path: Path) -> tuple[int, int]:
    """`(H, W)` of a label map from its header (PNG via PIL, ``.npy`` via a memory map)."""
    if path.suffix.lower() != ".npy":
        try:
            return image_size(path)
        except DatasetError as e:
            raise DatasetError(str(e).replace("image ", "label map ", 1)) from None
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise DatasetError(f"label map {str(path)!r} does not exist") from None
    except (ValueError, OSError, EOFError) as e:
        raise DatasetError(f"label map {str(path)!r} is not a readable .npy array: {e}") from None
    shape = tuple(arr.shape)
    if len(shape) == 3 and shape[-1] == 1:
        shape = shape[:2]
    if len(shape) != 2:
        raise DatasetError(f"label map {str(path)!r} must be 2-D (H, W) class ids, got shape {shape}")
    check_pixel_count(int(shape[0]), int(shape[1]), f"label map {str(path)!r}", error=DatasetError)
    return (int(shape[0]), int(shape[1]))


def _listed(items: Sequence[str]) -> str:
    shown = "\n  ".join(items[:_MAX_LISTED])
    more = f"\n  ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"\n  {shown}{more}"


def pair_files(
    images: Mapping[str, Path],
    labels: Mapping[str, Path],
    where: str,
    label_hint: str,
    image_hint: str,
) -> list[tuple[str, Path, Path]]:
    """Pair images and label maps by stem, sorted by stem.

    Args:
        images, labels: stem -> file.
        where (`str`): the dataset, for messages.
        label_hint, image_hint (`str`): where the partner of an unpaired file was expected.

    Raises:
        DatasetError: an image has no label map or a label map has no image (lists the files), or there are no
            images at all.
    """
    if not images and not labels:
        raise DatasetError(f"{where} has no samples: expected images as {image_hint} and label maps as {label_hint}")
    no_label = [str(images[s]) for s in sorted(set(images) - set(labels))]
    no_image = [str(labels[s]) for s in sorted(set(labels) - set(images))]
    if no_label or no_image:
        parts = []
        if no_label:
            parts.append(f"{len(no_label)} image(s) without a label map (expected {label_hint}):{_listed(no_label)}")
        if no_image:
            parts.append(f"{len(no_image)} label map(s) without an image (expected {image_hint}):{_listed(no_image)}")
        raise DatasetError(f"{where}: " + "\n".join(parts))
    return [(s, images[s], labels[s]) for s in sorted(images)]


def _map(fn: Callable, items: Sequence) -> list:
    if len(items) < _PARALLEL_FROM:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) * 2)) as pool:
        return list(pool.map(fn, items))


class SegmentationDataset(Dataset):
    """Image/label-map pairs with captions, transformed jointly; a map-style, picklable torch `Dataset`.

    Args:
        files (`Sequence[SampleFiles]`): the samples, in order (sample `i` is ``files[i]``).
        label_set (`LabelSet`, `str` or `Path`): the classes; a built-in name or a YAML/JSON file.
        transform (`TransformConfig`, *optional*): resize/crop/flip; defaults to `TransformConfig()`.
        captions (`CaptionTable`, `str` or `Path`, *optional*): a caption table or a ``.jsonl``/``.json`` file.
        label_mode (`str`, defaults to ``"auto"``): how label PNGs are read, see `read_label_map`.
        apply_remap (`bool`, defaults to False): the label files hold raw dataset ids; map them through the
            label set's remap (Cityscapes labelIds, ADE20K, COCO-Stuff).
        fallback_max_names (`int`, defaults to 4): class names in a caption built for a sample without one.
        check_sizes (`bool`, defaults to True): read every image and label header at construction and raise on
            a size mismatch (or a crop that does not fit); otherwise this is found when the sample is read.
        root (`Path`, *optional*): the dataset folder, for messages.
        name (`str`, defaults to ``"dataset"``): the format, for messages.
        warn_unused_captions (`bool`, defaults to False): warn (rather than log at info level) about caption
            entries for images that are not in the dataset.

    Items: ``dataset[i]`` is sample `i` in the current epoch (`set_epoch`); ``dataset[(i, epoch)]`` names the
    epoch explicitly, which keeps augmentations right with ``persistent_workers=True`` (a worker's copy of the
    dataset does not see `set_epoch`).
    """

    def __init__(
        self,
        files: Sequence[SampleFiles],
        label_set: LabelSet | str | os.PathLike,
        *,
        transform: TransformConfig | None = None,
        captions: CaptionTable | str | os.PathLike | None = None,
        label_mode: str = "auto",
        apply_remap: bool = False,
        fallback_max_names: int = 4,
        check_sizes: bool = True,
        root: str | os.PathLike | None = None,
        name: str = "dataset",
        warn_unused_captions: bool = False,
    ) -> None:
        self.name = name
        self.root = Path(root) if root is not None else None
        where = f"{name} dataset" + (f" at {str(self.root)!r}" if self.root is not None else "")
        if not files:
            raise DatasetError(f"{where} has no samples")
        if label_mode not in ("auto", "ids", "colors"):
            raise ValueError(f"label_mode={label_mode!r} is not valid; use 'auto', 'ids' or 'colors'")
        if isinstance(fallback_max_names, bool) or not isinstance(fallback_max_names, int) or fallback_max_names < 1:
            raise ValueError(f"fallback_max_names={fallback_max_names!r} must be a positive integer")
        if transform is not None and not isinstance(transform, TransformConfig):
            raise TypeError(f"transform must be a TransformConfig, got {type(transform).__name__}")
        self.files: list[SampleFiles] = list(files)
        self.label_set: LabelSet = load_label_set(label_set)
        self.transform: TransformConfig = transform if transform is not None else TransformConfig()
        self.captions: CaptionTable | None = (
            captions if isinstance(captions, CaptionTable) or captions is None else load_captions(captions)
        )
        self.label_mode = label_mode
        self.apply_remap = bool(apply_remap)
        self.fallback_max_names = fallback_max_names
        self.epoch = 0
        stems: dict[str, Path] = {}
        for f in self.files:
            if f.stem in stems:
                raise DatasetError(
                    f"{where}: two images share the name {f.stem!r}: {str(stems[f.stem])!r} and {str(f.image)!r}; "
                    "rename one (samples are keyed by file stem)"
                )
            stems[f.stem] = f.image
        self.sizes: list[tuple[int, int]] | None = self._check_sizes(where) if check_sizes else None
        if self.captions is not None:
            used = {k for f in self.files for k in (f.stem, f.image.name, f.image.stem)}
            unused = self.captions.unused(used)
            if unused:
                log = logger.warning if warn_unused_captions else logger.info
                log(
                    "%s: %d caption entr%s in %s name no image of this dataset, e.g. %s",
                    where,
                    len(unused),
                    "y" if len(unused) == 1 else "ies",
                    self.captions.source,
                    unused[:3],
                )
        logger.info("%s: %d samples, label set %r", where, len(self.files), self.label_set.name)

    # ------------------------------------------------------------------ construction checks
    def _check_sizes(self, where: str) -> list[tuple[int, int]]:
        def sizes(f: SampleFiles) -> tuple[tuple[int, int], tuple[int, int]]:
            return image_size(f.image), label_size(f.label)

        pairs = _map(sizes, self.files)
        mismatched = [
            f"{str(f.image)!r} is {ih}x{iw} (HxW) but its label map {str(f.label)!r} is {lh}x{lw}"
            for f, ((ih, iw), (lh, lw)) in zip(self.files, pairs)
            if (ih, iw) != (lh, lw)
        ]
        if mismatched:
            raise DatasetError(
                f"{where}: {len(mismatched)} image(s) differ in size from their label map:{_listed(mismatched)}\n"
                "An image and its label map must have the same size; re-export the label map at the image's size "
                "(nearest resampling) or fix the pairing."
            )
        bad_sizes = set()
        for size in {p[0] for p in pairs}:
            try:
                self.transform.check_fits(size)
            except ValueError:
                bad_sizes.add(size)
        too_small = []
        for f, (size, _) in zip(self.files, pairs):
            if size in bad_sizes:
                try:
                    self.transform.check_fits(size, source=str(f.image))
                except ValueError as e:
                    too_small.append(str(e))
        if too_small:
            raise DatasetError(f"{where}: {len(too_small)} sample(s) cannot be cropped:{_listed(too_small)}")
        return [p[0] for p in pairs]

    # ------------------------------------------------------------------ Dataset protocol
    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        if isinstance(item, tuple):
            index, epoch = item
            return self.get(int(index), int(epoch))
        return self.get(int(item), self.epoch)

    def set_epoch(self, epoch: int) -> None:
        """Use the augmentations of epoch ``epoch`` for ``dataset[i]`` (see the class docstring for workers)."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch={epoch!r} must be a non-negative integer")
        self.epoch = int(epoch)

    @property
    def stems(self) -> list[str]:
        """Sample names, in index order."""
        return [f.stem for f in self.files]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, root={str(self.root) if self.root else None!r}, "
            f"samples={len(self)}, label_set={self.label_set.name!r})"
        )

    # ------------------------------------------------------------------ reading
    def caption_of(self, index: int, epoch: int = 0) -> tuple[str | None, dict[str, Any]]:
        """The stored caption of sample ``index`` (None when it has none) and its extra fields.

        An image with several captions gets one chosen by ``(transform.seed, epoch, index)``.
        """
        f = self.files[index]
        meta: dict[str, Any] = {}
        if self.captions is not None:
            found = self.captions.lookup((f.stem, f.image.name, f.image.stem))
            if found is not None:
                return pick_caption(found[0], self.transform.seed, epoch, index), dict(found[1])
            # An entry with extra fields but a blank caption still carries its fields.
            meta = dict(self.captions.meta.get(f.stem, {}))
        if f.caption_file is not None:
            return read_caption_file(f.caption_file), meta
        return None, meta

    def read_labels(self, index: int) -> np.ndarray:
        """The untransformed label map of sample ``index``: `(H, W)` int64 class ids with the ignore id."""
        f = self.files[index]
        return read_label_map(f.label, self.label_set, mode=self.label_mode, apply_remap=self.apply_remap).ids

    def get(self, index: int, epoch: int = 0) -> dict[str, Any]:
        """Read, transform and caption sample ``index`` as it is in epoch ``epoch``.

        Returns:
            `dict` with
            - ``pixel_values``: `(3, H, W)` float32 RGB in [-1, 1].
            - ``labels``: `(H, W)` int64 class ids, the label set's ignore id (255) for unlabelled pixels.
            - ``caption`` (`str`): the stored caption (one of several, chosen per epoch), or one built from the
              classes in ``labels``.
            - ``caption_is_fallback`` (`bool`): whether the caption was built.
            - ``meta`` (`dict`): extra fields of the caption entry (e.g. ``{"domain": "night"}``), else empty.
            - ``stem`` (`str`), ``index`` (`int`).
            - ``flipped`` (`bool`): mirrored left-right.
            - ``crop``: `(4,)` int64 ``(top, left, height, width)`` in resized pixels.
            - ``original_size``: `(2,)` int64 `(H, W)` of the files.
            - ``image_hash`` (`str`): hash of the image file's bytes.
            - ``pixel_key`` (`str`): hash of the image bytes and every transform choice that shapes
              ``pixel_values`` (the latent cache key, with the encoder id).

        Raises:
            IndexError: ``index`` is out of range.
            DatasetError: unreadable image, or image and label sizes differ (names both files and sizes).
            LabelMapError: unreadable label map or ids out of range (names the file).
        """
        from PIL import UnidentifiedImageError

        if not 0 <= index < len(self.files):
            raise IndexError(f"index {index} is out of range for a dataset of {len(self.files)} samples")
        f = self.files[index]
        try:
            data = f.image.read_bytes()
        except OSError as e:
            raise DatasetError(f"cannot read image {str(f.image)!r}: {e}") from None
        image_hash = hashlib.blake2b(data, digest_size=16).hexdigest()
        try:
            img = open_image(io.BytesIO(data), f"image {str(f.image)!r}", error=DatasetError)  # the pixel limit
            img.load()
        except DatasetError:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise DatasetError(f"image {str(f.image)!r} is not a readable image ({len(data)} bytes): {e}") from None
        if img.mode != "RGB":
            img = img.convert("RGB")
        labels = self.read_labels(index)
        size = (img.height, img.width)
        if tuple(labels.shape) != size:
            raise DatasetError(
                f"{str(f.image)!r} is {size[0]}x{size[1]} (HxW) but its label map {str(f.label)!r} is "
                f"{labels.shape[0]}x{labels.shape[1]}; an image and its label map must have the same size"
            )
        try:
            plan = self.transform.plan(size, index, epoch, source=str(f.image))
        except ValueError as e:
            raise DatasetError(str(e)) from None
        image, labels = self.transform.apply(img, labels, plan)
        caption, meta = self.caption_of(index, epoch)
        is_fallback = caption is None
        if caption is None:
            caption = fallback_caption(labels, self.label_set, max_names=self.fallback_max_names)
        pixel_values = torch.from_numpy(image).permute(2, 0, 1).to(torch.float32).div(127.5).sub(1.0).contiguous()
        key_text = f"{image_hash};{self.transform.describe()};{plan.resized_size};{plan.crop};{plan.flipped}"
        return {
            "pixel_values": pixel_values,
            "labels": torch.from_numpy(labels),
            "caption": caption,
            "caption_is_fallback": is_fallback,
            "meta": meta,
            "stem": f.stem,
            "index": index,
            "flipped": plan.flipped,
            "crop": torch.tensor(plan.crop, dtype=torch.int64),
            "original_size": torch.tensor(plan.original_size, dtype=torch.int64),
            "image_hash": image_hash,
            "pixel_key": hashlib.sha256(key_text.encode()).hexdigest()[:32],
        }

    def scan_labels(self, indices: Sequence[int] | None = None) -> np.ndarray:
        """Read label maps (all by default) and count pixels per class; the first bad file raises.

        Returns:
            `np.ndarray` `(N + 1,)` int64: pixels of classes ``0..N-1``, then ignored pixels.
        """
        n = self.label_set.num_classes
        counts = np.zeros(n + 1, dtype=np.int64)
        for i in range(len(self)) if indices is None else indices:
            ids = self.read_labels(i).reshape(-1)
            valid = ids[ids < n]
            counts[:n] += np.bincount(valid, minlength=n)
            counts[n] += ids.size - valid.size
        return counts


def collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch samples: tensors are stacked, bools and ints become tensors, everything else becomes a list.

    ``pixel_values`` become `(B, 3, H, W)`, ``labels`` `(B, H, W)`, ``flipped`` a `(B,)` bool tensor, ``crop``
    `(B, 4)`; ``caption``, ``stem``, ``meta`` and the hashes stay lists.

    Raises:
        DatasetError: samples have different keys, or tensors of different shapes (the message names the
            samples; give every sample one size with ``transform.resolution`` and a crop, or use batch size 1).
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    keys = list(samples[0].keys())
    for s in samples[1:]:
        if set(s.keys()) != set(keys):
            raise DatasetError(f"cannot batch samples with different keys: {sorted(keys)} vs {sorted(s.keys())}")
    batch: dict[str, Any] = {}
    for key in keys:
        values = [s[key] for s in samples]
        if all(isinstance(v, torch.Tensor) for v in values):
            shapes = [tuple(v.shape) for v in values]
            if len(set(shapes)) > 1:
                named = [f"{s.get('stem', i)}: {shape}" for i, (s, shape) in enumerate(zip(samples, shapes))]
                raise DatasetError(
                    f"cannot batch {key!r}: the samples have different shapes:{_listed(named)}\n"
                    "Give every sample one size (transform.resolution with a crop, or resize='exact') or use "
                    "batch size 1."
                )
            batch[key] = torch.stack(values)
        elif all(isinstance(v, bool) for v in values):
            batch[key] = torch.tensor(values, dtype=torch.bool)
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            batch[key] = torch.tensor(values, dtype=torch.int64)
        else:
            batch[key] = values
    return batch
