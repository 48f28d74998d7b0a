"""ResNet-18 for small patches, built from torchvision's own classes (He et al., CVPR 2016).

Two variants share torchvision's state-dict keys, so ImageNet weights that a
user downloaded, or weights ``fedfuse pretrain`` made, load into either
(``shared.pretrain``):

* ``norm="batch"``: torchvision's ResNet-18 unchanged (BatchNorm, in-place ReLU);
* ``norm="group"``: GroupNorm as ``norm_layer`` and :class:`OutOfPlaceBasicBlock`,
  whose ReLU and residual addition are out of place. This is the variant
  Opacus can train: BatchNorm mixes samples in a batch (no per-sample
  gradients) and in-place operations modify tensors its hooks hold.
  GroupNorm's ``weight``/``bias`` load from BatchNorm's; its running
  statistics cannot (the load report lists them).

For 64 px patches ``small_stem`` drops the stem's max-pool (a module
without weights), so layer4 sees 4x4 instead of 2x2; the 7x7 stride-2
convolution stays, so its ImageNet weights still apply. It is off by
default: measured here (2 cores, batch 32, 64 px) a training step takes
0.19-0.21 s with the max-pool and 0.60-0.61 s without.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class OutOfPlaceBasicBlock(BasicBlock):
    """torchvision's BasicBlock with an out-of-place ReLU and residual addition."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels), channels)


class ResNetEncoder(nn.Module):
    """ResNet-18 trunk whose ``fc`` projects to ``latent`` dims; input in [0, 1], ImageNet-normalised inside."""

    def __init__(self, latent: int, norm: str = "group", small_stem: bool = False) -> None:
        super().__init__()
        if norm == "group":
            self.net = ResNet(OutOfPlaceBasicBlock, [2, 2, 2, 2], norm_layer=_group_norm)
            self.net.relu = nn.ReLU(inplace=False)
        elif norm == "batch":
            self.net = ResNet(BasicBlock, [2, 2, 2, 2])
        else:
            raise ValueError(f"model.resnet_norm must be 'group' or 'batch', got {norm!r}")
        if small_stem:
            self.net.maxpool = nn.Identity()
        self.net.fc = nn.Linear(512, latent)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # images: (B, 3, P, P) in [0, 1] -> (B, 512) pooled -> (B, latent)
        return self.net((images - self.mean) / self.std)

    def backbone_parameters(self):
        """Everything but the projection: what ``model.freeze`` keeps fixed."""
        return (p for name, p in self.net.named_parameters() if not name.startswith("fc."))

    def weights_module(self) -> nn.Module:
        """What a weights file holds: the torchvision network, under torchvision's key names."""
        return self.net
