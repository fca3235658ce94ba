"""Toy-world nodes through the ComfyUI stand-in (tests/comfy_stub), with the shipped toy weights when present, and
workflow 06 run to an image by a real headless ComfyUI server when ``COMFYUI_PATH`` names a checkout."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import layout2image
from layout2image.core.labels import get_label_set
from layout2image.core.toy import DOMAINS, make_label_map
from layout2image.core.toy.generate import ToyWorldError, check_toy_labels
from layout2image.testing import free_port, http_json

_STUB_FILE = Path(__file__).resolve().parent / "comfy_stub" / "__init__.py"
_spec = importlib.util.spec_from_file_location("l2i_test_comfy_stub", _STUB_FILE)
comfy_stub = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(comfy_stub)

ROOT = Path(layout2image.__file__).resolve().parent
TOY_WEIGHTS = ROOT / "weights" / "toy"
GRAPH_06 = ROOT / "tests" / "graphs" / "06_toy_world_end_to_end.json"
TOY = get_label_set("toy")
SIZE = 64  # multiples of 8 work at any size; 64 keeps a CPU run well under a second

needs_toy_weights = pytest.mark.skipif(
    not (TOY_WEIGHTS / "model_index.json").is_file(),
    reason="the shipped toy base models (weights/toy/model_index.json) are missing; see docs/TOY_WORLD.md",
)


@pytest.fixture(scope="module")
def comfy():
    with comfy_stub.installed():
        yield SimpleNamespace(
            nodes=importlib.import_module("layout2image.nodes"),
            toy=importlib.import_module("layout2image.nodes.toy"),
            types=importlib.import_module("layout2image.nodes.types"),
        )


@pytest.fixture(scope="module")
def world(comfy):
    """The shipped toy world, loaded once through the loader node."""
    if not (TOY_WEIGHTS / "model_index.json").is_file():
        pytest.skip("the shipped toy base models are missing")
    models, label_set, segmenter_path, info = comfy.toy.L2IToyWorldLoader.execute().args
    return SimpleNamespace(models=models, label_set=label_set, segmenter_path=segmenter_path, info=info)


def _scene(comfy, size=SIZE, index=1_000_000, batch_size=1):
    return comfy.toy.L2IToySceneLabelMap.execute(seed=0, index=index, size=size, batch_size=batch_size).args[0]


def _generate(comfy, models, label_map, **kw):
    kw = {"prompt": "a city street at night with two cars", "steps": 3, "cfg": 3.0, "seed": 1, **kw}
    return comfy.toy.L2IToyGenerate.execute(toy_world=models, label_map=label_map, **kw).args[0]


# ------------------------------------------------------------------------------------------------ schemas
def test_toy_nodes_are_registered_with_pack_conventions(comfy):
    assert "toy" in comfy.nodes.NODE_MODULES
    ids = [n.GET_SCHEMA().node_id for n in comfy.nodes.node_classes()]
    assert {"L2IToyWorldLoader", "L2IToySceneLabelMap", "L2IToyGenerate"} <= set(ids)
    assert comfy.types.ToyWorldType.io_type == "L2I_TOY_WORLD"
    for node in comfy.toy.NODES:
        schema = node.GET_SCHEMA()
        assert schema.node_id.startswith("L2IToy") and schema.category == "layout2image/toy"
        assert schema.description.strip() and schema.display_name
        for inp in schema.inputs:
            assert inp.tooltip and inp.tooltip.strip(), f"{schema.node_id}.{inp.id} has no tooltip"
        for out in schema.outputs:
            assert out.tooltip and out.tooltip.strip(), f"{schema.node_id} output {out.id} has no tooltip"
    loader = comfy.toy.L2IToyWorldLoader.GET_SCHEMA()
    assert [o.io_type for o in loader.outputs] == ["L2I_TOY_WORLD", "L2I_LABEL_SET", "STRING", "STRING"]
    generate = comfy.toy.L2IToyGenerate.GET_SCHEMA()
    assert [i.id for i in generate.inputs] == [
        "toy_world",
        "label_map",
        "prompt",
        "negative_prompt",
        "steps",
        "cfg",
        "seed",
        "control_strength",
    ]
    assert [i.io_type for i in generate.inputs[:2]] == ["L2I_TOY_WORLD", "L2I_LABEL_MAP"]
    assert [o.io_type for o in generate.outputs] == ["IMAGE"]
    seed = next(i for i in generate.inputs if i.id == "seed")
    assert seed.control_after_generate and seed.max == 0xFFFFFFFFFFFFFFFF


# ------------------------------------------------------------------------------------------------ scenes
def test_scene_label_map_is_the_toy_worlds_and_deterministic(comfy):
    node = comfy.toy.L2IToySceneLabelMap
    label_map, caption = node.execute(seed=0, index=5, size=48, batch_size=2, domain="snow").args
    assert isinstance(label_map, comfy.types.LabelMap) and label_map.label_set.same_classes(TOY)
    assert label_map.ids.shape == (2, 48, 48) and label_map.ids.dtype == torch.int64
    np.testing.assert_array_equal(label_map.numpy()[0], make_label_map(48, 0, 5))
    np.testing.assert_array_equal(label_map.numpy()[1], make_label_map(48, 0, 6))
    assert "snow" in caption.split()
    again, caption_again = node.execute(seed=0, index=5, size=48, batch_size=2, domain="snow").args
    assert torch.equal(again.ids, label_map.ids) and caption_again == caption
    for domain in DOMAINS:
        assert domain in node.execute(seed=0, index=5, size=48, domain=domain).args[1].split()
    with pytest.raises(ToyWorldError, match="rain"):
        node.execute(seed=0, index=5, size=48, domain="rain")


# ------------------------------------------------------------------------------------------------ errors (no weights)
def test_label_checks_name_the_problem():
    with pytest.raises(ToyWorldError, match=r"label set 'cityscapes'.*toy label set.*Toy Scene Label Map"):
        check_toy_labels(torch.zeros(1, 64, 64, dtype=torch.long), get_label_set("cityscapes"))
    with pytest.raises(ToyWorldError, match=r"100x64 pixels.*multiples of 8 \(e\.g\. 96x64\).*Resize Label Map"):
        check_toy_labels(torch.zeros(1, 100, 64, dtype=torch.long), TOY)
    check_toy_labels(torch.zeros(2, 64, 40, dtype=torch.long), TOY)  # fine


def test_loader_errors_name_the_path(comfy, tmp_path):
    loader = comfy.toy.L2IToyWorldLoader
    with pytest.raises(ToyWorldError, match="holds no toy base models"):
        loader.execute(folder=str(tmp_path))
    with pytest.raises(ToyWorldError, match="does not exist"):
        comfy.toy.resolve_toy_controlnet(str(tmp_path / "nope.safetensors"))
    with pytest.raises(ToyWorldError, match="without config.json"):
        comfy.toy.resolve_toy_controlnet(str(tmp_path))
    assert comfy.toy.resolve_toy_controlnet("  ") is None
    export = tmp_path / "demo" / "run" / "export" / "controlnet"
    export.mkdir(parents=True)
    (export / "config.json").write_text("{}")
    assert comfy.toy.resolve_toy_controlnet(str(tmp_path / "demo")) == export  # an l2i-demo output folder
    assert loader.fingerprint_inputs(folder=str(tmp_path)) == (str(tmp_path), "")


# ------------------------------------------------------------------------------------------------ with the weights
@needs_toy_weights
def test_loader_outputs(world):
    assert world.models.controlnet is None and world.label_set.same_classes(TOY)
    assert world.models.vae_scale_factor == 8
    assert Path(world.models.source) == TOY_WEIGHTS.resolve()
    assert "no ControlNet" in world.info
    if (TOY_WEIGHTS / "segmenter" / "config.json").is_file():
        assert Path(world.segmenter_path) == TOY_WEIGHTS.resolve() / "segmenter"


@needs_toy_weights
def test_generate_shape_range_and_determinism(comfy, world):
    label_map = _scene(comfy, batch_size=2)
    before = label_map.ids.clone()
    image = _generate(comfy, world.models, label_map)
    assert image.shape == (2, SIZE, SIZE, 3) and image.dtype == torch.float32
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0 and float(image.std()) > 0.01
    assert torch.equal(label_map.ids, before)
    assert torch.equal(_generate(comfy, world.models, label_map), image)  # same seed, same image
    assert not torch.equal(_generate(comfy, world.models, label_map, seed=2), image)
    assert not torch.equal(_generate(comfy, world.models, label_map, prompt="a road in thick fog"), image)
    wide = comfy.types.LabelMap(torch.zeros(1, 32, 48, dtype=torch.long), TOY)
    assert _generate(comfy, world.models, wide, steps=1).shape == (1, 32, 48, 3)


@needs_toy_weights
def test_generate_errors_name_the_problem(comfy, world):
    city = comfy.types.LabelMap(torch.zeros(1, 64, 64, dtype=torch.long), get_label_set("cityscapes"))
    with pytest.raises(ToyWorldError, match="cityscapes"):
        _generate(comfy, world.models, city)
    with pytest.raises(ToyWorldError, match="multiples of 8"):
        _generate(comfy, world.models, _scene(comfy, size=100))
    with pytest.raises(ToyWorldError, match="Toy World Loader"):
        _generate(comfy, object(), _scene(comfy))


def _toy_controlnet(world, path: Path, *, randomise: bool, label_set=TOY) -> Path:
    """A one-hot ControlNet built from the toy UNet (as the toy preset trains), saved with our metadata."""
    from layout2image.core.controlnet import build_controlnet
    from layout2image.weights import WeightsMetadata, save_controlnet

    model = build_controlnet(world.models.unet, "onehot", num_classes=label_set.num_classes)
    if randomise:  # the zero convs get weights, so the ControlNet changes the result
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.startswith(("controlnet_cond_embedding.conv_out", "controlnet_down_blocks", "controlnet_mid")):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    md = WeightsMetadata(kind="controlnet", hint_encoding="onehot", label_set=label_set, base_model="builtin:toy")
    return save_controlnet(model, path, to="diffusers", metadata=md)


def test_generate_runs_the_toy_models_on_one_cpu_thread_and_puts_the_setting_back(comfy, monkeypatch):
    """The tiny toy models run on TOY_CPU_THREADS intra-op threads (many threads on busy cores made template 06
    several times slower); the process-wide thread count is restored afterwards, also when generation fails."""
    seen = []

    def fake_generate(*args, **kwargs):
        seen.append(torch.get_num_threads())
        if kwargs["seed"] == 13:
            raise ToyWorldError("boom")
        return torch.zeros(1, 3, 8, 8)

    monkeypatch.setattr(comfy.toy, "generate_toy_images", fake_generate)
    label_map = _scene(comfy, size=16)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        _generate(comfy, object.__new__(comfy.toy.ToyModels), label_map)
        assert seen == [comfy.toy.TOY_CPU_THREADS] and torch.get_num_threads() == 3
        with pytest.raises(ToyWorldError, match="boom"):
            _generate(comfy, object.__new__(comfy.toy.ToyModels), label_map, seed=13)
        assert seen[-1] == comfy.toy.TOY_CPU_THREADS and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


@needs_toy_weights
def test_generate_with_a_toy_controlnet(comfy, world, tmp_path):
    label_map = _scene(comfy)
    plain = _generate(comfy, world.models, label_map)
    fresh = _toy_controlnet(world, tmp_path / "fresh.safetensors", randomise=False)
    models, _, _, info = comfy.toy.L2IToyWorldLoader.execute(controlnet_path=str(fresh)).args
    assert models.hint.kind == "onehot" and models.hint.channels == TOY.num_classes and "onehot" in info
    assert models.unet is world.models.unet  # the base models are shared by the cache, not loaded again
    # a fresh ControlNet (zero convs zero) adds nothing; strength 0 skips it
    torch.testing.assert_close(_generate(comfy, models, label_map), plain, atol=1e-5, rtol=0)
    trained = _toy_controlnet(world, tmp_path / "trained.safetensors", randomise=True)
    models = comfy.toy.L2IToyWorldLoader.execute(controlnet_path=str(trained)).args[0]
    assert torch.equal(_generate(comfy, models, label_map, control_strength=0.0), plain)
    steered = _generate(comfy, models, label_map)
    assert float((steered - plain).abs().max()) > 1e-3
    other = _generate(comfy, models, _scene(comfy, index=1_000_001))
    assert not torch.equal(other, steered)  # the layout now matters


@needs_toy_weights
def test_controlnet_for_another_label_set_is_refused(comfy, world, tmp_path):
    path = _toy_controlnet(
        world, tmp_path / "city.safetensors", randomise=False, label_set=get_label_set("cityscapes")
    )
    with pytest.raises(ValueError, match="cityscapes"):
        comfy.toy.L2IToyWorldLoader.execute(controlnet_path=str(path))


@needs_toy_weights
def test_workflow_06_graph_runs_through_the_stand_in(comfy, world):
    """The API graph of workflow 06, executed node by node through the stand-in (at the graph's own settings)."""
    graph = json.loads(GRAPH_06.read_text(encoding="utf-8"))
    classes = {cls.GET_SCHEMA().node_id: cls for cls in comfy.nodes.node_classes()}
    results: dict[str, tuple] = {}
    for node_id in sorted(graph, key=int):  # the builder numbers nodes in dependency order
        node = graph[node_id]
        if node["class_type"] not in classes:  # SaveImage / PreviewImage: ComfyUI's own
            continue
        kwargs = {
            k: results[v[0]][v[1]] if isinstance(v, list) else v
            for k, v in node["inputs"].items()
            if not isinstance(v, list) or v[0] in results
        }
        results[node_id] = tuple(classes[node["class_type"]].execute(**kwargs).args)
    image = next(r[0] for k, r in results.items() if graph[k]["class_type"] == "L2IToyGenerate")
    assert image.shape == (1, 128, 128, 3)
    miou = next(r[0] for k, r in results.items() if graph[k]["class_type"] == "L2ILayoutAlignment")
    assert 0.0 <= miou <= 1.0


# ------------------------------------------------------------------------------------------------ real ComfyUI
def _wait_for_history(base: str, prompt_id: str, server, log: Path, timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, "ComfyUI exited while running the prompt:\n" + log.read_text()[-4000:]
        history = http_json(f"{base}/history/{prompt_id}")
        entry = history.get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None:
            if entry["status"].get("status_str") in ("success", "error"):
                return entry
        time.sleep(0.5)
    raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s:\n" + log.read_text()[-4000:])


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="set COMFYUI_PATH to a ComfyUI checkout to run")
@needs_toy_weights
def test_real_comfyui_server_runs_workflow_06_to_an_image(tmp_path):
    """Start ComfyUI headless on the CPU with the pack in a fresh custom_nodes folder, queue workflow 06
    (POST /prompt), poll /history, check the saved image; then a bad graph gives a node error naming the problem
    and the server keeps answering."""
    comfy_root = Path(os.environ["COMFYUI_PATH"]).resolve()
    base_dir = tmp_path / "comfy"
    (base_dir / "custom_nodes").mkdir(parents=True)
    (base_dir / "custom_nodes" / "layout2image").symlink_to(ROOT, target_is_directory=True)
    web_root = tmp_path / "web"  # headless: no frontend package needed
    web_root.mkdir()
    (web_root / "index.html").write_text("<!doctype html><title>headless</title>\n")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "main.py",
        "--cpu",
        "--listen",
        "127.0.0.1",
        "--port",
        str(port),
        "--base-directory",
        str(base_dir),
        "--front-end-root",
        str(web_root),
        "--disable-auto-launch",
        "--disable-api-nodes",
        "--database-url",
        "sqlite:///:memory:",
    ]
    log = tmp_path / "comfyui.log"
    with log.open("w") as out:
        server = subprocess.Popen(cmd, cwd=comfy_root, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, "ComfyUI did not start:\n" + log.read_text()[-4000:]
            try:
                info = http_json(f"{base}/object_info/L2IToyGenerate", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert time.monotonic() < deadline, "ComfyUI did not answer in 240 s:\n" + log.read_text()[-4000:]
                time.sleep(1.0)
        assert "L2IToyGenerate" in info, "the pack's nodes are not registered:\n" + log.read_text()[-4000:]
        assert "IMPORT FAILED" not in "\n".join(
            line for line in log.read_text().splitlines() if "layout2image" in line
        ), log.read_text()[-4000:]

        graph = json.loads(GRAPH_06.read_text(encoding="utf-8"))
        queued = http_json(f"{base}/prompt", {"prompt": graph, "client_id": "l2i-test"})
        assert not queued.get("node_errors"), queued
        entry = _wait_for_history(base, queued["prompt_id"], server, log)
        assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-4000:]
        save_id = next(k for k, v in graph.items() if v["class_type"] == "SaveImage")
        (saved,) = entry["outputs"][save_id]["images"]
        path = base_dir / "output" / saved["subfolder"] / saved["filename"]
        from PIL import Image

        with Image.open(path) as img:
            size = graph[next(k for k, v in graph.items() if v["class_type"] == "L2IToySceneLabelMap")]["inputs"]
            assert img.size == (size["size"], size["size"]) and img.mode == "RGB"
            assert np.asarray(img).std() > 2.0, "the saved image is flat"

        # bad input: a 100x100 toy map (not a multiple of 8) fails in Toy Generate with a message; the server lives
        bad = json.loads(json.dumps(graph))
        scene_id = next(k for k, v in bad.items() if v["class_type"] == "L2IToySceneLabelMap")
        bad[scene_id]["inputs"]["size"] = 100
        queued = http_json(f"{base}/prompt", {"prompt": bad, "client_id": "l2i-test"})
        entry = _wait_for_history(base, queued["prompt_id"], server, log)
        assert entry["status"]["status_str"] == "error"
        messages = json.dumps(entry["status"]["messages"])
        assert "L2IToyGenerate" in messages and "multiples of 8" in messages, messages[-3000:]
        assert "devices" in http_json(f"{base}/system_stats")
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)
        (base_dir / "custom_nodes" / "layout2image").unlink()  # the link only, before tmp_path is cleaned
