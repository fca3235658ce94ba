"""``l2i-convert``: inspect weight files, convert ControlNets and LoRAs, import the official ALDM and SDM releases.

Examples::

    l2i-convert inspect my_controlnet.safetensors
    l2i-convert controlnet --to ldm my_controlnet/ my_controlnet_ldm.safetensors --half
    l2i-convert controlnet --to diffusers-folder control_v11p_sd15_seg.pth my_folder/
    l2i-convert import-aldm ade20k_step9.ckpt aldm_ade20k.safetensors --label-set ade20k \\
        --class-embeddings ade20k_class_embeddings.pth --null-embedding null_embedding.pth
    l2i-convert lora --to kohya pytorch_lora_weights.safetensors my_lora.safetensors --alpha 32
    l2i-convert sdm ade20k_ema_0.9999_best.pt sdm_ade20k.safetensors --dtype fp16
    l2i-convert sdm --to pt sdm_ade20k.safetensors sdm_ade20k.pt

Targets of ``controlnet --to``: ``diffusers`` (one diffusers-layout safetensors: ComfyUI, Forge, diffusers
``from_single_file``), ``diffusers-folder`` (``config.json`` + weights: ``from_pretrained``), ``ldm`` (the original
``control_model.*`` layout: every UI). ALDM-native ControlNets convert too but load only in layout2image.

Targets of ``lora --to``: ``kohya`` (``lora_unet_<module path>.lora_down/lora_up/alpha``: ComfyUI "Load LoRA",
A1111/Forge ``<lora:...>``, diffusers ``load_lora_weights``) and ``peft`` (``unet.<diffusers path>.lora_A/lora_B``
with diffusers' ``lora_adapter_metadata``). A PEFT input needs its ``lora_alpha``: from ``--alpha``, else the file's
metadata. The UNet layout is ``--unet-config``, else the file's ``l2i.unet_config``, else SD 1.5. A SPADE companion
(``*.spade.safetensors``) is not a LoRA and is never converted; copy it next to the output. ``--kohya-names`` picks
the kohya module names: ``auto`` (default) writes diffusers names (``lora_unet_down_blocks_0_...``, as kohya's
sd-scripts does) for SD 1.x/2.x-shaped UNets, which ComfyUI, A1111 and diffusers all read, and ldm names
(``lora_unet_input_blocks_1_...``) for other layouts, where A1111's diffusers-name arithmetic is wrong and diffusers
needs ``load_lora_weights(..., unet_config=...)``; ``diffusers``/``ldm`` force one.

``sdm`` converts a pixel-space SDM UNet between the official ``.pt`` state dict (what the released checkpoints and
the official code use) and our ``.safetensors`` with metadata, in the direction the input's container implies
(``--to`` forces one). The label set defaults to the official dataset whose label-channel count the file has
(ADE20K 151, CelebAMask-HQ 20, COCO-Stuff 184, Cityscapes 36).

Exit codes: 0 success, 1 the input is unreadable, unsafe or of an unknown format (the message says which and
lists the known formats), 2 bad arguments or another bad input (e.g. an output that cannot be written).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._args import run_reporting_errors

# torch, diffusers and the weights package are imported when a command runs, so `--help` answers at once.
# Equal to layout2image.weights._TARGETS (checked by the tests).
_TARGETS = ("diffusers", "diffusers-folder", "ldm")
# Equal to layout2image.weights.LORA_FORMATS (checked by the tests).
_LORA_TARGETS = ("kohya", "peft")
# Equal to layout2image.weights.lora.KOHYA_NAMES (checked by the tests).
_KOHYA_NAMES = ("auto", "diffusers", "ldm")
_DTYPES = ("fp16", "fp32", "keep")
# Equal to layout2image.weights.SDM_TARGETS (checked by the tests).
_SDM_TARGETS = ("pt", "safetensors")


def _dtype(args):
    import torch

    name = "fp16" if args.half else args.dtype
    return {"keep": None, "fp16": torch.float16, "fp32": torch.float32}[name]


def _check_output(parser: argparse.ArgumentParser, args, source: Path, output: Path) -> None:
    if output.resolve() == source.resolve():
        parser.error(f"OUT {str(output)!r} is the input file; write to another path")
    if output.exists() and not args.overwrite:
        parser.error(f"OUT {str(output)!r} exists; pass --overwrite to replace it")
    if args.half and args.dtype != "keep":
        parser.error("--half and --dtype both set the precision; pass only one")


def cmd_inspect(args) -> int:
    from ..weights import inspect_weights

    print(inspect_weights(args.file).to_text())
    return 0


def cmd_controlnet(args) -> int:
    from ..weights import convert_controlnet_file

    written = convert_controlnet_file(args.input, args.output, to=args.to, dtype=_dtype(args))
    print(f"wrote {written} ({args.to})")
    return 0


def cmd_import_aldm(args) -> int:
    from ..weights import import_aldm_checkpoint

    result = import_aldm_checkpoint(
        args.checkpoint,
        args.output,
        label_set=args.label_set,
        class_embeddings=args.class_embeddings,
        null_embedding=args.null_embedding,
        table_output=args.table_out,
        base_model=args.base_model,
        to=args.layout,
        dtype=_dtype(args),
    )
    print(f"wrote {result.controlnet_path} (ALDM-native ControlNet, {result.num_tensors} tensors)")
    print(f"wrote {result.table_path} (class-embedding table)")
    return 0


def _read_unet_config(path: Path) -> dict:
    import json

    from ..weights import WeightsFileError

    file = path / "config.json" if path.is_dir() else path
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsFileError(f"--unet-config {str(path)!r}: cannot read a UNet config.json ({e})") from None
    if not isinstance(config, dict) or "down_block_types" not in config:
        raise WeightsFileError(f"--unet-config {str(file)!r} is not a diffusers UNet config (no down_block_types)")
    return config


def cmd_lora(args) -> int:
    from ..weights import convert_lora_file

    config = _read_unet_config(args.unet_config) if args.unet_config is not None else None
    conv = convert_lora_file(
        args.input,
        args.output,
        to=args.to,
        unet_config=config,
        alpha=args.alpha,
        dtype=_dtype(args),
        kohya_names=args.kohya_names,
    )
    ranks = "/".join(str(r) for r in sorted(set(conv.ranks.values())))
    alphas = "/".join(f"{a:g}" for a in sorted(set(conv.alphas.values()))) or "unknown"
    names = f", {conv.kohya_names} module names" if conv.kohya_names else ""
    print(f"wrote {args.output} ({args.to}, {len(conv.modules)} modules, rank {ranks}, alpha {alphas}{names})")
    return 0


def cmd_sdm(args) -> int:
    from ..core.labels import load_label_set
    from ..core.sdm import SDMConditionSpec
    from ..weights import convert_sdm_file

    label_set = load_label_set(args.label_set) if args.label_set is not None else None
    condition = None
    if label_set is not None and (args.edges or args.unknown_channel):
        condition = SDMConditionSpec(label_set.num_classes, unknown_channel=args.unknown_channel, edges=args.edges)
    conv = convert_sdm_file(
        args.input,
        args.output,
        to=args.to,
        label_set=label_set,
        condition=condition,
        dtype=_dtype(args),
        image_size=args.image_size,
        num_head_channels=args.num_head_channels,
    )
    labels = conv.label_set.name if conv.label_set is not None else "not recorded"
    print(
        f"wrote {conv.path} (SDM UNet, {conv.to}, {conv.num_tensors} tensors, {conv.num_parameters:,} parameters, "
        f"C_y {conv.config.label_channels}, label set {labels})"
    )
    return 0


def _add_precision(p: argparse.ArgumentParser) -> None:
    p.add_argument("--half", action="store_true", help="write float16 tensors (same as --dtype fp16)")
    p.add_argument("--dtype", choices=_DTYPES, default="keep", help="tensor precision (default: keep)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="l2i-convert",
        description="Inspect and convert layout2image weight files.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit codes: 0 ok, 1 bad or unknown input file, 2 bad arguments.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="say what a weight file or diffusers folder is and what loads it")
    p.add_argument("file", type=Path, help="a .safetensors/.ckpt/.pt/.pth file or a diffusers folder")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("controlnet", help="convert a ControlNet between the diffusers and ldm layouts")
    p.add_argument("--to", required=True, choices=_TARGETS, help="output layout")
    p.add_argument("input", type=Path, help="ControlNet file (any known layout) or diffusers folder")
    p.add_argument("output", type=Path, help="output file (a folder for --to diffusers-folder)")
    _add_precision(p)
    p.set_defaults(func=cmd_controlnet)

    p = sub.add_parser("import-aldm", help="import an official ALDM .ckpt and its class-embedding files")
    p.add_argument("checkpoint", type=Path, help="the official Lightning .ckpt (read through a memory map)")
    p.add_argument("output", type=Path, help="the ALDM-native ControlNet file to write")
    p.add_argument("--label-set", required=True, help="built-in label set name or a label-set YAML/JSON file")
    p.add_argument("--class-embeddings", required=True, type=Path, help="official (N, D) class-embedding .pth")
    p.add_argument("--null-embedding", required=True, type=Path, help="official (1, D) null-embedding .pth")
    p.add_argument("--table-out", type=Path, help="where the table goes (default: OUT with .table.safetensors)")
    p.add_argument("--base-model", default="runwayml/stable-diffusion-v1-5", help="recorded in the metadata")
    p.add_argument("--layout", choices=_TARGETS, default="diffusers", help="ControlNet key layout")
    _add_precision(p)
    p.set_defaults(func=cmd_import_aldm)

    p = sub.add_parser("lora", help="convert a UNet LoRA between the PEFT/diffusers and kohya namings")
    p.add_argument("--to", required=True, choices=_LORA_TARGETS, help="output naming")
    p.add_argument("input", type=Path, help="LoRA .safetensors (kohya or PEFT naming)")
    p.add_argument("output", type=Path, help="output .safetensors")
    p.add_argument("--alpha", type=float, help="lora_alpha of a PEFT input (default: from the file's metadata)")
    p.add_argument("--unet-config", type=Path, help="base UNet config.json or diffusers UNet folder (default: SD 1.5)")
    p.add_argument(
        "--kohya-names",
        choices=_KOHYA_NAMES,
        default="auto",
        help="module names of a kohya output: diffusers (lora_unet_down_blocks_0_...) or ldm "
        "(lora_unet_input_blocks_1_...); auto (default): diffusers for SD 1.x/2.x-shaped UNets, ldm otherwise",
    )
    _add_precision(p)
    p.set_defaults(func=cmd_lora)

    p = sub.add_parser("sdm", help="convert a pixel-space SDM UNet between the official .pt and safetensors")
    p.add_argument("input", type=Path, help="official SDM .pt state dict, or an SDM .safetensors of ours")
    p.add_argument("output", type=Path, help="output file")
    p.add_argument("--to", choices=_SDM_TARGETS, help="output container (default: the other one than the input's)")
    p.add_argument(
        "--label-set", help="built-in label set name or YAML/JSON file (default: the official set fitting C_y)"
    )
    p.add_argument("--edges", action="store_true", help="with --label-set: y has an instance-edge channel last")
    p.add_argument(
        "--unknown-channel", action="store_true", help="with --label-set: ignore pixels get their own y channel"
    )
    p.add_argument("--image-size", type=int, help="training image size of a .pt (default 256; sets no shape)")
    p.add_argument("--num-head-channels", type=int, help="attention head width of a .pt (default 64; sets no shape)")
    _add_precision(p)
    p.set_defaults(func=cmd_sdm)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "controlnet":
        _check_output(parser, args, args.input, args.output)
    elif args.command == "import-aldm":
        _check_output(parser, args, args.checkpoint, args.output)
    elif args.command == "lora":
        _check_output(parser, args, args.input, args.output)
        if args.alpha is not None and not args.alpha > 0:
            parser.error(f"--alpha {args.alpha}: must be a positive number")
        if args.kohya_names != "auto" and args.to != "kohya":
            parser.error(f"--kohya-names {args.kohya_names}: only with --to kohya (PEFT keys use diffusers names)")
    elif args.command == "sdm":
        _check_output(parser, args, args.input, args.output)
        if (args.edges or args.unknown_channel) and args.label_set is None:
            parser.error("--edges and --unknown-channel describe a --label-set; pass one")
        for flag, value in (("--image-size", args.image_size), ("--num-head-channels", args.num_head_channels)):
            if value is not None and value < 1:
                parser.error(f"{flag} {value}: must be a positive integer")
    from ..core.errors import LabelSetError
    from ..weights import WeightsError

    def command() -> int:
        try:
            return args.func(args)
        except (WeightsError, LabelSetError) as e:  # the input file is unreadable, unsafe or unknown: exit 1
            print(f"l2i-convert: error: {e}", file=sys.stderr)
            return 1

    # any other bad input (an unwritable output, a missing --unet-config, ...): one line, exit 2
    return run_reporting_errors("l2i-convert", command)


if __name__ == "__main__":
    sys.exit(main())
