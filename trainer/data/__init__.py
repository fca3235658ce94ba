"""Training data: the folder format, Cityscapes, ADE20K and COCO-Stuff, joint transforms, captions, a cache."""

from .ade20k import ADE20KDataset, list_ade20k
from .base import SampleFiles, SegmentationDataset, collate
from .cache import CacheStats, EncodingCache
from .captions import CaptionTable, class_phrase, fallback_caption, load_captions, pick_caption
from .cityscapes import CityscapesDataset, list_cityscapes
from .coco_stuff import COCOStuffDataset, list_coco_stuff
from .errors import DatasetError
from .factory import DEFAULT_SPLITS, FORMATS, DataConfig, build_dataset
from .folder import FolderDataset, list_folder
from .transforms import TransformConfig, TransformPlan, default_transform

__all__ = [
    "DEFAULT_SPLITS",
    "FORMATS",
    "ADE20KDataset",
    "COCOStuffDataset",
    "CacheStats",
    "CaptionTable",
    "CityscapesDataset",
    "DataConfig",
    "DatasetError",
    "EncodingCache",
    "FolderDataset",
    "SampleFiles",
    "SegmentationDataset",
    "TransformConfig",
    "TransformPlan",
    "build_dataset",
    "class_phrase",
    "collate",
    "default_transform",
    "fallback_caption",
    "list_ade20k",
    "list_cityscapes",
    "list_coco_stuff",
    "list_folder",
    "load_captions",
    "pick_caption",
]
