"""The study's models: a simple CNN image encoder, an MLP EHR encoder, intermediate fusion.

Intermediate fusion (Khandelwal et al. 2026): each modality is encoded into a
latent vector, the two vectors are concatenated and an MLP head classifies.
Every model takes ``(images, ehr)`` so one training loop serves all; the
unimodal ones ignore the other input.

Normalisation is GroupNorm, not BatchNorm: it has no running statistics to
average across hospitals and it is what differential privacy (Opacus) needs.
Each latent is layer-normalised before the concatenation so neither modality
drowns the other by scale: without it the EHR branch, which can tell the few
training patients apart, dominated the head's early gradient and the image
encoder took several more epochs to start separating tumour from non-tumour
nuclei.
"""

from __future__ import annotations

import torch
from torch import nn

from shared.config import ModelConfig


class CNNEncoder(nn.Module):
    """Four conv blocks, a 4x4 pooled map, a linear projection to ``latent`` dims.

    The map is flattened rather than averaged: the class is that of the
    nucleus at the patch's centre, so where a feature is matters as much as
    what it is (neighbouring nuclei of other classes share the patch).
    """

    def __init__(self, latent: int, width: int = 16) -> None:
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        blocks = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            blocks += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(4, cout), nn.ReLU(),
                       nn.MaxPool2d(2)]
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(4))
        self.project = nn.Linear(chans[-1] * 16, latent)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # images: (B, 3, P, P) in [0, 1] -> (B, C, 4, 4) -> (B, 16 C) -> (B, latent)
        x = self.features(images - 0.5)
        return self.project(x.flatten(1))


class MLPEncoder(nn.Module):
    """Standardises the EHR vector with the federation's statistics, then two dense layers.

    ``mean`` and ``std`` are buffers: they travel with the weights, so every
    site and the server scale features identically. A missing value becomes
    the mean (0 after scaling).
    """

    def __init__(self, n_features: int, hidden: int, latent: int, dropout: float) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        self.net = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, latent))

    def forward(self, ehr: torch.Tensor) -> torch.Tensor:
        # ehr: (B, F) raw values with NaN -> (B, latent)
        x = torch.nan_to_num((ehr - self.mean) / self.std, nan=0.0).clamp(-8, 8)
        return self.net(x)


class FusionNet(nn.Module):
    """Image and/or EHR encoders, concatenated latents, an MLP head."""

    def __init__(self, cfg: ModelConfig, n_features: int, n_classes: int) -> None:
        super().__init__()
        self.kind = cfg.name
        self.image = CNNEncoder(cfg.image_latent) if cfg.name in ("fusion", "cnn") else None
        self.ehr = MLPEncoder(n_features, cfg.hidden, cfg.ehr_latent, cfg.dropout) \
            if cfg.name in ("fusion", "mlp") else None
        width = (cfg.image_latent if self.image else 0) + (cfg.ehr_latent if self.ehr else 0)
        self.image_norm = nn.LayerNorm(cfg.image_latent) if self.image else None
        self.ehr_norm = nn.LayerNorm(cfg.ehr_latent) if self.ehr else None
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(width, cfg.hidden), nn.ReLU(),
                                  nn.Linear(cfg.hidden, n_classes))

    def forward(self, images: torch.Tensor, ehr: torch.Tensor) -> torch.Tensor:
        parts = []
        if self.image is not None:
            parts.append(self.image_norm(self.image(images)))
        if self.ehr is not None:
            parts.append(self.ehr_norm(self.ehr(ehr)))
        return self.head(torch.cat(parts, dim=1))  # (B, n_classes) logits


def build_model(cfg: ModelConfig, n_features: int, n_classes: int) -> FusionNet:
    return FusionNet(cfg, n_features, n_classes)
