"""A site's side of secure aggregation (SecAgg+): Flower's legacy client, its update masked by ``secaggplus_mod``.

client/app.py routes a SecAgg+ run's training messages here (server/secagg.py
says why they are legacy), handing over how it loads a site and trains it, so
this module needs nothing of client/app.py; evaluation and the statistics
query stay on the Message API. The server names the arrays it sends and the ones to return, in
its order; the site trains as in every run (``local_training``, local DP
included) and checks its update before the mod masks it, since after that no
one can look inside.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from shared.learner import Weights


class UnsafeUpdate(ValueError):
    """An update that SecAgg+ would corrupt without a trace: it is refused before masking."""


def check_update(update: Weights, received: Weights, clipping_range: float, examples: int, max_weight: float) -> None:
    """Refuse what the server could never detect in the masked sum.

    A NaN or infinity would spoil the whole aggregate; a wrong shape would not
    add up; a value past the clipping range, or a weight past ``max_weight``
    (which scales the values by ``examples / max_weight``), would be clipped
    silently by the quantisation.
    """
    if examples > max_weight:
        raise UnsafeUpdate(f"{examples} training examples exceed SecAgg+'s max_weight {max_weight:g}")
    for name, values in update.items():
        if name not in received or values.shape != received[name].shape:
            expected = received[name].shape if name in received else "no such array"
            raise UnsafeUpdate(f"array {name}: shape {values.shape}, expected {expected}")
        bad = int(np.size(values) - np.isfinite(values).sum())
        if bad:
            raise UnsafeUpdate(f"array {name}: {bad} values are NaN or infinite")
        reach = float(np.abs(values).max(initial=0.0))
        if reach > clipping_range:
            raise UnsafeUpdate(f"array {name} reaches {reach:.4g}, past SecAgg+'s clipping range {clipping_range:g} "
                               "(raise privacy.secagg_clipping_range)")


Training = Callable[[Any, Context, Weights, int], tuple[Weights, dict[str, float]]]  # client.app.local_training


class SecAggClient(NumPyClient):
    """Trains the received model and returns the arrays the server asked for, checked. ``site``: the ClientApp's
    site (its ``train`` split and ``name``); ``training``: its training (``client.app.local_training``)."""

    def __init__(self, site: Any, context: Context, training: Training) -> None:
        self.site = site
        self.context = context
        self.training = training

    def fit(self, parameters, config):
        received = dict(zip(str(config["arrays"]).split(), parameters, strict=True))
        weights, metrics = self.training(self.site, self.context, received, int(config["server-round"]))
        update = {name: weights[name] for name in str(config["secure"]).split()}
        try:
            check_update(update, received, float(config["clipping-range"]), len(self.site.train),
                         float(config["max-weight"]))
        except UnsafeUpdate as err:
            raise UnsafeUpdate(f"site {self.site.name}, round {config['server-round']}: {err}") from None
        return list(update.values()), len(self.site.train), metrics


def legacy_app(site_of: Callable[[Context], Any], training: Training) -> ClientApp:
    """The legacy ClientApp that speaks SecAgg+: ``site_of`` loads the site from its context, ``training``
    trains it, both the ClientApp's own (client/app.py)."""
    return ClientApp(client_fn=lambda context: SecAggClient(site_of(context), context, training).to_client(),
                     mods=[secaggplus_mod])
