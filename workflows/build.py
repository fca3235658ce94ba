"""Build the example workflows: UI-format templates in ``workflows/`` (with ``.jpg`` diagrams) and the matching
API-format graphs in ``tests/graphs/``, from one description per workflow, so the two forms cannot drift.

Run from a checkout with the package installed (``pip install -e .``)::

    python workflows/build.py                       # write workflows/*.json, *.jpg and tests/graphs/*.json
    python workflows/build.py --check               # exit 1 if a written file differs from what would be built
    python workflows/build.py --core-nodes COMFYUI  # refresh tests/data/comfy_core_nodes.json from a ComfyUI checkout

How the UI form is derived (ComfyUI frontend rules, workflow ``version`` 0.4): a node's ``inputs`` are its socket
inputs (required, then optional, as in ``/object_info``), its ``widgets_values`` the widget inputs in the same
order, with the values of the widgets the frontend adds (`frontend_widgets`: "fixed" after a seed's "control after
generate", "image" for an ``image_upload`` combo's upload button). A widget fed by another node's output (``g.add(..., name=node.out(...))``) is
listed after the sockets as a converted widget (``"widget": {"name": ...}``, its value kept in ``widgets_values``).
Links are ``[id, from_node, from_slot, to_node, to_slot, type]``. Node specs come
from our schemas (through the ComfyUI stand-in in ``tests/comfy_stub``) and, for ComfyUI's own nodes, from
``tests/data/comfy_core_nodes.json`` (read from ComfyUI 0.8.0's node definitions by ``--core-nodes``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
GRAPHS = ROOT / "tests" / "graphs"
CORE_NODES_FILE = ROOT / "tests" / "data" / "comfy_core_nodes.json"
STUB = ROOT / "tests" / "comfy_stub" / "__init__.py"

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
#: ComfyUI core nodes the workflows use (plus a few neighbours), as listed in tests/data/comfy_core_nodes.json.
CORE_NODES = (
    "BasicScheduler",
    "CFGGuider",
    "CLIPTextEncode",
    "CheckpointLoaderSimple",
    "ControlNetApplyAdvanced",
    "ControlNetLoader",
    "EmptyLatentImage",
    "ImageBatch",
    "KSampler",
    "KSamplerSelect",
    "LoadImage",
    "LoraLoader",
    "LoraLoaderModelOnly",
    "PreviewImage",
    "RandomNoise",
    "SamplerCustomAdvanced",
    "SaveImage",
    "VAEDecode",
)
#: Combos whose options are files on the user's machine: any file name is accepted when validating.
DYNAMIC_COMBOS = {
    ("CheckpointLoaderSimple", "ckpt_name"),
    ("ControlNetLoader", "control_net_name"),
    ("LoadImage", "image"),
    ("LoraLoader", "lora_name"),
    ("LoraLoaderModelOnly", "lora_name"),
    ("L2IALDMControlNetLoader", "controlnet_name"),
    ("L2ISDMLoraLoader", "lora_name"),
}

# File names the templates refer to (the user puts their files there or picks others).
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
CN_RGB = "l2i_aldm_ade20k_rgb.safetensors"
CN_NATIVE = "l2i_aldm_ade20k.safetensors"
SDM_LORA = "l2i_sdm_ade20k.safetensors"
LAYOUT_IMAGE = "l2i_layout_ade20k.png"
NEGATIVE = "blurry, low quality, distorted"


#: Room left under an upload combo's node for the frontend's image preview (a square image at node width 320).
UPLOAD_PREVIEW_HEIGHT = 280
#: Room left under an output node (Save/Preview Image, Preview Label Map) for the images it shows after a run: in
#: the real frontend the node grows to hold them and, without the room, covered the nodes below (template 06).
RESULT_PREVIEW_HEIGHT = 280
#: Upload options of a COMBO input (V1 ``{"image_upload": True}``, V3 ``io.Combo.Input(upload=UploadType.image)``).
UPLOAD_KINDS = ("image_upload", "animated_image_upload", "video_upload", "audio_upload")


# ---------------------------------------------------------------------------------------------- frontend rules
def frontend_widgets(spec: dict) -> list[tuple[str, str, Any]]:
    """The widgets the ComfyUI frontend (comfyui-frontend-package 1.35) makes for a node, in ``widgets_values``
    order, as ``(input name, widget name, value a template stores)``; the value is ``None`` for an input's own
    widget (the node's value goes there) and set for a widget the frontend adds:

    - ``control_after_generate`` right after an INT whose definition says ``control_after_generate``, or, when the
      definition says nothing, whose name is ``seed`` or ``noise_seed`` (``False`` switches it off). Templates
      store "fixed": loading a template must not change its seed on the first run.
    - after a COMBO whose definition says ``control_after_generate``: that widget and a ``control_filter_list``
      (stored "").
    - ``upload`` (a button stored as "image") after the last required input when a required COMBO has
      ``image_upload``, ``animated_image_upload`` or ``video_upload`` (the frontend appends an ``upload`` input).

    Raises:
        ValueError: an ``audio_upload`` combo (its widgets are not modelled here).
    """
    out: list[tuple[str, str, Any]] = []
    upload = None
    for group in (False, True):  # required, then optional
        for inp in spec["inputs"]:
            if inp["optional"] != group or not inp["widget"]:
                continue
            if inp.get("audio_upload"):
                raise ValueError(f"{inp['name']}: audio_upload widgets are not modelled; add them to this rule")
            out.append((inp["name"], inp["name"], None))
            control = inp.get("control_after_generate")
            if inp["type"] == "INT" and control is None:
                control = inp["name"] in ("seed", "noise_seed")
            if inp["type"] in ("INT", "COMBO") and control:
                out.append((inp["name"], "control_after_generate", "fixed"))
            if inp["type"] == "COMBO" and control:
                out.append((inp["name"], "control_filter_list", ""))
            if not group and upload is None and any(inp.get(k) for k in UPLOAD_KINDS):
                upload = inp["name"]
        if not group and upload is not None:
            out.append((upload, "upload", "image"))
    return out


# ---------------------------------------------------------------------------------------------- node specs
def _spec_from_v1(name: str, input_types: dict, outputs: list[tuple[str, str]], output_node: bool) -> dict:
    """A node spec from V1-style ``INPUT_TYPES()`` (``{"required": {name: (type, opts)}, "optional": ...}``)."""
    inputs = []
    for group in ("required", "optional"):
        for input_name, entry in (input_types.get(group) or {}).items():
            kind, opts = entry[0], (entry[1] if len(entry) > 1 else {}) or {}
            item: dict[str, Any] = {"name": input_name, "optional": group == "optional"}
            if isinstance(kind, (list, tuple)) or str(kind) == "COMBO":
                options = list(kind) if isinstance(kind, (list, tuple)) else list(opts.get("options", []))
                item["type"] = "COMBO"
                if (name, input_name) in DYNAMIC_COMBOS:
                    item["dynamic"] = True
                else:
                    item["options"] = options
            else:
                item["type"] = str(kind)
            item["widget"] = item["type"] in WIDGET_TYPES and not opts.get("forceInput", False)
            for key in ("default", "min", "max", "step", "multiline"):
                if key in opts and not (key == "default" and item.get("dynamic")):
                    item[key] = opts[key]
            if opts.get("control_after_generate") is not None:  # False or a default mode count too
                item["control_after_generate"] = opts["control_after_generate"]
            for upload in UPLOAD_KINDS:
                if opts.get(upload):
                    item[upload] = True
            inputs.append(item)
    return {
        "inputs": inputs,
        "outputs": [{"name": n, "type": t} for n, t in outputs],
        "output_node": bool(output_node),
    }


def _v3_input_types(schema) -> dict:
    groups: dict[str, dict] = {"required": {}, "optional": {}}
    for inp in schema.inputs:
        opts = {}
        for key in ("default", "min", "max", "step"):
            value = getattr(inp, key, None)
            if value is not None:
                opts[key] = value
        if getattr(inp, "multiline", False):
            opts["multiline"] = True
        if getattr(inp, "control_after_generate", None) is not None:
            opts["control_after_generate"] = inp.control_after_generate
        if getattr(inp, "upload", None) is not None:
            opts[inp.upload.value] = True
        if getattr(inp, "force_input", None):
            opts["forceInput"] = True
        kind = inp.options if inp.io_type == "COMBO" else inp.io_type
        groups["optional" if inp.optional else "required"][inp.id] = (kind, opts)
    return groups


def our_specs() -> dict[str, dict]:
    """Specs of the pack's nodes, read from their schemas through the ComfyUI stand-in."""
    spec = importlib.util.spec_from_file_location("l2i_build_comfy_stub", STUB)
    stub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stub)
    with stub.installed():
        from layout2image.nodes import node_classes

        specs = {}
        for cls in node_classes():
            schema = cls.GET_SCHEMA()
            outputs = [(o.display_name or o.id, o.io_type) for o in schema.outputs]
            specs[schema.node_id] = _spec_from_v1(
                schema.node_id, _v3_input_types(schema), outputs, schema.is_output_node
            )
            specs[schema.node_id]["display_name"] = schema.display_name
    return specs


def core_specs() -> dict[str, dict]:
    return json.loads(CORE_NODES_FILE.read_text(encoding="utf-8"))["nodes"]


_PROBE = r"""
import asyncio, json, sys
sys.path.insert(0, COMFY_ROOT)
sys.argv = ["main.py", "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import comfyui_version, nodes
asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
out = {}
for name in NAMES:
    cls = nodes.NODE_CLASS_MAPPINGS[name]
    if hasattr(cls, "GET_NODE_INFO_V1"):
        info = cls.GET_NODE_INFO_V1()
        types, output_node = info["input"], info["output_node"]
        outputs = list(zip(info["output_name"], info["output"]))
    else:
        types = cls.INPUT_TYPES()
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        outputs, output_node = list(zip(names, cls.RETURN_TYPES)), getattr(cls, "OUTPUT_NODE", False)
    clean = {}
    for group in ("required", "optional"):
        if group in types:
            clean[group] = {k: [v[0] if isinstance(v[0], (list, tuple)) else str(v[0]),
                                {a: b for a, b in (v[1] if len(v) > 1 else {}).items() if a != "tooltip"}]
                            for k, v in types[group].items()}
    out[name] = [clean, [[str(a), str(b)] for a, b in outputs], bool(output_node)]
print("L2I-PROBE" + json.dumps({"version": comfyui_version.__version__, "nodes": out}, default=str))
"""


def probe_core_nodes(comfy_root: str | Path, names=CORE_NODES) -> dict:
    """Read the definitions of ``names`` from a ComfyUI checkout (in a subprocess, ``--cpu``)."""
    code = f"COMFY_ROOT = {str(Path(comfy_root).resolve())!r}\nNAMES = {list(names)!r}\n" + _PROBE
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=comfy_root, timeout=600)
    line = next((x for x in result.stdout.splitlines() if x.startswith("L2I-PROBE")), None)
    if result.returncode != 0 or line is None:
        raise RuntimeError(f"probing ComfyUI at {comfy_root} failed:\n{result.stderr[-3000:]}")
    raw = json.loads(line[len("L2I-PROBE") :])
    specs = {
        name: _spec_from_v1(name, types, [tuple(o) for o in outputs], output_node)
        for name, (types, outputs, output_node) in raw["nodes"].items()
    }
    return {"version": raw["version"], "nodes": specs}


def write_core_nodes(comfy_root: str | Path) -> None:
    probed = probe_core_nodes(comfy_root)
    data = {
        "comment": (
            "ComfyUI core node definitions the workflows use, read from ComfyUI's own INPUT_TYPES / V3 schemas by "
            "`python workflows/build.py --core-nodes COMFYUI_PATH` (file-list combos marked dynamic)."
        ),
        "comfyui_version": probed["version"],
        "nodes": probed["nodes"],
    }
    CORE_NODES_FILE.parent.mkdir(parents=True, exist_ok=True)
    CORE_NODES_FILE.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------- graphs
def _is_link(value: Any) -> bool:
    """Whether a value given to `Graph.add` is another node's output (``node.out(name)``)."""
    return isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], Node)


@dataclass
class Node:
    id: int
    type: str
    spec: dict
    widgets: dict[str, Any]
    links_in: dict[str, tuple[Node, int]] = field(default_factory=dict)
    title: str | None = None

    def out(self, name: str) -> tuple[Node, int]:
        """An output by name, for another node's input."""
        names = [o["name"] for o in self.spec["outputs"]]
        if name not in names:
            raise KeyError(f"{self.type} has no output {name!r}; it has {names}")
        return self, names.index(name)


class Graph:
    """One workflow: nodes with named widget values and links, turned into the UI and API forms."""

    def __init__(self, name: str, title: str, description: str, specs: dict[str, dict]):
        self.name, self.title, self.description = name, title, description
        self.specs = specs
        self.nodes: list[Node] = []

    def add(self, type_: str, title: str | None = None, **values) -> Node:
        spec = self.specs[type_]
        node = Node(len(self.nodes) + 1, type_, spec, {}, title=title)
        names = {i["name"]: i for i in spec["inputs"]}
        for key, value in values.items():
            if key not in names:
                raise KeyError(f"{type_} has no input {key!r}; it has {list(names)}")
            if names[key]["widget"] and not _is_link(value):
                node.widgets[key] = value
            else:  # a socket, or a widget fed by a link (the widget keeps its default value in the UI form)
                node.links_in[key] = value
        for inp in spec["inputs"]:
            if inp["widget"] and inp["name"] not in node.widgets:
                if "default" not in inp:
                    raise ValueError(f"{type_}.{inp['name']} has no default; give a value")
                node.widgets[inp["name"]] = inp["default"]
            elif not inp["widget"] and not inp["optional"] and inp["name"] not in node.links_in:
                raise ValueError(f"{type_}.{inp['name']} is a required input; connect it")
        self.nodes.append(node)
        return node

    # -------------------------------------------------------------- layout
    def _depths(self) -> dict[int, int]:
        depth: dict[int, int] = {}

        def visit(node: Node) -> int:
            if node.id not in depth:
                depth[node.id] = 1 + max((visit(src) for src, _ in node.links_in.values()), default=-1)
            return depth[node.id]

        for node in self.nodes:
            visit(node)
        return depth

    def _sizes(self) -> dict[int, list[int]]:
        sizes = {}
        for node in self.nodes:
            sockets = sum(1 for i in node.spec["inputs"] if not i["widget"])
            widgets = sum(1 for i in node.spec["inputs"] if i["widget"])
            rows = max(sockets + widgets, len(node.spec["outputs"]), 1)
            tall = any(i.get("multiline") for i in node.spec["inputs"] if i["widget"])
            # an upload combo shows the picked image under its widgets (the frontend grows the node to about
            # 320 px for a square image at this width); without the room it covers the nodes below
            preview = any(i.get(k) for i in node.spec["inputs"] for k in UPLOAD_KINDS)
            room = UPLOAD_PREVIEW_HEIGHT if preview else RESULT_PREVIEW_HEIGHT if node.spec["output_node"] else 0
            sizes[node.id] = [320, 46 + 24 * rows + (60 if tall else 0) + room]
        return sizes

    def _positions(self) -> dict[int, list[int]]:
        depth, sizes = self._depths(), self._sizes()
        columns: dict[int, list[Node]] = {}
        for node in self.nodes:
            columns.setdefault(depth[node.id], []).append(node)
        pos = {}
        for d, column in columns.items():
            y = 40
            for node in column:
                pos[node.id] = [40 + 380 * d, y]
                y += sizes[node.id][1] + 50
        return pos

    # -------------------------------------------------------------- forms
    @staticmethod
    def _ui_inputs(node: Node) -> list[dict]:
        """A UI node's ``inputs``: its sockets, then the widgets fed by a link (the frontend's converted widgets)."""
        sockets = [i for i in node.spec["inputs"] if not i["widget"]]
        linked = [i for i in node.spec["inputs"] if i["widget"] and i["name"] in node.links_in]
        return sockets + linked

    def _widget_values(self, node: Node) -> list:
        return [node.widgets[name] if stored is None else stored for name, _, stored in frontend_widgets(node.spec)]

    def ui(self) -> dict:
        links, link_ids = [], {}
        for node in self.nodes:
            for slot, inp in enumerate(self._ui_inputs(node)):
                if inp["name"] in node.links_in:
                    src, out_slot = node.links_in[inp["name"]]
                    link_id = len(links) + 1
                    links.append([link_id, src.id, out_slot, node.id, slot, src.spec["outputs"][out_slot]["type"]])
                    link_ids[(node.id, inp["name"])] = link_id
        depth, pos, sizes = self._depths(), self._positions(), self._sizes()
        order = {n.id: i for i, n in enumerate(sorted(self.nodes, key=lambda n: (depth[n.id], n.id)))}
        nodes = []
        for node in self.nodes:
            outputs = []
            for slot, out in enumerate(node.spec["outputs"]):
                used = [lk[0] for lk in links if lk[1] == node.id and lk[2] == slot]
                outputs.append({"name": out["name"], "type": out["type"], "links": used, "slot_index": slot})
            entry = {
                "id": node.id,
                "type": node.type,
                "pos": pos[node.id],
                "size": sizes[node.id],
                "flags": {},
                "order": order[node.id],
                "mode": 0,
                "inputs": [
                    {"name": i["name"], "type": i["type"], "link": link_ids.get((node.id, i["name"]))}
                    | ({"widget": {"name": i["name"]}} if i["widget"] else {})
                    for i in self._ui_inputs(node)
                ],
                "outputs": outputs,
                "properties": {"Node name for S&R": node.type},
                "widgets_values": self._widget_values(node),
            }
            if node.title:
                entry["title"] = node.title
            nodes.append(entry)
        return {
            "last_node_id": len(self.nodes),
            "last_link_id": len(links),
            "nodes": nodes,
            "links": links,
            "groups": [],
            "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}, "l2i": {"title": self.title, "about": self.description}},
            "version": 0.4,
        }

    def api(self) -> dict:
        prompt = {}
        for node in self.nodes:
            inputs: dict[str, Any] = {}
            for inp in node.spec["inputs"]:
                if inp["name"] in node.links_in:
                    src, slot = node.links_in[inp["name"]]
                    inputs[inp["name"]] = [str(src.id), slot]
                elif inp["widget"]:
                    inputs[inp["name"]] = node.widgets[inp["name"]]
            prompt[str(node.id)] = {
                "class_type": node.type,
                "inputs": inputs,
                "_meta": {"title": node.title or node.type},
            }
        return prompt


# ---------------------------------------------------------------------------------------------- the workflows
def _sd15(g: Graph):
    return g.add("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)


def _layout_from_image(g: Graph, label_set) -> Node:
    image = g.add("LoadImage", title="Layout (ADE20K colours)", image=LAYOUT_IMAGE)
    label_map = g.add("L2ILabelMapFromImage", image=image.out("IMAGE"), label_set=label_set, tolerance=12.0)
    g.add("L2IPreviewLabelMap", label_map=label_map.out("label_map"))
    return label_map


def _decode_save(g: Graph, samples, vae, prefix: str) -> Node:
    image = g.add("VAEDecode", samples=samples, vae=vae)
    return g.add("SaveImage", images=image.out("IMAGE"), filename_prefix=prefix)


def aldm_colour_map(specs) -> Graph:
    g = Graph(
        "01_aldm_controlnet_colour_map",
        "ALDM ControlNet from a colour map",
        "A colour-coded layout (ADE20K palette, e.g. a segmentation preprocessor's output) decoded into a label map "
        "and applied through a palette-RGB ALDM ControlNet with the stock KSampler.",
        specs,
    )
    ckpt = _sd15(g)
    cn = g.add("L2IALDMControlNetLoader", controlnet_name=CN_RGB)
    label_map = _layout_from_image(g, cn.out("label_set"))
    pos = g.add(
        "CLIPTextEncode", title="Positive", text="a sunny street in a european city, photo", clip=ckpt.out("CLIP")
    )
    neg = g.add("CLIPTextEncode", title="Negative", text=NEGATIVE, clip=ckpt.out("CLIP"))
    apply = g.add(
        "L2IApplyALDMControlNet",
        positive=pos.out("CONDITIONING"),
        negative=neg.out("CONDITIONING"),
        control_net=cn.out("control_net"),
        label_map=label_map.out("label_map"),
    )
    latent = g.add("EmptyLatentImage", width=512, height=512, batch_size=1)
    sample = g.add(
        "KSampler",
        model=ckpt.out("MODEL"),
        positive=apply.out("positive"),
        negative=apply.out("negative"),
        latent_image=latent.out("LATENT"),
        seed=42,
        steps=30,
        cfg=7.5,
        sampler_name="dpmpp_2m",
        scheduler="karras",
    )
    _decode_save(g, sample.out("LATENT"), ckpt.out("VAE"), "l2i/aldm_colour_map")
    return g


def aldm_native_class_embeddings(specs) -> Graph:
    g = Graph(
        "02_aldm_native_class_embeddings",
        "ALDM-native ControlNet with class embeddings",
        "An ALDM-native ControlNet (class-embedding hint at 1/4 size) whose table is built by the checkpoint's CLIP "
        "from the class names of a custom label set, and a label map read from an id PNG.",
        specs,
    )
    ckpt = _sd15(g)
    names = "\n".join(
        ["sky", "road", "sidewalk", "building", "tree", "grass", "car", "person", "bicycle", "traffic light"]
    )
    labels = g.add("L2ILabelSet", title="Custom classes", source="class names", class_names=names)
    cn = g.add(
        "L2IALDMControlNetLoader",
        controlnet_name=CN_NATIVE,
        table_source="CLIP",
        clip=ckpt.out("CLIP"),
        label_set=labels.out("label_set"),
    )
    label_map = g.add("L2ILoadLabelMap", path="l2i_layout_ids.png", label_set=cn.out("label_set"), mode="ids")
    g.add("L2IPreviewLabelMap", label_map=label_map.out("label_map"))
    pos = g.add("CLIPTextEncode", title="Positive", text="a quiet suburban street at dusk", clip=ckpt.out("CLIP"))
    neg = g.add("CLIPTextEncode", title="Negative", text=NEGATIVE, clip=ckpt.out("CLIP"))
    apply = g.add(
        "L2IApplyALDMControlNet",
        positive=pos.out("CONDITIONING"),
        negative=neg.out("CONDITIONING"),
        control_net=cn.out("control_net"),
        label_map=label_map.out("label_map"),
    )
    latent = g.add("EmptyLatentImage", width=512, height=512, batch_size=1)
    sample = g.add(
        "KSampler",
        model=ckpt.out("MODEL"),
        positive=apply.out("positive"),
        negative=apply.out("negative"),
        latent_image=latent.out("LATENT"),
        seed=7,
        steps=30,
        cfg=7.5,
        sampler_name="dpmpp_2m",
        scheduler="karras",
    )
    _decode_save(g, sample.out("LATENT"), ckpt.out("VAE"), "l2i/aldm_native")
    return g


def sdm_lora_spade(specs) -> Graph:
    g = Graph(
        "03_sdm_lora_spade",
        "SDM-LoRA + SPADE",
        "An SDM-LoRA: the LoRA through ComfyUI's LoRA machinery and the SPADE companion patching the decoder "
        "GroupNorms with the label map, sampled with the stock KSampler.",
        specs,
    )
    ckpt = _sd15(g)
    lora = g.add("L2ISDMLoraLoader", model=ckpt.out("MODEL"), lora_name=SDM_LORA, strength=1.0)
    label_map = _layout_from_image(g, lora.out("label_set"))
    spade = g.add(
        "L2IApplySPADE", model=lora.out("model"), label_map=label_map.out("label_map"), spade=lora.out("spade")
    )
    pos = g.add("CLIPTextEncode", title="Positive", text="a living room with a sofa and plants", clip=ckpt.out("CLIP"))
    neg = g.add("CLIPTextEncode", title="Negative", text=NEGATIVE, clip=ckpt.out("CLIP"))
    latent = g.add("EmptyLatentImage", width=512, height=512, batch_size=1)
    sample = g.add(
        "KSampler",
        model=spade.out("model"),
        positive=pos.out("CONDITIONING"),
        negative=neg.out("CONDITIONING"),
        latent_image=latent.out("LATENT"),
        seed=3,
        steps=30,
        cfg=7.0,
        sampler_name="dpmpp_2m",
        scheduler="karras",
    )
    _decode_save(g, sample.out("LATENT"), ckpt.out("VAE"), "l2i/sdm_lora")
    return g


def combined_layout_guidance(specs) -> Graph:
    g = Graph(
        "04_aldm_sdm_layout_guidance",
        "ALDM ControlNet + SDM-LoRA with layout guidance",
        "Both adapters on one label map (ADE20K): SPADE on the model, the ALDM-native ControlNet (companion table) on "
        "the conditioning, and the Layout CFG Guider adding guidance towards the layout, with SamplerCustomAdvanced.",
        specs,
    )
    ckpt = _sd15(g)
    lora = g.add("L2ISDMLoraLoader", model=ckpt.out("MODEL"), lora_name=SDM_LORA, strength=1.0)
    cn = g.add("L2IALDMControlNetLoader", controlnet_name=CN_NATIVE, table_source="companion file")
    label_map = _layout_from_image(g, cn.out("label_set"))
    spade = g.add(
        "L2IApplySPADE",
        model=lora.out("model"),
        label_map=label_map.out("label_map"),
        spade=lora.out("spade"),
        strength=0.8,
    )
    pos = g.add("CLIPTextEncode", title="Positive", text="a mountain lake with a wooden cabin", clip=ckpt.out("CLIP"))
    neg = g.add("CLIPTextEncode", title="Negative", text=NEGATIVE, clip=ckpt.out("CLIP"))
    apply = g.add(
        "L2IApplyALDMControlNet",
        positive=pos.out("CONDITIONING"),
        negative=neg.out("CONDITIONING"),
        control_net=cn.out("control_net"),
        label_map=label_map.out("label_map"),
        strength=0.9,
    )
    guider = g.add(
        "L2ILayoutGuider",
        model=spade.out("model"),
        positive=apply.out("positive"),
        negative=apply.out("negative"),
        text_cfg=7.0,
        layout_cfg=2.0,
    )
    noise = g.add("RandomNoise", noise_seed=11)
    sampler = g.add("KSamplerSelect", sampler_name="dpmpp_2m")
    sigmas = g.add("BasicScheduler", model=spade.out("model"), scheduler="karras", steps=30, denoise=1.0)
    latent = g.add("EmptyLatentImage", width=512, height=512, batch_size=1)
    sample = g.add(
        "SamplerCustomAdvanced",
        noise=noise.out("NOISE"),
        guider=guider.out("guider"),
        sampler=sampler.out("SAMPLER"),
        sigmas=sigmas.out("SIGMAS"),
        latent_image=latent.out("LATENT"),
    )
    _decode_save(g, sample.out("output"), ckpt.out("VAE"), "l2i/aldm_sdm_guided")
    return g


DOMAINS = {
    "night": "at night, street lights",
    "snow": "in heavy snow",
    "fog": "in dense fog",
    "rain": "in pouring rain, wet asphalt",
}


def batch_domains(specs) -> Graph:
    g = Graph(
        "05_batch_domain_prompts",
        "One layout, four domains",
        "The same layout and seed under four domain prompts (night, snow, fog, rain), one ControlNet application "
        "per prompt, the four images batched into one save.",
        specs,
    )
    ckpt = _sd15(g)
    cn = g.add("L2IALDMControlNetLoader", controlnet_name=CN_RGB)
    label_map = _layout_from_image(g, cn.out("label_set"))
    neg = g.add("CLIPTextEncode", title="Negative", text=NEGATIVE, clip=ckpt.out("CLIP"))
    latent = g.add("EmptyLatentImage", width=512, height=512, batch_size=1)
    images = []
    for word, domain in DOMAINS.items():
        pos = g.add("CLIPTextEncode", title=f"Positive: {word}", text=f"a city street {domain}", clip=ckpt.out("CLIP"))
        apply = g.add(
            "L2IApplyALDMControlNet",
            positive=pos.out("CONDITIONING"),
            negative=neg.out("CONDITIONING"),
            control_net=cn.out("control_net"),
            label_map=label_map.out("label_map"),
        )
        sample = g.add(
            "KSampler",
            model=ckpt.out("MODEL"),
            positive=apply.out("positive"),
            negative=apply.out("negative"),
            latent_image=latent.out("LATENT"),
            seed=2024,
            steps=25,
            cfg=7.5,
            sampler_name="dpmpp_2m",
            scheduler="karras",
        )
        images.append(g.add("VAEDecode", samples=sample.out("LATENT"), vae=ckpt.out("VAE")).out("IMAGE"))
    batch = images[0]
    for image in images[1:]:
        batch = g.add("ImageBatch", image1=batch, image2=image).out("IMAGE")
    g.add("SaveImage", images=batch, filename_prefix="l2i/domains")
    return g


def toy_world(specs) -> Graph:
    g = Graph(
        "06_toy_world_end_to_end",
        "The toy world end to end (CPU, no downloads)",
        "The toy world's tiny models shipped with the pack: a held-out toy street scene as a label map, an image "
        "generated from it and a prompt on the CPU (add a toy ControlNet from l2i-demo in the loader to follow the "
        "layout), saved, and scored by the toy evaluation segmenter (mIoU, error map).",
        specs,
    )
    from layout2image.core.toy import HELDOUT_START

    world = g.add("L2IToyWorldLoader")
    scene = g.add("L2IToySceneLabelMap", seed=0, index=HELDOUT_START, size=128, batch_size=1, domain="night")
    g.add("L2IPreviewLabelMap", label_map=scene.out("label_map"))
    image = g.add(
        "L2IToyGenerate",
        toy_world=world.out("toy_world"),
        label_map=scene.out("label_map"),
        prompt="a city street at night with two cars and a tree",
        steps=25,
        cfg=3.0,
        seed=7,
    )
    g.add("SaveImage", images=image.out("image"), filename_prefix="l2i/toy_world")
    score = g.add(
        "L2ILayoutAlignment",
        image=image.out("image"),
        label_map=scene.out("label_map"),
        segmenter_path=world.out("segmenter_path"),
    )
    g.add("PreviewImage", title="Layout errors (red = wrong class)", images=score.out("error_map"))
    return g


BUILDERS: tuple[Callable[[dict], Graph], ...] = (
    aldm_colour_map,
    aldm_native_class_embeddings,
    sdm_lora_spade,
    combined_layout_guidance,
    batch_domains,
    toy_world,
)


def all_specs() -> dict[str, dict]:
    return {**core_specs(), **our_specs()}


def build_all(specs: dict[str, dict] | None = None) -> list[Graph]:
    specs = all_specs() if specs is None else specs
    return [builder(specs) for builder in BUILDERS]


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def outputs(graphs: list[Graph]) -> dict[Path, str]:
    """Every JSON file the builder writes, with its text."""
    files = {}
    for graph in graphs:
        files[WORKFLOWS / f"{graph.name}.json"] = dumps(graph.ui())
        files[GRAPHS / f"{graph.name}.json"] = dumps(graph.api())
    return files


# ---------------------------------------------------------------------------------------------- thumbnails
_COLOURS = {"layout2image": (64, 120, 170), "core": (70, 70, 78)}


def thumbnail(graph: Graph, path: Path, width: int = 768) -> None:
    """A diagram of the node graph (boxes and links) as a JPEG, ``width`` pixels wide."""
    from PIL import Image, ImageDraw, ImageFont

    ui = graph.ui()
    boxes = {
        n["id"]: (n["pos"][0], n["pos"][1], n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
        for n in ui["nodes"]
    }
    right = max(b[2] for b in boxes.values()) + 40
    bottom = max(b[3] for b in boxes.values()) + 40
    scale = width / right
    height = max(int(bottom * scale) + 36, 200)
    img = Image.new("RGB", (width, height), (32, 32, 36))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text((10, 8), graph.title, fill=(235, 235, 235), font=font)

    def box(i):
        x0, y0, x1, y1 = boxes[i]
        return x0 * scale, y0 * scale + 28, x1 * scale, y1 * scale + 28

    for _, src, _, dst, _, _ in ui["links"]:
        a, b = box(src), box(dst)
        draw.line([(a[2], (a[1] + a[3]) / 2), (b[0], (b[1] + b[3]) / 2)], fill=(150, 150, 90), width=2)
    for node in ui["nodes"]:
        x0, y0, x1, y1 = box(node["id"])
        ours = node["type"].startswith("L2I")
        draw.rounded_rectangle([x0, y0, x1, y1], radius=6, fill=_COLOURS["layout2image" if ours else "core"])
        label = node.get("title") or graph.specs[node["type"]].get("display_name") or node["type"]
        for k, line in enumerate(textwrap.wrap(label, max(8, int((x1 - x0) / 6.5)))[:2]):
            draw.text((x0 + 5, y0 + 4 + 12 * k), line, fill=(245, 245, 245), font=font)
    img.save(path, "JPEG", quality=85, optimize=True)


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on a difference")
    parser.add_argument("--core-nodes", metavar="COMFYUI_PATH", help="refresh tests/data/comfy_core_nodes.json")
    parser.add_argument("--no-thumbnails", action="store_true", help="do not draw the .jpg diagrams")
    args = parser.parse_args(argv)
    if args.core_nodes:
        write_core_nodes(args.core_nodes)
        print(f"wrote {CORE_NODES_FILE.relative_to(ROOT)}")
    graphs = build_all()
    stale = []
    for path, text in outputs(graphs).items():
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path.relative_to(ROOT)))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path.relative_to(ROOT)}")
    if args.check:
        if stale:
            print("out of date (run python workflows/build.py):\n  " + "\n  ".join(stale))
            return 1
        return 0
    if not args.no_thumbnails:
        for graph in graphs:
            thumbnail(graph, WORKFLOWS / f"{graph.name}.jpg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
