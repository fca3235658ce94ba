"""The toy world: procedural street label maps, images rendered from them in four domains, and captions.

A miniature of the real data that runs on a CPU in seconds (see docs/ARCHITECTURE.md, "The toy world"): the
tiny models are trained on it, and the domain words (day, night, snow, fog) change images measurably
(`image_stats`).
"""

from .captions import DOMAIN_PHRASES, make_caption
from .dataset import (
    HELDOUT_START,
    ToyDatasetSummary,
    ToySample,
    check_domains,
    domain_preview,
    iter_samples,
    make_sample,
    stem_for,
    toy_label_set,
    write_dataset,
)
from .render import DOMAINS, ImageStats, image_stats, render_scene
from .scenes import (
    IGNORE_INDEX,
    TOY_CLASSES,
    Material,
    ToyScene,
    make_label_map,
    make_scene,
    sample_rng,
    scene_from_labels,
)

__all__ = [
    "DOMAINS",
    "DOMAIN_PHRASES",
    "HELDOUT_START",
    "IGNORE_INDEX",
    "TOY_CLASSES",
    "ImageStats",
    "Material",
    "ToyDatasetSummary",
    "ToySample",
    "ToyScene",
    "check_domains",
    "domain_preview",
    "image_stats",
    "iter_samples",
    "make_caption",
    "make_label_map",
    "make_sample",
    "make_scene",
    "render_scene",
    "sample_rng",
    "scene_from_labels",
    "stem_for",
    "toy_label_set",
    "write_dataset",
]
