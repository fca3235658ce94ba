"""Where the shipped training presets live and their names, without importing the trainer (``l2i-train --help``
lists them, and must not wait for torch, diffusers and peft to import)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["PRESETS_DIR", "list_presets"]

PRESETS_DIR = Path(__file__).resolve().parent / "presets"


def list_presets() -> list[str]:
    """Names of the shipped presets (``trainer/presets/*.yaml``)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
