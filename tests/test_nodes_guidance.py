"""Layout CFG guider through the ComfyUI stand-in: the combination, the null-layout branch, CFG-1 shortcuts.
(The guider driving Apply SPADE's null layout is tested in test_nodes_spade.py, which has the toy UNet.)"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import layout2image

_STUB_FILE = Path(__file__).resolve().parent / "comfy_stub" / "__init__.py"
_spec = importlib.util.spec_from_file_location("l2i_test_comfy_stub", _STUB_FILE)
comfy_stub = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(comfy_stub)


@pytest.fixture(scope="module")
def comfy():
    with comfy_stub.installed():
        yield SimpleNamespace(
            guidance=importlib.import_module("layout2image.nodes.guidance"),
            spade=importlib.import_module("layout2image.nodes.spade"),
            model_patcher=importlib.import_module("comfy.model_patcher"),
        )


class FakeModel:
    """apply_model returns, per chunk, 1 + 10 * (text is positive) + 100 * (the cond has a ControlNet)."""

    def __init__(self):
        self.calls = []

    def apply_model(self, x, t, transformer_options, conds):
        self.calls.append(transformer_options)
        chunks = [
            torch.full_like(x[:1], 1.0 + 10.0 * float(c[0]["cross_attn"].sum() > 0) + 100.0 * ("control" in c[0]))
            for c in conds
        ]
        return torch.cat(chunks) * torch.ones_like(x)


def _conditioning(positive: bool):
    return [[torch.ones(1, 2, 4) if positive else torch.zeros(1, 2, 4), {"control": "a ControlNet", "extra": 1}]]


def _guider(comfy, text_cfg, layout_cfg):
    patcher = comfy.model_patcher.ModelPatcher(torch.nn.Identity(), "cpu", "cpu")
    positive, negative = _conditioning(True), _conditioning(False)
    guider = comfy.guidance.L2ILayoutGuider.execute(
        model=patcher, positive=positive, negative=negative, text_cfg=text_cfg, layout_cfg=layout_cfg
    )[0]
    model = FakeModel()
    guider.prepare_for_test(model)
    return guider, model, positive, negative


def test_combines_text_and_layout_guidance(comfy):
    guider, model, positive, negative = _guider(comfy, text_cfg=7.0, layout_cfg=2.5)
    x = torch.zeros(1, 4, 2, 2)
    out = guider(x, torch.tensor([3.0]), model_options={"transformer_options": {"keep": 1}})
    cond, uncond, null = 111.0, 101.0, 1.0  # D(c, l), D(∅, l), D(∅, ∅l) of FakeModel
    expected = null + 2.5 * (uncond - null) + 7.0 * (cond - uncond)
    assert torch.allclose(out, torch.full_like(x, expected))
    options = model.calls[-1]
    assert options["cond_or_uncond"] == [0, 1, 2] and options[comfy.spade.NULL_LAYOUT_CONDS] == (2,)
    assert options["keep"] == 1
    # the input conditioning keeps its ControlNet; only the guider's null-layout copy lost it
    assert negative[0][1] == {"control": "a ControlNet", "extra": 1}
    null_conds = guider.original_conds[comfy.guidance.NULL_LAYOUT]
    assert "control" not in null_conds[0] and null_conds[0]["extra"] == 1


def test_layout_cfg_one_is_plain_cfg_without_a_third_pass(comfy):
    guider, model, _, _ = _guider(comfy, text_cfg=5.0, layout_cfg=1.0)
    x = torch.zeros(1, 4, 2, 2)
    out = guider(x, torch.tensor([3.0]), model_options={})
    assert torch.allclose(out, torch.full_like(x, 101.0 + 5.0 * 10.0))
    assert model.calls[-1]["cond_or_uncond"] == [0, 1]
    guider, model, _, _ = _guider(comfy, text_cfg=1.0, layout_cfg=1.0)
    assert torch.allclose(guider(x, torch.tensor([3.0]), model_options={}), torch.full_like(x, 111.0))
    assert model.calls[-1]["cond_or_uncond"] == [0]


def test_schema(comfy):
    schema = comfy.guidance.L2ILayoutGuider.GET_SCHEMA()
    assert schema.outputs[0].io_type == "GUIDER"
    assert {i.id for i in schema.inputs} == {"model", "positive", "negative", "text_cfg", "layout_cfg"}


# ------------------------------------------------------------------------------------------------ real ComfyUI
_REAL_COMFY_SAMPLING = r"""
import importlib, importlib.util, sys
sys.path.insert(0, COMFY_ROOT)
sys.argv = ["main.py", "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import torch
import comfy.model_base, comfy.model_patcher, comfy.samplers, comfy.supported_models, comfy.patcher_extension

name = PACK.replace(".", "_x_")
spec = importlib.util.spec_from_file_location(name, PACK + "/__init__.py", submodule_search_locations=[PACK])
pack = importlib.util.module_from_spec(spec)
sys.modules[name] = pack
spec.loader.exec_module(pack)
nodes_spade = importlib.import_module(name + ".nodes.spade")
guidance = importlib.import_module(name + ".nodes.guidance")
types_ = importlib.import_module(name + ".nodes.types")
core_spade = importlib.import_module(name + ".core.spade")
one_hot = importlib.import_module(name + ".core.hints").one_hot
toy = importlib.import_module(name + ".core.labels").get_label_set("toy")
assert_close_for_dtype = importlib.import_module(name + ".testing").assert_close_for_dtype

unet_config = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=[1, 1], channel_mult=[1, 2],
    transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1, context_dim=16,
    use_spatial_transformer=True, use_linear_in_transformer=False, adm_in_channels=None,
    use_temporal_attention=False, use_temporal_resblock=False, legacy=False)
cfg = comfy.supported_models.SD15(unet_config)
torch.manual_seed(0)
model = comfy.model_base.BaseModel(cfg, device=torch.device("cpu"))
with torch.no_grad():
    for p in model.diffusion_model.parameters():
        p.copy_(torch.randn(p.shape) * 0.05)
patcher = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
names = [f"mid_block.resnets.{i}.norm{n}" for i in (0, 1) for n in (1, 2)]
names += [f"up_blocks.{b}.resnets.{r}.norm{n}" for b in (0, 1) for r in (0, 1) for n in (1, 2)]
paths = nodes_spade.comfy_site_paths(model.diffusion_model, names)
channels = [patcher.get_model_object(paths[s]).num_channels for s in names]
adapter = core_spade.SPADEAdapter(names, channels, toy.num_classes, hidden_channels=8)
with torch.no_grad():
    for p in adapter.parameters():
        p.copy_(torch.randn(p.shape) * 0.2)
weights = nodes_spade.SpadeWeights(adapter=adapter.eval(), encoding="onehot", label_set=toy, source="test")
ids = torch.randint(0, toy.num_classes, (1, 40, 48))
clone = nodes_spade.apply_spade(patcher, weights, types_.LabelMap(ids, toy))

seen = []


def record(executor, *args, **kwargs):
    seen.append(list(args[5]["cond_or_uncond"]))
    return executor(*args, **kwargs)


clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test_record", record)
captured = {}
for s in names:
    gn = patcher.get_model_object(paths[s])
    gn.register_forward_hook(lambda m, i, o, s=s: captured.__setitem__(s, (i[0].clone(), o.clone())))
layout = one_hot(ids, toy.num_classes, toy.ignore_index)


def run(guider_model, text_cfg, layout_cfg=None):
    positive, negative = [[torch.randn(1, 3, 16), {}]], [[torch.zeros(1, 3, 16), {}]]
    if layout_cfg is None:
        guider = comfy.samplers.CFGGuider(guider_model)
        guider.set_conds(positive, negative)
        guider.set_cfg(text_cfg)
    else:
        guider = guidance.L2ILayoutGuider.execute(
            model=guider_model, positive=positive, negative=negative, text_cfg=text_cfg, layout_cfg=layout_cfg
        )[0]
    sigmas = comfy.samplers.calculate_sigmas(model.model_sampling, "normal", 3).cpu()
    sampler = comfy.samplers.sampler_object("euler")
    return guider.sample(torch.randn(2, 4, 5, 6), torch.zeros(2, 4, 5, 6), sampler, sigmas, seed=0)


def check(chunks):
    for s in names:
        x_in, o = captured[s]
        gn = patcher.get_model_object(paths[s])
        if chunks is None:
            expected = torch.nn.functional.group_norm(x_in, gn.num_groups, gn.weight, gn.bias, gn.eps)
        else:
            expected = core_spade.spade_group_norm(
                x_in, core_spade.expand_layout_batch(layout, x_in.shape[0], chunks), adapter.spade_for(s),
                gn.num_groups, gn.weight, gn.bias, gn.eps)
        assert_close_for_dtype(o, expected, msg=s)


out = run(clone, 5.0, 2.0)
assert sorted(seen[-1]) == [0, 1, 2] and bool(torch.isfinite(out).all()), seen[-1]
check(tuple("null" if c == 2 else "layout" for c in seen[-1]))
print("guided sampling ok; cond_or_uncond", seen[-1])
run(clone, 5.0, 1.0)
assert sorted(seen[-1]) == [0, 1], seen[-1]
check(("layout",) * len(seen[-1]))
print("plain cfg sampling ok; injected after sampling:", sum("forward" in m.__dict__ for m in model.modules()))
run(patcher, 5.0)  # the ORIGINAL model: the plain UNet
check(None)
print("original model plain after the clone; injected now:", sum("forward" in m.__dict__ for m in model.modules()))
"""


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="set COMFYUI_PATH to a ComfyUI checkout to run")
def test_layout_guider_and_spade_sample_inside_a_real_comfyui():
    """Real CFGGuider.sample on a tiny SD1.5-config BaseModel: the guider's three cond lists arrive batched (in any
    order) and SPADE gives list 2 the null layout; with layout_cfg 1 only two lists run; afterwards sampling the
    original MODEL gives plain GroupNorms (ComfyUI ejected the clone's injections)."""
    root = Path(layout2image.__file__).resolve().parent
    comfy_root = Path(os.environ["COMFYUI_PATH"]).resolve()
    code = f"COMFY_ROOT = {str(comfy_root)!r}\nPACK = {str(root)!r}\n" + _REAL_COMFY_SAMPLING
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=comfy_root, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "guided sampling ok" in result.stdout and "original model plain" in result.stdout, result.stdout
