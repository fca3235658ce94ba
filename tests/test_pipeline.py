"""LayoutPipeline: every adapter kind loads from our files, images have the label maps' size, seeds, schedulers,
label-set checks, and the scheduler-by-name / per-sample-generator extensions of core.sampling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from layout2image.core.controlnet import build_controlnet
from layout2image.core.labels import get_label_set, save_label_map
from layout2image.core.sampling import SCHEDULERS, make_scheduler
from layout2image.core.sdm_lora import SDMLoraConfig, add_sdm_lora, sdm_lora_parameters
from layout2image.pipelines import LayoutPipeline, PipelineError, resolve_adapter
from layout2image.testing import tiny_unet_config, write_tiny_sd
from layout2image.weights import WeightsMetadata, save_class_embedding_table, save_controlnet
from layout2image.weights.spade_file import save_sdm_lora

LABELS = get_label_set("toy")
N = LABELS.num_classes
EMBED = 8
UNET = tiny_unet_config(cross_attention_dim=16)
STANDARD = {"conditioning_embedding_out_channels": (8, 8)}  # 2x, the tiny VAE's factor
H, W = 16, 24


def _randomise(module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))  # zero convs become non-zero: the layout matters


def _md(encoding: str) -> WeightsMetadata:
    return WeightsMetadata(kind="controlnet", hint_encoding=encoding, label_set=LABELS, base_model="tiny")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny SD folder and one adapter of each kind, as files written by our savers."""
    root = tmp_path_factory.mktemp("pipe")
    base = write_tiny_sd(root / "base", unet=UNET)
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    torch.manual_seed(0)
    rgb = build_controlnet(unet, "rgb", **STANDARD)
    onehot = build_controlnet(unet, "onehot", num_classes=N, **STANDARD)
    aldm = build_controlnet(unet, "embedding", embedding_dim=EMBED, hint_block_out_channels=(8, 8, 8, 8))
    for k, m in enumerate((rgb, onehot, aldm)):
        _randomise(m, k)
    out = {"base": base}
    out["rgb"] = save_controlnet(rgb, root / "rgb.safetensors", metadata=_md("rgb"))
    out["onehot"] = save_controlnet(onehot, root / "onehot", to="diffusers-folder", metadata=_md("onehot"))
    out["aldm"] = save_controlnet(aldm, root / "aldm.safetensors", metadata=_md("embedding"))
    save_class_embedding_table(root / "aldm.table.safetensors", torch.randn(N + 1, EMBED), LABELS)
    add_sdm_lora(unet, SDMLoraConfig(layout_channels=N, rank=2, lora_alpha=2.0, spade_hidden_channels=8))
    _randomise_sdm(unet)
    out["sdm_lora"] = save_sdm_lora(unet, root / "sdm_lora.safetensors", LABELS).lora_path
    return out


def _randomise_sdm(unet) -> None:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in sdm_lora_parameters(unet):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _labels(seed: int = 0, batch: int = 2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, N, size=(batch, H // 4, W // 4)).repeat(4, axis=1).repeat(4, axis=2)
    ids[:, :2, :2] = LABELS.ignore_index
    return ids


@pytest.fixture(scope="module")
def pipes(models):
    return {
        k: LayoutPipeline.from_pretrained(models["base"], models[k]) for k in ("rgb", "onehot", "aldm", "sdm_lora")
    }


@pytest.mark.parametrize("kind", ["rgb", "onehot", "aldm", "sdm_lora"])
def test_each_adapter_kind_gives_images_of_the_label_maps_size(pipes, kind):
    pipe = pipes[kind]
    assert pipe.adapter_kind == ("sdm_lora" if kind == "sdm_lora" else "controlnet")
    assert pipe.label_set == LABELS
    out = pipe(_labels(), "a cat", num_inference_steps=2, seed=7, layout_guidance_scale=1.5)
    assert [im.size for im in out.images] == [(W, H)] * 2 and out.images[0].mode == "RGB"
    assert out.seeds == [7, 8] and out.prompts == ["a cat"] * 2
    if kind == "aldm":  # the table beside the file is found and recorded
        assert [p.name for p in pipe.model_files[1:]] == ["aldm.safetensors", "aldm.table.safetensors"]
    if kind == "sdm_lora":
        assert [p.name for p in pipe.model_files[1:]] == ["sdm_lora.safetensors", "sdm_lora.spade.safetensors"]


@pytest.mark.parametrize("kind", ["onehot", "sdm_lora"])
def test_the_layout_changes_the_image(pipes, kind):
    a = pipes[kind](_labels(0, 1), "a", num_inference_steps=2, seed=1, output_type="pt").images
    b = pipes[kind](_labels(1, 1), "a", num_inference_steps=2, seed=1, output_type="pt").images
    assert (a - b).abs().max() > 1e-3


def test_same_seed_same_image_and_a_seed_is_per_image(pipes):
    pipe = pipes["onehot"]
    labels = _labels()
    one = pipe(labels, ["a", "b"], num_inference_steps=3, seed=[11, 12], output_type="pt").images
    again = pipe(labels, ["a", "b"], num_inference_steps=3, seed=[11, 12], output_type="pt").images
    assert torch.equal(one, again)  # same process, same inputs: the same computation
    alone = pipe(labels[1], "b", num_inference_steps=3, seed=12, output_type="pt").images
    # Image 1 alone equals image 1 of the batch up to batched-kernel rounding: its noise depends on its seed only.
    assert torch.allclose(alone[0], one[1], atol=1e-4)
    other = pipe(labels[1], "b", num_inference_steps=3, seed=13, output_type="pt").images
    assert (other[0] - one[1]).abs().max() > 1e-3


@pytest.mark.parametrize(
    "name", ["ddim", "dpm-solver++", "dpmsolver_multistep", "euler_a", "euler_ancestral", "unipc"]
)
def test_scheduler_by_name(pipes, name):
    pipe = pipes["rgb"]
    expected = {"ddim": "DDIMScheduler", "unipc": "UniPCMultistepScheduler"}.get(
        name, "DPMSolverMultistepScheduler" if "dpm" in name else "EulerAncestralDiscreteScheduler"
    )
    sched = make_scheduler(name, pipe.bundle.noise_scheduler.config)
    assert type(sched).__name__ == expected
    assert sched.config.beta_schedule == pipe.bundle.noise_scheduler.config.beta_schedule
    out = pipe(_labels(0, 1), "a", num_inference_steps=3, seed=3, scheduler=name, output_type="pt").images
    again = pipe(_labels(0, 1), "a", num_inference_steps=3, seed=3, scheduler=name, output_type="pt").images
    assert out.shape == (1, 3, H, W) and torch.isfinite(out).all() and torch.equal(out, again)


def test_scheduler_names_and_errors(pipes):
    config = pipes["rgb"].bundle.noise_scheduler.config
    assert make_scheduler("DPM-Solver++", config).config.algorithm_type == "dpmsolver++"
    assert type(make_scheduler("HeunDiscreteScheduler", config)).__name__ == "HeunDiscreteScheduler"
    with pytest.raises(ValueError, match="scheduler 'nope' is not known; use one of ddim"):
        make_scheduler("nope", config)
    with pytest.raises(ValueError, match="not known"):
        make_scheduler("ControlNetModel", config)  # a diffusers class, but no scheduler
    assert {"ddim", "dpm-solver++", "euler_a", "unipc"} <= set(SCHEDULERS)


def test_label_map_files_and_bad_label_maps(pipes, tmp_path):
    pipe = pipes["rgb"]
    ids = _labels(0, 1)[0]
    path = save_label_map(tmp_path / "x.png", ids, LABELS)
    np.testing.assert_array_equal(pipe.prepare_labels(str(path)).numpy(), ids[None])
    assert pipe.prepare_labels([path, ids]).shape == (2, H, W)
    with pytest.raises(PipelineError, match="integer class ids"):
        pipe.prepare_labels(ids.astype(np.float32))
    with pytest.raises(PipelineError, match="not a multiple of the VAE factor 2"):
        pipe.prepare_labels(ids[:, :-1])
    with pytest.raises(PipelineError, match="must share a size"):
        pipe.prepare_labels([ids, ids[:, :-2]])
    with pytest.raises(ValueError, match="label map"):
        pipe.prepare_labels(np.full((H, W), N))  # an id outside the label set
    with pytest.raises(PipelineError, match="2 seeds for 1 label maps"):
        pipe(ids, "a", num_inference_steps=1, seed=[1, 2])
    with pytest.raises(PipelineError, match="3 prompts for 1 label maps"):
        pipe(ids, ["a", "b", "c"], num_inference_steps=1)


def test_label_set_mismatch_names_both(models):
    with pytest.raises(PipelineError, match=r"label set mismatch.*'toy'.*'cityscapes'"):
        LayoutPipeline.from_pretrained(models["base"], models["rgb"], label_set="cityscapes")


def test_adapter_resolution(models, tmp_path):
    assert resolve_adapter(models["onehot"]).kind == "controlnet"
    assert resolve_adapter(models["sdm_lora"]).companions[0].name == "sdm_lora.spade.safetensors"
    export = tmp_path / "export"
    export.mkdir()
    (export / "manifest.json").write_text(json.dumps({"mode": "t2i_adapter"}))
    with pytest.raises(PipelineError, match="'t2i_adapter' adapter.*not supported yet"):
        resolve_adapter(export)
    (export / "manifest.json").write_text(json.dumps({"mode": "controlnet"}))
    with pytest.raises(PipelineError, match="missing"):
        resolve_adapter(export)
    with pytest.raises(PipelineError, match="does not exist"):
        resolve_adapter(tmp_path / "nothing")
    with pytest.raises(PipelineError, match="neither manifest.json"):
        resolve_adapter(tmp_path)


def test_aldm_without_its_table_is_a_named_error(models, tmp_path):
    import shutil

    shutil.copy(models["aldm"], tmp_path / "aldm.safetensors")
    with pytest.raises(PipelineError, match="needs its class-embedding table.*aldm.table.safetensors"):
        LayoutPipeline.from_pretrained(models["base"], tmp_path / "aldm.safetensors")


def _trainer_models_test_helpers():
    """The tiny single-file (ldm layout) writer of tests/test_trainer_models.py, loaded from its file."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).with_name("test_trainer_models.py")
    spec = importlib.util.spec_from_file_location("_l2i_trainer_models_helpers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_single_sd1x_file_base(tmp_path):
    helpers = _trainer_models_test_helpers()
    unet, vae, text = helpers._tiny_models()
    configs = tmp_path / "configs"
    helpers._write_configs(configs, unet, vae, text)
    tiny = {"unet": unet, "vae": vae, "text_encoder": text}
    base = helpers._save(helpers._ldm_checkpoint(tiny), tmp_path / "tiny-sd15.safetensors")
    control = build_controlnet(unet, "onehot", num_classes=N, **STANDARD)
    adapter = save_controlnet(control, tmp_path / "control.safetensors", metadata=_md("onehot"))
    pipe = LayoutPipeline.from_pretrained(base, adapter, config_dir=configs, scheduler="unipc")
    assert pipe.bundle.source_kind == "single_file" and pipe.model_files[0] == base
    out = pipe(_labels(0, 1), "a photo", num_inference_steps=2, seed=0)
    assert out.images[0].size == (W, H)
