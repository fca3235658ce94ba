"""Label sets: built-ins, validation of custom sets, and (de)serialisation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from layout2image.core.errors import LabelSetError
from layout2image.core.labels import BUILTIN_LABEL_SETS, LabelSet, get_label_set, load_label_set

# Cityscapes label id -> train id, from the dataset's documented table (written out here independently of the
# shipped JSON so the test can catch a wrong file).
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                        26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}  # fmt: skip


@pytest.mark.parametrize(
    "name, count", [("ade20k", 150), ("cityscapes", 19), ("coco_stuff", 171), ("celebamask_hq", 19), ("toy", 7)]
)
def test_builtin_sets_load_with_expected_sizes(name, count):
    ls = get_label_set(name)
    assert name in BUILTIN_LABEL_SETS
    assert ls.num_classes >= count if name == "toy" else ls.num_classes == count
    assert ls.palette.shape == (ls.num_classes, 3) and ls.palette.dtype == np.uint8
    assert ls.ignore_index == 255
    assert len(set(ls.names)) == ls.num_classes


def test_ade20k_facts():
    ade = get_label_set("ade20k")
    assert ade.names[:3] == ("wall", "building", "sky")
    assert ade.palette[0].tolist() == [120, 120, 120]
    assert ade.names[6] == "road" and ade.names[48] == "skyscraper"
    assert ade.shared_colors() == {(140, 140, 140): (6, 48)}
    assert ade.color_table()[(140, 140, 140)] == 6
    lut = ade.remap_lut()
    assert lut[0] == 255 and lut[1] == 0 and lut[150] == 149


def test_cityscapes_remap_matches_documented_table():
    cs = get_label_set("cityscapes")
    lut = cs.remap_lut()
    for raw in range(34):
        assert lut[raw] == CITYSCAPES_TRAIN_IDS.get(raw, 255), f"label id {raw}"
    assert lut[-1] == 255  # license plate (-1)
    assert cs.palette[0].tolist() == [128, 64, 128] and cs.names[-1] == "bicycle"


def test_coco_stuff_remap_is_contiguous_over_used_ids():
    coco = get_label_set("coco_stuff")
    targets = sorted(v for v in coco.remap.values() if v != 255)
    assert targets == list(range(171))
    assert coco.names[0] == "person"


def test_builtin_name_aliases():
    assert get_label_set("ADE20K") is get_label_set("ade20k")
    assert get_label_set("cityscapes-19").name == "cityscapes"
    with pytest.raises(LabelSetError, match="unknown built-in label set 'nope'.*ade20k"):
        get_label_set("nope")


def _custom(**over):
    data = {"name": "mine", "classes": [{"name": "a", "color": [1, 2, 3]}, {"name": "b", "color": "#0a0b0c"}]}
    data.update(over)
    return data


def test_custom_set_round_trips_through_yaml_and_json(tmp_path):
    ls = LabelSet.from_dict(
        _custom(color_aliases=[{"color": [9, 9, 9], "decodes_to": "ignore"}], remap={"5": "b", 6: 0, 7: "ignore"})
    )
    assert ls.palette[1].tolist() == [10, 11, 12]
    assert ls.remap == {5: 1, 6: 0, 7: 255}
    for suffix in (".yaml", ".json"):
        path = ls.save(tmp_path / f"set{suffix}")
        again = load_label_set(path)
        assert again == ls and again.fingerprint() == ls.fingerprint()


@pytest.mark.parametrize(
    "data, message",
    [
        (_custom(classes=[{"name": "a", "color": [1, 2, 3]}, {"name": "a", "color": [4, 5, 6]}]),
         r"class 1 'a' duplicates the name of class 0"),
        (_custom(classes=[{"name": "a", "color": [1, 2, 3]}, {"name": "b", "color": [1, 2, 3]}]),
         r"colour \[1, 2, 3\] is used by classes 0 'a', 1 'b' but has no color_aliases entry"),
        (_custom(remap={"3": 7}), r"remap entry 3 -> 7 is out of range: targets are class ids 0..1 or 'ignore'"),
        (_custom(remap={"3": "zebra"}), r"remap entry 3 names class 'zebra', which is not in 'classes'"),
        (_custom(ignore_index=1), r"ignore_index 1 is a class id"),
        (_custom(classes=[{"name": "a", "color": [1, 2, 300]}]), r"classes\[0\] 'a': colour \[1, 2, 300\] must be"),
        (_custom(classes=[]), r"'classes' must be a non-empty list"),
        (_custom(colour=[1, 2, 3]), r"unknown field\(s\) \['colour'\]"),
        (_custom(color_aliases=[{"color": [1, 2, 3], "decodes_to": "zebra"}]), r"color_aliases\[0\] names class 'zebra'"),
    ],
)  # fmt: skip
def test_invalid_custom_sets_name_the_entry(data, message):
    with pytest.raises(LabelSetError, match=message):
        LabelSet.from_dict(data, source="mine.yaml")


def test_shared_colour_alias_must_point_at_a_sharing_class():
    data = _custom(
        classes=[
            {"name": "a", "color": [1, 2, 3]},
            {"name": "b", "color": [1, 2, 3]},
            {"name": "c", "color": [0, 0, 0]},
        ],
        color_aliases=[{"color": [1, 2, 3], "decodes_to": "c"}],
    )
    with pytest.raises(LabelSetError, match=r"alias decodes to 2, which is not one of them"):
        LabelSet.from_dict(data)


def test_label_set_file_errors(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(LabelSetError, match="is empty"):
        load_label_set(empty)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(LabelSetError, match=r"bad.json' is not valid JSON"):
        load_label_set(bad)
    with pytest.raises(LabelSetError, match="does not exist"):
        load_label_set(tmp_path / "missing.yaml")
    with pytest.raises(LabelSetError, match="use a .yaml, .yml or .json"):
        get_label_set("toy").save(tmp_path / "x.txt")


def test_index_suggests_close_names():
    cs = get_label_set("cityscapes")
    assert cs.index("car") == 13
    with pytest.raises(LabelSetError, match=r"no class 'traffic'.*traffic light"):
        cs.index("traffic")


def test_builtin_json_files_are_plain_schema():
    # Every shipped file must load through the public schema (catches a hand edit that breaks a file).
    import layout2image.core.labels.labelset as mod

    for name in BUILTIN_LABEL_SETS:
        data = json.loads((mod._BUILTIN_DIR / f"{name}.json").read_text())
        assert LabelSet.from_dict(data) == get_label_set(name)
