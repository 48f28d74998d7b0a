"""One interface over both kinds of model, with weights as plain ``{name: numpy array}`` dicts.

A torch network's weights are its state dict; an XGBoost model's are one
uint8 array holding the booster's JSON (empty before the first round). The
ClientApp and ServerApp call only these functions, so neither knows
which kind of model it federates.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from shared import privacy, xgb
from shared.cache import write_atomic
from shared.config import Config, ModelConfig, classes_of
from shared.data import Samples
from shared.metrics import log_loss
from shared.mimic import FEATURES
from shared.models import build_model, ehr_encoders, load_pretrained_weights
from shared.serde import array_to_booster, booster_to_array
from shared.train import image_tensor, train_epochs
from shared.train import predict as predict_torch

Weights = dict[str, np.ndarray]
# No honest weight comes near this |value|. The largest are the EHR scaling buffers, means and spreads of raw EHR
# values (shared.mimic: the plausible lab range ends at 2e4, LDH); trained weights, BatchNorm statistics and FedAdam's
# moments are far smaller. One rule for the server: no EHR value a site's statistics imply, no value of an update it
# aggregates and no tensor of a checkpoint it resumes from lies beyond it (5.8e36 in a file is not a weight).
MAX_WEIGHT = 1e6


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


@functools.lru_cache(maxsize=8)
def _names(model: ModelConfig, n_classes: int) -> tuple[frozenset[str], frozenset[str]]:
    """The torch model's trainable parameters and its BatchNorm layers' weights, from one model built per
    configuration (sites and the server ask on every message)."""
    net = build_model(model, len(FEATURES), n_classes)
    trained = frozenset(name for name, p in net.named_parameters() if p.requires_grad)
    bn = frozenset(f"{prefix}.{name}" if prefix else name for prefix, m in net.named_modules()
                   if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for name in m.state_dict())
    return trained, bn


def trained_names(cfg: Config) -> set[str]:
    """The weights that training changes: the network's trainable parameters (XGBoost: its one array)."""
    if cfg.model.name == "xgboost":
        return {"0"}
    return set(_names(cfg.model, len(classes_of(cfg)))[0])


def bn_names(cfg: Config) -> set[str]:
    """The weights of the model's BatchNorm layers (statistics, and affine parameters if any): what FedBN keeps local."""
    if cfg.model.name == "xgboost":
        return set()
    return set(_names(cfg.model, len(classes_of(cfg)))[1])


@torch.no_grad()
def adapt_bn(cfg: Config, weights: Weights, data: Samples, batch_size: int = 256) -> Weights:
    """``weights`` with BatchNorm statistics re-estimated on ``data``'s patches (labels unused): how a site
    that never trained under FedBN gets statistics of its own (Li et al., ICLR 2021)."""
    model = network(cfg, weights).eval()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over every batch
        m.train()
    for start in range(0, len(data), batch_size):
        idx = np.arange(start, min(start + batch_size, len(data)))
        model(image_tensor(data.images[idx]), torch.from_numpy(data.ehr[idx]))
    return _to_weights(model)


def local_update(cfg: Config, weights: Weights, data: Samples, seed: int, proximal_mu: float = 0.0,
                 dp: privacy.Plan | None = None, progress: tuple[int, int] = (0, 1)) -> tuple[Weights, float]:
    """A site's training on ``data`` from the global ``weights``; returns its update and training loss.

    With ``dp``, the torch models train with DP-SGD (``shared.privacy``) instead. ``progress``: (rounds done,
    rounds in all), for the learning-rate schedule (``shared.train.lr_factor``).
    """
    if cfg.model.name == "xgboost":
        raw, loss = xgb.boost(array_to_booster(weights["0"]), data.ehr, data.labels, cfg.model, seed,
                              bagging=cfg.federation.strategy == "xgb_bagging")
        return {"0": booster_to_array(raw)}, loss
    model = network(cfg, weights)
    if dp is not None:
        loss = privacy.train_dp(model, data, cfg, len(classes_of(cfg)), seed, dp)
    else:
        loss = train_epochs(model, data, cfg.train, len(classes_of(cfg)), seed, proximal_mu, progress)
    return _to_weights(model), loss


def predict(cfg: Config, weights: Weights, data: Samples, adapt: bool | None = None) -> tuple[np.ndarray, float]:
    """Class probabilities ``(n, K)`` on ``data`` and the mean cross-entropy.

    Under FedBN the global model holds no site's BatchNorm statistics, so by default (``adapt=None``) they are
    first re-estimated on ``data`` itself (:func:`adapt_bn`); a site passes ``adapt=False`` with its own.
    """
    if cfg.model.name == "xgboost":
        probs = xgb.predict_proba(array_to_booster(weights["0"]), data.ehr)
        return probs, log_loss(data.labels, probs)
    if cfg.federation.fedbn if adapt is None else adapt:
        weights = adapt_bn(cfg, weights, data)
    return predict_torch(network(cfg, weights), data)


def save(cfg: Config, weights: Weights, run_dir: Path) -> Path:
    """Write the final model: ``model.json`` (XGBoost) or ``model.pt`` (a torch state dict)."""
    if cfg.model.name == "xgboost":
        path = run_dir / "model.json"
        write_atomic(path, "wb", lambda f: f.write(array_to_booster(weights["0"])))
    else:
        path = run_dir / "model.pt"
        write_atomic(path, "wb", lambda f: torch.save(_state_dict(weights), f))
    return path


def load(cfg: Config, run_dir: Path) -> Weights:
    """The final model that :func:`save` wrote into ``run_dir``."""
    if cfg.model.name == "xgboost":
        return {"0": booster_to_array((run_dir / "model.json").read_bytes())}
    state = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    return {k: v.numpy() for k, v in state.items()}
