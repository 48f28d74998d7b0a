"""The study's models: CNN and ResNet-18 image encoders, an MLP EHR encoder, intermediate and late fusion.

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

Layer norm alone did not stop that competition between modalities: on the
brecahad preset, at the paper's budget, one seed in three of fusion never
learned tumour vs non-tumour from the image (AUC 0.55) while the CNN alone
did. ``model.image_aux_weight`` adds an image-only head whose loss trains the
image encoder as the CNN alone would be trained (a unimodal auxiliary loss,
as in gradient blending, Wang et al., CVPR 2020); predictions use the fused
head only.
"""

from __future__ import annotations

import torch
from torch import nn

from shared import pretrain
from shared.config import ModelConfig
from shared.resnet import ResNetEncoder


class CNNEncoder(nn.Module):
    """Four conv blocks, a 4x4 pooled map, a linear projection to ``latent`` dims.

    The map is flattened rather than averaged: the class is that of the
    nucleus at the patch's centre, so where a feature is matters as much as
    what it is (neighbouring nuclei of other classes share the patch).

    ``norm="batch"``: BatchNorm without affine parameters, so all it holds is
    statistics: what FedBN keeps at each site, and what a hospital that joins
    later can re-estimate from its own unlabeled patches.
    """

    def __init__(self, latent: int, width: int = 16, norm: str = "group") -> None:
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        blocks = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layer = nn.GroupNorm(4, cout) if norm == "group" else nn.BatchNorm2d(cout, affine=False)
            blocks += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), layer, nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(4))
        self.project = nn.Linear(chans[-1] * 16, latent)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # images: (B, 3, P, P) in [0, 1] -> (B, C, 4, 4) -> (B, 16 C) -> (B, latent)
        x = self.features(images - 0.5)
        return self.project(x.flatten(1))

    def backbone_parameters(self):
        """The convolutions: what ``model.freeze`` keeps fixed (the projection trains)."""
        return self.features.parameters()

    def weights_module(self) -> nn.Module:
        """What a weights file holds: the whole encoder."""
        return self


def memory_format(model: nn.Module) -> torch.memory_format:
    """The faster layout of image batches for ``model`` on CPU, as bench/compute.py measured it: channels_last
    for the CNN encoder, plain NCHW for ResNet-18, whose GroupNorm channels_last slows."""
    has_cnn = any(isinstance(m, CNNEncoder) for m in model.modules())
    has_resnet = any(isinstance(m, ResNetEncoder) for m in model.modules())
    return torch.channels_last if has_cnn and not has_resnet else torch.contiguous_format


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


def image_encoder(cfg: ModelConfig, name: str) -> nn.Module:
    """The image encoder ``name`` (``cnn`` or ``resnet18``), frozen but for its projection if ``cfg.freeze``."""
    if name == "cnn":
        encoder = CNNEncoder(cfg.image_latent, norm=cfg.cnn_norm)
    else:
        encoder = ResNetEncoder(cfg.image_latent, cfg.resnet_norm, cfg.small_stem)
    if cfg.freeze:
        for p in encoder.backbone_parameters():
            p.requires_grad_(False)
    return encoder


class FusionNet(nn.Module):
    """Image and/or EHR encoders, layer-normalised latents concatenated, an MLP head.

    ``cnn`` and ``resnet18`` use the image alone, ``mlp`` the EHR alone (on the
    patch task), ``fusion`` both: the study's intermediate fusion.
    """

    def __init__(self, cfg: ModelConfig, n_features: int, n_classes: int, kind: str | None = None) -> None:
        super().__init__()
        kind = kind or cfg.name
        self.n_classes = n_classes
        image_name = cfg.image_encoder if kind in ("fusion", "late_fusion") else kind
        self.image = image_encoder(cfg, image_name) if kind in ("fusion", "cnn", "resnet18") else None
        self.ehr = MLPEncoder(n_features, cfg.hidden, cfg.ehr_latent, cfg.dropout) if kind in ("fusion", "mlp") \
            else None
        width = (cfg.image_latent if self.image else 0) + (cfg.ehr_latent if self.ehr else 0)
        self.image_norm = nn.LayerNorm(cfg.image_latent) if self.image else None
        self.ehr_norm = nn.LayerNorm(cfg.ehr_latent) if self.ehr else None
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(width, cfg.hidden), nn.ReLU(),
                                  nn.Linear(cfg.hidden, n_classes))
        self.aux_weight = cfg.image_aux_weight if self.image and self.ehr else 0.0
        self.image_aux = nn.Linear(cfg.image_latent, n_classes) if self.aux_weight > 0 else None

    def _latents(self, images: torch.Tensor, ehr: torch.Tensor) -> list[torch.Tensor]:
        parts = []
        if self.image is not None:
            parts.append(self.image_norm(self.image(images)))
        if self.ehr is not None:
            parts.append(self.ehr_norm(self.ehr(ehr)))
        return parts

    def forward(self, images: torch.Tensor, ehr: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat(self._latents(images, ehr), dim=1))  # (B, n_classes) logits

    def loss(self, images: torch.Tensor, ehr: torch.Tensor, labels: torch.Tensor, loss_fn) -> torch.Tensor:
        parts = self._latents(images, ehr)
        loss = loss_fn(self.head(torch.cat(parts, dim=1)), labels)
        if self.image_aux is not None:  # parts[0] is the image latent
            loss = loss + self.aux_weight * loss_fn(self.image_aux(parts[0]), labels)
        return loss


class LateFusion(nn.Module):
    """Late fusion, the comparison for intermediate fusion: the mean of two models' class probabilities.

    An image model and an EHR MLP are trained on the same patch task, each on
    its own loss (the summed loss has independent gradients per branch, so
    this is training them apart); only their predictions are averaged.
    """

    def __init__(self, cfg: ModelConfig, n_features: int, n_classes: int) -> None:
        super().__init__()
        self.n_classes = n_classes
        self.image_model = FusionNet(cfg, n_features, n_classes, kind=cfg.image_encoder)
        self.ehr_model = FusionNet(cfg, n_features, n_classes, kind="mlp")

    def forward(self, images: torch.Tensor, ehr: torch.Tensor) -> torch.Tensor:
        probs = (torch.softmax(self.image_model(images, ehr), 1) + torch.softmax(self.ehr_model(images, ehr), 1)) / 2
        return torch.log(probs.clamp_min(1e-12))  # log-probabilities: softmax of them gives the mean back

    def loss(self, images: torch.Tensor, ehr: torch.Tensor, labels: torch.Tensor, loss_fn) -> torch.Tensor:
        return loss_fn(self.image_model(images, ehr), labels) + loss_fn(self.ehr_model(images, ehr), labels)


def build_model(cfg: ModelConfig, n_features: int, n_classes: int) -> nn.Module:
    """The configured model (``model.name``) for ``n_features`` EHR inputs and ``n_classes`` classes."""
    if cfg.name == "late_fusion":
        return LateFusion(cfg, n_features, n_classes)
    return FusionNet(cfg, n_features, n_classes)


def ehr_encoders(model: nn.Module) -> list[MLPEncoder]:
    """The model's EHR encoders, whose scaling the server sets from the sites' statistics."""
    return [m for m in model.modules() if isinstance(m, MLPEncoder)]


def image_encoders(model: nn.Module) -> list[nn.Module]:
    """The model's image encoders (CNN or ResNet-18): what pretrained weights load into."""
    return [m for m in model.modules() if isinstance(m, (CNNEncoder, ResNetEncoder))]


def load_pretrained_weights(model: nn.Module, path: str) -> dict:
    """Load a local weights file into every image encoder of ``model``; the report of the first
    (``shared.pretrain.load_into``: what loaded, what did not and why, the file's hash and provenance)."""
    encoders = image_encoders(model)
    if not encoders:
        raise ValueError("model.pretrained is set, but the model has no image encoder (model.name cnn, resnet18, "
                         "fusion or late_fusion)")
    reports = [pretrain.load_into(e.weights_module(), path) for e in encoders]
    return reports[0]
