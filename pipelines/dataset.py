"""Synthetic datasets: label maps (+ captions, domain variants) through a `LayoutPipeline` into our folder format.

Output (what `l2i-train`'s folder loader reads as is)::

    out/
      images/<id>.png        the samples (RGB)
      labels/<id>.png        the label map each was drawn from (palette PNG of ids)
      captions.jsonl         {"file": "<id>.png", "caption": <prompt used>, "domain", "source", "sample", "seed"}
      labelset.yaml          the adapter's label set
      manifest.json          model files with sha256, settings, and per image its source, domain, seed and prompt

``<id>`` is the source stem, plus ``_<domain>`` with domains and ``_<k>`` with several samples per layout.

**Work items and seeds.** Items are ordered layout by layout (sorted stems), then domain, then sample; item ``i`` has
the noise seed ``seed + i``. Items are cut into fixed chunks of ``chunk_size`` (one sampler batch each, split only by
label-map size); with ``P`` processes, process ``p`` takes chunks ``p, p + P, ...``. What an image is depends on its
item and chunk only, never on the number of processes, so 1 or N processes write the same bytes on one machine.

**Resume.** A chunk is finished when its record ``.l2i-generate/chunk_<c>.json`` exists (written atomically after
its images and labels, which are written atomically too); a rerun with the same settings skips finished chunks and
redoes the others, so a killed run loses at most the chunks in flight (its leftover temporary files are deleted on
the rerun). When every chunk is done the main process
writes ``captions.jsonl`` and the full manifest and removes ``.l2i-generate/``. The manifest written at the start
holds the run's key (a hash of settings, model hashes and the planned items); an output folder holding another
run's manifest, or data without one, is refused unless ``overwrite`` (which deletes what the earlier run wrote).

**Layout filter.** With a ``segmenter`` (`core.segmenters`, classes matched by name to the label set; a mismatch
fails before anything is written), each image is segmented right after it is sampled and scored against its label
map: per-image mIoU over the classes present in the map or the prediction (`core.metrics`). The score is recorded
(``"miou"``) in the chunk record, ``captions.jsonl`` and the manifest. With ``settings.filter_miou = T``, an image
scoring under ``T`` is marked ``"flagged": true`` (``filter_action="flag"``) or not written at all
(``"drop"``: no image, label or caption; the manifest lists it with ``"dropped": true``, its score and seed, and
its chunk counts as done, so a rerun does not sample it again). A score of None (a map with no class present) is
never under the threshold. The filter settings and the segmenter's file hashes are part of the run key.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..core.files import atomic_write_bytes, atomic_write_text
from ..core.labels import LabelSet, load_label_set, read_label_map, save_label_map
from ..core.logging import get_logger

__all__ = [
    "DEFAULT_PHRASES",
    "GenerateSettings",
    "Layout",
    "WorkItem",
    "domain_templates",
    "generate_dataset",
    "list_layouts",
    "plan_items",
    "read_prompt_file",
]

logger = get_logger(__name__)

MANIFEST = "manifest.json"
WORK_DIR = ".l2i-generate"
MANIFEST_FORMAT = 1
#: What a generate run writes into its output folder (deleted by ``overwrite``).
OUTPUT_NAMES = ("images", "labels", "captions.jsonl", "labelset.yaml", MANIFEST, WORK_DIR)
LABEL_SUFFIXES = (".png", ".npy")
#: The phrase a bare domain word adds to a caption (``"{caption}, at night"``); other words are appended as they are.
DEFAULT_PHRASES = {
    "day": "on a sunny day",
    "night": "at night",
    "snow": "in heavy snow",
    "fog": "in thick fog",
    "rain": "in the rain",
    "dusk": "at dusk",
}
_BUFFER = 1 << 20


class GenerateError(ValueError):
    """Bad input to `generate_dataset` (the message names it)."""


# ---------------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Layout:
    """One source label map: its stem, file, caption and the domain its caption names (if recorded)."""

    stem: str
    path: Path
    caption: str | None
    domain: str | None = None


def _caption_table(root: Path):
    from ..trainer.data.captions import CaptionTable

    path = root / "captions.jsonl"
    return CaptionTable.from_jsonl(path) if path.is_file() else None


def list_layouts(source: str | os.PathLike) -> tuple[list[Layout], Path | None]:
    """The label maps of a dataset folder (``labels/`` + ``captions.jsonl``), a folder of label maps, or a ``.txt``
    list of label-map files; with the ``labelset.yaml`` found beside them (or None).

    Raises:
        GenerateError: the input does not exist, holds no label maps, or a listed file is missing.
    """
    from ..trainer.data.folder import find_label_set_file

    source = Path(os.fspath(source)).expanduser()
    if not source.exists():
        raise GenerateError(
            f"input {str(source)!r} does not exist; give a dataset folder, a folder of label maps or "
            "a .txt list of label-map files"
        )
    if source.is_file():
        if source.suffix.lower() != ".txt":
            raise GenerateError(f"input {str(source)!r} is a file; a file input is a .txt list of label maps")
        paths = []
        for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip() and not line.lstrip().startswith("#"):
                path = (source.parent / line.strip()).expanduser()
                if not path.is_file():
                    raise GenerateError(f"{str(source)!r} line {number}: label map {str(path)!r} does not exist")
                paths.append(path)
        stems = [p.stem for p in paths]
        dupes = sorted({s for s in stems if stems.count(s) > 1})
        if dupes:
            raise GenerateError(f"{str(source)!r} lists label maps with the same stem {dupes[:4]}; ids must differ")
        layouts = sorted((Layout(p.stem, p, None) for p in paths), key=lambda x: x.stem)
        label_set_file = find_label_set_file(source.parent)
    else:
        folder = source / "labels" if (source / "labels").is_dir() else source
        paths = sorted(
            p
            for p in folder.iterdir()
            if p.is_file() and p.suffix.lower() in LABEL_SUFFIXES and not p.name.startswith(".")
        )
        table = _caption_table(source)
        layouts = []
        for p in paths:
            found = None if table is None else table.lookup([p.stem, p.name, f"{p.stem}.png"])
            caption = domain = None
            if found is not None:
                captions, meta = found
                caption = captions if isinstance(captions, str) else captions[0]
                domain = meta.get("domain") if isinstance(meta.get("domain"), str) else None
            if caption is None:
                for txt in (source / "captions" / f"{p.stem}.txt", source / "images" / f"{p.stem}.txt"):
                    if txt.is_file():
                        caption = txt.read_text(encoding="utf-8").strip() or None
                        break
            layouts.append(Layout(p.stem, p, caption, domain))
        stems = [x.stem for x in layouts]
        dupes = sorted({s for s in stems if stems.count(s) > 1})
        if dupes:
            raise GenerateError(f"{str(folder)!r} has label maps with the same stem {dupes[:4]} (.png and .npy?)")
        label_set_file = find_label_set_file(source)
    if not layouts:
        raise GenerateError(f"input {str(source)!r} holds no label maps ({'/'.join(LABEL_SUFFIXES)} files)")
    return layouts, label_set_file


def domain_templates(domains: Sequence[str]) -> dict[str, str]:
    """Bare domain words -> templates: ``"{caption}, " + DEFAULT_PHRASES.get(word, word)``."""
    out = {}
    for word in domains:
        word = word.strip()
        if not word or "{" in word or "}" in word:
            raise GenerateError(f"domain {word!r} is not a word; put templates in a prompt file (name: template)")
        out[word] = "{caption}, " + DEFAULT_PHRASES.get(word, word)
    return out


def read_prompt_file(path: str | os.PathLike) -> dict[str, str]:
    """A prompt file: one domain per line, ``name: template`` (``{caption}`` and ``{domain}`` are filled in) or a
    bare domain word (see `domain_templates`); ``#`` starts a comment line.

    Raises:
        GenerateError: unreadable file, a repeated name, a template with other fields than caption/domain, or no line.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise GenerateError(f"cannot read prompt file {str(path)!r}: {e}") from None
    out: dict[str, str] = {}
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"prompt file {str(path)!r} line {number}"
        if ":" in line:
            name, template = (part.strip() for part in line.split(":", 1))
        else:
            name, template = line, domain_templates([line])[line]
        if not name or not template:
            raise GenerateError(f"{where}: expected 'name: template' or a domain word, got {line!r}")
        if name in out:
            raise GenerateError(f"{where}: domain {name!r} is given twice")
        try:
            template.format(caption="c", domain="d")
        except (KeyError, IndexError, ValueError) as e:
            raise GenerateError(
                f"{where}: template {template!r} is not valid ({e!r}); use {{caption}}, {{domain}}"
            ) from None
        out[name] = template
    if not out:
        raise GenerateError(f"prompt file {str(path)!r} names no domain")
    return out


def _prompt(layout: Layout, caption: str, domain: str | None, template: str | None) -> str:
    if domain is None or template is None:
        return caption
    # A caption that names its own domain (the toy world's captions.jsonl records it) gets that phrase replaced
    # rather than a second, contradicting one appended.
    from ..core.toy.captions import DOMAIN_PHRASES

    if layout.domain in DOMAIN_PHRASES and template == "{caption}, " + DEFAULT_PHRASES.get(domain, domain):
        for phrase in DOMAIN_PHRASES[layout.domain]:
            if f" {phrase}" in caption:
                return caption.replace(f" {phrase}", f" {DEFAULT_PHRASES.get(domain, domain)}", 1)
    return template.format(caption=caption, domain=domain)


@dataclass(frozen=True)
class WorkItem:
    """One image to generate: item ``index`` of the run, from layout ``source`` with ``prompt`` and ``seed``."""

    index: int
    id: str
    source: str
    label_path: str
    domain: str | None
    sample: int
    prompt: str
    seed: int


def plan_items(
    layouts: Sequence[Layout],
    captions: Sequence[str],
    templates: dict[str, str] | None,
    *,
    samples: int,
    seed: int,
) -> list[WorkItem]:
    """Every item of a run in order (layout, then domain, then sample); item ``i`` gets seed ``seed + i``."""
    domains: list[tuple[str | None, str | None]] = list(templates.items()) if templates else [(None, None)]
    items = []
    for layout, caption in zip(layouts, captions):
        for domain, template in domains:
            prompt = _prompt(layout, caption, domain, template)
            for k in range(samples):
                parts = [layout.stem] + ([domain] if domain is not None else []) + ([str(k)] if samples > 1 else [])
                index = len(items)
                items.append(
                    WorkItem(index, "_".join(parts), layout.stem, str(layout.path), domain, k, prompt, seed + index)
                )
    ids = [i.id for i in items]
    if len(set(ids)) != len(ids):
        raise GenerateError("output ids collide (a stem ending in a domain name?); rename the label maps")
    return items


# ---------------------------------------------------------------------------------------------------- settings
@dataclass
class GenerateSettings:
    """Sampling and run settings recorded in the manifest (all but ``device`` define the run)."""

    steps: int = 25
    scheduler: str = "ddim"
    guidance_scale: float = 7.5
    layout_guidance_scale: float = 1.0
    controlnet_conditioning_scale: float = 1.0
    negative_prompt: str = ""
    eta: float = 0.0
    seed: int = 0
    samples: int = 1
    chunk_size: int = 4
    domains: dict[str, str] = field(default_factory=dict)
    device: str = "cpu"
    #: Layout filter (module docstring): images whose segmenter mIoU is under this are flagged or dropped.
    filter_miou: float | None = None
    filter_action: str = "flag"


#: The filter's settings; left out of the run key while at their defaults, so runs without a filter keep their key.
_FILTER_DEFAULTS = {"filter_miou": None, "filter_action": "flag"}
FILTER_ACTIONS = ("flag", "drop")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_BUFFER):
            digest.update(chunk)
    return digest.hexdigest()


def model_file_records(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """``{"path", "sha256"}`` per file; a folder gives ``{"path", "files": {relative path: sha256}}`` over its
    model files (a diffusers base: ``model_index.json`` and the component subfolders only)."""
    from ..trainer.models import COMPONENT_SUBFOLDERS

    records = []
    for path in paths:
        path = Path(path).resolve()
        if path.is_file():
            records.append({"path": str(path), "sha256": _sha256(path)})
            continue
        if (path / "model_index.json").is_file():
            files = [path / "model_index.json"] + sorted(
                f
                for sub in COMPONENT_SUBFOLDERS
                if (path / sub).is_dir()
                for f in (path / sub).rglob("*")
                if f.is_file()
            )
        else:
            files = sorted(f for f in path.rglob("*") if f.is_file())
        records.append({"path": str(path), "files": {str(f.relative_to(path)): _sha256(f) for f in files}})
    return records


def _run_key(
    settings: GenerateSettings,
    models: list[dict],
    label_set: LabelSet,
    items: list[WorkItem],
    segmenter: dict | None = None,
) -> str:
    defining = {
        k: v
        for k, v in asdict(settings).items()
        if k != "device" and not (k in _FILTER_DEFAULTS and v == _FILTER_DEFAULTS[k])
    }
    hashes = [m.get("sha256") or m.get("files") for m in models]  # not the paths: a moved copy is the same run
    parts: list[Any] = [defining, hashes, label_set.fingerprint(), [asdict(i) | {"label_path": None} for i in items]]
    if segmenter is not None:  # appended only when scoring, so runs without a segmenter keep their key
        parts.append(segmenter.get("sha256") or segmenter.get("files"))
    payload = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def check_output_folder(out: Path, run_key: str, *, overwrite: bool) -> bool:
    """Refuse ``out`` when it holds another run's output (or other data) unless ``overwrite``, which deletes the
    earlier run's files (`OUTPUT_NAMES`). Returns True when ``out`` holds this same run (a resume).

    Raises:
        FileExistsError: another run's manifest, or data without a manifest, and no ``overwrite``.
    """
    if not out.is_dir():
        return False
    manifest = out / MANIFEST
    present = [n for n in OUTPUT_NAMES if (out / n).exists()]
    if manifest.is_file():
        try:
            earlier = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            earlier = {}
        if isinstance(earlier, dict) and earlier.get("tool") == "l2i-generate" and earlier.get("run_key") == run_key:
            return True
        what = f"another run's manifest ({MANIFEST}, run key {earlier.get('run_key') if isinstance(earlier, dict) else '?'})"
    elif present:
        what = f"data that no l2i-generate run wrote ({', '.join(present)})"
    else:
        return False
    if not overwrite:
        raise FileExistsError(
            f"--out {str(out)!r} already holds {what}, and this run has other settings, models or inputs (run key "
            f"{run_key}); rerun with the earlier settings to resume it, pass --overwrite to replace it, or choose "
            "another --out"
        )
    for name in present:
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    logger.warning("--overwrite: deleted the earlier output in %s (%s)", out, ", ".join(present))
    return False


def precheck_output_folder(out: str | os.PathLike, settings: GenerateSettings, *, overwrite: bool) -> None:
    """Refuse at once (before any model is loaded) an ``out`` whose l2i-generate manifest has other settings; the
    full check (`check_output_folder`: models, inputs) runs in `generate_dataset`."""
    manifest = Path(os.fspath(out)).expanduser() / MANIFEST
    if overwrite or not manifest.is_file():
        return
    try:
        earlier = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return
    if not isinstance(earlier, dict) or not isinstance(earlier.get("settings"), dict):
        return
    requested = {k: v for k, v in json.loads(json.dumps(asdict(settings))).items() if k != "device"}
    # a manifest from before the filter existed has no filter keys: they were at their defaults
    saved = {k: v for k, v in (_FILTER_DEFAULTS | earlier["settings"]).items() if k != "device"}
    changed = sorted(k for k in requested.keys() | saved.keys() if requested.get(k) != saved.get(k))
    if changed:
        raise FileExistsError(
            f"--out {str(manifest.parent)!r} already holds another run's manifest (settings differ: "
            f"{', '.join(changed)}); rerun with the earlier settings to resume it, pass --overwrite to replace it, or "
            "choose another --out"
        )


# ---------------------------------------------------------------------------------------------------- writing
def _png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _label_png_bytes(ids, label_set: LabelSet) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = save_label_map(Path(tmp) / "labels.png", ids, label_set)
        return path.read_bytes()


def _remove_stale_temps(out: Path) -> None:
    """Delete the temporary files a killed run left (``core.files.atomic_path`` names them ``.<name>.<random>.tmp``
    beside their target); only called on a folder that holds this same run, before any process writes."""
    for folder in (out, out / "images", out / "labels", out / WORK_DIR):
        if folder.is_dir():
            for tmp in folder.glob(".*.tmp"):
                if tmp.is_file():
                    tmp.unlink()


def _chunk_path(out: Path, c: int) -> Path:
    return out / WORK_DIR / f"chunk_{c:06d}.json"


def _chunk_records(out: Path, c: int) -> list[dict[str, Any]] | None:
    """The records of a finished chunk (None when it has none or it cannot be read)."""
    try:
        records = json.loads(_chunk_path(out, c).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return records if isinstance(records, list) and all(isinstance(r, dict) for r in records) else None


def _chunk_done(out: Path, c: int, items: list[WorkItem]) -> bool:
    records = _chunk_records(out, c)
    if records is None or [r.get("file") for r in records] != [f"{i.id}.png" for i in items]:
        return False
    return all(
        r.get("dropped") or ((out / "images" / r["file"]).is_file() and (out / "labels" / r["file"]).is_file())
        for r in records
    )


def _scores(segmenter, images, ids: list, label_set: LabelSet) -> list[float | None]:
    """Per-image layout mIoU of a sampled batch: the segmenter's prediction (`core.segmenters.segment`) against each
    label map, over the classes present in either (`core.metrics`); None when no class is present.

    Args:
        segmenter (`Segmenter`): its classes cover the label set (checked before the run).
        images (`list[PIL.Image]`): RGB samples of one size ``(H, W)``.
        ids (`list[np.ndarray]`): their `(H, W)` int label maps.
    """
    import math

    import numpy as np
    import torch

    from ..core.metrics import confusion_matrix, segmentation_scores
    from ..core.segmenters import segment

    pixels = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)
    pred = segment(
        segmenter.model,
        pixels.float() / 255,
        label_set,
        ids[0].shape,
        segmenter.input_norm,
        where=str(segmenter.folder),
        batch_size=len(images),
    )
    out = []
    for p, target in zip(pred, ids):
        conf = confusion_matrix(
            p, torch.from_numpy(np.asarray(target)).long(), label_set.num_classes, label_set.ignore_index
        )
        miou = segmentation_scores(conf).miou
        out.append(None if math.isnan(miou) else miou)
    return out


def _run_chunk(
    pipe, out: Path, c: int, items: list[WorkItem], settings: GenerateSettings, label_set, bar, segmenter=None
) -> None:
    ids = {}
    for item in items:
        ids[item.index] = read_label_map(item.label_path, label_set).ids
    groups: dict[tuple[int, int], list[WorkItem]] = {}
    for item in items:  # one sampler batch per label-map size, in item order
        groups.setdefault(tuple(ids[item.index].shape), []).append(item)
    records: dict[int, dict[str, Any]] = {}  # item index -> score and filter marks
    for group in groups.values():
        output = pipe(
            [ids[i.index] for i in group],
            [i.prompt for i in group],
            negative_prompt=settings.negative_prompt,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            layout_guidance_scale=settings.layout_guidance_scale,
            controlnet_conditioning_scale=settings.controlnet_conditioning_scale,
            seed=[i.seed for i in group],
            scheduler=settings.scheduler,
            eta=settings.eta,
        )
        if segmenter is not None:
            for item, score in zip(group, _scores(segmenter, output.images, [ids[i.index] for i in group], label_set)):
                under = settings.filter_miou is not None and score is not None and score < settings.filter_miou
                records[item.index] = {"miou": score} | (
                    {"dropped": True}
                    if under and settings.filter_action == "drop"
                    else {"flagged": under}
                    if settings.filter_miou is not None
                    else {}
                )
        for item, image in zip(group, output.images):
            if not records.get(item.index, {}).get("dropped"):
                atomic_write_bytes(out / "images" / f"{item.id}.png", _png_bytes(image))
                atomic_write_bytes(out / "labels" / f"{item.id}.png", _label_png_bytes(ids[item.index], label_set))
            if bar is not None:
                bar.update(1)
    atomic_write_text(_chunk_path(out, c), json.dumps([_record(i) | records.get(i.index, {}) for i in items]) + "\n")


def _record(item: WorkItem) -> dict[str, Any]:
    return {
        "file": f"{item.id}.png",
        "caption": item.prompt,
        "domain": item.domain,
        "source": item.source,
        "sample": item.sample,
        "seed": item.seed,
    }


@dataclass
class GenerateResult:
    """What `generate_dataset` did: images written by this process, skipped as already done, seconds, complete."""

    out: Path
    written: int
    skipped: int
    seconds: float
    complete: bool
    #: With the layout filter, over the whole run once complete: images under the threshold dropped / flagged.
    dropped: int = 0
    flagged: int = 0

    @property
    def images_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


def generate_dataset(
    pipe,
    source: str | os.PathLike,
    out: str | os.PathLike,
    settings: GenerateSettings,
    *,
    overwrite: bool = False,
    limit: int | None = None,
    process_index: int = 0,
    num_processes: int = 1,
    barrier=None,
    progress: bool = False,
    segmenter=None,
) -> GenerateResult:
    """Generate a dataset (module docstring) from the label maps in ``source`` with ``pipe`` into ``out``.

    Args:
        pipe (`LayoutPipeline`): the model.
        source: a dataset folder, a folder of label maps or a ``.txt`` list (`list_layouts`).
        out: the output folder.
        settings (`GenerateSettings`): sampling settings, seed, samples per layout and domain, chunk size, domains.
        overwrite (`bool`): replace another run's output in ``out``.
        limit (`int`, *optional*): only the first ``limit`` layouts (sorted by stem).
        process_index, num_processes (`int`): this process's share of the chunks (``accelerate``'s numbering).
        barrier (*optional*): a callable all processes enter (``PartialState().wait_for_everyone``) after the main
            process has checked ``out`` and before it writes the final files.
        progress (`bool`): a progress bar (images, images/s, ETA) on the main process.
        segmenter (`Segmenter`, `str` or `Path`, *optional*): scores every image (layout mIoU, module docstring);
            needed by ``settings.filter_miou``. A path or ``builtin:toy`` is loaded with `core.segmenters`.

    Raises:
        GenerateError, PipelineError, LabelMapError: bad input (named); FileExistsError: ``out`` holds another run.
    """
    from ..trainer.data.captions import fallback_caption

    if settings.samples < 1 or settings.chunk_size < 1 or settings.steps < 1:
        raise GenerateError("samples, chunk_size and steps must be at least 1")
    if settings.filter_action not in FILTER_ACTIONS:
        raise GenerateError(f"filter action {settings.filter_action!r} is not one of {', '.join(FILTER_ACTIONS)}")
    if settings.filter_miou is not None:
        if not 0.0 <= float(settings.filter_miou) <= 1.0:
            raise GenerateError(f"the mIoU filter threshold must be in [0, 1], got {settings.filter_miou}")
        if segmenter is None:
            raise GenerateError("the mIoU filter needs a segmenter (--segmenter builtin:toy or a folder)")
    if isinstance(segmenter, (str, os.PathLike)):
        from ..core.segmenters import load_segmenter

        segmenter = load_segmenter(segmenter, what="--segmenter")
    out = Path(os.fspath(out)).expanduser()
    layouts, label_set_file = list_layouts(source)
    if limit is not None:
        layouts = layouts[: int(limit)]
    label_set = pipe.label_set
    if label_set_file is not None:
        data_set = load_label_set(label_set_file)
        if data_set.fingerprint() != label_set.fingerprint():
            from ..weights.metadata import describe_label_set

            raise GenerateError(
                f"label set mismatch: the input's {str(label_set_file)!r} is {describe_label_set(data_set)}, but the "
                f"adapter reads {describe_label_set(label_set)}; use label maps of the adapter's label set"
            )
    segmenter_record = None
    if segmenter is not None:
        from ..core.segmenters import class_rows

        class_rows(segmenter.model, label_set, str(segmenter.folder))  # a class mismatch fails before any work
        segmenter.model.to(pipe.device if hasattr(pipe, "device") else "cpu")
        segmenter_record = model_file_records([segmenter.folder])[0]
    captions = []
    for layout in layouts:  # every label map is read (and checked) before anything is written
        ids = read_label_map(layout.path, label_set).ids
        captions.append(layout.caption or fallback_caption(ids, label_set))
    items = plan_items(layouts, captions, settings.domains or None, samples=settings.samples, seed=settings.seed)
    models = model_file_records(pipe.model_files)
    run_key = _run_key(settings, models, label_set, items, segmenter_record)
    manifest = {
        "format": MANIFEST_FORMAT,
        "tool": "l2i-generate",
        "run_key": run_key,
        "complete": False,
        "models": models,
        "adapter_kind": pipe.adapter_kind,
        "label_set": label_set.name,
        "label_set_fingerprint": label_set.fingerprint(),
        "source": str(Path(os.fspath(source)).resolve()),
        "settings": asdict(settings),
        "num_images": len(items),
    }
    if segmenter_record is not None:
        manifest["segmenter"] = segmenter_record
    main = process_index == 0
    if main:
        resuming = check_output_folder(out, run_key, overwrite=overwrite)
        if resuming:
            _remove_stale_temps(out)
        if resuming and json.loads((out / MANIFEST).read_text(encoding="utf-8")).get("complete"):
            logger.info("%s already holds this run, complete (%d images)", out, len(items))
        else:
            (out / "images").mkdir(parents=True, exist_ok=True)
            (out / "labels").mkdir(parents=True, exist_ok=True)
            (out / WORK_DIR).mkdir(exist_ok=True)
            label_set.save(out / "labelset.yaml")
            atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    if barrier is not None:
        barrier()
    if json.loads((out / MANIFEST).read_text(encoding="utf-8")).get("complete"):
        return GenerateResult(out, 0, len(items), 0.0, True)

    size = settings.chunk_size
    chunks = [items[k : k + size] for k in range(0, len(items), size)]
    mine = [c for c in range(len(chunks)) if c % num_processes == process_index]
    todo = [c for c in mine if not _chunk_done(out, c, chunks[c])]
    skipped = sum(len(chunks[c]) for c in mine) - sum(len(chunks[c]) for c in todo)
    if skipped:
        logger.info("resuming %s: %d images already done, %d to go", out, skipped, sum(len(chunks[c]) for c in todo))
    from tqdm.auto import tqdm

    total = sum(len(chunks[c]) for c in todo)
    bar = tqdm(
        total=total, desc=f"generating into {out}", unit="img", dynamic_ncols=True, disable=not (progress and main)
    )
    start = time.perf_counter()
    try:
        for c in todo:
            _run_chunk(pipe, out, c, chunks[c], settings, label_set, bar, segmenter)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    if barrier is not None:
        barrier()
    complete = False
    dropped = flagged = 0
    if main:
        complete = all(_chunk_done(out, c, chunks[c]) for c in range(len(chunks)))
        if complete:
            # the chunk records hold each image's score and filter marks (items alone would lose them on resume)
            records = [r for c in range(len(chunks)) for r in _chunk_records(out, c) or []]
            kept = [r for r in records if not r.get("dropped")]
            dropped, flagged = len(records) - len(kept), sum(bool(r.get("flagged")) for r in kept)
            atomic_write_text(out / "captions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
            manifest["complete"] = True
            if settings.filter_miou is not None:
                manifest["filter"] = {
                    "miou": settings.filter_miou,
                    "action": settings.filter_action,
                    "dropped": dropped,
                    "flagged": flagged,
                }
            manifest["images"] = records
            atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
            shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    return GenerateResult(out, total, skipped, seconds, complete, dropped, flagged)
