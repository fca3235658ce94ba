"""Shared fixtures. Tests import the installed package by name (``layout2image``), never the checkout folder."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from layout2image.core.logging import reset_warn_once

# The suite's tensors are tiny: on a 2-core machine a second intra-op thread costs more in hand-offs than it
# saves (a small BatchNorm call measured 23 ms with 2 threads vs 0.05 ms with 1).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_warn_once():
    reset_warn_once()
    yield


@pytest.fixture
def l2i_caplog(caplog):
    """caplog that also sees the ``layout2image`` logger tree (it may be configured not to propagate)."""
    caplog.set_level(logging.WARNING, logger="layout2image")
    return caplog


def write_lightning_checkpoint(path: Path, control: dict[str, torch.Tensor], junk_floats: int = 1000) -> Path:
    """A ControlLDM checkpoint shaped like the official ALDM release: a Lightning dict whose ``state_dict`` holds
    SD's parts (``model.diffusion_model``, ``first_stage_model``, ``cond_stage_model``: here ``junk_floats`` zeros
    in all) and the ControlNet under ``control_model.*`` (``control``: ldm-layout keys with that prefix)."""
    per_part = max(1, junk_floats // 3)
    state = {
        "betas": torch.linspace(1e-4, 2e-2, 1000),
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(per_part),
        "first_stage_model.encoder.conv_in.weight": torch.zeros(per_part),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(per_part),
        **control,
    }
    torch.save({"state_dict": state, "epoch": 3, "global_step": 1234, "pytorch-lightning_version": "1.5.0"}, path)
    return path


@pytest.fixture(scope="session")
def lightning_checkpoint():
    """`write_lightning_checkpoint`, for tests that need an official-layout ALDM ``.ckpt``."""
    return write_lightning_checkpoint
