"""The SDM-LoRA loader through the ComfyUI stand-in (LoRA keys through ComfyUI's key map and load_lora_for_models,
the SPADE companion through Apply SPADE's reader, clones only), and, with ``COMFYUI_PATH``, inside the real
ComfyUI: every key loads with no warning, and LoRA + SPADE on ComfyUI's UNet give our diffusers SDM-LoRA's output."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file
from torch import nn

import layout2image
from layout2image.core.labels import get_label_set
from layout2image.core.sdm_lora import SDMLoraConfig, add_sdm_lora, get_sdm_lora_state_dicts, sdm_lora_parameters
from layout2image.testing import sd1x_tiny_unet_config, tiny_unet_config
from layout2image.weights import lora_alphas_of, save_sdm_lora, spade_path_for
from layout2image.weights.lora_check import comfyui_unet_config, ldm_unet_shapes

_STUB_FILE = Path(__file__).resolve().parent / "comfy_stub" / "__init__.py"
_spec = importlib.util.spec_from_file_location("l2i_test_comfy_stub", _STUB_FILE)
comfy_stub = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(comfy_stub)

ROOT = Path(layout2image.__file__).resolve().parent
TOY = get_label_set("toy")
GROUPS = 32  # ComfyUI's UNet hard-codes 32 GroupNorm groups


def unet_config(layers_per_block: int | str = 1) -> dict:
    """The toy-shaped tiny UNet with ``layers_per_block`` resnets per level (kohya files get ldm module names), or,
    for ``"sd1x"``, the tiny UNet with SD 1.x's block structure (kohya files get diffusers module names)."""
    if layers_per_block == "sd1x":
        return sd1x_tiny_unet_config(norm_num_groups=GROUPS)
    return tiny_unet_config(layers_per_block=layers_per_block, norm_num_groups=GROUPS)


def sdm_unet(layers_per_block: int | str = 1, seed: int = 3) -> UNet2DConditionModel:
    """A tiny SDM-LoRA UNet (attention and resnet-conv LoRA, SPADE on the decoder norms), all weights random."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config(layers_per_block)).eval()
    config = SDMLoraConfig(
        layout_channels=TOY.num_classes,
        rank=4,
        lora_alpha=8.0,
        conv_target_modules=("conv1", "conv2", "conv_shortcut"),
        spade_hidden_channels=16,
    )
    add_sdm_lora(unet, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sdm_lora_parameters(unet):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return unet


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    unet = sdm_unet(1)
    files = save_sdm_lora(unet, folder / "toy_sdm.safetensors", TOY, base_model="toy/base")
    other = save_sdm_lora(sdm_unet(2), folder / "other_base.safetensors", TOY, base_model="toy/base2")
    return SimpleNamespace(folder=folder, unet=unet, files=files, other=other)


@pytest.fixture(scope="module")
def comfy():
    with comfy_stub.installed():
        yield SimpleNamespace(
            sdm=importlib.import_module("layout2image.nodes.sdm_lora"),
            spade=importlib.import_module("layout2image.nodes.spade"),
            types=importlib.import_module("layout2image.nodes.types"),
            model_patcher=importlib.import_module("comfy.model_patcher"),
            sd=importlib.import_module("comfy.sd"),
            folder_paths=importlib.import_module("folder_paths"),
        )


class _Sampling:
    def percent_to_sigma(self, percent: float) -> float:
        return 1e9 if percent <= 0 else (0.0 if percent >= 1 else 10.0 * (1.0 - percent))


def _natural(key: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def ldm_model(config: dict) -> nn.Module:
    """A BaseModel-shaped module whose ``diffusion_model`` has exactly the ldm keys ComfyUI's UNet has for
    ``config`` (meta tensors), ``num_res_blocks``, and GroupNorms at the ResBlock norms (for Apply SPADE)."""
    diffusion_model = nn.Sequential()
    for key, shape in sorted(ldm_unet_shapes(config).items(), key=lambda kv: _natural(kv[0])):
        *path, leaf = key.split(".")
        parent = diffusion_model
        for i, part in enumerate(path):
            if part not in parent._modules:
                is_norm = i == len(path) - 1 and path[-2:] in (["in_layers", "0"], ["out_layers", "0"])
                parent.add_module(part, nn.GroupNorm(GROUPS, shape[0], device="meta") if is_norm else nn.Sequential())
            parent = parent._modules[part]
        if leaf not in parent._parameters:
            parent.register_parameter(leaf, nn.Parameter(torch.empty(shape, device="meta"), requires_grad=False))
    diffusion_model.num_res_blocks = [config["layers_per_block"]] * len(config["block_out_channels"])
    base = nn.Module()
    base.diffusion_model = diffusion_model
    base.model_sampling = _Sampling()
    base.model_config = SimpleNamespace(unet_config=comfyui_unet_config(config))  # read by comfy.lora's key map
    return base


def _patcher(comfy, layers_per_block: int | str = 1):
    model = ldm_model(unet_config(layers_per_block))
    return comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))


# ------------------------------------------------------------------------------------------------ the loader
def test_loads_a_diffusers_named_lora_of_an_sd1x_shaped_unet(comfy, tmp_path, caplog):
    """On SD 1.x's block structure the kohya export has diffusers module names (``lora_unet_down_blocks_0_...``,
    the trainer's default for SD 1.5): the node finds every module through ComfyUI's ``unet_to_diffusers`` keys."""
    unet = sdm_unet("sd1x")
    files = save_sdm_lora(unet, tmp_path / "sd1x_sdm.safetensors", TOY, base_model="tiny/sd1x")
    assert files.lora.kohya_names == "diffusers"
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_") for k in files.lora.state_dict)
    model = _patcher(comfy, "sd1x")
    with caplog.at_level(logging.WARNING):
        new_model, _, spade = comfy.sdm.load_sdm_lora_for_models(model, None, files.lora_path)
    assert not [r for r in caplog.records if "not loaded" in r.getMessage()]
    assert len(new_model.patches) == len(get_sdm_lora_state_dicts(unet).lora) // 2
    assert all(k.startswith("diffusion_model.") for k in new_model.patches)  # mapped onto ComfyUI's ldm weights
    assert spade.label_set == TOY
    with pytest.raises(comfy.sdm.SDMLoraError, match="have no target in the MODEL"):
        comfy.sdm.load_sdm_lora_for_models(_patcher(comfy, 1), None, files.lora_path)  # another layout


def test_loads_every_lora_key_and_the_spade_companion_on_clones(comfy, saved, caplog):
    model = _patcher(comfy)
    comfy.sd.CALLS.clear()
    with caplog.at_level(logging.WARNING):
        new_model, new_clip, spade = comfy.sdm.load_sdm_lora_for_models(model, None, saved.files.lora_path, 0.8)
    assert not [r for r in caplog.records if "not loaded" in r.getMessage() or "NOT LOADED" in r.getMessage()]
    assert new_model is not model and new_model.is_clone(model) and not model.patches
    peft = get_sdm_lora_state_dicts(saved.unet).lora
    assert len(new_model.patches) == len(peft) // 2  # one weight patch per LoRA module
    (call,) = comfy.sd.CALLS
    assert call["strength_model"] == 0.8 and call["clip"] is None and new_clip is None
    assert all(k.startswith("lora_unet_") for k in call["lora"])
    alphas = {k: float(v) for k, v in call["lora"].items() if k.endswith(".alpha")}
    assert set(alphas.values()) == set(lora_alphas_of(saved.unet).values()) == {8.0}
    assert isinstance(spade, comfy.spade.SpadeWeights) and spade.encoding == "onehot" and spade.label_set == TOY
    want = get_sdm_lora_state_dicts(saved.unet).spade
    got = spade.adapter.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_clip_is_patched_on_a_clone_when_given(comfy, saved):
    clip = SimpleNamespace(clone=lambda: SimpleNamespace(cloned=True))
    _, new_clip, _ = comfy.sdm.load_sdm_lora_for_models(_patcher(comfy), clip, saved.files.lora_path)
    assert new_clip is not clip and new_clip.cloned


def test_strength_zero_returns_the_inputs_with_the_spade_part(comfy, saved):
    model = _patcher(comfy)
    new_model, _, spade = comfy.sdm.load_sdm_lora_for_models(model, None, saved.files.lora_path, 0.0)
    assert new_model is model and spade.adapter.site_names


def test_peft_lora_file_is_renamed_to_kohya_before_comfyui_sees_it(comfy, saved, tmp_path):
    from layout2image.weights import save_lora_file

    path = tmp_path / "peft_sdm.safetensors"
    lora = get_sdm_lora_state_dicts(saved.unet).lora
    save_lora_file(path, lora, to="peft", unet_config=saved.unet.config, alpha=8.0)
    spade_path_for(path).write_bytes(saved.files.spade_path.read_bytes())
    comfy.sd.CALLS.clear()
    new_model, _, _ = comfy.sdm.load_sdm_lora_for_models(_patcher(comfy), None, path)
    assert all(k.startswith("lora_unet_") for k in comfy.sd.CALLS[0]["lora"])
    assert len(new_model.patches) == len(lora) // 2


def test_errors_name_the_problem(comfy, saved, tmp_path):
    with pytest.raises(comfy.sdm.SDMLoraError, match="LoRA module.*no target in the MODEL") as err:
        comfy.sdm.load_sdm_lora_for_models(_patcher(comfy, 1), None, saved.other.lora_path)
    assert "toy/base2" in str(err.value)
    plain = tmp_path / "plain.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, str(plain))
    with pytest.raises(comfy.sdm.SDMLoraError, match="no SPADE companion.*Load LoRA"):
        comfy.sdm.load_sdm_lora_for_models(_patcher(comfy), None, plain)
    with pytest.raises(comfy.sdm.SDMLoraError, match="is the SPADE companion"):
        comfy.sdm.load_sdm_lora_for_models(_patcher(comfy), None, saved.files.spade_path)
    with pytest.raises(comfy.sdm.SDMLoraError, match="finite"):
        comfy.sdm.load_sdm_lora_for_models(_patcher(comfy), None, saved.files.lora_path, float("nan"))


def test_node_lists_loras_without_companions_and_feeds_apply_spade(comfy, saved, tmp_path):
    comfy.folder_paths.reset()
    comfy.folder_paths.add_model_folder_path("loras", str(saved.folder))
    try:
        schema = comfy.sdm.L2ISDMLoraLoader.GET_SCHEMA()
        assert schema.inputs[1].options == ["other_base.safetensors", "toy_sdm.safetensors"]
        assert [o.io_type for o in schema.outputs] == ["MODEL", "CLIP", "L2I_SPADE", "L2I_LABEL_SET", "STRING"]
        model = _patcher(comfy)
        out = comfy.sdm.L2ISDMLoraLoader.execute(model=model, lora_name="toy_sdm.safetensors", strength=1.0)
        new_model, _, spade, labels, info = out.args
        assert labels == TOY and "SPADE" in info and "toy_sdm.safetensors" in info
        assert len(comfy.sdm.L2ISDMLoraLoader.fingerprint_inputs(lora_name="toy_sdm.safetensors")) == 4
        ids = torch.randint(0, TOY.num_classes, (1, 16, 16))
        label_map = comfy.types.LabelMap(ids, TOY)
        (patched,) = comfy.spade.L2IApplySPADE.execute(
            model=new_model, spade_file="", label_map=label_map, spade=spade
        ).args
        assert (
            patched.get_injections(comfy.spade.SPADE_KEY) is not None and new_model.get_injections("l2i_spade") is None
        )
        assert patched.patches == new_model.patches  # the LoRA stays on the SPADE clone
        with pytest.raises(comfy.spade.SPADEFileError, match="Load SDM-LoRA"):
            comfy.spade.L2IApplySPADE.execute(model=new_model, spade_file="", label_map=label_map, spade="nope")
        with pytest.raises(comfy.sdm.SDMLoraError, match="not in ComfyUI's loras folders"):
            comfy.sdm.L2ISDMLoraLoader.execute(model=model, lora_name="missing.safetensors")
        with pytest.raises(comfy.sdm.SDMLoraError, match=r"`path` .* is not a file; give the SDM-LoRA's"):
            comfy.sdm.L2ISDMLoraLoader.execute(model=model, lora_name=comfy.sdm.NO_FILE, path=str(tmp_path))
        with pytest.raises(comfy.sdm.SDMLoraError, match="no SDM-LoRA chosen: put the file in models/loras"):
            comfy.sdm.L2ISDMLoraLoader.execute(model=model, lora_name=comfy.sdm.NO_FILE)
    finally:
        comfy.folder_paths.reset()
    assert comfy.sdm.L2ISDMLoraLoader.GET_SCHEMA().inputs[1].options == [comfy.sdm.NO_FILE]


# ------------------------------------------------------------------------------------------------ real ComfyUI
_REAL_COMFY_SDM = r"""
import importlib, importlib.util, logging, sys, tempfile
from pathlib import Path
from types import SimpleNamespace
import torch
from torch import nn

sys.path.insert(0, COMFY_ROOT)
sys.argv = ["main.py", "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import comfy.model_detection, comfy.model_patcher, comfy.ops, comfy.patcher_extension, comfy.utils
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

records = []
class Catch(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
logging.getLogger().addHandler(Catch(level=logging.WARNING))

name = PACK.replace(".", "_x_")
spec = importlib.util.spec_from_file_location(name, PACK + "/__init__.py", submodule_search_locations=[PACK])
pack = importlib.util.module_from_spec(spec)
sys.modules[name] = pack
spec.loader.exec_module(pack)
sdm = importlib.import_module(name + ".nodes.sdm_lora")
nodes_spade = importlib.import_module(name + ".nodes.spade")
types_ = importlib.import_module(name + ".nodes.types")
hints = importlib.import_module(name + ".core.hints")
spade_core = importlib.import_module(name + ".core.spade")
core_sdm = importlib.import_module(name + ".core.sdm_lora")
labels = importlib.import_module(name + ".core.labels").get_label_set("toy")
lora_check = importlib.import_module(name + ".weights.lora_check")
weights = importlib.import_module(name + ".weights")
from diffusers import UNet2DConditionModel

# the same SDM-LoRA UNet as sdm_unet() in the test module, built with this copy of the pack
torch.manual_seed(0)
unet = UNet2DConditionModel(**UNET_CONFIG).eval()
core_sdm.add_sdm_lora(unet, core_sdm.SDMLoraConfig(layout_channels=labels.num_classes, rank=4, lora_alpha=8.0,
                      conv_target_modules=("conv1", "conv2", "conv_shortcut"), spade_hidden_channels=16))
g = torch.Generator().manual_seed(3)
with torch.no_grad():
    for p in core_sdm.sdm_lora_parameters(unet):
        p.copy_(torch.randn(p.shape, generator=g) * 0.1)
folder = Path(tempfile.mkdtemp())
files = weights.save_sdm_lora(unet, folder / "toy_sdm.safetensors", labels, base_model="toy/base")

# ComfyUI's UNet for this config, with the base weights of our UNet (before the LoRA)
torch.manual_seed(0)
base = UNet2DConditionModel(**UNET_CONFIG).eval()
ldm_shapes = lora_check.ldm_unet_shapes(base.config)
config = comfy.model_detection.detect_unet_config({k: torch.empty(v, device="meta") for k, v in ldm_shapes.items()}, "")
comfy_unet = UNetModel(**config, num_heads=8, operations=comfy.ops.disable_weight_init)
to_diffusers = comfy.utils.unet_to_diffusers(config)
base_sd = base.state_dict()
comfy_unet.load_state_dict({ldm: base_sd[d] for d, ldm in to_diffusers.items() if d in base_sd}, strict=True)

class Sampling:
    def percent_to_sigma(self, p):
        return 1e9 if p <= 0 else (0.0 if p >= 1 else 10.0 * (1 - p))

model = nn.Module()
model.diffusion_model = comfy_unet.eval()
model.model_sampling = Sampling()
model.model_config = SimpleNamespace(unet_config=config)  # BaseModel's, read by comfy.lora's key map
patcher = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))

out = sdm.L2ISDMLoraLoader.execute(model=patcher, lora_name="", path=str(files.lora_path), strength=1.0)
lora_model, _, spade, out_labels, info = out.args
assert not [m for m in records if "not loaded" in m or "NOT LOADED" in m], records
n_modules = sum(1 for k in weights.load_lora_file(files.lora_path).state_dict if k.endswith(".lora_down.weight"))
assert len(lora_model.patches) == n_modules and not patcher.patches, (len(lora_model.patches), n_modules)
assert out_labels == labels

g = torch.Generator().manual_seed(4)
ids = torch.randint(0, labels.num_classes, (1, 32, 32), generator=g)
(patched,) = nodes_spade.L2IApplySPADE.execute(model=lora_model, spade_file="", label_map=types_.LabelMap(ids, labels),
                                              strength=1.0, spade=spade).args
x = torch.randn(2, 4, 16, 16, generator=g)
t = torch.tensor([10.0, 500.0])
context = torch.randn(2, 7, 32, generator=g)
options = comfy.model_patcher.create_model_options_clone(patched.model_options)["transformer_options"]
comfy.patcher_extension.merge_nested_dicts(options.setdefault("wrappers", {}), patched.wrappers, copy_dict1=False)
options.update(cond_or_uncond=[0], sigmas=torch.tensor([5.0]))
patched.patch_model()
try:
    with torch.no_grad():
        got = comfy_unet(x, t, context=context, transformer_options=options)
finally:
    patched.unpatch_model()
layout = hints.one_hot(ids, labels.num_classes, labels.ignore_index)
with torch.no_grad(), spade_core.spade_layout(unet, layout):
    want = unet(x, t, encoder_hidden_states=context).sample
with torch.no_grad():
    plain = base(x, t, encoder_hidden_states=context).sample
torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
assert float((want - plain).abs().max()) > 1e-2  # the LoRA and SPADE change the output: the check means something
print("sdm ok", len(lora_model.patches), float((got - want).abs().max()))
"""


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="set COMFYUI_PATH to a ComfyUI checkout to run")
@pytest.mark.parametrize("layout", [1, "sd1x"], ids=["toy-shaped-ldm-names", "sd1x-shaped-diffusers-names"])
def test_real_comfyui_sdm_lora_equals_our_diffusers_model(layout):
    """A kohya LoRA + SPADE companion written by weights/, loaded by the node into the real ComfyUI (its key map,
    load_lora_for_models, ModelPatcher weight patches) with no 'lora key not loaded' warning, then Apply SPADE: the
    real openaimodel UNet's output equals our diffusers SDM-LoRA UNet's for the same inputs and label map."""
    comfy_root = Path(os.environ["COMFYUI_PATH"]).resolve()
    code = (
        f"COMFY_ROOT = {str(comfy_root)!r}\nPACK = {str(ROOT)!r}\nUNET_CONFIG = {unet_config(layout)!r}\n"
        + _REAL_COMFY_SDM
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=comfy_root, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "sdm ok" in result.stdout, result.stdout
