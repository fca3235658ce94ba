"""Layout Alignment through the ComfyUI stand-in, with tiny SegFormer folders whose predictions are fixed by hand."""

from __future__ import annotations

import importlib
import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import SegformerForSemanticSegmentation

from layout2image.core.discriminator import tiny_segmenter_config
from layout2image.core.labels import get_label_set

_STUB_FILE = Path(__file__).resolve().parent / "comfy_stub" / "__init__.py"
_spec = importlib.util.spec_from_file_location("l2i_test_comfy_stub", _STUB_FILE)
comfy_stub = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(comfy_stub)

TOY = get_label_set("toy")  # sky, road, sidewalk, grass, building, tree, car, person


@pytest.fixture(scope="module")
def comfy():
    with comfy_stub.installed():
        yield SimpleNamespace(
            alignment=importlib.import_module("layout2image.nodes.alignment"),
            types=importlib.import_module("layout2image.nodes.types"),
        )


def _constant_segmenter(folder: Path, names: list[str], winner: str, runner_up: str | None = None) -> Path:
    """A tiny SegFormer whose logits are constant: ``winner`` everywhere (``runner_up`` second)."""
    config = tiny_segmenter_config("segformer")
    config.id2label = dict(enumerate(names))
    config.label2id = {n: i for i, n in enumerate(names)}
    model = SegformerForSemanticSegmentation(config)
    classifier = model.decode_head.classifier
    with torch.no_grad():
        classifier.weight.zero_()
        classifier.bias.zero_()
        classifier.bias[names.index(winner)] = 5.0
        if runner_up is not None:
            classifier.bias[names.index(runner_up)] = 2.0
    model.save_pretrained(folder)
    return folder


def _label_map(comfy, batch=1):
    ids = torch.zeros(batch, 8, 8, dtype=torch.long)  # sky
    ids[:, 4:] = 1  # road: half the map
    ids[:, 4:, 6:] = 6  # car
    ids[:, 0, 0] = 255  # one ignore pixel
    return comfy.types.LabelMap(ids, TOY)


def test_miou_per_class_table_and_error_map(comfy, tmp_path):
    folder = _constant_segmenter(tmp_path / "seg", list(TOY.names), winner="road")
    label_map = _label_map(comfy)
    image = torch.rand(2, 40, 40, 3)  # two images share the one map; other size than the map
    before = image.clone()
    miou, table, heat = comfy.alignment.L2ILayoutAlignment.execute(
        image=image, label_map=label_map, segmenter_path=str(folder)
    ).args
    assert torch.equal(image, before)
    # road predicted everywhere: IoU(road) = 24 road px / 63 valid px; sky and car (present in the map) 0
    assert miou == pytest.approx((24 / 63) / 3)
    assert "road" in table and "0.381" in table and "person" not in table
    assert heat.shape == (2, 8, 8, 3)
    assert heat[0, 5, 0].tolist() == [0.0, 0.0, 0.0]  # road: right
    assert heat[0, 1, 1].tolist() == [1.0, 0.0, 0.0]  # sky predicted as road: wrong
    assert heat[1, 0, 0].tolist() == [0.5, 0.5, 0.5]  # ignore


def test_segmenter_with_more_classes_matches_by_name(comfy, tmp_path):
    # other order, other spelling, extra classes; the extra 'wall' scores highest but is not a toy class
    names = ["wall", "Car", "Sky", "ROAD", "side_walk", "sidewalk", "grass", "building;edifice", "tree", "person"]
    folder = _constant_segmenter(tmp_path / "ade_like", names, winner="wall", runner_up="Sky")
    label_map = _label_map(comfy)
    miou, table, _ = comfy.alignment.L2ILayoutAlignment.execute(
        image=torch.rand(1, 32, 32, 3), label_map=label_map, segmenter_path=str(folder)
    ).args
    # sky wins among the toy classes: IoU(sky) = 31 sky px / 63 valid px
    assert miou == pytest.approx((31 / 63) / 3)
    assert "sky" in table


def test_errors_name_the_problem(comfy, tmp_path):
    node = comfy.alignment.L2ILayoutAlignment
    folder = _constant_segmenter(tmp_path / "seg", list(TOY.names), winner="road")
    city = comfy.types.LabelMap(torch.zeros(1, 4, 4, dtype=torch.long), get_label_set("cityscapes"))
    with pytest.raises(comfy.alignment.SegmenterError, match=r"no class named \['wall', 'fence'.*'cityscapes'"):
        node.execute(image=torch.rand(1, 4, 4, 3), label_map=city, segmenter_path=str(folder))
    with pytest.raises(comfy.alignment.SegmenterError, match="config.json"):
        node.execute(image=torch.rand(1, 4, 4, 3), label_map=_label_map(comfy), segmenter_path=str(tmp_path))
    with pytest.raises(comfy.alignment.SegmenterError, match="3 image"):
        node.execute(image=torch.rand(3, 4, 4, 3), label_map=_label_map(comfy, 2), segmenter_path=str(folder))


def test_all_ignore_map_gives_zero_not_nan(comfy, tmp_path):
    folder = _constant_segmenter(tmp_path / "seg", list(TOY.names), winner="road")
    empty = comfy.types.LabelMap(torch.full((1, 4, 4), 255, dtype=torch.long), TOY)
    miou, _, _ = comfy.alignment.L2ILayoutAlignment.execute(
        image=torch.rand(1, 32, 32, 3), label_map=empty, segmenter_path=str(folder)
    ).args
    assert miou == 0.0 and not math.isnan(miou)


def test_label_map_from_image_with_the_toy_segmenter(comfy):
    from layout2image.core.toy import HELDOUT_START, make_sample

    samples = [make_sample(HELDOUT_START + i, size=128) for i in range(2)]
    image = torch.stack([torch.from_numpy(s.image).float() / 255 for s in samples])
    (label_map,) = comfy.alignment.L2ISegmentImage.execute(image=image, label_set=TOY).args
    assert isinstance(label_map, comfy.types.LabelMap) and label_map.label_set is TOY
    assert label_map.size == (128, 128) and label_map.batch_size == 2
    target = torch.stack([torch.from_numpy(s.labels) for s in samples])
    valid = target != 255
    # the shipped evaluation segmenter reads held-out real toy images well (pixel accuracy ~0.97 at 128²)
    accuracy = (label_map.ids[valid] == target[valid]).float().mean()
    assert accuracy > 0.9, accuracy


def test_label_map_from_image_names_missing_classes(comfy):
    with pytest.raises(comfy.alignment.SegmenterError, match=r"no class named \['wall', 'fence'"):
        comfy.alignment.L2ISegmentImage.execute(
            image=torch.rand(1, 16, 16, 3), label_set=get_label_set("cityscapes"), segmenter_path="builtin:toy"
        )
