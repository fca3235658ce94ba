"""Class-name matching between a pretrained segmenter head and our label set, and the documented name tables.

Names match after [`normalize_class_name`] (case, spaces, underscores and hyphens folded). A source name may carry
``;``-separated aliases (ADE20K's ``objectInfo150`` style, ``"person;individual;someone"``); every alias matches.

A *name table* maps a target class name to the source class it is initialised from, or to ``None`` for "no
source class, start from a small random row". Table entries override exact matching. The built-in table
[`CITYSCAPES_FROM_ADE20K`] is applied automatically (``name_map="auto"``) when the target names are the 19
Cityscapes classes and the source names are the 150 ADE20K classes; docs/DISCRIMINATOR.md lists it with reasons.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..labels import get_label_set

__all__ = [
    "CITYSCAPES_FROM_ADE20K",
    "NameMapEntry",
    "builtin_name_map",
    "name_map_dict",
    "normalize_class_name",
    "source_aliases",
]


def normalize_class_name(name: str) -> str:
    """Fold case and separators: ``"Traffic_Light "`` and ``"traffic-light"`` both give ``"traffic light"``."""
    return re.sub(r"\s+", " ", re.sub(r"[_\-]", " ", str(name))).strip().lower()


def source_aliases(name: str) -> tuple[str, ...]:
    """The normalised aliases of one source class name (split on ``;``; empty aliases dropped)."""
    return tuple(a for a in (normalize_class_name(part) for part in str(name).split(";")) if a)


@dataclass(frozen=True)
class NameMapEntry:
    """One row of a name table.

    Args:
        target (`str`): our class name.
        source (`str`, *optional*): the pretrained class it is initialised from; ``None`` = small random row.
        reason (`str`): why, for docs and the remap report.
    """

    target: str
    source: str | None
    reason: str


# Cityscapes (19 train ids) <- ADE20K (150 classes, 0-based as in `get_label_set("ade20k")` and the id2label of
# ADE20K-finetuned SegFormer / UperNet checkpoints). ADE indices are in the reasons for people; matching is by
# name, and tests/test_discriminator.py checks the names resolve to these indices. ALDM's README table had
# errors (aldm.md §12 pitfall 6): 150 is out of range, 128 is 'lake' not 'bicycle', vegetation came from 'palm'
# and train from 'railing'.
CITYSCAPES_FROM_ADE20K: tuple[NameMapEntry, ...] = (
    NameMapEntry("road", "road", "ADE 6, same class"),
    NameMapEntry("sidewalk", "sidewalk", "ADE 11, same class"),
    NameMapEntry("building", "building", "ADE 1, the generic building class (house 25, skyscraper 48 are rarer)"),
    NameMapEntry("wall", "wall", "ADE 0, the only wall class (mostly indoor in ADE, still the closest)"),
    NameMapEntry("fence", "fence", "ADE 32, same class"),
    NameMapEntry("pole", "pole", "ADE 93, same class"),
    NameMapEntry("traffic light", "traffic light", "ADE 136, same class"),
    NameMapEntry("traffic sign", "signboard", "ADE 43 'signboard;sign' covers traffic signs"),
    NameMapEntry("vegetation", "tree", "ADE 4; Cityscapes vegetation is mostly trees and hedges (ALDM used palm 72)"),
    NameMapEntry("terrain", "grass", "ADE 9; Cityscapes terrain is mostly grass and soil verges"),
    NameMapEntry("sky", "sky", "ADE 2, same class"),
    NameMapEntry("person", "person", "ADE 12, same class"),
    NameMapEntry(
        "rider",
        None,
        "no ADE class; copying person (12) would make person and rider logits tie exactly",
    ),
    NameMapEntry("car", "car", "ADE 20, same class"),
    NameMapEntry("truck", "truck", "ADE 83, same class"),
    NameMapEntry("bus", "bus", "ADE 80, same class"),
    NameMapEntry(
        "train",
        None,
        "no ADE class; bus (80) would tie bus and train logits, ALDM's railing (38) is a fence-like structure",
    ),
    NameMapEntry("motorcycle", "minibike", "ADE 116 'minibike;motorbike'"),
    NameMapEntry("bicycle", "bicycle", "ADE 127 (ALDM's README used 128, which is lake)"),
)

# (source label set, target label set) -> table; selected by comparing class names, never by file names.
_BUILTIN_TABLES: dict[tuple[str, str], tuple[NameMapEntry, ...]] = {
    ("ade20k", "cityscapes"): CITYSCAPES_FROM_ADE20K,
}


def name_map_dict(entries: Sequence[NameMapEntry]) -> dict[str, str | None]:
    """A name table as ``{target name: source name or None}`` (the form ``name_map=`` accepts)."""
    return {e.target: e.source for e in entries}


def _same_names(names: Sequence[str], builtin: str) -> bool:
    reference = get_label_set(builtin).names
    if len(names) != len(reference):
        return False
    return all(normalize_class_name(r) in source_aliases(n) for n, r in zip(names, reference))


def builtin_name_map(
    source_names: Sequence[str], target_names: Sequence[str]
) -> tuple[tuple[str, str], tuple[NameMapEntry, ...]] | None:
    """The built-in table for this pair of label sets, found by class names, or ``None`` when there is none.

    Args:
        source_names (`Sequence[str]`): the pretrained head's class names, in row order.
        target_names (`Sequence[str]`): our class names, in id order.

    Returns:
        ``((source set, target set), entries)`` or ``None``.
    """
    for (source, target), entries in _BUILTIN_TABLES.items():
        if _same_names(target_names, target) and _same_names(source_names, source):
            return (source, target), entries
    return None


def check_name_map(name_map: Mapping[str, str | None]) -> dict[str, str | None]:
    """Normalise the keys and values of a user name table, refusing non-string entries."""
    out: dict[str, str | None] = {}
    for target, source in name_map.items():
        if not isinstance(target, str) or not (source is None or isinstance(source, str)):
            raise TypeError(
                f"`name_map` must map class names (str) to a source class name (str) or None, got "
                f"{target!r}: {source!r}."
            )
        out[normalize_class_name(target)] = None if source is None else normalize_class_name(source)
    return out
