"""A1111/Forge install hook of the Layout2Image SDM SPADE extension (the webui runs it at every start).

It installs nothing itself: it runs the layout2image checkout's own ``install.py`` (idempotent: installs only the
requirements that are missing, never torch), found as the parent of this folder after resolving symlinks, or at
``$LAYOUT2IMAGE_PATH``. When ``layout2image`` is already importable (installed into the webui's Python) the
checkout's requirements came with it and nothing runs.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path


def _checkout() -> Path | None:
    candidates = [Path(os.environ["LAYOUT2IMAGE_PATH"])] if os.environ.get("LAYOUT2IMAGE_PATH") else []
    candidates.append(Path(__file__).resolve().parent.parent)
    for root in candidates:
        if (root / "install.py").is_file() and (root / "requirements.txt").is_file() and (root / "core").is_dir():
            return root
    return None


def main() -> int:
    if importlib.util.find_spec("layout2image") is not None:
        print("[layout2image] package importable; nothing to install")
        return 0
    root = _checkout()
    if root is None:
        print(
            "[layout2image] cannot find the layout2image checkout: symlink this extension from <checkout>/a1111, or "
            "set LAYOUT2IMAGE_PATH to the checkout, or pip install it into the webui's Python",
            file=sys.stderr,
        )
        return 1
    return subprocess.run([sys.executable, str(root / "install.py")], check=False).returncode


if __name__ == "__main__" or "launch" in sys.modules:  # A1111 execs install.py inside its launcher
    status = main()
    if status and __name__ == "__main__":
        sys.exit(status)
