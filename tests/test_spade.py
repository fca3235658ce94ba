"""SPADE: the module, site discovery, patch/unpatch round trip, the per-call layout context and its batch rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import nn

from layout2image.core.spade import (
    CFG_COND_UNCOND,
    CFG_UNCOND_COND,
    SPADE,
    SPADEAdapter,
    SPADEGroupNorm,
    SPADELayoutContext,
    SPADELayoutError,
    SPADEPatchError,
    clear_spade_layout,
    dispatch_spade_wrapper,
    expand_layout_batch,
    find_spade_sites,
    get_spade_adapter,
    get_spade_context,
    is_spade_patched,
    patch_unet,
    set_spade_layout,
    site_key,
    spade_group_norm,
    spade_layout,
    unpatch_unet,
)
from layout2image.testing import assert_close_for_dtype, sd1x_tiny_unet_config, tiny_unet_config

LAYOUT_CHANNELS = 5
TINY_UNET = tiny_unet_config()
# SD 1.5's block structure (types, layers_per_block 2) with tiny widths: the site count depends on structure only.
SD15_STRUCTURE = sd1x_tiny_unet_config()
SD15 = dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8, sample_size=64)
# sdm.md §10.4: SD 1.5's channels per site, (norm1 of resnets 0..2, norm2).
SD15_CHANNELS = {
    "up_blocks.0": ((2560, 2560, 2560), 1280),
    "up_blocks.1": ((2560, 2560, 1920), 1280),
    "up_blocks.2": ((1920, 1280, 960), 640),
    "up_blocks.3": ((960, 640, 640), 320),
}


def tiny_unet(seed: int = 0, **overrides) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**TINY_UNET, **overrides}).eval()


def unet_inputs(batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, 16, 16, generator=g)
    timestep = torch.tensor([10, 500] * (batch // 2) + [10] * (batch % 2))
    text = torch.randn(batch, 7, 32, generator=g)
    return sample, timestep, text


def random_layout(batch: int, size: int = 64, seed: int = 2) -> torch.Tensor:
    """A one-hot layout `(batch, C_m, size, size)` with random rectangles of classes."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, LAYOUT_CHANNELS, (batch, size // 8, size // 8), generator=g)
    ids = ids.repeat_interleave(8, dim=1).repeat_interleave(8, dim=2)
    return F.one_hot(ids, LAYOUT_CHANNELS).permute(0, 3, 1, 2).float()


def randomize(module: nn.Module, seed: int = 3, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def run(unet, sample, timestep, text) -> torch.Tensor:
    with torch.no_grad():
        return unet(sample, timestep, encoder_hidden_states=text).sample


@pytest.fixture
def patched():
    """A tiny UNet patched with a randomised (non-identity) adapter."""
    unet = tiny_unet()
    adapter = SPADEAdapter.from_unet(unet, LAYOUT_CHANNELS, hidden_channels=16)
    randomize(adapter)
    patch_unet(unet, adapter)
    return unet


# --- the module ----------------------------------------------------------------------------------------------


def test_spade_zero_init_and_shapes():
    spade = SPADE(LAYOUT_CHANNELS, 24, hidden_channels=16)
    for conv in (spade.sem_gamma, spade.sem_beta):
        assert torch.count_nonzero(conv.weight) == 0 and torch.count_nonzero(conv.bias) == 0
    mod = spade(random_layout(2, size=8))
    assert mod.gamma.shape == mod.beta.shape == (2, 24, 8, 8)
    assert torch.count_nonzero(mod.gamma) == 0 and torch.count_nonzero(mod.beta) == 0


def test_budget_variant_uses_1x1_modulation_convs():
    spade = SPADE(LAYOUT_CHANNELS, 24, hidden_channels=16, kernel_size=1)
    assert spade.sem_shared.kernel_size == (3, 3)
    assert spade.sem_gamma.kernel_size == spade.sem_beta.kernel_size == (1, 1)
    assert spade(random_layout(1, size=8)).gamma.shape == (1, 24, 8, 8)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(layout_channels=0),
        dict(feature_channels=-1),
        dict(hidden_channels=0),
        dict(kernel_size=2),
        dict(shared_kernel_size=0),
    ],
)
def test_spade_rejects_bad_sizes(kwargs):
    args = dict(layout_channels=3, feature_channels=8, hidden_channels=4) | kwargs
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SPADE(**args)


def test_pure_function_matches_wrapper_and_formula():
    """The ComfyUI path calls ``spade_group_norm`` on its own GroupNorm: same numbers as the diffusers wrapper."""
    torch.manual_seed(0)
    gn = nn.GroupNorm(4, 16)
    randomize(gn, seed=5)
    spade = SPADE(LAYOUT_CHANNELS, 16, hidden_channels=8)
    randomize(spade, seed=6)
    x = torch.randn(2, 16, 8, 8)
    layout = random_layout(2, size=32)
    context = SPADELayoutContext()
    context.set(layout)
    wrapped = SPADEGroupNorm(gn, spade, context, "site")(x)
    pure = spade_group_norm(x, layout, spade, gn.num_groups, gn.weight, gn.bias, gn.eps)
    assert torch.equal(wrapped, pure)
    mod = spade(F.interpolate(layout, size=(8, 8), mode="nearest"))
    expected = gn(x) * (1 + mod.gamma) + mod.beta
    torch.testing.assert_close(pure, expected, rtol=0, atol=1e-6)
    # strength 0 gives the plain GroupNorm; strength s scales γ and β.
    assert torch.equal(spade_group_norm(x, layout, spade, 4, gn.weight, gn.bias, gn.eps, strength=0.0), gn(x))
    half = spade_group_norm(x, layout, spade, 4, gn.weight, gn.bias, gn.eps, strength=0.5)
    torch.testing.assert_close(half, gn(x) * (1 + 0.5 * mod.gamma) + 0.5 * mod.beta, rtol=0, atol=1e-6)


def test_bf16_input_uses_fp32_group_norm():
    torch.manual_seed(0)
    gn = nn.GroupNorm(4, 16)
    randomize(gn, seed=5)
    spade = SPADE(LAYOUT_CHANNELS, 16, hidden_channels=8)
    randomize(spade, seed=6)
    x = torch.randn(2, 16, 8, 8).to(torch.bfloat16)
    layout = random_layout(2, size=8)
    out = spade_group_norm(x, layout, spade, 4, gn.weight, gn.bias, gn.eps)
    assert out.dtype == torch.bfloat16
    mod = spade(layout)
    fp32 = F.group_norm(x.float(), 4, gn.weight, gn.bias, gn.eps) * (1 + mod.gamma) + mod.beta
    assert torch.equal(out, fp32.to(torch.bfloat16))
    # bf16 weights as well (a UNet cast to bf16): still runs, same result up to bf16 rounding.
    out16 = spade_group_norm(x, layout, spade.to(torch.bfloat16), 4, gn.weight.bfloat16(), gn.bias.bfloat16(), gn.eps)
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), fp32, rtol=0.05, atol=0.05)


def test_pure_function_rejects_batch_mismatch():
    spade = SPADE(LAYOUT_CHANNELS, 16, hidden_channels=8)
    with pytest.raises(ValueError, match="expand_layout_batch"):
        spade_group_norm(torch.randn(4, 16, 8, 8), random_layout(2, size=8), spade, 4)


def test_dispatch_by_type():
    spade = SPADE(LAYOUT_CHANNELS, 16, hidden_channels=8)
    context = SPADELayoutContext()
    gn = nn.GroupNorm(4, 16)
    wrapper = dispatch_spade_wrapper(gn, spade, context, "s")
    assert isinstance(wrapper, SPADEGroupNorm) and wrapper.base_layer is gn
    assert wrapper.weight is gn.weight and wrapper.num_groups == 4 and wrapper.num_channels == 16
    assert dispatch_spade_wrapper(nn.LayerNorm(16), spade, context, "s") is None

    class OtherNorm(nn.GroupNorm):
        pass

    assert dispatch_spade_wrapper(OtherNorm(4, 16), spade, context, "s") is None


# --- sites ---------------------------------------------------------------------------------------------------


def test_sites_of_tiny_unet():
    unet = tiny_unet()
    sites = find_spade_sites(unet)
    names = [s.name for s in sites]
    assert len(names) == 12  # mid: 2 resnets, up: 2 blocks x 2 resnets; x (norm1, norm2)
    assert names[:2] == ["mid_block.resnets.0.norm1", "mid_block.resnets.0.norm2"]
    assert names[-1] == "up_blocks.1.resnets.1.norm2"
    assert all(n.startswith(("mid_block.resnets.", "up_blocks.")) and ".resnets." in n for n in names)
    assert all(type(s.module) is nn.GroupNorm for s in sites)
    assert [s.num_channels for s in sites] == [unet.get_submodule(n).num_channels for n in names]


def test_sd15_structure_gives_28_sites():
    sites = find_spade_sites(UNet2DConditionModel(**SD15_STRUCTURE))
    assert len(sites) == 28
    assert sum(s.name.startswith("mid_block.") for s in sites) == 4
    assert not any("down_blocks" in s.name or "attentions" in s.name or "conv_norm_out" in s.name for s in sites)


def test_sd15_channels_match_the_design_table():
    with torch.device("meta"):  # the real SD 1.5 shape, without allocating its weights
        unet = UNet2DConditionModel(**SD15)
    channels = {s.name: s.num_channels for s in find_spade_sites(unet)}
    assert len(channels) == 28
    for block, (norm1, norm2) in SD15_CHANNELS.items():
        for i in range(3):
            assert channels[f"{block}.resnets.{i}.norm1"] == norm1[i], f"{block}.resnets.{i}.norm1"
            assert channels[f"{block}.resnets.{i}.norm2"] == norm2, f"{block}.resnets.{i}.norm2"
    assert {channels[f"mid_block.resnets.{i}.norm{j}"] for i in (0, 1) for j in (1, 2)} == {1280}


def test_find_sites_rejects_non_unet():
    with pytest.raises(ValueError, match="up_blocks"):
        find_spade_sites(nn.Linear(2, 2))


# --- adapter -------------------------------------------------------------------------------------------------


def test_adapter_state_dict_names_are_stable():
    unet = tiny_unet()
    adapter = SPADEAdapter.from_unet(unet, LAYOUT_CHANNELS, hidden_channels=16)
    sites = [s.name for s in find_spade_sites(unet)]
    assert adapter.site_names == sites
    expected = {
        f"sites.{site_key(n)}.sem_{conv}.{p}"
        for n in sites
        for conv in ("shared", "gamma", "beta")
        for p in ("weight", "bias")
    }
    assert set(adapter.state_dict()) == expected
    assert site_key("up_blocks.0.resnets.1.norm2") == "up_blocks_0_resnets_1_norm2"
    rebuilt = SPADEAdapter(**adapter.config)  # the config alone rebuilds the same shapes
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in adapter.state_dict().items()
    }


# --- patching ------------------------------------------------------------------------------------------------


def test_patched_equals_unpatched_at_init():
    unet = tiny_unet()
    inputs = unet_inputs()
    reference = run(unet, *inputs)
    config_before = dict(unet.config)
    names = patch_unet(unet, SPADEAdapter.from_unet(unet, LAYOUT_CHANNELS, hidden_channels=16))
    assert names == [s.name for s in find_spade_sites(unet)]
    assert all(isinstance(unet.get_submodule(n), SPADEGroupNorm) for n in names)
    assert dict(unet.config) == config_before
    with spade_layout(unet, random_layout(2)):
        out = run(unet, *inputs)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)


def test_output_changes_with_nonzero_modulation(patched):
    inputs = unet_inputs()
    layout = random_layout(2)
    with spade_layout(patched, layout):
        out = run(patched, *inputs)
    with spade_layout(patched, random_layout(2, seed=9)):
        other = run(patched, *inputs)
    unpatch_unet(patched)
    reference = run(patched, *inputs)
    assert (out - reference).abs().max() > 1e-3
    assert (out - other).abs().max() > 1e-3  # the layout itself matters, not just the patch


def test_unpatch_restores_objects_keys_and_outputs():
    unet = tiny_unet()
    inputs = unet_inputs()
    reference = run(unet, *inputs)
    originals = {s.name: s.module for s in find_spade_sites(unet)}
    keys = list(unet.state_dict())
    adapter = SPADEAdapter.from_unet(unet, LAYOUT_CHANNELS, hidden_channels=16)
    randomize(adapter)
    patch_unet(unet, adapter)
    assert is_spade_patched(unet) and get_spade_adapter(unet) is adapter
    assert list(unet.state_dict()) != keys
    assert unpatch_unet(unet) is adapter
    assert not is_spade_patched(unet)
    assert all(unet.get_submodule(name) is module for name, module in originals.items())
    assert not any(isinstance(m, SPADEGroupNorm) for m in unet.modules())
    assert list(unet.state_dict()) == keys
    assert torch.equal(run(unet, *inputs), reference)
    with pytest.raises(SPADEPatchError, match="not SPADE-patched"):
        unpatch_unet(unet)


def test_second_patch_is_refused(patched):
    before = {name: patched.get_submodule(name) for name in get_spade_adapter(patched).site_names}
    with pytest.raises(SPADEPatchError, match="already SPADE-patched.*unpatch_unet"):
        patch_unet(patched, SPADEAdapter.from_unet(tiny_unet(), LAYOUT_CHANNELS, hidden_channels=16))
    assert all(patched.get_submodule(name) is module for name, module in before.items())


def test_adapter_of_another_architecture_is_refused_atomically():
    unet = tiny_unet()
    other = SPADEAdapter.from_unet(tiny_unet(block_out_channels=(32, 48)), LAYOUT_CHANNELS, hidden_channels=16)
    with pytest.raises(ValueError, match="nothing was patched"):
        patch_unet(unet, other)
    assert not is_spade_patched(unet)
    assert not any(isinstance(m, SPADEGroupNorm) for m in unet.modules())


def test_bf16_unet_forward_runs():
    unet = tiny_unet()
    patch_unet(unet, SPADEAdapter.from_unet(unet, LAYOUT_CHANNELS, hidden_channels=16))
    randomize(get_spade_adapter(unet))
    unet.to(torch.bfloat16)
    sample, timestep, text = unet_inputs()
    with spade_layout(unet, random_layout(2)):
        out = run(unet, sample.bfloat16(), timestep, text.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# --- layout context and batch rule ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_layouts", "batch", "chunks", "expected"),
    [
        (2, 2, ("layout",), [1, 2]),
        (1, 3, ("layout",), [1, 1, 1]),
        (2, 4, ("layout",), [1, 1, 2, 2]),  # two samples per layout, diffusers' num_images_per_prompt order
        (2, 4, CFG_UNCOND_COND, [0, 0, 1, 2]),
        (2, 4, CFG_COND_UNCOND, [1, 2, 0, 0]),
        (1, 4, CFG_UNCOND_COND, [0, 0, 1, 1]),
        (2, 8, ("layout", "layout"), [1, 1, 2, 2, 1, 1, 2, 2]),  # text CFG, both halves keep the layout
        (2, 8, CFG_UNCOND_COND, [0, 0, 0, 0, 1, 1, 2, 2]),
        (1, 2, ("null",), [0, 0]),
    ],
)
def test_expand_layout_batch(n_layouts, batch, chunks, expected):
    layout = torch.arange(1, n_layouts + 1, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 4, 4)
    out = expand_layout_batch(layout, batch, chunks)
    assert out.shape == (batch, 3, 4, 4)
    assert out[:, 0, 0, 0].tolist() == expected
    assert torch.equal(out, out[:, :1, :1, :1].expand_as(out))


@pytest.mark.parametrize(
    ("n_layouts", "batch", "chunks", "match"),
    [
        (2, 3, ("layout",), "not a multiple of the layout batch 2"),
        (2, 2, CFG_UNCOND_COND, "not a multiple of the layout batch 2"),
        (1, 3, CFG_UNCOND_COND, "cannot be split into 2"),
        (1, 2, ("cond",), "must be one of"),
        (1, 2, "layout", "non-empty sequence"),
        (1, 2, (), "non-empty sequence"),
    ],
)
def test_expand_layout_batch_errors(n_layouts, batch, chunks, match):
    with pytest.raises(SPADELayoutError, match=match):
        expand_layout_batch(torch.zeros(n_layouts, 3, 4, 4), batch, chunks)


def test_cfg_halves_get_their_own_layout(patched):
    sample, timestep, text = unet_inputs()
    uncond_text = torch.zeros_like(text)
    layout = random_layout(2)
    seen = []
    site = get_spade_adapter(patched).spade_for("up_blocks.1.resnets.0.norm1")
    hook = site.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    for chunks in (CFG_UNCOND_COND, CFG_COND_UNCOND):
        seen.clear()
        order = [uncond_text, text] if chunks == CFG_UNCOND_COND else [text, uncond_text]
        with spade_layout(patched, layout, chunks=chunks):
            both = run(patched, torch.cat([sample] * 2), torch.cat([timestep] * 2), torch.cat(order))
        null_half = slice(0, 2) if chunks == CFG_UNCOND_COND else slice(2, 4)
        cond_half = slice(2, 4) if chunks == CFG_UNCOND_COND else slice(0, 2)
        # the wrapper saw the null layout (zeros) for the uncond half and the real one for the cond half
        assert torch.count_nonzero(seen[0][null_half]) == 0
        assert torch.equal(seen[0][cond_half], F.interpolate(layout, size=seen[0].shape[-2:], mode="nearest"))
        # ... and each half equals its own separate forward
        with spade_layout(patched, torch.zeros_like(layout)):
            uncond = run(patched, sample, timestep, uncond_text)
        with spade_layout(patched, layout):
            cond = run(patched, sample, timestep, text)
        torch.testing.assert_close(both[null_half], uncond, rtol=0, atol=1e-5)
        torch.testing.assert_close(both[cond_half], cond, rtol=0, atol=1e-5)
        assert (uncond - cond).abs().max() > 1e-3
    hook.remove()


@pytest.mark.parametrize("n_layouts", [1, 2])
def test_several_samples_per_layout(patched, n_layouts):
    sample, timestep, text = unet_inputs(batch=4)
    layout = random_layout(n_layouts)
    with spade_layout(patched, layout):
        repeated = run(patched, sample, timestep, text)
    with spade_layout(patched, layout.repeat_interleave(4 // n_layouts, dim=0)):
        explicit = run(patched, sample, timestep, text)
    assert_close_for_dtype(repeated, explicit)  # the layout's storage differs: up to rounding


def test_missing_layout_raises(patched):
    inputs = unet_inputs()
    with pytest.raises(SPADELayoutError, match="without a layout.*spade_layout"):
        run(patched, *inputs)
    with spade_layout(patched, random_layout(2)):
        run(patched, *inputs)
    with pytest.raises(SPADELayoutError, match="without a layout"):
        run(patched, *inputs)  # cleared again on exit
    # the null layout is available, but only when asked for
    with spade_layout(patched, random_layout(1), chunks=("null",)):
        null = run(patched, *inputs)
    with spade_layout(patched, torch.zeros(2, LAYOUT_CHANNELS, 8, 8)):
        zeros = run(patched, *inputs)
    assert torch.equal(null, zeros)


def test_set_clear_and_nesting(patched):
    outer, inner = random_layout(2), random_layout(1, seed=7)
    context = get_spade_context(patched)
    set_spade_layout(patched, outer, strength=0.5)
    with spade_layout(patched, inner, chunks=CFG_UNCOND_COND):
        assert context.layout is inner and context.chunks == CFG_UNCOND_COND and context.strength == 1.0
    assert context.layout is outer and context.chunks == ("layout",) and context.strength == 0.5
    clear_spade_layout(patched)
    assert not context.is_set
    # the context itself (taken before DDP/accelerate wrapping) drives the same wrappers
    inputs = unet_inputs()
    with context.use(outer):
        via_context = run(patched, *inputs)
    assert not context.is_set
    with spade_layout(patched, outer):
        assert torch.equal(run(patched, *inputs), via_context)
    with pytest.raises(SPADELayoutError, match="float tensor"):
        set_spade_layout(patched, torch.zeros(2, 8, 8, dtype=torch.long))


def test_layout_batch_mismatch_error_names_the_fix(patched):
    with spade_layout(patched, random_layout(3)), pytest.raises(SPADELayoutError, match="layout batch 3"):
        run(patched, *unet_inputs())
