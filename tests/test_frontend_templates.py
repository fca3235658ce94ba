"""The workflow templates loaded the way a user loads them: a real ComfyUI server with the pack, its real browser
frontend (the ``comfyui-frontend-package`` ComfyUI serves) in headless Chromium driven by Playwright, each
template opened with the frontend's ``app.loadGraphData`` and turned into a prompt by the frontend's own
``app.graphToPrompt``, then queued. Template 06 runs to an image (queued with the frontend's Run,
``app.queuePrompt``); 01-05 pass ComfyUI's prompt validation (POST /prompt: node types, links, required inputs,
combo choices, ranges) with placeholder files under the model names they use, and then stop at the first model
loader (running them needs real SD 1.5 files). A screenshot of each template is saved (``L2I_SCREENSHOTS`` or
the test's temporary folder).

Heavy mode, with ``L2I_SD15_SHAPED=1`` as well (the gate of tests/test_stock_loaders.py; minutes and ~10 GB of RAM):
01-05 also run to an image, on SD 1.5-shaped random models in place of real weights.
``benchmarks/sd15_template_models.py`` builds them with the project's own code (a random SD 1.5-shaped checkpoint
written by ComfyUI, then 1-step ``l2i-train`` runs on an ADE20K-labelled toy dataset: a palette-RGB ControlNet, an
ALDM-native class-embedding ControlNet with its table, an SDM-LoRA with its SPADE companion) into ``L2I_SD15_WORK``
(default: a temporary folder; reused, so a rerun skips the build), and they are linked into ComfyUI's models
folders under the names the templates use instead of the placeholders. After the frontend's graph-to-prompt, and
only in the API prompt that is queued, the work is shrunk so that each template runs in about a minute on a CPU
(`SHRINK`: KSampler / BasicScheduler ``steps`` 1, EmptyLatentImage 64 x 64, batch 1); the template's layout, nodes,
links and every other value are what the frontend gave. Checked: the prompt succeeds, every Save Image node writes
64 x 64 RGB images, and ComfyUI's log (``--verbose DEBUG``) for that prompt has no traceback and no key message
(``benchmarks/stock_loaders.py``'s ``COMFY_BAD_LINES``: ``lora key not loaded``, ``missing controlnet keys``, ...).

Gated: ``COMFYUI_PATH`` must name a ComfyUI checkout whose Python (the one running pytest) has ComfyUI's
requirements, the frontend package and Playwright for Python, and Debian's ``chromium`` must be installed
(``tests/real_clients/setup_comfyui.sh`` sets all of this up; docs/COMFYUI.md). Playwright's own browser download
(``playwright install``) is never used.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import layout2image
from layout2image.testing import free_port, http_json

ROOT = Path(layout2image.__file__).resolve().parent
WORKFLOWS = ROOT / "workflows"
GRAPHS = ROOT / "tests" / "graphs"
TEMPLATES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
TOY = "06_toy_world_end_to_end"
#: Start flags for a headless Chromium on a machine without a display, a GPU or network access.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-quic",
    "--disable-sync",
)
#: Heavy mode: 01-05 run to an image on SD 1.5-shaped random models (module docstring).
HEAVY = bool(os.environ.get("COMFYUI_PATH")) and os.environ.get("L2I_SD15_SHAPED") == "1"
#: Heavy mode: the inputs set in the queued API prompt, per node type, so that a template runs in about a minute.
SHRINK = {
    "KSampler": {"steps": 1},
    "BasicScheduler": {"steps": 1},
    "EmptyLatentImage": {"width": 64, "height": 64, "batch_size": 1},
}
#: The model folders and the loaders whose file-name combos name them (placeholders are written there).
MODEL_INPUTS = {
    "CheckpointLoaderSimple": ("checkpoints", "ckpt_name"),
    "L2IALDMControlNetLoader": ("controlnet", "controlnet_name"),
    "L2ISDMLoraLoader": ("loras", "lora_name"),
}


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _skip_reason() -> str | None:
    if not os.environ.get("COMFYUI_PATH"):
        return "set COMFYUI_PATH to a ComfyUI checkout to run"
    if importlib.util.find_spec("playwright") is None:
        return "Playwright for Python is not installed (pip install playwright; tests/real_clients/setup_comfyui.sh)"
    if _chromium() is None:
        return "chromium is not installed (apt-get install chromium; tests/real_clients/setup_comfyui.sh)"
    if importlib.util.find_spec("comfyui_frontend_package") is None:
        return "comfyui-frontend-package is not installed in this Python (ComfyUI's requirements.txt)"
    if not (ROOT / "weights" / "toy" / "model_index.json").is_file():
        return "the shipped toy base models (weights/toy) are missing"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


def _layout_images(folder: Path) -> None:
    """The layout files the templates name: an ADE20K-colour street layout and its id PNG (512 x 512)."""
    from PIL import Image

    from layout2image.core.labels import get_label_set

    ade = get_label_set("ade20k")
    ids = np.full((512, 512), ade.names.index("sky"), np.uint8)
    ids[200:330] = ade.names.index("building")
    ids[330:] = ade.names.index("road")
    ids[120:330, 380:470] = ade.names.index("tree")
    ids[380:470, 60:200] = ade.names.index("car")
    Image.fromarray(np.asarray(ade.palette, np.uint8)[ids]).save(folder / "l2i_layout_ade20k.png")
    # the id file is read by template 02 only, against the label set its Label Set node makes from class names
    (class_names,) = (
        node["inputs"]["class_names"]
        for node in json.loads((GRAPHS / "02_aldm_native_class_embeddings.json").read_text(encoding="utf-8")).values()
        if node["class_type"] == "L2ILabelSet"
    )
    to_02 = np.zeros(256, np.uint8)
    for i, name in enumerate(class_names.splitlines()):
        if name in ade.names:
            to_02[ade.names.index(name)] = i
    Image.fromarray(to_02[ids]).save(folder / "l2i_layout_ids.png")


def _placeholders(base: Path) -> None:
    """Empty files under the model names the templates use (validation checks names, never contents)."""
    for name in TEMPLATES:
        for node in json.loads((GRAPHS / f"{name}.json").read_text(encoding="utf-8")).values():
            if node["class_type"] in MODEL_INPUTS:
                folder, key = MODEL_INPUTS[node["class_type"]]
                (base / "models" / folder).mkdir(parents=True, exist_ok=True)
                (base / "models" / folder / node["inputs"][key]).touch()


def _stock_loaders():
    """``benchmarks/stock_loaders.py`` (a script, not a package) as a module: its log checks."""
    spec = importlib.util.spec_from_file_location("l2i_stock_loaders", ROOT / "benchmarks" / "stock_loaders.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sd15_models(base: Path, tmp: Path) -> None:
    """Heavy mode: build (or reuse) the SD 1.5-shaped files and link them under the names 01-05 use."""
    work = Path(os.environ.get("L2I_SD15_WORK") or tmp / "sd15_work").resolve()
    cmd = [sys.executable, str(ROOT / "benchmarks" / "sd15_template_models.py"), "--work", str(work)]
    cmd += ["--comfyui", str(Path(os.environ["COMFYUI_PATH"]).resolve())]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    files = json.loads((work / "template_models.json").read_text(encoding="utf-8"))
    for name in TEMPLATES:
        for node in json.loads((GRAPHS / f"{name}.json").read_text(encoding="utf-8")).values():
            if node["class_type"] in MODEL_INPUTS:
                folder, key = MODEL_INPUTS[node["class_type"]]
                assert f"{folder}/{node['inputs'][key]}" in files, f"no SD 1.5-shaped file for {name}: {node}"
    for rel, target in files.items():
        (base / "models" / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / "models" / rel).symlink_to(target)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real ComfyUI (``--cpu``) serving its frontend, with the pack linked into a fresh custom_nodes folder."""
    tmp = tmp_path_factory.mktemp("frontend")
    base = tmp / "comfy"
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / "layout2image").symlink_to(ROOT, target_is_directory=True)
    (base / "input").mkdir()
    _layout_images(base / "input")
    if HEAVY:
        _sd15_models(base, tmp)
    else:
        _placeholders(base)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port)]
    cmd += ["--base-directory", str(base), "--disable-auto-launch", "--disable-api-nodes"]
    cmd += ["--database-url", "sqlite:///:memory:"]
    env = None
    if HEAVY:  # key messages are logged at DEBUG; each prompt's log is read as soon as it finishes
        cmd += ["--verbose", "DEBUG"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = tmp / "comfyui.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=Path(os.environ["COMFYUI_PATH"]).resolve(), stdout=out, stderr=out, env=env)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, "ComfyUI did not start:\n" + log.read_text()[-4000:]
            try:
                http_json(f"{url}/object_info/L2IToyGenerate", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert time.monotonic() < deadline, "ComfyUI did not answer in 240 s:\n" + log.read_text()[-4000:]
                time.sleep(1.0)
        # a first visit opens the template browser over the canvas; a user who has seen it once does not get it
        # (and text is drawn at any zoom, so the screenshot of a wide template stays readable)
        settings = {
            "Comfy.TutorialCompleted": True,
            "Comfy.Minimap.Visible": False,
            "LiteGraph.Canvas.MinFontSizeForLOD": 1,
        }
        for key, value in settings.items():
            request = urllib.request.Request(f"{url}/settings/{key}", data=json.dumps(value).encode(), method="POST")
            urllib.request.urlopen(request, timeout=10).close()  # answers 200 with an empty body
        yield {"url": url, "base": base, "proc": proc, "log": log}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        (base / "custom_nodes" / "layout2image").unlink()  # the link only, before the folder is cleaned


@pytest.fixture(scope="module")
def screens(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("L2I_SCREENSHOTS") or tmp_path_factory.mktemp("screens"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=_chromium(), args=list(CHROMIUM_FLAGS), headless=True)
        try:
            page = browser.new_page(viewport={"width": 2400, "height": 1400})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server["url"] + "/")
            page.wait_for_function(
                "() => window.app && window.app.graph && window.LiteGraph"
                " && LiteGraph.registered_node_types['L2IToyGenerate']",
                timeout=120_000,
            )
            page.l2i_errors = errors  # uncaught page errors, checked per template
            yield page
        finally:
            browser.close()


_LOAD = """async (wf) => {
  await app.loadGraphData(wf);
  // the Load Image preview is fetched after the load; nodes grow to show it
  const deadline = Date.now() + 10000;
  while (Date.now() < deadline && app.graph.nodes.some(n => n.type === 'LoadImage' && !(n.imgs && n.imgs.length)))
    await new Promise(r => setTimeout(r, 100));
  await new Promise(r => setTimeout(r, 500));
  await app.extensionManager.command.execute('Comfy.Canvas.FitView');
  const p = await app.graphToPrompt();
  return {
    output: p.output,
    workflow: p.workflow,
    unknown: app.graph.nodes.filter(n => !LiteGraph.registered_node_types[n.type]).map(n => n.type),
    rects: app.graph.nodes.map(n => [n.id, n.type, Array.from(n.boundingRect)]),
    widgets: Object.fromEntries(app.graph.nodes.map(n => [n.id, (n.widgets || []).map(w => [w.name, w.value])])),
  };
}"""


def _overlaps(rects) -> list[str]:
    out = []
    for i, (a_id, a_type, (ax, ay, aw, ah)) in enumerate(rects):
        for b_id, b_type, (bx, by, bw, bh) in rects[i + 1 :]:
            if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                out.append(f"{a_type} #{a_id} and {b_type} #{b_id}")
    return out


def _shrink(prompt: dict) -> dict:
    """A copy of an API prompt with the `SHRINK` inputs set (heavy mode: one step at 64 x 64)."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        for key, value in SHRINK.get(node["class_type"], {}).items():
            assert not isinstance(node["inputs"][key], list), (node, key)  # a widget value, not a link
            node["inputs"][key] = value
    return prompt


def _run_on_sd15_shaped_models(server, name: str, prompt: dict, workflow: dict) -> None:
    """Heavy mode: queue the shrunk prompt; it must write 64 x 64 images with a clean log."""
    from PIL import Image

    small = _shrink(prompt)
    assert {n["class_type"] for n in small.values()} & set(SHRINK), "nothing to shrink: the test would take hours"
    start = server["log"].stat().st_size
    queued = http_json(
        f"{server['url']}/prompt",
        {"prompt": small, "client_id": "l2i-frontend-test", "extra_data": {"extra_pnginfo": {"workflow": workflow}}},
    )
    assert queued.get("node_errors") == {}, queued
    entry = _wait_for_history(server, queued["prompt_id"], timeout=1200.0)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-3000:]
    # one image per sampler (batch 1 each; 05 batches its four samplers' images into one Save Image)
    samplers = sum(v["class_type"] in ("KSampler", "SamplerCustomAdvanced") for v in small.values())
    saved = [i for k, v in small.items() if v["class_type"] == "SaveImage" for i in entry["outputs"][k]["images"]]
    assert samplers and len(saved) == samplers, (samplers, saved)
    for image in saved:
        with Image.open(server["base"] / "output" / image["subfolder"] / image["filename"]) as img:
            assert img.size == (64, 64) and img.mode == "RGB", (image, img.size, img.mode)
            assert np.asarray(img).std() > 2.0, f"{image['filename']} is flat (non-finite latents decode flat)"
    time.sleep(1.0)  # the last lines of the prompt's log
    with server["log"].open("rb") as f:
        f.seek(start)
        text = f.read().decode("utf-8", "replace")
    bad = _stock_loaders().bad_comfy_lines(text, prompt_marker="got prompt")
    assert "got prompt" in text and bad == [], f"{name}: ComfyUI logged:\n" + "\n".join(bad[:20])


def _wait_for_history(server, prompt_id: str, timeout: float = 600.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server["proc"].poll() is None, "ComfyUI exited:\n" + server["log"].read_text()[-4000:]
        entry = http_json(f"{server['url']}/history/{prompt_id}").get(prompt_id)
        if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
            return entry
        time.sleep(0.5)
    raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s:\n" + server["log"].read_text()[-4000:])


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_loads_in_the_real_frontend_and_passes_validation(name, server, page, screens):
    """Load -> the frontend shows every node, in the layout the template gives (no node covering another, image
    previews included), and its graph-to-prompt gives our API graph exactly; the prompt passes validation.
    06 runs to an image; 01-05 stop at their first model loader (placeholder files), or, in heavy mode, run to an
    image on SD 1.5-shaped random models with the prompt shrunk to one step at 64 x 64 (`SHRINK`)."""
    workflow = json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8"))
    got = page.evaluate(_LOAD, workflow)
    page.wait_for_timeout(300)
    page.screenshot(path=str(screens / f"{name}.png"))
    assert got["unknown"] == [], f"node types the frontend does not know: {got['unknown']}"
    assert page.l2i_errors == [], page.l2i_errors
    assert _overlaps(got["rects"]) == [], "nodes overlap in the frontend"

    expected = json.loads((GRAPHS / f"{name}.json").read_text(encoding="utf-8"))
    prompt = got["output"]
    assert sorted(prompt) == sorted(expected)
    for node_id, node in expected.items():
        assert prompt[node_id]["class_type"] == node["class_type"]
        # every value as the frontend read it from widgets_values (a shifted widget shows up here)
        assert prompt[node_id]["inputs"] == node["inputs"], (node_id, node["class_type"], got["widgets"][node_id])

    if HEAVY and name != TOY:  # the full-size prompt would take hours on a CPU: it is validated and run shrunk
        _run_on_sd15_shaped_models(server, name, prompt, got["workflow"])
        return
    queued = http_json(
        f"{server['url']}/prompt",
        {
            "prompt": prompt,
            "client_id": "l2i-frontend-test",
            "extra_data": {"extra_pnginfo": {"workflow": got["workflow"]}},
        },
    )
    assert queued.get("node_errors") == {}, queued
    entry = _wait_for_history(server, queued["prompt_id"])
    if name == TOY:  # fully runnable on a CPU: see test_toy_template_runs_from_the_frontend for the Run button
        assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-3000:]
        return
    # placeholder model files: execution gets past validation and stops at the first model loader
    assert entry["status"]["status_str"] == "error"
    error = next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")
    assert error["node_type"] in MODEL_INPUTS, error


def test_toy_template_runs_from_the_frontend(server, page, screens):
    """Template 06 queued with the frontend's own Run (``app.queuePrompt``) runs to an image, which the page shows
    and which carries the workflow in its PNG metadata, as any image saved from ComfyUI's UI does."""
    from PIL import Image

    before = set(http_json(f"{server['url']}/history"))
    workflow = json.loads((WORKFLOWS / f"{TOY}.json").read_text(encoding="utf-8"))
    page.evaluate(_LOAD, workflow)
    page.evaluate("async () => { await app.queuePrompt(0, 1); }")
    deadline = time.monotonic() + 600
    while not (new := set(http_json(f"{server['url']}/history")) - before):
        assert time.monotonic() < deadline, "nothing was queued:\n" + server["log"].read_text()[-4000:]
        time.sleep(0.5)
    (prompt_id,) = new
    entry = _wait_for_history(server, prompt_id)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-3000:]
    graph = entry["prompt"][2]
    save_id = next(k for k, v in graph.items() if v["class_type"] == "SaveImage")
    (saved,) = entry["outputs"][save_id]["images"]
    path = server["base"] / "output" / saved["subfolder"] / saved["filename"]
    with Image.open(path) as img:
        assert img.size == (128, 128) and img.mode == "RGB"
        assert np.asarray(img).std() > 2.0, "the saved image is flat"
        stored = json.loads(img.info["workflow"])
    assert {n["type"] for n in stored["nodes"]} == {n["type"] for n in workflow["nodes"]}
    # the page shows the result on the Save Image node
    page.wait_for_function(
        "() => app.graph.nodes.some(n => n.type === 'SaveImage' && n.imgs && n.imgs.length)", timeout=30_000
    )
    page.wait_for_timeout(500)
    page.screenshot(path=str(screens / f"{TOY}_after_run.png"))
