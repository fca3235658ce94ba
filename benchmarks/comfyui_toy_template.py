"""Template 06 (the toy world end to end) timed in a real ComfyUI server beside the same graph run by our own code.

Both sides run the API graph ``tests/graphs/06_toy_world_end_to_end.json`` (Toy World Loader -> Toy Scene Label Map
128 x 128 -> Toy Generate, 25 DDIM steps, CFG 3 -> Save Image, Layout Alignment -> Preview Image) on the CPU:

- **ours**: the pack's node classes called in the graph's order in a plain Python process (the ComfyUI stand-in
  of ``tests/comfy_stub``; the saved image written with PIL as Save Image does), once cold (first load of the
  toy models and the segmenter included) and ``--repeats`` times warm with the Toy Generate seed changed (so
  generation and scoring are redone while the loads stay cached, as in ComfyUI). Run with each ``--python``
  given (e.g. the project's venv and ComfyUI's), to separate the torch build from ComfyUI itself.
- **ComfyUI**: ``main.py --cpu`` headless with the pack linked into a fresh ``custom_nodes``; the graph is POSTed
  to /prompt once (cold) and then ``--repeats`` times with a new seed; the time of each prompt is ComfyUI's own
  (``execution_start`` to ``execution_success`` in /history). ``--profile`` writes a cProfile of the server.

Usage::

    python benchmarks/comfyui_toy_template.py --comfyui /work/comfyui \\
        --python /work/main/.venv/bin/python --python /work/comfyui/.venv/bin/python --repeats 3

Prints one JSON object (and a short table): torch version and thread count per side, cold and warm seconds
(each warm figure the minimum of the repeats, all repeats listed), and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GRAPH = REPO / "tests" / "graphs" / "06_toy_world_end_to_end.json"

# Runs in a child process (any Python with the pack's requirements): the graph through our node classes.
_OURS = r"""
import importlib.util, json, sys, time
from pathlib import Path
REPO = Path(sys.argv[1]); repeats = int(sys.argv[2]); out_dir = Path(sys.argv[3]); toy_threads = int(sys.argv[4])
t_import = time.perf_counter()
import torch
spec = importlib.util.spec_from_file_location("l2i_bench_stub", REPO / "tests" / "comfy_stub" / "__init__.py")
stub = importlib.util.module_from_spec(spec); spec.loader.exec_module(stub)
graph = json.loads((REPO / "tests" / "graphs" / "06_toy_world_end_to_end.json").read_text())
by_type = {v["class_type"]: v["inputs"] for v in graph.values()}
with stub.installed():
    import layout2image.nodes.toy as toy_nodes
    from layout2image.nodes.toy import L2IToyWorldLoader, L2IToySceneLabelMap, L2IToyGenerate
    toy_nodes.TOY_CPU_THREADS = toy_threads
    from layout2image.nodes.alignment import L2ILayoutAlignment
    from PIL import Image
    import numpy as np
    t_import = time.perf_counter() - t_import

    def run(seed, cold):
        times = {}
        t = time.perf_counter()
        world, label_set, segmenter_path, info = L2IToyWorldLoader.execute().args
        times["loader"] = time.perf_counter() - t
        s = {k: v for k, v in by_type["L2IToySceneLabelMap"].items()}
        t = time.perf_counter()
        label_map, caption = L2IToySceneLabelMap.execute(**s).args
        times["scene"] = time.perf_counter() - t
        g = {k: v for k, v in by_type["L2IToyGenerate"].items() if not isinstance(v, list)}
        g["seed"] = seed
        t = time.perf_counter()
        (image,) = L2IToyGenerate.execute(toy_world=world, label_map=label_map, **g).args
        times["generate"] = time.perf_counter() - t
        t = time.perf_counter()
        Image.fromarray((image[0].numpy() * 255).round().astype(np.uint8)).save(out_dir / f"ours_{seed}.png", compress_level=4)
        times["save"] = time.perf_counter() - t
        a = {k: v for k, v in by_type["L2ILayoutAlignment"].items() if not isinstance(v, list)}
        t = time.perf_counter()
        L2ILayoutAlignment.execute(image=image, label_map=label_map, segmenter_path=segmenter_path, **a)
        times["alignment"] = time.perf_counter() - t
        times["total"] = sum(times.values())
        return times

    seed0 = by_type["L2IToyGenerate"]["seed"]
    cold = run(seed0, True)
    warm = [run(seed0 + 1 + i, False) for i in range(repeats)]
print("L2I-OURS" + json.dumps({"python": sys.executable, "torch": torch.__version__, "threads": torch.get_num_threads(),
      "toy_threads": toy_threads,
      "interop_threads": torch.get_num_interop_threads(), "import_s": t_import, "cold": cold, "warm": warm}))
"""


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run_ours(python: str, repeats: int, out_dir: Path, toy_threads: int) -> dict:
    cmd = [python, "-c", _OURS, str(REPO), str(repeats), str(out_dir), str(toy_threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("L2I-OURS")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"our run with {python} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("L2I-OURS") :])


def _history_seconds(entry: dict) -> float:
    stamps = {m[0]: m[1]["timestamp"] for m in entry["status"]["messages"]}
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000.0


def run_comfyui(comfyui: Path, python: str, repeats: int, work: Path, profile: bool) -> dict:
    from layout2image.testing import free_port, http_json

    base = work / "comfy"
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / "layout2image"
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    web = work / "web"
    web.mkdir(exist_ok=True)
    (web / "index.html").write_text("<!doctype html><title>headless</title>\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [python]
    if profile:
        cmd += ["-m", "cProfile", "-o", str(work / "comfyui.prof")]
    cmd += ["main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base)]
    cmd += ["--front-end-root", str(web), "--disable-auto-launch", "--disable-api-nodes"]
    cmd += ["--database-url", "sqlite:///:memory:"]
    log = work / "comfyui.log"
    t0 = time.perf_counter()
    with log.open("w") as out:
        server = subprocess.Popen(cmd, cwd=comfyui, stdout=out, stderr=subprocess.STDOUT)
    try:
        while True:
            if server.poll() is not None:
                raise SystemExit("ComfyUI did not start:\n" + log.read_text()[-3000:])
            try:
                http_json(f"{url}/object_info/L2IToyGenerate", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        startup = time.perf_counter() - t0
        graph = json.loads(GRAPH.read_text(encoding="utf-8"))
        gen = next(k for k, v in graph.items() if v["class_type"] == "L2IToyGenerate")
        seed0 = graph[gen]["inputs"]["seed"]
        runs = []
        for i in range(repeats + 1):
            graph[gen]["inputs"]["seed"] = seed0 + i
            t = time.perf_counter()
            queued = http_json(f"{url}/prompt", {"prompt": graph, "client_id": "l2i-bench"})
            while True:
                entry = http_json(f"{url}/history/{queued['prompt_id']}").get(queued["prompt_id"])
                if entry and entry["status"].get("status_str") in ("success", "error"):
                    break
                time.sleep(0.05)
            if entry["status"]["status_str"] != "success":
                raise SystemExit("ComfyUI failed:\n" + json.dumps(entry["status"])[-3000:])
            runs.append({"execution_s": _history_seconds(entry), "wall_s": time.perf_counter() - t})
        info = http_json(f"{url}/system_stats")
    finally:
        server.terminate()
        server.wait(timeout=60)
        link.unlink()
    return {"startup_s": startup, "cold": runs[0], "warm": runs[1:], "system": info.get("system", {})}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, required=True, help="ComfyUI checkout (COMFYUI_PATH)")
    parser.add_argument("--comfyui-python", default=None, help="Python that runs ComfyUI (default: its .venv)")
    parser.add_argument("--python", action="append", help="Python(s) for our side (default: this one)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--toy-threads", type=int, action="append", help="TOY_CPU_THREADS for our side (default 1, the node's)"
    )
    parser.add_argument("--profile", action="store_true", help="write a cProfile of the ComfyUI server")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args(argv)
    comfy_python = args.comfyui_python or str(args.comfyui / ".venv" / "bin" / "python")
    if not Path(comfy_python).exists():
        comfy_python = sys.executable
    work = args.work or Path(tempfile.mkdtemp(prefix="l2i_bench06_"))
    work.mkdir(parents=True, exist_ok=True)
    report = {"load_before": load(), "cpus": os.cpu_count(), "ours": [], "comfyui": None}
    for python in args.python or [sys.executable]:
        for threads in args.toy_threads or [1]:
            report["ours"].append(run_ours(python, args.repeats, work, threads))
    report["comfyui"] = run_comfyui(args.comfyui.resolve(), comfy_python, args.repeats, work, args.profile)
    report["load_after"] = load()
    print(json.dumps(report, indent=1))
    print(f"\nload average before {report['load_before']}, after {report['load_after']} ({report['cpus']} CPUs)")
    for ours in report["ours"]:
        warm = min(w["total"] for w in ours["warm"])
        gen = min(w["generate"] for w in ours["warm"])
        print(
            f"ours   torch {ours['torch']:<14} toy threads {ours['toy_threads']}/{ours['threads']}: cold {ours['cold']['total']:.2f} s "
            f"(loader {ours['cold']['loader']:.2f}), warm {warm:.2f} s (generate {gen:.2f})"
        )
    c = report["comfyui"]
    warm = min(w["execution_s"] for w in c["warm"])
    print(
        f"ComfyUI ({comfy_python}): start {c['startup_s']:.1f} s, cold {c['cold']['execution_s']:.2f} s, warm {warm:.2f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
