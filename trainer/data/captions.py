"""Captions: loading them from caption files, and building one from the classes present when a sample has none.

Caption files:

- ``captions.jsonl`` (the folder format and the toy world): one JSON object per line,
  ``{"file": "<stem>.png", "caption": "...", ...}``; ``file_name``/``image``/``stem`` may stand for ``file`` and
  ``text`` for ``caption``; any other keys (e.g. ``"domain"``) are kept as the sample's ``meta``.
- a ``.json`` dict from image stem (or file name) to caption, as ALDM ships for Cityscapes and ADE20K
  (``dataloader/{cityscapes,ade20k}_caption_{train,val}.json``), or to a list of captions (ALDM's COCO file,
  five COCO captions per image).
- one ``<stem>.txt`` per image (read when the sample is read).

Where an image has several captions, the dataset picks one per epoch, deterministically (`pick_caption`). A
blank caption counts as missing, so a sample whose ``.txt`` file is empty gets the fallback caption.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...core.labels import LabelSet
from .errors import DatasetError

__all__ = ["CaptionTable", "class_phrase", "fallback_caption", "load_captions", "pick_caption"]

_FILE_KEYS = ("file", "file_name", "image", "stem")
_CAPTION_KEYS = ("caption", "text")


def class_phrase(name: str) -> str:
    """A class name as words: underscores and hyphens become spaces and COCO's ``-other`` suffix is dropped.

    ``"traffic_light"`` -> ``"traffic light"``, ``"wall-other"`` -> ``"wall"``, ``"window-blind"`` -> ``"window blind"``.
    """
    text = name.strip()
    if text.endswith("-other"):
        text = text[: -len("-other")]
    return " ".join(text.replace("_", " ").replace("-", " ").split())


Captions = str | tuple[str, ...]


def _clean(value: Any, where: str) -> Captions | None:
    """A caption or a list of captions, stripped; None when blank. Raises `DatasetError` for other types."""
    if value is None:
        return None
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, str) for v in value):
            raise DatasetError(f"{where}: a list of captions must hold only strings, got {value!r}")
        kept = tuple(v.strip() for v in value if v.strip())
        return kept or None
    raise DatasetError(f"{where}: the caption must be a string or a list of strings, got {type(value).__name__}")


def pick_caption(captions: Captions, seed: int, epoch: int, index: int) -> str:
    """One caption of several, chosen by ``(seed, epoch, index)`` (a stream apart from the crop and flip draws)."""
    if isinstance(captions, str):
        return captions
    if len(captions) == 1:
        return captions[0]
    rng = np.random.default_rng([int(seed), int(epoch), int(index), 1])
    return captions[int(rng.integers(len(captions)))]


def _join_words(words: Sequence[str]) -> str:
    if len(words) <= 2:
        return " and ".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


def fallback_caption(
    labels: np.ndarray,
    label_set: LabelSet,
    max_names: int = 4,
    prefix: str = "a photo with",
    min_fraction: float = 0.0,
    empty: str = "a photo",
) -> str:
    """A caption built from the classes present in a label map, largest first.

    Args:
        labels (`np.ndarray` or `torch.Tensor`): `(H, W)` int class ids with the ignore id (ignored here).
        label_set (`LabelSet`): the class names.
        max_names (`int`, defaults to 4): at most this many class names.
        prefix (`str`, defaults to ``"a photo with"``): the words before the list.
        min_fraction (`float`, defaults to 0.0): skip classes covering less than this share of the labelled
            pixels (the largest class is always named).
        empty (`str`, defaults to ``"a photo"``): the caption when no pixel is labelled.

    Returns:
        `str`, e.g. ``"a photo with road, car, building and sky"``; ``empty`` when no pixel is labelled.

    Ties in pixel count are broken by class id, so the caption is a pure function of the label map.
    """
    if max_names < 1:
        raise ValueError(f"max_names={max_names} must be at least 1")
    ids = np.asarray(labels).reshape(-1)
    ids = ids[(ids >= 0) & (ids < label_set.num_classes)]
    if ids.size == 0:
        return empty
    counts = np.bincount(ids, minlength=label_set.num_classes)
    order = sorted(np.flatnonzero(counts).tolist(), key=lambda i: (-int(counts[i]), i))
    names: list[str] = []
    for i in order:
        if counts[i] < min_fraction * ids.size:
            break
        phrase = class_phrase(label_set.names[i])
        if phrase and phrase not in names:
            names.append(phrase)
        if len(names) == max_names:
            break
    if not names:  # every class is below min_fraction: name the largest anyway
        names = [class_phrase(label_set.names[order[0]])]
    return f"{prefix} {_join_words(names)}".strip()


@dataclass
class CaptionTable:
    """Captions (and extra fields) by image stem, from a caption file.

    Args:
        captions (`dict[str, str | tuple[str, ...]]`): stem (or file name) -> caption, or several captions.
        meta (`dict[str, dict]`): stem -> the entry's other fields (JSON values), e.g. ``{"domain": "night"}``.
        source (`str`): the file they came from, for messages.
    """

    captions: dict[str, Captions] = field(default_factory=dict)
    meta: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = "<captions>"

    def __len__(self) -> int:
        return len(self.captions)

    def lookup(self, keys: Iterable[str]) -> tuple[Captions, dict[str, Any]] | None:
        """The first caption(s) found under any of ``keys`` (e.g. stem, file name), with its extra fields."""
        for key in keys:
            if key in self.captions:
                return self.captions[key], self.meta.get(key, {})
        return None

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike) -> CaptionTable:
        """Read a ``captions.jsonl`` file; errors name the file and the line."""
        path = Path(path)
        table = cls(source=str(path))
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DatasetError(f"cannot read caption file {str(path)!r}: {e}") from None
        seen_line: dict[str, int] = {}
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{str(path)!r} line {number}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{where} is not valid JSON: {e}") from None
            if not isinstance(entry, dict):
                raise DatasetError(f'{where} must be a JSON object like {{"file": ..., "caption": ...}}')
            file_key = next((k for k in _FILE_KEYS if k in entry), None)
            caption_key = next((k for k in _CAPTION_KEYS if k in entry), None)
            if file_key is None or caption_key is None:
                raise DatasetError(
                    f"{where} needs a file key (one of {list(_FILE_KEYS)}) and a caption key (one of "
                    f"{list(_CAPTION_KEYS)}); it has {sorted(entry)}"
                )
            caption = _clean(entry[caption_key], where)
            stem = Path(str(entry[file_key])).stem
            if stem in seen_line:
                raise DatasetError(
                    f"{where} repeats the entry for {entry[file_key]!r} (first on line {seen_line[stem]}); "
                    "keep one caption per image"
                )
            seen_line[stem] = number
            if caption is not None:
                table.captions[stem] = caption
            extra = {k: v for k, v in entry.items() if k not in (file_key, caption_key)}
            if extra:
                table.meta[stem] = extra
        return table

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> CaptionTable:
        """Read a JSON dict from image stem or file name to a caption or a list of them (ALDM's caption files)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise DatasetError(f"cannot read caption file {str(path)!r}: {e}") from None
        except json.JSONDecodeError as e:
            raise DatasetError(f"caption file {str(path)!r} is not valid JSON: {e}") from None
        if not isinstance(data, Mapping):
            raise DatasetError(
                f"caption file {str(path)!r} must be a JSON object from image stem to caption, got "
                f"{type(data).__name__}; for one object per line use a .jsonl file"
            )
        table = cls(source=str(path))
        for key, value in data.items():
            caption = _clean(value, f"caption file {str(path)!r}, entry {key!r}")
            if caption is not None:
                table.captions[str(key)] = caption
        return table

    def unused(self, used: Iterable[str]) -> list[str]:
        """Keys of this table that are not in ``used`` (entries for images that are not in the dataset)."""
        used = set(used)
        return sorted(k for k in set(self.captions) | set(self.meta) if k not in used)


def load_captions(path: str | os.PathLike) -> CaptionTable:
    """Load a ``.jsonl`` (one object per line) or ``.json`` (stem -> caption) caption file."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"caption file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return CaptionTable.from_jsonl(path)
    if suffix == ".json":
        return CaptionTable.from_json(path)
    else:
        raise DatasetError(
            f"caption file {str(path)!r} has extension {suffix!r}; use .jsonl (one object per line) or .json "
            "(a dict from image stem to caption)"
        )


def read_caption_file(path: Path) -> str | None:
    """The caption in a ``<stem>.txt`` file, or None when it is blank."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read caption file {str(path)!r}: {e}") from None
    return text or None
