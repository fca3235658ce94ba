"""A small stand-in for the ComfyUI APIs the pack's nodes touch (ComfyUI 0.8.0 signatures).

Modelled: ``comfy_api.latest`` (io/ui, V3 schemas), ``comfy.model_patcher`` / ``patcher_extension`` (clones,
wrappers, injections, weight-patch bookkeeping), ``comfy.samplers`` (CFG batching), ``comfy.ops``,
``comfy.controlnet`` + ``comfy.cldm.cldm`` (the ControlNet object, its hint pipeline and loader),
``comfy.lora`` / ``comfy.sd`` (LoRA key map and ``load_lora_for_models``), ``comfy.utils``,
``comfy.model_management`` (CPU, fp32) and ``folder_paths`` (folders registered by the tests).

Nothing here is imported by the pack. A test module loads this file by path and installs the stand-in for the
duration of a fixture::

    with installed():
        from layout2image.nodes import label_maps   # now binds to the stand-in's comfy_api
        ...

``installed`` puts this folder at the front of ``sys.path`` (so ``comfy_api``, ``comfy`` resolve here) and, on
entry and exit, drops every ``comfy*``/``comfy_api*``/``folder_paths`` module and every module of
``layout2image.nodes`` from ``sys.modules``, so node modules bound to one stand-in never leak into other tests.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

STUB_ROOT = Path(__file__).resolve().parent
_PURGED_PREFIXES = ("comfy", "comfy_api", "folder_paths", "layout2image.nodes")


def _purge() -> None:
    for name in list(sys.modules):
        if any(name == p or name.startswith(p + ".") for p in _PURGED_PREFIXES):
            del sys.modules[name]


@contextmanager
def installed() -> Iterator[Path]:
    """Make ``comfy_api``/``comfy`` import from this folder while the block runs."""
    _purge()
    sys.path.insert(0, str(STUB_ROOT))
    try:
        yield STUB_ROOT
    finally:
        try:
            sys.path.remove(str(STUB_ROOT))
        except ValueError:
            pass
        _purge()


def sampling_transformer_options(patcher, cond_or_uncond: Sequence[int], sigmas=None) -> dict:
    """The ``transformer_options`` one model call gets during sampling (``samplers.calc_cond_batch`` after
    ``sampler_helpers.prepare_model_patcher``): the patcher's options with its wrappers merged in, plus
    ``cond_or_uncond`` (0 = cond chunk, 1 = uncond chunk, in batch order) and ``sigmas``."""
    from comfy.patcher_extension import copy_nested_dicts, merge_nested_dicts

    options = copy_nested_dicts(patcher.model_options["transformer_options"])
    merge_nested_dicts(options.setdefault("wrappers", {}), patcher.wrappers, copy_dict1=False)
    options["cond_or_uncond"] = list(cond_or_uncond)
    if sigmas is not None:
        options["sigmas"] = sigmas
    return options
