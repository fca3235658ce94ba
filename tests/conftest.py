"""Shared fixtures. Tests import the installed package by name (``layout2image``), never the checkout folder."""

from __future__ import annotations

import logging

import pytest

from layout2image.core.logging import reset_warn_once


@pytest.fixture(autouse=True)
def _fresh_warn_once():
    reset_warn_once()
    yield


@pytest.fixture
def l2i_caplog(caplog):
    """caplog that also sees the ``layout2image`` logger tree (it may be configured not to propagate)."""
    caplog.set_level(logging.WARNING, logger="layout2image")
    return caplog
