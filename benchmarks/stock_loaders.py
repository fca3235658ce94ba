"""Files trained by ``l2i-train`` in ComfyUI's stock loaders and in diffusers' stock loaders, end to end.

What it does, in ``--work DIR`` (each stage is skipped when its output is already there; ``--fresh`` redoes all):

1. ``base/``: a random SD 1.5-shaped diffusers folder (UNet, VAE, CLIP ViT-L text encoder from
   ``trainer/sd15_config``, fp16, seeded) with the shipped tokenizer, scheduler config and ``model_index.json``;
   ``comfy/models/checkpoints/random_sd15.safetensors``: the same model as one ldm file, written by ComfyUI itself
   (``comfy.diffusers_load.load_diffusers`` + ``comfy.sd.save_checkpoint``; the text encoder's keys are then taken
   from ``base/`` because transformers 5 saves ``CLIPTextModel`` without the ``text_model.`` prefix).
2. ``data/``: a tiny toy-world folder dataset (``l2i-toy``), then four 1-step runs of the real ``l2i-train`` CLI
   on ``base/`` (plain diffusion loss, fp32, CPU, ``--train-size`` pixels): ALDM ControlNets with the palette-RGB
   hint (``runs/cn_rgb``) and the one-hot hint (``runs/cn_onehot``), both exported as diffusers folder, diffusers
   file and ldm file, and SDM-LoRAs with attention + resnet-conv LoRA (``runs/sdm_lora``) and attention-only LoRA
   (``runs/sdm_lora_attn``), one-hot SPADE. The trainer's own export (``runs/*/export``) is what the later stages
   load; nothing is written by hand.
3. A headless ComfyUI server (``main.py --cpu --verbose DEBUG``, an EMPTY ``custom_nodes``: stock nodes only) runs
   CheckpointLoaderSimple -> LoraLoader (``sdm_lora.safetensors``) -> CLIPTextEncode x2 -> ControlNetLoader
   (``controlnet.ldm.safetensors``) -> ControlNetApplyAdvanced (LoadImage: the layout in the toy palette) ->
   ControlNetLoader (``controlnet.safetensors``, diffusers layout) -> ControlNetApplyAdvanced -> KSampler ->
   VAEDecode -> SaveImage. Checked: the prompt succeeds, an image is written, and the log has none of ComfyUI 0.8.0's
   key messages (`COMFY_BAD_LINES`: ``lora key not loaded``, ``missing controlnet keys``, ``unexpected controlnet
   keys`` (DEBUG), ``leftover keys``, ...) and no traceback after ``got prompt``.
4. The same stock loaders in-process (ComfyUI's ``nodes.ControlNetLoader`` / ``nodes.LoraLoader``): the class
   ComfyUI builds for each ControlNet file (RGB and one-hot, ldm and diffusers layout), its ``hint_channels``, the
   max abs difference between its weights and the trainer's ldm file, a forward pass (and, one-hot, what a 3-channel
   IMAGE hint does), and the LoRA-patched UNet weights against W + alpha/r * up @ down of each kohya file.
5. diffusers: ``ControlNetModel.from_single_file(controlnet.ldm.safetensors, config=export/controlnet,
   local_files_only=True)`` and ``ControlNetModel.from_pretrained(export/controlnet)`` against the trainer's
   ``trainable.safetensors``; ``StableDiffusionPipeline(base).load_lora_weights`` on the kohya file (plain, and with
   ``unet_config=pipe.unet.config``) and on the diffusers-format ``lora.safetensors`` (`LORA_CASES`), every log
   record and Python warning captured. On this SD 1.5-shaped base the kohya export has diffusers module names
   (``l2i.kohya_names``, checked), so every case must load the trained weights exactly, the plain call included
   (with ldm names diffusers 0.42 fails there: docs/COMFYUI.md, "Trainer exports in the stock loaders").

Exits non-zero on any failure and prints a short report (timings, peak RSS of each stage's process).

Usage (ComfyUI's requirements must import in this Python; ``PYTHONPATH`` is passed on to the ComfyUI processes)::

    PYTHONPATH=/tmp/comfy_deps:/tmp/fake_tv:/tmp/comfy_server_deps \\
        python benchmarks/stock_loaders.py --comfyui /tmp/comfyui --work /tmp/stock_loaders --steps 2 --size 128
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

from layout2image.testing import capture_loader_messages, free_port, http_json, loader_problems

REPO = Path(__file__).resolve().parents[1]
SD15_CONFIG_DIR = REPO / "trainer" / "sd15_config"
CKPT_NAME = "random_sd15.safetensors"
RUNS = {
    "cn_rgb": ["model.mode=controlnet", "model.hint=rgb"],
    "cn_onehot": ["model.mode=controlnet", "model.hint=onehot"],
    "sdm_lora": [
        "model.mode=sdm_lora",
        "model.hint=onehot",
        "model.sdm_lora.rank=4",
        "model.sdm_lora.lora_alpha=8",
        "model.sdm_lora.conv_target_modules=[conv1, conv2, conv_shortcut]",
    ],
    "sdm_lora_attn": [
        "model.mode=sdm_lora",
        "model.hint=onehot",
        "model.sdm_lora.rank=4",
        "model.sdm_lora.lora_alpha=8",
    ],
}
#: The SDM-LoRA runs: attention + resnet-conv LoRA (LoCon), and attention only (the default target modules).
LORA_RUNS = ("sdm_lora", "sdm_lora_attn")
#: What ComfyUI 0.8.0 logs when a LoRA or ControlNet key does not land (comfy/lora.py, comfy/controlnet.py,
#: comfy/sd.py, comfy/model_patcher.py) or a load fails.
COMFY_BAD_LINES = (
    "lora key not loaded",
    "missing controlnet keys",
    "unexpected controlnet keys",
    "leftover keys",
    "WARNING SHAPE MISMATCH",
    "Calculate Weight Failed",
    "patch type not recognized",
    "NOT LOADED",
    "could not detect control model type",
)
#: Also bad once a prompt runs (before it, ComfyUI logs tracebacks of its own optional comfy_extras nodes whose
#: packages are missing, e.g. spandrel, kornia, torchaudio: "IMPORT FAILED", nothing to do with the loaders).
COMFY_BAD_AFTER_PROMPT = ("Traceback", "!!! Exception", "Failed to validate prompt")


class Failure(Exception):
    pass


# ----------------------------------------------------------------------------------------------------------- helpers
def run_measured(cmd, *, log: Path, cwd=None, env=None) -> tuple[float, float]:
    """Run ``cmd`` with stdout+stderr in ``log``; returns (seconds, peak RSS in GB of that process)."""
    t0 = time.time()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.time() - t0
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise Failure(f"{cmd[:3]}... exited with {proc.returncode}; log {log}:\n{tail}")
    return seconds, usage.ru_maxrss / 2**20


def run_stage(
    stage: str, work: Path, comfyui: Path, log: Path, *, comfy: bool = False, extra=()
) -> tuple[float, float]:
    """Run a stage of this script in a fresh process (so its peak RSS is its own); ``comfy``: in ComfyUI's folder."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", stage, "--work", str(work)]
    cmd += ["--comfyui", str(comfyui), *extra]
    return run_measured(cmd, log=log, cwd=str(comfyui) if comfy else None, env=os.environ.copy())


def self_stage(stage: str, args, log: Path, *, comfy: bool = False) -> tuple[float, float]:
    extra = ["--steps", str(args.steps), "--size", str(args.size)]
    return run_stage(stage, args.work, args.comfyui, log, comfy=comfy, extra=extra)


def proc_mem_gb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def bad_comfy_lines(text: str, prompt_marker: str | None = None) -> list[str]:
    """Lines of a ComfyUI log with a key message; with ``prompt_marker``, also errors logged after that line."""
    bad, running = [], prompt_marker is None
    for line in text.splitlines():
        running = running or line.startswith(prompt_marker)
        words = COMFY_BAD_LINES + (COMFY_BAD_AFTER_PROMPT if running else ())
        if any(b.lower() in line.lower() for b in words):
            bad.append(line)
    return bad


# ------------------------------------------------------------------------------------------------ stage: base model
def stage_base(work: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out = work / "base"
    tmp = work / ".tmp-base"
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD15_CONFIG_DIR / "unet"))
    unet.half().save_pretrained(tmp / "unet")
    del unet
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD15_CONFIG_DIR / "vae"))
    vae.half().save_pretrained(tmp / "vae")
    del vae
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(SD15_CONFIG_DIR / "text_encoder"))
    text_encoder.half().save_pretrained(tmp / "text_encoder")
    for name in ("tokenizer", "scheduler"):
        shutil.copytree(SD15_CONFIG_DIR / name, tmp / name)
    shutil.copy(SD15_CONFIG_DIR / "model_index.json", tmp / "model_index.json")
    tmp.rename(out)


def stage_checkpoint(work: Path, comfyui: Path) -> None:
    """The base folder as one ldm file, written by ComfyUI (runs in ComfyUI's folder)."""
    sys.path.insert(0, str(comfyui))
    sys.argv = ["main.py", "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.cli_args  # noqa: F401
    import comfy.diffusers_load
    import comfy.sd
    import torch
    from safetensors.torch import load_file, save_file

    dest = work / "comfy" / "models" / "checkpoints" / CKPT_NAME
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(".full.safetensors")
    model, clip, vae = comfy.diffusers_load.load_diffusers(str(work / "base"))
    print(
        "ComfyUI loaded the diffusers folder as",
        type(model.model).__name__,
        model.model.model_config.__class__.__name__,
    )
    comfy.sd.save_checkpoint(str(tmp), model, clip, vae)
    del model, clip, vae
    sd = load_file(str(tmp))
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items() if not k.startswith("cond_stage_model")}
    for k, v in load_file(str(work / "base" / "text_encoder" / "model.safetensors")).items():
        name = k if k.startswith("text_model.") else "text_model." + k
        sd["cond_stage_model.transformer." + name] = v.half() if v.is_floating_point() else v
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v.float()).all()]
    if bad:
        raise Failure(f"non-finite weights in the checkpoint: {bad[:5]}")
    save_file(sd, str(dest.with_name(".ckpt.tmp")))
    dest.with_name(".ckpt.tmp").rename(dest)
    tmp.unlink()
    print(f"checkpoint {dest}: {len(sd)} tensors, {sum(v.numel() for v in sd.values()) / 1e6:.0f}M values")


# ------------------------------------------------------------------------------------------------ stage: training
def l2i_command(name: str) -> list[str]:
    exe = Path(sys.executable).with_name(name)
    return [str(exe)] if exe.exists() else [sys.executable, "-m", f"layout2image.cli.{name.split('-')[1]}"]


def ensure_base(work: Path, comfyui: Path, timings: dict) -> Path:
    """Stage 1 where its outputs are missing (``base/``, then the ldm checkpoint); returns the checkpoint's path.
    Also used by ``benchmarks/sd15_template_models.py``."""
    (work / "logs").mkdir(parents=True, exist_ok=True)
    if not (work / "base" / "model_index.json").is_file():
        timings["random SD 1.5-shaped diffusers folder"] = run_stage("base", work, comfyui, work / "logs" / "base.log")
    checkpoint = work / "comfy" / "models" / "checkpoints" / CKPT_NAME
    if not checkpoint.is_file():
        timings["ldm checkpoint via ComfyUI"] = run_stage(
            "checkpoint", work, comfyui, work / "logs" / "checkpoint.log", comfy=True
        )
    return checkpoint


def ensure_run(work: Path, run: str, settings: list[str], *, data: Path, train_size: int, timings: dict) -> Path:
    """A 1-step ``l2i-train`` run on ``base/`` into ``runs/<run>`` unless its export is there; ``settings``: the
    run's own ``--set`` overrides (mode, hint, ...). Returns the export folder."""
    folder = work / "runs" / run
    if not (folder / "export" / "manifest.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        cmd = [*l2i_command("l2i-train"), "--data", str(data), "--output", str(folder), "--set"]
        cmd += train_overrides(work, train_size, settings)
        (work / "logs" / f"train_{run}.cmd").write_text(" ".join(map(str, cmd)) + "\n")
        timings[f"l2i-train {run} (1 step + export)"] = run_measured(
            cmd, log=work / "logs" / f"train_{run}.log", env=os.environ.copy()
        )
    return folder / "export"


def train_overrides(work: Path, train_size: int, settings: list[str]) -> list[str]:
    return [
        f"model.pretrained={work / 'base'}",
        "model.base_model_name=random/sd15-shaped",
        "adversarial.enabled=false",
        "train.steps=1",
        "train.batch_size=1",
        "train.cpu=true",
        "train.precision=no",
        "train.num_workers=0",
        "train.gradient_checkpointing=false",
        "train.checkpoint_every=0",
        "train.export_on_checkpoint=false",
        "train.keep_last=1",
        "train.tensorboard=false",
        "validation.at_end=false",
        "validation.every=0",
        "optim.lr=1e-3",
        f"data.transform.resolution={train_size}",
        "export.controlnet_formats=[diffusers-folder, diffusers, ldm]",
        "export.discriminator=false",
        *settings,
    ]


# ------------------------------------------------------------------------------------------------ stage: ComfyUI
def layout_image(work: Path, size: int) -> Path:
    """A toy label map of the dataset in the toy palette, resized (nearest) to size x size: the stock hint."""
    import numpy as np
    from PIL import Image

    from layout2image.core.labels import load_label_map, load_label_set

    labels = load_label_set(work / "data" / "labelset.yaml")
    ids = load_label_map(sorted((work / "data" / "labels").glob("*.png"))[0], labels)
    ids = np.asarray(Image.fromarray(ids.astype(np.uint8)).resize((size, size), Image.NEAREST))
    palette = np.zeros((256, 3), np.uint8)
    palette[: labels.num_classes] = np.asarray(labels.palette, np.uint8)
    path = work / "comfy" / "input" / "l2i_toy_layout.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(palette[ids]).save(path)
    return path


def stock_graph(size: int, steps: int) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT_NAME}},
        "2": {
            "class_type": "LoraLoader",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "lora_name": "sdm_lora.safetensors",
                "strength_model": 1.0,
                "strength_clip": 1.0,
            },
        },
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a street by day", "clip": ["2", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 1]}},
        "5": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "cn_rgb.ldm.safetensors"}},
        "6": {"class_type": "LoadImage", "inputs": {"image": "l2i_toy_layout.png"}},
        "7": {
            "class_type": "ControlNetApplyAdvanced",
            "inputs": {
                "positive": ["3", 0],
                "negative": ["4", 0],
                "control_net": ["5", 0],
                "image": ["6", 0],
                "strength": 1.0,
                "start_percent": 0.0,
                "end_percent": 1.0,
            },
        },
        "12": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "cn_rgb.diffusers.safetensors"}},
        "13": {
            "class_type": "ControlNetApplyAdvanced",
            "inputs": {
                "positive": ["7", 0],
                "negative": ["7", 1],
                "control_net": ["12", 0],
                "image": ["6", 0],
                "strength": 0.5,
                "start_percent": 0.0,
                "end_percent": 1.0,
            },
        },
        "8": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "9": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["2", 0],
                "positive": ["13", 0],
                "negative": ["13", 1],
                "latent_image": ["8", 0],
                "seed": 0,
                "steps": steps,
                "cfg": 5.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        },
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["1", 2]}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "stock_loaders"}},
    }


def link_models(work: Path) -> Path:
    """ComfyUI's base directory: the trainer's exports linked into models/controlnet and models/loras."""
    base = work / "comfy"
    for sub in ("custom_nodes", "models/controlnet", "models/loras", "input", "web"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    links = {
        "models/controlnet/cn_rgb.ldm.safetensors": "runs/cn_rgb/export/controlnet.ldm.safetensors",
        "models/controlnet/cn_rgb.diffusers.safetensors": "runs/cn_rgb/export/controlnet.safetensors",
        "models/controlnet/cn_onehot.ldm.safetensors": "runs/cn_onehot/export/controlnet.ldm.safetensors",
        "models/controlnet/cn_onehot.diffusers.safetensors": "runs/cn_onehot/export/controlnet.safetensors",
        "models/loras/sdm_lora.safetensors": "runs/sdm_lora/export/sdm_lora.safetensors",
        "models/loras/sdm_lora.spade.safetensors": "runs/sdm_lora/export/sdm_lora.spade.safetensors",
        "models/loras/sdm_lora_attn.safetensors": "runs/sdm_lora_attn/export/sdm_lora.safetensors",
        "models/loras/sdm_lora_attn.spade.safetensors": "runs/sdm_lora_attn/export/sdm_lora.spade.safetensors",
    }
    for dst, src in links.items():
        dst = base / dst
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        dst.symlink_to(work / src)
    (base / "web" / "index.html").write_text("<!doctype html><title>headless</title>\n")
    return base


def run_comfy_server(args, report: dict) -> None:
    import numpy as np
    from PIL import Image

    work, comfyui = args.work, args.comfyui
    base = link_models(work)
    layout_image(work, args.size)
    if any((base / "custom_nodes").iterdir()):
        raise Failure(f"{base / 'custom_nodes'} is not empty; this run is for stock nodes only")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = work / "comfyui_server.log"
    cmd = [sys.executable, "main.py", "--cpu", "--verbose", "DEBUG", "--listen", "127.0.0.1", "--port", str(port)]
    cmd += ["--base-directory", str(base), "--front-end-root", str(base / "web"), "--disable-auto-launch"]
    cmd += ["--disable-api-nodes", "--database-url", "sqlite:///:memory:"]
    t0 = time.time()
    with log.open("w") as f:
        server = subprocess.Popen(cmd, cwd=comfyui, stdout=f, stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        while True:
            if server.poll() is not None:
                raise Failure(f"ComfyUI exited with {server.returncode}:\n{log.read_text()[-3000:]}")
            try:
                http_json(f"{url}/object_info/ControlNetLoader", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.time() - t0 > 180:
                    raise Failure("ComfyUI did not come up in 180 s") from None
                time.sleep(1)
        report["comfy_server_up_s"] = time.time() - t0
        graph = stock_graph(args.size, args.steps)
        t1 = time.time()
        queued = http_json(f"{url}/prompt", {"prompt": graph, "client_id": "stock_loaders"})
        if queued.get("node_errors"):
            raise Failure(f"ComfyUI refused the graph: {queued['node_errors']}")
        prompt_id = queued["prompt_id"]
        while True:
            if server.poll() is not None:
                raise Failure(f"ComfyUI exited with {server.returncode}:\n{log.read_text()[-3000:]}")
            entry = http_json(f"{url}/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
                break
            if time.time() - t1 > 1800:
                raise Failure("the prompt did not finish in 30 minutes")
            time.sleep(0.5)
        report["comfy_prompt_s"] = time.time() - t1
        report["comfy_server_peak_rss_gb"] = proc_mem_gb(server.pid)
        status = entry["status"]["status_str"]
        report["comfy_status"] = status
        if status != "success":
            raise Failure(f"prompt failed: {json.dumps(entry['status']['messages'])[-3000:]}")
        (image,) = entry["outputs"]["11"]["images"]
        path = base / "output" / image["subfolder"] / image["filename"]
        pixels = np.asarray(Image.open(path))
        report["comfy_image"] = f"{path} {pixels.shape} std {pixels.std():.1f}"
        if pixels.shape != (args.size, args.size, 3):
            raise Failure(f"saved image {path} has shape {pixels.shape}")
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    text = log.read_text(errors="replace")
    report["comfy_bad_lines"] = bad_comfy_lines(text, prompt_marker="got prompt")
    report["comfy_import_failed"] = re.findall(r"IMPORT FAILED: (\S+)", text)
    report["comfy_log_excerpt"] = [
        line
        for line in text.splitlines()
        if re.search(r"Requested to load|model_type|loaded completely|Prompt executed|lora|controlnet", line, re.I)
    ][:40]
    sampling = re.findall(r"(\d+)/(\d+) \[[^\]]*?(\d+\.\d+)s/it\]", text)
    if sampling:
        report["comfy_s_per_step"] = float(sampling[-1][2])
    if report["comfy_bad_lines"]:
        raise Failure("ComfyUI logged key problems:\n" + "\n".join(report["comfy_bad_lines"][:20]))


def stage_comfy_inprocess(work: Path, comfyui: Path) -> None:
    """Stock loader nodes called in-process; prints one JSON line ``RESULT {...}`` (runs in ComfyUI's folder)."""
    import logging

    sys.path.insert(0, str(comfyui))
    sys.argv = ["main.py", "--cpu", "--base-directory", str(work / "comfy")]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.cli_args  # noqa: F401

    logging.basicConfig(level=logging.DEBUG, stream=sys.stdout)
    with capture_loader_messages(logging.DEBUG) as records:  # every log record, and Python warnings
        import torch
        from safetensors.torch import load_file

        import nodes

        result: dict = {"controlnets": {}}
        for run in ("cn_rgb", "cn_onehot"):
            trained = load_file(str(work / "runs" / run / "export" / "controlnet.ldm.safetensors"))
            trained = {k.removeprefix("control_model."): v for k, v in trained.items()}
            for layout in ("ldm", "diffusers"):
                name = f"{run}.{layout}.safetensors"
                start = len(records)
                (control,) = nodes.ControlNetLoader().load_controlnet(name)
                model = control.control_model
                state = model.state_dict()
                diff = max((state[k].float() - v.float()).abs().max().item() for k, v in trained.items())
                info = {
                    "class": f"{type(control).__module__}.{type(control).__qualname__}",
                    "control_model": f"{type(model).__module__}.{type(model).__qualname__}",
                    "hint_channels": model.input_hint_block[0].weight.shape[1],
                    "dtype": str(next(model.parameters()).dtype),
                    "keys_trained_not_in_comfy": sorted(set(trained) - set(state))[:5],
                    "keys_comfy_not_trained": sorted(set(state) - set(trained))[:5],
                    "max_abs_diff_vs_trainer_ldm_file": diff,
                    "log_problems": bad_comfy_lines("\n".join(records[start:]), prompt_marker=""),
                }
                if layout == "ldm":
                    torch.manual_seed(0)
                    c = info["hint_channels"]
                    hint = torch.zeros(1, c, 64, 64)
                    hint[:, 1 % c] = 1.0
                    with torch.no_grad():
                        outs = model(
                            x=torch.randn(1, 4, 8, 8),
                            hint=hint,
                            timesteps=torch.tensor([500.0]),
                            context=torch.randn(1, 77, 768),
                        )
                    outs = [o for group in outs.values() for o in group]  # {"middle": [...], "output": [...]}
                    info["forward_outputs"] = len(outs)
                    info["forward_finite"] = all(torch.isfinite(o).all().item() for o in outs)
                    if c != 3:  # what the stock Apply ControlNet nodes hand it: an IMAGE, (B, 3, H, W)
                        try:
                            with torch.no_grad():
                                model(x=torch.randn(1, 4, 8, 8), hint=torch.zeros(1, 3, 64, 64),
                                      timesteps=torch.tensor([500.0]), context=torch.randn(1, 77, 768))  # fmt: skip
                            info["three_channel_hint"] = "accepted"
                        except RuntimeError as e:
                            info["three_channel_hint"] = f"RuntimeError: {str(e)[:160]}"
                result["controlnets"][name] = info
                del control, model, state

        # LoRA: the stock LoraLoader on the stock checkpoint; patched weights == W + alpha/r * up @ down of the file.
        import comfy.lora

        model, clip, _ = nodes.CheckpointLoaderSimple().load_checkpoint(CKPT_NAME)[:3]
        key_map = comfy.lora.model_lora_keys_unet(model.model, {})
        result["lora"] = {}
        for run in LORA_RUNS:
            start = len(records)
            (lora_model, _lora_clip) = nodes.LoraLoader().load_lora(model, clip, f"{run}.safetensors", 1.0, 1.0)
            kohya = load_file(str(work / "runs" / run / "export" / "sdm_lora.safetensors"))
            modules = sorted({k.split(".")[0] for k in kohya})
            targets = {m: key_map[m] for m in modules if m in key_map}
            before = {m: model.model.state_dict()[t].float().clone() for m, t in targets.items()}
            lora_model.patch_model(device_to=torch.device("cpu"))
            after = lora_model.model.state_dict()
            worst = largest = 0.0
            for m, t in targets.items():
                down, up = kohya[f"{m}.lora_down.weight"].float(), kohya[f"{m}.lora_up.weight"].float()
                alpha = kohya[f"{m}.alpha"].item() / down.shape[0]
                delta = (up.flatten(1) @ down.flatten(1)).reshape(before[m].shape) * alpha
                worst = max(worst, (after[t].float() - before[m] - delta).abs().max().item())
                largest = max(largest, delta.abs().max().item())
            lora_model.unpatch_model()
            result["lora"][f"{run}.safetensors"] = {
                "modules": len(modules),
                "patched": len(targets),
                "unmapped": [m for m in modules if m not in key_map][:5],
                "patches_on_model": len(lora_model.patches),
                "max_abs_diff_patched_minus_expected": worst,
                "max_abs_expected_delta": largest,
                "log_problems": bad_comfy_lines("\n".join(records[start:]), prompt_marker=""),
            }
    print("RESULT " + json.dumps(result))


# ------------------------------------------------------------------------------------------------ stage: diffusers
#: The SDM-LoRA files given to ``StableDiffusionPipeline.load_lora_weights``: (file in the export, pass unet_config).
#: All must load exactly. The kohya file (diffusers module names on an SD 1.x-shaped base) is also loaded with
#: ``unet_config=`` (the SDXL pipeline's call, which runs ``_maybe_map_sgm_blocks_to_diffusers``: a no-op on
#: diffusers names).
LORA_CASES = {
    "kohya file, plain call": ("sdm_lora.safetensors", False),
    "kohya file, unet_config=pipe.unet.config": ("sdm_lora.safetensors", True),
    "diffusers-format lora.safetensors, plain call": ("lora.safetensors", False),
}
#: The kohya naming `weights.lora` writes for an SD 1.5-shaped UNet (``l2i.kohya_names``).
EXPECTED_KOHYA_NAMES = "diffusers"


def lora_case(work: Path, run: str, file_name: str, with_config: bool) -> dict:
    """A fresh pipeline on ``base/`` loads ``runs/<run>/export/<file_name>``; its LoRA weights vs the trainer's."""
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    export = work / "runs" / run / "export"
    pipe = StableDiffusionPipeline.from_pretrained(
        str(work / "base"), local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    kwargs = {"unet_config": pipe.unet.config} if with_config else {}
    try:
        pipe.load_lora_weights(str(export / file_name), **kwargs)
    except Exception as e:  # noqa: BLE001 - the outcome is the report
        return {"ok": False, "error": f"{type(e).__name__}: {str(e)[:400]}"}
    adapters = pipe.get_active_adapters()
    if len(adapters) != 1:
        return {"ok": False, "error": f"active adapters {adapters}"}
    (adapter,) = adapters
    trained = load_file(str(next((work / "runs" / run / "checkpoints").glob("step_*")) / "trainable.safetensors"))
    trained = {k.replace(".default.", f".{adapter}."): v for k, v in trained.items() if ".lora_" in k}
    state = pipe.unet.state_dict()
    with_lora = {k for k in state if f".{adapter}." in k}
    cfg = json.loads(_safetensors_metadata(export / "lora.safetensors")["l2i.lora_config"])
    modules = {k.rsplit(".lora_", 1)[0] for k in trained}
    missing = sorted(set(trained) - set(state))
    with torch.no_grad():
        diff = max(
            ((state[k].float() - v.float()).abs().max().item() for k, v in trained.items() if k in state), default=-1
        )
    return {
        "ok": True,
        "adapter": adapter,
        "trainer_lora_tensors": len(trained),
        "pipeline_lora_tensors": len(with_lora),
        "trainer_tensors_not_in_pipeline": missing[:5],
        "pipeline_tensors_not_trained": sorted(with_lora - set(trained))[:5],
        "max_abs_diff_vs_trainer_checkpoint": diff,
        "max_abs_lora_B": max(v.abs().max().item() for k, v in trained.items() if ".lora_B." in k),
        "scalings": sorted(
            {
                pipe.unet.get_submodule(m).scaling.get(adapter)
                for m in modules
                if m + ".lora_A." + adapter + ".weight" in state
            }
        ),
        "expected_scaling": cfg["lora_alpha"] / cfg["r"],
    }


def stage_diffusers(work: Path) -> None:
    """diffusers' stock loaders on the exports; prints one JSON line ``RESULT {...}``: each load with the log records
    (INFO and up) and Python warnings it caused, ``log`` with those of the rest of the stage."""
    from diffusers import ControlNetModel
    from diffusers.utils import logging as dlogging
    from safetensors.torch import load_file

    dlogging.set_verbosity_info()
    result: dict = {"controlnets": {}}
    with capture_loader_messages() as lines:
        for run in ("cn_rgb", "cn_onehot"):
            export = work / "runs" / run / "export"
            trained = load_file(
                str(next((work / "runs" / run / "checkpoints").glob("step_*")) / "trainable.safetensors")
            )
            start = len(lines)
            folder = ControlNetModel.from_pretrained(str(export / "controlnet"), local_files_only=True)
            single = ControlNetModel.from_single_file(
                str(export / "controlnet.ldm.safetensors"), config=str(export / "controlnet"), local_files_only=True
            )
            out = {}
            for label, model in (("from_pretrained", folder), ("from_single_file_ldm", single)):
                state = model.state_dict()
                missing = sorted(set(trained) - set(state))
                out[label] = {
                    "conditioning_channels": model.config.conditioning_channels,
                    "trainer_keys_missing": missing[:5],
                    "extra_keys": sorted(set(state) - set(trained))[:5],
                    "max_abs_diff_vs_trainer": max(
                        (state[k].float() - v.float()).abs().max().item() for k, v in trained.items() if k in state
                    ),
                }
            out["log"] = lines[start:]
            del lines[start:]
            result["controlnets"][run] = out
        result["lora"] = {}
        result["kohya_names"] = {
            run: _safetensors_metadata(work / "runs" / run / "export" / "sdm_lora.safetensors").get("l2i.kohya_names")
            for run in LORA_RUNS
        }
        for run in LORA_RUNS:
            for case, (file_name, with_config) in LORA_CASES.items():
                start = len(lines)
                out = lora_case(work, run, file_name, with_config)
                out["log"] = [line[:400] for line in lines[start:]]
                del lines[start:]
                result["lora"][f"{run} {case}"] = out
    result["log"] = lines
    print("RESULT " + json.dumps(result))


def _safetensors_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def parse_result(log: Path) -> dict:
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise Failure(f"no RESULT line in {log}")


# ---------------------------------------------------------------------------------------------------------- checks
def check_comfy_inprocess(res: dict, problems: list[str]) -> None:
    for name, info in res["controlnets"].items():
        if info["log_problems"] or info["keys_trained_not_in_comfy"] or info["keys_comfy_not_trained"]:
            problems.append(f"ComfyUI ControlNetLoader {name}: {info}")
        if info["max_abs_diff_vs_trainer_ldm_file"] != 0.0:
            problems.append(f"ComfyUI ControlNetLoader {name}: weights differ from the trainer's file")
        if "forward_finite" in info and not info["forward_finite"]:
            problems.append(f"ComfyUI ControlNet {name}: non-finite forward outputs")
    for name, lora in res["lora"].items():
        if (
            lora["log_problems"]
            or lora["unmapped"]
            or not lora["patched"] == lora["modules"] == lora["patches_on_model"]
        ):
            problems.append(f"ComfyUI LoraLoader {name}: {lora}")
        if lora["max_abs_diff_patched_minus_expected"] > 1e-6:
            problems.append(
                f"ComfyUI LoraLoader {name}: patched weights off by {lora['max_abs_diff_patched_minus_expected']}"
            )


def check_diffusers(res: dict, problems: list[str]) -> None:
    logs = list(res["log"])
    for run, naming in res.get("kohya_names", {}).items():
        if naming != EXPECTED_KOHYA_NAMES:
            problems.append(
                f"{run}: the kohya export has {naming!r} module names (l2i.kohya_names); weights.lora writes "
                f"{EXPECTED_KOHYA_NAMES!r} names for SD 1.x-shaped UNets (re-export with the current code, or --fresh)"
            )
    for run, out in res["controlnets"].items():
        logs += out["log"]
        for label in ("from_pretrained", "from_single_file_ldm"):
            o = out[label]
            if o["trainer_keys_missing"] or o["extra_keys"] or o["max_abs_diff_vs_trainer"] != 0.0:
                problems.append(f"diffusers ControlNetModel.{label} {run}: {o}")
    for name, o in res["lora"].items():
        bad = loader_problems(o["log"])
        failed = (
            not o["ok"]
            or bad
            or o["trainer_tensors_not_in_pipeline"]
            or o["pipeline_tensors_not_trained"]
            or o["max_abs_diff_vs_trainer_checkpoint"] != 0.0
            or o["scalings"] != [o["expected_scaling"]]
        )
        if not failed:
            continue
        what = o.get("error") or (bad[0] if bad else json.dumps({k: v for k, v in o.items() if k != "log"}))
        problems.append(f"diffusers load_lora_weights, {name}: {what[:500]}")
    bad = loader_problems(logs)
    if bad:
        problems.append("diffusers/peft warnings about keys:\n  " + "\n  ".join(dict.fromkeys(bad)))


# ------------------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, default=os.environ.get("COMFYUI_PATH"), help="ComfyUI checkout")
    parser.add_argument("--work", type=Path, default=Path("/tmp/stock_loaders"), help="work folder (reused)")
    parser.add_argument("--steps", type=int, default=2, help="KSampler steps in ComfyUI")
    parser.add_argument("--size", type=int, default=128, help="ComfyUI image size (multiple of 64)")
    parser.add_argument("--train-size", type=int, default=64, help="training resolution")
    parser.add_argument("--fresh", action="store_true", help="delete --work first")
    parser.add_argument("--skip-comfy-server", action="store_true", help="skip the headless server run")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.comfyui is None or not (Path(args.comfyui) / "main.py").is_file():
        parser.error("--comfyui must name a ComfyUI checkout (or set COMFYUI_PATH)")
    args.comfyui, args.work = Path(args.comfyui).resolve(), Path(args.work).resolve()
    if args.stage:
        {
            "base": lambda: stage_base(args.work),
            "checkpoint": lambda: stage_checkpoint(args.work, args.comfyui),
            "comfy-inprocess": lambda: stage_comfy_inprocess(args.work, args.comfyui),
            "diffusers": lambda: stage_diffusers(args.work),
        }[args.stage]()
        return 0
    if args.fresh:
        shutil.rmtree(args.work, ignore_errors=True)
    work = args.work
    (work / "logs").mkdir(parents=True, exist_ok=True)
    timings: dict[str, tuple[float, float] | str] = {}
    report: dict = {}
    problems: list[str] = []
    try:
        ensure_base(work, args.comfyui, timings)
        if not (work / "data" / "labelset.yaml").is_file():
            cmd = [*l2i_command("l2i-toy"), "--out", str(work / "data"), "--num", "4", "--size", str(args.train_size)]
            timings["l2i-toy dataset"] = run_measured(
                [*cmd, "--preview-rows", "0", "--quiet"], log=work / "logs" / "toy.log"
            )
        for run, settings in RUNS.items():
            ensure_run(work, run, settings, data=work / "data", train_size=args.train_size, timings=timings)
        for run in RUNS:
            manifest = json.loads((work / "runs" / run / "export" / "manifest.json").read_text())
            report[f"export {run}"] = manifest["files"]
        link_models(work)
        if not args.skip_comfy_server:
            t0 = time.time()
            run_comfy_server(args, report)
            timings["ComfyUI server: start + stock graph"] = (time.time() - t0, report["comfy_server_peak_rss_gb"])
        log = work / "logs" / "comfy_inprocess.log"
        timings["ComfyUI stock loaders in-process"] = self_stage("comfy-inprocess", args, log, comfy=True)
        report["comfy_inprocess"] = parse_result(log)
        check_comfy_inprocess(report["comfy_inprocess"], problems)
        log = work / "logs" / "diffusers.log"
        timings["diffusers stock loaders"] = self_stage("diffusers", args, log)
        report["diffusers"] = parse_result(log)
        check_diffusers(report["diffusers"], problems)
    except Failure as e:
        problems.append(str(e))
    print(f"stock loaders on trainer exports (work {work}, ComfyUI {args.comfyui})")
    for what, value in timings.items():
        print(f"  {what:45s} {value[0]:7.1f} s  peak RSS {value[1]:5.1f} GB")
    print(textwrap.indent(json.dumps(report, indent=1, default=str), "  "))
    if problems:
        print("FAILED:")
        for p in problems:
            print(textwrap.indent(p, "  "))
        return 1
    print("OK: ComfyUI and diffusers stock loaders loaded every trainer export with no key warnings")
    return 0


if __name__ == "__main__":
    sys.exit(main())
