"""The pack installs under one name, imports as a ComfyUI custom-node folder under any name, and installs safely."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

import layout2image

ROOT = Path(layout2image.__file__).resolve().parent
COMFY_MODULES = ("comfy", "comfy_api", "comfy_extras", "folder_paths")


def test_installed_under_one_import_name_without_top_level_leaks(tmp_path):
    # In a fresh interpreter away from the checkout (``python -m`` would put the current folder on sys.path).
    names = ("core", "nodes", "weights", "trainer", "cli", "utils")
    code = (
        "import importlib.util, layout2image, pathlib\n"
        "root = str(pathlib.Path(layout2image.__file__).parent)\n"
        f"for name in {names!r}:\n"
        "    spec = importlib.util.find_spec(name)\n"
        "    assert spec is None or not str(spec.origin or '').startswith(root), name + ' leaks as a top-level module'\n"
        "print(layout2image.__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "layout2image"
    assert (ROOT / "core" / "labels" / "labelset.py").exists()


def test_core_imports_no_comfyui_module():
    pattern = re.compile(r"^\s*(?:import|from)\s+(" + "|".join(COMFY_MODULES) + r")\b", re.M)
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "core").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_no_absolute_imports_of_our_own_subpackages():
    # Inside ComfyUI, `import nodes` is ComfyUI's module: our code must use relative imports only.
    pattern = re.compile(r"^\s*(?:import|from)\s+(core|nodes|weights|trainer|cli|layout2image)\b", re.M)
    offenders = []
    for sub in ("core", "weights", "trainer", "nodes", "cli"):
        for p in (ROOT / sub).rglob("*.py"):
            if pattern.search(p.read_text()):
                offenders.append(str(p.relative_to(ROOT)))
    assert offenders == []


def test_folder_imports_as_a_package_under_an_arbitrary_name(tmp_path):
    """Load the checkout the way ComfyUI's loader does, from a folder whose name is no identifier."""
    target = tmp_path / "custom_nodes" / "My Layout-Pack.v2"
    shutil.copytree(ROOT, target, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "tests"))
    code = f"""
import importlib.util, sys, asyncio
path = {str(target)!r}
name = path.replace(".", "_x_")
spec = importlib.util.spec_from_file_location(name, path + "/__init__.py", submodule_search_locations=[path])
module = importlib.util.module_from_spec(spec)
sys.modules[name] = module
spec.loader.exec_module(module)
assert not hasattr(module, "NODE_CLASS_MAPPINGS"), "a NODE_CLASS_MAPPINGS would disable the V3 entry point"
assert callable(module.comfy_entrypoint)
labels = importlib.import_module(name + ".core.labels")
assert labels.get_label_set("toy").num_classes >= 7
assert "layout2image" not in sys.modules, "the copy must not import the installed package by name"
print("ok", labels.__name__)
"""
    import importlib  # noqa: F401  (used by the child process code)

    result = subprocess.run(
        [sys.executable, "-c", "import importlib\n" + code], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "ok " in result.stdout


def _load_install_module():
    spec = importlib.util.spec_from_file_location("l2i_install", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_install_py_plans_nothing_when_everything_is_present(tmp_path, capsys):
    install = _load_install_module()
    assert install.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "nothing installed" in out and "already installed: diffusers" in out


def test_install_py_installs_only_missing_and_pins_torch(tmp_path):
    install = _load_install_module()
    req = tmp_path / "requirements.txt"
    req.write_text("# comment\ndiffusers>=0.1\nsurely-not-installed-pkg>=1.0  # why\n")
    cons = tmp_path / "constraints.txt"
    cons.write_text("diffusers==0.0.1\nsurely-not-installed-pkg==1.2\ntorch==1.0\nnvidia-cublas-cu12==1\n")
    missing, pins, present = install.plan(req, cons)
    assert missing == ["surely-not-installed-pkg>=1.0"]
    assert "surely-not-installed-pkg==1.2" in pins
    assert "diffusers==0.0.1" not in pins  # installed packages are left alone
    assert f"torch=={importlib.metadata.version('torch')}" in pins and "torch==1.0" not in pins
    assert not any(p.startswith("nvidia") for p in pins)
    req.write_text("torch>=2\n")
    with pytest.raises(SystemExit, match="must not list torch"):
        install.plan(req, cons)


def test_requirements_and_constraints_never_name_torch():
    def names(path):
        lines = [ln.strip() for ln in path.read_text().splitlines()]
        return {re.split(r"[=<>!~ ;\[]", ln)[0].lower() for ln in lines if ln and not ln.startswith("#")}

    assert "torch" not in names(ROOT / "requirements.txt")
    assert "torch" not in names(ROOT / "constraints.txt")
    assert {"diffusers", "transformers", "peft", "accelerate"} <= names(ROOT / "constraints.txt")
    assert not {"torchvision", "torchaudio"} & (names(ROOT / "requirements.txt") | names(ROOT / "constraints.txt"))


def test_console_scripts_resolve_to_callables():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "torch>=2.1" in project["dependencies"]
    for name, target in project["scripts"].items():
        module_name, func = target.split(":")
        module = importlib.import_module(module_name)
        assert callable(getattr(module, func)), name


# What a registry would publish as-is but is no real value: reserved example domains (RFC 2606/6761), empty strings,
# to-do markers and template brackets.
_PLACEHOLDER = re.compile(
    r"(^\s*$)|example\.(invalid|com|org|net)|\.invalid\b|\.example\b|\blocalhost\b|\bTODO\b|\bFIXME\b|\bTBD\b"
    r"|placeholder|your[-_ ]?(name|user|repo|id)|<[^<>]+>",
    re.IGNORECASE,
)


def _placeholders(value, where: str) -> list[str]:
    """Every string under ``value`` (tables and arrays walked) that looks like a placeholder, as ``where: value``."""
    if isinstance(value, dict):
        return [p for key, item in value.items() for p in _placeholders(item, f"{where}.{key}")]
    if isinstance(value, list):
        return [p for k, item in enumerate(value) for p in _placeholders(item, f"{where}[{k}]")]
    if isinstance(value, str) and _PLACEHOLDER.search(value):
        return [f"{where}: {value!r}"]
    return []


def test_placeholder_check_catches_what_was_shipped_before():
    shipped = tomllib.loads(
        '[project.urls]\nRepository = "https://example.invalid/layout2image"\n'
        '[tool.comfy]\nPublisherId = "layout2image"\nDisplayName = "layout2image"\nIcon = ""\n'
    )
    assert _placeholders(shipped, "pyproject") == [
        "pyproject.project.urls.Repository: 'https://example.invalid/layout2image'",
        "pyproject.tool.comfy.Icon: ''",
    ]
    assert _placeholders({"a": ["TODO: fill in", "<your repo>", "ok"]}, "x") == [
        "x.a[0]: 'TODO: fill in'",
        "x.a[1]: '<your repo>'",
    ]


def test_published_metadata_has_no_placeholders():
    """[project] and [tool.comfy] are what PyPI and the ComfyUI registry publish: every value there is real."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    published = {"project": data["project"], "tool.comfy": data["tool"]["comfy"]}
    assert _placeholders(published, "pyproject") == []
    urls = data["project"].get("urls", {})
    assert all(re.match(r"https://[a-z0-9.-]+\.[a-z]{2,}/", u) for u in urls.values()), urls
    comfy = data["tool"]["comfy"]
    # The registry's optional fields, when present, hold values of their kind.
    if "Icon" in comfy:
        assert re.match(r"https://\S+\.(svg|png|jpe?g|gif)$", comfy["Icon"], re.IGNORECASE), comfy["Icon"]
    assert comfy["DisplayName"].strip() and comfy["requires-comfyui"].startswith(">=")
