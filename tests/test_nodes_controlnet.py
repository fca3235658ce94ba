"""Layout ControlNet nodes through the ComfyUI stand-in (tests/comfy_stub): the loader's routes by key signature,
the hint ComfyUI's ``get_control`` builds from a label map (ALDM: the class-embedding lookup at latent x 2), label
set checks, untouched inputs, CLIP-built tables; and, with ``COMFYUI_PATH``, the real ComfyUI giving the residuals
of our diffusers models."""

from __future__ import annotations

import copy
import importlib
import importlib.util
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

import layout2image
from layout2image.core.controlnet import ALDMConditioningEmbedding, build_controlnet
from layout2image.core.hints import build_class_embedding_table, class_embedding_hint, one_hot, palette_rgb
from layout2image.core.labels import LabelSet, get_label_set
from layout2image.testing import assert_close_for_dtype, tiny_unet_config
from layout2image.weights import (
    KNOWN_FORMATS,
    UnknownFormatError,
    WeightsMetadata,
    convert_controlnet_state_dict,
    import_aldm_checkpoint,
    save_class_embedding_table,
    save_controlnet,
    table_fingerprint,
    table_path_for,
)

_STUB_FILE = Path(__file__).resolve().parent / "comfy_stub" / "__init__.py"
_spec = importlib.util.spec_from_file_location("l2i_test_comfy_stub", _STUB_FILE)
comfy_stub = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(comfy_stub)

ROOT = Path(layout2image.__file__).resolve().parent
TOY = get_label_set("toy")  # 8 classes, ignore 255
N = TOY.num_classes
EMBED = 16
# SD conventions ComfyUI's cldm hard-codes: 32 GroupNorm groups; standard hint widths 16/32/96/256.
TINY_UNET = tiny_unet_config(norm_num_groups=32)
VARIANTS = {
    "rgb": dict(hint="rgb"),
    "onehot": dict(hint="onehot", num_classes=N),
    "aldm": dict(hint="embedding", embedding_dim=EMBED, hint_block_out_channels=(16, 16, 8, 8)),
}
ENCODING = {"rgb": "rgb", "onehot": "onehot", "aldm": "embedding"}


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET)
    out = {v: _randomise(build_controlnet(unet, **kw), i) for i, (v, kw) in enumerate(VARIANTS.items())}
    out["table"] = torch.randn(N + 1, EMBED, generator=torch.Generator().manual_seed(5))
    return out


def _save(models, variant: str, folder: Path, layout: str = "ldm", metadata: bool = True) -> Path:
    """Write a variant as our exports do (metadata, table companion) or as a third-party file (no metadata)."""
    model = models[variant]
    path = folder / f"{variant}_{layout}{'' if metadata else '_plain'}.safetensors"
    if not metadata:
        sd = convert_controlnet_state_dict(model.state_dict(), "ldm", config=dict(model.config)).state_dict
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        return path
    md = WeightsMetadata(kind="controlnet", hint_encoding=ENCODING[variant], label_set=TOY, base_model="toy/base")
    if variant == "aldm":
        table = models["table"]
        save_class_embedding_table(table_path_for(path), table, TOY, base_model="toy/base")
        md = md.with_extra(table_file=table_path_for(path).name, table_fingerprint=table_fingerprint(table))
    save_controlnet(model, path, to="diffusers" if layout == "diffusers" else "ldm", metadata=md)
    return path


@pytest.fixture(scope="module")
def comfy():
    with comfy_stub.installed():
        yield SimpleNamespace(
            nodes=importlib.import_module("layout2image.nodes"),
            cn=importlib.import_module("layout2image.nodes.controlnet"),
            aldm=importlib.import_module("layout2image.nodes.control_aldm"),
            io=importlib.import_module("comfy_api.latest").io,
            types=importlib.import_module("layout2image.nodes.types"),
            controlnet=importlib.import_module("comfy.controlnet"),
            cldm=importlib.import_module("comfy.cldm.cldm"),
            folder_paths=importlib.import_module("folder_paths"),
        )


@pytest.fixture
def files(models, tmp_path):
    return {v: _save(models, v, tmp_path) for v in VARIANTS}


def _ids(h: int, w: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, N, (batch, h, w), generator=g)
    ids[:, 0, :3] = TOY.ignore_index
    return ids


def _run_control(control, x: torch.Tensor, batched_number: int = 1):
    """ComfyUI's sampling calls on one ControlNet: ``pre_run``, then ``get_control``; returns the hint block's input
    and the residuals."""
    sampling = SimpleNamespace(timestep=lambda t: t, calculate_input=lambda t, x: x)
    control.pre_run(SimpleNamespace(model_sampling=sampling), lambda p: 1000.0 * (1.0 - p))
    seen = []
    block = control.control_model.input_hint_block
    handle = block.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    try:
        context = torch.randn(x.shape[0], 5, TINY_UNET["cross_attention_dim"])
        out = control.get_control(x, torch.full((x.shape[0],), 500.0), {"c_crossattn": context}, batched_number, {})
    finally:
        handle.remove()
        control.cleanup()
    return seen[0], out


def _conditioning():
    g = torch.Generator().manual_seed(3)
    positive = [[torch.randn(1, 5, 32, generator=g), {"pooled_output": torch.randn(1, 32, generator=g)}]]
    negative = [[torch.randn(1, 5, 32, generator=g), {"pooled_output": torch.randn(1, 32, generator=g)}]]
    return positive, negative


def _applied_control(comfy, control, label_map, **kw):
    positive, negative = _conditioning()
    pos, neg = comfy.cn.apply_layout_controlnet(positive, negative, control, label_map, **kw)
    return pos[0][1]["control"]


# ------------------------------------------------------------------------------------------------ loader routes
@pytest.mark.parametrize("layout", ["ldm", "diffusers"])
def test_aldm_file_builds_comfy_controlnet_with_our_hint_block(comfy, models, tmp_path, layout):
    path = _save(models, "aldm", tmp_path, layout)
    comfy.controlnet.CALLS.clear()
    control, hint = comfy.cn.load_layout_controlnet(path)
    assert not comfy.controlnet.CALLS, "ComfyUI's loader cannot hold ALDM's hint block; it must not be asked"
    assert isinstance(control, comfy.controlnet.ControlNet) and isinstance(
        control.control_model, comfy.cldm.ControlNet
    )
    block = control.control_model.input_hint_block
    assert isinstance(block, comfy.cn.ComfyALDMHintBlock) and isinstance(block, ALDMConditioningEmbedding)
    assert control.compression_ratio == 2 and control.upscale_algorithm == "nearest"
    assert hint.encoding == "embedding" and hint.channels == EMBED and hint.label_set == TOY
    assert hint.table_source == "companion file" and torch.equal(hint.table, models["table"])
    ours = models["aldm"].controlnet_cond_embedding.state_dict()
    assert {k: v for k, v in block.state_dict().items()}.keys() == ours.keys()
    assert all(torch.equal(block.state_dict()[k], ours[k]) for k in ours)
    assert getattr(control.control_model, comfy.cn.LAYOUT_HINT_ATTR) is hint
    assert control.control_model.num_heads == 8  # our metadata's heads, not ComfyUI's shape-based guess


@pytest.mark.parametrize("variant", ["rgb", "onehot"])
def test_third_party_standard_file_goes_through_comfyuis_loader(comfy, models, tmp_path, variant):
    path = _save(models, variant, tmp_path, metadata=False)
    comfy.controlnet.CALLS.clear()
    label_set = TOY if variant == "onehot" else None
    control, hint = comfy.cn.load_layout_controlnet(path, label_set=label_set)
    assert len(comfy.controlnet.CALLS) == 1
    assert set(comfy.controlnet.CALLS[0]) == set(
        convert_controlnet_state_dict(models[variant].state_dict(), "ldm", prefix="").state_dict
    )
    assert control.compression_ratio == 8
    assert hint.encoding == ENCODING[variant] and hint.channels == (3 if variant == "rgb" else N)
    assert hint.label_set == label_set


def test_our_standard_file_with_heads_comfyui_would_guess_wrong_is_built_by_us(comfy, files):
    comfy.controlnet.CALLS.clear()
    control, hint = comfy.cn.load_layout_controlnet(files["rgb"])
    assert not comfy.controlnet.CALLS  # the stand-in's detection says 64-wide heads; the file says 8 heads of 4
    assert control.control_model.num_heads == 8 and control.compression_ratio == 8
    assert type(control.control_model.input_hint_block) is comfy.cldm.TimestepEmbedSequential  # stock block kept
    assert hint.encoding == "rgb" and hint.label_set == TOY


def test_heads_translation(comfy):
    cn = comfy.aldm
    config = dict(TINY_UNET, mid_block_type="UNetMidBlock2DCrossAttn")
    assert cn._attention_levels(config) == [(32, 8), (64, 8)]  # level 0 and the mid block
    assert cn._comfy_heads([(32, 8), (64, 8)], "f") == {"num_heads": 8, "num_head_channels": -1}
    assert cn._comfy_heads([(64, 1), (128, 2)], "f") == {"num_heads": -1, "num_head_channels": 64}
    with pytest.raises(cn.ControlNetLoadError, match="cannot represent"):
        cn._comfy_heads([(64, 1), (128, 4)], "f")
    assert cn._effective_heads({"num_heads": -1, "num_head_channels": 64}, 128) == 2


def test_unknown_format_lists_the_known_ones(comfy, tmp_path):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET)
    path = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(path))
    with pytest.raises(UnknownFormatError) as err:
        comfy.cn.load_layout_controlnet(path)
    assert all(fmt.split(":")[0] in str(err.value) for fmt in KNOWN_FORMATS[:2])


def test_standard_hint_block_comfyui_cannot_hold_is_refused(comfy, tmp_path):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET)
    model = _randomise(build_controlnet(unet, hint="rgb", conditioning_embedding_out_channels=(8, 8, 16, 32)), 1)
    path = tmp_path / "narrow.safetensors"
    save_controlnet(model, path, to="ldm", metadata=WeightsMetadata(kind="controlnet", hint_encoding="rgb"))
    with pytest.raises(comfy.cn.ControlNetLoadError, match="16/32/96/256"):
        comfy.cn.load_layout_controlnet(path)


def test_onehot_without_label_set_needs_one(comfy, models, tmp_path):
    path = _save(models, "onehot", tmp_path, metadata=False)
    with pytest.raises(comfy.cn.ControlNetLoadError, match="connect the label_set input"):
        comfy.cn.load_layout_controlnet(path)


# ------------------------------------------------------------------------------------------------ the hint
@pytest.mark.parametrize(
    ("latent", "label"),
    [((8, 8), (64, 64)), ((5, 7), (40, 56)), ((6, 6), (30, 30)), ((8, 8), (48, 64))],
    ids=["image-size", "odd", "smaller-than-image", "other-aspect"],
)
def test_aldm_hint_is_the_table_lookup_of_nearest_resized_ids_at_latent_x2(comfy, files, models, latent, label):
    control, _ = comfy.cn.load_layout_controlnet(files["aldm"])
    ids = _ids(*label)
    c = _applied_control(comfy, control, comfy.types.LabelMap(ids, TOY))
    hint, out = _run_control(c, torch.randn(1, 4, *latent))
    size = (2 * latent[0], 2 * latent[1])
    # ComfyUI's resize: centre crop to the latent's aspect, then nearest (floor) sampling
    h, w = label
    if w / h > size[1] / size[0]:
        x = round((w - w * (size[1] / size[0]) / (w / h)) / 2)
        cropped = ids[:, :, x : w - x]
    elif w / h < size[1] / size[0]:
        y = round((h - h * (w / h) / (size[1] / size[0])) / 2)
        cropped = ids[:, y : h - y]
    else:
        cropped = ids
    resized = F.interpolate(cropped[:, None].float(), size=size, mode="nearest")[:, 0].long()
    expected = class_embedding_hint(resized, models["table"], TOY.ignore_index, stride=1)
    torch.testing.assert_close(hint, expected, rtol=0, atol=0)
    assert hint.shape == (1, EMBED, *size) and len(out["output"]) == 1
    if label == (64, 64):  # an image-sized map: exactly the trainer's hint (ids[::4, ::4])
        torch.testing.assert_close(hint, class_embedding_hint(ids, models["table"], TOY.ignore_index, stride=4))


@pytest.mark.parametrize("variant", ["rgb", "onehot"])
def test_standard_hints_are_palette_or_one_hot_at_latent_x8(comfy, files, variant):
    control, _ = comfy.cn.load_layout_controlnet(files[variant])
    ids = _ids(32, 32)
    c = _applied_control(comfy, control, comfy.types.LabelMap(ids, TOY))
    hint, _ = _run_control(c, torch.randn(1, 4, 2, 2))
    resized = F.interpolate(ids[:, None].float(), size=(16, 16), mode="nearest")[:, 0].long()
    expected = palette_rgb(resized, TOY) if variant == "rgb" else one_hot(resized, N, TOY.ignore_index)
    torch.testing.assert_close(hint, expected, rtol=0, atol=0)


def test_hint_follows_cfg_batching(comfy, files, models):
    control, _ = comfy.cn.load_layout_controlnet(files["aldm"])
    ids = torch.stack([_ids(32, 32, seed=1)[0], _ids(32, 32, seed=2)[0]])
    c = _applied_control(comfy, control, comfy.types.LabelMap(ids, TOY))
    hint, _ = _run_control(c, torch.randn(4, 4, 4, 4), batched_number=2)  # [cond x2, uncond x2]
    one = class_embedding_hint(ids, models["table"], TOY.ignore_index, stride=4)
    torch.testing.assert_close(hint, torch.cat([one, one]), rtol=0, atol=0)
    c = _applied_control(comfy, control, comfy.types.LabelMap(ids[:1], TOY))
    hint, out = _run_control(c, torch.randn(4, 4, 4, 4), batched_number=2)
    assert hint.shape[0] == 1 and out["output"][0].shape[0] == 4  # a batch-1 hint broadcasts


def test_aldm_controlnet_refuses_an_image_hint_from_the_stock_apply_node(comfy, files):
    control, _ = comfy.cn.load_layout_controlnet(files["aldm"])
    c = control.copy().set_cond_hint(torch.rand(1, 3, 32, 32))  # what ControlNetApplyAdvanced does with an IMAGE
    with pytest.raises(comfy.cn.ControlNetLoadError, match="Apply Layout ControlNet"):
        _run_control(c, torch.randn(1, 4, 4, 4))


def test_stock_loaded_controlnet_is_read_by_its_hint_channels(comfy, models, tmp_path):
    rgb = comfy.controlnet.load_controlnet(str(_save(models, "rgb", tmp_path, metadata=False)))
    onehot = comfy.controlnet.load_controlnet(str(_save(models, "onehot", tmp_path, metadata=False)))
    other = LabelSet.from_dict({**TOY.to_dict(), "name": "recoloured", "classes": [
        {**c, "color": [255 - v for v in c["color"]]} for c in TOY.to_dict()["classes"]]})  # fmt: skip
    assert comfy.cn.layout_hint_of(rgb, other).encoding == "rgb"
    assert comfy.cn.layout_hint_of(onehot, TOY).encoding == "onehot"
    ids = _ids(16, 16)
    c = _applied_control(comfy, rgb, comfy.types.LabelMap(ids, other))
    hint, _ = _run_control(c, torch.randn(1, 4, 2, 2))
    torch.testing.assert_close(hint, palette_rgb(ids, other))  # the map's own palette: the file records none
    with pytest.raises(comfy.cn.ControlNetLoadError, match="reads 8 hint channels"):
        comfy.cn.layout_hint_of(onehot, get_label_set("cityscapes"))
    with pytest.raises(comfy.cn.ControlNetLoadError, match=re.escape(f"with '{comfy.cn.LOADER_NAME}'")):
        comfy.cn.layout_hint_of(SimpleNamespace(control_model=torch.nn.Linear(2, 2)), TOY)  # no hint block


def test_model_code_and_nodes_live_apart(comfy):
    """Model building in nodes/control_aldm.py (no node classes), the nodes in nodes/controlnet.py, which re-exports
    the public names from their old import path."""
    classes = [v for v in vars(comfy.aldm).values() if isinstance(v, type) and issubclass(v, comfy.io.ComfyNode)]
    assert classes == [] and not hasattr(comfy.aldm, "NODES")
    assert [n.define_schema().node_id for n in comfy.cn.NODES] == ["L2IALDMControlNetLoader", "L2IApplyALDMControlNet"]
    for name in comfy.aldm.__all__:
        assert getattr(comfy.cn, name) is getattr(comfy.aldm, name), name


# ------------------------------------------------------------------------------------------------ checks
def test_label_set_mismatch_names_both(comfy, files):
    control, _ = comfy.cn.load_layout_controlnet(files["aldm"])
    city = get_label_set("cityscapes")
    label_map = comfy.types.LabelMap(torch.zeros(1, 8, 8, dtype=torch.long), city)
    positive, negative = _conditioning()
    with pytest.raises(comfy.cn.ControlNetLoadError, match="label set mismatch") as err:
        comfy.cn.apply_layout_controlnet(positive, negative, control, label_map)
    assert "'toy'" in str(err.value) and "'cityscapes'" in str(err.value)
    with pytest.raises(comfy.cn.ControlNetLoadError, match="label set mismatch"):
        comfy.cn.load_layout_controlnet(files["rgb"], label_set=city)


def test_apply_never_mutates_its_inputs_and_shares_one_copy(comfy, files):
    control, _ = comfy.cn.load_layout_controlnet(files["aldm"])
    before = {
        k: getattr(control, k) for k in ("cond_hint_original", "preprocess_image", "strength", "previous_controlnet")
    }
    earlier = control.copy()
    positive, negative = _conditioning()
    positive[0][1]["control"] = earlier
    negative[0][1]["control"] = earlier
    snapshot = copy.deepcopy((positive, negative))
    ids = _ids(16, 16)
    label_map = comfy.types.LabelMap(ids, TOY)
    pos, neg = comfy.cn.apply_layout_controlnet(positive, negative, control, label_map, 0.7, 0.1, 0.9)
    for got, want in zip((positive, negative), snapshot):
        assert len(got) == len(want) and torch.equal(got[0][0], want[0][0])
        assert set(got[0][1]) == set(want[0][1]) and got[0][1]["control"] is earlier
    assert {k: getattr(control, k) for k in before} == before and control.upscale_algorithm == "nearest"
    assert torch.equal(label_map.ids, ids)
    new = pos[0][1]["control"]
    assert new is neg[0][1]["control"] and new is not control and new.previous_controlnet is earlier
    assert new.strength == 0.7 and new.timestep_percent_range == (0.1, 0.9)
    assert pos[0][1]["control_apply_to_uncond"] is False and pos[0][0] is positive[0][0]
    assert comfy.cn.apply_layout_controlnet(positive, negative, control, label_map, strength=0.0) == (
        positive,
        negative,
    )
    with pytest.raises(comfy.cn.ControlNetLoadError, match="start_percent <= end_percent"):
        comfy.cn.apply_layout_controlnet(positive, negative, control, label_map, 1.0, 0.8, 0.2)


# ------------------------------------------------------------------------------------------------ tables
class FakeClip:
    """ComfyUI's CLIP interface: ``tokenize`` and ``encode_from_tokens(..., return_pooled="unprojected")``."""

    def __init__(self, dim: int):
        self.dim = dim
        self.texts: list[str] = []

    def tokenize(self, text):
        return {"l": [text]}

    def encode_from_tokens(self, tokens, return_pooled=False):
        assert return_pooled == "unprojected"
        text = tokens["l"][0]
        self.texts.append(text)
        g = torch.Generator().manual_seed(zlib.crc32(text.encode()))
        return torch.zeros(1, 77, self.dim), torch.randn(1, self.dim, generator=g)


def test_table_built_by_clip_for_any_label_set(comfy, models, tmp_path):
    path = _save(models, "aldm", tmp_path)
    table_path_for(path).unlink()
    with pytest.raises(comfy.cn.ControlNetLoadError, match="companion file") as err:
        comfy.cn.load_layout_controlnet(path)
    assert "connect a CLIP" in str(err.value)
    names = LabelSet.from_dict({"name": "garden", "ignore_index": 255, "classes": [
        {"name": n, "color": c} for n, c in [("lawn", [0, 200, 0]), ("pond", [0, 0, 200]), ("gnome", [200, 0, 0])]]})  # fmt: skip
    clip = FakeClip(EMBED)
    control, hint = comfy.cn.load_layout_controlnet(path, clip=clip, label_set=names, template="a {name}")
    assert hint.table_source == "CLIP" and hint.label_set == names
    assert clip.texts == ["a lawn", "a pond", "a gnome", ""]
    expected = build_class_embedding_table(names, comfy.cn.clip_encode_fn(FakeClip(EMBED)), template="a {name}")
    torch.testing.assert_close(hint.table, expected)
    ids = torch.tensor([[[0, 1], [2, 255]]])
    c = _applied_control(comfy, control, comfy.types.LabelMap(ids, names))
    got, _ = _run_control(c, torch.randn(1, 4, 1, 1))
    torch.testing.assert_close(got, class_embedding_hint(ids, expected, 255, stride=1))
    with pytest.raises(comfy.cn.ControlNetLoadError, match="no pooled output|table has shape"):
        comfy.cn.load_layout_controlnet(path, clip=FakeClip(EMBED + 1), label_set=names)


def test_companion_table_with_another_label_set_is_refused(comfy, files):
    with pytest.raises(comfy.cn.ControlNetLoadError, match="label set mismatch"):
        comfy.cn.load_layout_controlnet(files["aldm"], label_set=get_label_set("cityscapes"))
    with pytest.raises(comfy.cn.ControlNetLoadError, match="table_source"):
        comfy.cn.load_layout_controlnet(files["aldm"], table_source="bogus")


# ------------------------------------------------------------------------------------------------ the nodes
def test_loader_node_lists_the_controlnet_folder_and_outputs_its_label_set(comfy, files, tmp_path):
    comfy.folder_paths.reset()
    schema = comfy.cn.L2IALDMControlNetLoader.GET_SCHEMA()
    assert schema.inputs[0].options == [comfy.cn.NO_FILE]
    comfy.folder_paths.add_model_folder_path("controlnet", str(tmp_path))
    try:
        options = comfy.cn.L2IALDMControlNetLoader.GET_SCHEMA().inputs[0].options
        assert options == sorted(p.name for p in files.values())  # table files hidden
        out = comfy.cn.L2IALDMControlNetLoader.execute(controlnet_name=files["aldm"].name)
        control, labels, info = out.args
        assert labels == TOY and "embedding hint" in info and "companion file" in info
        assert isinstance(control.control_model.input_hint_block, comfy.cn.ComfyALDMHintBlock)
        out = comfy.cn.L2IALDMControlNetLoader.execute(controlnet_name=comfy.cn.NO_FILE, path=str(files["rgb"]))
        assert "rgb hint" in out.args[2]
        with pytest.raises(comfy.cn.ControlNetLoadError, match="not in ComfyUI's controlnet folders"):
            comfy.cn.L2IALDMControlNetLoader.execute(controlnet_name="missing.safetensors")
        with pytest.raises(comfy.cn.ControlNetLoadError, match=r"`path` '.*nowhere.safetensors' does not exist"):
            comfy.cn.L2IALDMControlNetLoader.execute(
                controlnet_name=comfy.cn.NO_FILE, path=f'"{tmp_path}/nowhere.safetensors"'
            )
        with pytest.raises(
            comfy.cn.ControlNetLoadError, match="no ControlNet chosen: put the file in models/controlnet"
        ):
            comfy.cn.L2IALDMControlNetLoader.execute(controlnet_name=comfy.cn.NO_FILE, path="  ")
        key = comfy.cn.L2IALDMControlNetLoader.fingerprint_inputs(controlnet_name=files["aldm"].name)
        assert len(key) == 4
    finally:
        comfy.folder_paths.reset()


def test_official_aldm_checkpoint_imports_into_a_file_the_loader_node_uses(
    comfy, models, tmp_path, lightning_checkpoint
):
    """An official-layout ALDM ``.ckpt`` (Lightning dict, ``control_model.*``) and the user's class-embedding
    ``.pth`` files -> `import_aldm_checkpoint` -> the loader node -> the same hint and residuals as our own export
    of the same weights and table."""
    model, table = models["aldm"], models["table"]
    control = convert_controlnet_state_dict(model.state_dict(), "ldm", config=dict(model.config)).state_dict
    assert all(k.startswith("control_model.") for k in control)
    ckpt = lightning_checkpoint(tmp_path / "aldm_official.ckpt", control)
    torch.save(table[:N].clone(), tmp_path / "class_embeddings.pth")
    torch.save(table[N:].clone(), tmp_path / "null_embedding.pth")
    result = import_aldm_checkpoint(
        ckpt,
        tmp_path / "imported" / "aldm_toy.safetensors",
        label_set="toy",
        class_embeddings=tmp_path / "class_embeddings.pth",
        null_embedding=tmp_path / "null_embedding.pth",
    )
    imported, labels, info = comfy.cn.L2IALDMControlNetLoader.execute(
        controlnet_name=comfy.cn.NO_FILE, path=str(result.controlnet_path)
    ).args
    assert labels == TOY and "embedding hint" in info and "companion file" in info
    assert isinstance(imported.control_model.input_hint_block, comfy.cn.ComfyALDMHintBlock)
    ours, _ = comfy.cn.load_layout_controlnet(_save(models, "aldm", tmp_path))
    label_map = comfy.types.LabelMap(_ids(32, 32), TOY)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    runs = []
    for control_net in (imported, ours):
        torch.manual_seed(4)  # _run_control draws the text context
        runs.append(_run_control(_applied_control(comfy, control_net, label_map), x))
    (hint_a, out_a), (hint_b, out_b) = runs
    torch.testing.assert_close(hint_a, hint_b, rtol=0, atol=0)
    for a, b in zip(out_a["output"] + out_a["middle"], out_b["output"] + out_b["middle"]):
        assert_close_for_dtype(a, b)  # two ControlNets read from two files: residuals up to rounding
    assert any(r.abs().sum() > 0 for r in out_a["output"]), "all-zero residuals would prove nothing"


def test_apply_node_outputs_conditioning(comfy, files):
    control, _ = comfy.cn.load_layout_controlnet(files["rgb"])
    positive, negative = _conditioning()
    label_map = comfy.types.LabelMap(_ids(16, 16), TOY)
    out = comfy.cn.L2IApplyALDMControlNet.execute(positive, negative, control, label_map, 1.0, 0.0, 1.0)
    pos, neg = out.args
    assert pos[0][1]["control"] is neg[0][1]["control"]
    schema = comfy.cn.L2IApplyALDMControlNet.GET_SCHEMA()
    assert [i.id for i in schema.inputs] == [
        "positive", "negative", "control_net", "label_map", "strength", "start_percent", "end_percent", "vae"
    ]  # fmt: skip
    assert [o.io_type for o in schema.outputs] == ["CONDITIONING", "CONDITIONING"]


# ------------------------------------------------------------------------------------------------ real ComfyUI
_REAL_COMFY_CONTROLNET = r"""
import importlib, importlib.util, logging, sys, tempfile
from pathlib import Path
from types import SimpleNamespace
import torch

sys.path.insert(0, COMFY_ROOT)
sys.argv = ["main.py", "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import comfy.controlnet, comfy.cldm.cldm
from diffusers import UNet2DConditionModel

name = PACK.replace(".", "_x_")
spec = importlib.util.spec_from_file_location(name, PACK + "/__init__.py", submodule_search_locations=[PACK])
pack = importlib.util.module_from_spec(spec)
sys.modules[name] = pack
spec.loader.exec_module(pack)
cn = importlib.import_module(name + ".nodes.controlnet")
types_ = importlib.import_module(name + ".nodes.types")
core_cn = importlib.import_module(name + ".core.controlnet")
hints = importlib.import_module(name + ".core.hints")
weights = importlib.import_module(name + ".weights")
labels = importlib.import_module(name + ".core.labels").get_label_set("toy")
N = labels.num_classes

def randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()

base = dict(layers_per_block=1, sample_size=16, in_channels=4, out_channels=4, cross_attention_dim=32,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            norm_num_groups=32)
cases = {
    # ALDM-native: our hint block inside ComfyUI's cldm
    "aldm": (dict(base, block_out_channels=(32, 64), attention_head_dim=8),
             dict(hint="embedding", embedding_dim=16, hint_block_out_channels=(16, 16, 8, 8)), "embedding", False),
    # palette RGB with heads ComfyUI detects itself (64-wide): ComfyUI's own loader
    "rgb-comfy": (dict(base, block_out_channels=(64, 128), attention_head_dim=(1, 2)), dict(hint="rgb"), "rgb", True),
    # one-hot with heads ComfyUI would guess wrong: built by us with the stock hint block
    "onehot-ours": (dict(base, block_out_channels=(32, 64), attention_head_dim=8),
                    dict(hint="onehot", num_classes=N), "onehot", False),
}
tmp = Path(tempfile.mkdtemp())
table = torch.randn(N + 1, 16, generator=torch.Generator().manual_seed(5))
for i, (case, (unet_cfg, cn_kw, encoding, stock)) in enumerate(cases.items()):
    torch.manual_seed(0)
    model = randomise(core_cn.build_controlnet(UNet2DConditionModel(**unet_cfg), **cn_kw), i)
    path = tmp / f"{case}.safetensors"
    md = weights.WeightsMetadata(kind="controlnet", hint_encoding=encoding, label_set=labels)
    if encoding == "embedding":
        weights.save_class_embedding_table(weights.table_path_for(path), table, labels)
        md = md.with_extra(table_file=weights.table_path_for(path).name, table_fingerprint=weights.table_fingerprint(table))
    weights.save_controlnet(model, path, to="ldm", metadata=md)
    calls = []
    original = comfy.controlnet.load_controlnet_state_dict
    comfy.controlnet.load_controlnet_state_dict = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        control, hint = cn.load_layout_controlnet(path)
    finally:
        comfy.controlnet.load_controlnet_state_dict = original
    assert bool(calls) == stock, (case, calls)
    assert isinstance(control.control_model, comfy.cldm.cldm.ControlNet)

    g = torch.Generator().manual_seed(11)
    latent = (5, 6)
    ids = torch.randint(0, N, (1, 8 * latent[0], 8 * latent[1]), generator=g)
    ids[0, :4, :4] = labels.ignore_index
    positive = [[torch.randn(1, 7, 32, generator=g), {}]]
    negative = [[torch.randn(1, 7, 32, generator=g), {}]]
    pos, neg = cn.apply_layout_controlnet(positive, negative, control, types_.LabelMap(ids, labels), 1.0, 0.0, 1.0)
    c = pos[0][1]["control"]
    sampling = SimpleNamespace(timestep=lambda t: t, calculate_input=lambda t, x: x)
    c.pre_run(SimpleNamespace(model_sampling=sampling), lambda p: 1000.0 * (1.0 - p))
    x = torch.randn(2, 4, *latent, generator=g)  # cond + uncond, one label map
    context = torch.cat([positive[0][0], negative[0][0]])
    t = torch.tensor([400.0, 400.0])
    with torch.no_grad():
        out = c.get_control(x, t, {"c_crossattn": context}, 2, {})
    spec_ = core_cn.hint_spec_for(model, labels)
    ref_hint = spec_.make(ids, labels, table=table if encoding == "embedding" else None).expand(2, -1, -1, -1)
    with torch.no_grad():
        ref = model(x, t, encoder_hidden_states=context, controlnet_cond=ref_hint)
    want = list(ref.down_block_res_samples)
    assert len(out["output"]) == len(want), (case, len(out["output"]), len(want))
    for a, b in zip(out["output"], want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["middle"][0], ref.mid_block_res_sample, rtol=1e-4, atol=1e-5)
    assert max(float(a.abs().max()) for a in want) > 1e-3
    print("controlnet ok", case, len(want))
"""


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="set COMFYUI_PATH to a ComfyUI checkout to run")
def test_real_comfyui_controlnet_residuals_equal_our_diffusers_models():
    """Files our weights/ code writes, loaded by our loader into the real ComfyUI (ALDM-native: our hint block in its
    cldm; palette RGB: ComfyUI's own loader; one-hot with tiny heads: built by us), applied with a label map and run
    through ComfyUI's get_control on a CFG batch: every residual equals our diffusers model's on the trainer's hint."""
    comfy_root = Path(os.environ["COMFYUI_PATH"]).resolve()
    code = f"COMFY_ROOT = {str(comfy_root)!r}\nPACK = {str(ROOT)!r}\n" + _REAL_COMFY_CONTROLNET
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=comfy_root, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("controlnet ok") == 3, result.stdout
