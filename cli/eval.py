"""``l2i-eval``: score a dataset of (generated) images against the label maps they were drawn from.

Writes ``eval.json`` and a readable ``eval.md`` into the dataset folder (or ``--out``):

- layout alignment: mIoU, pixel accuracy and per-class IoU of a segmenter on the images, overall and per domain
  (domains from ``manifest.json``, else ``captions.jsonl``);
- with ``--reference DIR``: a Fréchet distance on the segmenter's pooled encoder features against the reference
  images, overall and per domain. It is not Inception FID and is never called FID.

Examples::

    l2i-eval data/generated                                  # toy world: builtin:toy segmenter
    l2i-eval data/generated --reference data/toy_real        # + Fréchet distance on toy segmenter features
    l2i-eval data/generated --segmenter models/segformer-b0-ade --label-set ade20k --out reports/run1
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

from ._args import positive_int, run_reporting_errors

PROG = "l2i-eval"
EVAL_JSON, EVAL_MD = "eval.json", "eval.md"

#: What l2i-eval does not compute yet, written into eval.json so a reader sees it was not measured (not zero).
NOT_COMPUTED = {
    "inception_fid": "not implemented in l2i-eval yet (needs torch-fidelity's Inception, which needs torchvision)",
    "kid": "not implemented in l2i-eval yet",
    "lpips_diversity": "not implemented in l2i-eval yet (LPIPS needs torchvision)",
    "clip_score": "not implemented in l2i-eval yet; the toy world has no CLIP image tower, so it has none",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Score a folder-format dataset (images/, labels/, labelset.yaml; domains from manifest.json\n"
        "or captions.jsonl): layout mIoU of a segmenter per class and per domain, and optionally a Fréchet\n"
        "distance on the segmenter's features against a reference folder. Writes eval.json and eval.md.",
        epilog=__doc__.split("Examples::", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dataset", help="dataset folder: images/<stem>.png, labels/<stem>.png, labelset.yaml")
    parser.add_argument(
        "--segmenter",
        default="builtin:toy",
        help="evaluation segmenter: a local transformers SegFormer/UperNet folder whose id2label names the label "
        "set's classes, or builtin:toy (default). Never use the discriminator or its initialisation.",
    )
    parser.add_argument(
        "--label-set", default=None, help="label set (built-in name or file); default: the dataset's labelset.yaml"
    )
    parser.add_argument(
        "--input-norm",
        choices=("auto", "imagenet", "half"),
        default="auto",
        help="pixel normalisation of the segmenter: auto reads its preprocessor_config.json (default)",
    )
    parser.add_argument(
        "--reference",
        default=None,
        metavar="DIR",
        help="reference images (a folder of images, or a dataset folder's images/) for the Fréchet distance on "
        "segmenter features; left out: no distance",
    )
    parser.add_argument(
        "--feature-size",
        type=positive_int,
        default=None,
        metavar="PX",
        help="resize images to PX² before the encoder for the distance (default: the segmenter's processor size)",
    )
    parser.add_argument("--out", default=None, help="folder for eval.json and eval.md (default: the dataset folder)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing eval.json / eval.md")
    parser.add_argument("--quiet", action="store_true", help="no progress bars, no summary on stdout")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``l2i-eval``; returns the exit code (2 for bad input, with a one-line message)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_reporting_errors(PROG, lambda: _run(args))


def _fmt(value) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def render_markdown(report: dict) -> str:
    """The readable twin of eval.json: summary, per-domain table, per-class IoU table."""
    layout = report["layout"]
    lines = [
        f"# Evaluation of `{report['dataset']}`",
        "",
        f"{report['num_images']} images, label set `{report['label_set']}`, segmenter `{report['segmenter']}`.",
        "",
        "## Layout alignment (segmenter mIoU against the label maps)",
        "",
    ]
    frechet = report.get("frechet_distance")
    head = "| domain | images | mIoU | pixel accuracy |"
    rule = "|---|---:|---:|---:|"
    if frechet:
        head += " Fréchet distance (segmenter features) |"
        rule += "---:|"
    lines += [head, rule]
    groups = [("all", layout["overall"], report["num_images"])]
    groups += [(d, s, layout["counts"][d]) for d, s in layout["per_domain"].items()]
    for name, scores, count in groups:
        row = f"| {name} | {count} | {_fmt(scores['miou'])} | {_fmt(scores['pixel_accuracy'])} |"
        if frechet:
            value = frechet["values"].get(name)
            ref = frechet["reference_images"].get(name, {})
            row += f" {_fmt(value)} (vs {ref.get('domain', 'all')}, {ref.get('num', 0)}) |"
        lines.append(row)
    lines += ["", "Per-class IoU (— : class in neither the maps nor the predictions):", ""]
    domains = list(layout["per_domain"])
    lines.append("| class | all | " + " | ".join(domains) + " |")
    lines.append("|---|---:|" + "---:|" * len(domains))
    for name in layout["overall"]["per_class_iou"]:
        cells = [_fmt(layout["overall"]["per_class_iou"][name])]
        cells += [_fmt(layout["per_domain"][d]["per_class_iou"][name]) for d in domains]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if frechet:
        lines += [
            "",
            f"## {frechet['name']}",
            "",
            f"Against `{frechet['reference']}` ({frechet['num_reference']} images); {frechet['features']}. "
            "Each domain is compared with the reference images of the same domain when the reference names at "
            "least 2 (its manifest.json or captions.jsonl), else with all of them; the table says which (vs "
            "domain, images). Comparable only with distances from the same segmenter and size; not Inception FID.",
        ]
    lines += ["", "## Not computed", ""]
    lines += [f"- {key}: {why}" for key, why in report["not_computed"].items()]
    return "\n".join(lines) + "\n"


def _frechet_report(args, samples, domains, groups_seen, reference, ref_domains, segmenter) -> dict:
    """The distance of all images and of each domain; a domain is compared with the reference images of the same
    domain when the reference folder names at least 2 of them (its manifest.json or captions.jsonl), else with all
    reference images."""
    from ..core.evaluation import (
        FRECHET_NAME,
        NO_DOMAIN,
        TOY_FRECHET_NAME,
        segmenter_frechet_distance,
    )

    size = (args.feature_size, args.feature_size) if args.feature_size else None
    # (generated group -> files) per reference set, so each reference set's features are computed once
    plan: dict[str, dict[str, list]] = {"all": {"all": [f[1] for f in samples]}}
    against: dict[str, str] = {"all": "all"}
    for domain in groups_seen:
        files = [f[1] for f in samples if domains.get(f[0], NO_DOMAIN) == domain]
        same = [p for p in reference if ref_domains.get(p.stem) == domain]
        key = domain if domain != NO_DOMAIN and len(same) >= 2 else "all"
        plan.setdefault(key, {})[domain] = files
        against[domain] = key
    results, counts = {}, {}
    for key, groups in plan.items():
        ref = reference if key == "all" else [p for p in reference if ref_domains.get(p.stem) == key]
        results.update(segmenter_frechet_distance(groups, ref, segmenter, size, progress=not args.quiet))
        counts[key] = len(ref)
    first = next((r for r in results.values() if r is not None), None)
    return {
        "name": TOY_FRECHET_NAME if args.segmenter == "builtin:toy" else FRECHET_NAME,
        "reference": str(args.reference),
        "num_reference": len(reference),
        "features": (
            f"segmenter {args.segmenter} encoder, every stage averaged over space, "
            f"{first.num_features} dims, images resized to {first.size[0]}x{first.size[1]}"
            if first
            else "no group had 2 images"
        ),
        "values": {g: (None if results[g] is None else results[g].value) for g in ["all", *groups_seen]},
        "reference_images": {g: {"domain": against[g], "num": counts[against[g]]} for g in ["all", *groups_seen]},
    }


def _run(args: argparse.Namespace) -> int:
    from ..core.evaluation import layout_alignment, list_images, read_domains, scores_dict
    from ..core.files import atomic_write_text
    from ..core.labels import load_label_set
    from ..core.segmenters import class_rows, load_segmenter
    from ..trainer.data.folder import find_label_set_file, list_folder

    if args.quiet:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # its "Loading weights" bar
    start = time.perf_counter()
    root = Path(args.dataset)
    out = Path(args.out) if args.out else root
    existing = [str(out / name) for name in (EVAL_JSON, EVAL_MD) if (out / name).exists()]
    if existing and not args.overwrite:
        raise FileExistsError(
            f"{existing[0]!r} already exists (an earlier evaluation); pass --overwrite to replace it, or --out "
            "another folder"
        )
    # Check everything cheap before the long passes: files pair up, the label set, the segmenter and its classes.
    samples = [(f.stem, f.image, f.label) for f in list_folder(root)]
    if args.label_set is not None:
        label_set = load_label_set(args.label_set)
    else:
        found = find_label_set_file(root)
        if found is None:
            raise ValueError(f"dataset folder {str(root)!r} has no labelset.yaml; pass --label-set")
        label_set = load_label_set(found)
    segmenter = load_segmenter(args.segmenter, args.input_norm, what="--segmenter")
    class_rows(segmenter, label_set, args.segmenter)
    reference = list_images(args.reference) if args.reference else None
    ref_domains = read_domains(args.reference) if args.reference else {}
    domains = read_domains(root)

    progress = not args.quiet
    layout = layout_alignment(samples, segmenter, label_set, domains, progress=progress)
    report: dict = {
        "dataset": str(root),
        "num_images": layout.num_images,
        "label_set": label_set.name,
        "segmenter": args.segmenter,
        "input_norm": {"mean": list(segmenter.input_norm.mean), "std": list(segmenter.input_norm.std)},
        "layout": {
            "overall": scores_dict(layout.overall, label_set),
            "per_domain": {d: scores_dict(s, label_set) for d, s in layout.per_domain.items()},
            "counts": layout.counts,
        },
    }
    if reference is not None:
        report["frechet_distance"] = _frechet_report(
            args, samples, domains, layout.per_domain, reference, ref_domains, segmenter
        )
    report["not_computed"] = NOT_COMPUTED
    report["seconds"] = round(time.perf_counter() - start, 2)
    # eval.md first, eval.json last: eval.json's presence marks a finished evaluation (what --overwrite guards).
    atomic_write_text(out / EVAL_MD, render_markdown(report))
    atomic_write_text(out / EVAL_JSON, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    if not args.quiet:
        print(render_markdown(report).split("Per-class IoU")[0].rstrip())
        print(f"\nwrote {out / EVAL_JSON} and {out / EVAL_MD} in {report['seconds']:.1f} s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
