"""The toy world in ComfyUI: load the shipped tiny models, make toy scene label maps, generate on a CPU.

The toy base models (``weights/toy``, see docs/TOY_WORLD.md) are not SD 1.5-shaped, so ComfyUI's checkpoint
loaders cannot load them; these nodes run them with diffusers instead, through
`layout2image.core.toy.generate.generate_toy_images` (the trainer's validation sampler: DDIM, text CFG, ControlNet
residuals). The base folder is loaded by ``layout2image.trainer.models.load_base_models`` (offline), a toy
ControlNet (from ``l2i-demo`` / ``l2i-train --preset toy``) by ``layout2image.weights.controlnet_from_file``,
which checks its label-set metadata. Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path

import torch
from comfy_api.latest import io

from ..core.labels import LabelSet
from ..core.toy import DOMAINS, HELDOUT_START, make_caption, make_label_map, make_scene, sample_rng, toy_label_set
from ..core.toy.generate import (
    ToyModels,
    ToyWorldError,
    check_toy_controlnet,
    generate_toy_images,
    toy_hint_spec,
)
from .model_files import clean_path_input
from .types import LabelMap, LabelMapType, LabelSetType, ToyWorldType

__all__ = [
    "NODES",
    "L2IToyGenerate",
    "L2IToySceneLabelMap",
    "L2IToyWorldLoader",
    "ToyWorldError",
    "load_toy_world",
    "resolve_toy_controlnet",
    "resolve_toy_folder",
]

CATEGORY = "layout2image/toy"
#: Where an ``l2i-demo`` / ``l2i-train`` output folder keeps the exported ControlNet, relative to that folder.
_EXPORT_SUBFOLDERS = ("controlnet", "export/controlnet", "run/export/controlnet")
_MAX_SEED = 0xFFFFFFFFFFFFFFFF
DEFAULT_PROMPT = "a city street at night with two cars and a tree"
#: CPU threads Toy Generate uses. The toy models' ops are tiny ((1, 64, 16, 16) activations at 128 px), so
#: splitting each across cores gains little, and when other processes keep the cores busy every op waits at a
#: barrier for a descheduled thread: template 06 took 2-11 s with 2 threads and 0.6-1.4 s with 1 on a 2-core
#: machine at load 4-6 (docs/COMFYUI.md, "How fast template 06 runs").
TOY_CPU_THREADS = 1


def resolve_toy_folder(folder: str = "") -> Path:
    """The toy base-model folder: ``""`` (or ``builtin:toy``) is the shipped ``weights/toy``; else a local folder.

    Raises:
        ToyWorldError: the folder does not exist or is not a diffusers folder (no ``model_index.json`` nor the
            component subfolders).
    """
    from ..trainer.models import TOY_WEIGHTS_DIR, ModelLoadError, resolve_builtin_path

    text = clean_path_input(folder)
    try:
        path = Path(resolve_builtin_path(text)).expanduser() if text else TOY_WEIGHTS_DIR
    except ModelLoadError as e:
        raise ToyWorldError(str(e)) from None
    if not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
        where = "the shipped toy weights folder" if not text else "`folder`"
        raise ToyWorldError(
            f"{where} {str(path)!r} holds no toy base models (no model_index.json or unet/); rebuild the shipped ones "
            "with `l2i-train --preset toy-base --output <folder>` (docs/TOY_WORLD.md) or give a diffusers folder"
        )
    return path


def resolve_toy_controlnet(path: str) -> Path | None:
    """A toy ControlNet file or diffusers folder, or ``None`` for an empty ``path``.

    An ``l2i-demo`` / ``l2i-train`` output folder is accepted too: its ``run/export/controlnet`` (or
    ``export/controlnet``, ``controlnet``) diffusers folder is used.

    Raises:
        ToyWorldError: the path does not exist, or is a folder holding no ControlNet.
    """
    text = clean_path_input(path)
    if not text:
        return None
    resolved = Path(text).expanduser()
    if not resolved.exists():
        raise ToyWorldError(
            f"`controlnet_path` {text!r} does not exist; give a toy ControlNet file or diffusers folder (l2i-demo "
            "writes <out>/run/export/controlnet/ and a single .safetensors file beside it), or leave it empty"
        )
    if resolved.is_dir() and not (resolved / "config.json").is_file():
        for sub in _EXPORT_SUBFOLDERS:
            if (resolved / sub / "config.json").is_file():
                return resolved / sub
        raise ToyWorldError(
            f"`controlnet_path` {text!r} is a folder without config.json and without "
            f"{' or '.join(s + '/' for s in _EXPORT_SUBFOLDERS)}; give the ControlNet's diffusers folder or file"
        )
    return resolved


def _stamp(path: Path | None) -> tuple:
    """What changes when a file or folder is rewritten (retrained in place): names, sizes and mtimes."""
    if path is None:
        return ()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    out = []
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        out.append((str(f), st.st_size, st.st_mtime_ns))
    return tuple(out)


@functools.lru_cache(maxsize=2)
def _load_base(folder: str, stamp: tuple):
    from ..trainer.models import load_base_models

    # ComfyUI executes nodes under inference mode; the cached modules must stay ordinary tensors.
    with torch.inference_mode(False):
        return load_base_models(folder, device="cpu", dtype=torch.float32)


@functools.lru_cache(maxsize=4)
def _load_controlnet(path: str, stamp: tuple):
    from ..weights import controlnet_from_file, load_companion_table

    label_set = toy_label_set()
    with torch.inference_mode(False):
        cn = controlnet_from_file(path, label_set=label_set).float().requires_grad_(False)
        hint = toy_hint_spec(cn)
        table = load_companion_table(path, label_set).table.float() if hint.kind == "embedding" else None
    return cn, hint, table


def load_toy_world(folder: str = "", controlnet_path: str = "") -> ToyModels:
    """Load the toy base models (and a toy ControlNet). Loads are cached (the base models are shared by every
    ControlNet) and redone when the files change on disk.

    Args:
        folder (`str`): the base-model folder; ``""`` for the shipped ``weights/toy``.
        controlnet_path (`str`): a toy ControlNet file or diffusers folder (or an ``l2i-demo`` output folder);
            ``""`` for none.

    Raises:
        ToyWorldError, ModelLoadError, WeightsError, MetadataError: naming the file and the problem.
    """
    base = resolve_toy_folder(folder).resolve()
    bundle = _load_base(str(base), _stamp(base / "model_index.json") + _stamp(base / "unet"))
    cn_path = resolve_toy_controlnet(controlnet_path)
    cn = hint = table = None
    if cn_path is not None:
        cn_path = cn_path.resolve()
        cn, hint, table = _load_controlnet(str(cn_path), _stamp(cn_path))
        check_toy_controlnet(cn, bundle.unet, source=str(cn_path))
    return ToyModels(
        unet=bundle.unet,
        vae=bundle.vae,
        text_encoder=bundle.text_encoder,
        tokenizer=bundle.tokenizer,
        scheduler_config=dict(bundle.noise_scheduler.config),
        source=str(base),
        controlnet=cn,
        hint=hint,
        table=table,
        controlnet_source="" if cn_path is None else str(cn_path),
    )


@contextlib.contextmanager
def _cpu_threads(device: torch.device, threads: int) -> Iterator[None]:
    """Run with at most ``threads`` intra-op threads on the CPU (ComfyUI runs one node at a time, so the
    process-wide setting is put back before the next node)."""
    before = torch.get_num_threads()
    if device.type != "cpu" or before <= threads:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _device() -> torch.device:
    try:
        import comfy.model_management as mm  # ComfyUI's device choice (CPU with --cpu)
    except ImportError:
        return torch.device("cpu")
    return mm.get_torch_device()


# ---------------------------------------------------------------------------------------------- nodes
class L2IToyWorldLoader(io.ComfyNode):
    """Load the toy world's tiny models (shipped with the pack) and optionally a toy ControlNet."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="L2IToyWorldLoader",
            display_name="Toy World Loader",
            category=CATEGORY,
            description=(
                "Loads the toy world's tiny base models (autoencoder, text encoder, UNet; shipped in the pack's "
                "weights/toy, a few MB, runs on a CPU) and, optionally, a ControlNet trained on them by l2i-demo. "
                "Use with Toy Generate; nothing is downloaded."
            ),
            inputs=[
                io.String.Input(
                    "folder",
                    default="",
                    tooltip=(
                        "Toy base-model folder (diffusers layout: unet/, vae/, text_encoder/, tokenizer/, "
                        "scheduler/). Empty = the toy weights shipped with the pack."
                    ),
                ),
                io.String.Input(
                    "controlnet_path",
                    default="",
                    tooltip=(
                        "Optional toy ControlNet: a .safetensors file or diffusers folder exported by l2i-demo "
                        "(<out>/run/export/controlnet), or the l2i-demo output folder itself. Empty = no ControlNet "
                        "(the base model then ignores the layout)."
                    ),
                ),
            ],
            outputs=[
                ToyWorldType.Output("toy_world", tooltip="The loaded toy models, for Toy Generate."),
                LabelSetType.Output("label_set", tooltip="The toy label set (8 street classes, ignore 255)."),
                io.String.Output(
                    "segmenter_path",
                    tooltip=(
                        "The folder's evaluation segmenter (segmenter/), for Layout Alignment's segmenter_path; "
                        "empty if the folder has none."
                    ),
                ),
                io.String.Output("info", tooltip="What was loaded: the folder, the ControlNet and its hint."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, folder: str = "", controlnet_path: str = "", **kwargs):
        """Re-run when the base models or the ControlNet are rewritten on disk."""
        try:
            base = resolve_toy_folder(folder)
            cn = resolve_toy_controlnet(controlnet_path)
        except ToyWorldError:
            return (folder, controlnet_path)
        return (folder, controlnet_path, _stamp(base / "model_index.json") + _stamp(base / "unet") + _stamp(cn))

    @classmethod
    def execute(cls, folder: str = "", controlnet_path: str = "") -> io.NodeOutput:
        models = load_toy_world(folder, controlnet_path)
        segmenter = Path(models.source) / "segmenter"
        segmenter_path = str(segmenter) if (segmenter / "config.json").is_file() else ""
        return io.NodeOutput(models, models.label_set, segmenter_path, models.describe())


class L2IToySceneLabelMap(io.ComfyNode):
    """A procedural toy street scene's label map (the toy world's data), with its caption."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="L2IToySceneLabelMap",
            display_name="Toy Scene Label Map",
            category=CATEGORY,
            description=(
                "The label map of toy scene (seed, index): a procedural street (sky, road, sidewalk, grass, "
                "buildings, trees, cars, people) in the toy label set, plus its caption in a domain (day, night, "
                f"snow, fog). Scenes from index {HELDOUT_START} on were never seen in training."
            ),
            inputs=[
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFF,
                    # Said explicitly: the frontend gives every INT named "seed" this widget anyway, and a
                    # schema that is silent about it gets templates whose widgets_values are one short.
                    control_after_generate=True,
                    tooltip="Dataset seed of the toy world (0 = the one the toy models were trained with).",
                ),
                io.Int.Input(
                    "index",
                    default=HELDOUT_START,
                    min=0,
                    max=2**31 - 1,
                    tooltip=(
                        "Scene number: (seed, index) alone fixes the scene. 0-2999 are training scenes of the toy "
                        f"base models, {HELDOUT_START} and above held-out ones."
                    ),
                ),
                io.Int.Input(
                    "size",
                    default=128,
                    min=16,
                    max=1024,
                    step=8,
                    tooltip="Width and height in pixels (square). The toy models were trained at 128; use multiples "
                    "of 8 for Toy Generate.",
                ),
                io.Int.Input(
                    "batch_size",
                    default=1,
                    min=1,
                    max=64,
                    tooltip="Number of scenes: indices index, index + 1, ... (one label map each).",
                ),
                io.Combo.Input(
                    "domain",
                    options=list(DOMAINS),
                    default="day",
                    tooltip="Domain word of the caption output (day, night, snow, fog).",
                ),
            ],
            outputs=[
                LabelMapType.Output("label_map", tooltip="(batch_size, size, size) toy class ids; 255 = unlabelled."),
                io.String.Output(
                    "caption", tooltip="The first scene's caption in the domain: the kind of prompt the models know."
                ),
            ],
        )

    @classmethod
    def execute(
        cls, seed: int = 0, index: int = HELDOUT_START, size: int = 128, batch_size: int = 1, domain: str = "day"
    ) -> io.NodeOutput:
        if domain not in DOMAINS:
            raise ToyWorldError(f"`domain` {domain!r} is not a toy domain; use one of {list(DOMAINS)}")
        label_set = toy_label_set()
        maps = [make_label_map(int(size), int(seed), int(index) + i) for i in range(int(batch_size))]
        label_map = LabelMap(torch.stack([torch.from_numpy(m) for m in maps]), label_set)
        scene = make_scene(int(size), int(seed), int(index))
        caption = make_caption(scene, domain, sample_rng(int(seed), int(index), 2))
        return io.NodeOutput(label_map, caption)


class L2IToyGenerate(io.ComfyNode):
    """Sample images from a toy label map and a prompt with the toy models (and their ControlNet)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="L2IToyGenerate",
            display_name="Toy Generate",
            category=CATEGORY,
            description=(
                "Generate one image per label map with the toy models on the CPU (DDIM, text CFG). With a toy "
                "ControlNet loaded the layout is followed; without one, only the prompt counts. The label map must "
                "use the toy label set, with a size that is a multiple of 8."
            ),
            inputs=[
                ToyWorldType.Input("toy_world", tooltip="From Toy World Loader."),
                LabelMapType.Input(
                    "label_map",
                    tooltip="Toy label map(s) (toy label set; height and width multiples of 8), e.g. Toy Scene "
                    "Label Map. One image per map.",
                ),
                io.String.Input(
                    "prompt",
                    default=DEFAULT_PROMPT,
                    multiline=True,
                    tooltip=(
                        "The text. The toy text encoder knows the words of toy captions: places (street, road), "
                        "objects (cars, trees, people, street lamps) and the domain words day, night, snow, fog."
                    ),
                ),
                io.String.Input(
                    "negative_prompt",
                    default="",
                    tooltip="Unconditional text of classifier-free guidance (the toy models were trained with '').",
                ),
                io.Int.Input("steps", default=25, min=1, max=200, tooltip="DDIM sampling steps (toy default 25)."),
                io.Float.Input(
                    "cfg",
                    default=3.0,
                    min=0.0,
                    max=30.0,
                    step=0.1,
                    tooltip="Text classifier-free guidance scale; 1 or less switches it off (toy default 3).",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=_MAX_SEED,
                    control_after_generate=True,
                    tooltip="Seed of the initial noise (drawn on the CPU: the same image on any device).",
                ),
                io.Float.Input(
                    "control_strength",
                    default=1.0,
                    min=0.0,
                    max=2.0,
                    step=0.01,
                    tooltip="Scale of the ControlNet's residuals: 0 = off, 1 = as trained. Unused without one.",
                ),
            ],
            outputs=[io.Image.Output("image", tooltip="Generated images, (B, H, W, 3) float in [0, 1].")],
        )

    @classmethod
    def execute(
        cls,
        toy_world: ToyModels,
        label_map: LabelMap,
        prompt: str = DEFAULT_PROMPT,
        negative_prompt: str = "",
        steps: int = 25,
        cfg: float = 3.0,
        seed: int = 0,
        control_strength: float = 1.0,
    ) -> io.NodeOutput:
        if not isinstance(toy_world, ToyModels):
            raise ToyWorldError(f"`toy_world` must come from Toy World Loader, got {type(toy_world).__name__}")
        label_set: LabelSet = label_map.label_set
        device = _device()
        with _cpu_threads(device, TOY_CPU_THREADS):
            images = generate_toy_images(
                toy_world,
                label_map.ids,
                label_set,
                str(prompt),
                str(negative_prompt),
                steps=int(steps),
                guidance_scale=float(cfg),
                seed=int(seed),
                control_strength=float(control_strength),
                device=device,
            )
        return io.NodeOutput(images.permute(0, 2, 3, 1).contiguous())


NODES = [L2IToyWorldLoader, L2IToySceneLabelMap, L2IToyGenerate]
