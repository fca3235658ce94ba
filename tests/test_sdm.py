"""The pixel-space SDM UNet (core/sdm): layout against the official key manifest, the blocks' formulas, where the label
map enters, the conditioning tensor, guidance on ε only, and the learned-range reverse step.

The model tests use the ``tiny`` preset (32/64 channels, 16², ~1.1 M parameters); the full-size presets are only
built on the meta device (no memory, no time).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from layout2image.core.labels import get_label_set
from layout2image.core.sdm import (
    SDM_CONDITIONS,
    SDM_PRESETS,
    AttentionBlock,
    GroupNorm32,
    SDMConditionSpec,
    SDMConfig,
    SDMDecoderResBlock,
    SDMEncoderResBlock,
    SDMSchedule,
    SDMSpadeNorm,
    SDMUNet,
    guided_sdm_output,
    legacy_qkv_attention,
    null_layout_like,
    p_mean_variance,
    p_sample_step,
    sample_sdm,
    sdm_condition,
    sdm_guidance,
    sdm_preset,
    sdm_timestep_embedding,
)
from layout2image.testing import assert_close_for_dtype

MANIFEST = Path(__file__).parent / "data" / "sdm_ade20k_manifest.json"
TOY = get_label_set("toy")
TOY_SPEC = SDMConditionSpec(TOY.num_classes, edges=True)  # 9 channels, the tiny preset's C_y

# Parameter counts of the official layouts as sdm.md §3 states them (millions, one decimal).
SPEC_PARAMS_M = {"ade20k": 660.6, "cityscapes": 654.0, "celebamask_hq": 653.1, "coco_stuff": 662.5}


def _meta_unet(name: str) -> SDMUNet:
    with torch.device("meta"):
        return SDMUNet.from_sdm_config(sdm_preset(name))


def _randomised(seed: int = 0) -> SDMUNet:
    """The tiny UNet with every parameter random (so the zero-initialised convs do not hide anything)."""
    torch.manual_seed(seed)
    unet = SDMUNet.from_sdm_config(sdm_preset("tiny"))
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return unet.eval()


def _inputs(batch: int = 2, size: tuple[int, int] = (16, 16), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, *size, generator=g)
    labels = torch.randint(0, TOY.num_classes, (batch, *size), generator=g)
    return x, torch.tensor([10, 900][:batch]), sdm_condition(labels, TOY, spec=TOY_SPEC)


# ---------------------------------------------------------------------------------------------------- layout
def test_ade20k_keys_and_shapes_equal_the_manifest():
    data = json.loads(MANIFEST.read_text())
    manifest = {k: tuple(v) for k, v in data["keys"].items()}
    ours = {k: tuple(v.shape) for k, v in _meta_unet("ade20k").state_dict().items()}
    assert sorted(set(manifest) - set(ours)) == [], "official keys our UNet lacks"
    assert sorted(set(ours) - set(manifest)) == [], "keys our UNet has and the official one lacks"
    assert {k: s for k, s in ours.items() if s != manifest[k]} == {}
    assert list(ours) == list(manifest), "state-dict order differs from the official module order"
    assert len(ours) == data["num_tensors"]
    assert sum(math.prod(s) for s in ours.values()) == data["num_parameters"]


@pytest.mark.parametrize("name", sorted(SPEC_PARAMS_M))
def test_official_parameter_counts(name):
    unet = _meta_unet(name)
    count = sum(p.numel() for p in unet.parameters())
    assert abs(count / 1e6 - SPEC_PARAMS_M[name]) < 0.05, (
        f"{name}: {count:,} parameters, spec says ~{SPEC_PARAMS_M[name]} M"
    )


def test_ade20k_block_counts_match_the_spec():
    unet = _meta_unet("ade20k")
    sdd = [m for m in unet.modules() if isinstance(m, SDMDecoderResBlock)]
    spade = [m for m in unet.modules() if isinstance(m, SDMSpadeNorm)]
    assert len(sdd) == 25 and len(spade) == 50  # 2 middle + 18 decoder + 5 up; two SPADE sites each
    assert len(unet.input_blocks) == 18 and len(unet.output_blocks) == 18  # 18 skips, one per decoder stage
    # no SPADE anywhere in the encoder
    assert not any(isinstance(m, SDMSpadeNorm) for m in unet.input_blocks.modules())
    encoder = sum(p.numel() for p in unet.input_blocks.parameters()) + sum(
        p.numel() for p in unet.time_embed.parameters()
    )
    assert abs(encoder / 1e6 - 164.7) < 0.05  # sdm.md §3: "The encoder is 164.7 M"


def test_config_validation_and_presets():
    with pytest.raises(ValueError, match="multiple of the 32 GroupNorm groups"):
        SDMConfig(label_channels=4, model_channels=48, channel_mult=(1, 2))
    with pytest.raises(ValueError, match="num_head_channels"):
        SDMConfig(label_channels=4, model_channels=32, channel_mult=(1, 3), num_head_channels=64)
    with pytest.raises(ValueError, match="label_channels"):
        SDMConfig(label_channels=0)
    with pytest.raises(ValueError, match="unknown SDM preset 'ade'; known presets are ade20k"):
        sdm_preset("ade")
    for name, spec in SDM_CONDITIONS.items():
        assert SDM_PRESETS[name].label_channels == spec.channels, name
    cfg = sdm_preset("tiny")
    unet = SDMUNet.from_sdm_config(cfg)
    assert unet.sdm_config == cfg and SDMConfig.from_kwargs(cfg.to_kwargs()) == cfg
    assert SDM_PRESETS["tiny"] == cfg  # building does not touch the preset


# ---------------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("batch,size", [(1, (16, 16)), (2, (16, 32))])
def test_tiny_forward_shapes(batch, size):
    unet = _randomised()
    x, t, y = _inputs(batch, size)
    with torch.no_grad():
        out = unet(x, t, y)
    assert out.shape == (batch, 6, *size) and out.dtype == torch.float32
    with torch.no_grad():  # a scalar timestep is broadcast over the batch (a (1, D) time MLP input, not (B, D))
        assert_close_for_dtype(unet(x, torch.tensor(10), y), unet(x, torch.full((batch,), 10), y))


def test_output_is_exactly_zero_at_init():
    torch.manual_seed(0)
    unet = SDMUNet.from_sdm_config(sdm_preset("tiny"))
    zero_weights = {n for n, p in unet.named_parameters() if n.endswith(".weight") and not p.any()}
    # exactly: every resblock's last conv (SDE out_layers.3, SDD out_layers.2), every attention projection, the
    # final conv; SPADE's γ/β convs keep PyTorch's default init (the official SDM trains from scratch)
    expected = {f"{n}.{'out_layers.2' if isinstance(m, SDMDecoderResBlock) else 'out_layers.3'}.weight"
                for n, m in unet.named_modules() if isinstance(m, (SDMDecoderResBlock, SDMEncoderResBlock))}  # fmt: skip
    expected |= {f"{n}.proj_out.weight" for n, m in unet.named_modules() if isinstance(m, AttentionBlock)}
    expected |= {"out.2.weight"}
    assert zero_weights == expected
    x, t, y = _inputs()
    with torch.no_grad():
        assert torch.equal(unet(x, t, y), torch.zeros(2, 6, 16, 16))


def test_wrong_inputs_are_refused():
    unet = _randomised()
    x, t, y = _inputs()
    with pytest.raises(ValueError, match=r"`y` must be \(B=2, C_y=9"):
        unet(x, t, y[:, :8])
    with pytest.raises(ValueError, match="divisible by 2"):
        unet(x[..., :15], t, y)


def _stage_outputs(unet, x, t, y):
    """Outputs of every input/middle/output stage, recorded with forward hooks."""
    seen = {}
    hooks = [
        module.register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, out.clone()))
        for name, module in [
            *((f"input_blocks.{i}", s) for i, s in enumerate(unet.input_blocks)),
            ("middle_block", unet.middle_block),
            *((f"output_blocks.{i}", s) for i, s in enumerate(unet.output_blocks)),
        ]
    ]
    try:
        with torch.no_grad():
            out = unet(x, t, y)
    finally:
        for h in hooks:
            h.remove()
    return seen, out


def test_label_map_enters_the_middle_block_and_decoder_never_the_encoder():
    unet = _randomised()
    x, t, y1 = _inputs(seed=0)
    y2 = _inputs(seed=1)[2]
    a, out_a = _stage_outputs(unet, x, t, y1)
    b, out_b = _stage_outputs(unet, x, t, y2)
    for name in a:
        if name.startswith("input_blocks"):
            assert torch.equal(a[name], b[name]), f"{name} depends on the label map"
        else:
            assert not torch.allclose(a[name], b[name]), f"{name} ignores the label map"
    assert not torch.allclose(out_a, out_b)
    # and it enters only through SPADE: with γ = β = 0 everywhere the label map changes nothing
    with torch.no_grad():
        for m in unet.modules():
            if isinstance(m, SDMSpadeNorm):
                for conv in (m.mlp_gamma, m.mlp_beta):
                    conv.weight.zero_()
                    conv.bias.zero_()
    assert torch.equal(_stage_outputs(unet, x, t, y1)[1], _stage_outputs(unet, x, t, y2)[1])


def test_null_label_is_all_zero_and_changes_the_output():
    unet = _randomised()
    x, t, y = _inputs()
    null = null_layout_like(y)
    assert null.shape == y.shape and not null.any()
    with torch.no_grad():
        assert not torch.allclose(unet(x, t, y), unet(x, t, null))


# ---------------------------------------------------------------------------------------------------- blocks
def test_spade_norm_formula():
    torch.manual_seed(0)
    spade = SDMSpadeNorm(feature_channels=64, layout_channels=5, hidden_channels=8)
    x = torch.randn(2, 64, 4, 6) * 3 + 1
    y = torch.rand(2, 5, 8, 12)  # twice the feature size: nearest-resized inside
    m = F.interpolate(y, size=(4, 6), mode="nearest")
    actv = F.relu(spade.mlp_shared[0](m))
    expected = F.group_norm(x, 32, eps=1e-5) * (1 + spade.mlp_gamma(actv)) + spade.mlp_beta(actv)
    torch.testing.assert_close(spade.normalize(x, y), expected, rtol=1e-5, atol=1e-5)


def test_decoder_block_applies_time_scale_shift_after_spade_and_resamples_between_norms():
    torch.manual_seed(0)
    block = SDMDecoderResBlock(64, 16, 32, label_channels=3, resample="up", spade_hidden_channels=8)
    with torch.no_grad():
        block.out_layers[2].weight.normal_()
    x, emb, y = torch.randn(1, 64, 4, 4), torch.randn(1, 16), torch.rand(1, 3, 8, 8)
    sizes = {}
    for name in ("in_norm", "out_norm"):
        getattr(block, name).register_forward_pre_hook(lambda m, a, name=name: sizes.__setitem__(name, a[0].shape))
    out = block(x, emb, y)
    assert out.shape == (1, 32, 8, 8)
    assert sizes == {"in_norm": (1, 3, 4, 4), "out_norm": (1, 3, 8, 8)}  # SPADE_in at the old resolution
    # the formula written out
    h = F.silu(block.in_norm.normalize(x, y))
    h = block.in_layers[1](F.interpolate(h, scale_factor=2, mode="nearest"))
    scale, shift = block.emb_layers(emb)[..., None, None].chunk(2, dim=1)
    h = block.out_norm.normalize(h, y) * (1 + scale) + shift
    expected = block.skip_connection(F.interpolate(x, scale_factor=2, mode="nearest")) + block.out_layers(h)
    torch.testing.assert_close(out, expected)


def test_legacy_attention_matches_the_official_formula():
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 3 * 128, 10, generator=g)
    heads, d = 2, 64
    q, k, v = qkv.reshape(2 * heads, 3 * d, 10).split(d, dim=1)  # legacy order: split heads first
    scale = 1 / math.sqrt(math.sqrt(d))
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale).float(), dim=-1)
    expected = torch.einsum("bts,bcs->bct", weight, v).reshape(2, -1, 10)
    torch.testing.assert_close(legacy_qkv_attention(qkv, heads), expected, rtol=1e-5, atol=1e-5)


def test_timestep_embedding_matches_guided_diffusion():
    t = torch.tensor([0, 1, 999])
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    expected = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    torch.testing.assert_close(sdm_timestep_embedding(t, 256), expected)


def test_group_norm_runs_in_fp32_for_half_inputs():
    torch.manual_seed(0)
    norm = GroupNorm32(64)
    x = (torch.randn(1, 64, 8, 8) * 300).half()
    out = norm(x)
    assert out.dtype == torch.float16
    expected = F.group_norm(x.float(), 32, norm.weight, norm.bias, 1e-5).half()
    assert torch.equal(out, expected)


# ---------------------------------------------------------------------------------------------------- conditioning
def test_condition_one_hot_edges_and_null():
    labels = torch.tensor([[[0, 0, 1], [0, 0, 1], [2, 2, 255]]])
    y = sdm_condition(labels, TOY, spec=TOY_SPEC)
    assert y.shape == (1, 9, 3, 3) and y.dtype == torch.float32
    assert torch.equal(y[0, :8].argmax(0)[:2, :2], torch.zeros(2, 2, dtype=torch.long))
    assert y[0, :8, 2, 2].sum() == 0  # ignore pixel: all-zero one-hot
    # 4-neighbour edges: both pixels of every differing pair
    assert y[0, 8].tolist() == [[0, 1, 1], [1, 1, 1], [1, 1, 1]]
    instances = torch.tensor([[[1, 2, 3], [1, 2, 3], [4, 4, 4]]])
    y_inst = sdm_condition(labels, TOY, spec=TOY_SPEC, instances=instances)
    assert y_inst[0, 8].tolist() == [[1, 1, 1], [1, 1, 1], [1, 1, 1]]  # edges from the instance map only
    same = torch.ones_like(instances)
    assert not sdm_condition(labels, TOY, spec=TOY_SPEC, instances=same)[0, 8].any()


def test_official_conditions_of_the_builtin_label_sets():
    ade = get_label_set("ade20k")
    y = sdm_condition(torch.tensor([[[0, 149, 255]]]), ade)
    assert y.shape == (1, 151, 1, 3)  # 150 classes + unknown, no edges
    assert y[0].argmax(0).tolist() == [[0, 149, 150]]  # ignore (raw 0, "other") -> channel 150
    coco = get_label_set("coco_stuff")
    raw_of = {c: r for r, c in coco.remap.items() if c != coco.ignore_index}
    y = sdm_condition(torch.tensor([[[0, 170, 255]]]), coco)
    assert y.shape == (1, 184, 1, 3)  # raw ids 0..181 + unknown (255 -> 182) + edge
    assert y[0, :183].argmax(0).tolist() == [[raw_of[0], raw_of[170], 182]]
    celeba = get_label_set("celebamask_hq")
    assert sdm_condition(torch.zeros(1, 2, 2, dtype=torch.long), celeba).shape == (1, 20, 2, 2)
    city = get_label_set("cityscapes")
    y = sdm_condition(torch.tensor([[[0, 255]]]), city)
    assert y.shape == (1, 36, 1, 2) and y[0, :35, 0, 0].argmax() == 7 and y[0, :35, 0, 1].sum() == 0  # road = id 7


def test_condition_refuses_a_label_set_that_does_not_fit():
    with pytest.raises(ValueError, match="label set 'toy' has 8 classes, but the one-hot part has 150"):
        sdm_condition(torch.zeros(1, 2, 2, dtype=torch.long), TOY, spec=SDM_CONDITIONS["ade20k"])
    with pytest.raises(ValueError, match="no raw-id remap"):
        sdm_condition(torch.zeros(1, 2, 2, dtype=torch.long), TOY, spec=SDM_CONDITIONS["coco_stuff"])
    with pytest.raises(ValueError, match="out of range"):
        sdm_condition(torch.full((1, 2, 2), 9), TOY, spec=TOY_SPEC)


# ---------------------------------------------------------------------------------------------------- guidance
def test_guidance_formula_is_on_eps_only():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 6, 4, 4, generator=g), torch.randn(2, 6, 4, 4, generator=g)
    out = sdm_guidance(cond, uncond, 1.5)
    torch.testing.assert_close(out[:, :3], uncond[:, :3] + 1.5 * (cond[:, :3] - uncond[:, :3]))
    assert torch.equal(out[:, 3:], cond[:, 3:])  # variance from the conditional pass, untouched
    torch.testing.assert_close(sdm_guidance(cond, uncond, 1.0), cond)


def test_guided_output_batches_the_two_passes():
    unet = _randomised()
    x, t, y = _inputs()
    with torch.no_grad():
        guided = guided_sdm_output(unet, x, t, y, guidance_scale=2.0)
        separate = sdm_guidance(unet(x, t, y), unet(x, t, torch.zeros_like(y)), 2.0)
        assert torch.equal(guided_sdm_output(unet, x, t, y, 1.0), unet(x, t, y))
    torch.testing.assert_close(guided, separate, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- diffusion
def test_linear_schedule_and_posterior():
    s = SDMSchedule.linear()
    assert s.num_timesteps == 1000
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    assert s.posterior_log_variance_clipped[0] == s.posterior_log_variance_clipped[1]  # β̃_0 = 0 replaced
    assert s.posterior_mean_coef1[0].item() == pytest.approx(1.0) and s.posterior_mean_coef2[0].item() == 0.0
    with pytest.raises(ValueError, match="values in"):
        SDMSchedule.linear(4)  # 0.02 · 1000 / 4 > 1


def test_p_mean_variance_learned_range_against_the_formulas():
    s = SDMSchedule.linear()
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(3, 3, 4, 4, generator=g)
    eps = torch.randn(3, 3, 4, 4, generator=g)
    t = torch.tensor([0, 500, 999])
    v = torch.stack([torch.full((3, 4, 4), val) for val in (1.0, -1.0, 0.2)])
    pred = p_mean_variance(s, torch.cat([eps, v], 1), x_t, t, clip_denoised=False)
    # the formulas in float64 from the betas alone
    b = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    acp = torch.cumprod(1 - b, 0)
    acp_prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
    post = b * (1 - acp_prev) / (1 - acp)
    post[0] = post[1]

    def at(values):
        return values[t].view(-1, 1, 1, 1)

    frac = (v.double() + 1) / 2
    logvar = frac * at(b).log() + (1 - frac) * at(post).log()
    torch.testing.assert_close(pred.log_variance, logvar.float())
    assert torch.allclose(pred.log_variance[0], at(b)[0].log().float())  # v = 1: log β_t
    assert torch.allclose(pred.log_variance[1], at(post)[1].log().float())  # v = −1: log β̃_t
    x0 = (x_t.double() - (1 - at(acp)).sqrt() * eps.double()) / at(acp).sqrt()
    torch.testing.assert_close(pred.pred_xstart, x0.float(), rtol=1e-4, atol=1e-4)
    coef1 = at(b) * at(acp_prev).sqrt() / (1 - at(acp))
    coef2 = (1 - at(acp_prev)) * (1 - at(b)).sqrt() / (1 - at(acp))
    torch.testing.assert_close(pred.mean, (coef1 * x0 + coef2 * x_t.double()).float(), rtol=1e-4, atol=1e-4)
    clipped = p_mean_variance(s, torch.cat([eps, v], 1), x_t, t)
    assert clipped.pred_xstart.abs().max() <= 1


def test_pred_xstart_uses_float64_coefficients_at_small_t():
    # The official code gathers √(1/ᾱ_t) and √(1/ᾱ_t − 1) precomputed in float64. Forming 1 − ᾱ_t from a float32
    # ᾱ_t instead loses ~4 digits at small t (ᾱ_0 = 0.9999), a 10× larger x̂0 error than the official one.
    s = SDMSchedule.linear()
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(4, 3, 32, 32, generator=g)
    eps = torch.randn(4, 3, 32, 32, generator=g)
    t = torch.tensor([0, 1, 2, 5])
    pred = p_mean_variance(s, torch.cat([eps, torch.zeros_like(eps)], 1), x_t, t, clip_denoised=False)
    acp = s.alphas_cumprod[t].view(-1, 1, 1, 1)
    x0 = (x_t.double() - (1 - acp).sqrt() * eps.double()) / acp.sqrt()
    torch.testing.assert_close(pred.pred_xstart.double(), x0, rtol=0, atol=1e-6)


def test_p_sample_step_adds_no_noise_at_t0():
    s = SDMSchedule.linear()
    out = torch.randn(2, 6, 4, 4)
    x_t, z = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = torch.tensor([0, 10])
    step = p_sample_step(s, out, x_t, t, noise=z)
    pred = p_mean_variance(s, out, x_t, t)
    assert torch.equal(step[0], pred.mean[0])
    torch.testing.assert_close(step[1], pred.mean[1] + (0.5 * pred.log_variance[1]).exp() * z[1])


def test_sample_sdm_runs_a_short_chain():
    unet = _randomised()
    _, _, y = _inputs()
    steps = []
    schedule = SDMSchedule(torch.linspace(0.05, 0.5, 3))
    gen = torch.Generator().manual_seed(0)
    x0 = sample_sdm(
        unet, y, guidance_scale=1.5, schedule=schedule, generator=gen, callback=lambda t, x: steps.append(t)
    )
    assert x0.shape == (2, 3, 16, 16) and steps == [2, 1, 0] and x0.abs().max() <= 1
