"""Stand-in for ComfyUI's ``comfy_api`` package (tests only; see ``tests/comfy_stub/__init__.py``)."""
