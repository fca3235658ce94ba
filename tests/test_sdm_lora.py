"""SDM-LoRA assembly: config checks, trainable set, identity at init, gradients, state-dict round trip."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig

from layout2image.core.sdm_lora import (
    SDMLoraConfig,
    SDMLoraStateDicts,
    add_sdm_lora,
    get_sdm_lora_state_dicts,
    load_sdm_lora_state_dicts,
    sdm_lora_parameters,
)
from layout2image.core.spade import SPADELayoutError, find_spade_sites, is_spade_patched, spade_layout
from layout2image.testing import assert_close_for_dtype, tiny_unet_config

LAYOUT_CHANNELS = 5
TINY_UNET = tiny_unet_config()
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY_UNET).eval()


def small_config(**overrides) -> SDMLoraConfig:
    return SDMLoraConfig(
        **{"layout_channels": LAYOUT_CHANNELS, "rank": 4, "lora_alpha": 8, "spade_hidden_channels": 16, **overrides}
    )


def unet_inputs(batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 4, 16, 16, generator=g),
        torch.tensor([10, 500][:batch]),
        torch.randn(batch, 7, 32, generator=g),
    )


def layout(batch: int = 2, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, LAYOUT_CHANNELS, 32, 32, generator=g)


def run(unet, sample, timestep, text, grad: bool = False) -> torch.Tensor:
    with torch.set_grad_enabled(grad):
        return unet(sample, timestep, encoder_hidden_states=text).sample


def randomize_trainable(unet, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sdm_lora_parameters(unet):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(layout_channels=0), "layout_channels"),
        (dict(rank=0), "rank"),
        (dict(rank=True), "rank"),
        (dict(lora_alpha=0), "lora_alpha"),
        (dict(lora_dropout=1.0), "lora_dropout"),
        (dict(lora_dropout=-0.1), "lora_dropout"),
        (dict(spade_kernel_size=2), "spade_kernel_size"),
        (dict(spade_shared_kernel_size=0), "spade_shared_kernel_size"),
        (dict(spade_hidden_channels=0), "spade_hidden_channels"),
        (dict(target_modules=()), "target_modules"),
        (dict(target_modules=("to_q", "")), "non-empty strings"),
        (dict(conv_target_modules=("sem_gamma",)), "inside the SPADE wrappers"),
        (dict(conv_target_modules=("to_q",)), "duplicate"),
        (dict(adapter_name=""), "adapter_name"),
    ],
)
def test_config_rejects_bad_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        small_config(**overrides)


def test_config_help_metadata_and_lora_config():
    from dataclasses import fields

    assert all(f.metadata.get("help") for f in fields(SDMLoraConfig))
    lora = small_config(conv_target_modules=["conv1"]).to_lora_config()
    assert isinstance(lora, LoraConfig)
    assert (lora.r, lora.lora_alpha, set(lora.target_modules)) == (4, 8, {*ATTENTION_TARGETS, "conv1"})


def test_trainable_set_is_exactly_lora_and_spade():
    unet = tiny_unet()
    setup = add_sdm_lora(unet, small_config())
    trainable = {name for name, p in unet.named_parameters() if p.requires_grad}
    lora = {name for name, _ in unet.named_parameters() if ".lora_A." in name or ".lora_B." in name}
    spade = {name for name, _ in unet.named_parameters() if ".spade.sem_" in name}
    assert lora and spade and trainable == lora | spade
    assert {name.split(".")[-4] if "to_out" not in name else "to_out.0" for name in lora} == set(ATTENTION_TARGETS)
    assert len(spade) == 6 * len(find_spade_sites(unet)) == 6 * len(setup.site_names)
    assert {name.rsplit(".lora_", 1)[0] for name in lora} == set(setup.lora_module_names)
    assert sum(p.numel() for p in sdm_lora_parameters(unet)) == sum(
        p.numel() for name, p in unet.named_parameters() if name in trainable
    )


def test_conv_targets_add_lora_to_resnet_convs():
    unet = tiny_unet()
    setup = add_sdm_lora(unet, small_config(conv_target_modules=("conv1", "conv2")))
    assert any(name.endswith("resnets.0.conv1") for name in setup.lora_module_names)
    assert not any(".spade." in name for name in setup.lora_module_names)


def test_identity_at_init_and_config_untouched():
    unet = tiny_unet()
    inputs = unet_inputs()
    reference = run(unet, *inputs)
    config = dict(unet.config)
    add_sdm_lora(unet, small_config())
    assert dict(unet.config) == config
    with spade_layout(unet, layout()):
        torch.testing.assert_close(run(unet, *inputs), reference, rtol=0, atol=1e-6)


def test_gradients_reach_lora_and_spade_with_checkpointing():
    unet = tiny_unet()
    add_sdm_lora(unet, small_config())
    unet.train()
    unet.enable_gradient_checkpointing()
    inputs = unet_inputs()
    with spade_layout(unet, layout()):
        # backward inside the block: checkpointing recomputes the resnets, which read the layout again
        run(unet, *inputs, grad=True).square().mean().backward()
    grads = {name: p.grad for name, p in unet.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    # zero-initialised γ/β convs and LoRA B get gradients first (the others are multiplied by a zero)
    assert any(g.abs().sum() > 0 for name, g in grads.items() if "sem_gamma.weight" in name)
    assert any(g.abs().sum() > 0 for name, g in grads.items() if ".lora_B." in name)
    assert all(p.grad is None for p in unet.parameters() if not p.requires_grad)

    with spade_layout(unet, layout()):
        loss = run(unet, *inputs, grad=True).square().mean()
    with pytest.raises(SPADELayoutError, match="without a layout"):
        loss.backward()  # documented: the recompute outside the block has no layout


def test_state_dicts_round_trip_exactly():
    source = tiny_unet()
    add_sdm_lora(source, small_config())
    randomize_trainable(source)
    saved = get_sdm_lora_state_dicts(source)
    assert saved.lora and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in saved.lora)
    assert all(k.startswith("sites.") and ".sem_" in k for k in saved.spade)
    assert not set(saved.lora) & set(saved.spade)

    target = tiny_unet()  # same base weights, fresh (zero) adapters
    add_sdm_lora(target, small_config())
    load_sdm_lora_state_dicts(target, saved)
    reloaded = get_sdm_lora_state_dicts(target)
    for part in ("lora", "spade"):
        want, have = getattr(saved, part), getattr(reloaded, part)
        assert want.keys() == have.keys()
        assert all(torch.equal(want[k], have[k]) for k in want), part
    inputs = unet_inputs()
    with spade_layout(source, layout()):
        expected = run(source, *inputs)
    with spade_layout(target, layout()):  # another UNet instance: outputs equal up to rounding
        assert_close_for_dtype(run(target, *inputs), expected)


def test_load_rejects_foreign_keys_and_shapes():
    unet = tiny_unet()
    add_sdm_lora(unet, small_config())
    good = get_sdm_lora_state_dicts(unet)
    extra = SDMLoraStateDicts(
        lora={**good.lora, "up_blocks.9.attn1.to_q.lora_A.weight": torch.zeros(1)}, spade=good.spade
    )
    with pytest.raises(ValueError, match="lora state dict.*unexpected"):
        load_sdm_lora_state_dicts(unet, extra)
    key = next(iter(good.spade))
    reshaped = SDMLoraStateDicts(lora=good.lora, spade={**good.spade, key: torch.zeros(1)})
    with pytest.raises(ValueError, match="spade state dict.*shape mismatches"):
        load_sdm_lora_state_dicts(unet, reshaped)
    other_rank = tiny_unet()
    add_sdm_lora(other_rank, small_config(rank=8))
    with pytest.raises(ValueError, match="shape mismatches"):
        load_sdm_lora_state_dicts(other_rank, good)


def test_failed_lora_rolls_back_the_spade_patch():
    unet = tiny_unet()
    unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"]), adapter_name="default")
    with pytest.raises(ValueError, match="already exists"):
        add_sdm_lora(unet, small_config())
    assert not is_spade_patched(unet)
