"""One training step per adapter kind on tiny models: what gets gradients, determinism, laziness, the NaN guard."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from layout2image.core.controlnet import build_controlnet, build_t2i_adapter, hint_spec_for
from layout2image.core.discriminator import build_discriminator, tiny_segmenter_config
from layout2image.core.labels import get_label_set
from layout2image.core.sdm_lora import SDMLoraConfig, add_sdm_lora, sdm_lora_parameters
from layout2image.core.spade import get_spade_context
from layout2image.testing import tiny_unet_config, tiny_vae_config
from layout2image.trainer.conditioning import ControlNetConditioner, SpadeConditioner, T2IAdapterConditioner
from layout2image.trainer.step import AdversarialConfig, LayoutDiffusionStep, encode_images

LS = get_label_set("toy")
N = LS.num_classes
TINY_UNET = tiny_unet_config(cross_attention_dim=16)
TINY_VAE = tiny_vae_config()
ADV = dict(
    lazy_every=2, num_unroll_steps=2, grid_steps=10, warmup_start=0, warmup_end=0, lambda_adv=0.5, fake_weight=0.1
)


def _scheduler():
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)


def _batch():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, N, (2, 32, 32), generator=g)
    labels[:, :2] = 255
    pixels = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    text = torch.randn(2, 5, 16, generator=g)
    return pixels, labels, text


def _models(kind):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET).eval().requires_grad_(False)
    vae = AutoencoderKL(**TINY_VAE).eval().requires_grad_(False)
    disc = build_discriminator(
        LS, config=tiny_segmenter_config("segformer"), generator=torch.Generator().manual_seed(1)
    )
    if kind == "controlnet":
        adapter = build_controlnet(unet, "rgb", conditioning_embedding_out_channels=(16, 32)).train()
        cond = ControlNetConditioner(adapter, hint_spec_for(adapter, LS), LS, vae_scale_factor=2)
        trainable = list(adapter.parameters())
    elif kind == "t2i_adapter":
        adapter = build_t2i_adapter(unet, "rgb", downscale_factor=2).train()
        cond = T2IAdapterConditioner(adapter, hint_spec_for(adapter, LS), LS, vae_scale_factor=2)
        trainable = list(adapter.parameters())
    else:
        add_sdm_lora(unet, SDMLoraConfig(layout_channels=N, rank=4, lora_alpha=4.0, spade_hidden_channels=8))
        cond = SpadeConditioner(get_spade_context(unet), "onehot", LS, null_layout_prob=0.5)
        trainable = sdm_lora_parameters(unet)
    return unet, vae, disc, cond, trainable


@pytest.mark.parametrize("kind", ["controlnet", "sdm_lora", "t2i_adapter"])
def test_adversarial_step_trains_only_the_adapter_then_d_only_d(kind):
    unet, vae, disc, cond, trainable = _models(kind)
    step = LayoutDiffusionStep(unet, _scheduler(), cond, AdversarialConfig(**ADV), discriminator=disc, decoder=vae)
    pixels, labels, text = _batch()
    latents = encode_images(vae, pixels, torch.Generator().manual_seed(3))
    assert latents.shape == (2, 4, 16, 16)
    assert step.is_adversarial_step(4) and not step.is_adversarial_step(5)

    result = step.generator_step(
        latents, labels, text, 4, torch.Generator().manual_seed(4), lambda loss: loss.backward()
    )
    assert not result.skipped and {"loss_noise", "loss_adv", "loss"} <= set(result.terms)
    assert result.terms["loss"] == pytest.approx(result.terms["loss_noise"] + 0.5 * result.terms["loss_adv"], rel=1e-5)
    trainable_ids = {id(p) for p in trainable}
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    for model in (unet, vae, disc):
        for p in model.parameters():
            if id(p) not in trainable_ids:
                assert p.grad is None, "a frozen parameter received a gradient"
    for p in trainable:
        p.grad = None

    d_result = step.discriminator_step(
        latents, labels, text, torch.Generator().manual_seed(5), lambda loss: loss.backward()
    )
    assert not d_result.skipped and d_result.terms["d_loss"] > 0
    assert all(p.grad is not None for p in disc.parameters() if p.requires_grad)
    assert all(p.grad is None for p in trainable)


def test_lazy_steps_have_no_adversarial_term_and_steps_are_deterministic():
    unet, vae, disc, cond, _ = _models("controlnet")
    step = LayoutDiffusionStep(unet, _scheduler(), cond, AdversarialConfig(**ADV), discriminator=disc, decoder=vae)
    pixels, labels, text = _batch()
    latents = encode_images(vae, pixels, torch.Generator().manual_seed(3))

    def run(s, seed):
        return step.generator_step(
            latents, labels, text, s, torch.Generator().manual_seed(seed), lambda loss: None
        ).terms

    assert "loss_adv" not in run(3, 0)
    assert run(2, 7) == run(2, 7)
    assert run(2, 7) != run(2, 8)


def test_nan_loss_is_skipped_without_backward():
    unet, vae, disc, cond, _ = _models("controlnet")
    step = LayoutDiffusionStep(unet, _scheduler(), cond, AdversarialConfig(enabled=False))
    pixels, labels, text = _batch()
    latents = encode_images(vae, pixels)
    latents[0, 0, 0, 0] = float("nan")
    called = []
    result = step.generator_step(latents, labels, text, 1, torch.Generator().manual_seed(0), called.append)
    assert result.skipped and called == []


def test_warmup_and_config_errors():
    cfg = AdversarialConfig(warmup_start=10, warmup_end=20)
    assert [cfg.warmup(s) for s in (0, 10, 15, 20, 30)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    with pytest.raises(ValueError, match="unroll_mode='sideways' is not valid"):
        AdversarialConfig(unroll_mode="sideways")
    with pytest.raises(ValueError, match=r"num_unroll_steps=25 must be in \[0, grid_steps=25\)"):
        AdversarialConfig(num_unroll_steps=25)
    with pytest.raises(ValueError, match="needs a discriminator"):
        LayoutDiffusionStep(None, _scheduler(), None, AdversarialConfig())
