"""Contrastive pretraining of an image encoder on unlabelled patches: SimCLR (Chen et al., ICML 2020).

Two random views of each patch, an MLP projection head, and the NT-Xent loss
that pulls a patch's two views together and pushes the batch's other patches
away. The views vary what H&E diagnosis does not depend on: rotations and
mirrors, crops, stain (HED jitter, Tellez et al. 2018), brightness and
contrast. Labels are never read, so a federation could run it on its own
sites' patches; ``fedfuse pretrain --method simclr`` runs it on one folder.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from shared.config import TrainConfig
from shared.train import hed_jitter, image_tensor, lr_factor


def views(images: np.ndarray, gen: torch.Generator) -> torch.Tensor:
    """One random view of each uint8 patch ``(B, P, P, 3)`` -> float ``(B, 3, P, P)`` in [0, 1]."""
    x = image_tensor(hed_jitter(images, 0.1, gen))  # stain: the strongest nuisance between hospitals
    b, _, p, _ = x.shape
    out = torch.empty_like(x)
    for i in range(b):  # a crop of 50-100 % of the side, anywhere, resized back
        side = int(p * (0.5 + 0.5 * float(torch.rand(1, generator=gen))))
        top, left = (int(torch.randint(0, p - side + 1, (1,), generator=gen)) for _ in range(2))
        crop = x[i : i + 1, :, top : top + side, left : left + side]
        out[i] = nn.functional.interpolate(crop, size=(p, p), mode="bilinear", align_corners=False)[0]
    k = int(torch.randint(0, 4, (1,), generator=gen))
    out = torch.rot90(out, k, dims=(2, 3))
    flip = torch.rand(b, generator=gen) < 0.5
    out[flip] = out[flip].flip(3)
    scale = 1 + 0.2 * (2 * torch.rand(b, 1, 1, 1, generator=gen) - 1)  # brightness and contrast
    return ((out - 0.5) * scale + 0.5 + 0.05 * torch.randn(b, 1, 1, 1, generator=gen)).clamp(0, 1)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss: for each of the 2B views, cross-entropy of finding its partner among the other 2B - 1."""
    z = nn.functional.normalize(torch.cat([z1, z2]), dim=1)  # (2B, D)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))  # a view is not its own partner
    b = len(z1)
    partner = torch.cat([torch.arange(b, 2 * b), torch.arange(b)])
    return nn.functional.cross_entropy(sim, partner)


def simclr(encoder: nn.Module, latent: int, images: np.ndarray, train: TrainConfig, steps: int, seed: int,
           temperature: float = 0.2, echo=print) -> list[float]:
    """Train ``encoder`` (patches -> ``latent`` dims) by SimCLR on unlabelled uint8 ``images``; the loss per step.

    ``train`` gives the batch size (patches a step, two views each), learning rate and its schedule
    (``shared.train.lr_factor``). The projection head (latent -> 128 -> 64) serves the loss only and is
    thrown away after, as in SimCLR.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    head = nn.Sequential(nn.Linear(latent, 128), nn.ReLU(), nn.Linear(128, 64))
    opt = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=train.lr, weight_decay=train.weight_decay)
    encoder.train()
    losses, every = [], max(1, steps // 10)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = train.lr * lr_factor(train, step / steps)
        batch = images[rng.choice(len(images), train.batch_size, replace=len(images) < train.batch_size)]
        loss = nt_xent(head(encoder(views(batch, gen))), head(encoder(views(batch, gen))), temperature)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % every == 0:
            echo(f"simclr step {step + 1}/{steps}: loss {np.mean(losses[-every:]):.3f}")
    return losses
