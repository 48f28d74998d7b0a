"""ResNet-18 for small patches, built from torchvision's own classes (He et al., CVPR 2016).

Two variants share torchvision's state-dict keys, so ImageNet weights that a
user downloaded load into either:

* ``norm="batch"``: torchvision's ResNet-18 unchanged (BatchNorm, in-place ReLU);
* ``norm="group"``: GroupNorm as ``norm_layer`` and :class:`OutOfPlaceBasicBlock`,
  whose ReLU and residual addition are out of place. This is the variant
  Opacus can train: BatchNorm mixes samples in a batch (no per-sample
  gradients) and in-place operations modify tensors its hooks hold.
  GroupNorm's ``weight``/``bias`` load from BatchNorm's; its running
  statistics cannot (:func:`load_pretrained` lists them).

For 64 px patches ``small_stem`` drops the stem's max-pool (a module
without weights), so layer4 sees 4x4 instead of 2x2; the 7x7 stride-2
convolution stays, so its ImageNet weights still apply. It is off by
default: measured here (2 cores, batch 32, 64 px) a training step takes
0.19-0.21 s with the max-pool and 0.60-0.61 s without.
"""

from __future__ import annotations

from pathlib import Path

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


def load_pretrained(encoder: ResNetEncoder, path: str | Path) -> dict:
    """Load a torchvision ResNet-18 state dict from a local file; report what did and did not load.

    Returns ``{"path", "loaded": [...], "not_loaded": {key: reason}}``. Keys
    whose shape differs (``fc``, ImageNet's 1000 classes) or that this variant
    lacks (BatchNorm running statistics under GroupNorm) are reported, not fatal.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.pretrained: {path} not found (weights are never downloaded at run time)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a file that is not a state dict
        raise ValueError(f"model.pretrained: {path} is not a torch state dict: {err}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    own = encoder.net.state_dict()
    usable, not_loaded = {}, {}
    for key, value in state.items():
        if key not in own:
            not_loaded[key] = "no such parameter in this variant"
        elif own[key].shape != value.shape:
            not_loaded[key] = f"shape {tuple(value.shape)} != {tuple(own[key].shape)}"
        else:
            usable[key] = value
    encoder.net.load_state_dict(usable, strict=False)
    return {"path": str(path), "loaded": sorted(usable), "not_loaded": not_loaded}
