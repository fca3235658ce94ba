"""Stand-in for ``comfy.model_patcher.ModelPatcher`` (ComfyUI 0.8.0): the clone and patch bookkeeping only.

``clone()`` shares ``model`` and copies the patch registries the way the real one does; ``patch_model`` applies
object patches and injections, ``unpatch_model`` undoes them. No weights are moved or patched.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from .patcher_extension import CallbacksMP, PatcherInjection, WrappersMP


def get_attr(obj, attr: str):
    for name in attr.split("."):
        obj = getattr(obj, name)
    return obj


def set_attr(obj, attr: str, value):
    names = attr.split(".")
    for name in names[:-1]:
        obj = getattr(obj, name)
    prev = getattr(obj, names[-1])
    setattr(obj, names[-1], value)
    return prev


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.size = size
        self.model = model
        self.patches: dict = {}
        self.backup: dict = {}
        self.object_patches: dict = {}
        self.object_patches_backup: dict = {}
        self.model_options = {"transformer_options": {}}
        self.load_device = load_device
        self.offload_device = offload_device
        self.weight_inplace_update = weight_inplace_update
        self.parent = None
        self.attachments: dict = {}
        self.additional_models: dict[str, list[ModelPatcher]] = {}
        self.callbacks = CallbacksMP.init_callbacks()
        self.wrappers = WrappersMP.init_wrappers()
        self.is_injected = False
        self.skip_injection = False
        self.injections: dict[str, list[PatcherInjection]] = {}

    def model_size(self) -> int:
        return self.size

    def clone(self) -> ModelPatcher:
        n = self.__class__(self.model, self.load_device, self.offload_device, self.size, self.weight_inplace_update)
        n.patches = {k: v[:] for k, v in self.patches.items()}
        n.object_patches = self.object_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)
        n.backup = self.backup
        n.object_patches_backup = self.object_patches_backup
        n.parent = self
        n.attachments = dict(self.attachments)
        for k, c in self.additional_models.items():
            n.additional_models[k] = [x.clone() for x in c]
        for k, c in self.callbacks.items():
            n.callbacks[k] = {k1: c1.copy() for k1, c1 in c.items()}
        for k, w in self.wrappers.items():
            n.wrappers[k] = {k1: w1.copy() for k1, w1 in w.items()}
        n.is_injected = self.is_injected
        n.skip_injection = self.skip_injection
        for k, i in self.injections.items():
            n.injections[k] = i.copy()
        return n

    def is_clone(self, other) -> bool:
        return hasattr(other, "model") and self.model is other.model

    def model_state_dict(self, filter_prefix=None) -> dict:
        sd = self.model.state_dict()
        return {k: v for k, v in sd.items() if filter_prefix is None or k.startswith(filter_prefix)}

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0) -> list:
        """Record weight patches for keys the model has (applied by the real one at load time; not here)."""
        model_sd = self.model.state_dict()
        added = []
        for key, patch in patches.items():
            if key in model_sd:
                added.append(key)
                self.patches.setdefault(key, []).append((strength_patch, patch, strength_model, None, None))
        return added

    def add_object_patch(self, name, obj) -> None:
        self.object_patches[name] = obj

    def get_model_object(self, name: str):
        if name in self.object_patches:
            return self.object_patches[name]
        if name in self.object_patches_backup:
            return self.object_patches_backup[name]
        return get_attr(self.model, name)

    def set_model_unet_function_wrapper(self, unet_wrapper_function) -> None:
        self.model_options["model_function_wrapper"] = unet_wrapper_function

    def set_model_sampler_cfg_function(self, sampler_cfg_function, disable_cfg1_optimization=False) -> None:
        self.model_options["sampler_cfg_function"] = sampler_cfg_function
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True

    def add_wrapper_with_key(self, wrapper_type: str, key: str, wrapper: Callable) -> None:
        self.wrappers.setdefault(wrapper_type, {}).setdefault(key, []).append(wrapper)

    def remove_wrappers_with_key(self, wrapper_type: str, key: str) -> None:
        self.wrappers.get(wrapper_type, {}).pop(key, None)

    def get_wrappers(self, wrapper_type: str, key: str) -> list[Callable]:
        return self.wrappers.get(wrapper_type, {}).get(key, [])

    def get_all_wrappers(self, wrapper_type: str) -> list[Callable]:
        out: list[Callable] = []
        for w in self.wrappers.get(wrapper_type, {}).values():
            out.extend(w)
        return out

    def add_callback_with_key(self, call_type: str, key: str, callback: Callable) -> None:
        self.callbacks.setdefault(call_type, {}).setdefault(key, []).append(callback)

    def set_attachments(self, key: str, attachment) -> None:
        self.attachments[key] = attachment

    def get_attachment(self, key: str):
        return self.attachments.get(key, None)

    def set_injections(self, key: str, injections: list[PatcherInjection]) -> None:
        self.injections[key] = injections

    def remove_injections(self, key: str) -> None:
        self.injections.pop(key, None)

    def get_injections(self, key: str):
        return self.injections.get(key, None)

    def set_additional_models(self, key: str, models: list[ModelPatcher]) -> None:
        self.additional_models[key] = models

    def remove_additional_models(self, key: str) -> None:
        self.additional_models.pop(key, None)

    def get_additional_models_with_key(self, key: str) -> list[ModelPatcher]:
        return self.additional_models.get(key, [])

    def get_additional_models(self) -> list[ModelPatcher]:
        out: list[ModelPatcher] = []
        for models in self.additional_models.values():
            out.extend(models)
        return out

    def inject_model(self) -> None:
        if self.is_injected or self.skip_injection:
            return
        for injections in self.injections.values():
            for inj in injections:
                inj.inject(self)
                self.is_injected = True

    def eject_model(self) -> None:
        if not self.is_injected:
            return
        for injections in self.injections.values():
            for inj in injections:
                inj.eject(self)
        self.is_injected = False

    def patch_model(self, device_to=None, lowvram_model_memory=0, load_weights=True, force_patch_weights=False):
        for k, obj in self.object_patches.items():
            old = set_attr(self.model, k, obj)
            if k not in self.object_patches_backup:
                self.object_patches_backup[k] = old
        self.inject_model()
        return self.model

    def unpatch_model(self, device_to=None, unpatch_weights=True) -> None:
        self.eject_model()
        for k in list(self.object_patches_backup):
            set_attr(self.model, k, self.object_patches_backup[k])
        self.object_patches_backup.clear()
