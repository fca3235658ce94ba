"""Label-map nodes and the pack's node conventions, run through the ComfyUI stand-in (tests/comfy_stub)."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import layout2image
from layout2image.core.errors import LabelMapError, LabelSetError
from layout2image.core.labels import get_label_set, save_label_map

_STUB_FILE = Path(__file__).resolve().parent / "comfy_stub" / "__init__.py"
_spec = importlib.util.spec_from_file_location("l2i_test_comfy_stub", _STUB_FILE)
comfy_stub = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(comfy_stub)

ROOT = Path(layout2image.__file__).resolve().parent
TOY = get_label_set("toy")  # sky, road, sidewalk, grass, building, tree, car, person; ignore 255


@pytest.fixture(scope="module")
def comfy():
    with comfy_stub.installed():
        yield SimpleNamespace(
            nodes=importlib.import_module("layout2image.nodes"),
            labels=importlib.import_module("layout2image.nodes.label_maps"),
            types=importlib.import_module("layout2image.nodes.types"),
        )


def _image(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(rgb, dtype=np.uint8)).float().div(255.0)[None]


def _toy_ids() -> np.ndarray:
    ids = np.zeros((6, 8), dtype=np.int64)  # sky on top
    ids[3:, :] = 1  # road
    ids[3:, 5:] = 6  # a car
    ids[0, 0] = 255  # one ignore pixel
    return ids


# ------------------------------------------------------------------------------------------------ conventions
def test_entrypoint_lists_every_node_with_pack_conventions(comfy):
    extension = asyncio.run(layout2image.comfy_entrypoint())
    nodes = asyncio.run(extension.get_node_list())
    ids = [n.GET_SCHEMA().node_id for n in nodes]
    assert len(ids) == len(set(ids)) and len(ids) >= 8
    assert {"L2ILabelSet", "L2ILoadLabelMap", "L2IApplySPADE", "L2ILayoutAlignment"} <= set(ids)
    for node in nodes:
        schema = node.GET_SCHEMA()
        assert schema.node_id.startswith("L2I"), schema.node_id
        assert schema.category.startswith("layout2image/"), schema.node_id
        assert schema.description.strip(), f"{schema.node_id} has no description"
        assert schema.display_name, schema.node_id
        for inp in schema.inputs:
            assert inp.tooltip and inp.tooltip.strip(), f"{schema.node_id}.{inp.id} has no tooltip"
        for out in schema.outputs:
            assert out.tooltip and out.tooltip.strip(), f"{schema.node_id} output {out.id} has no tooltip"
        # V3 rules: classmethods only, no instance state
        assert isinstance(node.__dict__["execute"], classmethod) and isinstance(
            node.__dict__["define_schema"], classmethod
        )


def test_every_node_module_is_registered(comfy):
    helpers = {"types", "model_files", "control_aldm"}  # shared by / model code of the node modules; no nodes
    modules = {p.stem for p in (ROOT / "nodes").glob("*.py")} - {"__init__"} - helpers
    assert modules <= set(comfy.nodes.NODE_MODULES), modules - set(comfy.nodes.NODE_MODULES)
    for name in helpers:
        assert not hasattr(importlib.import_module(f"{comfy.nodes.__name__}.{name}"), "NODES"), name


def test_label_map_socket_type(comfy):
    types = comfy.types
    assert types.LabelMapType.io_type == "L2I_LABEL_MAP"
    ids = torch.from_numpy(_toy_ids())[None]
    label_map = types.LabelMap(ids, TOY)
    assert label_map.ids.dtype == torch.int64 and label_map.ignore_index == 255
    assert label_map.ids.data_ptr() != ids.data_ptr()  # a private copy: never aliases the caller's tensor
    assert label_map.present_classes() == [0, 1, 6]
    bad = ids.clone()
    bad[0, 1, 2] = 9
    with pytest.raises(LabelMapError, match=r"id 9 .*row 1, col 2"):
        types.LabelMap(bad, TOY)
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        types.LabelMap(ids[0], TOY)


# ------------------------------------------------------------------------------------------------ label sets
def test_label_set_builtin_file_and_names(comfy, tmp_path):
    node = comfy.labels.L2ILabelSet
    assert node.execute(source="cityscapes")[0].num_classes == 19
    yaml_file = tmp_path / "mine.yaml"
    yaml_file.write_text(
        "name: mine\nclasses:\n  - {name: sea, color: [0, 0, 200]}\n  - {name: sand, color: '#c2b280'}\n"
    )
    custom = node.execute(source="custom file", custom_file=str(yaml_file))[0]
    assert custom.names == ("sea", "sand") and custom.palette[1].tolist() == [194, 178, 128]
    named = node.execute(source="class names", class_names="sky #4682b4\nlava\nice, moss")[0]
    assert named.names == ("sky", "lava", "ice", "moss")
    assert named.palette[0].tolist() == [70, 130, 180]
    assert len({tuple(c) for c in named.palette.tolist()}) == 4  # generated colours are distinct
    with pytest.raises(LabelSetError, match="duplicates"):
        node.execute(source="class names", class_names="a\nb\na")
    with pytest.raises(LabelSetError, match="empty"):
        node.execute(source="class names", class_names="  ")
    with pytest.raises(ValueError, match="does not exist"):
        node.execute(source="custom file", custom_file=str(tmp_path / "nope.yaml"))
    with pytest.raises(LabelMapError, match="custom_file"):
        node.execute(source="custom file", custom_file="")


# ------------------------------------------------------------------------------------------------ loading
def test_load_id_png_and_npy(comfy, tmp_path):
    ids = _toy_ids()
    png = save_label_map(tmp_path / "map.png", ids, TOY)
    np.save(tmp_path / "map.npy", ids)
    node = comfy.labels.L2ILoadLabelMap
    for path in (png, tmp_path / "map.npy"):
        label_map, report = node.execute(path=str(path), label_set=TOY).args
        assert label_map.ids.shape == (1, 6, 8)
        np.testing.assert_array_equal(label_map.numpy()[0], ids)
        assert "car" in report and "ignore" in report
    assert node.fingerprint_inputs(path=str(png)) != node.fingerprint_inputs(path=str(tmp_path / "map.npy"))


def test_load_colour_png_snaps_and_reports_unknown_colours(comfy, tmp_path):
    from PIL import Image

    ids = _toy_ids()
    ids[0, 0] = 0
    rgb = TOY.palette[ids].copy()
    rgb[1, 1] = TOY.palette[0] + np.array([3, -2, 4])  # anti-aliased sky
    rgb[5, 0] = [1, 250, 3]  # not in the palette
    Image.fromarray(rgb.astype(np.uint8)).save(tmp_path / "colors.png")
    node = comfy.labels.L2ILoadLabelMap
    with pytest.raises(LabelMapError, match=r"\[1, 250, 3\]"):
        node.execute(path=str(tmp_path / "colors.png"), label_set=TOY, tolerance=10.0)
    label_map, report = node.execute(
        path=str(tmp_path / "colors.png"), label_set=TOY, tolerance=10.0, unknown_to_ignore=True
    ).args
    got = label_map.numpy()[0]
    assert got[1, 1] == 0 and got[5, 0] == 255
    assert "1 snapped" in report and "[1, 250, 3]" in report


def test_label_map_from_image_decodes_ade_palette_without_touching_input(comfy):
    ade = get_label_set("ade20k")
    ids = np.array([[0, 2, 2], [4, 4, 149]])
    image = _image(ade.palette[ids])
    image = torch.cat([image, image.flip(1)])
    before = image.clone()
    label_map, report = comfy.labels.L2ILabelMapFromImage.execute(image=image, label_set=ade).args
    assert torch.equal(image, before)
    np.testing.assert_array_equal(label_map.numpy()[0], ids)
    np.testing.assert_array_equal(label_map.numpy()[1], ids[::-1])
    assert "image 1" in report and "sky" in report


def test_label_map_from_image_unknown_colour_error_names_it(comfy):
    image = _image(np.array([[[70, 130, 180], [9, 9, 9]]]))
    with pytest.raises(LabelMapError, match=r"(?s)\[9, 9, 9\].*tolerance"):
        comfy.labels.L2ILabelMapFromImage.execute(image=image, label_set=TOY)
    label_map, _ = comfy.labels.L2ILabelMapFromImage.execute(image=image, label_set=TOY, unknown_to_ignore=True).args
    assert label_map.numpy().tolist() == [[[0, 255]]]


# ------------------------------------------------------------------------------------------------ masks
def test_label_map_from_masks_paints_in_order(comfy):
    road = torch.zeros(1, 4, 6)
    road[:, 2:] = 1.0
    car = torch.zeros(4, 6)
    car[1:3, 1:3] = 0.9
    before = (road.clone(), car.clone())
    label_map = comfy.labels.L2ILabelMapFromMasks.execute(
        label_set=TOY, base_class="sky", mask_1=road, class_1="road", mask_2=car, class_2="6", class_3="tree"
    )[0]
    expected = np.zeros((4, 6), dtype=np.int64)
    expected[2:] = 1
    expected[1:3, 1:3] = 6
    np.testing.assert_array_equal(label_map.numpy()[0], expected)
    assert torch.equal(road, before[0]) and torch.equal(car, before[1])
    # resized (nearest) to an explicit size; base 'ignore'
    big = comfy.labels.L2ILabelMapFromMasks.execute(label_set=TOY, width=12, height=8, mask_1=road, class_1="road")[0]
    assert big.size == (8, 12) and set(big.present_classes()) == {1} and big.numpy()[0, 0, 0] == 255


def test_label_map_from_masks_batches_and_errors(comfy):
    masks = torch.zeros(3, 2, 2)
    masks[1, 0, 0] = 1.0
    label_map = comfy.labels.L2ILabelMapFromMasks.execute(
        label_set=TOY, base_class="grass", mask_1=masks, class_1="person", mask_2=torch.ones(1, 2, 2) * 0.2,
        class_2="car",
    )[0]  # fmt: skip
    assert label_map.batch_size == 3 and label_map.numpy()[1, 0, 0] == 7 and label_map.numpy()[0, 0, 0] == 3
    node = comfy.labels.L2ILabelMapFromMasks
    with pytest.raises(LabelSetError, match="class_1"):
        node.execute(label_set=TOY, mask_1=masks)
    with pytest.raises(LabelSetError, match=r"no class 'carr'.*did you mean \['car'\]"):
        node.execute(label_set=TOY, mask_1=masks, class_1="carr")
    with pytest.raises(LabelMapError, match="batch"):
        node.execute(label_set=TOY, mask_1=masks, class_1="car", mask_2=torch.ones(2, 2, 2), class_2="sky")
    with pytest.raises(LabelMapError, match="size"):
        node.execute(label_set=TOY)


# ------------------------------------------------------------------------------------------------ preview / resize
def test_preview_colours_and_legend(comfy):
    label_map = comfy.types.LabelMap.from_numpy(_toy_ids(), TOY)
    before = label_map.ids.clone()
    out = comfy.labels.L2IPreviewLabelMap.execute(label_map=label_map)
    image, legend = out.args
    assert image.shape == (1, 6, 8, 3) and image.dtype == torch.float32
    assert torch.allclose(image[0, 5, 0] * 255, torch.tensor(TOY.palette[1], dtype=torch.float32))
    assert torch.equal(image[0, 0, 0], torch.zeros(3))  # ignore is black
    assert legend.ndim == 4 and legend.shape[-1] == 3 and legend.shape[1] >= 3 * 18
    # the map has ignore pixels (drawn black): the legend has one more row (18 px) than the same classes without
    no_ignore = comfy.types.LabelMap.from_numpy(np.where(_toy_ids() == TOY.ignore_index, 0, _toy_ids()), TOY)
    assert no_ignore.present_classes() == label_map.present_classes()
    _, plain_legend = comfy.labels.L2IPreviewLabelMap.execute(label_map=no_ignore).args
    assert legend.shape[1] - plain_legend.shape[1] == 18
    assert len(out.ui.images) == 2  # the colour map and the legend are shown
    assert torch.equal(label_map.ids, before)
    assert comfy.labels.L2IPreviewLabelMap.GET_SCHEMA().is_output_node


def test_resize_nearest_to_size_latent_image_and_crop(comfy):
    node = comfy.labels.L2IResizeLabelMap
    label_map = comfy.types.LabelMap.from_numpy(_toy_ids(), TOY)
    before = label_map.ids.clone()
    up = node.execute(label_map=label_map, width=16, height=12)[0]
    np.testing.assert_array_equal(up.numpy()[0, ::2, ::2], _toy_ids())  # exact 2x: every pixel doubled
    latent = {"samples": torch.zeros(1, 4, 3, 5)}
    assert node.execute(label_map=label_map, target="match latent", latent=latent)[0].size == (24, 40)
    image = torch.zeros(2, 7, 9, 3)
    assert node.execute(label_map=label_map, target="match image", image=image)[0].size == (7, 9)
    square = node.execute(label_map=label_map, width=6, height=6, crop="center")[0]
    np.testing.assert_array_equal(square.numpy()[0], _toy_ids()[:, 1:7])
    assert set(np.unique(node.execute(label_map=label_map, width=5, height=3)[0].numpy())) <= {0, 1, 6, 255}
    assert torch.equal(label_map.ids, before)
    with pytest.raises(LabelMapError, match="no `latent`"):
        node.execute(label_map=label_map, target="match latent")


# ------------------------------------------------------------------------------------------------ real ComfyUI
@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="set COMFYUI_PATH to a ComfyUI checkout to run")
def test_pack_registers_inside_a_real_comfyui(tmp_path):
    """Load the pack the way ComfyUI's loader does, with the real comfy_api, in a fresh interpreter."""
    comfy_root = Path(os.environ["COMFYUI_PATH"]).resolve()
    code = f"""
import asyncio, importlib.util, sys
sys.path.insert(0, {str(comfy_root)!r})
sys.argv = ["main.py", "--cpu"]  # as `python main.py --cpu`: no GPU needed
import comfy.options
comfy.options.enable_args_parsing()
from comfy_api.latest import ComfyExtension, io
path = {str(ROOT)!r}
name = path.replace(".", "_x_")
spec = importlib.util.spec_from_file_location(name, path + "/__init__.py", submodule_search_locations=[path])
module = importlib.util.module_from_spec(spec)
sys.modules[name] = module
spec.loader.exec_module(module)
assert not hasattr(module, "NODE_CLASS_MAPPINGS")
extension = asyncio.run(module.comfy_entrypoint())
assert isinstance(extension, ComfyExtension)
nodes = asyncio.run(extension.get_node_list())
for node in nodes:
    assert issubclass(node, io.ComfyNode)
    info = node.GET_NODE_INFO_V1()
    assert info["name"].startswith("L2I") and info["category"].startswith("layout2image/")
print("registered", len(nodes), ",".join(sorted(n.GET_SCHEMA().node_id for n in nodes)))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=comfy_root, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "registered" in result.stdout and "L2IApplySPADE" in result.stdout
