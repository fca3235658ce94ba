"""Stand-in for ``comfy_api.latest._ui``: UI outputs that keep what they were given instead of writing files."""

from __future__ import annotations

from ._io import _UIOutput


class PreviewImage(_UIOutput):
    def __init__(self, image, animated: bool = False, cls=None, **kwargs):
        self.images = list(image)
        self.animated = animated
        self.cls = cls

    def as_dict(self) -> dict:
        return {"images": [f"preview_{i}.png" for i in range(len(self.images))], "animated": (self.animated,)}


class PreviewText(_UIOutput):
    def __init__(self, value: str, **kwargs):
        self.value = value

    def as_dict(self) -> dict:
        return {"text": (self.value,)}
