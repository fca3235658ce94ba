"""AUTOMATIC1111 / Forge script "Layout2Image SDM SPADE": the SPADE part of an SDM-LoRA, driven by a label map.

Thin on purpose: it reads A1111's objects (``p``, ``shared``) and hands plain values to ``l2i_a1111_logic`` beside
this folder, which uses layout2image's core (see that module and ../README.md). The LoRA part of an SDM-LoRA loads
with A1111's own ``<lora:name:1>``; layout ControlNets go through sd-webui-controlnet.
"""

from __future__ import annotations

import os
import sys

_EXTENSION_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _EXTENSION_DIR not in sys.path:  # A1111 adds it while loading scripts; Forge and tests may not
    sys.path.insert(0, _EXTENSION_DIR)

import gradio as gr  # noqa: E402
import l2i_a1111_logic as logic  # noqa: E402
from modules import scripts, shared  # noqa: E402

_RUN_ATTR = "_l2i_spade_run"


def _lora_dirs() -> list[str]:
    """Folders where a SPADE file name is looked up: A1111's Lora folder (``--lora-dir``) and models/Lora."""
    dirs = []
    lora_dir = getattr(getattr(shared, "cmd_opts", None), "lora_dir", None)
    if lora_dir:
        dirs.append(lora_dir)
    models_path = getattr(shared, "models_path", None)
    if models_path is None:
        try:
            from modules import paths

            models_path = paths.models_path
        except (ImportError, AttributeError):
            models_path = None
    if models_path:
        dirs.append(os.path.join(models_path, "Lora"))
    return list(dict.fromkeys(dirs))


def _weight_hook():
    """A1111's built-in Lora extension updates GroupNorm weights (norm LoRAs) inside the class forward, which the
    SPADE forward replaces; call its update first when it is loaded."""
    networks = sys.modules.get("networks")
    return getattr(networks, "network_apply_weights", None) if networks is not None else None


def _sd_model(p):
    return getattr(p, "sd_model", None) or shared.sd_model


class L2ISDMSpadeScript(scripts.Script):
    """Patch the UNet's decoder GroupNorms with SPADE modulation from a label map while this generation samples."""

    def title(self):
        return logic.SCRIPT_TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        keys = logic.INFOTEXT_KEYS
        with gr.Accordion(logic.SCRIPT_TITLE, open=False):
            enabled = gr.Checkbox(label="Enable", value=False)
            spade_file = gr.Textbox(
                label="SPADE file: <name>.spade.safetensors (a path, or a name in models/Lora)",
                placeholder="my_sdm_lora.spade.safetensors",
            )
            label_map = gr.File(
                label="Label map: colour PNG in the label set's palette, id PNG, or .npy of ids",
                file_types=[".png", ".npy"],
            )
            with gr.Row():
                label_set = gr.Dropdown(
                    label="Label set of the colour map (must be the SPADE file's)",
                    choices=logic.label_set_choices(),
                    value=logic.FROM_FILE,
                )
                tolerance = gr.Slider(
                    minimum=0, maximum=64, value=16, step=1, label="Colour snapping tolerance (RGB distance)"
                )
            with gr.Row():
                strength = gr.Slider(minimum=0.0, maximum=2.0, value=1.0, step=0.05, label="Strength")
                start = gr.Slider(minimum=0.0, maximum=1.0, value=0.0, step=0.01, label="Start (fraction of steps)")
                end = gr.Slider(minimum=0.0, maximum=1.0, value=1.0, step=0.01, label="End (fraction of steps)")
        self.infotext_fields = [
            (enabled, lambda params: keys["spade_file"] in params),
            (spade_file, keys["spade_file"]),
            (strength, keys["strength"]),
            (start, keys["start"]),
            (end, keys["end"]),
        ]
        components = {
            "enabled": enabled,
            "spade_file": spade_file,
            "label_map": label_map,
            "label_set": label_set,
            "tolerance": tolerance,
            "strength": strength,
            "start": start,
            "end": end,
        }
        return [components[name] for name in logic.ARG_NAMES]

    def process(self, p, *args):
        sd_model = _sd_model(p)
        try:
            unet = logic.ldm_unet_of(sd_model)
        except logic.A1111SpadeError:
            unet = None
        if unet is not None:
            logic.restore_stale(unet)
        settings = logic.SpadeSettings.from_script_args(args)
        if not settings.enabled:
            return
        logic.check_sd15(sd_model)
        run = logic.begin_run(
            settings,
            int(p.width),
            int(p.height),
            search_dirs=_lora_dirs(),
            num_timesteps=int(getattr(sd_model, "num_timesteps", 1000) or 1000),
            weight_hook=_weight_hook(),
        )
        setattr(p, _RUN_ATTR, run)
        p.extra_generation_params.update(run.infotext)
        self._attach(p, run)  # webuis without process_before_every_sampling sample right after process

    def process_before_every_sampling(self, p, *args, **kwargs):
        run = getattr(p, _RUN_ATTR, None)
        if run is not None:
            self._attach(p, run)  # idempotent; runs again for the hires pass, or after a model switch

    def postprocess(self, p, processed, *args):
        run = getattr(p, _RUN_ATTR, None)
        if run is not None:
            run.close()
            delattr(p, _RUN_ATTR)

    @staticmethod
    def _attach(p, run) -> None:
        try:
            run.attach(logic.ldm_unet_of(_sd_model(p)))
        except BaseException:
            run.close()
            raise
