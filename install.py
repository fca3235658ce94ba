"""Install hook run by ComfyUI-Manager and AUTOMATIC1111/Forge: install what requirements.txt lists and is missing.

* Idempotent: when every requirement is already satisfied it installs nothing and says so.
* Never touches torch: torch is not in requirements.txt, and the installed torch version is added as a
  constraint so that no dependency can pull in another build.
* Missing packages are installed at the versions CI tested (constraints.txt); packages that are already installed
  are left alone (their constraint lines are dropped so pip will not "fix" them).

Run ``python install.py --dry-run`` to see what it would do.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
_TORCH_FAMILY = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*)$")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _parse_requirement(line: str) -> tuple[str, str] | None:
    line = line.split("#", 1)[0].strip()
    if not line:
        return None
    m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*)$", line)
    if not m:
        raise SystemExit(f"install.py: cannot parse requirement line {line!r} in requirements.txt")
    return m.group(1), m.group(2).strip()


def _satisfied(name: str, spec: str) -> tuple[bool, str | None]:
    """Whether ``name`` is installed at a version matching ``spec`` (e.g. ``>=0.31``); returns the version."""
    try:
        version = metadata.version(name)
    except metadata.PackageNotFoundError:
        return False, None
    if not spec:
        return True, version
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version

        return Version(version) in SpecifierSet(spec), version
    except Exception:  # packaging missing or an unusual version string: presence is the best we can tell
        return True, version


def plan(requirements: Path, constraints: Path) -> tuple[list[str], list[str], list[str]]:
    """Return (requirements to install, constraint lines to use, lines describing what is already there)."""
    missing: list[str] = []
    present: list[str] = []
    for line in requirements.read_text(encoding="utf-8").splitlines():
        parsed = _parse_requirement(line)
        if parsed is None:
            continue
        name, spec = parsed
        if _TORCH_FAMILY.match(_canonical(name)):
            raise SystemExit(f"install.py: requirements.txt must not list {name}; the UI's torch build is kept")
        ok, version = _satisfied(name, spec)
        if ok:
            present.append(f"{name} {version}")
        else:
            missing.append(f"{name}{spec}")
    installed = {_canonical(d.metadata["Name"]) for d in metadata.distributions() if d.metadata["Name"]}
    pins: list[str] = []
    if constraints.exists():
        for line in constraints.read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            name = _canonical(re.split(r"[=<>!~ ;\[]", line, maxsplit=1)[0])
            if _TORCH_FAMILY.match(name) or name in installed:
                continue
            pins.append(line)
    try:
        pins.append(f"torch=={metadata.version('torch')}")
    except metadata.PackageNotFoundError:
        pass
    return missing, pins, present


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print what would be installed and stop")
    args = parser.parse_args(argv)
    missing, pins, present = plan(HERE / "requirements.txt", HERE / "constraints.txt")
    for item in present:
        print(f"[layout2image] already installed: {item}")
    if not missing:
        print("[layout2image] all requirements are satisfied; nothing installed")
        return 0
    print(f"[layout2image] missing: {', '.join(missing)}")
    fd, constraint_file = tempfile.mkstemp(prefix="l2i-constraints-", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(pins) + "\n")
    cmd = [sys.executable, "-m", "pip", "install", "-c", constraint_file, *missing]
    print(f"[layout2image] {'would run' if args.dry_run else 'running'}: {' '.join(cmd)}")
    try:
        if args.dry_run:
            return 0
        result = subprocess.run(cmd, check=False)
    finally:
        os.unlink(constraint_file)
    if result.returncode != 0:
        print(f"[layout2image] pip failed with exit code {result.returncode}; see its output above", file=sys.stderr)
        return result.returncode
    print(f"[layout2image] installed: {', '.join(missing)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
