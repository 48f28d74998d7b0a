"""One interface over both kinds of model, with weights as plain ``{name: numpy array}`` dicts.

A torch network's weights are its state dict; an XGBoost model's are one
uint8 array holding the booster's JSON (empty before the first round). The
ClientApp and ServerApp call only these functions, so neither knows
which kind of model it federates.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from shared import privacy, xgb
from shared.config import Config, classes_of
from shared.data import Samples
from shared.metrics import log_loss
from shared.mimic import FEATURES
from shared.models import build_model, ehr_encoders, load_pretrained_weights
from shared.serde import array_to_booster, booster_to_array
from shared.train import predict as predict_torch
from shared.train import train_epochs

Weights = dict[str, np.ndarray]


def _state_dict(weights: Weights) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()}


def network(cfg: Config, weights: Weights) -> torch.nn.Module:
    """The configured torch model holding ``weights``."""
    model = build_model(cfg.model, len(FEATURES), len(classes_of(cfg)))
    model.load_state_dict(_state_dict(weights))
    return model


def _to_weights(model: torch.nn.Module) -> Weights:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def initial_weights(cfg: Config, mean: np.ndarray, std: np.ndarray) -> tuple[Weights, dict | None]:
    """The first global model (seeded) with the federation's EHR scaling; the pretrained-weights report."""
    if cfg.model.name == "xgboost":
        return {"0": booster_to_array(b"")}, None
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, len(FEATURES), len(classes_of(cfg)))
    for encoder in ehr_encoders(model):
        encoder.mean.copy_(torch.from_numpy(mean))
        encoder.std.copy_(torch.from_numpy(std))
    report = load_pretrained_weights(model, cfg.model.pretrained) if cfg.model.pretrained else None
    return _to_weights(model), report


def trained_names(cfg: Config) -> set[str]:
    """The weights that training changes: the network's trainable parameters (XGBoost: its one array)."""
    if cfg.model.name == "xgboost":
        return {"0"}
    model = build_model(cfg.model, len(FEATURES), len(classes_of(cfg)))
    return {name for name, p in model.named_parameters() if p.requires_grad}


def local_update(cfg: Config, weights: Weights, data: Samples, seed: int, proximal_mu: float = 0.0,
                 dp: privacy.Plan | None = None) -> tuple[Weights, float]:
    """A site's training on ``data`` from the global ``weights``; returns its update and training loss.

    With ``dp``, the torch models train with DP-SGD (``shared.privacy``) instead.
    """
    if cfg.model.name == "xgboost":
        raw, loss = xgb.boost(array_to_booster(weights["0"]), data.ehr, data.labels, cfg.model, seed,
                              bagging=cfg.federation.strategy == "xgb_bagging")
        return {"0": booster_to_array(raw)}, loss
    model = network(cfg, weights)
    if dp is not None:
        loss = privacy.train_dp(model, data, cfg, len(classes_of(cfg)), seed, dp)
    else:
        loss = train_epochs(model, data, cfg.train, len(classes_of(cfg)), seed, proximal_mu=proximal_mu)
    return _to_weights(model), loss


def predict(cfg: Config, weights: Weights, data: Samples) -> tuple[np.ndarray, float]:
    """Class probabilities ``(n, K)`` on ``data`` and the mean cross-entropy."""
    if cfg.model.name == "xgboost":
        probs = xgb.predict_proba(array_to_booster(weights["0"]), data.ehr)
        return probs, log_loss(data.labels, probs)
    return predict_torch(network(cfg, weights), data)


def save(cfg: Config, weights: Weights, run_dir: Path) -> Path:
    """Write the final model: ``model.json`` (XGBoost) or ``model.pt`` (a torch state dict)."""
    if cfg.model.name == "xgboost":
        path = run_dir / "model.json"
        path.write_bytes(array_to_booster(weights["0"]))
    else:
        path = run_dir / "model.pt"
        torch.save(_state_dict(weights), path)
    return path


def load(cfg: Config, run_dir: Path) -> Weights:
    """The final model that :func:`save` wrote into ``run_dir``."""
    if cfg.model.name == "xgboost":
        return {"0": booster_to_array((run_dir / "model.json").read_bytes())}
    state = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    return {k: v.numpy() for k, v in state.items()}
