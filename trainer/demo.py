"""The toy-world demo: train an ALDM ControlNet on the shipped toy base models and show that it learned the layout.

`run_demo` (command: ``l2i-demo``) is the README's main job. On a 2-core CPU, in about five minutes, it

1. writes a toy dataset (``<out>/data/train``: ``num_train`` scenes; ``<out>/data/val``: ``num_val`` scenes from
   the index range the evaluation segmenter never saw);
2. trains a ControlNet with the ``toy`` preset (ALDM: segmenter discriminator + unrolling; ``adversarial=False``
   gives the plain diffusion loss) on ``builtin:toy``, validating before the first step and after the last;
3. samples the validation layouts once per domain word (same layouts, wording and noise; only the word differs)
   and measures the images (`core.toy.image_stats`) and the evaluation segmenter's mIoU on them;
4. writes ``grid.png`` (layout | sample | segmentation of the sample, after training), ``grid_before.png``,
   ``domains.png`` (each picture with column headers, prompts, a caption and a legend), ``summary.json`` and the
   exported adapter (``<out>/run/export``).

Every phase that takes more than a second or two says what it does before it starts (``logger.info`` on this
module's logger, which ``l2i-demo`` always shows) and loops show a progress bar: writing the dataset, the data
check, each validation, training and the domain-word sampling.

`run_comparison` (``l2i-demo --compare``) trains a plain and an ALDM ControlNet with the same steps, data and
seeds for several seeds and tabulates mIoU, the domain-word effect and the time per step.

An ``--out`` folder is the demo's own: `check_demo_folder` refuses one that holds files the demo did not write
(whatever ``overwrite`` says) and one that holds an earlier demo run or comparison unless ``overwrite``, which moves
the earlier run's files to ``<out>/replaced-<time>/`` and deletes that folder once the new run has finished. The
dataset in ``<out>/data`` is a cache: reused when it has the requested settings, else its toy files are rewritten.

The layout mIoU is always measured with the toy world's evaluation segmenter (``weights/toy/segmenter``), never
with the discriminator or its initialisation (``weights/toy/discriminator_init``).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.files import atomic_path, atomic_write_text, move_into_fresh_folder
from ..core.logging import get_logger
from ..core.metrics import MeanIoU
from ..core.toy import DOMAINS, HELDOUT_START, image_stats, write_dataset
from .toy_base import domain_prompts

__all__ = [
    "DOCUMENTED_COMPARISON",
    "VAL_START",
    "ComparisonResult",
    "DemoResult",
    "base_domain_figures",
    "check_demo_folder",
    "comparison_markdown",
    "demo_config",
    "documented_comparison",
    "prepare_demo_data",
    "run_comparison",
    "run_demo",
]

logger = get_logger(__name__)

#: First index of the demo's validation scenes: the toy base's held-out range (its segmenters never saw them).
VAL_START = HELDOUT_START

_DATA_SEED = 0

#: The ``l2i-demo --compare --seeds 0 1 2`` run the README and docs/TOY_WORLD.md quote (`documented_comparison`).
DOCUMENTED_COMPARISON = Path(__file__).resolve().parents[1] / "docs" / "figures" / "toy_comparison.json"


@dataclass
class DemoResult:
    """What one demo run measured (also in ``summary.json``).

    Args:
        out (`Path`): the demo folder.
        adversarial (`bool`): ALDM (True) or the plain diffusion loss (False).
        seed (`int`): training seed.
        steps (`int`): optimizer steps.
        miou_before (`float`): evaluation mIoU of the validation samples before training (zero-initialised
            ControlNet = the base model, which ignores the layout).
        miou_after (`float`): the same after training.
        miou_domains (`float`): mIoU over the samples of every domain word after training.
        miou_curve (`list`): ``[step, mIoU]`` of every validation (``validation.every`` sets the spacing).
        domain_stats (`dict`): per domain word, `ImageStats` of the samples after training.
        night_minus_day_brightness (`float`): the domain-word effect after training.
        base_night_minus_day_brightness (`float`, *optional*): the same figure of the base model alone (no
            ControlNet) as its training measured it (``weights/toy/acceptance.json``); None for another base.
        seconds_per_step (`float`): median wall time of a training step.
        train_seconds (`float`): wall time of the whole training run (steps, validations, export).
        seconds (`float`): wall time of the demo.
        files (`dict`): what was written, by name.
    """

    out: Path
    adversarial: bool
    seed: int
    steps: int
    miou_before: float
    miou_after: float
    miou_domains: float
    miou_curve: list[list[float]]
    domain_stats: dict[str, dict[str, float]]
    night_minus_day_brightness: float
    seconds_per_step: float
    train_seconds: float
    seconds: float
    files: dict[str, str] = field(default_factory=dict)
    base_night_minus_day_brightness: float | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["out"] = str(self.out)
        return data


def prepare_demo_data(root: str | os.PathLike, num_train: int, num_val: int, size: int = 128) -> Path:
    """Write (or reuse, when already complete) the demo dataset under ``root``: ``train/`` and ``val/``.

    A split the demo wrote with other settings has its toy files rewritten; an interrupted write is completed
    (`write_dataset`); nothing else in the folders is deleted.
    """
    from ..core.toy.dataset import WRITING_MARKER

    root = Path(root)
    for split, num, start in (("train", num_train, 0), ("val", num_val, VAL_START)):
        folder = root / split
        marker = folder / DEMO_MARKER
        wanted = {"num": num, "start": start, "seed": _DATA_SEED, "size": size}
        earlier = _read_json(marker)
        if earlier == wanted:
            logger.info("reusing the %s split in %s (%d scenes)", split, folder, num)
            continue
        logger.info("writing the %s split: %d toy scenes of %dx%d to %s", split, num, size, size, folder)
        # The demo's own split of other settings (its marker, or its interrupted write of other settings): replace
        # its toy files. Without either, write_dataset refuses a toy dataset it would overwrite.
        overwrite = earlier is not None
        marker.unlink(missing_ok=True)
        kwargs = dict(seed=_DATA_SEED, size=size, start=start, preview_rows=0, progress=True)
        try:
            write_dataset(folder, num, overwrite=overwrite, **kwargs)
        except FileExistsError:
            if not (folder / WRITING_MARKER).is_file():
                raise
            write_dataset(folder, num, overwrite=True, **kwargs)
        atomic_write_text(marker, json.dumps(wanted) + "\n")
    return root


#: Written into every demo folder (and each data split): the folder is the demo's, to reuse or replace.
DEMO_MARKER = "l2i-demo.json"
_DEMO_OUTPUTS = ("run", "grid.png", "grid_before.png", "domains.png", "summary.json")
_COMPARISON_OUTPUTS = ("comparison.json", "comparison.md")
_SEED_FOLDER = re.compile(r"(plain|aldm)_seed-?\d+")
_RUN_CACHE = "cache"  # the trainer's latent cache inside run/


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _foreign_files(out: Path, prefix: str = "") -> list[str]:
    """The entries of a demo folder that no demo run wrote (relative paths): anything but its own outputs, data/,
    replaced-*/ and, inside run/, the trainer's files."""
    from .resume import RUN_FILES

    found = []
    for entry in sorted(out.iterdir()):
        name = entry.name
        if name in (DEMO_MARKER, "data", *_DEMO_OUTPUTS[1:], *_COMPARISON_OUTPUTS) or name.startswith("replaced-"):
            continue
        if name == "run" and entry.is_dir():
            found += [
                f"{prefix}run/{e.name}"
                for e in sorted(entry.iterdir())
                if e.name not in (*RUN_FILES, _RUN_CACHE) and not e.name.startswith("replaced-")
            ]
        elif _SEED_FOLDER.fullmatch(name) and entry.is_dir():
            found += _foreign_files(entry, f"{prefix}{name}/")
        else:
            found.append(prefix + name)
    return found


def _listing(names: Sequence[str], most: int = 4) -> str:
    return ", ".join(names[:most]) + (f", ... ({len(names)} in all)" if len(names) > most else "")


def check_demo_folder(out: str | os.PathLike, *, overwrite: bool = False, comparison: bool = False) -> list[str]:
    """Refuse a demo folder that holds other files, or an earlier run unless ``overwrite`` (writes nothing).

    Args:
        out (`str` or `os.PathLike`): the ``--out`` folder.
        overwrite (`bool`, defaults to False): replace an earlier demo run (``comparison``: comparison) there.
        comparison (`bool`, defaults to False): the folder is for ``--compare``.

    Returns:
        `list[str]`: the earlier run's entries, to move aside (empty without ``overwrite``).

    Raises:
        FileExistsError: files the demo did not write (even with ``overwrite``), or an earlier run without it.
        NotADirectoryError: ``out`` is a file.
    """
    out = Path(out)
    if not out.exists():
        return []
    if not out.is_dir():
        raise NotADirectoryError(f"--out {str(out)!r} is a file, not a folder")
    entries = sorted(e.name for e in out.iterdir())
    if not entries:
        return []
    never = "l2i-demo never replaces files it did not write, not even with --overwrite"
    # A folder of an older l2i-demo has no marker of its own, only the one in its train split.
    if not (out / DEMO_MARKER).is_file() and not (out / "data" / "train" / DEMO_MARKER).is_file():
        raise FileExistsError(
            f"--out {str(out)!r} is not empty and holds no earlier demo ({_listing(entries)}); {never}: choose "
            "another --out (a new or empty folder)"
        )
    foreign = _foreign_files(out)
    if foreign:
        raise FileExistsError(
            f"--out {str(out)!r} holds files l2i-demo did not write beside its earlier run ({_listing(foreign)}); "
            f"{never}: move them out or choose another --out"
        )
    if comparison:
        earlier = [n for n in entries if n in _COMPARISON_OUTPUTS or _SEED_FOLDER.fullmatch(n)]
    else:
        earlier = [n for n in entries if n in _DEMO_OUTPUTS]
    if earlier and not overwrite:
        what = "comparison (l2i-demo --compare)" if comparison else "demo run"
        raise FileExistsError(
            f"--out {str(out)!r} already holds an earlier {what} ({_listing(earlier)}); replace it with --overwrite "
            "(its files are moved to replaced-<time>/ in that folder and deleted once the new run finishes; the "
            "dataset in data/ is reused) or choose another --out"
        )
    return earlier if overwrite else []


def _move_aside(out: Path, names: list[str]) -> Path | None:
    """Move ``names`` (from `check_demo_folder`) into ``out/replaced-<UTC time>/``; returns that folder."""
    if not names:
        return None
    folder = move_into_fresh_folder(out, "replaced", [out / name for name in names])
    logger.info(
        "--overwrite: moved the earlier run's %s to %s (deleted once this run finishes)", ", ".join(names), folder
    )
    return folder


def _claim(out: Path, *, overwrite: bool, comparison: bool) -> Path | None:
    """Check ``out`` (`check_demo_folder`), move an earlier run aside, mark the folder as the demo's."""
    replaced = _move_aside(out, check_demo_folder(out, overwrite=overwrite, comparison=comparison))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / DEMO_MARKER, json.dumps({"written_by": "l2i-demo"}) + "\n")
    return replaced


def _drop_replaced(replaced: Path | None) -> None:
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
        logger.info("deleted the earlier run's files (%s)", replaced)


def demo_config(
    data_root: str | os.PathLike,
    output: str | os.PathLike,
    *,
    steps: int | None = None,
    seed: int = 0,
    adversarial: bool = True,
    num_val: int = 16,
    base: str = "builtin:toy",
    overrides: tuple[str, ...] = (),
):
    """The trainer `Config` of a demo run: the ``toy`` preset on `base` with the demo's data and validation."""
    from .config import load_config

    extra = {
        "model": {"pretrained": base},
        "data": {"root": str(data_root), "split": "train", "val_split": "val"},
        "train": {"output_dir": str(output), "seed": int(seed)},
        "adversarial": {"enabled": bool(adversarial)},
        "validation": {"at_start": True, "at_end": True, "num_images": int(num_val)},
    }
    if steps is not None:
        extra["train"]["steps"] = int(steps)
    if base != "builtin:toy":  # a custom base brings its own segmenters next to it, or none
        extra["discriminator"] = {"pretrained": None, "tiny": True}
        extra["validation"]["segmenter"] = None
    return load_config("toy", (), overrides, extra)


@torch.no_grad()
def _domain_samples(trainer, num: int) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, list[str]]]:
    """Sample the validation layouts once per domain word; returns images per word, their figures and the prompts."""
    validator = trainer.validator
    labels = validator.labels[:num]
    size = int(labels.shape[-1])
    prompts = domain_prompts(len(labels), _DATA_SEED, size, start=VAL_START)
    n = trainer.models.label_set.num_classes
    metric = MeanIoU(n, trainer.models.label_set.ignore_index)
    images: dict[str, np.ndarray] = {}
    figures: dict[str, Any] = {}
    adapter = trainer.models.adapter
    was_training = adapter.training
    adapter.eval()
    from tqdm.auto import tqdm

    starts = range(0, len(labels), validator.config.batch_size)
    bar = tqdm(
        total=len(DOMAINS) * len(starts) * validator.config.num_steps,
        desc=f"domain words ({len(labels)} layouts x {len(DOMAINS)} words)",
        unit="step",
        dynamic_ncols=True,
    )
    try:
        for domain in DOMAINS:
            batches = []
            for lo in starts:
                hi = lo + validator.config.batch_size
                batch_labels = labels[lo:hi].to(trainer.device)
                out = validator.sample(
                    batch_labels, prompts[domain][lo:hi], validator.seeds[lo:hi], on_step=lambda: bar.update(1)
                ).float()
                if validator.segmenter is not None:
                    logits = validator.segmenter(out * 2 - 1, size=batch_labels.shape[-2:])
                    metric.update(logits[:, :n].argmax(1), batch_labels)
                batches.append(out.cpu())
            array = (torch.cat(batches).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
            images[domain] = array
            figures[domain] = {k: round(v, 4) for k, v in image_stats(array).as_dict().items()}
    finally:
        bar.close()
        adapter.train(was_training)
    figures["miou"] = metric.compute().miou if validator.segmenter is not None else float("nan")
    return images, figures, prompts


def _prompt_template(prompts: Sequence[str]) -> str:
    """One text for prompts that differ only in a phrase: the shared words with the phrases in brackets.

    ``["a street on a sunny day with a car", "a street at night with a car"]`` gives
    ``"a street [on a sunny day | at night] with a car"``.
    """
    words = [p.split() for p in prompts]
    if all(w == words[0] for w in words):
        return " ".join(words[0])
    shortest = min(len(w) for w in words)
    head = 0
    while head < shortest and all(w[head] == words[0][head] for w in words):
        head += 1
    tail = 0
    while tail < shortest - head and all(w[-1 - tail] == words[0][-1 - tail] for w in words):
        tail += 1
    middles = [" ".join(w[head : len(w) - tail]) or "-" for w in words]
    return " ".join([*words[0][:head], "[" + " | ".join(middles) + "]", *words[0][len(words[0]) - tail :]])


def _domain_grid(
    labels: np.ndarray,
    images: dict[str, np.ndarray],
    label_set,
    prompts: dict[str, list[str]],
    steps: int,
    pad: int = 2,
) -> np.ndarray:
    """Rows: validation layouts; columns: the layout, then one sample per domain word; with headers, each row's
    prompts (one template with the domain phrases in brackets), a caption and a legend (ignore id included)."""
    from ..core.labels import colorize, legend_image
    from ..core.labels.preview import annotate_grid

    rows, (h, w) = len(labels), labels.shape[-2:]
    cols = 1 + len(images)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for r in range(rows):
        tiles = [colorize(labels[r], label_set)] + [images[d][r] for d in images]
        for c, tile in enumerate(tiles):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            grid[y : y + h, x : x + w] = tile
    ignore = label_set.ignore_index
    legend = legend_image(
        label_set, sorted(int(v) for v in np.unique(labels) if v != ignore), ignore=bool((labels == ignore).any())
    )
    texts = [_prompt_template([prompts[d][r] for d in images]) for r in range(rows)]
    caption = (
        f"Domain words after {steps} training steps: each row is one validation layout sampled once per domain word "
        "with the same noise; the prompts differ only in the phrase in brackets (left to right: "
        + ", ".join(images)
        + ")."
    )
    return annotate_grid(
        grid, ["layout", *images], tile_width=w, tile_height=h, pad=pad, row_texts=texts, legend=legend,
        caption=caption,
    ).image  # fmt: skip


def _save_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def base_domain_figures(base: str) -> dict[str, Any] | None:
    """The domain-word figures the shipped toy base measured on itself when it was trained (``acceptance.json``:
    ``night_minus_day_brightness`` and per-word ``ImageStats``); None for another base or when the file is absent."""
    if base != "builtin:toy":
        return None
    from .models import TOY_WEIGHTS_DIR

    path = TOY_WEIGHTS_DIR / "acceptance.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))["figures"]["text_to_image"]
    except (OSError, ValueError, KeyError):
        return None


def documented_comparison(path: str | os.PathLike = DOCUMENTED_COMPARISON) -> dict[str, Any] | None:
    """The documented plain-vs-ALDM comparison (`ComparisonResult.to_dict`), or None when it is not installed."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def run_demo(
    out: str | os.PathLike,
    *,
    steps: int | None = None,
    seed: int = 0,
    adversarial: bool = True,
    num_train: int = 512,
    num_val: int = 16,
    threads: int | None = 2,
    overrides: tuple[str, ...] = (),
    data_root: str | os.PathLike | None = None,
    base: str = "builtin:toy",
    overwrite: bool = False,
) -> DemoResult:
    """Train one toy ControlNet and measure it (see the module docstring).

    Args:
        out (`str` or `os.PathLike`): the demo folder (created; the training run goes to ``out/run``).
        steps (`int`, *optional*): optimizer steps (default: the ``toy`` preset's).
        seed (`int`, defaults to 0): training seed (the data and validation noise do not depend on it).
        adversarial (`bool`, defaults to True): ALDM; False trains with the diffusion loss only.
        num_train (`int`, defaults to 512): training scenes. num_val (`int`, defaults to 16): validation scenes.
        threads (`int`, *optional*, defaults to 2): torch CPU threads (restored afterwards); None keeps them.
        overrides (`tuple[str, ...]`): extra ``key=value`` trainer settings.
        data_root (`str`, *optional*): dataset folder to write/reuse (default ``out/data``).
        base (`str`, defaults to ``"builtin:toy"``): the base model (another folder: no segmenters, no mIoU).
        overwrite (`bool`, defaults to False): replace an earlier demo run in ``out`` (`check_demo_folder`).

    Returns:
        `DemoResult` (also written to ``out/summary.json``).

    Raises:
        FileExistsError: ``out`` holds files the demo did not write, or an earlier run and not ``overwrite``.
    """
    start = time.perf_counter()
    out = Path(out)
    replaced = _claim(out, overwrite=overwrite, comparison=False)
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        data = prepare_demo_data(data_root or out / "data", num_train, num_val)
        # Importing diffusers, transformers, peft and accelerate takes 10-20 s on a busy 2-core CPU.
        logger.info("loading the trainer and the base model (%s)", base)
        from .loop import Trainer

        run_dir = out / "run"  # absent: check_demo_folder refused it or moved it aside
        config = demo_config(
            data,
            run_dir,
            steps=steps,
            seed=seed,
            adversarial=adversarial,
            num_val=num_val,
            base=base,
            overrides=overrides,
        )
        trainer = Trainer(config)
        logger.info(
            "training a%s ControlNet for %d steps (validation before the first step and after the last) into %s",
            "n ALDM" if adversarial else " plain",
            config.train.steps,
            run_dir,
        )
        t = time.perf_counter()
        result = trainer.run()
        train_seconds = time.perf_counter() - t
        before, after = result.validations[0], result.validations[-1]
        # 8 layouts x 4 words: enough for the brightness figures, and a fifth of the demo's time at 16.
        num_domain = min(num_val, 8)
        logger.info("sampling %d validation layouts once per domain word (%s)", num_domain, ", ".join(DOMAINS))
        images, figures, prompts = _domain_samples(trainer, num_domain)
        label_set = trainer.models.label_set
        files = {
            "grid": out / "grid.png",
            "grid_before": out / "grid_before.png",
            "domains": out / "domains.png",
            "summary": out / "summary.json",
            "export": result.export.folder if result.export else run_dir / "export",
            "run": run_dir,
        }
        _save_png(files["grid"], after.grid)
        _save_png(files["grid_before"], before.grid)
        domain_grid = _domain_grid(
            trainer.validator.labels[:num_domain].numpy(), images, label_set, prompts, result.steps_done
        )
        _save_png(files["domains"], domain_grid)
        step_times = [h.seconds for h in result.history]
        base_figures = base_domain_figures(base) or {}
        demo = DemoResult(
            out=out,
            adversarial=adversarial,
            seed=seed,
            steps=result.steps_done,
            miou_before=_round(before.miou),
            miou_after=_round(after.miou),
            miou_domains=_round(figures.pop("miou")),
            miou_curve=[[int(v.folder.name.rsplit("_", 1)[-1]), _round(v.miou)] for v in result.validations],
            domain_stats=figures,
            night_minus_day_brightness=round(figures["night"]["brightness"] - figures["day"]["brightness"], 4),
            seconds_per_step=round(float(np.median(step_times)), 4) if step_times else float("nan"),
            train_seconds=round(train_seconds, 1),
            seconds=round(time.perf_counter() - start, 1),
            files={k: str(v) for k, v in files.items()},
            base_night_minus_day_brightness=base_figures.get("night_minus_day_brightness"),
        )
        atomic_write_text(files["summary"], json.dumps(demo.to_dict(), indent=2) + "\n")
        _drop_replaced(replaced)
        return demo
    finally:
        torch.set_num_threads(previous)


def _round(value: float | None, digits: int = 4) -> float:
    return float("nan") if value is None or math.isnan(value) else round(float(value), digits)


# --------------------------------------------------------------------------------------------------------------------
# plain vs ALDM
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ComparisonResult:
    """Demo runs of both kinds over several seeds: ``runs[kind]`` lists `DemoResult` in seed order."""

    runs: dict[str, list[DemoResult]]
    seeds: list[int]
    steps: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "seeds": self.seeds,
            "steps": self.steps,
            "runs": {k: [r.to_dict() for r in v] for k, v in self.runs.items()},
        }


def _mean_spread(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def comparison_markdown(comparison: ComparisonResult) -> str:
    """The comparison as a Markdown table (mean ± sample standard deviation over seeds) plus the per-seed values."""
    lines = [
        f"{len(comparison.seeds)} seeds ({', '.join(map(str, comparison.seeds))}), {comparison.steps} steps each; "
        "mean ± standard deviation over seeds.",
        "",
        "| ControlNet | mIoU before | mIoU after | mIoU, all domain words | night − day brightness | s/step |",
        "|---|---|---|---|---|---|",
    ]
    for kind, runs in comparison.runs.items():
        cells = []
        for key, digits in (
            ("miou_before", 3),
            ("miou_after", 3),
            ("miou_domains", 3),
            ("night_minus_day_brightness", 3),
            ("seconds_per_step", 3),
        ):
            mean, spread = _mean_spread([getattr(r, key) for r in runs])
            cells.append(f"{mean:.{digits}f} ± {spread:.{digits}f}")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    lines += ["", "mIoU during training (mean over seeds):", ""]
    for kind, runs in comparison.runs.items():
        steps = [int(s) for s, _ in runs[0].miou_curve]
        means = [float(np.mean([r.miou_curve[i][1] for r in runs])) for i in range(len(steps))]
        lines.append(f"- {kind}: " + ", ".join(f"step {s} {m:.3f}" for s, m in zip(steps, means)))
    lines += ["", "Per seed (mIoU after, all domain words):", ""]
    for kind, runs in comparison.runs.items():
        per_seed = ", ".join(f"seed {r.seed}: {r.miou_after:.3f} / {r.miou_domains:.3f}" for r in runs)
        lines.append(f"- {kind}: {per_seed}")
    return "\n".join(lines) + "\n"


def run_comparison(
    out: str | os.PathLike,
    *,
    seeds: tuple[int, ...] = (0, 1, 2),
    steps: int | None = None,
    num_train: int = 512,
    num_val: int = 16,
    threads: int | None = 2,
    overrides: tuple[str, ...] = (),
    overwrite: bool = False,
) -> ComparisonResult:
    """Train plain and ALDM ControlNets with the same data, steps and seeds; write ``comparison.{json,md}``.

    ``overwrite`` replaces an earlier comparison in ``out`` (`check_demo_folder`); a demo run there is kept.
    """
    out = Path(out)
    replaced = _claim(out, overwrite=overwrite, comparison=True)
    data = prepare_demo_data(out / "data", num_train, num_val)
    runs: dict[str, list[DemoResult]] = {"plain": [], "ALDM": []}
    for seed in seeds:
        for kind in runs:
            logger.info("comparison: %s ControlNet, seed %d", kind, seed)
            runs[kind].append(
                run_demo(
                    out / f"{kind.lower()}_seed{seed}",
                    steps=steps,
                    seed=seed,
                    adversarial=kind == "ALDM",
                    num_train=num_train,
                    num_val=num_val,
                    threads=threads,
                    overrides=overrides,
                    data_root=data,
                )
            )
    comparison = ComparisonResult(runs, list(seeds), runs["plain"][0].steps)
    atomic_write_text(out / "comparison.json", json.dumps(comparison.to_dict(), indent=2) + "\n")
    atomic_write_text(out / "comparison.md", comparison_markdown(comparison))
    _drop_replaced(replaced)
    return comparison
