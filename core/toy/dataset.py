"""Toy samples (label map, image, caption, domain) and the dataset folder the trainer reads.

Folder layout written by `write_dataset`::

    out/
      images/toy_000000.png      RGB image
      labels/toy_000000.png      palette-mode PNG of class ids (255 = ignore)
      captions.jsonl             {"file": "toy_000000.png", "caption": "...", "domain": "night"} per line
      labelset.yaml              the toy label set
      preview.png                rows of [colourised label | image] with a legend
      preview_domains.png        a few scenes, each as label | day | night | snow | fog

While it writes, the folder holds ``.l2i-toy-writing.json`` (the settings); an interrupted write is completed by
the same call again (each sample file is written atomically, so the ones present are whole and are kept).

Sample `i` of a dataset with seed `s` depends on `(s, i)`, the size and the domain list only, so any sample can
be regenerated alone; domains cycle through the list in order (sample `i` gets `domains[i % len(domains)]`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..files import atomic_path, atomic_write_text
from ..labels import LabelSet, colorize, get_label_set, preview_grid, save_label_map
from ..logging import get_logger
from .captions import make_caption
from .render import DOMAINS, ImageStats, image_stats, render_scene
from .scenes import IGNORE_INDEX, TOY_CLASSES, make_scene, normalize_size, sample_rng

logger = get_logger(__name__)

STEM_PREFIX = "toy_"

#: Present while `write_dataset` writes a folder (its settings, as JSON): an interrupted write, to complete.
WRITING_MARKER = ".l2i-toy-writing.json"

#: First index of the held-out scenes: the toy base models train on indices below it (0..2999 for seed 0), their
#: evaluation uses the range from here, and so do the demo's validation split and the ComfyUI toy nodes' default.
HELDOUT_START = 1_000_000


@dataclass
class ToySample:
    """One sample of the toy world.

    Args:
        index (`int`): sample index in its dataset.
        stem (`str`): file stem, ``toy_{index:06d}``.
        labels (`np.ndarray`): `(H, W)` int64 class ids, 255 = ignore.
        image (`np.ndarray`): `(H, W, 3)` uint8 RGB.
        caption (`str`): caption containing the domain word.
        domain (`str`): one of `DOMAINS`.
    """

    index: int
    stem: str
    labels: np.ndarray
    image: np.ndarray
    caption: str
    domain: str


@dataclass
class ToyDatasetSummary:
    """What `write_dataset` wrote, with figures about it.

    Args:
        root (`Path`): the dataset folder.
        num (`int`): number of samples.
        size (`tuple[int, int]`): `(H, W)`.
        seed (`int`): dataset seed.
        domains (`tuple[str, ...]`): domain cycle.
        class_frequencies (`dict[str, float]`): share of all pixels per class name, plus "ignore".
        domain_counts (`dict[str, int]`): samples per domain.
        domain_stats (`dict[str, ImageStats]`): mean image statistics per domain.
        preview (`Path`, optional): the label | image grid.
        domain_preview (`Path`, optional): scenes across all domains.
        resumed (`int`): samples an interrupted write had already written (kept, not rendered again).
    """

    root: Path
    num: int
    size: tuple[int, int]
    seed: int
    domains: tuple[str, ...]
    class_frequencies: dict[str, float] = field(default_factory=dict)
    domain_counts: dict[str, int] = field(default_factory=dict)
    domain_stats: dict[str, ImageStats] = field(default_factory=dict)
    preview: Path | None = None
    domain_preview: Path | None = None
    resumed: int = 0


def check_domains(domains: Sequence[str]) -> tuple[str, ...]:
    """Validate a domain list: non-empty, each one of `DOMAINS`, no repeats."""
    if isinstance(domains, str):
        domains = [d.strip() for d in domains.split(",") if d.strip()]
    domains = tuple(domains)
    if not domains:
        raise ValueError(f"domains must name at least one of {', '.join(DOMAINS)}")
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown:
        raise ValueError(f"unknown domain(s) {unknown}; the toy world has {', '.join(DOMAINS)}")
    if len(set(domains)) != len(domains):
        raise ValueError(f"domains repeat: {list(domains)}; name each domain once")
    return domains


def stem_for(index: int) -> str:
    """File stem of sample `index`: ``toy_000042``."""
    return f"{STEM_PREFIX}{index:06d}"


def make_sample(
    index: int,
    seed: int = 0,
    size: int | tuple[int, int] = 128,
    domains: Sequence[str] = DOMAINS,
    domain: str | None = None,
) -> ToySample:
    """Generate sample `index` of the toy dataset with seed `seed`.

    Args:
        index (`int`): sample index (non-negative).
        seed (`int`, optional, defaults to 0): dataset seed (non-negative).
        size (`int` or `tuple[int, int]`, optional, defaults to 128): image size.
        domains (`Sequence[str]`, optional, defaults to `DOMAINS`): the domain cycle.
        domain (`str`, optional): force this domain instead of `domains[index % len(domains)]`.
    """
    domains = check_domains(domains)
    if domain is None:
        domain = domains[index % len(domains)]
    elif domain not in DOMAINS:
        raise ValueError(f"domain must be one of {', '.join(DOMAINS)}, got {domain!r}")
    scene = make_scene(size, seed, index)
    image = render_scene(scene, domain, sample_rng(seed, index, 1))
    caption = make_caption(scene, domain, sample_rng(seed, index, 2))
    return ToySample(
        index=index, stem=stem_for(index), labels=scene.labels, image=image, caption=caption, domain=domain
    )


def iter_samples(
    num: int, seed: int = 0, size: int | tuple[int, int] = 128, domains: Sequence[str] = DOMAINS, start: int = 0
) -> Iterator[ToySample]:
    """Yield samples `start .. start + num - 1` (see `make_sample`)."""
    domains = check_domains(domains)
    for index in range(start, start + num):
        yield make_sample(index, seed, size, domains)


def toy_label_set() -> LabelSet:
    """The built-in ``toy`` label set, checked against the class ids the scene painter uses."""
    label_set = get_label_set("toy")
    if tuple(label_set.names) != TOY_CLASSES or label_set.ignore_index != IGNORE_INDEX:
        raise ValueError(
            f"the toy label set has classes {list(label_set.names)} (ignore {label_set.ignore_index}) but the scene "
            f"painter uses {list(TOY_CLASSES)} (ignore {IGNORE_INDEX}); update core/labels/builtin/toy.json"
        )
    return label_set


def domain_preview(
    indices: Sequence[int],
    seed: int = 0,
    size: int | tuple[int, int] = 128,
    domains: Sequence[str] = DOMAINS,
    label_set: LabelSet | None = None,
    pad: int = 2,
) -> np.ndarray:
    """A grid showing each scene as [colourised label | one image per domain], one scene per row.

    Returns:
        `np.ndarray` `(rows * (H + pad) + pad, (1 + len(domains)) * (W + pad) + pad, 3)` uint8, white gaps.
    """
    domains = check_domains(domains)
    label_set = toy_label_set() if label_set is None else label_set
    h, w = normalize_size(size)
    cols = 1 + len(domains)
    grid = np.full((len(indices) * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for r, index in enumerate(indices):
        scene = make_scene((h, w), seed, index)
        tiles = [colorize(scene.labels, label_set)]
        tiles += [render_scene(scene, d, sample_rng(seed, index, 1)) for d in domains]
        y = pad + r * (h + pad)
        for c, tile in enumerate(tiles):
            x = pad + c * (w + pad)
            grid[y : y + h, x : x + w] = tile
    return grid


def _save_rgb(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    # Atomic: a sample file that exists is whole, so an interrupted write can be completed by skipping it. No
    # fsync per scene (thousands of small files); Ctrl-C, not a power cut, is what interrupts a write.
    with atomic_path(path, fsync=False) as tmp:
        Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(tmp, format="PNG", compress_level=1)


def write_dataset(
    out_dir: str | os.PathLike,
    num: int,
    *,
    seed: int = 0,
    size: int | tuple[int, int] = 128,
    domains: Sequence[str] = DOMAINS,
    preview_rows: int = 8,
    overwrite: bool = False,
    start: int = 0,
    progress: bool = False,
) -> ToyDatasetSummary:
    """Generate `num` toy samples into a dataset folder (layout in the module docstring).

    Args:
        out_dir (`str` or `os.PathLike`): the dataset folder; created if missing.
        num (`int`): number of samples (at least 1).
        seed (`int`, optional, defaults to 0): dataset seed (non-negative).
        size (`int` or `tuple[int, int]`, optional, defaults to 128): image size.
        domains (`Sequence[str]`, optional, defaults to `DOMAINS`): domains, cycled over the samples.
        preview_rows (`int`, optional, defaults to 8): rows of the preview grids; 0 writes none.
        overwrite (`bool`, optional, defaults to False): replace a toy dataset already in `out_dir` (its
            ``toy_*.png`` files are deleted first); without it, an existing dataset is an error, except an
            interrupted write (``.l2i-toy-writing.json`` present) of the same settings, which this call completes:
            the samples already written are kept (read back, not rendered again).
        start (`int`, optional, defaults to 0): index of the first sample; sample ``i`` depends on ``(seed, i)``
            only, so disjoint index ranges of one seed are disjoint splits.
        progress (`bool`, optional, defaults to False): show a progress bar (stderr).

    Returns:
        `ToyDatasetSummary`.
    """
    if int(num) < 1:
        raise ValueError(f"num must be at least 1, got {num}")
    if int(seed) < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if int(preview_rows) < 0:
        raise ValueError(f"preview_rows must be non-negative, got {preview_rows}")
    if int(start) < 0:
        raise ValueError(f"start must be non-negative, got {start}")
    num, seed, preview_rows, start = int(num), int(seed), int(preview_rows), int(start)
    domains = check_domains(domains)
    h, w = normalize_size(size)
    label_set = toy_label_set()

    root = Path(out_dir)
    images_dir, labels_dir, captions_path = root / "images", root / "labels", root / "captions.jsonl"
    wanted = {"num": num, "seed": seed, "size": [h, w], "domains": list(domains), "start": start}
    resume = _check_folder(root, wanted, overwrite)
    if overwrite:
        for d in (images_dir, labels_dir):
            for path in d.glob(f"{STEM_PREFIX}*.png") if d.is_dir() else ():
                path.unlink()
    images_dir.mkdir(parents=True, exist_ok=True)
    labels_dir.mkdir(parents=True, exist_ok=True)
    # Written first, removed last: a folder with it holds an interrupted write, which the same call completes.
    atomic_write_text(root / WRITING_MARKER, json.dumps(wanted) + "\n")

    pixel_counts = np.zeros(256, dtype=np.int64)
    stat_sums = {d: np.zeros(4) for d in domains}
    domain_counts = dict.fromkeys(domains, 0)
    shown: list[ToySample] = []
    records = []
    from tqdm.auto import tqdm

    reused = 0
    for index in tqdm(
        range(start, start + num), total=num, desc=f"writing {root}", unit="scene", disable=not progress
    ):
        stem = stem_for(index)
        # Each file is written atomically, so one that exists is whole: a resumed write re-renders nothing.
        sample = _written_sample(images_dir, labels_dir, index, seed, (h, w), domains) if resume else None
        if sample is None:
            sample = make_sample(index, seed, (h, w), domains)
            _save_rgb(images_dir / f"{stem}.png", sample.image)
            save_label_map(labels_dir / f"{stem}.png", sample.labels, label_set)
        else:
            reused += 1
        records.append({"file": f"{stem}.png", "caption": sample.caption, "domain": sample.domain})
        pixel_counts += np.bincount(sample.labels.ravel(), minlength=256)[:256]
        stats = image_stats(sample.image)
        stat_sums[sample.domain] += (stats.brightness, stats.saturation, stats.contrast, stats.white_fraction)
        domain_counts[sample.domain] += 1
        if len(shown) < preview_rows:
            shown.append(sample)
    if reused:
        logger.info("completed an interrupted write: %d of %d samples were already written", reused, num)
    atomic_write_text(captions_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    label_set.save(root / "labelset.yaml")

    total = pixel_counts.sum()
    frequencies = {name: float(pixel_counts[i] / total) for i, name in enumerate(TOY_CLASSES)}
    frequencies["ignore"] = float(pixel_counts[IGNORE_INDEX] / total)
    domain_stats = {d: ImageStats(*(stat_sums[d] / domain_counts[d]).tolist()) for d in domains if domain_counts[d]}
    summary = ToyDatasetSummary(
        root=root,
        num=num,
        size=(h, w),
        seed=seed,
        domains=domains,
        class_frequencies=frequencies,
        domain_counts=domain_counts,
        domain_stats=domain_stats,
    )
    if preview_rows:
        grid = preview_grid([s.labels for s in shown], label_set, [s.image for s in shown])
        summary.preview = root / "preview.png"
        _save_rgb(summary.preview, grid)
        rows = list(range(start, start + min(preview_rows, 4, num)))
        summary.domain_preview = root / "preview_domains.png"
        _save_rgb(summary.domain_preview, domain_preview(rows, seed, (h, w), domains, label_set))
    (root / WRITING_MARKER).unlink(missing_ok=True)
    logger.info("wrote %d toy samples (%dx%d, seed %d) to %s", num, h, w, seed, root)
    summary.resumed = reused
    return summary


def _settings(params: dict) -> str:
    h, w = params.get("size", ["?", "?"])
    return (
        f"--num {params.get('num')} --seed {params.get('seed')} --size {h if h == w else f'{h}x{w}'} "
        f"--start {params.get('start')} --domains {','.join(params.get('domains', []))}"
    )


def _check_folder(root: Path, wanted: dict, overwrite: bool) -> bool:
    """Whether `write_dataset` completes an interrupted write of the same settings in ``root``; raises
    FileExistsError for a dataset (whole or interrupted) that the call would otherwise overwrite."""
    images_dir, labels_dir, captions_path = root / "images", root / "labels", root / "captions.jsonl"
    existing = [p for d in (images_dir, labels_dir) if d.is_dir() for p in d.glob(f"{STEM_PREFIX}*.png")]
    marker = root / WRITING_MARKER
    if overwrite:
        return False
    if marker.is_file():
        try:
            earlier = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            earlier = {}
        if earlier == wanted:
            return True
        written = len(
            {p.name for p in existing if p.parent == images_dir} & {p.name for p in existing if p.parent == labels_dir}
        )
        raise FileExistsError(
            f"{str(root)!r} holds an interrupted toy dataset write with other settings ({_settings(earlier)}): "
            f"{written} of {earlier.get('num', '?')} samples written, captions.jsonl and labelset.yaml not yet; "
            "complete it by rerunning with those settings, or replace it (overwrite=True; l2i-toy --overwrite)"
        )
    if existing or captions_path.exists():
        images = {p.name for p in existing if p.parent == images_dir}
        labels = {p.name for p in existing if p.parent == labels_dir}
        missing = [n for n in ("captions.jsonl", "labelset.yaml") if not (root / n).exists()]
        if missing:
            raise FileExistsError(
                f"{str(root)!r} holds an incomplete toy dataset ({len(images & labels)} samples with image and "
                f"label, {' and '.join(missing)} missing: an interrupted write of an older l2i-toy); replace it "
                "(overwrite=True; l2i-toy --overwrite) or choose another folder"
            )
        raise FileExistsError(
            f"{str(root)!r} already holds a toy dataset ({len(images & labels)} samples); choose another folder or "
            "replace it (overwrite=True; l2i-toy --overwrite)"
        )
    return False


def _written_sample(
    images_dir: Path, labels_dir: Path, index: int, seed: int, size: tuple[int, int], domains: tuple[str, ...]
) -> ToySample | None:
    """Sample ``index`` with the image read back from its file (no rendering), or None when either file is absent
    or is not the sample's size."""
    from PIL import Image

    stem = stem_for(index)
    if not (images_dir / f"{stem}.png").is_file() or not (labels_dir / f"{stem}.png").is_file():
        return None
    try:
        with Image.open(images_dir / f"{stem}.png") as img:
            image = np.asarray(img.convert("RGB"))
    except (OSError, ValueError):
        return None
    scene = make_scene(size, seed, index)
    if image.shape[:2] != scene.labels.shape:
        return None
    domain = domains[index % len(domains)]
    caption = make_caption(scene, domain, sample_rng(seed, index, 2))
    return ToySample(index=index, stem=stem, labels=scene.labels, image=image, caption=caption, domain=domain)
