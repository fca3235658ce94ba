"""Map the repository root to the import name ``layout2image``.

The checkout folder itself is the package (ComfyUI loads it from ``custom_nodes/<any name>``), so the packages
are found relative to the root and prefixed with the import name. Everything else lives in pyproject.toml.
"""

from setuptools import find_packages, setup

_SUBPACKAGES = find_packages(
    where=".", exclude=["tests", "tests.*", "build", "build.*", "docs", "docs.*", "a1111", "a1111.*"]
)

setup(
    package_dir={"layout2image": "."},
    packages=["layout2image"] + [f"layout2image.{name}" for name in _SUBPACKAGES],
)
