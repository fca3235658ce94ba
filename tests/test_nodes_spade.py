"""Apply SPADE through the ComfyUI stand-in: site mapping, the clone, cond/uncond batches, odd sizes, and the same
numbers as core's SPADE path (``spade_group_norm`` per site, and ``SPADEGroupNorm`` for a whole UNet forward)."""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import layout2image
from layout2image.core.hints import one_hot
from layout2image.core.labels import get_label_set
from layout2image.core.spade import (
    SPADEAdapter,
    SPADEGroupNorm,
    SPADELayoutContext,
    expand_layout_batch,
    spade_group_norm,
)
from layout2image.testing import assert_close_for_dtype
from layout2image.weights.metadata import WeightsMetadata

_STUB_FILE = Path(__file__).resolve().parent / "comfy_stub" / "__init__.py"
_spec = importlib.util.spec_from_file_location("l2i_test_comfy_stub", _STUB_FILE)
comfy_stub = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(comfy_stub)

TOY = get_label_set("toy")  # 8 classes, ignore 255
GROUPS = 4
EMB = 8

# diffusers site -> expected ldm path of the toy UNet below (num_res_blocks [1, 1]: 2 resnets per up block).
EXPECTED_PATHS = {
    "mid_block.resnets.0.norm1": "diffusion_model.middle_block.0.in_layers.0",
    "mid_block.resnets.0.norm2": "diffusion_model.middle_block.0.out_layers.0",
    "mid_block.resnets.1.norm1": "diffusion_model.middle_block.2.in_layers.0",
    "mid_block.resnets.1.norm2": "diffusion_model.middle_block.2.out_layers.0",
    "up_blocks.0.resnets.0.norm1": "diffusion_model.output_blocks.0.0.in_layers.0",
    "up_blocks.0.resnets.0.norm2": "diffusion_model.output_blocks.0.0.out_layers.0",
    "up_blocks.0.resnets.1.norm1": "diffusion_model.output_blocks.1.0.in_layers.0",
    "up_blocks.0.resnets.1.norm2": "diffusion_model.output_blocks.1.0.out_layers.0",
    "up_blocks.1.resnets.0.norm1": "diffusion_model.output_blocks.2.0.in_layers.0",
    "up_blocks.1.resnets.0.norm2": "diffusion_model.output_blocks.2.0.out_layers.0",
    "up_blocks.1.resnets.1.norm1": "diffusion_model.output_blocks.3.0.in_layers.0",
    "up_blocks.1.resnets.1.norm2": "diffusion_model.output_blocks.3.0.out_layers.0",
}


# ------------------------------------------------------------------------------------------------ a toy ldm UNet
class ResBlock(nn.Module):
    """openaimodel.ResBlock's layout: in_layers = [GN, SiLU, conv], out_layers = [GN, SiLU, Dropout, conv]."""

    def __init__(self, channels: int, out_channels: int, norm=nn.GroupNorm):
        super().__init__()
        self.in_layers = nn.Sequential(
            norm(GROUPS, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(EMB, out_channels))
        self.out_layers = nn.Sequential(
            norm(GROUPS, out_channels), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):  # ResBlocks get (x, emb) only, never transformer_options
        h = self.in_layers(x) + self.emb_layers(emb)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Upsample(nn.Module):
    def forward(self, x, output_shape=None):
        return F.interpolate(x, size=output_shape[-2:], mode="nearest")


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x, emb, output_shape=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, Upsample):
                x = layer(x, output_shape)
            else:
                x = layer(x)
        return x


class ToyUNet(nn.Module):
    """Two levels, one resnet per level in the encoder, ``num_res_blocks + 1`` per level in the decoder."""

    def __init__(self, norm=nn.GroupNorm):
        super().__init__()
        self.num_res_blocks = [1, 1]
        self.time_embed = nn.Linear(1, EMB)
        self.input_blocks = nn.ModuleList(
            [
                TimestepEmbedSequential(nn.Conv2d(4, 8, 3, padding=1)),
                TimestepEmbedSequential(ResBlock(8, 8, norm)),
                TimestepEmbedSequential(nn.Conv2d(8, 8, 3, stride=2, padding=1)),
                TimestepEmbedSequential(ResBlock(8, 16, norm)),
            ]
        )
        self.middle_block = TimestepEmbedSequential(ResBlock(16, 16, norm), nn.Identity(), ResBlock(16, 16, norm))
        self.output_blocks = nn.ModuleList(
            [
                TimestepEmbedSequential(ResBlock(32, 16, norm)),
                TimestepEmbedSequential(ResBlock(24, 16, norm), Upsample()),
                TimestepEmbedSequential(ResBlock(24, 8, norm)),
                TimestepEmbedSequential(ResBlock(16, 8, norm)),
            ]
        )
        self.out = nn.Sequential(nn.GroupNorm(GROUPS, 8), nn.SiLU(), nn.Conv2d(8, 4, 3, padding=1))

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options=None, **kwargs):
        from comfy.patcher_extension import WrapperExecutor, WrappersMP, get_all_wrappers

        transformer_options = {} if transformer_options is None else transformer_options
        return WrapperExecutor.new_class_executor(
            self._forward, self, get_all_wrappers(WrappersMP.DIFFUSION_MODEL, transformer_options)
        ).execute(x, timesteps, context, y, control, transformer_options, **kwargs)

    def _forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options=None, **kwargs):
        emb = self.time_embed(timesteps.float()[:, None])
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)
            h = block(h, emb, output_shape=hs[-1].shape if hs else None)
        return self.out(h)


class ToySampling:
    """Sigma 10 at 0 %, 0 at 100 %, linear (ModelSamplingDiscrete's percent_to_sigma is monotone the same way)."""

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return 10.0 * (1.0 - percent)


class ToyBaseModel(nn.Module):
    def __init__(self, norm=nn.GroupNorm):
        super().__init__()
        self.diffusion_model = ToyUNet(norm)
        self.model_sampling = ToySampling()


class CastGroupNorm(nn.GroupNorm):
    """A comfy.ops-style GroupNorm that casts its weights per call."""

    comfy_cast_weights = True
    weight_function: list = []
    bias_function: list = []

    def forward(self, x):
        import comfy.ops

        weight, bias, _ = comfy.ops.cast_bias_weight(self, x, offloadable=True)
        return F.group_norm(x, self.num_groups, weight, bias, self.eps)


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def comfy():
    with comfy_stub.installed():
        yield SimpleNamespace(
            spade=importlib.import_module("layout2image.nodes.spade"),
            types=importlib.import_module("layout2image.nodes.types"),
            model_patcher=importlib.import_module("comfy.model_patcher"),
            ops=importlib.import_module("comfy.ops"),
        )


def _patcher(comfy, norm=nn.GroupNorm, seed=0):
    torch.manual_seed(seed)
    base = ToyBaseModel(norm).eval()
    with torch.no_grad():  # non-trivial pretrained affines
        for m in base.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
    return comfy.model_patcher.ModelPatcher(base, torch.device("cpu"), torch.device("cpu"))


def _adapter(seed=1, layout_channels=None) -> SPADEAdapter:
    names = list(EXPECTED_PATHS)
    unet = ToyUNet()
    channels = []
    for name in names:
        path = EXPECTED_PATHS[name].removeprefix("diffusion_model.")
        channels.append(unet.get_submodule(path).num_channels)
    adapter = SPADEAdapter(names, channels, layout_channels or TOY.num_classes, hidden_channels=8)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)  # γ/β no longer zero: the modulation shows
    return adapter.eval()


def _write_spade(path: Path, adapter: SPADEAdapter, label_set=TOY, encoding="onehot", fmt="export") -> Path:
    """``fmt``: "companion" (weights.save_spade_file), "export" (the trainer's spade.safetensors with
    l2i.spade_config) or "bare" (tensors and the common metadata only)."""
    if fmt == "companion":
        from layout2image.weights.spade_file import save_spade_file

        return save_spade_file(path, adapter, label_set=label_set, hint_encoding=encoding)
    extra = {"spade_config": json.dumps(dict(adapter.config), default=list)} if fmt == "export" else {}
    metadata = WeightsMetadata(kind="spade", hint_encoding=encoding, label_set=label_set, extra=extra)
    state = {k: v.contiguous() for k, v in adapter.state_dict().items()}
    save_file(state, str(path), metadata=metadata.to_safetensors())
    return path


def _ids(batch: int, height: int, width: int, seed=2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TOY.num_classes, (batch, height, width), generator=gen)
    ids[:, 0, :3] = TOY.ignore_index
    return ids


def _run(patcher, x, cond_or_uncond, sigmas=None):
    """One sampling-time model call: patch, run with the sampler's transformer_options, unpatch.

    Returns the output and, per GroupNorm path, the (input, output) the norm saw."""
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    unet = patcher.model.diffusion_model
    hooks = []
    for path in EXPECTED_PATHS.values():
        gn = patcher.model.get_submodule(path)
        hooks.append(gn.register_forward_hook(lambda m, i, o, p=path: captured.__setitem__(p, (i[0], o))))
    patcher.patch_model()
    try:
        options = comfy_stub.sampling_transformer_options(patcher, cond_or_uncond, sigmas)
        with torch.no_grad():
            out = unet(x, torch.full((x.shape[0],), 5.0), None, None, None, options)
    finally:
        patcher.unpatch_model()
        for h in hooks:
            h.remove()
    return out, captured


# ------------------------------------------------------------------------------------------------ mapping / file
def test_site_mapping_to_ldm_paths(comfy):
    patcher = _patcher(comfy)
    paths = comfy.spade.comfy_site_paths(patcher.get_model_object("diffusion_model"), list(EXPECTED_PATHS))
    assert paths == EXPECTED_PATHS
    with pytest.raises(comfy.spade.SPADEFileError, match="up_blocks.2.resnets.0.norm1"):
        comfy.spade.comfy_site_paths(patcher.get_model_object("diffusion_model"), ["up_blocks.2.resnets.0.norm1"])
    with pytest.raises(comfy.spade.SPADEFileError, match="not a decoder ResNet norm"):
        comfy.spade.comfy_site_paths(patcher.get_model_object("diffusion_model"), ["down_blocks.0.resnets.0.norm1"])


@pytest.mark.parametrize("fmt", ["companion", "export", "bare"])
def test_load_spade_file(comfy, tmp_path, fmt):
    adapter = _adapter()
    path = _write_spade(tmp_path / "toy.spade.safetensors", adapter, fmt=fmt)
    weights = comfy.spade.load_spade_weights(path)
    assert weights.encoding == "onehot" and weights.label_set == TOY
    assert sorted(weights.adapter.site_names) == sorted(EXPECTED_PATHS)
    for name in EXPECTED_PATHS:
        a, b = weights.adapter.spade_for(name), adapter.spade_for(name)
        assert torch.equal(a.sem_gamma.weight, b.sem_gamma.weight) and torch.equal(
            a.sem_shared.bias, b.sem_shared.bias
        )
    stamp = comfy.spade.L2IApplySPADE.fingerprint_inputs(spade_file=str(path), strength=1.0)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # the file was replaced
    assert comfy.spade.L2IApplySPADE.fingerprint_inputs(spade_file=str(path), strength=1.0) != stamp
    with pytest.raises(comfy.spade.SPADEFileError, match="does not exist"):
        comfy.spade.load_spade_weights(tmp_path / "missing.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(comfy.spade.SPADEFileError, match="not a SPADE file"):
        comfy.spade.load_spade_weights(tmp_path / "other.safetensors")


# ------------------------------------------------------------------------------------------------ clone hygiene
def test_apply_leaves_the_input_model_untouched(comfy, tmp_path):
    patcher = _patcher(comfy)
    modules_before = {name: id(m) for name, m in patcher.model.named_modules()}
    state_before = {k: v.clone() for k, v in patcher.model.state_dict().items()}
    options_before = copy.deepcopy(patcher.model_options)
    x = torch.randn(2, 4, 8, 8)
    plain_out, _ = _run(patcher, x, [0, 1])

    label_map = comfy.types.LabelMap(_ids(1, 64, 64), TOY)
    path = _write_spade(tmp_path / "toy.spade.safetensors", _adapter())
    node_out = comfy.spade.L2IApplySPADE.execute(model=patcher, spade_file=str(path), label_map=label_map)
    clone = node_out[0]
    assert clone is not patcher and clone.model is patcher.model  # shares the weights, like ModelPatcher.clone
    assert patcher.model_options == options_before
    assert patcher.wrappers == {} and patcher.injections == {} and patcher.additional_models == {}
    assert len(clone.get_wrappers("diffusion_model", "l2i_spade")) == 1
    assert len(clone.get_additional_models_with_key("l2i_spade")) == 1

    spade_out, _ = _run(clone, x, [0, 1])
    assert not torch.allclose(spade_out, plain_out)
    # after sampling with the clone: the same module objects, no instance forward left, same weights and outputs
    assert {name: id(m) for name, m in patcher.model.named_modules()} == modules_before
    assert not any("forward" in m.__dict__ for m in patcher.model.modules())
    after = patcher.model.state_dict()
    assert after.keys() == state_before.keys() and all(torch.equal(after[k], state_before[k]) for k in after)
    assert torch.equal(_run(patcher, x, [0, 1])[0], plain_out)


# ------------------------------------------------------------------------------------------------ same as core
CASES = [
    # (cond_or_uncond, latents per chunk, label batch, latent size, uncond layout)
    pytest.param([0, 1], 1, 1, (8, 8), "layout", id="cfg-cond-uncond"),
    pytest.param([0], 2, 1, (8, 8), "layout", id="cfg1-single-chunk"),
    pytest.param([1, 0], 2, 2, (7, 9), "layout", id="uncond-cond-odd-size"),
    pytest.param([1, 0], 2, 1, (7, 9), "null layout", id="uncond-null-layout"),
    pytest.param([0, 1], 2, 2, (6, 11), "null layout", id="cond-uncond-null-odd"),
]


@pytest.mark.parametrize("cond_or_uncond, per_chunk, label_batch, size, uncond_layout", CASES)
def test_comfy_path_equals_core_spade_group_norm(
    comfy, tmp_path, cond_or_uncond, per_chunk, label_batch, size, uncond_layout
):
    patcher = _patcher(comfy)
    adapter = _adapter()
    path = _write_spade(tmp_path / "toy.spade.safetensors", adapter)
    ids = _ids(label_batch, size[0] * 8, size[1] * 8)
    label_map = comfy.types.LabelMap(ids, TOY)
    clone = comfy.spade.L2IApplySPADE.execute(
        model=patcher, spade_file=str(path), label_map=label_map, strength=0.8, uncond_layout=uncond_layout
    )[0]
    batch = per_chunk * len(cond_or_uncond)
    x = torch.randn(batch, 4, *size)
    _, captured = _run(clone, x, cond_or_uncond)

    layout = one_hot(ids, TOY.num_classes, TOY.ignore_index)  # full resolution, as core's callers build it
    chunks = tuple("null" if (uncond_layout == "null layout" and c == 1) else "layout" for c in cond_or_uncond)
    assert len(captured) == len(EXPECTED_PATHS)
    for name, gn_path in EXPECTED_PATHS.items():
        x_in, out = captured[gn_path]
        gn = patcher.model.get_submodule(gn_path)
        expected = spade_group_norm(
            x_in,
            expand_layout_batch(layout, x_in.shape[0], chunks),
            adapter.spade_for(name),
            gn.num_groups,
            gn.weight,
            gn.bias,
            gn.eps,
            strength=0.8,
        )
        assert_close_for_dtype(out, expected, msg=f"{name} ({gn_path}) differs from core's spade_group_norm")
        assert not torch.allclose(out, F.group_norm(x_in, gn.num_groups, gn.weight, gn.bias, gn.eps))


@pytest.mark.parametrize("fmt", ["companion", "export"])
def test_whole_unet_output_equals_core_spade_groupnorm_wrappers(comfy, tmp_path, fmt):
    """The same UNet with core's SPADEGroupNorm swapped in at the mapped sites gives the same output."""
    patcher = _patcher(comfy)
    adapter = _adapter()
    path = _write_spade(tmp_path / "toy.spade.safetensors", adapter, fmt=fmt)
    ids = _ids(1, 56, 72)
    clone = comfy.spade.L2IApplySPADE.execute(
        model=patcher, spade_file=str(path), label_map=comfy.types.LabelMap(ids, TOY)
    )[0]
    x = torch.randn(4, 4, 7, 9)
    comfy_out, _ = _run(clone, x, [0, 1])

    reference = copy.deepcopy(patcher.model.diffusion_model)
    context = SPADELayoutContext()
    for name, gn_path in EXPECTED_PATHS.items():
        parent_path, attr = gn_path.removeprefix("diffusion_model.").rsplit(".", 1)
        parent = reference.get_submodule(parent_path)
        setattr(parent, attr, SPADEGroupNorm(parent.get_submodule(attr), adapter.spade_for(name), context, name))
    with torch.no_grad(), context.use(one_hot(ids, TOY.num_classes, TOY.ignore_index), chunks=("layout", "layout")):
        core_out = reference._forward(x, torch.full((4,), 5.0))
    assert_close_for_dtype(comfy_out, core_out)  # a deep copy of the UNet: other storage, up to rounding


def test_schedule_window_and_strength_zero(comfy, tmp_path):
    patcher = _patcher(comfy)
    path = _write_spade(tmp_path / "toy.spade.safetensors", _adapter())
    label_map = comfy.types.LabelMap(_ids(1, 32, 32), TOY)
    x = torch.randn(2, 4, 4, 4)
    plain, _ = _run(patcher, x, [0, 1])
    clone = comfy.spade.L2IApplySPADE.execute(
        model=patcher, spade_file=str(path), label_map=label_map, start_percent=0.5, end_percent=0.8
    )[0]  # active for sigma in [2, 5] with the toy schedule
    assert torch.equal(_run(clone, x, [0, 1], sigmas=torch.tensor([8.0]))[0], plain)
    assert torch.equal(_run(clone, x, [0, 1], sigmas=torch.tensor([1.0]))[0], plain)
    assert not torch.allclose(_run(clone, x, [0, 1], sigmas=torch.tensor([3.0]))[0], plain)
    off = comfy.spade.L2IApplySPADE.execute(model=patcher, spade_file=str(path), label_map=label_map, strength=0.0)[0]
    assert off.injections == {} and torch.equal(_run(off, x, [0, 1])[0], plain)


def test_cast_weights_groupnorm_uses_comfy_ops(comfy, tmp_path):
    patcher = _patcher(comfy, norm=CastGroupNorm)
    adapter = _adapter()
    path = _write_spade(tmp_path / "toy.spade.safetensors", adapter)
    ids = _ids(1, 32, 32)
    clone = comfy.spade.L2IApplySPADE.execute(
        model=patcher, spade_file=str(path), label_map=comfy.types.LabelMap(ids, TOY)
    )[0]
    calls = dict(comfy.ops.CALLS)
    x = torch.randn(2, 4, 4, 4)
    _, captured = _run(clone, x, [0])
    assert comfy.ops.CALLS["cast"] - calls["cast"] >= len(EXPECTED_PATHS)
    assert comfy.ops.CALLS["uncast"] - calls["uncast"] == len(EXPECTED_PATHS)  # every SPADE site un-casts
    name, gn_path = "up_blocks.1.resnets.1.norm2", EXPECTED_PATHS["up_blocks.1.resnets.1.norm2"]
    x_in, out = captured[gn_path]
    gn = patcher.model.get_submodule(gn_path)
    layout = expand_layout_batch(one_hot(ids, TOY.num_classes, TOY.ignore_index), 2, ("layout",))
    expected = spade_group_norm(x_in, layout, adapter.spade_for(name), gn.num_groups, gn.weight, gn.bias, gn.eps)
    assert_close_for_dtype(out, expected)


# ------------------------------------------------------------------------------------------------ errors
def test_errors_name_the_problem(comfy, tmp_path):
    patcher = _patcher(comfy)
    node = comfy.spade.L2IApplySPADE
    path = _write_spade(tmp_path / "toy.spade.safetensors", _adapter())
    city = get_label_set("cityscapes")
    city_map = comfy.types.LabelMap(torch.zeros(1, 16, 16, dtype=torch.long), city)
    with pytest.raises(comfy.spade.SPADEFileError, match=r"(?s)label set mismatch.*'toy'.*'cityscapes'"):
        node.execute(model=patcher, spade_file=str(path), label_map=city_map)
    toy_map = comfy.types.LabelMap(_ids(3, 16, 16), TOY)
    clone = node.execute(model=patcher, spade_file=str(path), label_map=toy_map)[0]
    with pytest.raises(comfy.spade.SPADEFileError, match="label map batch 3"):
        _run(clone, torch.randn(4, 4, 2, 2), [0, 1])
    with pytest.raises(comfy.spade.SPADEFileError, match="already has SPADE"):
        node.execute(model=clone, spade_file=str(path), label_map=toy_map)
    with pytest.raises(comfy.spade.SPADEFileError, match="spade_file"):
        node.execute(model=patcher, spade_file=" ", label_map=toy_map)
    # a file made for a model with other channel counts
    wide = SPADEAdapter(["up_blocks.0.resnets.0.norm1"], [64], TOY.num_classes, hidden_channels=4)
    wide_path = _write_spade(tmp_path / "wide.spade.safetensors", wide)
    with pytest.raises(comfy.spade.SPADEFileError, match="another base model"):
        node.execute(model=patcher, spade_file=str(wide_path), label_map=toy_map)
    # nothing of the failed attempts stuck to the input model
    assert patcher.wrappers == {} and patcher.injections == {}


# ------------------------------------------------------------------------------------------------ layout guidance
def test_layout_guider_gives_spade_the_null_layout_on_its_third_branch(comfy, tmp_path):
    """Layout CFG guider + Apply SPADE: cond lists 0 and 1 see the layout, list 2 the null layout (zeros)."""
    guidance = importlib.import_module("layout2image.nodes.guidance")
    patcher = _patcher(comfy)
    adapter = _adapter()
    path = _write_spade(tmp_path / "toy.spade.safetensors", adapter)
    ids = _ids(1, 40, 48)
    clone = comfy.spade.L2IApplySPADE.execute(
        model=patcher, spade_file=str(path), label_map=comfy.types.LabelMap(ids, TOY), uncond_layout="null layout"
    )[0]
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    class InnerModel:  # what calc_cond_batch calls: the (patched) diffusion model with the sampler's options
        def apply_model(self, x, t, transformer_options, conds):
            options = comfy_stub.sampling_transformer_options(clone, transformer_options["cond_or_uncond"])
            options.update({k: v for k, v in transformer_options.items() if k != "wrappers"})
            return clone.model.diffusion_model(x, t, None, None, None, options)

    conditioning = [[torch.zeros(1, 2, 4), {}]]
    guider = guidance.L2ILayoutGuider.execute(
        model=clone, positive=conditioning, negative=conditioning, text_cfg=3.0, layout_cfg=2.0
    )[0]
    guider.prepare_for_test(InnerModel())
    hooks = []
    for gn_path in EXPECTED_PATHS.values():
        gn = patcher.model.get_submodule(gn_path)
        hooks.append(gn.register_forward_hook(lambda m, i, o, p=gn_path: captured.__setitem__(p, (i[0], o))))
    clone.patch_model()
    try:
        with torch.no_grad():
            guider(torch.randn(2, 4, 5, 6), torch.tensor([4.0, 4.0]), model_options=clone.model_options)
    finally:
        clone.unpatch_model()
        for h in hooks:
            h.remove()
    layout = one_hot(ids, TOY.num_classes, TOY.ignore_index)
    for name, gn_path in EXPECTED_PATHS.items():
        x_in, out = captured[gn_path]
        assert x_in.shape[0] == 6  # three cond lists of two latents in one batch
        gn = patcher.model.get_submodule(gn_path)
        # the guider's rule replaces the node's "null layout for uncond" rule: only list 2 is null
        chunks = ("layout", "layout", "null")
        expected = spade_group_norm(
            x_in, expand_layout_batch(layout, 6, chunks), adapter.spade_for(name), gn.num_groups, gn.weight, gn.bias
        )
        assert_close_for_dtype(out, expected, msg=name)


# ------------------------------------------------------------------------------------------------ real ComfyUI
_REAL_COMFY_SPADE = r"""
import asyncio, importlib, importlib.util, sys
import torch
from torch import nn

sys.path.insert(0, COMFY_ROOT)
sys.argv = ["main.py", "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import comfy.model_patcher, comfy.ops, comfy.utils
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

name = PACK.replace(".", "_x_")
spec = importlib.util.spec_from_file_location(name, PACK + "/__init__.py", submodule_search_locations=[PACK])
pack = importlib.util.module_from_spec(spec)
sys.modules[name] = pack
spec.loader.exec_module(pack)
nodes_spade = importlib.import_module(name + ".nodes.spade")
nodes_types = importlib.import_module(name + ".nodes.types")
core_spade = importlib.import_module(name + ".core.spade")
core_hints = importlib.import_module(name + ".core.hints")
labels = importlib.import_module(name + ".core.labels").get_label_set("toy")
assert_close_for_dtype = importlib.import_module(name + ".testing").assert_close_for_dtype


class Sampling:
    def percent_to_sigma(self, p):
        return 1e9 if p <= 0 else (0.0 if p >= 1 else 10.0 * (1 - p))


config = dict(image_size=32, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=1, channel_mult=(1, 2),
              use_spatial_transformer=True, transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1],
              transformer_depth_middle=1, context_dim=16, num_head_channels=8)
for ops in (comfy.ops.disable_weight_init, comfy.ops.manual_cast):
    torch.manual_seed(0)
    unet = UNetModel(**config, operations=ops)
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn(p.shape) * 0.05)
        for m in unet.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape))
    base = nn.Module()
    base.diffusion_model = unet
    base.model_sampling = Sampling()
    patcher = comfy.model_patcher.ModelPatcher(base, torch.device("cpu"), torch.device("cpu"))

    # our site mapping agrees with ComfyUI's own diffusers <-> ldm map
    unet_config = dict(config, num_res_blocks=[1, 1], transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1])
    comfy_map = comfy.utils.unet_to_diffusers(unet_config)
    names = [f"mid_block.resnets.{i}.norm{n}" for i in (0, 1) for n in (1, 2)]
    names += [f"up_blocks.{b}.resnets.{r}.norm{n}" for b in (0, 1) for r in (0, 1) for n in (1, 2)]
    paths = nodes_spade.comfy_site_paths(unet, names)
    for site in names:
        assert paths[site] == "diffusion_model." + comfy_map[site + ".weight"].removesuffix(".weight"), site

    channels = [patcher.get_model_object(paths[s]).num_channels for s in names]
    adapter = core_spade.SPADEAdapter(names, channels, labels.num_classes, hidden_channels=8)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape) * 0.2)
    weights = nodes_spade.SpadeWeights(adapter=adapter.eval(), encoding="onehot", label_set=labels, source="test")
    ids = torch.randint(0, labels.num_classes, (1, 48, 56))
    clone = nodes_spade.apply_spade(patcher, weights, nodes_types.LabelMap(ids, labels), strength=0.7)
    assert patcher.get_injections("l2i_spade") is None and clone.get_injections("l2i_spade") is not None

    captured = {}
    hooks = [patcher.get_model_object(paths[s]).register_forward_hook(
        lambda m, i, o, s=s: captured.__setitem__(s, (i[0], o))) for s in names]
    options = comfy.model_patcher.create_model_options_clone(clone.model_options)["transformer_options"]
    comfy.patcher_extension.merge_nested_dicts(options.setdefault("wrappers", {}), clone.wrappers, copy_dict1=False)
    options.update(cond_or_uncond=[1, 0], sigmas=torch.tensor([5.0]))
    x = torch.randn(4, 4, 6, 7)
    clone.patch_model()
    try:
        with torch.no_grad():
            unet(x, torch.full((4,), 500.0), context=torch.randn(4, 3, 16), transformer_options=options)
    finally:
        clone.unpatch_model()
        for h in hooks:
            h.remove()
    assert not any("forward" in m.__dict__ for m in unet.modules()), "ejected"
    layout = core_hints.one_hot(ids, labels.num_classes, labels.ignore_index)
    for site in names:
        x_in, out = captured[site]
        gn = patcher.get_model_object(paths[site])
        expected = core_spade.spade_group_norm(
            x_in, core_spade.expand_layout_batch(layout, x_in.shape[0], ("layout", "layout")),
            adapter.spade_for(site), gn.num_groups, gn.weight, gn.bias, gn.eps, strength=0.7)
        assert_close_for_dtype(out, expected, msg=f"{ops.__name__} {site}")
    print("spade ok", ops.__name__, len(names))
"""


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="set COMFYUI_PATH to a ComfyUI checkout to run")
def test_apply_spade_inside_a_real_comfyui():
    """Real ModelPatcher (clone, injections, wrappers), real openaimodel UNet and comfy.ops GroupNorms (plain and
    manual-cast): the patched norms compute core's spade_group_norm, and our site map agrees with ComfyUI's."""
    root = Path(layout2image.__file__).resolve().parent
    comfy_root = Path(os.environ["COMFYUI_PATH"]).resolve()
    code = f"COMFY_ROOT = {str(comfy_root)!r}\nPACK = {str(root)!r}\n" + _REAL_COMFY_SPADE
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=comfy_root, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("spade ok") == 2, result.stdout
