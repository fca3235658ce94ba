"""Stand-in for ComfyUI's ``comfy`` package (tests only): model patching and sampling bookkeeping."""
