"""Stand-in for the parts of ``comfy.samplers`` (ComfyUI 0.8.0) a guider uses: ``CFGGuider``,
``calc_cond_batch`` and ``cfg_function``.

``calc_cond_batch`` runs every non-None cond list in one batch, as ComfyUI does when their shapes and controls
match: chunk ``k`` of the batch is cond list ``cond_or_uncond[k]``; it calls
``model.apply_model(x, t, transformer_options=..., conds=[...])`` and returns one output per cond list
(zeros for None, like the real one).
"""

from __future__ import annotations

import uuid

import torch

from .patcher_extension import copy_nested_dicts


def convert_cond(cond):
    out = []
    for c in cond:
        temp = c[1].copy()
        model_conds = temp.get("model_conds", {})
        if c[0] is not None:
            temp["cross_attn"] = c[0]
        temp["model_conds"] = model_conds
        temp["uuid"] = uuid.uuid4()
        out.append(temp)
    return out


def calc_cond_batch(model, conds, x_in: torch.Tensor, timestep, model_options: dict):
    index = [i for i, c in enumerate(conds) if c is not None]
    outputs = [torch.zeros_like(x_in) for _ in conds]
    if not index:
        return outputs
    options = copy_nested_dicts(model_options.get("transformer_options", {}))
    options["cond_or_uncond"] = index[:]
    options["sigmas"] = timestep
    x = torch.cat([x_in] * len(index))
    t = torch.cat([timestep] * len(index))
    out = model.apply_model(x, t, transformer_options=options, conds=[conds[i] for i in index])
    for k, chunk in zip(index, out.chunk(len(index))):
        outputs[k] = chunk
    return outputs


def cfg_function(model, cond_pred, uncond_pred, cond_scale, x, timestep, model_options=None, cond=None, uncond=None):
    model_options = {} if model_options is None else model_options
    if "sampler_cfg_function" in model_options:
        args = {"cond": x - cond_pred, "uncond": x - uncond_pred, "cond_scale": cond_scale, "timestep": timestep,
                "input": x, "sigma": timestep, "cond_denoised": cond_pred, "uncond_denoised": uncond_pred,
                "model": model, "model_options": model_options, "input_cond": cond,
                "input_uncond": uncond}  # fmt: skip
        result = x - model_options["sampler_cfg_function"](args)
    else:
        result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for fn in model_options.get("sampler_post_cfg_function", []):
        result = fn({"denoised": result, "cond": cond, "uncond": uncond, "cond_scale": cond_scale, "model": model,
                     "uncond_denoised": uncond_pred, "cond_denoised": cond_pred, "sigma": timestep,
                     "model_options": model_options, "input": x})  # fmt: skip
    return result


def sampling_function(model, x, timestep, uncond, cond, cond_scale, model_options={}, seed=None):  # noqa: B006
    uncond_ = None if cond_scale == 1.0 and not model_options.get("disable_cfg1_optimization", False) else uncond
    out = calc_cond_batch(model, [cond, uncond_], x, timestep, model_options)
    return cfg_function(model, out[0], out[1], cond_scale, x, timestep, model_options, cond=cond, uncond=uncond_)


class CFGGuider:
    def __init__(self, model_patcher):
        self.model_patcher = model_patcher
        self.model_options = model_patcher.model_options
        self.original_conds = {}
        self.cfg = 1.0

    def set_conds(self, positive, negative):
        self.inner_set_conds({"positive": positive, "negative": negative})

    def set_cfg(self, cfg):
        self.cfg = cfg

    def inner_set_conds(self, conds):
        for k in conds:
            self.original_conds[k] = convert_cond(conds[k])

    def __call__(self, *args, **kwargs):
        return self.predict_noise(*args, **kwargs)

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006
        return sampling_function(
            self.inner_model,
            x,
            timestep,
            self.conds.get("negative", None),
            self.conds.get("positive", None),
            self.cfg,
            model_options=model_options,
            seed=seed,
        )

    def prepare_for_test(self, inner_model) -> None:
        """What ``outer_sample`` sets up before ``predict_noise`` runs: ``inner_model`` and copied ``conds``."""
        self.inner_model = inner_model
        self.conds = {k: [c.copy() for c in v] for k, v in self.original_conds.items()}
