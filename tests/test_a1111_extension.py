"""The AUTOMATIC1111/Forge extension (``a1111/``) without A1111: the logic on a tiny CompVis-style UNet, and the
script's wiring through a stand-in ``modules`` package and a stub ``gradio``."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import layout2image
from layout2image.core.errors import LabelMapError
from layout2image.core.hints import one_hot
from layout2image.core.labels import colorize, get_label_set, save_label_map
from layout2image.core.spade import (
    LdmSiteError,
    LdmSPADEPatch,
    SPADEAdapter,
    SPADEGroupNorm,
    SPADELayoutContext,
    SPADELayoutEncoder,
    SPADEPatchError,
    ldm_site_paths,
    resize_layout,
    schedule_fraction,
    spade_group_norm,
    tile_layout_rows,
)
from layout2image.testing import assert_close_for_dtype
from layout2image.weights.metadata import MetadataError
from layout2image.weights.spade_file import save_spade_file

ROOT = Path(layout2image.__file__).resolve().parent
EXT = ROOT / "a1111"
TOY = get_label_set("toy")
GROUPS = 4
EMB = 8
# The diffusers config of the toy UNet below (what the SPADE file's l2i.ldm_sites are computed from).
UNET_CONFIG = {
    "down_block_types": ["DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D"],
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
}
SITES = {  # diffusers site -> ldm path in the toy UNet (2 levels, num_res_blocks 1: 2 resnets per up level)
    "mid_block.resnets.0.norm1": "middle_block.0.in_layers.0",
    "mid_block.resnets.0.norm2": "middle_block.0.out_layers.0",
    "mid_block.resnets.1.norm1": "middle_block.2.in_layers.0",
    "mid_block.resnets.1.norm2": "middle_block.2.out_layers.0",
    "up_blocks.0.resnets.0.norm1": "output_blocks.0.0.in_layers.0",
    "up_blocks.0.resnets.0.norm2": "output_blocks.0.0.out_layers.0",
    "up_blocks.0.resnets.1.norm1": "output_blocks.1.0.in_layers.0",
    "up_blocks.0.resnets.1.norm2": "output_blocks.1.0.out_layers.0",
    "up_blocks.1.resnets.0.norm1": "output_blocks.2.0.in_layers.0",
    "up_blocks.1.resnets.0.norm2": "output_blocks.2.0.out_layers.0",
    "up_blocks.1.resnets.1.norm1": "output_blocks.3.0.in_layers.0",
    "up_blocks.1.resnets.1.norm2": "output_blocks.3.0.out_layers.0",
}


# ------------------------------------------------------------------------------------------------ a CompVis-style UNet
class GroupNorm32(nn.GroupNorm):
    """ldm's GroupNorm32: statistics in fp32, cast back."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


class ResBlock(nn.Module):
    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(GROUPS, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(EMB, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(GROUPS, out_channels),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Up(nn.Module):
    def forward(self, x):
        return F.interpolate(x, scale_factor=2, mode="nearest")


class Seq(nn.Sequential):
    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNetModel(nn.Module):
    """openaimodel.UNetModel's module names; forward(x, timesteps, context) as A1111's DiffusionWrapper calls it."""

    def __init__(self, wide: bool = False):
        super().__init__()
        c1, c2 = (8, 24) if wide else (8, 16)
        self.num_res_blocks = [1, 1]
        self.time_embed = nn.Linear(1, EMB)
        self.input_blocks = nn.ModuleList(
            [
                Seq(nn.Conv2d(4, c1, 3, padding=1)),
                Seq(ResBlock(c1, c1)),
                Seq(nn.Conv2d(c1, c1, 3, stride=2, padding=1)),
                Seq(ResBlock(c1, c2)),
            ]
        )
        self.middle_block = Seq(ResBlock(c2, c2), nn.Identity(), ResBlock(c2, c2))
        self.output_blocks = nn.ModuleList(
            [
                Seq(ResBlock(2 * c2, c2)),
                Seq(ResBlock(c2 + c1, c2), Up()),
                Seq(ResBlock(c2 + c1, c1)),
                Seq(ResBlock(2 * c1, c1)),
            ]
        )
        self.out = nn.Sequential(GroupNorm32(GROUPS, c1), nn.SiLU(), nn.Conv2d(c1, 4, 3, padding=1))

    def forward(self, x, timesteps=None, context=None, **kwargs):
        emb = self.time_embed(timesteps.float()[:, None] / 1000.0)
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


def _unet(seed: int = 0, wide: bool = False) -> UNetModel:
    torch.manual_seed(seed)
    unet = UNetModel(wide).eval()
    with torch.no_grad():  # non-trivial pretrained affines
        for m in unet.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
    return unet


def _adapter(seed: int = 1) -> SPADEAdapter:
    unet = UNetModel()
    channels = [unet.get_submodule(path).num_channels for path in SITES.values()]
    adapter = SPADEAdapter(list(SITES), channels, TOY.num_classes, hidden_channels=8)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)  # γ/β no longer zero: the modulation shows
    return adapter.eval()


def _ids(height: int = 32, width: int = 32, seed: int = 2) -> np.ndarray:
    gen = np.random.default_rng(seed)
    ids = np.repeat(np.repeat(gen.integers(0, TOY.num_classes, (height // 8, width // 8)), 8, 0), 8, 1)
    ids[0, :3] = TOY.ignore_index
    return ids.astype(np.int64)


@pytest.fixture(scope="module")
def logic():
    spec = importlib.util.spec_from_file_location("l2i_a1111_logic", EXT / "l2i_a1111_logic.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["l2i_a1111_logic"] = module  # dataclasses look their module up; the script imports it by this name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("l2i_a1111_logic", None)


@pytest.fixture
def files(tmp_path):
    """A SPADE companion written by the project's writer, and the label map as colour and id PNGs."""
    spade = save_spade_file(
        tmp_path / "loras" / "toy_sdm.spade.safetensors", _adapter(), label_set=TOY, unet_config=UNET_CONFIG
    )
    ids = _ids()
    colour = tmp_path / "layout.png"
    Image.fromarray(colorize(ids, TOY)).save(colour)
    id_png = save_label_map(tmp_path / "layout_ids.png", ids, TOY)
    return SimpleNamespace(spade=spade, ids=ids, colour=colour, id_png=id_png, loras=tmp_path / "loras")


def _call(unet, x, t):
    with torch.no_grad():
        return unet(x, torch.full((x.shape[0],), float(t)), None)


def _settings(logic, files, **overrides):
    values = dict(enabled=True, spade_file=str(files.spade), label_map=str(files.colour))
    values.update(overrides)
    return logic.SpadeSettings(**values)


# ------------------------------------------------------------------------------------------------ the file and sites
def test_sites_map_onto_the_ldm_unet_as_the_file_records(logic, files):
    unet = _unet()
    spade = logic.load_spade(files.spade)
    assert spade.label_set == TOY and spade.encoding == "onehot"
    assert ldm_site_paths(unet, spade.adapter.site_names) == {k: SITES[k] for k in spade.adapter.site_names}
    assert list(spade.file.ldm_sites) == [SITES[k] for k in spade.adapter.site_names]
    with pytest.raises(LdmSiteError, match="up_blocks.2.resnets.0.norm1"):
        ldm_site_paths(unet, ["up_blocks.2.resnets.0.norm1"])
    with pytest.raises(LdmSiteError, match="not an SD-style UNet"):
        ldm_site_paths(nn.Linear(2, 2), list(SITES))


def test_sd15_site_mapping_agrees_with_the_weights_converter():
    """On SD 1.5's ldm layout (skeleton: 2 res blocks per level, 3 output blocks per level), the 28 SPADE sites map to
    the ldm names weights/ writes into l2i.ldm_sites (the ldm names of kohya LoRA keys)."""
    from layout2image.weights.lora import unet_module_map

    def res():
        return ResBlock(4, 4)

    skeleton = nn.Module()
    skeleton.num_res_blocks = [2, 2, 2, 2]
    skeleton.middle_block = Seq(res(), nn.Identity(), res())
    skeleton.output_blocks = nn.ModuleList([Seq(res()) for _ in range(12)])
    names = [f"mid_block.resnets.{j}.norm{n}" for j in range(2) for n in (1, 2)]
    names += [f"up_blocks.{i}.resnets.{j}.norm{n}" for i in range(4) for j in range(3) for n in (1, 2)]
    module_map = unet_module_map(None)
    assert len(names) == 28
    assert ldm_site_paths(skeleton, names) == {name: module_map[name] for name in names}


def test_a_unet_of_another_width_is_refused(logic, files):
    run = logic.begin_run(_settings(logic, files), 32, 32)
    with pytest.raises(LdmSiteError, match="another base model"):
        run.attach(_unet(wide=True))


# ------------------------------------------------------------------------------------------------ patch / restore
def test_patch_changes_outputs_only_while_enabled_and_restore_is_bit_identical(logic, files):
    unet = _unet()
    x = torch.randn(2, 4, 8, 8)
    plain = _call(unet, x, 500)
    state_before = {k: v.clone() for k, v in unet.state_dict().items()}
    modules_before = {name: id(m) for name, m in unet.named_modules()}

    assert logic.begin_run(_settings(logic, files, enabled=False), 32, 32) is None  # disabled: nothing read
    run = logic.begin_run(_settings(logic, files), 32, 32)
    patch = run.attach(unet)
    assert run.attach(unet) is patch  # the hires pass re-attaches: same patch
    patched = _call(unet, x, 500)
    assert not torch.allclose(patched, plain)
    assert unet.state_dict().keys() == state_before.keys()  # no SPADE keys in the UNet's state dict

    run.close()
    run.close()  # twice is harmless
    assert torch.equal(_call(unet, x, 500), plain)
    assert {name: id(m) for name, m in unet.named_modules()} == modules_before
    assert not any("forward" in m.__dict__ for m in unet.modules())
    assert not unet._forward_pre_hooks and LdmSPADEPatch.current(unet) is None
    after = unet.state_dict()
    assert all(torch.equal(after[k], state_before[k]) for k in after)


def test_patched_norms_compute_cores_formula(logic, files):
    """Each patched GroupNorm returns core's spade_group_norm, and the diffusers wrapper (SPADEGroupNorm fed the
    full-resolution one-hot) gives the same numbers: the A1111 path and the training path agree."""
    unet = _unet()
    run = logic.begin_run(_settings(logic, files), 32, 32)
    run.attach(unet)
    captured = {}
    hooks = [
        unet.get_submodule(p).register_forward_hook(lambda m, i, o, p=p: captured.__setitem__(p, (i[0], o)))
        for p in SITES.values()
    ]
    x = torch.randn(2, 4, 8, 8)
    _call(unet, x, 500)
    for h in hooks:
        h.remove()
    full = one_hot(torch.from_numpy(files.ids)[None], TOY.num_classes, TOY.ignore_index)
    context = SPADELayoutContext()
    context.set(full)
    for name, path in SITES.items():
        gn_in, gn_out = captured[path]
        gn = unet.get_submodule(path)
        spade = run.spade.adapter.spade_for(name)
        layout = tile_layout_rows(resize_layout(full, gn_in.shape[-2:]), gn_in.shape[0])
        expected = spade_group_norm(gn_in, layout, spade, gn.num_groups, gn.weight, gn.bias, gn.eps)
        assert_close_for_dtype(gn_out, expected, msg=path)
        assert_close_for_dtype(gn_out, SPADEGroupNorm(gn, spade, context, name)(gn_in), msg=path)
    run.close()


@pytest.mark.parametrize(
    "start, end, t, modulated",
    [
        (0.0, 1.0, 999, True),
        (0.5, 1.0, 999, False),  # first step (fraction 0) is before the window
        (0.5, 1.0, 100, True),  # fraction 0.9
        (0.0, 0.3, 100, False),  # after the window
        (0.0, 0.3, 800, True),
    ],
)
def test_step_window(logic, files, start, end, t, modulated):
    unet = _unet()
    x = torch.randn(1, 4, 8, 8)
    plain = _call(unet, x, t)
    run = logic.begin_run(_settings(logic, files, start=start, end=end), 32, 32)
    run.attach(unet)
    out = _call(unet, x, t)
    run.close()
    assert torch.equal(out, plain) is not modulated


def test_strength_zero_is_the_plain_unet_and_strength_scales(logic, files):
    unet = _unet()
    x = torch.randn(1, 4, 8, 8)
    plain = _call(unet, x, 500)
    outs = {}
    for strength in (0.0, 0.5, 1.0):
        run = logic.begin_run(_settings(logic, files, strength=strength), 32, 32)
        run.attach(unet)
        outs[strength] = _call(unet, x, 500)
        run.close()
    assert torch.equal(outs[0.0], plain)
    assert (outs[0.5] - plain).abs().mean() < (outs[1.0] - plain).abs().mean()


def test_schedule_fraction():
    assert schedule_fraction(None) is None
    assert schedule_fraction(torch.tensor([999.0, 999.0])) == 0.0
    assert schedule_fraction(torch.tensor(0)) == 1.0
    assert schedule_fraction(torch.tensor([10.0, 500.0])) == pytest.approx(1 - 500 / 999)


def test_second_patch_refused_and_stale_patch_restored(logic, files):
    unet = _unet()
    x = torch.randn(1, 4, 8, 8)
    plain = _call(unet, x, 500)
    first = logic.begin_run(_settings(logic, files), 32, 32)
    patch = first.attach(unet)  # a run that "failed": never closed
    with pytest.raises(SPADEPatchError, match="already SPADE-patched"):
        LdmSPADEPatch(unet, patch.adapter, patch.encoder).patch()
    second = logic.begin_run(_settings(logic, files, strength=0.5), 32, 32)
    second.attach(unet)  # restores the stale patch first
    assert LdmSPADEPatch.current(unet) is second.patch and not first.patch.is_patched
    second.close()
    assert logic.restore_stale(unet) is False
    assert torch.equal(_call(unet, x, 500), plain)


# ------------------------------------------------------------------------------------------------ CFG batch
def test_cfg_tiling_order():
    layout = torch.arange(2, dtype=torch.float32).view(2, 1, 1, 1).expand(2, 3, 4, 4)
    rows = tile_layout_rows(layout, 4)  # [cond img0, cond img1, uncond img0, uncond img1]
    assert rows[:, 0, 0, 0].tolist() == [0.0, 1.0, 0.0, 1.0]
    assert tile_layout_rows(layout, 2)[:, 0, 0, 0].tolist() == [0.0, 1.0]  # batch_cond_uncond off: one block a call
    assert tile_layout_rows(layout[:1], 6).shape == (6, 3, 4, 4)  # one map: every row
    with pytest.raises(ValueError, match="single label map"):
        tile_layout_rows(layout, 5)  # AND prompts add rows per image


def test_cfg_rows_get_the_same_layout(logic, files):
    """A CFG batch [cond, uncond] of the same latent gives equal rows (both halves keep the layout), equal to a
    single-row call."""
    unet = _unet()
    run = logic.begin_run(_settings(logic, files), 32, 32)
    run.attach(unet)
    x = torch.randn(1, 4, 8, 8)
    single = _call(unet, x, 500)
    both = _call(unet, torch.cat([x, x]), 500)
    run.close()
    torch.testing.assert_close(both[0], both[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(both[:1], single, rtol=1e-5, atol=1e-6)


def test_layout_encoder_commutes_with_nearest_resize():
    ids = torch.from_numpy(_ids(40, 24))[None]
    for encoding, full in (
        ("onehot", one_hot(ids, TOY.num_classes, TOY.ignore_index)),
        ("onehot_edges", one_hot(ids, TOY.num_classes, TOY.ignore_index, with_edges=True)),
    ):
        encoder = SPADELayoutEncoder(ids, TOY, encoding)
        assert encoder.layout_channels == full.shape[1]
        for size in ((5, 3), (10, 6), (7, 9)):
            assert torch.equal(encoder.at(size), resize_layout(full, size)), (encoding, size)
    with pytest.raises(ValueError, match="SPADE layout encoding"):
        SPADELayoutEncoder(ids, TOY, "rgb")


# ------------------------------------------------------------------------------------------------ inputs and errors
def test_label_map_inputs(logic, files, tmp_path):
    from_colour = logic.read_layout(files.colour, TOY, 32, 32)
    from_ids = logic.read_layout(files.id_png, TOY, 32, 32)
    assert from_colour.shape == (1, 32, 32) and from_colour.dtype == torch.int64
    assert torch.equal(from_colour, torch.from_numpy(files.ids)[None]) and torch.equal(from_ids, from_colour)
    bigger = logic.read_layout(files.id_png, TOY, 64, 64)  # nearest-resized to the image size
    assert torch.equal(bigger[0, ::2, ::2], from_ids[0])
    # anti-aliased colours snap within the tolerance
    rgb = colorize(files.ids, TOY).astype(np.int16)
    rgb[5, 5] += np.array([6, -5, 4], dtype=np.int16)
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(tmp_path / "soft.png")
    assert torch.equal(logic.read_layout(tmp_path / "soft.png", TOY, 32, 32), from_colour)


def test_bad_colours_give_a_clear_error(logic, files, tmp_path):
    rgb = colorize(files.ids, TOY)
    rgb[10:12, 20:23] = (250, 0, 250)
    Image.fromarray(rgb).save(tmp_path / "bad.png")
    with pytest.raises(LabelMapError, match=r"(?s)not in label set 'toy'.*colour \[250, 0, 250\]: 6 px") as info:
        logic.begin_run(_settings(logic, files, label_map=str(tmp_path / "bad.png"), tolerance=16), 32, 32)
    assert "row 10" in str(info.value) and "tolerance" in str(info.value)


def test_label_set_mismatch_gives_a_clear_error(logic, files):
    with pytest.raises(MetadataError, match="label set mismatch") as info:
        logic.begin_run(_settings(logic, files, label_set="cityscapes"), 32, 32)
    assert "toy" in str(info.value) and "cityscapes" in str(info.value)
    assert logic.begin_run(_settings(logic, files, label_set="toy"), 32, 32) is not None


def test_missing_inputs_and_file_lookup(logic, files):
    with pytest.raises(logic.A1111SpadeError, match="no label map is uploaded"):
        logic.begin_run(_settings(logic, files, label_map=None), 32, 32)
    with pytest.raises(logic.A1111SpadeError, match="no SPADE file given"):
        logic.begin_run(_settings(logic, files, spade_file=" "), 32, 32)
    with pytest.raises(logic.A1111SpadeError, match="not found"):
        logic.resolve_spade_path("nope", [files.loras])
    # a name in the Lora folder, with or without suffix, or the LoRA file's name, finds the companion
    for name in ("toy_sdm", "toy_sdm.safetensors", "toy_sdm.spade.safetensors"):
        assert logic.resolve_spade_path(name, [files.loras.parent, files.loras]) == files.spade
    # what Gradio 3 (tempfile with .name) and 4 (str / dict) hand over
    assert logic.uploaded_path(SimpleNamespace(name=str(files.colour))) == files.colour
    assert logic.uploaded_path({"path": str(files.colour)}) == files.colour
    assert logic.uploaded_path(None) is None


def test_sd15_only_and_unet_lookup(logic):
    with pytest.raises(logic.A1111SpadeError, match="SD 1.5 models only.*SDXL"):
        logic.check_sd15(SimpleNamespace(is_sdxl=True))
    logic.check_sd15(SimpleNamespace(is_sdxl=False, is_sd2=False))
    unet = _unet()
    assert logic.ldm_unet_of(SimpleNamespace(model=SimpleNamespace(diffusion_model=unet))) is unet
    forge = SimpleNamespace(
        forge_objects=SimpleNamespace(unet=SimpleNamespace(model=SimpleNamespace(diffusion_model=unet)))
    )
    assert logic.ldm_unet_of(forge) is unet
    with pytest.raises(logic.A1111SpadeError, match="cannot find the UNet"):
        logic.ldm_unet_of(SimpleNamespace())


def test_settings_and_infotext(logic, files):
    with pytest.raises(logic.A1111SpadeError, match="start <= end"):
        logic.SpadeSettings(start=0.8, end=0.2)
    with pytest.raises(logic.A1111SpadeError, match="tolerance"):
        logic.SpadeSettings(tolerance=-1)
    args = (True, str(files.spade), str(files.colour), logic.FROM_FILE, 8, 0.75, 0.1, 0.9)
    settings = logic.SpadeSettings.from_script_args(args)
    assert settings.strength == 0.75 and settings.tolerance == 8.0 and settings.label_map == str(files.colour)
    run = logic.begin_run(settings, 32, 32)
    keys = logic.INFOTEXT_KEYS
    assert run.infotext[keys["spade_file"]] == "toy_sdm"
    assert run.infotext[keys["label_set"]] == "toy"
    assert (run.infotext[keys["strength"]], run.infotext[keys["start"]], run.infotext[keys["end"]]) == (
        "0.75",
        "0.1",
        "0.9",
    )
    assert len(run.infotext[keys["layout"]]) == 10
    assert set(run.infotext) == set(keys.values())


# ------------------------------------------------------------------------------------------------ the A1111 script
class _Component:
    def __init__(self, kind, **kwargs):
        self.kind, self.kwargs = kind, kwargs


@contextlib.contextmanager
def _fake_webui(sd_model, lora_dir):
    """Stand-ins for the few A1111 modules and Gradio calls the script touches."""
    gradio = types.ModuleType("gradio")
    for kind in ("Checkbox", "Textbox", "File", "Dropdown", "Slider"):
        setattr(gradio, kind, lambda kind=kind, **kw: _Component(kind, **kw))
    gradio.Accordion = gradio.Row = lambda *a, **kw: contextlib.nullcontext()

    modules = types.ModuleType("modules")
    modules.__path__ = []
    scripts = types.ModuleType("modules.scripts")
    scripts.AlwaysVisible = object()

    class Script:
        infotext_fields = None

    scripts.Script = Script
    shared = types.ModuleType("modules.shared")
    shared.sd_model = sd_model
    shared.cmd_opts = SimpleNamespace(lora_dir=str(lora_dir))
    processing = types.ModuleType("modules.processing")
    modules.scripts, modules.shared, modules.processing = scripts, shared, processing
    fakes = {
        "gradio": gradio,
        "modules": modules,
        "modules.scripts": scripts,
        "modules.shared": shared,
        "modules.processing": processing,
    }
    saved = {name: sys.modules.get(name) for name in fakes}
    saved_path = list(sys.path)
    sys.modules.update(fakes)
    try:
        spec = importlib.util.spec_from_file_location("l2i_sdm_spade_under_test", EXT / "scripts" / "l2i_sdm_spade.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module, scripts
    finally:
        sys.path[:] = saved_path
        for name, value in saved.items():
            if value is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = value


def test_script_wiring_through_a_fake_webui(logic, files):
    unet = _unet()
    sd_model = SimpleNamespace(model=SimpleNamespace(diffusion_model=unet), is_sdxl=False, num_timesteps=1000)
    x = torch.randn(2, 4, 8, 8)
    plain = _call(unet, x, 400)
    with _fake_webui(sd_model, files.loras) as (module, scripts):
        script = module.L2ISDMSpadeScript()
        assert script.title() == "Layout2Image SDM SPADE"
        assert script.show(False) is scripts.AlwaysVisible and script.show(True) is scripts.AlwaysVisible
        components = script.ui(False)
        assert [c.kind for c in components] == [
            "Checkbox",
            "Textbox",
            "File",
            "Dropdown",
            "Slider",
            "Slider",
            "Slider",
            "Slider",
        ]
        pasted = dict((key, comp) for comp, key in script.infotext_fields if isinstance(key, str))
        assert pasted["L2I SPADE strength"] is components[5]

        args = (True, "toy_sdm", SimpleNamespace(name=str(files.colour)), "(from the SPADE file)", 16, 1.0, 0.0, 1.0)
        p = SimpleNamespace(sd_model=sd_model, width=32, height=32, extra_generation_params={})
        script.process(p, *args)
        assert p.extra_generation_params["L2I SPADE"] == "toy_sdm"
        script.process_before_every_sampling(p, *args, x=x)
        script.process_before_every_sampling(p, *args, x=x)  # hires pass: still one patch
        patched = _call(unet, x, 400)
        assert not torch.allclose(patched, plain)
        script.postprocess(p, SimpleNamespace(), *args)
        assert torch.equal(_call(unet, x, 400), plain)
        assert not any("forward" in m.__dict__ for m in unet.modules())

        # disabled: nothing happens, nothing recorded
        q = SimpleNamespace(sd_model=sd_model, width=32, height=32, extra_generation_params={})
        script.process(q, False, *args[1:])
        assert q.extra_generation_params == {} and LdmSPADEPatch.current(unet) is None

        # an SDXL checkpoint is refused before anything is patched
        sdxl = SimpleNamespace(model=SimpleNamespace(diffusion_model=unet), is_sdxl=True)
        with pytest.raises(ValueError, match="SD 1.5 models only"):
            script.process(SimpleNamespace(sd_model=sdxl, width=32, height=32, extra_generation_params={}), *args)
        assert LdmSPADEPatch.current(unet) is None

        # a failure while attaching leaves the UNet as it was
        wide = _unet(wide=True)
        other = SimpleNamespace(model=SimpleNamespace(diffusion_model=wide), is_sdxl=False)
        with pytest.raises(ValueError, match="another base model"):
            script.process(SimpleNamespace(sd_model=other, width=32, height=32, extra_generation_params={}), *args)
        assert LdmSPADEPatch.current(wide) is None and not any("forward" in m.__dict__ for m in wide.modules())

        # a run that died before postprocess: the next run removes its patch
        r = SimpleNamespace(sd_model=sd_model, width=32, height=32, extra_generation_params={})
        script.process(r, *args)
        assert LdmSPADEPatch.current(unet) is not None
        script.process(SimpleNamespace(sd_model=sd_model, width=32, height=32, extra_generation_params={}), False)
        assert LdmSPADEPatch.current(unet) is None
        assert torch.equal(_call(unet, x, 400), plain)


def test_install_hook_finds_the_checkout():
    spec = importlib.util.spec_from_file_location("l2i_a1111_install", EXT / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # importing runs nothing
    assert module._checkout() == ROOT
    assert module.main() == 0  # layout2image is importable here: nothing to install
