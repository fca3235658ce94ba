"""SD 1.5-shaped random model files under the names workflow templates 01-05 use, trained by ``l2i-train``.

For the heavy mode of ``tests/test_frontend_templates.py`` (``COMFYUI_PATH`` and ``L2I_SD15_SHAPED=1``), which runs
templates 01-05 to an image in real ComfyUI with these files in place of real weights. In ``--work DIR`` (each
part is skipped when its output is already there, so a rerun takes seconds):

1. ``base/`` and ``comfy/models/checkpoints/random_sd15.safetensors``: the random SD 1.5-shaped diffusers folder and
   its ldm file written by ComfyUI, by ``benchmarks/stock_loaders.py``'s own stage (`stock_loaders.ensure_base`).
2. ``data_ade20k/``: four 64 x 64 samples in the folder format with ADE20K ids (street scenes of rectangles: sky,
   building, road, tree, car, ...; images are the palette colours plus noise), label set ``ade20k``: the templates'
   layouts are ADE20K colour maps, so the files must carry the ADE20K label set.
3. Three 1-step ``l2i-train`` runs on ``base/`` (`stock_loaders.ensure_run`, the same settings as its runs):
   ``ade20k_cn_rgb`` (ControlNet, palette-RGB hint), ``ade20k_cn_embedding`` (ALDM-native ControlNet, class-embedding
   hint, ALDM's hint encoder at its full widths, table from the base's CLIP text encoder) and ``ade20k_sdm_lora``
   (SDM-LoRA, attention + resnet-conv LoRA, one-hot SPADE).
4. ``template_models.json``: ``{"<models subfolder>/<file name>": "<absolute path>"}`` for every file the templates
   name (`TEMPLATE_FILES`), companions included (``.table.safetensors``, ``.spade.safetensors``).

Peak memory about 10.6 GB (a 1-step run on the SD 1.5-shaped base, fp32 on the CPU); 4-8 minutes on a 2-core CPU
the first time; about 7.5 GB of disk (the runs' checkpoints are removed once exported).

Usage (ComfyUI's requirements and this package must import in this Python)::

    python benchmarks/sd15_template_models.py --comfyui /work/comfyui --work /tmp/l2i_sd15
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stock_loaders  # noqa: E402  (the sibling script, not a package)

#: The ADE20K classes the training layouts are drawn from (a street, as in the templates' layout image).
SCENE_CLASSES = ("sky", "building", "road", "tree", "car", "sidewalk", "person", "grass")
#: The runs trained on ``data_ade20k/`` (their own ``--set`` overrides, after `stock_loaders.train_overrides`; a later
#: setting wins). ControlNets: only the one-file diffusers export the templates load (1.4 GB each, not 4.2 GB).
_DATA = ["data.label_set=ade20k", "data.label_mode=ids"]
_ONE_FILE = "export.controlnet_formats=[diffusers]"
TEMPLATE_RUNS = {
    "ade20k_cn_rgb": ["model.mode=controlnet", "model.hint=rgb", _ONE_FILE, *_DATA],
    "ade20k_cn_embedding": ["model.mode=controlnet", "model.hint=embedding", _ONE_FILE, *_DATA],
    "ade20k_sdm_lora": [*stock_loaders.RUNS["sdm_lora"], *_DATA],
}
#: File each template name stands for, relative to the work folder.
TEMPLATE_FILES = {
    "checkpoints/v1-5-pruned-emaonly.safetensors": f"comfy/models/checkpoints/{stock_loaders.CKPT_NAME}",
    "controlnet/l2i_aldm_ade20k_rgb.safetensors": "runs/ade20k_cn_rgb/export/controlnet.safetensors",
    "controlnet/l2i_aldm_ade20k.safetensors": "runs/ade20k_cn_embedding/export/controlnet.safetensors",
    "controlnet/l2i_aldm_ade20k.table.safetensors": "runs/ade20k_cn_embedding/export/controlnet.table.safetensors",
    "loras/l2i_sdm_ade20k.safetensors": "runs/ade20k_sdm_lora/export/sdm_lora.safetensors",
    "loras/l2i_sdm_ade20k.spade.safetensors": "runs/ade20k_sdm_lora/export/sdm_lora.spade.safetensors",
}


def write_ade20k_dataset(folder: Path, size: int, num: int = 4) -> None:
    """``num`` street layouts of ADE20K ids (uint8 PNG, ``size`` x ``size``) with noisy palette images."""
    import numpy as np
    from PIL import Image

    from layout2image.core.labels import get_label_set

    ade = get_label_set("ade20k")
    ids_of = {name: ade.names.index(name) for name in SCENE_CLASSES}
    palette = np.asarray(ade.palette, np.float32)
    rng = np.random.default_rng(0)
    tmp = folder.with_name(folder.name + ".tmp")
    for sub in ("images", "labels"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    for i in range(num):
        ids = np.full((size, size), ids_of["sky"], np.uint8)
        horizon, ground = (int(size * f) for f in rng.uniform([0.3, 0.6], [0.45, 0.75]))
        ids[horizon:ground] = ids_of["building"]
        ids[ground:] = ids_of["road"]
        for name in SCENE_CLASSES[3:]:
            y, x = rng.integers(0, size - size // 4, 2)
            h, w = rng.integers(size // 8, size // 3, 2)
            ids[y : y + h, x : x + w] = ids_of[name]
        image = palette[ids] + rng.normal(0, 12, (size, size, 3))
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(tmp / "images" / f"{i:04d}.png")
        Image.fromarray(ids).save(tmp / "labels" / f"{i:04d}.png")
    tmp.rename(folder)


def build(work: Path, comfyui: Path, train_size: int = 64) -> dict:
    """Every part above that is missing; returns ``{"timings": {...}, "files": TEMPLATE_FILES resolved}``."""
    work, comfyui = work.resolve(), comfyui.resolve()
    timings: dict = {}
    stock_loaders.ensure_base(work, comfyui, timings)
    data = work / "data_ade20k"
    if not (data / "labels").is_dir():
        t0 = time.time()
        write_ade20k_dataset(data, train_size)
        timings["ADE20K-labelled dataset"] = (time.time() - t0, float("nan"))
    for run, settings in TEMPLATE_RUNS.items():
        stock_loaders.ensure_run(work, run, settings, data=data, train_size=train_size, timings=timings)
        # only the export is used; the checkpoint (weights + Adam state: 4.2 GB per ControlNet) would triple the
        # folder, and pytest keeps its last three temporary folders
        shutil.rmtree(work / "runs" / run / "checkpoints", ignore_errors=True)
    files = {name: str(work / rel) for name, rel in TEMPLATE_FILES.items()}
    missing = [f"{name} ({path})" for name, path in files.items() if not Path(path).is_file()]
    if missing:
        raise stock_loaders.Failure("the runs did not write: " + ", ".join(missing))
    (work / "template_models.json").write_text(json.dumps(files, indent=1) + "\n")
    return {"timings": timings, "files": files}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, default=os.environ.get("COMFYUI_PATH"), help="ComfyUI checkout")
    parser.add_argument("--work", type=Path, required=True, help="work folder (reused: finished parts are kept)")
    parser.add_argument("--train-size", type=int, default=64, help="training resolution")
    args = parser.parse_args(argv)
    if args.comfyui is None or not (Path(args.comfyui) / "main.py").is_file():
        parser.error("--comfyui must name a ComfyUI checkout (or set COMFYUI_PATH)")
    try:
        result = build(args.work, Path(args.comfyui), args.train_size)
    except stock_loaders.Failure as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    for what, (seconds, rss) in result["timings"].items():
        print(f"  {what:45s} {seconds:7.1f} s  peak RSS {rss:5.1f} GB")
    print(json.dumps(result["files"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
