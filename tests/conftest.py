"""Shared fixtures. Tests import the installed package by name (``layout2image``), never the checkout folder."""

from __future__ import annotations

import logging

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
