"""The layout sampler: guidance formula against separate UNet calls, ControlNet and SPADE paths, errors."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from layout2image.core.controlnet import build_controlnet
from layout2image.core.sampling import ControlInput, guided_noise, sample_latents
from layout2image.core.spade import SPADEAdapter, patch_unet, spade_layout
from layout2image.testing import tiny_unet_config

TINY_UNET = tiny_unet_config(sample_size=8, cross_attention_dim=16)


def _randomise(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))  # zero convs / zero SPADE heads become non-zero


@pytest.fixture
def setup():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    cond = torch.randn(2, 5, 16, generator=g)
    uncond = torch.randn(2, 5, 16, generator=g)
    return unet, x, cond, uncond


def test_plain_prediction_without_guidance(setup):
    unet, x, cond, _ = setup
    with torch.no_grad():
        out = guided_noise(unet, x, 10, cond, guidance_scale=1.0)
        ref = unet(x, 10, encoder_hidden_states=cond).sample
    assert torch.allclose(out, ref, atol=1e-5)


def test_controlnet_text_and_layout_guidance_match_separate_calls(setup):
    unet, x, cond, uncond = setup
    controlnet = build_controlnet(unet, "rgb", conditioning_embedding_out_channels=(16,)).eval()
    _randomise(controlnet, 2)
    hint = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    control = ControlInput(controlnet, hint, scale=0.8)
    with torch.no_grad():
        out = guided_noise(unet, x, 10, cond, uncond, control=control, guidance_scale=5.0, layout_guidance_scale=2.5)

        def eps(text, with_control):
            kw = {}
            if with_control:
                d, m = controlnet(
                    x, 10, encoder_hidden_states=text, controlnet_cond=hint, conditioning_scale=0.8, return_dict=False
                )
                kw = {"down_block_additional_residuals": d, "mid_block_additional_residual": m}
            return unet(x, 10, encoder_hidden_states=text, **kw).sample

        e_c, e_u, e_n = eps(cond, True), eps(uncond, True), eps(cond, False)
    expected = e_u + 5.0 * (e_c - e_u) + 1.5 * (e_c - e_n)
    assert torch.allclose(out, expected, atol=1e-4)
    assert not torch.allclose(e_c, e_n, atol=1e-4)  # the ControlNet really contributes


def test_spade_layout_guidance_uses_null_layout_for_the_extra_pass(setup):
    unet, x, cond, uncond = setup
    adapter = SPADEAdapter.from_unet(unet, layout_channels=3)
    _randomise(adapter, 4)
    patch_unet(unet, adapter)
    layout = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = guided_noise(
            unet, x, 10, cond, uncond, spade_layout=layout, guidance_scale=3.0, layout_guidance_scale=2.0
        )
        with spade_layout(unet, layout):
            e_c = unet(x, 10, encoder_hidden_states=cond).sample
            e_u = unet(x, 10, encoder_hidden_states=uncond).sample
        with spade_layout(unet, torch.zeros_like(layout)):
            e_n = unet(x, 10, encoder_hidden_states=cond).sample
    assert torch.allclose(out, e_u + 3.0 * (e_c - e_u) + 1.0 * (e_c - e_n), atol=1e-4)
    with pytest.raises(ValueError, match="SPADE-patched: pass `spade_layout`"):
        guided_noise(unet, x, 10, cond, guidance_scale=1.0)


def test_errors(setup):
    unet, x, cond, _ = setup
    with pytest.raises(ValueError, match="needs `negative_embeds`"):
        guided_noise(unet, x, 10, cond, guidance_scale=2.0)
    with pytest.raises(ValueError, match="needs a layout"):
        guided_noise(unet, x, 10, cond, guidance_scale=1.0, layout_guidance_scale=2.0)
    with pytest.raises(ValueError, match="not SPADE-patched"):
        guided_noise(unet, x, 10, cond, guidance_scale=1.0, spade_layout=torch.zeros(2, 3, 8, 8))


def test_sampler_is_deterministic_and_control_window_matters(setup):
    unet, _, cond, uncond = setup
    controlnet = build_controlnet(unet, "rgb", conditioning_embedding_out_channels=(16,)).eval()
    _randomise(controlnet, 6)
    hint = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)  # fmt: skip

    def run(start=0.0, end=1.0, seed=0):
        return sample_latents(unet, sched, cond, uncond, latent_size=(8, 8), num_steps=4, guidance_scale=2.0,
                              control=ControlInput(controlnet, hint, start=start, end=end),
                              generator=torch.Generator().manual_seed(seed))  # fmt: skip

    a, b = run(), run()
    assert a.shape == (2, 4, 8, 8) and torch.equal(a, b)
    assert not torch.allclose(a, run(seed=1))
    assert not torch.allclose(a, run(start=0.5))
    assert ControlInput(controlnet, hint, start=0.0, end=0.5).active(1, 4)
    assert not ControlInput(controlnet, hint, start=0.0, end=0.5).active(2, 4)
