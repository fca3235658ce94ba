"""The example workflows: every UI template in ``workflows/`` is a consistent graph of existing nodes with valid widget
values, its API form in ``tests/graphs/`` says the same, and ``workflows/build.py`` reproduces both exactly. With
``COMFYUI_PATH``, the core node list matches the real ComfyUI and the real ComfyUI's own ``validate_prompt`` accepts
every API graph (nothing is queued)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import layout2image

ROOT = Path(layout2image.__file__).resolve().parent
WORKFLOWS = ROOT / "workflows"
GRAPHS = ROOT / "tests" / "graphs"
CORE_FILE = ROOT / "tests" / "data" / "comfy_core_nodes.json"
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")

_spec = importlib.util.spec_from_file_location("l2i_workflows_build", WORKFLOWS / "build.py")
build = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = build  # dataclasses look their module up
_spec.loader.exec_module(build)

UI_FILES = sorted(WORKFLOWS.glob("*.json"))


@pytest.fixture(scope="module")
def specs() -> dict[str, dict]:
    """Our nodes' specs (from their schemas, through the stand-in) and ComfyUI's core ones (from the data file)."""
    return build.all_specs()


@pytest.fixture(scope="module")
def built(specs):
    return build.build_all(specs)


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _sockets(spec: dict) -> list[dict]:
    return [i for i in spec["inputs"] if not i["widget"]]


def _widgets(spec: dict) -> list[dict]:
    return [i for i in spec["inputs"] if i["widget"]]


def _check_value(where: str, inp: dict, value) -> None:
    kind = inp["type"]
    if kind == "COMBO":
        if inp.get("dynamic"):
            assert isinstance(value, str) and value, f"{where}: a file name is expected, got {value!r}"
        else:
            assert value in inp["options"], f"{where}: {value!r} is not one of {inp['options'][:10]}"
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), f"{where}: {value!r} is not a boolean"
    elif kind == "STRING":
        assert isinstance(value, str), f"{where}: {value!r} is not a string"
    elif kind in ("INT", "FLOAT"):
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: {value!r} is no number"
        if kind == "INT":
            assert isinstance(value, int), f"{where}: {value!r} is not an integer"
        assert math.isfinite(value), where
        assert value >= inp.get("min", -math.inf) and value <= inp.get("max", math.inf), (
            f"{where}: {value} outside [{inp.get('min')}, {inp.get('max')}]"
        )
    else:  # pragma: no cover - the spec converter only marks these types as widgets
        raise AssertionError(f"{where}: unknown widget type {kind}")


def _frontend_widgets(spec: dict) -> list[tuple[str, str, tuple]]:
    """The widgets the ComfyUI frontend makes for a node, in ``widgets_values`` order, as ``(input, widget name,
    allowed stored values)`` (``()`` for an input's own widget: any value of its type).

    Written from the frontend's code (comfyui-frontend-package 1.35.9: its INT and COMBO widget constructors,
    ``addValueControlWidget(s)`` and the Comfy.UploadImage extension), separately from ``workflows/build.py``, so
    that a rule the builder gets wrong fails here:

    - an INT gets "control_after_generate" when its definition's ``control_after_generate`` is true; when the
      definition does not mention it, when the INT is named ``seed`` or ``noise_seed`` (``false`` switches it off);
    - a COMBO whose definition says ``control_after_generate`` gets that widget and "control_filter_list";
    - the first required COMBO with ``image_upload`` / ``animated_image_upload`` / ``video_upload`` makes the
      frontend append a required ``upload`` input, whose button widget (stored as "image") follows the last
      required widget.
    """
    out, upload = [], None
    required = [i for i in _widgets(spec) if not i["optional"]]
    optional = [i for i in _widgets(spec) if i["optional"]]
    for inputs in (required, optional):
        for inp in inputs:
            out.append((inp["name"], inp["name"], ()))
            says = inp.get("control_after_generate")
            if inp["type"] == "INT" and (says if says is not None else inp["name"] in ("seed", "noise_seed")):
                out.append((inp["name"], "control_after_generate", CONTROL_VALUES))
            if inp["type"] == "COMBO" and says:
                out += [
                    (inp["name"], "control_after_generate", CONTROL_VALUES),
                    (inp["name"], "control_filter_list", ("",)),
                ]
            media = any(inp.get(f"{k}_upload") for k in ("image", "animated_image", "video"))
            if inputs is required and media and upload is None:
                upload = (inp["name"], "upload", ("image",))
        if inputs is required and upload:
            out.append(upload)
    return out


def _split_widget_values(where: str, spec: dict, values: list) -> dict:
    """Widget name -> value from a UI node's ``widgets_values``, read as the frontend reads them: one value per
    widget it makes (`_frontend_widgets`), in order, so a missing or extra value cannot shift the others silently."""
    out, values = {}, list(values)
    for input_name, name, allowed in _frontend_widgets(spec):
        assert values, f"{where}: widgets_values ends before {input_name!r} ({name})"
        value = values.pop(0)
        if name == input_name:
            out[name] = value
        else:
            assert value in allowed, f"{where}: {value!r} for {input_name}'s {name} widget, not one of {allowed}"
    assert not values, f"{where}: {len(values)} widget value(s) too many: {values}"
    return out


# ------------------------------------------------------------------------------------------------ UI templates
def test_the_templates_are_there():
    names = {p.stem for p in UI_FILES}
    assert len(names) == 6, names
    for path in UI_FILES:
        thumb = path.with_suffix(".jpg")
        assert thumb.is_file() and thumb.stat().st_size < 100_000, f"{thumb.name}: missing or over 100 KB"
        assert (GRAPHS / path.name).is_file(), f"no API graph for {path.name}"
    assert not (ROOT / "example_workflows").exists(), "keep templates in workflows/ only (same URL)"


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_is_a_consistent_graph_of_known_nodes(path, specs):
    wf = _load(path)
    assert wf["version"] == 0.4 and isinstance(wf["groups"], list) and "ds" in wf["extra"]
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]), "node ids must be unique"
    assert wf["last_node_id"] >= max(nodes)
    link_ids = [lk[0] for lk in wf["links"]]
    assert len(set(link_ids)) == len(link_ids), "link ids must be unique"
    assert wf["last_link_id"] >= max(link_ids)
    for node in wf["nodes"]:
        where = f"{path.name} node {node['id']} ({node['type']})"
        assert node["type"] in specs, f"{where}: not a node of the pack nor a ComfyUI core node in {CORE_FILE.name}"
        spec = specs[node["type"]]
        sockets = _sockets(spec)
        # sockets first, then widgets fed by a link (the frontend's converted widgets, marked "widget")
        plain = [i for i in node["inputs"] if "widget" not in i]
        converted = node["inputs"][len(plain) :]
        assert [(i["name"], i["type"]) for i in plain] == [(i["name"], i["type"]) for i in sockets], where
        assert [(o["name"], o["type"]) for o in node["outputs"]] == [(o["name"], o["type"]) for o in spec["outputs"]]
        for inp, sock in zip(plain, sockets):
            assert inp["link"] is not None or sock["optional"], f"{where}: required input {inp['name']} unconnected"
        widget_types = {i["name"]: i["type"] for i in _widgets(spec)}
        for inp in converted:
            assert "widget" in inp and inp["widget"] == {"name": inp["name"]}, f"{where}: {inp} after a widget input"
            assert widget_types.get(inp["name"]) == inp["type"], f"{where}: {inp['name']} is no {inp['type']} widget"
            assert inp["link"] is not None, f"{where}: widget input {inp['name']} listed without a link"
        values = _split_widget_values(where, spec, node["widgets_values"])
        for inp in _widgets(spec):
            _check_value(f"{where}.{inp['name']}", inp, values[inp["name"]])
        assert [o["slot_index"] for o in node["outputs"]] == list(range(len(node["outputs"])))
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        where = f"{path.name} link {link_id}"
        assert src in nodes and dst in nodes, f"{where}: unknown node"
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert link_id in out["links"] and inp["link"] == link_id, f"{where}: not recorded on both ends"
        assert kind == out["type"] == inp["type"], f"{where}: {out['type']} -> {inp['type']} carried as {kind}"
    recorded = {lk for n in wf["nodes"] for o in n["outputs"] for lk in o["links"]}
    assert recorded == set(link_ids) == {i["link"] for n in wf["nodes"] for i in n["inputs"]} - {None}
    assert any(specs[n["type"]]["output_node"] for n in wf["nodes"]), "a workflow needs an output node"


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_nodes_do_not_cover_each_other(path, specs):
    """No two nodes overlap (the frontend draws a 30 px title bar above ``pos``), and a node with an image upload
    or an output node (which shows its images after a run) has room for the preview the frontend shows under its
    widgets (about 320 px tall for a square image; in real ComfyUI the Load Image preview covered the nodes below
    in template 04, and after a run the Preview Label Map and Save Image previews covered them in template 06)."""
    wf = _load(path)
    rects = [(n["id"], n["pos"][0], n["pos"][1] - 30, n["size"][0], n["size"][1] + 30) for n in wf["nodes"]]
    for i, (a, ax, ay, aw, ah) in enumerate(rects):
        for b, bx, by, bw, bh in rects[i + 1 :]:
            assert not (ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah), f"nodes {a} and {b} overlap"
    for node in wf["nodes"]:
        spec = specs[node["type"]]
        if spec["output_node"] or any(i.get("image_upload") for i in spec["inputs"]):
            assert node["size"][1] + 30 >= 330, f"{path.name} node {node['id']}: no room for the image preview"


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_api_graph_says_the_same_as_the_ui_form(path, specs):
    """UI -> API conversion done here (as the frontend does), compared with tests/graphs/."""
    wf = _load(path)
    links = {lk[0]: lk for lk in wf["links"]}
    expected = {}
    for node in wf["nodes"]:
        spec = specs[node["type"]]
        inputs = dict(_split_widget_values(node["type"], spec, node["widgets_values"]))
        for inp in node["inputs"]:
            if inp["link"] is not None:
                _, src, slot, *_ = links[inp["link"]]
                inputs[inp["name"]] = [str(src), slot]
        order = [i["name"] for i in spec["inputs"] if i["name"] in inputs]
        expected[str(node["id"])] = {
            "class_type": node["type"],
            "inputs": {k: inputs[k] for k in order},
            "_meta": {"title": node.get("title") or node["type"]},
        }
    assert _load(GRAPHS / path.name) == expected


def test_builder_reproduces_the_committed_files(built):
    files = build.outputs(built)
    assert {p.name for p in files if p.parent == WORKFLOWS} == {p.name for p in UI_FILES}
    assert {p.name for p in files if p.parent == GRAPHS} == {p.name for p in GRAPHS.glob("*.json")}
    for path, text in files.items():
        assert path.read_text(encoding="utf-8") == text, f"{path.relative_to(ROOT)} is stale: run workflows/build.py"


def test_core_node_list_covers_the_workflows(specs):
    core = json.loads(CORE_FILE.read_text(encoding="utf-8"))
    assert core["comfyui_version"] == "0.8.0"
    assert sorted(core["nodes"]) == sorted(build.CORE_NODES)
    used = {n["type"] for p in UI_FILES for n in _load(p)["nodes"]}
    ours = {c for c in specs if c.startswith("L2I")}
    assert used <= set(core["nodes"]) | ours
    assert {"L2IALDMControlNetLoader", "L2IApplyALDMControlNet", "L2ISDMLoraLoader", "L2IApplySPADE"} <= used
    assert {"L2ILayoutGuider", "SamplerCustomAdvanced"} <= used
    assert {"L2IToyWorldLoader", "L2IToySceneLabelMap", "L2IToyGenerate", "L2ILayoutAlignment"} <= used


def test_checks_catch_broken_graphs(specs, tmp_path):
    """The validators above are not vacuous: a value out of range, a retyped link and an unknown node type fail."""
    good = _load(UI_FILES[0])
    node = next(n for n in good["nodes"] if n["type"] == "L2IApplyALDMControlNet")
    spec = specs[node["type"]]
    strength = next(i for i in _widgets(spec) if i["name"] == "strength")
    with pytest.raises(AssertionError, match="outside"):
        _check_value("strength", strength, 11.0)  # max 10
    with pytest.raises(AssertionError, match="too many"):
        _split_widget_values("x", spec, [*node["widgets_values"], 1.0])
    path = tmp_path / "broken.json"
    broken = json.loads(json.dumps(good))
    broken["links"][0][5] = "LATENT" if broken["links"][0][5] != "LATENT" else "IMAGE"
    path.write_text(json.dumps(broken))
    with pytest.raises(AssertionError, match="carried as"):
        test_ui_workflow_is_a_consistent_graph_of_known_nodes(path, specs)
    broken = json.loads(json.dumps(good))
    broken["nodes"][0]["type"] = "NoSuchNode"
    path.write_text(json.dumps(broken))
    with pytest.raises(AssertionError, match="not a node of the pack"):
        test_ui_workflow_is_a_consistent_graph_of_known_nodes(path, specs)


def test_widget_values_follow_the_frontend_rules(specs):
    """The frontend's extra widgets: a seed named INT gets "control after generate" unless its definition says
    false, a combo only when it says so (with a filter list), an image upload combo an upload button after the
    required widgets; the builder writes them all."""

    def names(*inputs):
        spec = {"inputs": [{"widget": True, "optional": False} | i for i in inputs], "outputs": []}
        got = [name for _, name, _ in _frontend_widgets(spec)]
        assert got == [name for _, name, _ in build.frontend_widgets(spec)], "the builder's rule differs"
        return got

    assert names({"name": "seed", "type": "INT"}) == ["seed", "control_after_generate"]
    assert names({"name": "noise_seed", "type": "INT"}) == ["noise_seed", "control_after_generate"]
    assert names({"name": "seed", "type": "INT", "control_after_generate": False}) == ["seed"]
    assert names({"name": "steps", "type": "INT"}) == ["steps"]
    assert names({"name": "index", "type": "INT", "control_after_generate": True}) == [
        "index",
        "control_after_generate",
    ]
    assert names({"name": "seed", "type": "FLOAT"}) == ["seed"]
    assert names({"name": "sampler", "type": "COMBO", "options": ["a"]}) == ["sampler"]
    assert names({"name": "sampler", "type": "COMBO", "control_after_generate": True}) == [
        "sampler",
        "control_after_generate",
        "control_filter_list",
    ]
    assert names(
        {"name": "image", "type": "COMBO", "image_upload": True},
        {"name": "seed", "type": "INT"},
        {"name": "scale", "type": "FLOAT", "optional": True},
    ) == ["image", "seed", "control_after_generate", "upload", "scale"]
    assert [n for _, n, _ in _frontend_widgets(specs["LoadImage"])] == ["image", "upload"]
    for node_type, spec in specs.items():  # both rules agree on every node the templates may use
        assert _frontend_widgets(spec) == [
            (i, n, () if v is None else (CONTROL_VALUES if n == "control_after_generate" else (v,)))
            for i, n, v in build.frontend_widgets(spec)
        ], node_type

    # template 06 as it was written before the pack said control_after_generate for the scene seed: five values
    # where the frontend reads six (it showed "control after generate = 1000000" and batch_size = NaN)
    wf = _load(WORKFLOWS / "06_toy_world_end_to_end.json")
    scene = next(n for n in wf["nodes"] if n["type"] == "L2IToySceneLabelMap")
    assert len(scene["widgets_values"]) == 6 and scene["widgets_values"][1] in CONTROL_VALUES
    old = [v for i, v in enumerate(scene["widgets_values"]) if i != 1]
    with pytest.raises(AssertionError, match="ends before|not one of"):
        _split_widget_values("06 scene", specs["L2IToySceneLabelMap"], old)


def test_the_packs_seeds_say_whether_they_get_the_control_widget(specs):
    """Every INT of the pack that the frontend would give a control widget by its name says so in its schema, so
    the node definition, the templates and what a user sees agree (and a later rename cannot change it)."""
    for node_type, spec in specs.items():
        if not node_type.startswith("L2I"):
            continue
        for inp in _widgets(spec):
            if inp["type"] == "INT" and inp["name"] in ("seed", "noise_seed"):
                assert "control_after_generate" in inp, f"{node_type}.{inp['name']}: say control_after_generate"


# ------------------------------------------------------------------------------------------------ real ComfyUI
needs_comfyui = pytest.mark.skipif(
    not os.environ.get("COMFYUI_PATH"), reason="set COMFYUI_PATH to a ComfyUI checkout to run"
)


@needs_comfyui
def test_core_node_list_matches_the_real_comfyui():
    probed = build.probe_core_nodes(os.environ["COMFYUI_PATH"])
    core = json.loads(CORE_FILE.read_text(encoding="utf-8"))
    assert probed["version"] == core["comfyui_version"]
    assert probed["nodes"] == core["nodes"], "refresh with: python workflows/build.py --core-nodes $COMFYUI_PATH"


_VALIDATE = r"""
import asyncio, json, os, sys, tempfile
from pathlib import Path
sys.path.insert(0, COMFY_ROOT)
sys.argv = ["main.py", "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import folder_paths, nodes, execution

tmp = Path(tempfile.mkdtemp())
graphs = {p.name: json.loads(p.read_text()) for p in sorted(Path(GRAPHS).glob("*.json"))}
# empty stand-ins for the files the graphs name, so the file-list combos accept them
folders = {"CheckpointLoaderSimple": ("checkpoints", "ckpt_name"), "L2ISDMLoraLoader": ("loras", "lora_name"),
           "L2IALDMControlNetLoader": ("controlnet", "controlnet_name")}
(tmp / "input").mkdir()
folder_paths.set_input_directory(str(tmp / "input"))
for graph in graphs.values():
    for node in graph.values():
        if node["class_type"] in folders:
            folder, key = folders[node["class_type"]]
            (tmp / folder).mkdir(exist_ok=True)
            (tmp / folder / node["inputs"][key]).write_bytes(b"")
            folder_paths.add_model_folder_path(folder, str(tmp / folder), is_default=True)
        if node["class_type"] == "LoadImage":
            (tmp / "input" / node["inputs"]["image"]).write_bytes(b"")

asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
assert asyncio.run(nodes.load_custom_node(PACK)), "the pack failed to load"
for name, graph in graphs.items():
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt("l2i-test", graph, None))
    assert valid, (name, error, node_errors)
    assert outputs, name
    print("valid", name, len(graph))
"""


@needs_comfyui
def test_real_comfyui_validates_every_api_graph():
    """The pack loaded by ComfyUI's own custom-node loader, then ``execution.validate_prompt`` (the check behind
    POST /prompt: node types, link types, required inputs, combo choices, ranges) on each API graph."""
    comfy_root = Path(os.environ["COMFYUI_PATH"]).resolve()
    code = f"COMFY_ROOT = {str(comfy_root)!r}\nPACK = {str(ROOT)!r}\nGRAPHS = {str(GRAPHS)!r}\n" + _VALIDATE
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=comfy_root, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("valid ") == len(UI_FILES), result.stdout
