"""The ALDM discriminator: a semantic segmenter with N + 1 outputs (N layout classes + fake), its head
re-initialised from a pretrained segmenter by class name, and the train/eval rules for its normalisation layers.

- [`segmenter`]: [`SegmenterDiscriminator`], [`build_discriminator`], [`tiny_segmenter_config`].
- [`head_remap`]: [`remap_classifier_head`] and its [`HeadRemapReport`].
- [`tables`]: class-name normalisation and the Cityscapes <- ADE20K table.
- [`input_norm`]: [-1, 1] images to the backbone's normalisation.
- [`modes`]: [`generator_mode`], [`update_mode`].
"""

from .errors import DiscriminatorError
from .head_remap import (
    FAKE_CLASS_NAME,
    HeadRemapReport,
    HeadRowSource,
    get_classifier,
    remap_classifier_head,
    source_class_names,
)
from .input_norm import IMAGENET_MEAN, IMAGENET_STD, INPUT_NORMS, InputNorm, resolve_input_norm
from .modes import generator_mode, running_stat_norms, update_mode
from .segmenter import BACKBONES, SAVED_CONFIG_KEY, SegmenterDiscriminator, build_discriminator, tiny_segmenter_config
from .tables import CITYSCAPES_FROM_ADE20K, NameMapEntry, builtin_name_map, name_map_dict, normalize_class_name

__all__ = [
    "BACKBONES",
    "CITYSCAPES_FROM_ADE20K",
    "FAKE_CLASS_NAME",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INPUT_NORMS",
    "SAVED_CONFIG_KEY",
    "DiscriminatorError",
    "HeadRemapReport",
    "HeadRowSource",
    "InputNorm",
    "NameMapEntry",
    "SegmenterDiscriminator",
    "build_discriminator",
    "builtin_name_map",
    "generator_mode",
    "get_classifier",
    "name_map_dict",
    "normalize_class_name",
    "remap_classifier_head",
    "resolve_input_norm",
    "running_stat_norms",
    "source_class_names",
    "tiny_segmenter_config",
    "update_mode",
]
