"""Shared fixtures: one small generated federation for the whole session (offline, a few seconds), and a federation
run on it in process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.config import Config, run_envelope
from simulations.synth import synth
from tests.helpers import CONFIG, quick_config

# Tests using these run federations or train models; with the e2e tests (real Flower processes) and those marked by
# hand (more than about 5 s on 2 cores) they are ``slow``: `make test` runs every test, `make test-quick` the others.
SLOW_FIXTURES = {"federation", "quick_paper", "quick_weights", "tiny"}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("e2e") or SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def quick_data(tmp_path_factory) -> Path:
    """Two generated sites and a holdout (preset ``quick``)."""
    root = tmp_path_factory.mktemp("quick")
    synth(root, sites=2, seed=0, preset="quick")
    return root


@pytest.fixture(scope="session")
def federation(quick_data):
    """``federation(run_dir, settings)``: one federation run in process (the real ServerApp and ClientApp, no Ray)
    on the quick data; returns its metrics.json.

    ``settings``: a :class:`Config`, or overrides of :func:`tests.helpers.quick_config`'s small one. ``client``
    stands in for the ClientApp (a tampering one), ``resume`` continues the run in ``run_dir``.
    """
    from client.app import app as client_app
    from server.app import app as server_app
    from simulations.inprocess import run_server

    def run(run_dir: Path, settings: Config | dict | None = None, client=None, resume: bool = False) -> dict:
        cfg = settings if isinstance(settings, Config) else quick_config(quick_data, settings or {})
        run_server(server_app, client or client_app, run_envelope(cfg, run_dir, CONFIG, resume),
                   num_nodes=cfg.data.sites)
        return json.loads((Path(run_dir) / "metrics.json").read_text())

    return run
