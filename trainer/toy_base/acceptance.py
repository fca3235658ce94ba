"""The acceptance record of a toy base run: the machine it ran on and the figures as Markdown (README.md, docs)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

from ...core.toy import DOMAINS

__all__ = ["acceptance_markdown"]


def _machine() -> dict[str, Any]:
    import diffusers
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min_at_end": None if load is None else round(load, 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


def _fmt(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def acceptance_markdown(acceptance: dict[str, Any], title: bool = False) -> str:
    """The acceptance figures of a run (the content of ``acceptance.json``) as Markdown, for README.md and docs."""
    fig, steps, times = acceptance["figures"], acceptance["steps"], acceptance["timings_seconds"]
    ae, seg, disc, t2i = (fig[k] for k in ("autoencoder", "segmenter", "discriminator_init", "text_to_image"))
    machine, loads = acceptance["machine"], acceptance.get("load_average_1min_after", {})

    def run(part: str) -> str:
        s = steps[part]
        load = f", load {loads[part]}" if part in loads else ""
        return f"{s['steps']} steps, {times.get(part, s['seconds']):.0f} s{load}{' (cut)' if s['cut'] else ''}"

    lines = []
    if title:
        lines += [
            "# Toy base models",
            "",
            "The toy world's stand-ins for SD 1.5's frozen parts (load with "
            "`layout2image.trainer.models.load_base_models`), its evaluation segmenter and the discriminator "
            "initialisation. Written by `layout2image.trainer.toy_base.train_toy_base`; see docs/TOY_WORLD.md. "
            "All figures below are also in `acceptance.json`; `samples.png` shows samples per domain word (rows: "
            + ", ".join(DOMAINS)
            + ").",
            "",
        ]
    lines += [
        "| part | acceptance figure | training |",
        "|---|---|---|",
        f"| autoencoder | held-out reconstruction PSNR **{ae['heldout_psnr_db']:.2f} dB** (posterior mode, "
        f"{acceptance['config']['num_heldout']} images); scaling_factor {ae['scaling_factor']} | {run('autoencoder')} |",
        f"| evaluation segmenter | held-out mIoU **{seg['heldout_miou']:.3f}** on real images, "
        f"{seg['heldout_miou_autoencoded']:.3f} on their autoencoded versions | {run('segmenter')} |",
        f"| discriminator init | mIoU {disc['own_heldout_miou']:.3f} on its own held-out split (never used for "
        f"layout mIoU) | {run('discriminator_init')} |",
        f"| text encoder + UNet | night − day sample brightness **{t2i['night_minus_day_brightness']:+.3f}**; "
        f"snow − day white fraction {t2i['snow_minus_day_white_fraction']:+.3f}; fog − day contrast "
        f"{t2i['fog_minus_day_contrast']:+.3f} | {run('text_to_image')} |",
        "",
        f"Samples: {t2i['per_word']} per domain word, the same scenes, wording and noise for every word, DDIM "
        f"{t2i['steps']} steps, guidance {t2i['guidance_scale']}. Image statistics (`core.toy.image_stats`):",
        "",
        "| domain word | brightness (samples / real) | saturation | contrast | white fraction |",
        "|---|---|---|---|---|",
    ]
    for d in DOMAINS:
        a, r = t2i[d], t2i.get(f"real_{d}", {})
        cells = [
            f"{_fmt(a[k])} / {_fmt(r.get(k, '-'))}" for k in ("brightness", "saturation", "contrast", "white_fraction")
        ]
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    if "class_share_distance_to_real" in t2i:
        lines += [
            "",
            f"The evaluation segmenter on the samples: class shares at total-variation distance "
            f"{t2i['class_share_distance_to_real']:.3f} from those of real images, mean confidence "
            f"{t2i['segmenter_confidence_on_samples']:.3f}.",
        ]
    lines += [
        "",
        f"Run: seed {acceptance['seed']}, {acceptance['wall_seconds'] / 60:.1f} min wall time for a "
        f"{acceptance['budget_minutes']:g}-minute budget, on {machine['cpu']} ({machine['cpu_count']} cores, "
        f"{machine['torch_threads']} torch threads), torch {machine['torch']}, diffusers {machine['diffusers']}, "
        f"transformers {machine['transformers']}."
        + (
            " 1-minute load average after each part: " + ", ".join(f"{k} {v}" for k, v in loads.items()) + "."
            if loads
            else ""
        ),
    ]
    if acceptance.get("command"):
        lines += ["", "Command:", "", "```bash", acceptance["command"], "```"]
    return "\n".join(lines) + "\n"
