"""Inference pipelines in the shape diffusers users know: built from a base and an adapter, called with label maps.

This package sits above ``core/`` (the torch-only samplers), ``weights/`` (file formats) and ``trainer/models.py``
(base-model loading), which it combines; ``core/`` may not import those, so the pipeline cannot live there.
"""

from .layout import LayoutPipeline, LayoutPipelineOutput, PipelineError, resolve_adapter

__all__ = ["LayoutPipeline", "LayoutPipelineOutput", "PipelineError", "resolve_adapter"]
