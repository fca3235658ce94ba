"""Label sets and label maps: names, palettes, ignore ids, remaps; reading, writing, colour decoding, resizing."""

from .colors import ColorDecodeReport, UnknownColor, colorize, decode_colors
from .io import LabelMapRead, load_label_map, read_label_map, save_label_map
from .labelset import BUILTIN_LABEL_SETS, LabelSet, get_label_set, load_label_set
from .ops import edge_map, joint_crop, joint_hflip, random_joint_crop_flip, resize_nearest
from .preview import legend_image, preview_grid
from .validate import check_ids

__all__ = [
    "BUILTIN_LABEL_SETS",
    "ColorDecodeReport",
    "LabelMapRead",
    "LabelSet",
    "UnknownColor",
    "check_ids",
    "colorize",
    "decode_colors",
    "edge_map",
    "get_label_set",
    "joint_crop",
    "joint_hflip",
    "legend_image",
    "load_label_map",
    "load_label_set",
    "preview_grid",
    "random_joint_crop_flip",
    "read_label_map",
    "resize_nearest",
    "save_label_map",
]
