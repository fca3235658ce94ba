"""Layout guidance: SDM-style classifier-free guidance over the label map, combined with text CFG, as a GUIDER.

Three predictions per step (all denoised, as ComfyUI's CFG works on x0):

    D(c, l)   positive text, the layout        (cond list 0)
    D(∅, l)   negative text, the layout        (cond list 1)
    D(∅, ∅l)  negative text, the null layout   (cond list 2)

    out = D(∅, ∅l) + s_layout · (D(∅, l) − D(∅, ∅l)) + s_text · (D(c, l) − D(∅, l))

(Guider_DualCFG's "regular" combination with the null layout as the outermost branch.) ``s_layout = 1`` is plain
text CFG and skips the third prediction.

What "null layout" means for each way a layout enters the model:

- **SPADE** (Apply SPADE on the MODEL): the guider names cond list 2 in ``transformer_options`` under
  ``spade.NULL_LAYOUT_CONDS``; Apply SPADE's wrapper gives those chunks the zero layout (this overrides its own
  ``uncond_layout`` choice).
- **ControlNets** (Apply ControlNet with positive and negative): cond list 2 is the negative conditioning without
  its ``control`` entries, i.e. without the residuals. A ControlNet applied to the positive only with "apply to
  uncond" (the legacy Apply ControlNet node) is copied onto every other cond list by ComfyUI, the null one
  included, so use the Advanced apply node.
"""

from __future__ import annotations

import math

import comfy.samplers
from comfy_api.latest import io

from .spade import NULL_LAYOUT_CONDS

__all__ = ["NODES", "L2ILayoutGuider", "LayoutGuider"]

CATEGORY = "layout2image/sampling"
NULL_LAYOUT = "l2i_null_layout"
_LAYOUT_KEYS = ("control", "control_apply_to_uncond")


def without_layout(conditioning: list) -> list:
    """A copy of a CONDITIONING with the layout parts (ControlNets) removed; the input is not modified."""
    return [[tensor, {k: v for k, v in options.items() if k not in _LAYOUT_KEYS}] for tensor, options in conditioning]


class LayoutGuider(comfy.samplers.CFGGuider):
    """``CFGGuider`` with a third, null-layout branch (see the module docstring)."""

    def set_cfg(self, cfg: float, layout_cfg: float = 1.0) -> None:
        self.cfg = cfg
        self.layout_cfg = layout_cfg

    def set_conds(self, positive, negative) -> None:
        self.inner_set_conds({"positive": positive, "negative": negative, NULL_LAYOUT: without_layout(negative)})

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 - CFGGuider's signature
        positive = self.conds.get("positive", None)
        negative = self.conds.get("negative", None)
        null = self.conds.get(NULL_LAYOUT, None)
        layout_cfg = getattr(self, "layout_cfg", 1.0)
        if not model_options.get("disable_cfg1_optimization", False) and math.isclose(layout_cfg, 1.0):
            null = None
            if math.isclose(self.cfg, 1.0):
                negative = None
        options = dict(model_options)
        options["transformer_options"] = {**model_options.get("transformer_options", {}), NULL_LAYOUT_CONDS: (2,)}
        cond, uncond, null_out = comfy.samplers.calc_cond_batch(
            self.inner_model, [positive, negative, null], x, timestep, options
        )
        if null is None:
            return comfy.samplers.cfg_function(
                self.inner_model,
                cond,
                uncond,
                self.cfg,
                x,
                timestep,
                model_options=options,
                cond=positive,
                uncond=negative,
            )
        layout = comfy.samplers.cfg_function(
            self.inner_model,
            uncond,
            null_out,
            layout_cfg,
            x,
            timestep,
            model_options=options,
            cond=negative,
            uncond=null,
        )
        return layout + (cond - uncond) * self.cfg


class L2ILayoutGuider(io.ComfyNode):
    """Text CFG plus classifier-free guidance over the layout, for SamplerCustomAdvanced."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="L2ILayoutGuider",
            display_name="Layout CFG Guider",
            category=CATEGORY,
            description=(
                "A GUIDER for SamplerCustomAdvanced: text CFG plus SDM-style guidance towards the layout "
                "(prediction with the layout vs with the null layout). The layout is what Apply SPADE put on the "
                "MODEL and/or the ControlNets applied to positive and negative. Costs a third model pass per step "
                "unless layout_cfg is 1."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model (with Apply SPADE, if SPADE carries the layout)."),
                io.Conditioning.Input(
                    "positive", tooltip="Positive conditioning (with the layout ControlNet applied, if any)."
                ),
                io.Conditioning.Input(
                    "negative", tooltip="Negative conditioning (with the same ControlNet applied, if any)."
                ),
                io.Float.Input(
                    "text_cfg",
                    default=7.5,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    round=0.01,
                    tooltip="Text guidance scale: positive vs negative prompt, both with the layout (1 = off).",
                ),
                io.Float.Input(
                    "layout_cfg",
                    default=1.5,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    round=0.01,
                    tooltip=(
                        "Layout guidance scale: layout vs null layout under the negative prompt. 1 = no extra "
                        "guidance (no third pass); 1.5-3 follows the layout more closely."
                    ),
                ),
            ],
            outputs=[io.Guider.Output("guider", tooltip="The guider, for SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, text_cfg: float = 7.5, layout_cfg: float = 1.5) -> io.NodeOutput:
        guider = LayoutGuider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(float(text_cfg), float(layout_cfg))
        return io.NodeOutput(guider)


NODES = [L2ILayoutGuider]
