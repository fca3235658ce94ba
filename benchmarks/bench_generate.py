"""l2i-generate throughput with 1 and 2 processes, side by side, on toy-world layouts (CPU).

Runs the real CLI (``python -m layout2image.cli.generate``) as subprocesses: once as one process, once under
``torchrun --standalone --nproc_per_node 2`` (gloo on CPU; what ``accelerate launch --multi_gpu --num_processes 2``
starts on a machine without GPUs). Both runs get ``--threads 1`` (and ``OMP_NUM_THREADS=1``), the same layouts,
domains, seed, steps and chunk size, each into its own folder. Reported per process count: the wall time of the
whole command (start-up and model loading included; the min over ``--repeats``), images/s over that wall time,
the speed-up against 1 process, process 0's own sampling figure as the CLI prints it (its share of the images, model
loading excluded) with the sampling speed-up it implies, and whether the output folders are byte-identical to the
1-process one (they should be: work is cut into fixed chunks with per-item seeds).

The adapter is ``--adapter PATH`` (e.g. ``l2i_demo/run/export`` from a short ``l2i-demo`` run) or, by default, a
fresh one-hot ControlNet built from the toy UNet with random init: sampling speed does not depend on what the
weights learned, only on the network's shape, so an untrained ControlNet times the same as a trained one.
Layouts are held-out toy label maps written by ``l2i-toy`` (indices from 1,000,000, outside the demo's splits).

Usage::

    python benchmarks/bench_generate.py                                   # 8 layouts x 2 domains x 10 steps
    python benchmarks/bench_generate.py --num-layouts 16 --domains day night snow fog --steps 20 --repeats 2
    python benchmarks/bench_generate.py --adapter l2i_demo/run/export --work bench_gen   # keep the folders
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROCESS_COUNTS = (1, 2)
HELDOUT_START = 1_000_000  # l2i-toy index of the first layout: disjoint from the demo's train/val indices
SAMPLING_RE = re.compile(r"(\d+) images generated in ([0-9.]+) s \(([0-9.]+) images/s on process 0")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", type=Path, default=None, help="adapter (default: a fresh random toy ControlNet)")
    parser.add_argument("--num-layouts", type=int, default=8, help="held-out toy layouts (default 8)")
    parser.add_argument("--domains", nargs="+", default=["day", "night"], help="domain words (default: day night)")
    parser.add_argument("--steps", type=int, default=10, help="sampler steps (default 10)")
    parser.add_argument("--scheduler", default="dpm-solver++", help="sampler (default dpm-solver++)")
    parser.add_argument("--chunk-size", type=int, default=4, help="images per chunk and batch (default 4)")
    parser.add_argument("--size", type=int, default=128, help="layout size in pixels (default 128)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per process count; the min is reported")
    parser.add_argument("--work", type=Path, default=None, help="a new or empty folder to keep (default: a temp dir)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per l2i-generate run")
    args = parser.parse_args(argv)
    for name in ("num_layouts", "steps", "chunk_size", "repeats", "timeout"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.size < 16 or args.size % 8:
        parser.error(f"--size must be a multiple of 8, at least 16, got {args.size}")
    if args.adapter is not None and not args.adapter.exists():
        parser.error(f"--adapter {args.adapter} does not exist")
    if args.work is not None and args.work.exists() and (not args.work.is_dir() or any(args.work.iterdir())):
        parser.error(f"--work {args.work} is not an empty folder; give a new or empty one (nothing is overwritten)")
    return args


def load() -> str:
    """The 1/5/15-minute load averages, as `uptime` shows them."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} (1/5/15 min, {os.cpu_count()} CPUs)"


def build_random_toy_controlnet(path: Path) -> Path:
    """A one-hot ControlNet on the toy UNet's shape, random init (timing only), saved with toy-label-set metadata."""
    import torch
    from diffusers import UNet2DConditionModel

    from layout2image.core.controlnet import build_controlnet
    from layout2image.core.labels import get_label_set
    from layout2image.trainer.models import TOY_WEIGHTS_DIR
    from layout2image.weights import WeightsMetadata, save_controlnet

    labels = get_label_set("toy")
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(TOY_WEIGHTS_DIR / "unet")
    control = build_controlnet(unet, "onehot", num_classes=labels.num_classes)
    md = WeightsMetadata(kind="controlnet", hint_encoding="onehot", label_set=labels, base_model="toy")
    return Path(save_controlnet(control, path, metadata=md))


def _run(cmd: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if run.returncode != 0:
        sys.exit(f"bench_generate: command failed ({run.returncode}): {' '.join(cmd)}\n{run.stderr[-3000:]}")
    return run


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"load at start: {load()}", flush=True)
    temp = args.work is None
    work = Path(tempfile.mkdtemp(prefix="bench_generate_")) if temp else args.work
    work.mkdir(parents=True, exist_ok=True)
    try:
        layouts = work / "layouts"
        toy = [sys.executable, "-m", "layout2image.cli.toy", "--out", str(layouts), "--num", str(args.num_layouts)]
        toy += ["--size", str(args.size), "--start", str(HELDOUT_START), "--preview-rows", "0", "--quiet"]
        _run(toy, args.timeout)
        if args.adapter is not None:
            adapter, adapter_note = args.adapter, str(args.adapter)
        else:
            adapter = build_random_toy_controlnet(work / "random_toy_controlnet.safetensors")
            adapter_note = "fresh one-hot toy ControlNet, random init (speed does not depend on training)"
        images = args.num_layouts * len(args.domains)
        common = ["--base", "builtin:toy", "--adapter", str(adapter), "--input", str(layouts)]
        common += ["--domains", *args.domains, "--steps", str(args.steps), "--scheduler", args.scheduler]
        common += ["--chunk-size", str(args.chunk_size), "--threads", "1", "--device", "cpu"]
        print(
            f"adapter: {adapter_note}\n{args.num_layouts} layouts ({args.size}²) x {len(args.domains)} domains = "
            f"{images} images, {args.steps} {args.scheduler} steps, chunks of {args.chunk_size}, --threads 1 per "
            f"process, {args.repeats} repeat(s)",
            flush=True,
        )
        walls: dict[int, list[float]] = {p: [] for p in PROCESS_COUNTS}
        sampling: dict[int, tuple[int, float, float]] = {}  # images, seconds, images/s of process 0's best run
        outputs: dict[int, list[Path]] = {p: [] for p in PROCESS_COUNTS}
        for repeat in range(args.repeats):
            # Alternate the order so neither process count always runs first (warm caches, load drifting).
            for procs in PROCESS_COUNTS if repeat % 2 == 0 else PROCESS_COUNTS[::-1]:
                out = work / f"out_p{procs}_r{repeat}"
                launcher = [sys.executable, "-m", "layout2image.cli.generate"]
                if procs > 1:
                    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
                    launcher += ["--nproc_per_node", str(procs), "-m", "layout2image.cli.generate"]
                start = time.perf_counter()
                run = _run([*launcher, *common, "--out", str(out)], args.timeout)
                wall = time.perf_counter() - start
                walls[procs].append(wall)
                outputs[procs].append(out)
                match = SAMPLING_RE.search(run.stdout)
                if match and wall == min(walls[procs]):
                    sampling[procs] = (int(match.group(1)), float(match.group(2)), float(match.group(3)))
                print(f"  run {repeat + 1}/{args.repeats}, {procs} process(es): {wall:.1f} s", flush=True)
        reference = _files(outputs[1][0])
        if not reference:
            sys.exit(f"bench_generate: the 1-process run wrote nothing into {outputs[1][0]}")
        print()
        print(
            "| processes | wall time (min) | images/s | speed-up vs 1 | process 0's sampling | sampling speed-up "
            "| same bytes as 1 |"
        )
        print("|---|---:|---:|---:|---|---:|---|")
        base = min(walls[1])
        for procs in PROCESS_COUNTS:
            best = min(walls[procs])
            same = all(_files(out) == reference for out in outputs[procs])
            if procs in sampling and 1 in sampling:
                n, seconds, rate = sampling[procs]
                # Process 0 samples its share while the others sample theirs: its time is the run's sampling time.
                own = f"{n} images in {seconds:.1f} s ({rate:.2f}/s)"
                speed = f"{sampling[1][1] / seconds:.2f}x"
            else:
                own, speed = "not printed", "-"
            print(
                f"| {procs} x 1 thread | {best:.1f} s | {images / best:.3f} | {base / best:.2f}x | {own} | {speed} "
                f"| {'yes' if same else 'NO'} ({len(reference)} files) |"
            )
    finally:
        if temp:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nload at end: {load()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
