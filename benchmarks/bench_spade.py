"""SPADE / SDM-LoRA cost: parameter counts and UNet forward time, patched vs unpatched, side by side.

Builds a UNet with random weights (tiny, or SD 1.5's real shape from the config written out below), counts
the SPADE parameters for the given layout widths and the LoRA parameters at the given rank, then times the
forward pass of each variant interleaved in one run (variant order rotates every repeat; median and min
reported) and counts its conv/matmul GFLOPs on the meta device (a figure CPU contention cannot blur):

    base        the unpatched UNet (LoRA layers present but disabled)
    spade C_m   SPADE-patched, layout with C_m channels
    +lora       SPADE-patched (largest C_m) with LoRA enabled

Usage::

    python benchmarks/bench_spade.py --size tiny
    python benchmarks/bench_spade.py --size sd15 --resolution 32           # CPU: about 2 minutes on 2 cores
    python benchmarks/bench_spade.py --size sd15 --device cuda --dtype fp16  # 512² = latent 64
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time

import torch
from diffusers import UNet2DConditionModel

from layout2image.core.logging import get_logger
from layout2image.core.sdm_lora import SDMLoraConfig
from layout2image.core.spade import (
    SPADEAdapter,
    find_spade_sites,
    is_spade_patched,
    patch_unet,
    spade_layout,
    unpatch_unet,
)
from layout2image.testing import tiny_unet_config

logger = get_logger("benchmarks.bench_spade")

# Stable Diffusion 1.5's UNet (runwayml/stable-diffusion-v1-5, unet/config.json), written out: no download.
SD15_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD15_TEXT_TOKENS = 77

TINY_UNET_CONFIG = tiny_unet_config(layers_per_block=2)
TINY_TEXT_TOKENS = 8

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("tiny", "sd15"), default="tiny", help="UNet shape (random weights).")
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="Latent size (sd15 default 64 = 512² images; use 32 on a CPU; tiny default 16).",
    )
    parser.add_argument("--batch", type=int, default=2, help="UNet batch (e.g. 2 = one CFG pair).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device.")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="fp32 on CPU, fp16 on CUDA by default.")
    parser.add_argument(
        "--layout-channels",
        default="151,768",
        help="Comma-separated C_m values: N one-hot classes (ADE20K 151) and/or 768 (class-embedding layout).",
    )
    parser.add_argument("--hidden-channels", type=int, default=128, help="SPADE shared conv width.")
    parser.add_argument(
        "--kernel-size", type=int, default=3, help="γ/β conv kernel of the timed adapters (1 = budget variant)."
    )
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (attention q/k/v/out).")
    parser.add_argument(
        "--repeats", type=int, default=None, help="Timed forwards per variant, median reported (5; 3 for sd15 on CPU)."
    )
    parser.add_argument("--warmup", type=int, default=1, help="Untimed forwards per variant first.")
    args = parser.parse_args(argv)
    if args.resolution is None:
        args.resolution = 16 if args.size == "tiny" else 64
    if args.repeats is None:
        args.repeats = 3 if args.size == "sd15" and not str(args.device).startswith("cuda") else 5
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.dtype is None:
        args.dtype = "fp16" if str(args.device).startswith("cuda") else "fp32"
    args.layout_channels = [int(c) for c in str(args.layout_channels).split(",") if c.strip()]
    if not args.layout_channels or min(args.layout_channels) < 1:
        parser.error(f"--layout-channels must list positive ints, got {args.layout_channels}")
    if args.kernel_size < 1 or args.kernel_size % 2 == 0:
        parser.error(f"--kernel-size must be a positive odd int, got {args.kernel_size}")
    if args.resolution % 8 != 0:
        parser.error(f"--resolution must be a multiple of 8 (3 down-samplings), got {args.resolution}")
    if args.dtype == "fp16" and not str(args.device).startswith("cuda"):
        parser.error("--dtype fp16 is for CUDA; on CPU use fp32 (architecture.md) or bf16")
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _count(params) -> int:
    return sum(p.numel() for p in params)


def count_gflops(config: dict, tokens: int, args: argparse.Namespace) -> dict[str, float]:
    """Conv/matmul GFLOPs of one forward per variant, counted on the meta device (immune to CPU contention)."""
    from torch.utils.flop_counter import FlopCounterMode

    res, batch = args.resolution, args.batch
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config).eval()
        sample = torch.zeros(batch, 4, res, res)
        text = torch.zeros(batch, tokens, config["cross_attention_dim"])
    timestep = torch.zeros(batch, dtype=torch.long, device="meta")

    def flops() -> float:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            unet(sample, timestep, encoder_hidden_states=text)
        return counter.get_total_flops() / 1e9

    result = {"base": flops()}
    for c_m in args.layout_channels:
        with torch.device("meta"):
            adapter = SPADEAdapter.from_unet(unet, c_m, args.hidden_channels, kernel_size=args.kernel_size)
            layout = torch.zeros(batch, c_m, res, res)
        patch_unet(unet, adapter)
        with spade_layout(unet, layout):
            result[f"spade C_m={c_m}"] = flops()
        unpatch_unet(unet)
    return result


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    config = SD15_UNET_CONFIG if args.size == "sd15" else TINY_UNET_CONFIG
    tokens = SD15_TEXT_TOKENS if args.size == "sd15" else TINY_TEXT_TOKENS

    torch.manual_seed(0)
    start = time.perf_counter()
    unet = UNet2DConditionModel(**config).to(device=device).eval()
    if dtype != torch.float32:
        unet.to(dtype=dtype)
    build_s = time.perf_counter() - start
    sites = find_spade_sites(unet)

    # Parameter counts (SPADE on the meta device: no memory for widths we only count).
    rows: list[tuple[str, str]] = [("UNet parameters", f"{_count(unet.parameters()) / 1e6:.1f} M")]
    rows.append(("SPADE sites", str(len(sites))))
    for c_m in args.layout_channels:
        for kernel in (3, 1):
            with torch.device("meta"):
                counted = SPADEAdapter(
                    site_names=[s.name for s in sites],
                    feature_channels=[s.num_channels for s in sites],
                    layout_channels=c_m,
                    hidden_channels=args.hidden_channels,
                    kernel_size=kernel,
                )
            rows.append(
                (f"SPADE params C_m={c_m} γ/β {kernel}x{kernel}", f"{_count(counted.parameters()) / 1e6:.2f} M")
            )
    lora_config = SDMLoraConfig(layout_channels=max(args.layout_channels), rank=args.rank, lora_alpha=args.rank)
    unet.add_adapter(lora_config.to_lora_config())
    n_lora = _count(p for name, p in unet.named_parameters() if ".lora_" in name)
    rows.append((f"LoRA params r={args.rank} (to_q,k,v,out.0)", f"{n_lora / 1e6:.2f} M"))

    # Timing: one adapter per C_m (default init; the conv cost does not depend on the values).
    adapters = {
        c_m: SPADEAdapter.from_unet(unet, c_m, args.hidden_channels, kernel_size=args.kernel_size, dtype=dtype)
        for c_m in args.layout_channels
    }
    g = torch.Generator().manual_seed(1)
    res = args.resolution
    sample = torch.randn(args.batch, 4, res, res, generator=g).to(device, dtype)
    timestep = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
    text = torch.randn(args.batch, tokens, config["cross_attention_dim"], generator=g).to(device, dtype)
    # The layout at latent resolution (nearest-resized per site); a pixel-resolution 768-ch layout would
    # cost more memory than the UNet's activations and the same after the first resize.
    layouts = {c_m: torch.rand(args.batch, c_m, res, res, generator=g).to(device, dtype) for c_m in adapters}

    variants = ["base"] + [f"spade C_m={c_m}" for c_m in adapters] + [f"spade C_m={max(adapters)} +lora"]

    def forward(variant: str) -> float:
        if is_spade_patched(unet):
            unpatch_unet(unet)
        if variant.endswith("+lora"):
            unet.enable_adapters()
        else:
            unet.disable_adapters()
        _sync(device)
        if variant == "base":
            start = time.perf_counter()
            with torch.inference_mode():
                unet(sample, timestep, encoder_hidden_states=text)
        else:
            c_m = int(variant.split("=")[1].split()[0])
            patch_unet(unet, adapters[c_m])
            start = time.perf_counter()
            with torch.inference_mode(), spade_layout(unet, layouts[c_m]):
                unet(sample, timestep, encoder_hidden_states=text)
        _sync(device)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {v: [] for v in variants}
    peak: dict[str, float] = {}
    for v in variants:
        for _ in range(args.warmup):
            forward(v)
    for r in range(args.repeats):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for v in order:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times[v].append(forward(v))
            if device.type == "cuda":
                peak[v] = torch.cuda.max_memory_allocated(device) / 2**30

    header = (
        f"bench_spade: size={args.size} latent={res}x{res} batch={args.batch} device={device} dtype={args.dtype} "
        f"threads={torch.get_num_threads()} repeats={args.repeats} timed γ/β kernel={args.kernel_size} "
        f"(UNet built in {build_s:.1f}s)"
    )
    logger.info(header)
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        logger.info("  %s  %s", key.ljust(width), value)
    gflops = count_gflops(config, tokens, args)
    base_med, base_min = statistics.median(times["base"]), min(times["base"])
    logger.info("")
    columns = ("variant", "median ms", "ratio", "min ms", "ratio", "GFLOP", "ratio")
    logger.info("  %-26s %11s %7s %9s %7s %9s %7s%s", *columns, "  peak GiB" if peak else "")
    for v in variants:
        med, low = statistics.median(times[v]), min(times[v])
        flop = gflops.get(v)
        flop_cols = f"{flop:9.1f} {flop / gflops['base']:7.3f}" if flop is not None else f"{'-':>9} {'-':>7}"
        mem = f"  {peak[v]:8.2f}" if peak else ""
        logger.info(
            "  %-26s %11.1f %7.3f %9.1f %7.3f %s%s",
            v,
            med * 1e3,
            med / base_med,
            low * 1e3,
            low / base_min,
            flop_cols,
            mem,
        )


if __name__ == "__main__":
    main()
