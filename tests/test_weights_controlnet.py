"""ControlNet files: format detection, diffusers <-> ldm conversion, files and folders, the SD 1.5 layout, ALDM import.

Every conversion is checked for exact round trips on tiny random ControlNets with every weight non-zero (so two
swapped keys cannot hide behind equal zero tensors), for the three hint blocks: palette RGB (a 4-level standard
block, like SD's), one-hot (a 2-level standard block, so the hint indices come from the config, not from SD's
14) and ALDM-native (five convs).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from layout2image.core.controlnet import ALDMControlNetModel, build_controlnet, load_controlnet
from layout2image.core.labels import get_label_set
from layout2image.testing import assert_close_for_dtype, tiny_unet_config
from layout2image.weights import (
    CONVERSION_TARGETS,
    KNOWN_FORMATS,
    LDM_PREFIX,
    ControlNetFormat,
    KeyMismatchError,
    MetadataError,
    UnknownFormatError,
    WeightsError,
    WeightsFileError,
    WeightsMetadata,
    controlnet_config_of,
    controlnet_from_file,
    controlnet_key_map,
    convert_controlnet_file,
    convert_controlnet_state_dict,
    detect_controlnet_format,
    import_aldm_checkpoint,
    infer_controlnet_config,
    load_class_embedding_table,
    load_companion_table,
    load_controlnet_file,
    load_official_class_embeddings,
    load_safetensors,
    read_control_model,
    save_class_embedding_table,
    save_controlnet,
    table_fingerprint,
    training_config_hash,
)

MANIFEST = Path(__file__).parent / "data" / "sd15_controlnet_ldm_manifest.json"

# norm_num_groups=32 and 8 heads are the SD conventions `infer_controlnet_config` assumes, so files without our
# metadata (an "official" checkpoint) rebuild exactly; layers_per_block=2 exercises the input_blocks arithmetic.
TINY_UNET = tiny_unet_config(layers_per_block=2, norm_num_groups=32)
LABELS = get_label_set("toy")
N = LABELS.num_classes
EMBED = 16
LATENT = 8
# variant -> (build_controlnet kwargs, hint block, hint channels, hint encoding, hint size / latent size)
VARIANTS = {
    "rgb": (dict(hint="rgb", conditioning_embedding_out_channels=(4, 8, 8, 16)), "standard", 3, "rgb", 8),
    "onehot": (dict(hint="onehot", num_classes=N, conditioning_embedding_out_channels=(8, 16)), "standard", N,
               "onehot", 2),
    "aldm": (dict(hint="embedding", embedding_dim=EMBED, hint_block_out_channels=(16, 16, 8, 8)), "aldm", EMBED,
             "embedding", 2),
}  # fmt: skip


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def models() -> dict[str, ControlNetModel]:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET)
    return {v: _randomise(build_controlnet(unet, **kw), i) for i, (v, (kw, *_)) in enumerate(VARIANTS.items())}


def _forward(model, variant: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    channels, up = VARIANTS[variant][2], VARIANTS[variant][4]
    sample = torch.randn(2, 4, LATENT, LATENT, generator=g)
    text = torch.randn(2, 5, TINY_UNET["cross_attention_dim"], generator=g)
    hint = torch.rand(2, channels, LATENT * up, LATENT * up, generator=g)
    with torch.no_grad():
        out = model(sample, torch.tensor([10, 700]), encoder_hidden_states=text, controlnet_cond=hint)
    return [*out.down_block_res_samples, out.mid_block_res_sample]


def _assert_same_outputs(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):  # other module instances over other storage: equal up to rounding
        assert_close_for_dtype(x, y)
    assert any(x.abs().sum() > 0 for x in a), "outputs are all zero: the comparison would prove nothing"


def _assert_same_tensors(got: dict, want: dict) -> None:
    assert list(got) == list(want) or set(got) == set(want), sorted(set(got) ^ set(want))[:10]
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k


def _to(state_dict, to, config, **kw):
    return convert_controlnet_state_dict(state_dict, to, config=config, **kw).state_dict


# ---------------------------------------------------------------------------------------------------- detection
@pytest.mark.parametrize("variant", VARIANTS)
def test_detect_format_by_key_signature_and_shapes(models, variant):
    model = models[variant]
    _, hint_block, channels, encoding, _ = VARIANTS[variant]
    sd, config = model.state_dict(), controlnet_config_of(model)
    fmt = detect_controlnet_format(sd)
    assert fmt == ControlNetFormat("diffusers", hint_block, channels, "")
    assert fmt.hint_encoding == encoding
    ldm = _to(sd, "ldm", config)
    assert detect_controlnet_format(ldm) == ControlNetFormat("ldm", hint_block, channels, LDM_PREFIX)
    bare = _to(sd, "ldm", config, prefix="")
    assert detect_controlnet_format(bare) == ControlNetFormat("ldm", hint_block, channels, "")
    # shapes alone (what a file header gives) are enough
    assert detect_controlnet_format({k: tuple(v.shape) for k, v in ldm.items()}) == detect_controlnet_format(ldm)


def test_unknown_key_set_raises_listing_known_formats():
    with pytest.raises(UnknownFormatError) as info:
        detect_controlnet_format({"encoder.conv.weight": torch.zeros(4, 3, 3, 3), "decoder.conv.bias": torch.zeros(4)})
    message = str(info.value)
    assert "encoder.conv" in message and "Known formats" in message
    for known in KNOWN_FORMATS:
        assert known in message


def test_a_unet_is_not_a_controlnet():
    unet = UNet2DConditionModel(**TINY_UNET)
    with pytest.raises(UnknownFormatError, match="no layout signature"):
        detect_controlnet_format(unet.state_dict())


def test_whole_model_checkpoint_is_named_as_such(models):
    ldm = _to(models["rgb"].state_dict(), "ldm", controlnet_config_of(models["rgb"]))
    whole = {**ldm, "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}
    with pytest.raises(UnknownFormatError, match="extract_controlnet_state_dict"):
        detect_controlnet_format(whole)


@pytest.mark.parametrize("variant", VARIANTS)
def test_broken_hint_block_is_unknown(models, variant):
    sd = dict(models[variant].state_dict())
    hint_keys = sorted(k for k in sd if k.startswith("controlnet_cond_embedding.") and k.endswith(".weight"))
    del sd[hint_keys[1]]
    with pytest.raises(UnknownFormatError, match="hint convs found"):
        detect_controlnet_format(sd)


def test_hint_shapes_decide_between_standard_and_aldm(models):
    # same key names as a standard block, but the channel chain is broken: neither format
    sd = dict(models["rgb"].state_dict())
    sd["controlnet_cond_embedding.blocks.0.weight"] = torch.zeros(4, 3, 3, 3)
    with pytest.raises(UnknownFormatError):
        detect_controlnet_format(sd)


# ---------------------------------------------------------------------------------------------------- conversion
@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_round_trips_are_exact(models, variant):
    model = models[variant]
    sd, config = model.state_dict(), controlnet_config_of(model)
    ldm = _to(sd, "ldm", config)
    assert all(k.startswith(LDM_PREFIX) for k in ldm) and len(ldm) == len(sd)
    _assert_same_tensors(_to(ldm, "diffusers", config), sd)
    _assert_same_tensors(_to(_to(ldm, "diffusers", config), "ldm", config), ldm)
    bare = _to(sd, "ldm", config, prefix="")
    _assert_same_tensors(_to(bare, "ldm", config), ldm)  # re-prefixing
    _assert_same_tensors(_to(bare, "diffusers", config), sd)
    # without a config: inferred from the shapes (SD conventions, which the tiny models follow)
    _assert_same_tensors(_to(ldm, "diffusers", None), sd)


@pytest.mark.parametrize("variant", VARIANTS)
def test_converters_are_pure_and_idempotent(models, variant):
    model = models[variant]
    sd, config = model.state_dict(), controlnet_config_of(model)
    keys, snapshot, config_before = list(sd), {k: v.clone() for k, v in sd.items()}, copy.deepcopy(config)
    same = convert_controlnet_state_dict(sd, "diffusers", config=config)
    assert same.state_dict is not sd
    assert list(same.state_dict) == keys and all(same.state_dict[k] is sd[k] for k in keys)
    ldm = _to(sd, "ldm", config)
    again = _to(ldm, "ldm", config)
    assert list(again) == list(ldm) and all(again[k] is ldm[k] for k in ldm)
    assert list(sd) == keys and all(torch.equal(sd[k], snapshot[k]) for k in keys)
    assert config == config_before


def test_missing_unexpected_and_misshapen_keys_are_reported(models):
    model = models["rgb"]
    config = controlnet_config_of(model)
    ldm = _to(model.state_dict(), "ldm", config)
    broken = dict(ldm)
    del broken["control_model.zero_convs.1.0.weight"]
    broken["control_model.extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyMismatchError) as info:
        convert_controlnet_state_dict(broken, "diffusers", config=config)
    assert "controlnet_down_blocks.1.weight" in str(info.value) and "control_model.extra.weight" in str(info.value)
    result = convert_controlnet_state_dict(broken, "diffusers", config=config, strict=False)
    assert result.missing == ("controlnet_down_blocks.1.weight",)
    assert result.unexpected == ("control_model.extra.weight",)
    assert "controlnet_down_blocks.1.weight" not in result.state_dict and len(result.state_dict) == len(ldm) - 1
    misshapen = dict(ldm)
    misshapen["control_model.middle_block_out.0.bias"] = torch.zeros(3)
    with pytest.raises(KeyMismatchError, match="middle_block_out.0.bias"):
        convert_controlnet_state_dict(misshapen, "diffusers", config=config, strict=False)


def test_key_map_follows_the_module_table(models):
    key_map = controlnet_key_map(controlnet_config_of(models["rgb"]))  # layers_per_block=2, 2 blocks
    assert key_map["time_embedding.linear_2.bias"] == "time_embed.2.bias"
    assert key_map["conv_in.weight"] == "input_blocks.0.0.weight"
    assert key_map["down_blocks.0.resnets.1.norm1.weight"] == "input_blocks.2.0.in_layers.0.weight"
    assert key_map["down_blocks.0.attentions.1.proj_in.weight"] == "input_blocks.2.1.proj_in.weight"
    assert key_map["down_blocks.0.downsamplers.0.conv.weight"] == "input_blocks.3.0.op.weight"
    assert key_map["down_blocks.1.resnets.0.conv_shortcut.weight"] == "input_blocks.4.0.skip_connection.weight"
    assert key_map["down_blocks.1.resnets.1.time_emb_proj.weight"] == "input_blocks.5.0.emb_layers.1.weight"
    assert key_map["mid_block.resnets.1.conv2.weight"] == "middle_block.2.out_layers.3.weight"
    assert key_map["controlnet_down_blocks.5.bias"] == "zero_convs.5.0.bias"
    assert key_map["controlnet_mid_block.weight"] == "middle_block_out.0.weight"
    assert key_map["controlnet_cond_embedding.blocks.5.weight"] == "input_hint_block.12.weight"
    assert key_map["controlnet_cond_embedding.conv_out.weight"] == "input_hint_block.14.weight"
    short = controlnet_key_map(controlnet_config_of(models["onehot"]))  # 2-level hint block: conv_out at 6
    assert short["controlnet_cond_embedding.conv_out.weight"] == "input_hint_block.6.weight"
    aldm = controlnet_key_map(controlnet_config_of(models["aldm"]))
    assert aldm["controlnet_cond_embedding.8.weight"] == "input_hint_block.8.weight"


_BASE = dict(block_out_channels=(32, 64), cross_attention_dim=32, conditioning_embedding_out_channels=(8, 16))
CONFIG_VARIANTS = {
    "one_layer_three_blocks": dict(
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    ),
    "three_layers": dict(layers_per_block=3, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D")),
    "single_block": dict(block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",)),
    "deep_linear_transformers": dict(
        transformer_layers_per_block=2,
        use_linear_projection=True,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    ),
    "sd2_style_heads": dict(
        block_out_channels=(64, 128),
        cross_attention_dim=1024,
        attention_head_dim=[1, 2],
        use_linear_projection=True,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    ),
}
_INFERRED = (
    "in_channels conditioning_channels down_block_types block_out_channels layers_per_block cross_attention_dim "
    "transformer_layers_per_block attention_head_dim use_linear_projection conditioning_embedding_out_channels"
).split()


@pytest.mark.parametrize("name", CONFIG_VARIANTS)
def test_mapping_and_inference_follow_the_config(name):
    with torch.device("meta"):
        model = ControlNetModel(**{**_BASE, **CONFIG_VARIANTS[name]})
    config = controlnet_config_of(model)
    sd = model.state_dict()
    ldm = _to(sd, "ldm", config)
    assert len(ldm) == len(sd)
    inferred = infer_controlnet_config(ldm)
    for key in _INFERRED:
        assert json.dumps(inferred[key]) == json.dumps(config[key]), (key, inferred[key], config[key])
    back = _to(ldm, "diffusers", inferred)
    assert list(back) == list(sd)


def test_sd15_ldm_export_matches_the_manifest():
    """Our ldm export of an SD 1.5 ControlNet has exactly the keys and shapes of lllyasviel's layout."""
    data = json.loads(MANIFEST.read_text())
    manifest = {k: tuple(v) for k, v in data["keys"].items()}
    with torch.device("meta"):  # 361 M parameters, no memory
        unet = UNet2DConditionModel(cross_attention_dim=768)  # SD 1.5 otherwise equals diffusers' defaults
        controlnet = build_controlnet(unet, hint="rgb", load_weights_from_unet=False)
    config = controlnet_config_of(controlnet)
    exported = {k: tuple(v.shape) for k, v in _to(controlnet.state_dict(), "ldm", config).items()}
    assert sorted(set(manifest) - set(exported)) == [], "keys of the SD 1.5 layout we do not write"
    assert sorted(set(exported) - set(manifest)) == [], "keys we write that the SD 1.5 layout lacks"
    assert {k: s for k, s in exported.items() if s != manifest[k]} == {}
    assert len(exported) == data["num_tensors"]
    assert sum(torch.Size(s).numel() for s in exported.values()) == data["num_parameters"]
    # and the other way: the manifest's shapes alone give back the SD 1.5 config
    inferred = infer_controlnet_config(manifest)
    for key in _INFERRED + ["norm_num_groups"]:
        assert json.dumps(inferred[key]) == json.dumps(config[key]), key
    assert detect_controlnet_format(manifest) == ControlNetFormat("ldm", "standard", 3, LDM_PREFIX)


# ---------------------------------------------------------------------------------------------------- files
def _metadata(variant: str) -> WeightsMetadata:
    return WeightsMetadata(
        kind="controlnet",
        hint_encoding=VARIANTS[variant][3],
        label_set=LABELS,
        base_model="toy/base",
        training_config_hash=training_config_hash({"lr": 1e-5, "steps": 10}),
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_file_round_trips_are_exact(tmp_path, models, variant):
    model = models[variant]
    ref, config = model.state_dict(), controlnet_config_of(model)
    folder = save_controlnet(model, tmp_path / "folder", to="diffusers-folder", metadata=_metadata(variant))
    single = convert_controlnet_file(folder, tmp_path / "single.safetensors", to="diffusers")
    ldm = convert_controlnet_file(single, tmp_path / "ldm.safetensors", to="ldm")
    folder2 = convert_controlnet_file(ldm, tmp_path / "folder2", to="diffusers-folder")
    single2 = convert_controlnet_file(folder2, tmp_path / "single2.safetensors", to="diffusers")
    # same tensors and same metadata (the header's JSON key order is not fixed, so bytes may differ)
    first, second = load_safetensors(single), load_safetensors(single2)
    assert first.metadata == second.metadata
    _assert_same_tensors(second.state_dict, first.state_dict)
    for path, layout in [(folder, "diffusers"), (single, "diffusers"), (ldm, "ldm"), (folder2, "diffusers")]:
        loaded = load_controlnet_file(path)
        assert loaded.format.layout == layout
        assert loaded.config == config
        assert loaded.metadata.label_set == LABELS and loaded.metadata.hint_encoding == VARIANTS[variant][3]
        assert loaded.metadata.training_config_hash == _metadata(variant).training_config_hash
        _assert_same_tensors(_to(loaded.state_dict, "diffusers", loaded.config), ref)
    _assert_same_outputs(_forward(controlnet_from_file(ldm, label_set=LABELS), variant), _forward(model, variant))


@pytest.mark.parametrize("variant", VARIANTS)
def test_folders_load_with_stock_and_core_loaders(tmp_path, models, variant):
    model = models[variant]
    folder = save_controlnet(model, tmp_path / "folder", to="diffusers-folder", metadata=_metadata(variant))
    loaded = load_controlnet(folder)
    assert type(loaded) is type(model)
    _assert_same_tensors(loaded.state_dict(), model.state_dict())
    if variant != "aldm":
        _assert_same_tensors(ControlNetModel.from_pretrained(folder).state_dict(), model.state_dict())


def test_ldm_export_loads_in_diffusers_from_single_file(tmp_path, models):
    """diffusers' own ldm converter (SD's 4-level hint block) reads our ldm and diffusers-layout files."""
    model = models["rgb"]
    folder = save_controlnet(model, tmp_path / "folder", to="diffusers-folder")
    for to in ("ldm", "diffusers"):
        path = save_controlnet(model, tmp_path / f"{to}.safetensors", to=to)
        stock = ControlNetModel.from_single_file(str(path), config=str(folder), local_files_only=True)
        _assert_same_tensors(stock.state_dict(), model.state_dict())


@pytest.mark.parametrize("to", CONVERSION_TARGETS)
def test_fp16_and_fp32_on_request(tmp_path, models, to):
    model = models["aldm"]
    src = save_controlnet(model, tmp_path / "src.safetensors", metadata=_metadata("aldm"))
    half = convert_controlnet_file(src, tmp_path / f"half_{to}", to=to, dtype=torch.float16)
    loaded = load_controlnet_file(half)
    assert {v.dtype for v in loaded.state_dict.values()} == {torch.float16}
    want = {k: v.half() for k, v in model.state_dict().items()}
    _assert_same_tensors(_to(loaded.state_dict, "diffusers", loaded.config), want)
    full = convert_controlnet_file(half, tmp_path / f"full_{to}", to=to, dtype=torch.float32)
    assert {v.dtype for v in load_controlnet_file(full).state_dict.values()} == {torch.float32}
    kept = convert_controlnet_file(half, tmp_path / f"kept_{to}", to=to)
    assert {v.dtype for v in load_controlnet_file(kept).state_dict.values()} == {torch.float16}


def test_detection_ignores_file_names(tmp_path, models):
    model = models["rgb"]
    ldm = _to(model.state_dict(), "ldm", controlnet_config_of(model))
    misleading = tmp_path / "diffusers_model.safetensors"
    torch.save(ldm, misleading)  # a torch zip file under a safetensors name
    loaded = load_controlnet_file(misleading)
    assert loaded.format.layout == "ldm" and loaded.metadata is None
    odd = save_controlnet(model, tmp_path / "control_ldm.ckpt", to="diffusers")  # safetensors under a .ckpt name
    assert load_controlnet_file(odd).format.layout == "diffusers"


def test_metadata_mismatches_fail_with_clear_messages(tmp_path, models):
    path = save_controlnet(models["aldm"], tmp_path / "aldm.safetensors", metadata=_metadata("aldm"))
    model = controlnet_from_file(path, label_set=LABELS, hint_encoding="embedding", base_model="toy/base")
    assert isinstance(model, ALDMControlNetModel)
    cityscapes = get_label_set("cityscapes")
    with pytest.raises(MetadataError) as info:
        controlnet_from_file(path, label_set=cityscapes)
    message = str(info.value)
    assert "'toy'" in message and "'cityscapes'" in message
    assert LABELS.fingerprint() in message and cityscapes.fingerprint() in message
    with pytest.raises(MetadataError, match="'embedding' hints"):
        controlnet_from_file(path, hint_encoding="rgb")
    with pytest.raises(MetadataError, match="base model 'toy/base'"):
        controlnet_from_file(path, base_model="runwayml/stable-diffusion-v1-5")
    with pytest.raises(MetadataError, match="hint_encoding='embedding'"):  # metadata that contradicts the weights
        save_controlnet(models["rgb"], tmp_path / "bad.safetensors", metadata=_metadata("aldm"))
    wrong_n = _metadata("onehot").replace(label_set=cityscapes)
    with pytest.raises(MetadataError, match="reads 8 channels|reads \\d+ channels"):
        save_controlnet(models["onehot"], tmp_path / "bad2.safetensors", metadata=wrong_n)


# ---------------------------------------------------------------------------------------------------- ALDM import
@pytest.fixture(scope="module")
def official(models, tmp_path_factory, lightning_checkpoint):
    """An official-layout ALDM checkpoint of the tiny ALDM model, and class-embedding files for the toy set."""
    root = tmp_path_factory.mktemp("official")
    source = models["aldm"]
    control = _to(source.state_dict(), "ldm", controlnet_config_of(source))
    ckpt = lightning_checkpoint(root / "toy_step9.ckpt", control)
    g = torch.Generator().manual_seed(11)
    classes, null = torch.randn(N, EMBED, generator=g), torch.randn(1, EMBED, generator=g)
    torch.save(classes, root / "class_embeddings.pth")
    torch.save(null, root / "null_embedding.pth")
    return dict(root=root, ckpt=ckpt, control=control, table=torch.cat([classes, null]))


def test_lightning_checkpoint_loads_weights_only_and_mmapped(official):
    obj = torch.load(official["ckpt"], weights_only=True, mmap=True)
    assert obj["global_step"] == 1234 and "model.diffusion_model.input_blocks.0.0.weight" in obj["state_dict"]
    control = read_control_model(official["ckpt"])
    assert list(control) == list(official["control"])
    _assert_same_tensors(control, official["control"])


def test_import_official_checkpoint(tmp_path, models, official):
    root = official["root"]
    result = import_aldm_checkpoint(
        official["ckpt"],
        tmp_path / "aldm_toy.safetensors",
        label_set="toy",
        class_embeddings=root / "class_embeddings.pth",
        null_embedding=root / "null_embedding.pth",
    )
    assert result.num_tensors == len(official["control"])
    assert result.table_path == tmp_path / "aldm_toy.table.safetensors"
    table = load_class_embedding_table(result.table_path, LABELS)
    assert torch.equal(table.table, official["table"]) and table.table.shape == (N + 1, EMBED)
    model = controlnet_from_file(result.controlnet_path, label_set=LABELS, hint_encoding="embedding")
    assert isinstance(model, ALDMControlNetModel)
    _assert_same_outputs(_forward(model, "aldm"), _forward(models["aldm"], "aldm"))
    metadata = load_controlnet_file(result.controlnet_path).metadata
    assert metadata.extra["table_fingerprint"] == table_fingerprint(official["table"])
    assert metadata.extra["table_file"] == "aldm_toy.table.safetensors"
    assert metadata.extra["class_name"] == "ALDMControlNetModel" and metadata.hint_encoding == "embedding"
    assert metadata.base_model == "runwayml/stable-diffusion-v1-5" and metadata.label_set == LABELS
    with pytest.raises(MetadataError, match="label set mismatch"):
        load_class_embedding_table(result.table_path, get_label_set("cityscapes"))
    companion = load_companion_table(result.controlnet_path, LABELS)
    assert torch.equal(companion.table, official["table"])
    # a table of another import does not pass for this ControlNet's
    root = official["root"]
    torch.save(torch.randn(N, EMBED), tmp_path / "other_classes.pth")
    save_class_embedding_table(
        result.table_path,
        load_official_class_embeddings(tmp_path / "other_classes.pth", root / "null_embedding.pth"),
        LABELS,
    )
    with pytest.raises(MetadataError, match="is not the table"):
        load_companion_table(result.controlnet_path)
    result.table_path.unlink()
    with pytest.raises(WeightsFileError, match="no class-embedding table"):
        load_companion_table(result.controlnet_path)


def test_companion_table_is_found_after_both_files_are_renamed(tmp_path, official):
    """A trainer export (``controlnet.safetensors`` recording ``controlnet.table.safetensors``) put in ComfyUI's
    models/controlnet under another name, as templates name it: ``<name>.table.safetensors`` is the table; another
    ControlNet's table under that name is still refused, and with none the error names both places looked at."""
    root = official["root"]
    result = import_aldm_checkpoint(
        official["ckpt"],
        tmp_path / "export" / "controlnet.safetensors",
        label_set="toy",
        class_embeddings=root / "class_embeddings.pth",
        null_embedding=root / "null_embedding.pth",
    )
    assert load_controlnet_file(result.controlnet_path).metadata.extra["table_file"] == "controlnet.table.safetensors"
    models_dir = tmp_path / "models" / "controlnet"
    models_dir.mkdir(parents=True)
    renamed = result.controlnet_path.rename(models_dir / "l2i_aldm_toy.safetensors")
    table = result.table_path.rename(models_dir / "l2i_aldm_toy.table.safetensors")
    assert torch.equal(load_companion_table(renamed, LABELS).table, official["table"])
    torch.save(torch.randn(N, EMBED), tmp_path / "other_classes.pth")
    other = load_official_class_embeddings(tmp_path / "other_classes.pth", root / "null_embedding.pth")
    save_class_embedding_table(table, other, LABELS)
    with pytest.raises(MetadataError, match="is not the table"):
        load_companion_table(renamed)
    table.unlink()
    with pytest.raises(WeightsFileError, match="controlnet.table.safetensors' or .*l2i_aldm_toy.table.safetensors"):
        load_companion_table(renamed)


def test_import_refuses_what_does_not_fit(tmp_path, models, official, lightning_checkpoint):
    root = official["root"]
    kwargs = dict(class_embeddings=root / "class_embeddings.pth", null_embedding=root / "null_embedding.pth")
    with pytest.raises(WeightsError, match="label set 'cityscapes' has 19 classes"):
        import_aldm_checkpoint(official["ckpt"], tmp_path / "a.safetensors", label_set="cityscapes", **kwargs)
    standard = _to(models["rgb"].state_dict(), "ldm", controlnet_config_of(models["rgb"]))
    std_ckpt = lightning_checkpoint(tmp_path / "standard.ckpt", standard)
    with pytest.raises(WeightsError, match="l2i-convert controlnet"):
        import_aldm_checkpoint(std_ckpt, tmp_path / "b.safetensors", label_set="toy", **kwargs)
    no_control = lightning_checkpoint(tmp_path / "sd.ckpt", {})
    with pytest.raises(WeightsFileError, match="holds no control_model"):
        import_aldm_checkpoint(no_control, tmp_path / "c.safetensors", label_set="toy", **kwargs)
    wide = tmp_path / "wide_null.pth"
    torch.save(torch.zeros(1, EMBED + 1), wide)
    with pytest.raises(WeightsError, match="null embedding is 17-wide"):
        import_aldm_checkpoint(
            official["ckpt"], tmp_path / "d.safetensors", label_set="toy",
            class_embeddings=root / "class_embeddings.pth", null_embedding=wide,
        )  # fmt: skip


_MEMORY_CHILD = textwrap.dedent(
    """
    import json, sys, torch
    from layout2image.weights import import_aldm_checkpoint

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(field)

    def reset_peak():
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            return True
        except OSError:
            return False

    small, big, cls, null, out = sys.argv[1:6]
    kw = dict(label_set="toy", class_embeddings=cls, null_embedding=null)
    import_aldm_checkpoint(small, out + "/warmup.safetensors", **kw)  # imports and first-call costs
    exact = reset_peak()
    before = status("VmRSS")
    import_aldm_checkpoint(big, out + "/big.safetensors", **kw)
    peak = status("VmHWM")
    control = None
    if exact:  # the same measurement on a plain full read, to show it sees a whole-file load
        reset_peak()
        start = status("VmRSS")
        obj = torch.load(big, weights_only=True, mmap=False)
        control = status("VmHWM") - start
        del obj
    print(json.dumps({"growth": peak - before, "exact_peak": exact, "full_read_growth": control}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="measures RSS through Linux /proc")
def test_import_memory_stays_far_below_file_size(tmp_path, official, lightning_checkpoint):
    """MEMORY TEST (~10 s): importing from a 320 MB checkpoint grows peak RSS by far less than the file.

    The checkpoint is mostly large non-ControlNet tensors (as the real 5.7 GB file is mostly UNet/VAE/CLIP). The
    import runs in a child process, after a warm-up import, and the child reports its peak RSS growth (VmHWM after
    a reset) during the import of the big file, plus the growth of a plain ``torch.load(mmap=False)`` of the same
    file as a control.
    """
    big = lightning_checkpoint(tmp_path / "big.ckpt", official["control"], junk_floats=80_000_000)
    size = big.stat().st_size
    assert size > 300e6
    root = official["root"]
    args = [official["ckpt"], big, root / "class_embeddings.pth", root / "null_embedding.pth", tmp_path]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.run(
        [sys.executable, "-c", _MEMORY_CHILD, *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    growth = report["growth"]
    print(f"\nimport peak RSS growth {growth / 1e6:.1f} MB for a {size / 1e6:.0f} MB checkpoint; {report}")
    assert growth < 0.1 * size, f"import grew peak RSS by {growth / 1e6:.1f} MB for a {size / 1e6:.0f} MB file"
    if report["full_read_growth"] is not None:
        assert report["full_read_growth"] > 0.8 * size  # the measurement does see a whole-file read
