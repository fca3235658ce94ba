"""Layout ControlNets: shapes, zero init, ALDM's hint encoder layout, save/load, the builder, hint specs, T2I-Adapter."""

from __future__ import annotations

import copy
import inspect

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, T2IAdapter, UNet2DConditionModel

from layout2image.core.controlnet import (
    ALDM_HINT_CONV_INDICES,
    ALDM_HINT_ENCODING,
    ALDMConditioningEmbedding,
    ALDMControlNetModel,
    HintSpec,
    build_controlnet,
    build_t2i_adapter,
    hint_spec_for,
    load_controlnet,
)
from layout2image.core.hints import class_embedding_hint, one_hot, palette_rgb
from layout2image.core.labels import LabelSet, get_label_set
from layout2image.testing import tiny_unet_config

TINY_UNET = tiny_unet_config()
VAE_FACTOR = 2  # the toy world's VAE: 32x32 images <-> 16x16 latents; the standard hint block matches it
LATENT = 16
IMAGE = LATENT * VAE_FACTOR
EMBED_DIM = 16
STANDARD = dict(conditioning_embedding_out_channels=(16, 32))
ALDM_TINY = dict(embedding_dim=EMBED_DIM, hint_block_out_channels=(16, 16, 8, 8))
LABEL_SET = get_label_set("toy")
N = LABEL_SET.num_classes

# id -> (hint option, builder kwargs, expected hint kind, channels)
VARIANTS = {
    "rgb": ("rgb", STANDARD, "rgb", 3),
    "onehot": ("onehot", dict(num_classes=N, **STANDARD), "onehot", N),
    "onehot_edges": ("onehot", dict(num_classes=N, with_edges=True, **STANDARD), "onehot", N + 1),
    "embedding": ("embedding", ALDM_TINY, "embedding", EMBED_DIM),
}
# SD 1.5 / official ldm `input_hint_block` layout.
SD15_HINT_SHAPES = {
    0: (768, 768, 3, 3),
    2: (512, 768, 3, 3),
    4: (256, 512, 3, 3),
    6: (256, 256, 3, 3),
    8: (320, 256, 3, 3),
}


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY_UNET).eval()


@pytest.fixture(scope="module")
def table():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N + 1, EMBED_DIM, generator=g)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, N, (2, IMAGE, IMAGE), generator=g)
    labels[:, :4, :4] = LABEL_SET.ignore_index
    return dict(
        labels=labels,
        latents=torch.randn(2, 4, LATENT, LATENT, generator=g),
        text=torch.randn(2, 5, 32, generator=g),
        t=torch.tensor([10, 500]),
    )


@pytest.fixture(scope="module")
def unet_reference(unet, batch):
    """One plain UNet pass: its skip-connection shapes (conv_in + each down block's residuals), mid output shape
    and output."""
    ref = {"down": [], "mid": None}
    hooks = [
        unet.conv_in.register_forward_hook(lambda m, i, o: ref["down"].append(tuple(o.shape))),
        unet.mid_block.register_forward_hook(lambda m, i, o: ref.__setitem__("mid", tuple(o.shape))),
    ]
    hooks += [
        block.register_forward_hook(lambda m, i, o: ref["down"].extend(tuple(r.shape) for r in o[1]))
        for block in unet.down_blocks
    ]
    try:
        with torch.no_grad():
            ref["sample"] = unet(batch["latents"], batch["t"], encoder_hidden_states=batch["text"]).sample
    finally:
        for h in hooks:
            h.remove()
    return ref


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_shapes_and_zero_init(variant, unet, unet_reference, table, batch):
    hint_opt, kwargs, kind, channels = VARIANTS[variant]
    torch.manual_seed(3)
    controlnet = build_controlnet(unet, hint_opt, **kwargs).eval()
    spec = hint_spec_for(controlnet, LABEL_SET)
    assert (spec.kind, spec.channels) == (kind, channels)
    hint = spec.make(batch["labels"], LABEL_SET, table=table if kind == "embedding" else None, vae_scale_factor=2)
    assert hint.shape == (2, channels, *spec.hint_size(IMAGE, IMAGE, VAE_FACTOR))
    spec.check(hint, latent_size=(LATENT, LATENT))

    with torch.no_grad():
        out = controlnet(batch["latents"], batch["t"], encoder_hidden_states=batch["text"], controlnet_cond=hint)
        assert [tuple(r.shape) for r in out.down_block_res_samples] == unet_reference["down"]
        assert tuple(out.mid_block_res_sample.shape) == unet_reference["mid"]
        # Zero convs: every residual is exactly zero at init, so the UNet's output is unchanged.
        assert all(torch.count_nonzero(r) == 0 for r in out.down_block_res_samples)
        assert torch.count_nonzero(out.mid_block_res_sample) == 0
        assert torch.count_nonzero(controlnet.controlnet_cond_embedding(hint)) == 0  # zero last conv of the hint block
        ctrl = unet(
            batch["latents"],
            batch["t"],
            encoder_hidden_states=batch["text"],
            down_block_additional_residuals=out.down_block_res_samples,
            mid_block_additional_residual=out.mid_block_res_sample,
        ).sample
    torch.testing.assert_close(ctrl, unet_reference["sample"], rtol=0, atol=0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_trunk_copied_from_unet(variant, unet):
    hint_opt, kwargs, _, _ = VARIANTS[variant]
    controlnet = build_controlnet(unet, hint_opt, **kwargs)
    for name in ("conv_in", "time_embedding", "down_blocks", "mid_block"):
        src, dst = getattr(unet, name).state_dict(), getattr(controlnet, name).state_dict()
        assert src.keys() == dst.keys()
        assert all(torch.equal(src[k], dst[k]) for k in src)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_builder_leaves_unet_untouched(variant, unet):
    hint_opt, kwargs, _, _ = VARIANTS[variant]
    config_before = copy.deepcopy(dict(unet.config))
    params_before = {k: v.clone() for k, v in unet.state_dict().items()}
    controlnet = build_controlnet(unet, hint_opt, **kwargs)
    with torch.no_grad():  # the copy must not share storage with the UNet
        for p in controlnet.parameters():
            p.add_(1.0)
    assert dict(unet.config) == config_before
    after = unet.state_dict()
    assert after.keys() == params_before.keys()
    assert all(torch.equal(after[k], params_before[k]) for k in after)


def test_aldm_embedding_sd15_layout():
    emb = ALDMConditioningEmbedding(conditioning_embedding_channels=320)  # SD 1.5 widths: D 768, (768, 512, 256, 256)
    shapes = {k: tuple(v.shape) for k, v in emb.state_dict().items()}
    expected = {f"{i}.weight": s for i, s in SD15_HINT_SHAPES.items()} | {
        f"{i}.bias": (s[0],) for i, s in SD15_HINT_SHAPES.items()
    }
    assert shapes == expected  # keys equal `input_hint_block.{0,2,4,6,8}.{weight,bias}` after the prefix
    assert tuple(ALDM_HINT_CONV_INDICES) == tuple(SD15_HINT_SHAPES)
    assert [emb[i].stride for i in ALDM_HINT_CONV_INDICES] == [(1, 1), (1, 1), (2, 2), (1, 1), (1, 1)]
    assert all(isinstance(emb[i], torch.nn.SiLU) for i in (1, 3, 5, 7))
    assert sum(p.numel() for p in emb.parameters()) == 11_356_224  # aldm.md §11: 11.36 M
    assert torch.count_nonzero(emb.conv_out.weight) == 0 and torch.count_nonzero(emb.conv_out.bias) == 0
    with torch.no_grad():
        out = emb(torch.randn(1, 768, 8, 12))  # (H/4, W/4) of a 32x48 image
    assert out.shape == (1, 320, 4, 6)


def test_aldm_embedding_rejects_bad_widths_and_channels():
    with pytest.raises(ValueError, match="block_out_channels"):
        ALDMConditioningEmbedding(32, 16, (16, 16, 8))
    emb = ALDMConditioningEmbedding(32, 16, (16, 16, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, 16, H/4, W/4\)"):
        emb(torch.randn(1, 3, 8, 8))


def test_aldm_hint_reaches_output_once_trained(unet, table, batch):
    torch.manual_seed(4)
    controlnet = build_controlnet(unet, "embedding", **ALDM_TINY).eval()
    with torch.no_grad():
        for p in [controlnet.controlnet_cond_embedding.conv_out.weight, controlnet.controlnet_mid_block.weight]:
            p.normal_(std=0.1)
    spec = hint_spec_for(controlnet)
    hint = spec.make(batch["labels"], LABEL_SET, table=table, vae_scale_factor=VAE_FACTOR)
    args = (batch["latents"], batch["t"], batch["text"])
    with torch.no_grad():
        a = controlnet(*args, controlnet_cond=hint).mid_block_res_sample
        b = controlnet(*args, controlnet_cond=torch.zeros_like(hint)).mid_block_res_sample
    assert not torch.allclose(a, b)


def test_aldm_roundtrip_save_load(unet, tmp_path):
    torch.manual_seed(5)
    controlnet = build_controlnet(unet, "embedding", **ALDM_TINY)
    with torch.no_grad():
        controlnet.controlnet_cond_embedding.conv_out.weight.normal_()
    assert controlnet.config.hint_encoding == ALDM_HINT_ENCODING
    assert "hint_encoding" not in controlnet.config.get("_use_default_values", [])
    controlnet.save_pretrained(tmp_path)
    for loaded in (ALDMControlNetModel.from_pretrained(tmp_path), load_controlnet(tmp_path)):
        assert type(loaded) is ALDMControlNetModel
        assert isinstance(loaded.controlnet_cond_embedding, ALDMConditioningEmbedding)
        assert loaded.config.hint_encoding == ALDM_HINT_ENCODING
        assert loaded.config.conditioning_channels == EMBED_DIM
        assert tuple(loaded.config.conditioning_embedding_out_channels) == ALDM_TINY["hint_block_out_channels"]
        want, got = controlnet.state_dict(), loaded.state_dict()
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want)
    rebuilt = ALDMControlNetModel.from_config(controlnet.config)
    assert type(rebuilt) is ALDMControlNetModel


def test_stock_loader_on_aldm_folder_is_detected(unet, tmp_path, batch):
    """Documented in models.py: the stock loader warns but does not raise; our helpers catch the result."""
    build_controlnet(unet, "embedding", **ALDM_TINY).save_pretrained(tmp_path)
    stock = ControlNetModel.from_pretrained(tmp_path)
    assert type(stock) is ControlNetModel
    assert stock.config.get("hint_encoding") == ALDM_HINT_ENCODING  # kept as a hidden config key
    assert {p.device.type for p in stock.controlnet_cond_embedding.parameters()} == {"meta"}  # never loaded
    with pytest.raises(ValueError, match="load_controlnet"):
        hint_spec_for(stock, LABEL_SET)
    resaved = tmp_path / "resaved"
    stock.controlnet_cond_embedding.to_empty(device="cpu")
    stock.save_pretrained(resaved)
    with pytest.raises(ValueError, match="hint_encoding"):
        load_controlnet(resaved)


def test_aldm_loader_refuses_stock_folder(unet, tmp_path):
    build_controlnet(unet, "rgb", **STANDARD).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not an ALDM class-embedding ControlNet"):
        ALDMControlNetModel.from_pretrained(tmp_path)
    loaded = load_controlnet(tmp_path)
    assert type(loaded) is ControlNetModel
    assert hint_spec_for(loaded, LABEL_SET).kind == "rgb"


def test_aldm_signature_covers_controlnet():
    base = inspect.signature(ControlNetModel.__init__).parameters
    ours = inspect.signature(ALDMControlNetModel.__init__).parameters
    assert set(base) <= set(ours)
    differing = {n for n in base if base[n].default != ours[n].default}
    assert differing == {"conditioning_channels", "conditioning_embedding_out_channels"}
    assert set(ours) - set(base) == {"hint_encoding"}


def test_aldm_rejects_bad_config():
    with pytest.raises(ValueError, match="hint_encoding='rgb'"):
        ALDMControlNetModel(hint_encoding="rgb")
    with pytest.raises(ValueError, match="controlnet_conditioning_channel_order"):
        ALDMControlNetModel(controlnet_conditioning_channel_order="bgr")


def test_bad_builder_options(unet):
    with pytest.raises(ValueError, match=r"hint='palette'.*embedding, onehot, rgb"):
        build_controlnet(unet, "palette")
    with pytest.raises(ValueError, match="num_classes"):
        build_controlnet(unet, "onehot", **STANDARD)
    with pytest.raises(ValueError, match="with_edges"):
        build_controlnet(unet, "rgb", with_edges=True, **STANDARD)
    with pytest.raises(ValueError, match="with_edges"):
        build_controlnet(unet, "embedding", with_edges=True, **ALDM_TINY)
    with pytest.raises(TypeError, match="UNet2DConditionModel"):
        build_controlnet(torch.nn.Linear(2, 2), "rgb")


def test_mismatched_hints_raise(unet, table, batch):
    controlnet = build_controlnet(unet, "embedding", **ALDM_TINY)
    spec = hint_spec_for(controlnet)
    args = (batch["latents"], batch["t"], batch["text"])
    good = spec.make(batch["labels"], LABEL_SET, table=table, vae_scale_factor=VAE_FACTOR)
    with pytest.raises(ValueError, match=f"\\(B, {EMBED_DIM}, H/4, W/4\\)"):
        controlnet(*args, controlnet_cond=torch.zeros(2, 3, 2 * LATENT, 2 * LATENT))
    with pytest.raises(ValueError, match="spatial size"):
        controlnet(*args, controlnet_cond=good[..., :LATENT, :LATENT])
    with pytest.raises(ValueError, match="reads"):
        spec.check(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="spatial size"):
        spec.check(good, latent_size=(8, 8))
    with pytest.raises(ValueError, match=r"expected \(9, 16\)"):
        spec.make(batch["labels"], LABEL_SET, table=table[:, :8], vae_scale_factor=VAE_FACTOR)
    with pytest.raises(ValueError, match="instances are only read"):
        spec.make(batch["labels"], LABEL_SET, table=table, instances=batch["labels"], vae_scale_factor=VAE_FACTOR)
    with pytest.raises(ValueError, match="table is required"):
        spec.make(batch["labels"], LABEL_SET, vae_scale_factor=VAE_FACTOR)
    onehot = hint_spec_for(build_controlnet(unet, "onehot", num_classes=N, **STANDARD), LABEL_SET)
    five = LabelSet(name="five", names=tuple("abcde"), palette=np.arange(15, dtype=np.uint8).reshape(5, 3))
    with pytest.raises(ValueError, match="N = 5 classes"):
        onehot.make(torch.zeros(1, IMAGE, IMAGE, dtype=torch.long), five, vae_scale_factor=VAE_FACTOR)
    with pytest.raises(ValueError, match="fit no encoding"):
        hint_spec_for(build_controlnet(unet, "onehot", num_classes=N, **STANDARD), five)


def test_hint_spec_inference_and_ambiguity(unet):
    three = LabelSet(name="three", names=("a", "b", "c"), palette=np.arange(9, dtype=np.uint8).reshape(3, 3))
    rgb = build_controlnet(unet, "rgb", **STANDARD)
    assert hint_spec_for(rgb) == HintSpec("rgb", 3, 2)
    with pytest.raises(ValueError, match="pass kind= explicitly"):
        hint_spec_for(rgb, three)
    assert hint_spec_for(rgb, three, kind="onehot") == HintSpec("onehot", 3, 2)
    edges = build_controlnet(unet, "onehot", num_classes=N, with_edges=True, **STANDARD)
    assert hint_spec_for(edges, LABEL_SET) == HintSpec("onehot", N + 1, 2, with_edges=True)
    with pytest.raises(ValueError, match="kind='embedding'"):
        hint_spec_for(rgb, kind="embedding")
    with pytest.raises(TypeError, match="hint_spec_for knows"):
        hint_spec_for(unet)
    with pytest.raises(ValueError, match="kind='edges'"):
        HintSpec("edges", 3, 8)


def test_hint_spec_sizes_and_values(table):
    # SD 1.5: standard block 8x -> the hint is the full image; ALDM 2x -> H/4.
    assert HintSpec("rgb", 3, 8).hint_size(512, 1024) == (512, 1024)
    assert HintSpec("embedding", 768, 2).hint_size(512, 1024) == (128, 256)
    assert HintSpec("embedding", 768, 2).label_stride(8) == 4
    with pytest.raises(ValueError, match="multiple of vae_scale_factor"):
        HintSpec("rgb", 3, 8).hint_size(500, 512)
    with pytest.raises(ValueError, match="latent_upscale=8"):
        HintSpec("rgb", 3, 8).label_stride(2)
    g = torch.Generator().manual_seed(6)
    labels = torch.randint(0, N, (2, 64, 64), generator=g)
    emb = HintSpec("embedding", EMBED_DIM, 2).make(labels, LABEL_SET, table=table, vae_scale_factor=8)
    torch.testing.assert_close(emb, class_embedding_hint(labels, table, LABEL_SET.ignore_index, stride=4))
    assert emb.shape == (2, EMBED_DIM, 16, 16)
    torch.testing.assert_close(HintSpec("rgb", 3, 8).make(labels, LABEL_SET), palette_rgb(labels, LABEL_SET))
    assert HintSpec("rgb", 3, 8).make(labels, LABEL_SET, dtype=torch.float16).dtype == torch.float16
    torch.testing.assert_close(
        HintSpec("onehot", N + 1, 8, with_edges=True).make(labels, LABEL_SET),
        one_hot(labels, N, LABEL_SET.ignore_index, with_edges=True),
    )


@pytest.mark.parametrize("hint_opt,kwargs,channels", [("rgb", {}, 3), ("onehot", dict(num_classes=N), N)])
def test_t2i_adapter_matches_unet(hint_opt, kwargs, channels, unet, batch):
    torch.manual_seed(7)
    adapter = build_t2i_adapter(unet, hint_opt, downscale_factor=VAE_FACTOR, num_res_blocks=1, **kwargs).eval()
    assert isinstance(adapter, T2IAdapter)
    spec = hint_spec_for(adapter, LABEL_SET)
    assert (spec.kind, spec.channels, spec.latent_upscale) == (hint_opt, channels, VAE_FACTOR)
    hint = spec.make(batch["labels"], LABEL_SET, vae_scale_factor=VAE_FACTOR)
    with torch.no_grad():
        features = adapter(hint)
        assert [tuple(f.shape) for f in features] == [(2, 32, LATENT, LATENT), (2, 64, LATENT // 2, LATENT // 2)]
        out = unet(
            batch["latents"],
            batch["t"],
            encoder_hidden_states=batch["text"],
            down_intrablock_additional_residuals=list(features),
        ).sample
    assert out.shape == batch["latents"].shape
    with pytest.raises(ValueError, match="not available for T2I-Adapters"):
        build_t2i_adapter(unet, "embedding")
    with pytest.raises(ValueError, match="adapter_type"):
        build_t2i_adapter(unet, "rgb", adapter_type="full_adapter_xl")
