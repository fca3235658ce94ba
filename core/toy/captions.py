"""Captions of toy scenes: a place, the domain word verbatim, and the objects that are visible.

Examples: ``"a city street at night with two cars, a tree and a person"``,
``"an urban road with a car and grass, in thick fog"``. The domain word (day, night, snow, fog) always appears
as a whole word, so a text encoder can tie it to the rendering change it causes.
"""

from __future__ import annotations

import numpy as np

from ..logging import get_logger
from .render import DOMAINS
from .scenes import CAR, GRASS, PERSON, TREE, ToyScene

logger = get_logger(__name__)

#: Phrases per domain; each contains the domain word as a whole word.
DOMAIN_PHRASES = {
    "day": ("on a sunny day", "during the day", "on a clear day", "in the middle of the day"),
    "night": ("at night", "late at night", "on a dark night", "in the night"),
    "snow": ("in snow", "covered in snow", "in heavy snow", "under fresh snow"),
    "fog": ("in fog", "in thick fog", "in dense fog", "shrouded in fog"),
}
_PLACES = ("a street", "a city street", "an urban road", "a town street", "a road between buildings")
_NUMBERS = {1: "a", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
# (object kind, singular, plural)
_NOUNS = (
    ("car", "car", "cars"),
    ("tree", "tree", "trees"),
    ("person", "person", "people"),
    ("pole", "street lamp", "street lamps"),
)


def _count_phrase(count: int, singular: str, plural: str) -> str:
    if count <= 0:
        raise ValueError(f"count must be positive, got {count}")
    if count == 1:
        return f"a {singular}"
    return f"{_NUMBERS.get(count, 'many')} {plural}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def make_caption(scene: ToyScene, domain: str, rng: np.random.Generator) -> str:
    """Describe a toy scene in one domain.

    Args:
        scene (`ToyScene`): the scene; its `objects` counts name the visible cars, trees, people and lamps. A
            scene rebuilt from a bare label map (no counts) names the classes present, in the plural.
        domain (`str`): one of `DOMAINS`; appears verbatim in the caption.
        rng (`np.random.Generator`): picks the wording and the order of the objects.

    Returns:
        `str` caption, lower case, no final full stop.
    """
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {', '.join(DOMAINS)}, got {domain!r}")
    place = _PLACES[rng.integers(len(_PLACES))]
    phrase = DOMAIN_PHRASES[domain][rng.integers(len(DOMAIN_PHRASES[domain]))]
    template = rng.integers(2)
    labels = scene.labels
    items: list[str] = []
    if scene.objects:
        for kind, singular, plural in _NOUNS:
            if scene.objects.get(kind, 0) > 0:
                items.append(_count_phrase(scene.objects[kind], singular, plural))
    else:
        for class_id, plural in ((CAR, "cars"), (TREE, "trees"), (PERSON, "people")):
            if (labels == class_id).any():
                items.append(plural)
    if (labels == GRASS).mean() >= 0.03:
        items.append("grass")
    order = rng.permutation(len(items)) if items else []
    items = [items[i] for i in order]
    if not items:
        return f"{place} {phrase}"
    if template == 0:
        return f"{place} {phrase} with {_join(items)}"
    return f"{place} with {_join(items)}, {phrase}"
