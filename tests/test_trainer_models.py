"""Tests for `layout2image.trainer.models`: offline loading of the frozen SD 1.5 parts, and the shipped configs.

Everything runs on CPU with tiny models (design/trainers.md §6) and with the network blocked: ``HF_HUB_OFFLINE`` is
set and any socket connection raises, so a load that tried to reach the Hub would fail loudly.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
from pathlib import Path

import pytest
import torch

from layout2image.testing import tiny_unet_config, tiny_vae_config
from layout2image.trainer.models import (
    SD15_CONFIG_DIR,
    ModelBundle,
    ModelLoadError,
    check_sd15_checkpoint_keys,
    load_base_models,
    resolve_frozen_dtype,
)

# SD 1.5 parameter counts (diffusers' UNet2DConditionModel / AutoencoderKL, transformers' CLIPTextModel).
SD15_PARAMETERS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}

# Ids from open_clip's SimpleTokenizer (OpenAI's CLIP BPE), start and end tokens included, no padding.
KNOWN_IDS = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "A Photo Of A CAT!": [49406, 320, 1125, 539, 320, 2368, 256, 49407],
    "road, sidewalk and a building": [49406, 1759, 267, 23278, 537, 320, 2307, 49407],
    "naïve café — 東京 🐱 it's 42 dogs": [49406, 1097, 35689, 563, 15304, 2005, 48338, 21078, 361, 22979, 585]
    + [568, 275, 273, 3255, 49407],
    "": [49406, 49407],
}

TINY_UNET = tiny_unet_config(block_out_channels=(8, 16), layers_per_block=2, attention_head_dim=2, norm_num_groups=4)
TINY_VAE = tiny_vae_config()
# vocab_size 49408 so the shipped tokenizer fits; hidden 32 keeps the embedding at 1.6M parameters.
TINY_TEXT = {
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "layer_norm_eps": 1e-5,
    "hidden_act": "quick_gelu",
}


# ----------------------------------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No network: HF offline mode plus a socket that refuses to connect (any Hub call would raise)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: socket.connect{args[1:]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _tiny_models():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET)
    vae = AutoencoderKL(**TINY_VAE)
    text = CLIPTextModel(CLIPTextConfig(**TINY_TEXT))
    # Non-trivial norms/biases so a mis-mapped key shows up in the comparisons.
    with torch.no_grad():
        for module in (unet, vae, text):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.01)
    return unet, vae, text


def _write_configs(folder: Path, unet, vae, text) -> None:
    """Write a diffusers folder's configs, tokenizer and scheduler (no weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(SD15_CONFIG_DIR / "model_index.json", folder / "model_index.json")
    shutil.copytree(SD15_CONFIG_DIR / "tokenizer", folder / "tokenizer", dirs_exist_ok=True)
    shutil.copytree(SD15_CONFIG_DIR / "scheduler", folder / "scheduler", dirs_exist_ok=True)
    unet.save_config(folder / "unet")
    vae.save_config(folder / "vae")
    (folder / "text_encoder").mkdir(exist_ok=True)
    text.config.to_json_file(folder / "text_encoder" / "config.json")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny random SD-1.5-shaped models, a diffusers folder with their weights, and a configs-only folder."""
    unet, vae, text = _tiny_models()
    root = tmp_path_factory.mktemp("tiny")
    folder = root / "sd-tiny"
    _write_configs(folder, unet, vae, text)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    configs = root / "configs"
    _write_configs(configs, unet, vae, text)
    return {"unet": unet, "vae": vae, "text_encoder": text, "folder": folder, "configs": configs, "root": root}


def _assert_same_weights(bundle: ModelBundle, tiny) -> None:
    for name in ("unet", "vae", "text_encoder"):
        want = tiny[name].state_dict()
        got = getattr(bundle, name).state_dict()
        assert got.keys() == want.keys(), name
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=f"{name}.{key}")


def _assert_frozen_fp32_cpu(bundle: ModelBundle) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    assert bundle.dtype == torch.float32 and bundle.device == torch.device("cpu")
    for name, module in bundle.frozen_modules().items():
        assert not module.training, name
        for pname, p in module.named_parameters():
            assert not p.requires_grad, f"{name}.{pname}"
            assert p.dtype == torch.float32 and p.device.type == "cpu", f"{name}.{pname}"
    for module in (bundle.unet, bundle.vae):
        assert {type(p) for p in module.attn_processors.values()} == {AttnProcessor2_0}
    assert bundle.text_encoder.config._attn_implementation == "sdpa"


# ----------------------------------------------------------------------------------------------------------------------
# an ldm-layout (single-file) writer for the tiny models: the inverse of diffusers' convert_ldm_* functions
# ----------------------------------------------------------------------------------------------------------------------

_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTN_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(state_dict, prefixes: dict[str, str], part_map: dict[str, str] | None = None, which=lambda p: False):
    out = {}
    ordered = sorted(prefixes.items(), key=lambda kv: -len(kv[0]))
    for key, value in state_dict.items():
        for old, new in ordered:
            if key.startswith(old):
                rest = key[len(old) :]
                if part_map and which(old):
                    for a, b in part_map.items():
                        if rest.startswith(a + "."):
                            rest = b + rest[len(a) :]
                            break
                out[new + rest] = value
                break
        else:
            raise KeyError(f"no ldm name for {key}")
    return out


def _unet_to_ldm(state_dict, config) -> dict[str, torch.Tensor]:
    lpb, levels = config["layers_per_block"], len(config["block_out_channels"])
    m = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "conv_in.": "input_blocks.0.0.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
        "mid_block.resnets.0.": "middle_block.0.",
        "mid_block.attentions.0.": "middle_block.1.",
        "mid_block.resnets.1.": "middle_block.2.",
    }
    for i in range(levels):
        down_attn = "CrossAttn" in config["down_block_types"][i]
        up_attn = "CrossAttn" in config["up_block_types"][i]
        for j in range(lpb):
            k = i * (lpb + 1) + j + 1
            m[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{k}.0."
            if down_attn:
                m[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{k}.1."
        if i < levels - 1:
            m[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(i + 1) * (lpb + 1)}.0.op."
            m[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{i * (lpb + 1) + lpb}.{2 if up_attn else 1}."
        for j in range(lpb + 1):
            k = i * (lpb + 1) + j
            m[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{k}.0."
            if up_attn:
                m[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{k}.1."
    out = _rename(state_dict, m, _RESNET_TO_LDM, which=lambda p: "resnets" in p)
    return {"model.diffusion_model." + k: v for k, v in out.items()}


def _vae_to_ldm(state_dict, config) -> dict[str, torch.Tensor]:
    n = len(config["block_out_channels"])
    m = {"quant_conv.": "quant_conv.", "post_quant_conv.": "post_quant_conv."}
    for side in ("encoder", "decoder"):
        m.update({f"{side}.conv_in.": f"{side}.conv_in.", f"{side}.conv_out.": f"{side}.conv_out."})
        m[f"{side}.conv_norm_out."] = f"{side}.norm_out."
        m[f"{side}.mid_block.resnets.0."] = f"{side}.mid.block_1."
        m[f"{side}.mid_block.resnets.1."] = f"{side}.mid.block_2."
        m[f"{side}.mid_block.attentions.0."] = f"{side}.mid.attn_1."
    for i in range(n):
        for j in range(config["layers_per_block"] + 1):
            m[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
            m[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{n - 1 - i}.block.{j}."
        m[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        m[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{n - 1 - i}.upsample."
    parts = {"conv_shortcut": "nin_shortcut", **_VAE_ATTN_TO_LDM}
    out = _rename(state_dict, m, parts, which=lambda p: "resnets" in p or "attentions" in p)
    for key, value in out.items():  # ldm's VAE attention uses 1x1 convolutions
        if ".mid.attn_1." in key and key.endswith("weight") and value.ndim == 2:
            out[key] = value[:, :, None, None]
    return {"first_stage_model." + k: v for k, v in out.items()}


def _text_to_ldm(state_dict) -> dict[str, torch.Tensor]:
    out = {
        "cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v for k, v in state_dict.items()
    }
    # Real SD 1.5 files carry this buffer; the loader must ignore it.
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return out


def _ldm_checkpoint(tiny) -> dict[str, torch.Tensor]:
    sd = {}
    sd.update(_unet_to_ldm(tiny["unet"].state_dict(), tiny["unet"].config))
    sd.update(_vae_to_ldm(tiny["vae"].state_dict(), tiny["vae"].config))
    sd.update(_text_to_ldm(tiny["text_encoder"].state_dict()))
    sd["alphas_cumprod"] = torch.linspace(1, 0, 1000)  # ldm keeps schedule buffers at the top level
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def _save(state_dict, path: Path) -> Path:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state_dict, str(path))
    else:
        torch.save(state_dict, path)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# diffusers folder
# ----------------------------------------------------------------------------------------------------------------------


def test_diffusers_folder_loads_frozen_fp32_with_documented_shapes(tiny):
    bundle = load_base_models(tiny["folder"])
    assert bundle.source_kind == "diffusers_folder"
    _assert_frozen_fp32_cpu(bundle)
    _assert_same_weights(bundle, tiny)
    assert bundle.vae_scale_factor == 2 and bundle.latent_channels == 4 and bundle.scaling_factor == 0.18215
    sched = bundle.noise_scheduler.config
    assert type(bundle.noise_scheduler).__name__ == "DDIMScheduler"
    assert (sched.beta_schedule, sched.beta_start, sched.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert (sched.set_alpha_to_one, sched.steps_offset, sched.prediction_type) == (False, 1, "epsilon")

    # The shapes ModelBundle documents, at 32x32 pixels (16x16 latents), batch 2.
    ids = bundle.tokenizer(["a cat", "a road"], padding="max_length", max_length=77, truncation=True).input_ids
    ids = torch.tensor(ids)
    assert ids.shape == (2, 77) and ids[0, 0] == 49406 and ids[0, -1] == 49407
    with torch.no_grad():
        text = bundle.text_encoder(ids).last_hidden_state
        images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
        latents = bundle.vae.encode(images).latent_dist.sample() * bundle.scaling_factor
        eps = bundle.unet(latents, torch.tensor([10, 500]), text).sample
        decoded = bundle.vae.decode(latents / bundle.scaling_factor).sample
    assert text.shape == (2, 77, 32) and text.dtype == torch.float32
    assert latents.shape == (2, 4, 16, 16) and eps.shape == latents.shape and decoded.shape == images.shape


def test_half_precision_is_refused_on_cpu(tiny, caplog):
    with caplog.at_level(logging.WARNING, logger="layout2image"):
        bundle = load_base_models(tiny["folder"], dtype="fp16")
    assert "half precision on CUDA only" in caplog.text
    _assert_frozen_fp32_cpu(bundle)


@pytest.mark.parametrize(
    ("dtype", "device", "expected"),
    [
        (None, "cpu", torch.float32),
        ("auto", "cpu", torch.float32),
        ("fp32", "cpu", torch.float32),
        (torch.bfloat16, "cpu", torch.float32),
        ("bf16", "cuda", torch.bfloat16),
        ("float16", "cuda:0", torch.float16),
        (torch.float32, "cuda", torch.float32),
    ],
)
def test_resolve_frozen_dtype(dtype, device, expected):
    assert resolve_frozen_dtype(dtype, device) == expected


@pytest.mark.parametrize("dtype", ["fp8", torch.int8])
def test_resolve_frozen_dtype_rejects_unknown(dtype):
    with pytest.raises(ModelLoadError, match="dtype="):
        resolve_frozen_dtype(dtype, "cpu")


def test_gradient_checkpointing_switches(tiny):
    off = load_base_models(tiny["folder"])
    assert not off.unet.is_gradient_checkpointing and not off.vae.is_gradient_checkpointing
    on = load_base_models(tiny["folder"], gradient_checkpointing_unet=True, gradient_checkpointing_vae=True)
    assert on.unet.is_gradient_checkpointing and on.vae.is_gradient_checkpointing
    # Gradients still reach the input through the frozen, checkpointed UNet (what a ControlNet relies on).
    latents = torch.randn(1, 4, 8, 8, requires_grad=True)
    on.unet(latents, torch.tensor([3]), torch.randn(1, 77, 32)).sample.sum().backward()
    assert latents.grad is not None and all(p.grad is None for p in on.unet.parameters())


# ----------------------------------------------------------------------------------------------------------------------
# single file
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_loads_offline_with_local_configs(tiny, tmp_path, suffix):
    path = _save(_ldm_checkpoint(tiny), tmp_path / f"tiny-sd15{suffix}")
    bundle = load_base_models(path, config_dir=tiny["configs"])
    assert bundle.source_kind == "single_file" and bundle.config_dir == str(tiny["configs"].resolve())
    _assert_frozen_fp32_cpu(bundle)
    _assert_same_weights(bundle, tiny)
    assert len(bundle.tokenizer) == 49408


def test_single_file_lightning_checkpoint_and_ema_weights(tiny, tmp_path):
    state = _ldm_checkpoint(tiny)
    unet_keys = [k for k in state if k.startswith("model.diffusion_model.")]
    assert len(unet_keys) > 100  # diffusers only looks for EMA weights when there are more than 100 of them
    for key in unet_keys:  # ldm's EMA naming: "model_ema." + the key without "model." and without dots
        state["model_ema." + "".join(key.split(".")[1:])] = state[key] + 1.0
    path = _save({"state_dict": state, "global_step": 7}, tmp_path / "lightning.ckpt")
    ema = load_base_models(path, config_dir=tiny["configs"])
    plain = load_base_models(path, config_dir=tiny["configs"], use_ema_weights=False)
    want = tiny["unet"].state_dict()["conv_in.weight"]
    torch.testing.assert_close(plain.unet.state_dict()["conv_in.weight"], want)
    torch.testing.assert_close(ema.unet.state_dict()["conv_in.weight"], want + 1.0)


class _NotATensor:
    pass


def test_single_file_ckpt_is_read_weights_only(tiny, tmp_path):
    from layout2image.weights.safe_load import UnsafeCheckpointError

    path = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": _ldm_checkpoint(tiny), "callback": _NotATensor()}, path)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        load_base_models(path, config_dir=tiny["configs"])


def test_single_file_default_config_is_the_shipped_sd15_folder(tiny, tmp_path):
    # Tiny weights do not fit the SD 1.5 configs: the shapes are checked before anything is built.
    path = _save(_ldm_checkpoint(tiny), tmp_path / "tiny.safetensors")
    with pytest.raises(ModelLoadError, match=r"does not fit the configs in .*sd15_config") as err:
        load_base_models(path)
    assert "input_blocks.0.0.weight: (8, 4, 3, 3) (config: (320, 4, 3, 3))" in str(err.value)


# ----------------------------------------------------------------------------------------------------------------------
# shipped SD 1.5 configs and tokenizer
# ----------------------------------------------------------------------------------------------------------------------


def test_shipped_tokenizer_gives_openai_clip_ids():
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(SD15_CONFIG_DIR), subfolder="tokenizer", local_files_only=True)
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    for text, ids in KNOWN_IDS.items():
        assert tok(text).input_ids == ids, text
    padded = tok("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert padded == KNOWN_IDS["a photo of a cat"] + [49407] * 70


def test_shipped_vocab_is_built_from_the_merges_as_openai_clip_does():
    """vocab.json = 256 byte characters, the same with </w>, one token per merge, then the two special tokens."""
    folder = SD15_CONFIG_DIR / "tokenizer"
    vocab = json.loads((folder / "vocab.json").read_text("utf-8"))
    lines = (folder / "merges.txt").read_text("utf-8").split("\n")
    assert lines[0] == "#version: 0.2" and lines[-1] == ""
    merges = lines[1:-1]
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(b) for b in printable] + [chr(256 + n) for n in range(256 - len(printable))]
    expected = chars + [c + "</w>" for c in chars] + ["".join(m.split(" ")) for m in merges]
    expected += ["<|startoftext|>", "<|endoftext|>"]
    assert len(merges) == 49152 - 256 - 2 and len(expected) == 49408
    assert list(vocab) == expected and list(vocab.values()) == list(range(49408))


def _sd15_meta_models():
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = str(SD15_CONFIG_DIR)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(cfg, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(cfg, subfolder="vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(cfg, subfolder="text_encoder"))
    return {"unet": unet, "vae": vae, "text_encoder": text}


def test_shipped_configs_have_sd15_parameter_counts():
    models = _sd15_meta_models()
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    assert counts == SD15_PARAMETERS
    unet = models["unet"].config
    assert (unet.sample_size, unet.cross_attention_dim, unet.attention_head_dim) == (64, 768, 8)
    assert models["vae"].config.scaling_factor == 0.18215
    index = json.loads((SD15_CONFIG_DIR / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    sched = json.loads((SD15_CONFIG_DIR / "scheduler" / "scheduler_config.json").read_text())
    expected = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1}
    expected.update({"num_train_timesteps": 1000, "set_alpha_to_one": False, "clip_sample": False})
    assert {k: sched[k] for k in expected} == expected


def test_sd15_shaped_key_table_passes_the_signature_check():
    """An SD 1.5-shaped ldm key table (built on the meta device) fits the shipped configs; an SD 2.x width does not."""
    models = _sd15_meta_models()
    shapes = {}
    shapes.update(_unet_to_ldm(models["unet"].state_dict(), models["unet"].config))
    shapes.update(_vae_to_ldm(models["vae"].state_dict(), models["vae"].config))
    shapes.update(_text_to_ldm(models["text_encoder"].state_dict()))
    shapes = {k: tuple(v.shape) for k, v in shapes.items()}
    assert len(shapes) > 1100
    check_sd15_checkpoint_keys(shapes, SD15_CONFIG_DIR)
    to_k = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert shapes[to_k] == (320, 768)
    with pytest.raises(ModelLoadError, match="text width 1024"):
        check_sd15_checkpoint_keys({**shapes, to_k: (320, 1024)}, SD15_CONFIG_DIR)


# ----------------------------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------------------------


def test_missing_source(tmp_path):
    with pytest.raises(ModelLoadError, match=r"does not exist"):
        load_base_models(tmp_path / "no-such-model")
    with pytest.raises(ModelLoadError, match=r"local_files_only=False"):
        load_base_models("someone/some-model")


def test_folder_lacking_a_subfolder(tiny, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny["folder"], broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ModelLoadError, match=r"lacks the subfolder\(s\) \['vae'\]"):
        load_base_models(broken)
    (broken / "vae").mkdir()
    with pytest.raises(ModelLoadError, match=r"subfolder 'vae' has no config.json"):
        load_base_models(broken)


def test_folder_that_is_not_a_diffusers_folder(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"not a diffusers model folder.*pass that file itself"):
        load_base_models(tmp_path)


def test_config_dir_must_be_a_local_folder(tiny, tmp_path):
    path = _save(_ldm_checkpoint(tiny), tmp_path / "tiny.safetensors")
    # A string that is not a folder would be taken for a Hub repo id by diffusers: refused before that.
    with pytest.raises(ModelLoadError, match="config_dir 'runwayml/stable-diffusion-v1-5' is not a folder"):
        load_base_models(path, config_dir="runwayml/stable-diffusion-v1-5")
    partial = tmp_path / "partial"
    shutil.copytree(tiny["configs"], partial)
    shutil.rmtree(partial / "tokenizer")
    with pytest.raises(ModelLoadError, match=r"config_dir folder .* lacks the subfolder\(s\) \['tokenizer'\]"):
        load_base_models(path, config_dir=partial)


@pytest.mark.parametrize("name", ["model.yaml", "weights.bin", "model"])
def test_unknown_file_extension(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"not weights")
    with pytest.raises(ModelLoadError, match="not a checkpoint this loader reads"):
        load_base_models(path)


@pytest.mark.parametrize(
    ("keys", "looks_like"),
    [
        (["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"], "an SDXL checkpoint"),
        (["cond_stage_model.model.token_embedding.weight"], "an SD 2.x checkpoint"),
        (["control_model.input_hint_block.0.weight"], "a ControlNet"),
        (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], "a LoRA"),
        (["conv_in.weight", "down_blocks.0.resnets.0.conv1.weight"], "diffusers-layout component"),
        (["encoder.conv_in.weight", "decoder.conv_out.weight"], "a standalone VAE"),
        (["model.diffusion_model.input_blocks.0.0.weight"], "lacks some parts"),
        (["something.else"], "no format layout2image knows"),
    ],
)
def test_not_an_sd15_checkpoint(tmp_path, keys, looks_like):
    path = _save({k: torch.zeros(2) for k in keys}, tmp_path / "other.safetensors")
    with pytest.raises(ModelLoadError, match="not a Stable Diffusion 1.5 checkpoint") as err:
        load_base_models(path)
    message = str(err.value)
    assert looks_like in message
    assert "first_stage_model.encoder.conv_in.weight" in message  # the missing signature keys are named


def test_incomplete_single_file_is_refused(tiny, tmp_path):
    state = _ldm_checkpoint(tiny)
    del state["model.diffusion_model.middle_block.1.proj_in.weight"]
    path = _save(state, tmp_path / "pruned.safetensors")
    with pytest.raises(ModelLoadError, match=r"unet weights are incomplete.*mid_block.attentions.0.proj_in.weight"):
        load_base_models(path, config_dir=tiny["configs"])
    state = _ldm_checkpoint(tiny)
    del state["cond_stage_model.transformer.text_model.final_layer_norm.bias"]
    path = _save(state, tmp_path / "no-ln.safetensors")
    with pytest.raises(ModelLoadError, match=r"text encoder lacks 1 weight.*final_layer_norm.bias"):
        load_base_models(path, config_dir=tiny["configs"])
