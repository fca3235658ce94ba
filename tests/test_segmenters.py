"""core.segmenters: the shipped toy segmenter, class matching by name, load errors, pooled encoder features."""

from __future__ import annotations

import pytest
import torch
from transformers import SegformerForSemanticSegmentation

from layout2image.core.discriminator import tiny_segmenter_config
from layout2image.core.labels import get_label_set
from layout2image.core.segmenters import (
    SegmenterError,
    SegmenterFeatures,
    class_rows,
    load_segmenter,
    pooled_features,
    resolve_segmenter_folder,
)

TOY = get_label_set("toy")


def test_builtin_toy_segmenter_loads_with_its_classes_and_processor():
    seg = load_segmenter("builtin:toy")
    assert seg.class_names == tuple(TOY.names)
    assert class_rows(seg, TOY) == list(range(TOY.num_classes))
    assert seg.size == (128, 128)
    assert seg.input_norm.mean == pytest.approx((0.485, 0.456, 0.406))
    assert not seg.model.training
    assert all(not p.requires_grad for p in seg.model.parameters())
    assert load_segmenter("builtin:toy").model is seg.model  # cached


def test_classes_matched_by_name_not_position():
    # another order, other spelling, aliases and extra classes
    names = ["wall", "Car", "Sky", "ROAD", "traffic_light", "grass", "building;edifice", "tree", "person", "Sidewalk"]
    assert class_rows(names, TOY) == [2, 3, 9, 5, 6, 7, 1, 8]


def test_unmatched_classes_are_named():
    with pytest.raises(SegmenterError) as err:
        class_rows(["sky", "road", "grass", "tree"], TOY, where="seg/")
    message = str(err.value)
    assert "no class named ['sidewalk', 'building', 'car', 'person']" in message
    assert "'toy'" in message and "['sky', 'road', 'grass', 'tree']" in message and "seg/" in message


def test_load_errors_name_the_input(tmp_path):
    with pytest.raises(SegmenterError, match="`--segmenter` is empty"):
        load_segmenter("  ", what="--segmenter")
    with pytest.raises(SegmenterError, match=r"'builtin:sd15' is not known; built-in segmenters: \['builtin:toy'\]"):
        resolve_segmenter_folder("builtin:sd15")
    with pytest.raises(SegmenterError, match="has no config.json"):
        load_segmenter(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "segformer"}')
    with pytest.raises(SegmenterError, match="not a loadable transformers segmentation model folder"):
        load_segmenter(tmp_path)


def test_pooled_features_and_the_torchmetrics_wrapper(tmp_path):
    config = tiny_segmenter_config("segformer")
    config.id2label = dict(enumerate(TOY.names))
    config.label2id = {n: i for i, n in enumerate(TOY.names)}
    torch.manual_seed(0)
    SegformerForSemanticSegmentation(config).save_pretrained(tmp_path)
    seg = load_segmenter(tmp_path)
    images = torch.rand(3, 3, 32, 32)
    feats = pooled_features(seg.model, images, seg.input_norm)
    assert feats.shape == (3, sum(config.hidden_sizes)) and feats.dtype == torch.float32
    wrapper = SegmenterFeatures(seg, (32, 32))
    assert wrapper.num_features == sum(config.hidden_sizes)
    # uint8 input is read as 0..255; a float image is the same image
    as_bytes = (images * 255).round().to(torch.uint8)
    torch.testing.assert_close(wrapper(as_bytes), wrapper(as_bytes.float() / 255))
    # another size is resized first
    assert wrapper(torch.rand(2, 3, 48, 40)).shape == (2, wrapper.num_features)
