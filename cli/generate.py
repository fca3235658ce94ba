"""``l2i-generate``: a synthetic dataset in our folder format from label maps, prompts and a layout adapter.

Examples::

    l2i-generate --base builtin:toy --adapter l2i_demo/run/export --input l2i_demo/data/val --out synth \\
        --domains day night snow fog --steps 20 --scheduler dpm-solver++
    l2i-generate --base v1-5-pruned-emaonly.safetensors --adapter aldm_ade20k.safetensors \\
        --input my_label_maps/ --label-set ade20k --prompt-file domains.txt --samples 4 --out synth_ade
    l2i-generate ... --filter-miou 0.5 --filter-action drop --segmenter builtin:toy   (keep images the segmenter reads)
    torchrun --standalone --nproc_per_node 2 -m layout2image.cli.generate ...   (same files as one process; or
    accelerate launch --multi_gpu --num_processes 2: with --cpu, accelerate 1.15 starts only one process)

The input is a dataset folder (``labels/`` + ``captions.jsonl``/``labelset.yaml``), a folder of label maps, or a
``.txt`` list of label-map files; layouts without a caption get one built from their classes. A rerun with the same
settings resumes (finished chunks are skipped); an ``--out`` holding another run is refused unless ``--overwrite``.
See `layout2image.pipelines.dataset` for the output format and docs/GENERATE.md.
"""

from __future__ import annotations

import argparse
import sys

from ._args import non_negative_int, positive_int, run_reporting_errors

# Equal to the keys of layout2image.core.sampling.SCHEDULERS (checked by the tests); any diffusers class name works too.
_SCHEDULERS = ("ddim", "dpm-solver++", "dpmsolver_multistep", "euler", "euler_a", "euler_ancestral", "unipc", "pndm")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="l2i-generate",
        description="Generate a synthetic dataset (images, the label maps they were drawn from, captions.jsonl, "
        "labelset.yaml, manifest.json) with a base model and a layout adapter.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(__doc__ or "").split("Examples::", 1)[-1].split("See `", 1)[0],
    )
    p.add_argument("--base", required=True, help="base model: a diffusers folder, an SD 1.x file, or builtin:toy")
    p.add_argument("--adapter", required=True, help="an export folder, a ControlNet file/folder or an SDM-LoRA file")
    p.add_argument("--input", required=True, help="dataset folder, folder of label maps, or .txt list of files")
    p.add_argument("--out", required=True, help="output dataset folder")
    p.add_argument("--label-set", help="label set for adapters without metadata (built-in name or YAML file)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--domains", nargs="+", metavar="WORD", help="domain words, e.g. night snow fog")
    group.add_argument("--prompt-file", help="one domain per line: 'name: template with {caption}' or a word")
    p.add_argument("--samples", type=positive_int, default=1, help="samples per layout and domain (default 1)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="base seed; item i gets seed + i (default 0)")
    p.add_argument("--steps", type=positive_int, default=25, help="sampler steps (default 25)")
    p.add_argument("--scheduler", default="ddim", help=f"{', '.join(_SCHEDULERS)} or a diffusers class name")
    p.add_argument("--guidance", type=float, default=7.5, help="text guidance scale (default 7.5; <= 1 off)")
    p.add_argument("--layout-guidance", type=float, default=1.0, help="layout guidance scale (default 1 = off)")
    p.add_argument("--control-scale", type=float, default=1.0, help="ControlNet residual scale (default 1)")
    p.add_argument("--negative-prompt", default="", help="negative prompt (default empty)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0)")
    p.add_argument("--chunk-size", type=positive_int, default=4, help="images per work chunk and batch (default 4)")
    p.add_argument("--limit", type=positive_int, help="only the first N layouts (sorted by name)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: accelerate's device)")
    p.add_argument("--dtype", default="auto", help="frozen weights: auto, fp32, fp16, bf16 (half on CUDA only)")
    p.add_argument("--threads", type=non_negative_int, default=0, help="torch CPU threads (0 keeps torch's)")
    p.add_argument("--overwrite", action="store_true", help="replace another run's output in --out")
    p.add_argument(
        "--filter-miou",
        type=_unit_float,
        metavar="T",
        help="score each image's layout mIoU with --segmenter; flag or drop those under T (0..1)",
    )
    p.add_argument(
        "--filter-action",
        choices=("flag", "drop"),
        default="flag",
        help="images under --filter-miou: flag keeps and marks them, drop writes no image/label/caption (default flag)",
    )
    p.add_argument(
        "--segmenter",
        help="segmenter scoring the images: builtin:toy or a local transformers folder whose id2label names the label "
        "set's classes (default builtin:toy with --filter-miou; alone, it records scores without filtering)",
    )
    return p


def _unit_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected an mIoU threshold in [0, 1], got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    return run_reporting_errors("l2i-generate", lambda: _generate(args))


def _generate(args: argparse.Namespace) -> int:
    import torch
    from accelerate import PartialState

    from ..core.logging import get_logger
    from ..core.sampling import make_scheduler
    from ..pipelines import LayoutPipeline
    from ..pipelines.dataset import (
        GenerateSettings,
        domain_templates,
        generate_dataset,
        precheck_output_folder,
        read_prompt_file,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    state = PartialState(cpu=args.device == "cpu")
    device = args.device or str(state.device)
    domains = read_prompt_file(args.prompt_file) if args.prompt_file else domain_templates(args.domains or [])
    settings = GenerateSettings(
        steps=args.steps,
        scheduler=args.scheduler,
        guidance_scale=args.guidance,
        layout_guidance_scale=args.layout_guidance,
        controlnet_conditioning_scale=args.control_scale,
        negative_prompt=args.negative_prompt,
        eta=args.eta,
        seed=args.seed,
        samples=args.samples,
        chunk_size=args.chunk_size,
        domains=domains,
        device=torch.device(device).type,
        filter_miou=args.filter_miou,
        filter_action=args.filter_action,
    )
    make_scheduler(args.scheduler, {})  # a bad name fails before any model is loaded
    if state.is_main_process:
        precheck_output_folder(args.out, settings, overwrite=args.overwrite)
    segmenter = None
    if args.segmenter or args.filter_miou is not None:  # a bad folder fails before the base model is loaded
        from ..core.segmenters import load_segmenter

        segmenter = load_segmenter(args.segmenter or "builtin:toy", what="--segmenter")
    pipe = LayoutPipeline.from_pretrained(
        args.base,
        args.adapter,
        label_set=args.label_set,
        device=device,
        torch_dtype=args.dtype,
        scheduler=args.scheduler,
    )
    try:
        result = generate_dataset(
            pipe,
            args.input,
            args.out,
            settings,
            overwrite=args.overwrite,
            limit=args.limit,
            process_index=state.process_index,
            num_processes=state.num_processes,
            barrier=state.wait_for_everyone if state.num_processes > 1 else None,
            progress=True,
            segmenter=segmenter,
        )
    except KeyboardInterrupt:
        raise KeyboardInterrupt(
            f"the finished chunks in {args.out} are kept; rerun the same command to go on from there"
        ) from None
    if state.is_main_process:
        log = get_logger("layout2image.cli.generate")
        msg = (
            f"{result.out}: {result.written} images generated in {result.seconds:.1f} s "
            f"({result.images_per_second:.2f} images/s on process 0 of {state.num_processes}), "
            f"{result.skipped} already done; {'complete' if result.complete else 'NOT complete'}"
        )
        if result.complete and args.filter_miou is not None:
            msg += f"; mIoU < {args.filter_miou}: {result.dropped} dropped, {result.flagged} flagged"
        log.info(msg)
        print(msg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
