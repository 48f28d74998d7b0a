"""Explanations the study validates its models with: Grad-CAM on the patches, SHAP on the EHR features.

* :func:`gradcam`: pytorch-grad-cam's ``GradCAM`` on the last convolutional
  stage of any image encoder (cnn, resnet18, fusion's image branch), with the
  patient's EHR held fixed for fusion. One map per patch, at the patch's size.
* :func:`ehr_shap`: SHAP values of the EHR features for the class of interest:
  ``TreeExplainer`` for XGBoost; for the MLP and fusion's tabular branch,
  ``DeepExplainer`` (DeepLIFT's rescale rule, deterministic) against one
  reference every site knows without sharing data: the federation's mean
  patient (the model's own scaling buffer) and, for fusion, a zero image
  latent. Missing values are explained as that mean, which is how the
  model reads them.
* :func:`importance` / :func:`combine`: federated SHAP. Each site sends only
  its per-feature mean |SHAP| and its row count; the example-weighted mean of
  those equals the mean |SHAP| over the pooled rows, because every row's SHAP
  values depend on the model and that shared reference alone.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from shared import learner, xgb
from shared.config import Config, classes_of
from shared.data import Samples
from shared.metrics import focus_class
from shared.models import FusionNet, LateFusion
from shared.resnet import ResNetEncoder
from shared.serde import array_to_booster
from shared.train import image_tensor

BATCH = 256


class _ImageView(nn.Module):
    """The model as a function of the image alone, each patch's EHR row held fixed (what Grad-CAM needs)."""

    def __init__(self, model: nn.Module, ehr: torch.Tensor) -> None:
        super().__init__()
        self.model, self.ehr = model, ehr

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images, self.ehr[: len(images)])


def _cam_layer(model: nn.Module) -> nn.Module:
    """The last convolutional stage of the model's image encoder (after its activation)."""
    net = model.image_model if isinstance(model, LateFusion) else model
    encoder = getattr(net, "image", None)
    if encoder is None:
        raise ValueError("Grad-CAM needs an image model (cnn, resnet18, fusion or late_fusion)")
    if isinstance(encoder, ResNetEncoder):
        return encoder.net.layer4
    relus = [m for m in encoder.features if isinstance(m, nn.ReLU)]
    return relus[-1]


def gradcam(model: nn.Module, images: np.ndarray, ehr: np.ndarray, targets: list[int]) -> np.ndarray:
    """Grad-CAM maps ``(n, P, P)`` in [0, 1] for class ``targets[i]`` of patch ``i``."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    view = _ImageView(model.eval(), torch.from_numpy(ehr))
    with GradCAM(model=view, target_layers=[_cam_layer(model)]) as cam:
        return cam(input_tensor=image_tensor(images), targets=[ClassifierOutputTarget(int(t)) for t in targets])


class _TabularView(nn.Module):
    """Fusion's logit of one class as a function of (raw image latent, EHR): the image becomes an input."""

    def __init__(self, model: FusionNet, target: int) -> None:
        super().__init__()
        self.model, self.target = model, target

    def forward(self, image_latent: torch.Tensor, ehr: torch.Tensor) -> torch.Tensor:
        parts = [self.model.image_norm(image_latent)] if self.model.image is not None else []
        parts.append(self.model.ehr_norm(self.model.ehr(ehr)))
        return self.model.head(torch.cat(parts, dim=1))[:, self.target:self.target + 1]  # (B, 1)


def _explained_class(cfg: Config) -> int:
    classes = classes_of(cfg)
    return classes.index(focus_class(classes))


def ehr_shap(cfg: Config, weights: dict[str, np.ndarray], data: Samples) -> np.ndarray:
    """SHAP values ``(n, F)`` of the EHR features for the class of interest (mitosis, or breast cancer)."""
    import shap

    target = _explained_class(cfg)
    if cfg.model.name == "xgboost":
        booster = xgb.load_booster(array_to_booster(weights["0"]))
        values = shap.TreeExplainer(booster).shap_values(data.ehr)  # log-odds of breast cancer
        return np.asarray(values, np.float64)
    model = learner.network(cfg, weights).eval()
    if isinstance(model, LateFusion):
        model = model.ehr_model
    if model.ehr is None:
        raise ValueError(f"model.name {cfg.model.name!r} has no EHR input to explain")
    mean = model.ehr.mean.detach().numpy()
    ehr = np.where(np.isnan(data.ehr), mean, data.ehr).astype(np.float32)  # how the model reads a missing value
    view = _TabularView(model, target)
    with torch.no_grad():
        latent = (torch.cat([model.image(image_tensor(data.images[i:i + BATCH])) for i in range(0, len(data), BATCH)])
                  if model.image is not None else torch.zeros(len(data), 0))
    background = [torch.zeros(1, latent.shape[1]), torch.from_numpy(mean[None, :]).float()]
    with warnings.catch_warnings():  # LayerNorm has no DeepLIFT rule: shap passes its gradient, and says so
        warnings.filterwarnings("ignore", message="unrecognized nn.Module")
        explainer = shap.DeepExplainer(view, background)
        values = explainer.shap_values([latent, torch.from_numpy(ehr)], check_additivity=False)
    # shap 0.51: a list over the inputs, each (n, width, outputs); one output here
    return np.asarray(values[1], np.float64).reshape(len(data), -1)


def explained_rows(data: Samples, n: int, seed: int) -> Samples:
    """The ``n`` rows (at most) a site explains: a seeded choice, so a test can pool the very same rows."""
    if len(data) <= n:
        return data
    keep = np.zeros(len(data), bool)
    keep[np.random.default_rng([seed, 4242]).choice(len(data), n, replace=False)] = True
    return data.subset(keep)


def importance(cfg: Config, weights: dict[str, np.ndarray], data: Samples) -> tuple[np.ndarray, int]:
    """A site's share of federated SHAP: mean |SHAP| per feature over its rows, and how many rows."""
    return np.abs(ehr_shap(cfg, weights, data)).mean(0), len(data)


def has_ehr_input(cfg: Config) -> bool:
    return cfg.model.name in ("fusion", "late_fusion", "mlp", "xgboost")


def combine(parts: list[tuple[np.ndarray, int]]) -> np.ndarray:
    """The federation's mean |SHAP| per feature: the sites' means weighted by their row counts."""
    total = sum(n for _, n in parts)
    return sum(np.asarray(m, np.float64) * n for m, n in parts) / total
