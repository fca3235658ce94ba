"""Scoring a dataset of (generated) images: layout mIoU per domain and a Fréchet distance on segmenter features.

What ``l2i-eval`` computes, as functions over files:

- `layout_alignment`: a segmenter segments every image; its prediction is compared with the label map the image
  was drawn from (`core.metrics`), over all images and per domain.
- `segmenter_frechet_distance`: torchmetrics' ``FrechetInceptionDistance`` with ``feature=`` the segmenter's
  pooled encoder features (`core.segmenters.SegmenterFeatures`), against a reference image set. It is *not*
  Inception FID and is named so everywhere (`FRECHET_NAME`); it compares only with itself (same segmenter, size).

torchmetrics is an optional dependency (``pip install layout2image[eval]``); with a custom feature module its FID
needs neither torch-fidelity nor scipy nor torchvision.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .image_files import open_image
from .labels import LabelSet, read_label_map
from .metrics import MeanIoU, SegmentationScores
from .segmenters import Segmenter, SegmenterFeatures, class_rows, segment

__all__ = [
    "FRECHET_NAME",
    "IMAGE_SUFFIXES",
    "NO_DOMAIN",
    "TOY_FRECHET_NAME",
    "EvaluationError",
    "FrechetResult",
    "LayoutResult",
    "layout_alignment",
    "list_images",
    "read_domains",
    "read_image",
    "scores_dict",
    "segmenter_frechet_distance",
]

#: The names reports give the Fréchet distance on segmenter features, so nobody reads it as Inception FID.
FRECHET_NAME = "Fréchet distance on segmenter features (not Inception FID)"
TOY_FRECHET_NAME = "toy Fréchet distance (toy segmenter features, not Inception)"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
#: The domain of images whose dataset names none.
NO_DOMAIN = "(none)"


class EvaluationError(ValueError):
    """Bad input to an evaluation (unreadable image, unusable reference set, missing optional package)."""


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """An image file -> `(3, H, W)` float32 RGB in [0, 1] (pixel limit checked from the header first)."""
    source = f"image {str(path)!r}"
    try:
        with open_image(path, source, error=EvaluationError) as img:
            rgb = np.asarray(img.convert("RGB"))
    except EvaluationError:
        raise
    except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise EvaluationError(f"{source} cannot be read as an image: {' '.join(str(e).split())}") from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255.0


def list_images(folder: str | os.PathLike, what: str = "reference") -> list[Path]:
    """Image files of a folder (or of its ``images/`` subfolder when there is one), sorted by name."""
    root = Path(folder)
    if not root.is_dir():
        raise EvaluationError(f"{what} folder {str(root)!r} does not exist")
    base = root / "images" if (root / "images").is_dir() else root
    files = sorted(p for p in base.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise EvaluationError(f"{what} folder {str(base)!r} has no images ({'/'.join(IMAGE_SUFFIXES)})")
    return files


def _records(data) -> Iterable[Mapping]:
    """Per-image records of a manifest: a list of dicts under any top-level key, or a file -> dict mapping."""
    if isinstance(data, list):
        yield from (r for r in data if isinstance(r, Mapping))
        return
    if not isinstance(data, Mapping):
        return
    for key, value in data.items():
        if isinstance(value, list):
            yield from (r for r in value if isinstance(r, Mapping))
        elif isinstance(value, Mapping) and isinstance(value.get("domain"), str):
            yield {"file": key, **value}


def _stem_of(record: Mapping) -> str | None:
    for key in ("file", "image", "stem", "name", "id"):
        value = record.get(key)
        if isinstance(value, str) and value:
            return Path(value).stem
    return None


def read_domains(root: str | os.PathLike) -> dict[str, str]:
    """The domain of each image of a folder dataset, by file stem.

    Read from ``manifest.json`` (per-image records with a ``domain`` and a ``file``/``image``/``stem``, as a list
    under any top-level key or a mapping keyed by file), else from ``captions.jsonl`` (its ``domain`` field).
    Images that neither names have no domain.
    """
    root = Path(root)
    domains: dict[str, str] = {}
    manifest = root / "manifest.json"
    if manifest.is_file():
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise EvaluationError(f"{str(manifest)!r} is not readable JSON: {' '.join(str(e).split())}") from None
        for record in _records(data):
            stem, domain = _stem_of(record), record.get("domain")
            if stem and isinstance(domain, str) and domain:
                domains[stem] = domain
    captions = root / "captions.jsonl"
    if not domains and captions.is_file():
        for number, line in enumerate(captions.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise EvaluationError(f"{str(captions)!r} line {number} is not JSON") from None
            if isinstance(record, Mapping):
                stem, domain = _stem_of(record), record.get("domain")
                if stem and isinstance(domain, str) and domain:
                    domains[stem] = domain
    return domains


@dataclass
class LayoutResult:
    """Layout alignment of a dataset.

    Args:
        overall (`SegmentationScores`): over every image.
        per_domain (`dict[str, SegmentationScores]`): by domain (`NO_DOMAIN` for images without one).
        counts (`dict[str, int]`): images per domain.
        num_images (`int`): images scored.
    """

    overall: SegmentationScores
    per_domain: dict[str, SegmentationScores] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    num_images: int = 0


def layout_alignment(
    samples: Sequence[tuple[str, Path, Path]],
    segmenter: Segmenter,
    label_set: LabelSet,
    domains: Mapping[str, str] | None = None,
    *,
    progress: bool = False,
) -> LayoutResult:
    """Segment each image and score it against its label map.

    Args:
        samples (`Sequence[tuple[str, Path, Path]]`): ``(stem, image file, label map file)``.
        segmenter (`Segmenter`): see `core.segmenters.load_segmenter`; its classes must cover the label set.
        label_set (`LabelSet`): the dataset's label set.
        domains (`Mapping[str, str]`, *optional*): stem -> domain.
        progress (`bool`): a progress bar on stderr.
    """
    class_rows(segmenter.model, label_set, str(segmenter.folder))  # a class mismatch fails before any work
    from tqdm.auto import tqdm

    domains = domains or {}
    n = label_set.num_classes
    overall = MeanIoU(n, label_set.ignore_index)
    by_domain: dict[str, MeanIoU] = {}
    counts: dict[str, int] = {}
    for stem, image_path, label_path in tqdm(samples, desc="segmenting", unit="img", disable=not progress):
        target = torch.from_numpy(read_label_map(label_path, label_set).ids)
        image = read_image(image_path)
        pred = segment(
            segmenter.model, image[None], label_set, target.shape, segmenter.input_norm, where=str(segmenter.folder)
        )
        overall.update(pred, target[None])
        domain = domains.get(stem, NO_DOMAIN)
        by_domain.setdefault(domain, MeanIoU(n, label_set.ignore_index)).update(pred, target[None])
        counts[domain] = counts.get(domain, 0) + 1
    return LayoutResult(
        overall=overall.compute(),
        per_domain={d: m.compute() for d, m in sorted(by_domain.items())},
        counts=dict(sorted(counts.items())),
        num_images=len(samples),
    )


def _nan_to_none(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def scores_dict(scores: SegmentationScores, label_set: LabelSet) -> dict:
    """JSON-ready scores: ``miou``, ``pixel_accuracy``, ``per_class_iou`` by class name (null: class absent)."""
    return {
        "miou": _nan_to_none(scores.miou),
        "pixel_accuracy": _nan_to_none(scores.pixel_accuracy),
        "per_class_iou": {
            name: _nan_to_none(v) for name, v in zip(label_set.names, scores.per_class_iou.tolist(), strict=True)
        },
    }


@dataclass
class FrechetResult:
    """A Fréchet distance on segmenter features.

    Args:
        value (`float`): the distance (squared-units, as FID).
        num_generated (`int`), num_reference (`int`): images on each side.
        num_features (`int`): feature dimension.
        size (`tuple[int, int]`): the size every image is resized to before the encoder.
    """

    value: float
    num_generated: int
    num_reference: int
    num_features: int
    size: tuple[int, int]


def _frechet_metric(features: SegmenterFeatures):
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError:
        raise EvaluationError(
            "the Fréchet distance needs torchmetrics, which is not installed; install it with "
            "`pip install -c constraints.txt torchmetrics` (or the `eval` extra), or leave out --reference"
        ) from None
    # reset_real_features=False: the reference side is computed once and kept across the generated groups.
    return FrechetInceptionDistance(feature=features, reset_real_features=False, normalize=True)


def segmenter_frechet_distance(
    generated: Mapping[str, Sequence[Path]],
    reference: Sequence[Path],
    segmenter: Segmenter,
    size: Sequence[int] | None = None,
    *,
    batch_size: int = 16,
    progress: bool = False,
) -> dict[str, FrechetResult | None]:
    """Fréchet distance between each group of generated images and one reference set, on segmenter features.

    Args:
        generated (`Mapping[str, Sequence[Path]]`): group name (e.g. ``"all"``, a domain) -> image files.
        reference (`Sequence[Path]`): the reference images (at least 2).
        segmenter (`Segmenter`): its encoder gives the features (`SegmenterFeatures`).
        size (`Sequence[int]`, *optional*): resize every image to this; defaults to the segmenter's processor size,
            else the first reference image's size.
        batch_size (`int`): images per encoder pass.

    Returns:
        `dict[str, FrechetResult | None]`: per group; None for a group of fewer than 2 images (no covariance).
    """
    if len(reference) < 2:
        raise EvaluationError(f"the reference set has {len(reference)} image(s); a Fréchet distance needs at least 2")
    if size is None:
        size = segmenter.size or tuple(read_image(reference[0]).shape[-2:])
    size = (int(size[0]), int(size[1]))
    features = SegmenterFeatures(segmenter, size)
    metric = _frechet_metric(features)
    from tqdm.auto import tqdm

    def feed(files: Sequence[Path], real: bool, desc: str) -> None:
        bar = tqdm(total=len(files), desc=desc, unit="img", disable=not progress)
        for lo in range(0, len(files), batch_size):
            chunk = files[lo : lo + batch_size]
            batch = [
                torch.nn.functional.interpolate(
                    read_image(f)[None], size=size, mode="bilinear", align_corners=False, antialias=True
                )[0]
                for f in chunk
            ]
            metric.update(torch.stack(batch), real=real)
            bar.update(len(chunk))
        bar.close()

    feed(reference, True, "reference features")
    results: dict[str, FrechetResult | None] = {}
    for group, files in generated.items():
        if len(files) < 2:
            results[group] = None
            continue
        metric.reset()
        feed(files, False, f"features ({group})")
        value = float(metric.compute())
        results[group] = FrechetResult(
            value=value,
            num_generated=len(files),
            num_reference=len(reference),
            num_features=features.num_features,
            size=size,
        )
    return results
