"""LoRA files: PEFT <-> kohya (diffusers or ldm module names by UNet layout, alpha = lora_alpha), the ComfyUI/A1111
naming checker, diffusers' plain ``load_lora_weights`` on an SD 1.x-shaped export, SDM-LoRA files with their SPADE
companion, ``l2i-convert lora``, inspection, and errors for broken input."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from layout2image.cli.convert import _KOHYA_NAMES, _LORA_TARGETS, main
from layout2image.core.labels import LabelSet, get_label_set
from layout2image.core.sdm_lora import (
    SDMLoraConfig,
    SDMLoraStateDicts,
    add_sdm_lora,
    get_sdm_lora_state_dicts,
    load_sdm_lora_state_dicts,
    sdm_lora_parameters,
)
from layout2image.core.spade import find_spade_sites, get_spade_adapter, spade_layout
from layout2image.testing import (
    assert_close_for_dtype,
    capture_loader_messages,
    loader_problems,
    sd1x_tiny_unet_config,
    tiny_unet_config,
    write_tiny_sd,
)
from layout2image.weights import (
    LORA_FORMATS,
    LoraFormatError,
    MetadataError,
    SPADESiteMismatchError,
    WeightsError,
    WeightsFileError,
    check_lora_file,
    check_lora_state_dict,
    convert_lora_file,
    convert_lora_state_dict,
    detect_lora_format,
    inspect_weights,
    kohya_module_name,
    kohya_naming_of,
    load_lora_file,
    load_sdm_lora,
    load_spade_file,
    lora_alphas_of,
    save_lora_file,
    save_sdm_lora,
    sd15_unet_config,
    spade_path_for,
    unet_module_map,
)
from layout2image.weights.lora import KOHYA_NAMES, kohya_names_for
from layout2image.weights.lora_check import comfyui_unet_config, comfyui_unet_to_diffusers, ldm_unet_shapes

LABELS = get_label_set("toy")
RANK, ALPHA = 4, 8.0  # alpha != rank on purpose: a file with alpha = rank would be twice as weak
SD15_CONFIG = Path(__file__).resolve().parents[1] / "trainer" / "sd15_config" / "unet" / "config.json"
CONV_TARGETS = ("conv1", "conv2", "conv_shortcut", "conv", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")


def tiny_config(layers_per_block: int) -> dict:
    return tiny_unet_config(layers_per_block=layers_per_block)


def plain_unet(layers_per_block: int = 1) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**tiny_config(layers_per_block)).eval()


def sdm_config(**overrides) -> SDMLoraConfig:
    kwargs = dict(
        layout_channels=LABELS.num_classes,
        rank=RANK,
        lora_alpha=ALPHA,
        conv_target_modules=CONV_TARGETS,
        spade_hidden_channels=16,
    )
    return SDMLoraConfig(**{**kwargs, **overrides})


def sdm_unet(layers_per_block: int = 1, seed: int = 3) -> UNet2DConditionModel:
    """A tiny SDM-LoRA UNet with random, non-zero LoRA and SPADE weights."""
    unet = plain_unet(layers_per_block)
    add_sdm_lora(unet, sdm_config())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sdm_lora_parameters(unet):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return unet


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, 4, 16, 16, generator=g),
        torch.tensor([10, 500]),
        torch.randn(2, 7, 32, generator=g),
        torch.rand(2, LABELS.num_classes, 32, 32, generator=g),
    )


def run(unet, layout=True) -> torch.Tensor:
    sample, t, text, lay = inputs()
    with torch.no_grad():
        if not layout:
            return unet(sample, t, encoder_hidden_states=text).sample
        with spade_layout(unet, lay):
            return unet(sample, t, encoder_hidden_states=text).sample


@pytest.fixture(scope="module", params=[1, 2], ids=["lpb1", "lpb2"])
def trained(request):
    unet = sdm_unet(request.param)
    parts = get_sdm_lora_state_dicts(unet)
    return dict(lpb=request.param, unet=unet, peft=parts.lora, spade=parts.spade, alphas=lora_alphas_of(unet))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    unet = sdm_unet(1)
    files = save_sdm_lora(unet, tmp_path_factory.mktemp("sdm") / "toy_sdm.safetensors", LABELS, base_model="toy/base")
    return dict(unet=unet, files=files, out=run(unet))


# ---------------------------------------------------------------------------------------------------- conversion
def test_peft_kohya_peft_round_trip_is_exact_and_pure(trained):
    peft = trained["peft"]
    before = {k: v.clone() for k, v in peft.items()}
    kohya = convert_lora_state_dict(peft, "kohya", unet_config=trained["unet"].config, alpha=trained["alphas"])
    assert kohya.source == "peft" and kohya.target == "kohya"
    assert all(k.startswith("lora_unet_") for k in kohya.state_dict)
    assert len(kohya.state_dict) == len(peft) // 2 * 3  # down, up, alpha per module
    back = convert_lora_state_dict(kohya.state_dict, "peft", unet_config=trained["unet"].config)
    assert list(back.state_dict) == list(peft)
    assert all(torch.equal(back.state_dict[k], peft[k]) for k in peft)
    assert back.alphas == kohya.alphas and set(back.alphas.values()) == {ALPHA} and set(back.ranks.values()) == {RANK}
    assert list(peft) == list(before) and all(torch.equal(peft[k], before[k]) for k in peft)  # input untouched


def test_alpha_is_lora_alpha_not_rank(trained):
    kohya = convert_lora_state_dict(peft := trained["peft"], "kohya", unet_config=trained["unet"].config, alpha=ALPHA)
    alphas = {k: v for k, v in kohya.state_dict.items() if k.endswith(".alpha")}
    assert len(alphas) == len(peft) // 2
    for key, value in alphas.items():
        assert value.ndim == 0 and value.dtype == torch.float32 and value.item() == ALPHA, key
        assert kohya.state_dict[key.replace(".alpha", ".lora_down.weight")].shape[0] == RANK != ALPHA


def test_conversions_are_idempotent(trained):
    config = trained["unet"].config
    kohya = convert_lora_state_dict(trained["peft"], "kohya", unet_config=config, alpha=ALPHA).state_dict
    again = convert_lora_state_dict(kohya, "kohya", unet_config=config).state_dict
    assert list(again) == list(kohya) and all(again[k] is kohya[k] for k in kohya)
    same = convert_lora_state_dict(trained["peft"], "peft", unet_config=config).state_dict
    assert list(same) == list(trained["peft"]) and all(same[k] is trained["peft"][k] for k in same)
    prefixed = convert_lora_state_dict(trained["peft"], "peft", unet_config=config, prefix="unet.").state_dict
    assert all(k.startswith("unet.down_blocks.") or k.startswith(("unet.mid", "unet.up")) for k in prefixed)
    assert list(convert_lora_state_dict(prefixed, "peft", unet_config=config, prefix="").state_dict) == list(same)


@pytest.mark.parametrize("naming", ["diffusers", "ldm"])
def test_both_kohya_namings_round_trip_exactly(trained, naming):
    """Either naming: PEFT -> kohya -> PEFT is exact; kohya -> kohya in the same naming is the identity; renaming to
    the other naming and back gives the same keys and the very same tensors."""
    config, peft = trained["unet"].config, trained["peft"]
    other = {"diffusers": "ldm", "ldm": "diffusers"}[naming]
    kohya = convert_lora_state_dict(peft, "kohya", unet_config=config, alpha=ALPHA, kohya_names=naming)
    assert kohya.kohya_names == naming
    assert kohya_naming_of(kohya.state_dict) == naming
    back = convert_lora_state_dict(kohya.state_dict, "peft", unet_config=config)
    assert list(back.state_dict) == list(peft) and all(back.state_dict[k] is peft[k] for k in peft)
    assert back.alphas == kohya.alphas and back.kohya_names == ""
    same = convert_lora_state_dict(kohya.state_dict, "kohya", unet_config=config, kohya_names=naming).state_dict
    assert list(same) == list(kohya.state_dict) and all(same[k] is kohya.state_dict[k] for k in same)
    renamed = convert_lora_state_dict(kohya.state_dict, "kohya", unet_config=config, kohya_names=other).state_dict
    assert set(renamed).isdisjoint(kohya.state_dict) and len(renamed) == len(kohya.state_dict)
    again = convert_lora_state_dict(renamed, "kohya", unet_config=config, kohya_names=naming).state_dict
    assert list(again) == list(kohya.state_dict)
    assert all(again[k] is kohya.state_dict[k] for k in again if not k.endswith(".alpha"))
    assert all(torch.equal(again[k], kohya.state_dict[k]) for k in again)
    with pytest.raises(ValueError, match="kohya_names='compvis'"):
        convert_lora_state_dict(peft, "kohya", unet_config=config, alpha=ALPHA, kohya_names="compvis")


def test_diffusers_named_kohya_input_comes_out_as_asked(trained):
    config = trained["unet"].config
    diffusers_named = {}
    for key, value in trained["peft"].items():
        module, _, part = key.partition(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        diffusers_named[f"{name}.{'lora_down.weight' if part.startswith('A') else 'lora_up.weight'}"] = value
        diffusers_named[f"{name}.alpha"] = torch.tensor(float(RANK))  # what convert_state_dict_to_kohya writes
    for naming in KOHYA_NAMES:
        out = convert_lora_state_dict(diffusers_named, "kohya", unet_config=config, kohya_names=naming)
        reference = convert_lora_state_dict(
            trained["peft"], "kohya", unet_config=config, alpha=float(RANK), kohya_names=naming
        )
        assert sorted(out.state_dict) == sorted(reference.state_dict), naming
        assert out.kohya_names == reference.kohya_names == (kohya_names_for(config) if naming == "auto" else naming)
    as_is = convert_lora_state_dict(diffusers_named, "kohya", unet_config=config, kohya_names="diffusers")
    assert list(as_is.state_dict) == list(diffusers_named)  # already named as asked: the identity


def test_peft_to_kohya_needs_alpha(trained):
    with pytest.raises(ValueError, match="needs alpha"):
        convert_lora_state_dict(trained["peft"], "kohya", unet_config=trained["unet"].config)
    kohya = convert_lora_state_dict(trained["peft"], "kohya", unet_config=trained["unet"].config, alpha=ALPHA)
    with pytest.raises(ValueError, match="carries its alphas"):
        convert_lora_state_dict(kohya.state_dict, "peft", unet_config=trained["unet"].config, alpha=ALPHA)


def test_kohya_names_follow_the_ldm_layout_of_the_config():
    block = "transformer_blocks.0"
    expected = {  # tiny, layers_per_block=1: input_blocks 1 (res+attn), 2 (op), 3 (res); output_blocks 0..3
        f"down_blocks.0.attentions.0.{block}.attn1.to_q": "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q",
        "down_blocks.0.downsamplers.0.conv": "lora_unet_input_blocks_2_0_op",
        "down_blocks.1.resnets.0.conv_shortcut": "lora_unet_input_blocks_3_0_skip_connection",
        f"mid_block.attentions.0.{block}.attn2.to_k": "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k",
        "mid_block.resnets.1.conv2": "lora_unet_middle_block_2_out_layers_3",
        "up_blocks.0.resnets.1.conv1": "lora_unet_output_blocks_1_0_in_layers_2",
        "up_blocks.0.upsamplers.0.conv": "lora_unet_output_blocks_1_1_conv",
        f"up_blocks.1.attentions.1.{block}.attn1.to_out.0": "lora_unet_output_blocks_3_1_transformer_blocks_0_attn1_to_out_0",
    }
    config = tiny_config(1)
    assert kohya_names_for(config) == "ldm"  # not SD-shaped: "auto" writes ldm names
    for path, name in expected.items():
        assert kohya_module_name(path, config) == kohya_module_name(path, config, "ldm") == name
        assert kohya_module_name(path, config, "diffusers") == "lora_unet_" + path.replace(".", "_")
    with pytest.raises(LoraFormatError, match="not a module"):
        kohya_module_name("down_blocks.5.resnets.0.conv1", config)


def test_kohya_naming_of_reads_the_module_roots():
    """Each kohya name we write, alone, has its naming; other keys are ignored; both namings make "mixed"."""
    for config in (tiny_config(1), None):
        for naming in ("diffusers", "ldm"):
            names = [kohya_module_name(path, config, naming) for path in unet_module_map(config)]
            assert {n: kohya_naming_of([n]) for n in names} == dict.fromkeys(names, naming)
    diffusers = ["lora_unet_conv_in.alpha", "lora_unet_time_embedding_linear_1.lora_down.weight"]
    ldm = ["lora_unet_time_embed_0.alpha", "lora_unet_out_2.lora_up.weight"]
    others = [
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
        "down_blocks.0.attentions.0.proj_in.lora_A.weight",
        "lora_unet_unknown_block_0.alpha",
    ]
    assert kohya_naming_of(dict.fromkeys([*others, *diffusers], torch.zeros(()))) == "diffusers"  # a state dict
    assert kohya_naming_of([*others, *ldm]) == "ldm"
    assert kohya_naming_of([*diffusers, *ldm]) == kohya_naming_of([diffusers[0], ldm[0]]) == "mixed"
    assert kohya_naming_of(others) == kohya_naming_of([]) == ""


@pytest.mark.parametrize("config", [tiny_config(1), tiny_config(2), None], ids=["lpb1", "lpb2", "sd15"])
def test_module_map_agrees_with_comfyui_rules(config):
    """Our module table (lora.py) and the checker's re-implementation of ComfyUI's unet_to_diffusers agree."""
    from accelerate import init_empty_weights

    config = config or sd15_unet_config()
    with init_empty_weights():
        keys = list(UNet2DConditionModel.from_config(config).state_dict())
    comfy = comfyui_unet_to_diffusers(comfyui_unet_config(config))
    table = unet_module_map(config)
    for key in keys:
        module, _, param = key.rpartition(".")
        assert f"{table[module]}.{param}" == comfy[key], key


# ---------------------------------------------------------------------------------------------------- loaders' math
def test_reloaded_kohya_file_gives_the_same_outputs(trained, tmp_path):
    unet = trained["unet"]
    path = tmp_path / "lora.safetensors"
    save_lora_file(path, trained["peft"], "kohya", unet_config=unet.config, alpha=trained["alphas"])
    loaded = load_lora_file(path)
    assert loaded.format == "kohya" and loaded.raw_metadata["ss_network_alpha"] == "8"
    peft = convert_lora_state_dict(loaded.state_dict, "peft", unet_config=loaded.unet_config).state_dict
    fresh = plain_unet(trained["lpb"])
    add_sdm_lora(fresh, sdm_config())
    load_sdm_lora_state_dicts(fresh, SDMLoraStateDicts(lora=peft, spade=trained["spade"]))
    assert_close_for_dtype(run(fresh), run(unet))  # another UNet instance: equal up to rounding


def test_kohya_merge_formula_matches_the_peft_layers(trained):
    """W + (alpha / r) * up @ down, what ComfyUI and A1111 compute from the kohya file, equals the PEFT layer."""
    from peft.tuners.lora import LoraLayer

    unet = trained["unet"]
    kohya = convert_lora_state_dict(trained["peft"], "kohya", unet_config=unet.config, alpha=ALPHA).state_dict
    paths = [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "down_blocks.0.attentions.0.proj_in",  # 1x1 conv
        "down_blocks.0.downsamplers.0.conv",  # 3x3, stride 2
        "up_blocks.0.resnets.0.conv1",  # 3x3
        "up_blocks.0.resnets.0.conv_shortcut",  # 1x1
        "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
    ]
    g = torch.Generator().manual_seed(5)
    for path in paths:
        layer = unet.get_submodule(path)
        assert isinstance(layer, LoraLayer), path
        name = kohya_module_name(path, unet.config)
        up, down = kohya[f"{name}.lora_up.weight"], kohya[f"{name}.lora_down.weight"]
        scale = kohya[f"{name}.alpha"].item() / down.shape[0]
        base = layer.base_layer
        merged = base.weight + scale * (up.flatten(1) @ down.flatten(1)).reshape(base.weight.shape)
        with torch.no_grad():
            if isinstance(base, torch.nn.Linear):
                x = torch.randn(3, base.in_features, generator=g)
                expected, got = layer(x), F.linear(x, merged, base.bias)
            else:
                x = torch.randn(2, base.in_channels, 8, 8, generator=g)
                expected = layer(x)
                got = F.conv2d(x, merged, base.bias, base.stride, base.padding, base.dilation, base.groups)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=path)


@pytest.mark.parametrize("naming", ["diffusers", "ldm"])
def test_diffusers_loads_the_kohya_file(trained, naming, tmp_path):
    """diffusers' own kohya reader (``lora_state_dict`` + ``load_lora_adapter``), with the right alpha.

    Diffusers names: read as they are, for any layout, without the UNet config. ldm names: only with
    ``unet_config`` (``_maybe_map_sgm_blocks_to_diffusers``, which ``StableDiffusionPipeline.load_lora_weights``
    never calls by itself), and with a limit of its own: inner index 1 of an output block is always read as
    ``attentions``, so an upsampler LoRA in an up block without attention (``output_blocks_N_1_conv``; SD 1.5's
    ``up_blocks.0``) lands on a missing module (diffusers warns). ComfyUI and A1111 are not affected.
    """
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from peft import LoraConfig, set_peft_model_state_dict

    config = trained["unet"].config
    peft = trained["peft"]
    if naming == "ldm":
        peft = {k: v for k, v in peft.items() if not k.startswith("up_blocks.0.upsamplers.")}
    path = tmp_path / "lora.safetensors"
    conv = save_lora_file(path, peft, "kohya", unet_config=config, alpha=ALPHA, kohya_names=naming)
    assert load_lora_file(path).raw_metadata["l2i.kohya_names"] == naming
    kwargs = {"unet_config": config} if naming == "ldm" else {}
    state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(str(path), **kwargs)
    by_diffusers = plain_unet(trained["lpb"])
    by_diffusers.load_lora_adapter(state, prefix="unet", network_alphas=alphas, adapter_name="k")
    reference = plain_unet(trained["lpb"])
    reference.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(conv.modules)))
    set_peft_model_state_dict(reference, peft)
    assert torch.allclose(run(by_diffusers, layout=False), run(reference, layout=False), atol=1e-6)


def test_sd1x_shaped_kohya_export_loads_in_a_plain_diffusers_pipeline(tmp_path):
    """A tiny UNet with SD 1.x's block structure, SDM-LoRA on attention AND convs, exported by `save_sdm_lora`
    (what the trainer calls): the kohya file has diffusers names, and a plain
    ``StableDiffusionPipeline.load_lora_weights(path)`` puts exactly our LoRA weights (max abs diff 0), scaled by
    alpha / r, into the pipeline's UNet, with no key warning; its outputs equal our PEFT model's."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, set_peft_model_state_dict

    config = sd1x_tiny_unet_config()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).eval()
    base_state = {k: v.clone() for k, v in unet.state_dict().items()}
    add_sdm_lora(unet, sdm_config())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in sdm_lora_parameters(unet):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft = get_sdm_lora_state_dicts(unet).lora
    assert any(k.startswith("down_blocks.0.attentions.0.") for k in peft)
    assert any(".resnets." in k and ".conv1." in k for k in peft) and any(".downsamplers.0.conv." in k for k in peft)
    files = save_sdm_lora(unet, tmp_path / "sd1x_sdm.safetensors", LABELS, base_model="tiny/sd1x")
    assert kohya_names_for(config) == "diffusers" and files.lora.kohya_names == "diffusers"
    saved = load_lora_file(files.lora_path)
    assert saved.raw_metadata["l2i.kohya_names"] == "diffusers"
    assert kohya_naming_of(saved.state_dict) == "diffusers"
    assert check_lora_file(files.lora_path).ok
    report = inspect_weights(files.lora_path)
    assert "diffusers pipe.load_lora_weights(path)" in report.loaders  # the plain call: no unet_config= needed
    assert not any("ldm module names" in n for n in report.notes)
    assert set(report.key_groups) <= {f"lora_unet_{b}_{i}" for b in ("down_blocks", "up_blocks") for i in range(4)} | {
        "lora_unet_mid_block"
    }
    # The same LoRA forced to ldm names: it has conv keys in ldm blocks 1 and 10/11, which diffusers' SD pipeline
    # cannot map even with unet_config=, so that loader is not offered and the note says how to fix the file.
    ldm_file = tmp_path / "sd1x_ldm.safetensors"
    assert convert_lora_file(files.lora_path, ldm_file, "kohya", kohya_names="ldm").kohya_names == "ldm"
    ldm_report = inspect_weights(ldm_file)
    assert not any(loader.startswith("diffusers") for loader in ldm_report.loaders)
    assert "ComfyUI 'Load LoRA' / 'LoraLoaderModelOnly'" in ldm_report.loaders
    (note,) = [n for n in ldm_report.notes if "ldm module names" in n]
    assert "not at all here" in note and "l2i-convert lora --to kohya IN OUT" in note

    # a tiny SD folder (VAE, CLIP text encoder 32 wide) around this UNet config, its UNet set to the base weights
    pipe = StableDiffusionPipeline.from_pretrained(
        write_tiny_sd(tmp_path / "sd", unet=config),
        local_files_only=True,
        safety_checker=None,
        requires_safety_checker=False,
    )
    pipe.unet.load_state_dict(base_state)
    assert not pipe.unet.training
    with capture_loader_messages() as lines:
        pipe.load_lora_weights(str(files.lora_path))  # plain: no unet_config, no adapter metadata
    assert loader_problems(lines) == []

    (adapter,) = pipe.get_active_adapters()
    state = pipe.unet.state_dict()
    loaded = {k for k in state if f".lora_A.{adapter}." in k or f".lora_B.{adapter}." in k}
    in_pipe = {k: re.sub(r"\.lora_([AB])\.", rf".lora_\1.{adapter}.", k) for k in peft}
    assert loaded == set(in_pipe.values())
    diff = max((state[in_pipe[k]] - v).abs().max().item() for k, v in peft.items())
    assert diff == 0.0
    modules = {k.rpartition(".lora_")[0] for k in peft}
    assert {pipe.unet.get_submodule(m).scaling[adapter] for m in modules} == {ALPHA / RANK}

    reference = UNet2DConditionModel(**config).eval()
    reference.load_state_dict(base_state)
    reference.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=sorted(modules)))
    set_peft_model_state_dict(reference, peft)
    assert torch.allclose(run(pipe.unet, layout=False), run(reference, layout=False), atol=1e-6)


# ---------------------------------------------------------------------------------------------------- the checker
def test_every_key_passes_comfyui_and_a1111_rules(trained):
    kohya = convert_lora_state_dict(trained["peft"], "kohya", unet_config=trained["unet"].config, alpha=ALPHA)
    report = check_lora_state_dict(kohya.state_dict, trained["unet"].config)
    assert report.ok, report.to_text()
    assert report.comfyui_warnings() == []
    assert all(c.comfyui_detail.startswith("diffusion_model.") for c in report.checks)
    assert all(c.a1111_detail.startswith("diffusion_model_") for c in report.checks)


def test_wrong_keys_are_reported_not_loaded(trained):
    config = trained["unet"].config
    kohya = dict(convert_lora_state_dict(trained["peft"], "kohya", unet_config=config, alpha=ALPHA).state_dict)
    good = kohya_module_name("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", config)
    typo = good.replace("to_q", "to_z")
    kohya[f"{typo}.lora_down.weight"] = torch.zeros(RANK, 32)
    kohya[f"{typo}.lora_up.weight"] = torch.zeros(32, RANK)
    kohya["sdm_spade.sites_x.sem_gamma.weight"] = torch.zeros(3)
    report = check_lora_state_dict(kohya, config)
    bad = {c.key: c for c in report.checks if c.comfyui != "loaded" or c.a1111 != "loaded"}
    assert set(bad) == {f"{typo}.lora_down.weight", f"{typo}.lora_up.weight", "sdm_spade.sites_x.sem_gamma.weight"}
    assert all(c.comfyui == "not loaded" and c.a1111 == "not loaded" for c in bad.values())
    assert f"lora key not loaded: {typo}.lora_down.weight" in report.comfyui_warnings()
    assert "3 key(s) do not load" in report.to_text()


def test_broken_pairs_and_shapes_are_errors(trained):
    config = trained["unet"].config
    name = kohya_module_name("up_blocks.0.resnets.0.conv1", config)
    lone_up = {f"{name}.lora_up.weight": torch.zeros(64, RANK, 1, 1)}
    check = check_lora_state_dict(lone_up, config).checks[0]
    assert check.comfyui == "error" and "KeyError" in check.comfyui_detail
    assert check.a1111 == "error" and "AssertionError" in check.a1111_detail
    wrong = {
        f"{name}.lora_down.weight": torch.zeros(RANK, 5, 3, 3),
        f"{name}.lora_up.weight": torch.zeros(64, RANK, 1, 1),
    }
    assert {c.comfyui for c in check_lora_state_dict(wrong, config).checks} == {"error"}
    norm_name = kohya_module_name("up_blocks.0.resnets.0.norm1", config)  # in_layers_0 in ldm names
    norm = {
        f"{norm_name}.lora_down.weight": torch.zeros(RANK, 128),
        f"{norm_name}.lora_up.weight": torch.zeros(128, RANK),
    }
    assert {c.a1111 for c in check_lora_state_dict(norm, config).checks} == {"error"}  # LoRA on a GroupNorm


def _poisoned(state_dict: dict, keys: list[str]) -> dict:
    """A copy of ``state_dict`` with two NaN values in ``keys[0]`` and one inf in each other key."""
    out = dict(state_dict)
    for i, key in enumerate(keys):
        t = out[key].clone()
        t.view(-1)[: 2 if i == 0 else 1] = float("nan") if i == 0 else float("inf") * (-1) ** i
        out[key] = t
    return out


def _listed(message: str) -> dict[str, str]:
    """``key -> "n NaN" / "n inf"`` for every entry a non-finite error lists."""
    return {m[0]: m[1] for m in re.findall(r"([\w.]+) \((\d+ (?:NaN|inf)) of \d+ values\)", message)}


def test_nan_or_inf_lora_tensors_are_refused_by_name(trained):
    """A NaN or inf in any LoRA matrix: one error with the count and the first three keys (with what they hold),
    whatever the direction; the input is left as it was."""
    config, alphas = trained["unet"].config, trained["alphas"]
    peft = trained["peft"]
    keys = [k for k in peft if k.endswith("lora_B.weight")][:2] + [k for k in peft if k.endswith("lora_A.weight")][-2:]
    bad = _poisoned(peft, keys)
    before = {k: v.clone() for k, v in bad.items()}
    for to in LORA_FORMATS:
        with pytest.raises(LoraFormatError) as err:
            convert_lora_state_dict(bad, to, unet_config=config, alpha=alphas)
        message = str(err.value)
        assert message.startswith("4 LoRA tensor(s) hold NaN or infinite values: ") and "(4 in all)" in message
        assert "\n" not in message and "not converted" in message
        listed = _listed(message)
        assert len(listed) == 3 and set(listed) <= set(keys)
        assert listed.get(keys[0], "2 NaN") == "2 NaN" and all(v == "1 inf" for k, v in listed.items() if k != keys[0])
    assert all(torch.equal(bad[k].nan_to_num(), v.nan_to_num()) for k, v in before.items())  # input untouched
    # a kohya input too (the file l2i-convert reads), named by its own keys
    kohya = convert_lora_state_dict(peft, "kohya", unet_config=config, alpha=alphas).state_dict
    down = next(k for k in kohya if k.endswith(".lora_down.weight"))
    with pytest.raises(LoraFormatError, match=rf"^1 LoRA tensor\(s\) hold NaN or infinite values: {re.escape(down)} "):
        convert_lora_state_dict(_poisoned(kohya, [down]), "peft", unet_config=config)


def test_a_nan_lora_file_is_named_by_convert_and_flagged_by_inspect(trained, tmp_path, capsys):
    """``l2i-convert lora`` names the input file besides the tensors; ``inspect`` says the file holds NaN/inf (count,
    first tensors) and lists no loader, where the clean file lists some."""
    config, alphas = trained["unet"].config, trained["alphas"]
    kohya = dict(convert_lora_state_dict(trained["peft"], "kohya", unet_config=config, alpha=alphas).state_dict)
    clean = tmp_path / "clean.safetensors"
    save_file(kohya, str(clean))
    downs = [k for k in kohya if k.endswith(".lora_down.weight")][:4]
    bad = tmp_path / "diverged.safetensors"
    save_file(_poisoned(kohya, downs), str(bad))
    with pytest.raises(LoraFormatError, match=rf"^{re.escape(repr(str(bad)))}: 4 LoRA tensor\(s\) hold NaN"):
        convert_lora_file(bad, tmp_path / "out.safetensors", "peft", unet_config=config)
    assert main(["lora", str(bad), str(tmp_path / "out.safetensors"), "--to", "peft"]) == 1
    assert str(bad) in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()
    assert inspect_weights(clean).loaders
    report = inspect_weights(bad)
    assert report.kind == "lora" and report.loaders == ()
    assert "NaN/inf values: no loader gives usable images" in report.summary
    note = report.notes[0]
    assert note.startswith("4 tensor(s) hold NaN or infinite values: ") and "and 1 more" in note
    assert set(_listed(note)) <= set(downs) and len(_listed(note)) == 3
    assert main(["inspect", str(bad)]) == 0
    assert "4 tensor(s) hold NaN" in capsys.readouterr().out


def test_a_cast_that_overflows_is_refused_and_writes_nothing(trained, tmp_path):
    config, alphas = trained["unet"].config, trained["alphas"]
    key = next(iter(trained["peft"]))
    big = dict(trained["peft"])
    big[key] = big[key].clone()
    big[key].view(-1)[0] = 1e6  # finite in float32, inf in float16
    path = tmp_path / "half.safetensors"
    with pytest.raises(LoraFormatError, match=r"after the cast to torch.float16 \(values beyond its range\)"):
        save_lora_file(path, big, "kohya", unet_config=config, alpha=alphas, dtype=torch.float16)
    assert list(tmp_path.iterdir()) == []
    save_lora_file(path, big, "kohya", unet_config=config, alpha=alphas)  # float32 holds it
    assert load_lora_file(path).format == "kohya"


@pytest.mark.skipif(os.name == "nt", reason="POSIX file modes")
def test_lora_files_get_the_umask_mode(trained, tmp_path):
    """Written atomically with ``0o666 & ~umask`` (safetensors' own writer left 0o600: issue 15, A6)."""
    previous = os.umask(0o027)
    try:
        save_lora_file(tmp_path / "sub" / "k.safetensors", trained["peft"], "kohya",
                       unet_config=trained["unet"].config, alpha=trained["alphas"])  # fmt: skip
    finally:
        os.umask(previous)
    written = tmp_path / "sub" / "k.safetensors"
    assert oct(written.stat().st_mode & 0o777) == oct(0o640)
    assert [p.name for p in written.parent.iterdir()] == ["k.safetensors"]  # no temporary file left


def test_split_modules_are_reexported_from_weights_lora():
    """`weights.lora` re-exports the public names of the naming and conversion modules (the import path users and
    the rest of the pack use)."""
    from layout2image.weights import lora, lora_convert, lora_naming

    for module in (lora_naming, lora_convert):
        for name in module.__all__:
            assert name in lora.__all__ and getattr(lora, name) is getattr(module, name), (module.__name__, name)


def _meta_peft_lora(config: dict, targets: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """A PEFT LoRA (meta tensors, rank RANK) on every Linear/conv module of the layout, or on the ``targets``
    suffixes in the down/mid/up blocks, for a UNet built on the meta device."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    table = unet_module_map(config)
    peft = {}
    for name, module in unet.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or name not in table:
            continue
        in_blocks = name.startswith(("down_blocks", "mid_block", "up_blocks"))
        if targets is not None and not (in_blocks and name.endswith(tuple("." + t for t in targets))):
            continue
        w = module.weight
        down = (RANK, *w.shape[1:]) if w.ndim == 4 else (RANK, w.shape[1])
        up = (w.shape[0], RANK, 1, 1) if w.ndim == 4 else (w.shape[0], RANK)
        peft[f"{name}.lora_A.weight"] = torch.empty(down, device="meta")
        peft[f"{name}.lora_B.weight"] = torch.empty(up, device="meta")
    return peft


def _sd2_config() -> dict:
    """SD 2.x's UNet layout (SD 1.5's blocks; per-level heads, linear projections, 1024-wide text)."""
    config = json.loads(SD15_CONFIG.read_text())
    config.update(attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True)
    return config


def _other_layouts() -> dict[str, dict]:
    """Layouts where A1111's diffusers-name arithmetic is wrong (auto writes ldm names)."""
    sdxl_like = dict(  # SDXL's block order (attention in up_blocks.0, none in the first level), tiny widths
        tiny_config(2),
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    )
    return {"toy-lpb1": tiny_config(1), "lpb3": tiny_config(3), "sdxl-order": sdxl_like}


@pytest.mark.parametrize(
    ("config", "naming"),
    [
        (None, "diffusers"),
        (_sd2_config(), "diffusers"),
        (tiny_config(2), "diffusers"),  # 2 levels but SD 1.x's arithmetic: 3 ldm blocks per level, up_blocks.0 plain
        (sd1x_tiny_unet_config(), "diffusers"),
        *((c, "ldm") for c in _other_layouts().values()),
    ],
    ids=["sd15", "sd2", "tiny-lpb2", "sd1x-tiny", *_other_layouts()],
)
def test_kohya_naming_rule_follows_the_loaders(config, naming):
    """``auto`` writes diffusers names exactly when they load on the right modules in both UIs (`lora_check`): then
    the diffusers-named file of EVERY Linear/conv module passes ComfyUI's and A1111's rules; otherwise A1111 (SD 1.x
    block arithmetic) misplaces or drops some of them and ldm names are written. ldm names pass for every layout."""
    config = config or sd15_unet_config()
    assert kohya_names_for(config) == naming
    peft = _meta_peft_lora(config)
    auto = convert_lora_state_dict(peft, "kohya", unet_config=config, alpha=ALPHA)
    assert auto.kohya_names == naming
    ldm = convert_lora_state_dict(peft, "kohya", unet_config=config, alpha=ALPHA, kohya_names="ldm").state_dict
    diffusers = convert_lora_state_dict(peft, "kohya", unet_config=config, alpha=ALPHA, kohya_names="diffusers")
    assert check_lora_state_dict(ldm, config).ok
    report = check_lora_state_dict(diffusers.state_dict, config)
    assert report.comfyui_ok, report.to_text()
    assert report.a1111_ok == (naming == "diffusers"), report.to_text()
    assert check_lora_state_dict(auto.state_dict, config).ok


def test_why_not_peft_names_and_not_always_diffusers_names():
    """A1111 maps diffusers-named kohya keys with SD 1.x block arithmetic (3 per level): wrong for other layouts,
    such as the toy world's (layers_per_block=1), which therefore get ldm names.
    PEFT names: ComfyUI drops their attention keys (Comfy-Org/ComfyUI#9753), A1111 reads none."""
    unet = sdm_unet(1)
    peft = get_sdm_lora_state_dicts(unet).lora
    diffusers_named = {
        "lora_unet_"
        + k.partition(".lora_")[0].replace(".", "_")
        + (".lora_down.weight" if ".lora_A." in k else ".lora_up.weight"): v
        for k, v in peft.items()
    }
    report = check_lora_state_dict(diffusers_named, unet.config)
    assert report.comfyui_ok and not report.a1111_ok
    written = convert_lora_state_dict(peft, "kohya", unet_config=unet.config, alpha=ALPHA)
    assert written.kohya_names == "ldm" and check_lora_state_dict(written.state_dict, unet.config).ok
    assert kohya_naming_of(written.state_dict) == "ldm"
    peft_report = check_lora_state_dict(peft, unet.config)
    not_loaded = {c.key for c in peft_report.failing("comfyui")}
    assert not_loaded and all(".attn" in k for k in not_loaded)
    assert len(peft_report.failing("a1111")) == len(peft)


SD15_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "conv", "time_emb_proj")  # fmt: skip


@pytest.mark.parametrize(
    ("kohya_names", "expected"),
    [
        (
            "auto",  # SD 1.5 is SD 1.x-shaped: diffusers names, as kohya's sd-scripts writes for SD 1.x
            (
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k",
                "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_out_0",
                "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
                "lora_unet_down_blocks_0_downsamplers_0_conv",
                "lora_unet_up_blocks_0_upsamplers_0_conv",
                "lora_unet_up_blocks_1_upsamplers_0_conv",
                "lora_unet_up_blocks_0_resnets_0_time_emb_proj",
            ),
        ),
        (
            "ldm",
            (
                "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q",
                "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k",
                "lora_unet_output_blocks_11_1_transformer_blocks_0_attn1_to_out_0",
                "lora_unet_input_blocks_4_0_skip_connection",  # down_blocks.1.resnets.0.conv_shortcut
                "lora_unet_input_blocks_3_0_op",  # down_blocks.0.downsamplers.0.conv
                "lora_unet_output_blocks_2_1_conv",  # up_blocks.0.upsamplers.0.conv (no attention in up_blocks.0)
                "lora_unet_output_blocks_5_2_conv",  # up_blocks.1.upsamplers.0.conv (after an attention)
                "lora_unet_output_blocks_0_0_emb_layers_1",  # up_blocks.0.resnets.0.time_emb_proj
            ),
        ),
    ],
)
def test_sd15_export_names_pass_the_checker(kohya_names, expected):
    """SD 1.5 (built on the meta device): the kohya export of every attention/conv/ff LoRA module uses diffusers
    names by default (ldm names on request), and every key converts and loads in both UIs."""
    config = json.loads(SD15_CONFIG.read_text())
    peft = _meta_peft_lora(config, SD15_TARGETS)
    conv = convert_lora_state_dict(peft, "kohya", unet_config=config, alpha=ALPHA, kohya_names=kohya_names)
    kohya = conv.state_dict
    assert len(kohya) == len(peft) // 2 * 3
    assert conv.kohya_names == ("diffusers" if kohya_names == "auto" else "ldm")
    for name in expected:
        assert f"{name}.lora_down.weight" in kohya, name
    assert kohya_naming_of(kohya) == conv.kohya_names
    report = check_lora_state_dict(kohya, config)
    assert report.ok, report.to_text()
    assert report.comfyui_warnings() == []
    assert list(convert_lora_state_dict(kohya, "peft", unet_config=config).state_dict) == list(peft)
    assert sd15_unet_config() == config and kohya_names_for(None) == "diffusers"  # files without l2i.unet_config


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="set COMFYUI_PATH to a ComfyUI checkout")
@pytest.mark.parametrize("config", [tiny_config(1), tiny_config(2), None], ids=["lpb1", "lpb2", "sd15"])
def test_comfyui_rules_match_comfyui_itself(config, monkeypatch):
    """The checker's unet_to_diffusers equals ComfyUI's own (which also lists SDXL's add_embedding keys)."""
    monkeypatch.syspath_prepend(os.environ["COMFYUI_PATH"])
    comfy_utils = pytest.importorskip("comfy.utils")
    comfy_config = comfyui_unet_config(config)
    theirs = comfy_utils.unet_to_diffusers(dict(comfy_config))
    ours = comfyui_unet_to_diffusers(comfy_config)
    assert {k: theirs.get(k) for k in ours} == ours
    assert all(k.startswith("add_embedding.") for k in set(theirs) - set(ours))


def _import_comfyui(monkeypatch):
    """ComfyUI's modules from COMFYUI_PATH, CPU-only (skips when they cannot be imported here)."""
    monkeypatch.syspath_prepend(os.environ["COMFYUI_PATH"])
    monkeypatch.setattr(sys, "argv", ["comfyui", "--cpu"])
    options = pytest.importorskip("comfy.options")
    options.enable_args_parsing()
    try:
        import comfy.lora
        import comfy.model_detection
        import comfy.ops
        from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    except Exception as e:  # a checkout without its requirements installed
        pytest.skip(f"cannot import ComfyUI from COMFYUI_PATH: {e}")
    return comfy, UNetModel


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="set COMFYUI_PATH to a ComfyUI checkout")
def test_comfyui_loader_loads_every_key(trained, monkeypatch, caplog):
    """ComfyUI's own model_lora_keys_unet + load_lora on an ldm UNet of this config: no 'lora key not loaded', every
    patch hits a weight, and its calculate_weight gives W + (alpha / r) up @ down, PEFT's delta."""
    comfy, UNetModel = _import_comfyui(monkeypatch)
    unet = trained["unet"]
    ldm = {k: torch.empty(v, device="meta") for k, v in ldm_unet_shapes(unet.config).items()}
    config = comfy.model_detection.detect_unet_config(ldm, "")
    assert {k: config[k] for k in comfyui_unet_config(unet.config) if k != "channel_mult"} == {
        k: v for k, v in comfyui_unet_config(unet.config).items() if k != "channel_mult"
    }
    model = torch.nn.Module()
    model.diffusion_model = UNetModel(**config, num_heads=4, device="meta", operations=comfy.ops.disable_weight_init)
    model.model_config = SimpleNamespace(unet_config=config)
    assert set(model.state_dict()) == {f"diffusion_model.{k}" for k in ldm}
    kohya = convert_lora_state_dict(trained["peft"], "kohya", unet_config=unet.config, alpha=ALPHA).state_dict
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(kohya, comfy.lora.model_lora_keys_unet(model, {}))
    assert not [r for r in caplog.records if "not loaded" in r.getMessage()]
    assert len(patches) == len(trained["peft"]) // 2 and set(patches) <= set(model.state_dict())
    path = "up_blocks.0.resnets.0.conv1"
    target = "diffusion_model." + unet_module_map(unet.config)[path] + ".weight"
    layer = unet.get_submodule(path)
    weight = layer.base_layer.weight.detach().clone()
    merged = comfy.lora.calculate_weight([(1.0, patches[target], 1.0, None, None)], weight.clone(), target)
    torch.testing.assert_close(merged, weight + layer.get_delta_weight("default"))


# ---------------------------------------------------------------------------------------------------- SDM-LoRA files
def test_sdm_lora_writes_two_files_and_no_spade_keys_in_the_lora(saved):
    files = saved["files"]
    assert files.lora_path.name == "toy_sdm.safetensors" and files.spade_path.name == "toy_sdm.spade.safetensors"
    assert spade_path_for(files.lora_path) == files.spade_path
    lora = load_file(files.lora_path)
    assert all(
        k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in lora
    )
    assert not any("sem_" in k or "sites" in k for k in lora)
    assert check_lora_file(files.lora_path).ok
    # the toy-shaped UNet (layers_per_block=1) is not SD 1.x-shaped: ldm module names
    assert load_lora_file(files.lora_path).raw_metadata["l2i.kohya_names"] == files.lora.kohya_names == "ldm"
    assert kohya_naming_of(lora) == "ldm"
    spade = load_file(files.spade_path)
    assert set(spade) == set(get_spade_adapter(saved["unet"]).state_dict())


def test_spade_companion_metadata(saved):
    spade = load_spade_file(saved["files"].spade_path)
    adapter = get_spade_adapter(saved["unet"])
    md = spade.metadata
    assert md.kind == "spade" and md.format_version == 1 and md.hint_encoding == "onehot"
    assert md.base_model == "toy/base" and md.label_set == LABELS
    assert md.label_set.fingerprint() == LABELS.fingerprint()
    assert spade.spade_config["site_names"] == adapter.site_names
    assert spade.sites == [(s.name, s.num_channels) for s in find_spade_sites(saved["unet"])]
    assert spade.spade_config["layout_channels"] == LABELS.num_classes and spade.spade_config["hidden_channels"] == 16
    assert spade.ldm_sites[:2] == ("middle_block.0.in_layers.0", "middle_block.0.out_layers.0")
    assert json.loads(md.extra["sites"]) == adapter.site_names
    rebuilt = spade.build_adapter()
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in adapter.state_dict().items())


@pytest.mark.parametrize("prepared", [False, True], ids=["plain-unet", "prepared-unet"])
def test_load_sdm_lora_round_trip(saved, prepared):
    unet = plain_unet(1)
    if prepared:
        add_sdm_lora(unet, sdm_config())
    files = load_sdm_lora(unet, saved["files"].lora_path, LABELS)
    assert_close_for_dtype(run(unet), saved["out"])  # weights read from the file: outputs up to rounding
    want = get_sdm_lora_state_dicts(saved["unet"])
    got = get_sdm_lora_state_dicts(unet)
    assert all(torch.equal(got.lora[k], v) for k, v in want.lora.items()) and got.lora.keys() == want.lora.keys()
    assert all(torch.equal(got.spade[k], v) for k, v in want.spade.items())
    assert set(files.lora.alphas.values()) == {ALPHA}


def test_label_set_mismatch_names_both(saved):
    other = LabelSet.from_dict({**LABELS.to_dict(), "name": "toy2", "classes": LABELS.to_dict()["classes"][::-1]})
    with pytest.raises(MetadataError, match="label set mismatch") as err:
        load_sdm_lora(plain_unet(1), saved["files"].lora_path, other)
    assert "'toy'" in str(err.value) and "'toy2'" in str(err.value)


def test_site_mismatch_names_both(saved):
    with pytest.raises(SPADESiteMismatchError, match="site mismatch") as err:
        load_sdm_lora(plain_unet(2), saved["files"].lora_path, LABELS)
    assert "toy_sdm.spade.safetensors" in str(err.value) and "the UNet" in str(err.value)
    spade = load_spade_file(saved["files"].spade_path)
    with pytest.raises(SPADESiteMismatchError, match="site 0 is mid_block.resnets.0.norm1"):
        spade.check_sites([("mid_block.resnets.0.norm2", 64)] + spade.sites[1:])


def test_prepared_unet_with_other_alpha_is_refused(saved):
    unet = plain_unet(1)
    add_sdm_lora(unet, sdm_config(lora_alpha=16.0))
    with pytest.raises(WeightsError, match="alpha differs"):
        load_sdm_lora(unet, saved["files"].lora_path, LABELS)


def test_missing_or_wrong_companion(saved, tmp_path):
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes(saved["files"].lora_path.read_bytes())
    with pytest.raises(WeightsFileError, match="no SPADE companion"):
        load_sdm_lora(plain_unet(1), lone, LABELS)
    with pytest.raises(MetadataError, match="not a SPADE companion"):
        load_spade_file(saved["files"].lora_path)
    with pytest.raises(ValueError, match="companion itself"):
        spade_path_for(saved["files"].spade_path)


def test_encoding_must_fit_the_label_set(tmp_path):
    unet = sdm_unet(1)
    with pytest.raises(MetadataError, match="gives 9"):
        save_sdm_lora(unet, tmp_path / "x.safetensors", LABELS, hint_encoding="onehot_edges")
    with pytest.raises(MetadataError, match="SPADE adapter reads"):
        save_sdm_lora(unet, tmp_path / "x.safetensors", LABELS, hint_encoding="rgb")


def test_saving_does_not_touch_the_unet(tmp_path):
    unet = sdm_unet(1)
    before, state = run(unet), {k: v.clone() for k, v in unet.state_dict().items()}
    save_sdm_lora(unet, tmp_path / "x.safetensors", LABELS, dtype=torch.float16)
    assert torch.equal(run(unet), before)
    assert all(torch.equal(v, state[k]) for k, v in unet.state_dict().items())
    assert {v.dtype for v in load_file(tmp_path / "x.safetensors").values() if v.ndim} == {torch.float16}


# ---------------------------------------------------------------------------------------------------- CLI, inspect
def test_cli_lora_round_trip(saved, tmp_path, capsys):
    kohya = saved["files"].lora_path
    assert _LORA_TARGETS == LORA_FORMATS
    assert main(["lora", "--to", "peft", str(kohya), str(tmp_path / "peft.safetensors")]) == 0
    assert f"peft, {len(saved['files'].lora.modules)} modules, rank 4, alpha 8" in capsys.readouterr().out
    peft = load_file(tmp_path / "peft.safetensors")
    assert all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in peft)
    assert main(["lora", "--to", "kohya", str(tmp_path / "peft.safetensors"), str(tmp_path / "k.safetensors")]) == 0
    original, again = load_file(kohya), load_file(tmp_path / "k.safetensors")
    assert list(again) == list(original) and all(torch.equal(again[k], original[k]) for k in original)


def test_cli_kohya_names_option(saved, tmp_path, capsys, l2i_caplog):
    """--kohya-names forces a naming (diffusers names on the toy layout: a warning, the checker sees A1111 fail); the
    default (auto) brings the file back to ldm names with the same tensors; the option is refused with --to peft."""
    kohya = saved["files"].lora_path
    assert _KOHYA_NAMES == KOHYA_NAMES
    forced = tmp_path / "forced.safetensors"
    assert main(["lora", "--to", "kohya", str(kohya), str(forced), "--kohya-names", "diffusers"]) == 0
    assert "diffusers module names" in capsys.readouterr().out
    (warning,) = [r.getMessage() for r in l2i_caplog.records if "kohya_names='diffusers'" in r.getMessage()]
    assert "not SD 1.x/2.x-shaped" in warning and "A1111" in warning
    loaded = load_lora_file(forced)
    assert loaded.raw_metadata["l2i.kohya_names"] == "diffusers"
    assert kohya_naming_of(loaded.state_dict) == "diffusers"
    report = check_lora_file(forced)
    assert report.comfyui_ok and not report.a1111_ok
    back = tmp_path / "back.safetensors"
    assert main(["lora", "--to", "kohya", str(forced), str(back)]) == 0
    assert "ldm module names" in capsys.readouterr().out
    original, again = load_file(kohya), load_file(back)
    assert list(again) == list(original) and all(torch.equal(again[k], original[k]) for k in original)
    assert load_lora_file(back).raw_metadata["l2i.kohya_names"] == "ldm"
    peft = tmp_path / "p.safetensors"
    assert main(["lora", "--to", "peft", str(forced), str(peft)]) == 0
    assert "l2i.kohya_names" not in load_lora_file(peft).raw_metadata
    with pytest.raises(SystemExit) as err:
        main(["lora", "--to", "peft", str(kohya), str(tmp_path / "p2.safetensors"), "--kohya-names", "ldm"])
    assert err.value.code == 2 and "only with --to kohya" in capsys.readouterr().err


def test_cli_peft_without_alpha(tmp_path, capsys):
    unet = sdm_unet(1)
    bare = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in get_sdm_lora_state_dicts(unet).lora.items()}, str(bare))
    config = tmp_path / "unet"
    config.mkdir()
    (config / "config.json").write_text(json.dumps(tiny_config(1)))
    args = ["lora", "--to", "kohya", str(bare), str(tmp_path / "k.safetensors"), "--unet-config", str(config)]
    assert main(args) == 1
    assert "--alpha" in capsys.readouterr().err
    assert main([*args, "--alpha", "8"]) == 0
    assert check_lora_file(tmp_path / "k.safetensors").ok  # l2i.unet_config was stored
    assert main(["lora", "--to", "kohya", str(bare), str(tmp_path / "k2.safetensors"), "--alpha", "8"]) == 1
    assert "does not fit the UNet config" in capsys.readouterr().err  # the SD 1.5 default: names fit, shapes not


def test_inspect_lora_and_spade_files(saved, tmp_path):
    report = inspect_weights(saved["files"].lora_path)
    assert report.kind == "lora" and report.lora_summary.ranks == (RANK,) and report.lora_summary.alphas == (ALPHA,)
    text = report.to_text()
    assert f"kohya UNet LoRA, {len(saved['files'].lora.modules)} modules" in text and "alpha 8, scale 2" in text
    assert "ComfyUI 'Load LoRA'" in text and "AUTOMATIC1111" in text and "spade.safetensors" in text
    assert "l2i.unet_config" not in text and '"in_channels"' not in text  # long JSON fields are not printed
    # The toy layout (layers_per_block=1) gets ldm names: diffusers needs unet_config=, and the report says so.
    assert "diffusers pipe.load_lora_weights(path, unet_config=pipe.unet.config)" in report.loaders
    (note,) = [n for n in report.notes if "ldm module names" in n]
    assert "the right ones for this UNet layout" in note and "l2i-convert" not in note  # nothing to fix
    assert report.key_groups and all(
        g.startswith(("lora_unet_input_blocks_", "lora_unet_output_blocks_", "lora_unet_middle_block"))
        for g in report.key_groups
    )
    spade = inspect_weights(saved["files"].spade_path)
    assert spade.kind == "spade" and "12 GroupNorm sites, 8 layout channels" in spade.summary
    peft = tmp_path / "peft.safetensors"
    save_file({k: v.contiguous() for k, v in get_sdm_lora_state_dicts(saved["unet"]).lora.items()}, str(peft))
    peft_report = inspect_weights(peft)
    assert peft_report.kind == "lora" and any("l2i-convert lora --to kohya" in n for n in peft_report.notes)


# ---------------------------------------------------------------------------------------------------- bad input
def test_unknown_and_mixed_keys(trained):
    config = trained["unet"].config
    kohya = dict(convert_lora_state_dict(trained["peft"], "kohya", unet_config=config, alpha=ALPHA).state_dict)
    te = "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"
    with pytest.raises(LoraFormatError, match="lora_te_text_model") as err:
        convert_lora_state_dict({**kohya, te: torch.zeros(4, 8)}, "peft", unet_config=config)
    assert "Known formats" in str(err.value)
    lenient = convert_lora_state_dict({**kohya, te: torch.zeros(4, 8)}, "peft", unet_config=config, strict=False)
    assert lenient.unexpected == (te,) and list(lenient.state_dict) == list(trained["peft"])
    with pytest.raises(LoraFormatError, match="mixes kohya keys"):
        detect_lora_format({**kohya, **trained["peft"]})
    with pytest.raises(LoraFormatError, match="no UNet LoRA keys.*known formats"):
        detect_lora_format({"model.diffusion_model.out.2.weight": 0})
    first = next(k for k in kohya if k.endswith(".lora_up.weight"))
    with pytest.raises(LoraFormatError, match="lack lora_down"):
        convert_lora_state_dict({k: v for k, v in kohya.items() if k != first}, "peft", unet_config=config)
    shape = kohya[first].shape
    with pytest.raises(LoraFormatError, match="does not fit lora_down"):
        convert_lora_state_dict(
            {**kohya, first: torch.zeros(shape[0], RANK + 1, *shape[2:])}, "peft", unet_config=config
        )
    with pytest.raises(LoraFormatError, match="--unet-config"):
        convert_lora_state_dict(trained["peft"], "kohya", unet_config=tiny_config(3 - trained["lpb"]), alpha=ALPHA)


def test_corrupt_and_empty_files(saved, tmp_path, capsys):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(WeightsFileError, match="empty"):
        load_lora_file(empty)
    with pytest.raises(WeightsFileError, match="empty"):
        load_spade_file(empty)
    truncated = tmp_path / "cut.safetensors"
    data = saved["files"].lora_path.read_bytes()
    truncated.write_bytes(data[: len(data) - 100])
    with pytest.raises(WeightsFileError, match="truncated"):
        load_lora_file(truncated)
    assert main(["lora", "--to", "peft", str(truncated), str(tmp_path / "o.safetensors")]) == 1
    assert "truncated" in capsys.readouterr().err
    pickled = tmp_path / "lora.pt"
    torch.save({"a": torch.zeros(1)}, pickled)
    with pytest.raises(WeightsFileError, match="safetensors only"):
        load_lora_file(pickled)
    not_lora = tmp_path / "other.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, str(not_lora))
    with pytest.raises(LoraFormatError, match="known formats"):
        load_lora_file(not_lora)
    edited = tmp_path / "edited.spade.safetensors"
    spade = load_file(saved["files"].spade_path)
    spade.pop(next(iter(spade)))
    save_file(spade, str(edited), metadata=load_spade_file(saved["files"].spade_path).metadata.to_safetensors())
    with pytest.raises(WeightsError, match="do not fit the SPADE metadata"):
        load_spade_file(edited)
