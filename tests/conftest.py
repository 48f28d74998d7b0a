"""Shared fixtures: one small generated federation for the whole session (offline, a few seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulations.synth import synth


@pytest.fixture(scope="session")
def quick_data(tmp_path_factory) -> Path:
    """Two generated sites and a holdout (preset ``quick``)."""
    root = tmp_path_factory.mktemp("quick")
    synth(root, sites=2, seed=0, preset="quick")
    return root
