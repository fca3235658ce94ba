"""Training-step cost of plain ControlNet training vs ALDM, side by side on the same model and batch.

Three settings of `layout2image.trainer.step.LayoutDiffusionStep` (the code the trainer runs), each for the same
number of optimizer steps (a multiple of the lazy interval, so the adversarial steps are amortised as in training):

    plain        diffusion loss only (adversarial.enabled=false, uniform timesteps)
    aldm K=9     ALDM: every 8th step a D update and the adversarial G loss over K=9 stop-gradient unrolled steps
    full K=3     every 8th step the adversarial loss with gradients through all K=3 unrolled steps (checkpointed)

A step includes the D update (AdamW) and the ControlNet's AdamW step; latents and prompt embeddings are made once
(the trainer's encode pass is the same for all three). Reported: mean time per step, the mean of the adversarial
(every 8th) and plain steps, peak memory (CUDA: max allocated; CPU: peak RSS of the process, reset before each
block via /proc/self/clear_refs), the peak above what was held before the steps, and ratios to plain. The settings
run interleaved, in blocks of 8 steps in rotating order, with shared optimizers, so machine noise and warm-up
effects do not favour one of them.

Models have random weights: ``--size tiny`` (the test world's UNet with (32, 64) blocks, a 2x VAE, a tiny SegFormer
discriminator) or ``--size sd15`` (SD 1.5's UNet and VAE from trainer/sd15_config, ALDM's class-embedding ControlNet
and an UperNet discriminator with a ResNet-101-shaped backbone, ~85M parameters like ALDM's).

Usage::

    python benchmarks/bench_train.py                                  # tiny, CPU, 64x64, batch 2: ~1 minute
    python benchmarks/bench_train.py --size sd15 --resolution 512 --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import re
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from layout2image.core.controlnet import build_controlnet, hint_spec_for
from layout2image.core.discriminator import build_discriminator, tiny_segmenter_config
from layout2image.core.labels import get_label_set
from layout2image.testing import tiny_unet_config, tiny_vae_config
from layout2image.trainer.conditioning import ControlNetConditioner
from layout2image.trainer.step import AdversarialConfig, LayoutDiffusionStep, encode_images

SD15_CONFIG_DIR = Path(__file__).resolve().parents[1] / "trainer" / "sd15_config"
TINY_UNET = tiny_unet_config(sample_size=32)
TINY_VAE = tiny_vae_config()
COMMON = dict(grid_steps=25, lambda_adv=0.1, warmup_start=0, warmup_end=0, fake_weight=0.01, lazy_every=8)
SETTINGS = {
    "plain": AdversarialConfig(enabled=False, num_unroll_steps=0, timesteps="uniform"),
    "aldm K=9": AdversarialConfig(num_unroll_steps=9, unroll_mode="aldm", **COMMON),
    "full K=3": AdversarialConfig(num_unroll_steps=3, unroll_mode="full", **COMMON),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--resolution", type=int, default=None, help="image size (default: tiny 64, sd15 512)")
    parser.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    parser.add_argument("--steps", type=int, default=16, help="timed steps per setting, a multiple of 8 (default 16)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per setting first (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", choices=("no", "fp16", "bf16"), default="no", help="autocast dtype")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-checkpointing", action="store_true", help="disable gradient checkpointing")
    parser.add_argument("--decode-crop", type=int, default=None, help="adversarial.decode_crop (latent pixels)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--only", choices=tuple(SETTINGS), help=argparse.SUPPRESS)  # CPU memory: one setting
    args = parser.parse_args(argv)
    if args.steps % 8:
        parser.error(f"--steps={args.steps} must be a multiple of 8 (the lazy interval), e.g. 16")
    if args.resolution is None:
        args.resolution = 64 if args.size == "tiny" else 512
    return args


def _load_config(sub: str) -> dict:
    data = json.loads((SD15_CONFIG_DIR / sub / "config.json").read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


def build(args, label_set, device, frozen_dtype):
    torch.manual_seed(0)
    if args.size == "tiny":
        unet, vae = UNet2DConditionModel(**TINY_UNET), AutoencoderKL(**TINY_VAE)
        widths, text_dim = (8, 8, 8, 8), 32
        disc = build_discriminator(
            label_set, config=tiny_segmenter_config(), generator=torch.Generator().manual_seed(0)
        )
    else:
        from transformers import ResNetConfig, UperNetConfig

        unet = UNet2DConditionModel.from_config(_load_config("unet"))
        vae = AutoencoderKL.from_config(_load_config("vae"))
        widths, text_dim = (768, 512, 256, 256), 768
        stages = ["stage1", "stage2", "stage3", "stage4"]
        backbone = ResNetConfig(layer_type="bottleneck", depths=[3, 4, 23, 3], out_features=stages)
        config = UperNetConfig(backbone_config=backbone, hidden_size=512, use_auxiliary_head=False)
        disc = build_discriminator(
            label_set, backbone="upernet", config=config, generator=torch.Generator().manual_seed(0)
        )
    unet.requires_grad_(False).eval()
    vae.requires_grad_(False).eval()
    if not args.no_checkpointing:
        unet.enable_gradient_checkpointing()
    controlnet = build_controlnet(unet, "embedding", embedding_dim=text_dim, hint_block_out_channels=widths)
    if not args.no_checkpointing:
        controlnet.enable_gradient_checkpointing()
    for module in (unet, vae):
        module.to(device)
        if frozen_dtype != torch.float32:
            module.to(frozen_dtype)
    controlnet.to(device).train()
    disc.to(device)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    table = torch.randn(label_set.num_classes + 1, text_dim)
    conditioner = ControlNetConditioner(
        controlnet, hint_spec_for(controlnet, label_set), label_set, table=table, vae_scale_factor=factor
    )
    return unet, vae, controlnet, disc, conditioner, text_dim


def _rss_gib() -> float:
    try:
        text = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+)", text).group(1)) / 2**20
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _reset_peak(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")


def _current(device) -> float:
    """Memory held now (CUDA: allocated; CPU: resident set)."""
    gc.collect()
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**30
    try:
        return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 2**20
    except (OSError, AttributeError):
        return float("nan")


def _peak(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return _rss_gib()


class Setting:
    """One setting's step function and its measurements (times per step, peak memory per block of 8 steps)."""

    def __init__(self, name: str, adv: AdversarialConfig, models, args) -> None:
        unet, vae, _, disc, conditioner, _ = models
        if args.decode_crop:
            adv = AdversarialConfig(**{**adv.__dict__, "decode_crop": args.decode_crop})
        scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
        self.name = name
        self.step_fn = LayoutDiffusionStep(
            unet,
            scheduler,
            conditioner,
            adv,
            discriminator=disc if adv.enabled else None,
            decoder=vae if adv.enabled else None,
        )
        self.times: dict[int, float] = {}
        self.peak = 0.0

    def result(self) -> dict:
        adv = [t for s, t in self.times.items() if self.step_fn.is_adversarial_step(s)]
        plain = [t for s, t in self.times.items() if not self.step_fn.is_adversarial_step(s)]
        return {
            "setting": self.name,
            "step_s": statistics.mean(self.times.values()),
            "adversarial_step_s": statistics.mean(adv) if adv else None,
            "plain_step_s": statistics.mean(plain),
            "peak_gib": self.peak,
        }


def run_interleaved(
    settings: list[Setting], models, batch, args, device, first_step: int = 0, warmup: bool = True
) -> float:
    """Blocks of 8 steps (one lazy interval), settings in rotating order; shared optimizers (same state size).

    Returns the memory held after the warm-up (weights, optimizer states, the batch) in GiB.
    """
    _, _, controlnet, disc, _, _ = models
    latents, labels, text = batch
    g_opt = torch.optim.AdamW(controlnet.parameters(), lr=1e-6)
    d_opt = torch.optim.AdamW([p for p in disc.parameters() if p.requires_grad], lr=1e-7)
    dtype = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.precision]
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext

    def one(setting: Setting, step: int) -> float:
        step_fn = setting.step_fn
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        gen = torch.Generator().manual_seed(step)
        if step_fn.is_adversarial_step(step):
            with autocast():
                step_fn.discriminator_step(latents, labels, text, gen, lambda loss: loss.backward())
            d_opt.step()
            d_opt.zero_grad(set_to_none=True)
        with autocast():
            step_fn.generator_step(latents, labels, text, step, gen, lambda loss: loss.backward())
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        g_opt.step()
        g_opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for setting in settings if warmup else ():  # untimed: every code path once (8000 is adversarial, 8001 not)
        for w in range(args.warmup):
            one(setting, 8000 + w)
    held = _current(device)
    for block in range(args.steps // 8):
        shift = block % len(settings)
        for setting in settings[shift:] + settings[:shift]:
            if warmup:
                _reset_peak(device)
            for s in range(first_step + block * 8, first_step + block * 8 + 8):
                setting.times[s] = one(setting, s)
            setting.peak = max(setting.peak, _peak(device))
        print(f"block {block + 1}/{args.steps // 8} done", file=sys.stderr, flush=True)
    return held


def _memory_in_subprocess(name: str, argv: list[str]) -> tuple[float, float]:
    """(peak, held before the first step) of one setting in a fresh process: CPU RSS has no per-phase reset."""
    import subprocess

    out = subprocess.run(
        [sys.executable, __file__, *argv, "--only", name], capture_output=True, text=True, check=True
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("MEMORY "))
    data = json.loads(line[len("MEMORY ") :])
    return data["peak"], data["held"]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    label_set = get_label_set("cityscapes" if args.size == "sd15" else "toy")
    frozen_dtype = torch.float32 if args.precision == "no" or device.type != "cuda" else (
        torch.float16 if args.precision == "fp16" else torch.bfloat16
    )  # fmt: skip
    models = build(args, label_set, device, frozen_dtype)
    unet, vae, controlnet, disc, _, text_dim = models
    g = torch.Generator().manual_seed(0)
    h = w = args.resolution
    pixels = (torch.rand(args.batch, 3, h, w, generator=g) * 2 - 1).to(device)
    labels = torch.randint(0, label_set.num_classes, (args.batch, h, w), generator=g).to(device)
    tokens = 77 if args.size == "sd15" else 16
    text = torch.randn(args.batch, tokens, text_dim, generator=g).to(device, frozen_dtype)
    latents = encode_images(vae, pixels, g)
    batch = (latents, labels, text)
    if args.only:  # memory of one setting: steps 1..8 (the last is adversarial), nothing before
        setting = Setting(args.only, SETTINGS[args.only], models, args)
        args.steps = 8
        held = _current(device)
        _reset_peak(device)
        run_interleaved([setting], models, batch, args, device, first_step=1, warmup=False)
        print("MEMORY " + json.dumps({"peak": _peak(device), "held": held}), flush=True)
        return
    count = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    print(
        f"{args.size}: UNet {count(unet):.1f}M (frozen, {frozen_dtype}), ControlNet {count(controlnet):.1f}M, "
        f"D {count(disc):.1f}M, VAE {count(vae):.1f}M; {h}x{w} images, latents {tuple(latents.shape[-2:])}, batch "
        f"{args.batch}, {args.steps} steps per setting, device {device}, precision {args.precision}, checkpointing "
        f"{not args.no_checkpointing}, threads {torch.get_num_threads()}",
        flush=True,
    )
    settings = [Setting(name, adv, models, args) for name, adv in SETTINGS.items()]
    held = run_interleaved(settings, models, batch, args, device)
    results = [s.result() for s in settings]
    settings_times = [[t for i, t in st.times.items() if not st.step_fn.is_adversarial_step(i)] for st in settings]
    for r in results:
        r["held_gib"] = held
    if device.type != "cuda":
        del models, batch, unet, vae, controlnet, disc, settings
        for r in results:
            r["peak_gib"], r["held_gib"] = _memory_in_subprocess(r["setting"], argv)
    plain = results[0]
    # Plain (non-adversarial) steps are the same work in every setting: their pooled mean is the time reference,
    # robust to a slow block in one setting.
    plain_steps = [t for st in settings_times for t in st]
    reference = statistics.mean(plain_steps)
    header = (
        f"{'setting':<10} {'step (s)':>9} {'x plain':>8} {'adv step':>9} {'plain st.':>9} "
        f"{'peak GiB':>9} {'x plain':>8} {'+held GiB':>9} {'x plain':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        adv = f"{r['adversarial_step_s']:.3f}" if r["adversarial_step_s"] is not None else "-"
        dyn, dyn_plain = r["peak_gib"] - r["held_gib"], plain["peak_gib"] - plain["held_gib"]
        print(
            f"{r['setting']:<10} {r['step_s']:>9.3f} {r['step_s'] / reference:>8.2f} {adv:>9} "
            f"{r['plain_step_s']:>9.3f} {r['peak_gib']:>9.2f} {r['peak_gib'] / plain['peak_gib']:>8.2f} "
            f"{dyn:>9.2f} {dyn / dyn_plain if dyn_plain > 0 else float('nan'):>8.2f}"
        )
    print(f"(time x plain: against the mean of all {len(plain_steps)} plain steps, {reference:.3f} s)")
    if device.type == "cuda":
        print(f"(CUDA max allocated per block of 8 steps; +held = above the {held:.2f} GiB held after warm-up)")
    else:
        print(
            "(CPU: peak RSS of a fresh process per setting over steps 1-8; +held = above the RSS before its first "
            "step (weights, batch), so it includes the optimizer states)"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2)
        )


if __name__ == "__main__":
    sys.exit(main())
