"""The trainer's exports in the stock loaders of diffusers and (emulated, or real when set up) ComfyUI.

Always run (tiny models, CPU, seconds): one ``Trainer`` step per mode on a tiny SD-shaped world, then

* ControlNet (palette RGB, export formats diffusers-folder + diffusers + ldm): ``ControlNetModel.from_pretrained`` on
  the exported folder and ``ControlNetModel.from_single_file`` on the exported ldm file (config = the exported
  folder, ``local_files_only``) give exactly the trained weights, with no diffusers/peft warning;
* SDM-LoRA on an SD 1.x-shaped tiny UNet (4 levels, ``layers_per_block=2``, SD 1.5's block types): the exported
  kohya file has diffusers module names (``lora_unet_down_blocks_0_...``, `weights.lora.kohya_names_for`), passes
  ComfyUI's and A1111's key rules (`weights.lora_check`: no ``lora key not loaded``), and a plain
  ``StableDiffusionPipeline.load_lora_weights(file)`` puts exactly the trained ``lora_A``/``lora_B`` weights,
  scaled by alpha / r, into the pipeline's UNet with no warning;
* SDM-LoRA on the toy-shaped tiny UNet (2 levels, ``layers_per_block=1``, not SD-shaped): the kohya file keeps ldm
  module names (``lora_unet_input_blocks_1_1_...``, exact in ComfyUI and A1111 for any layout), passes the same
  rules and loads exactly through ``load_lora_weights(file, unet_config=pipe.unet.config)`` (diffusers 0.42's SD
  pipeline maps ldm names only when given the config: docs/COMFYUI.md).

Gated on ``COMFYUI_PATH`` (a ComfyUI checkout) AND ``L2I_SD15_SHAPED=1``: ``benchmarks/stock_loaders.py`` end to
end on a random SD 1.5-shaped base (1-step ``l2i-train`` runs, then ComfyUI's stock nodes in a headless server and
in-process, then diffusers' loaders); several minutes and ~10 GB of RAM on a CPU. ``L2I_STOCK_WORK`` names a work
folder to reuse between runs (default: a fresh temporary one).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from layout2image.testing import (
    capture_loader_messages,
    loader_problems,
    sd1x_tiny_unet_config,
    tiny_unet_config,
    tiny_vae_config,
    write_tiny_sd,
)
from layout2image.trainer.config import load_config
from layout2image.trainer.loop import Trainer

REPO = Path(__file__).resolve().parents[1]

TINY_UNET = tiny_unet_config(cross_attention_dim=16)
#: SD 1.5's block structure (4 levels, 3 cross-attention down blocks + 1 plain, 2 resnets per level) at tiny widths:
#: the layout for which the kohya export writes diffusers module names.
SD1X_TINY_UNET = sd1x_tiny_unet_config(sample_size=8, cross_attention_dim=16)
# An 8x VAE, so that the ControlNet gets SD's standard hint block (16/32/96/256, input_hint_block.0 ... .14): with
# fewer convs (a 2x VAE cuts the block) diffusers' ldm reader misses the weights (it hard-codes conv_out = .14).
TINY_VAE = tiny_vae_config(
    block_out_channels=(8, 8, 8, 8),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=64,
)


def _write_world(root: Path, unet: dict) -> Path:
    """A tiny SD-shaped diffusers folder (with tokenizer and scheduler) and an 8-sample toy dataset at 64x64."""
    from layout2image.core.toy import write_dataset

    write_tiny_sd(root / "sd", unet=unet, vae=TINY_VAE)
    write_dataset(root / "data", 8, size=64, preview_rows=0)
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The toy-shaped tiny world (2 levels, layers_per_block=1)."""
    return _write_world(tmp_path_factory.mktemp("stock_world"), TINY_UNET)


@pytest.fixture(scope="module")
def sd1x_world(tmp_path_factory) -> Path:
    """The same world with an SD 1.x-shaped tiny UNet (`SD1X_TINY_UNET`)."""
    return _write_world(tmp_path_factory.mktemp("stock_world_sd1x"), SD1X_TINY_UNET)


def _train(world: Path, out: Path, *overrides: str) -> Trainer:
    config = load_config(
        overrides=[
            f"model.pretrained={world / 'sd'}",
            f"data.root={world / 'data'}",
            f"train.output_dir={out}",
            "data.transform.resolution=64",
            "adversarial.enabled=false",
            "train.steps=1",
            "train.batch_size=2",
            "train.cpu=true",
            "train.num_workers=0",
            "train.checkpoint_every=0",
            "train.tensorboard=false",
            "validation.every=0",
            "validation.at_end=false",
            "optim.lr=1e-2",
            "export.controlnet_formats=[diffusers-folder, diffusers, ldm]",
            *overrides,
        ]
    )
    trainer = Trainer(config)
    trainer.run()
    return trainer


def test_loader_message_capture():
    """`capture_loader_messages` keeps the loaders' log records (once each, INFO and up) and Python warnings, as
    they come; `loader_problems` keeps those at WARNING and up about keys or weights, but not diffusers' expected note."""
    expected = "No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'. This is safe to ignore"
    with capture_loader_messages() as lines:
        logging.getLogger("diffusers.loaders.lora_base").warning(expected)
        logging.getLogger("peft.tuners").warning("missing keys: x")  # reaches "peft" and the root logger
        logging.getLogger("peft.tuners").debug("a debug key line")
        for _ in range(2):  # repeats are kept
            warnings.warn("a key warning", UserWarning, stacklevel=1)
        logging.getLogger("").error("the weights are fine")
    logging.getLogger("peft").warning("missing keys after the block")
    assert lines == [
        f"WARNING diffusers.loaders.lora_base: {expected}",
        "WARNING peft.tuners: missing keys: x",
        "WARNING py.warnings: UserWarning: a key warning",
        "WARNING py.warnings: UserWarning: a key warning",
        "ERROR root: the weights are fine",
    ]
    assert loader_problems(lines) == lines[1:4]
    info = ["INFO peft: some keys were not used", "DEBUG peft: some keys were not used"]
    assert loader_problems(info) == [] and loader_problems(info, level=logging.INFO) == info[:1]


def test_trainer_controlnet_export_loads_exactly_in_stock_diffusers(world, tmp_path):
    from diffusers import ControlNetModel

    trainer = _train(world, tmp_path / "run", "model.mode=controlnet", "model.hint=rgb")
    trained = trainer.models.trainable_state_dict()
    export = tmp_path / "run" / "export"
    with capture_loader_messages() as lines:
        folder = ControlNetModel.from_pretrained(export / "controlnet", local_files_only=True)
        single = ControlNetModel.from_single_file(
            str(export / "controlnet.ldm.safetensors"), config=str(export / "controlnet"), local_files_only=True
        )
    assert loader_problems(lines) == []
    assert any(v.abs().max() > 0 for k, v in trained.items() if k.startswith("controlnet_down_blocks")), "not trained"
    for model in (folder, single):
        state = model.state_dict()
        assert set(state) == set(trained)
        assert all(torch.equal(state[k], v) for k, v in trained.items())
        assert model.config.conditioning_channels == 3


@pytest.mark.parametrize(
    ("world_name", "naming"), [("sd1x_world", "diffusers"), ("world", "ldm")], ids=["sd1x-shaped", "toy-shaped"]
)
def test_trainer_sdm_lora_export_passes_comfyui_rules_and_loads_exactly_in_diffusers(
    world_name, naming, request, tmp_path
):
    from diffusers import StableDiffusionPipeline

    from layout2image.weights.lora import kohya_naming_of
    from layout2image.weights.lora_check import check_lora_file

    world = request.getfixturevalue(world_name)
    trainer = _train(
        world,
        tmp_path / "run",
        "model.mode=sdm_lora",
        "model.hint=onehot",
        "model.sdm_lora.rank=4",
        "model.sdm_lora.lora_alpha=8",
        "model.sdm_lora.spade_hidden_channels=8",
        "model.sdm_lora.conv_target_modules=[conv1, conv2, conv_shortcut]",
    )
    export = tmp_path / "run" / "export"
    kohya_file = export / "sdm_lora.safetensors"
    unet_config = trainer.models.bundle.unet.config
    report = check_lora_file(kohya_file, unet_config)
    assert report.comfyui_warnings() == [] and report.comfyui_ok and report.a1111_ok, report.to_text()
    with safe_open(str(kohya_file), "pt") as f:
        assert f.metadata()["l2i.kohya_names"] == naming
        names = {k.partition(".")[0] for k in f.keys()}
    assert kohya_naming_of(names) == naming, sorted(names)[:5]

    trained = {k: v for k, v in trainer.models.trainable_state_dict().items() if ".lora_" in k}
    assert trained and any(v.abs().max() > 0 for k, v in trained.items() if ".lora_B." in k), "not trained"
    with capture_loader_messages() as lines:
        pipe = StableDiffusionPipeline.from_pretrained(
            world / "sd", local_files_only=True, safety_checker=None, requires_safety_checker=False
        )
        if naming == "diffusers":  # SD 1.x layout: what any diffusers user types
            pipe.load_lora_weights(str(kohya_file))
        else:  # ldm names: StableDiffusionPipeline.load_lora_weights (diffusers 0.42) maps them only given the config
            pipe.load_lora_weights(str(kohya_file), unet_config=pipe.unet.config)
    assert loader_problems(lines) == []
    (adapter,) = pipe.get_active_adapters()
    state = pipe.unet.state_dict()
    loaded_lora = {k for k in state if f".lora_A.{adapter}." in k or f".lora_B.{adapter}." in k}
    assert loaded_lora == {k.replace(".default.", f".{adapter}.") for k in trained}
    for key, value in trained.items():  # <module>.lora_A.default.weight in the trainer's PEFT model
        loaded = state[key.replace(".default.", f".{adapter}.")]
        torch.testing.assert_close(loaded, value, rtol=0, atol=0, msg=key)
    modules = {k.split(".lora_")[0] for k in trained}
    with safe_open(str(export / "lora.safetensors"), "pt") as f:
        lora_config = json.loads(f.metadata()["l2i.lora_config"])
    assert lora_config["lora_alpha"] / lora_config["r"] == 2.0
    assert {pipe.unet.get_submodule(m).scaling[adapter] for m in modules} == {2.0}


@pytest.mark.skipif(
    not (os.environ.get("COMFYUI_PATH") and os.environ.get("L2I_SD15_SHAPED") == "1"),
    reason="set COMFYUI_PATH to a ComfyUI checkout and L2I_SD15_SHAPED=1 (minutes, ~10 GB RAM)",
)
def test_sd15_shaped_trainer_exports_load_in_real_comfyui_and_diffusers(tmp_path):
    work = Path(os.environ.get("L2I_STOCK_WORK") or tmp_path / "work")
    cmd = [sys.executable, str(REPO / "benchmarks" / "stock_loaders.py"), "--comfyui", os.environ["COMFYUI_PATH"]]
    cmd += ["--work", str(work), "--steps", "1", "--size", "64"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "OK: ComfyUI and diffusers stock loaders" in proc.stdout
    log = (work / "comfyui_server.log").read_text()
    assert "lora key not loaded" not in log and "controlnet keys" not in log
    assert load_file(str(work / "runs" / "sdm_lora" / "export" / "sdm_lora.safetensors"))
