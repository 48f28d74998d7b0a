"""Plain training and evaluation loops, used unchanged by sites, the server and tests."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from torch import nn

from shared.config import TrainConfig
from shared.data import Samples
from shared.models import image_encoders, memory_format


def class_weights(labels: np.ndarray, n_classes: int, mode: str) -> torch.Tensor:
    """Class weights for the loss, so the rare mitosis class counts.

    ``balanced`` is inverse frequency; ``sqrt`` its square root, which still
    lifts rare classes but does not let a 1-in-15 class dominate the early
    gradient (with full inverse weights the CNN learned mitoses first and sat
    on a plateau for tumour vs non-tumour nuclei for several epochs).

    A weighted loss rather than a resampling sampler: it behaves the same under
    differential privacy, where Opacus replaces the data loader's sampler.
    """
    if mode == "none":
        return torch.ones(n_classes)
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    w = len(labels) / (n_classes * np.maximum(counts, 1.0))
    if mode == "sqrt":
        w = np.sqrt(w)
    return torch.tensor(w, dtype=torch.float32)


def image_tensor(images: np.ndarray) -> torch.Tensor:
    # uint8 (B, P, P, 3) -> float (B, 3, P, P) in [0, 1]
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)


def hed_jitter(images: np.ndarray, strength: float, gen: torch.Generator) -> np.ndarray:
    """Stain augmentation in HED space (Tellez et al., 2018): each patch's haematoxylin, eosin and DAB
    densities scaled by ``U(1 - s, 1 + s)`` and shifted by ``U(-s, s)`` times the patch's own mean density.

    A shift relative to the patch keeps ``s`` meaningful whatever the unit of the densities; uint8 in, uint8 out.
    """
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(images, channel_axis=-1)  # (B, P, P, 3) stain densities
    shape = (len(images), 1, 1, 3)
    scale = 1.0 + strength * (2 * torch.rand(shape, generator=gen, dtype=torch.float64).numpy() - 1)
    shift = strength * (2 * torch.rand(shape, generator=gen, dtype=torch.float64).numpy() - 1)
    hed = hed * scale + shift * hed.mean(axis=(1, 2), keepdims=True)
    return (np.clip(hed2rgb(hed, channel_axis=-1), 0, 1) * 255).round().astype(np.uint8)


def make_batch(samples: Samples, idx: np.ndarray, augment: TrainConfig | None, gen: torch.Generator | None):
    """A batch as tensors; ``augment``: the training settings whose augmentations apply (None: evaluation)."""
    raw = samples.images[idx]
    if augment is not None and augment.hed_jitter > 0 and raw.size:
        raw = hed_jitter(raw, augment.hed_jitter, gen)
    images = image_tensor(raw)
    if augment is not None and augment.flips:  # dihedral symmetries: a patch has no up or left
        k = int(torch.randint(0, 4, (1,), generator=gen))
        images = torch.rot90(images, k, dims=(2, 3))
        if torch.rand(1, generator=gen) < 0.5:
            images = images.flip(3)
    return images, torch.from_numpy(samples.ehr[idx]), torch.from_numpy(samples.labels[idx])


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """The trainable parameters for the optimiser: the image encoders' at ``cfg.encoder_lr`` (fine-tuning
    pretrained weights slower than the new heads), the rest at ``cfg.lr``."""
    encoder = {id(p) for e in image_encoders(model) for p in e.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    if cfg.encoder_lr is None:
        return [{"params": trainable, "lr": cfg.lr}]
    groups = [{"params": [p for p in trainable if id(p) in encoder], "lr": cfg.encoder_lr},
              {"params": [p for p in trainable if id(p) not in encoder], "lr": cfg.lr}]
    return [g for g in groups if g["params"]]


def lr_factor(cfg: TrainConfig, position: float) -> float:
    """The learning rate's multiplier at ``position`` in [0, 1) of the run: a linear warm-up over the first
    ``cfg.warmup``, then constant or a cosine decay to 0 (Loshchilov and Hutter, ICLR 2017)."""
    if position < cfg.warmup:
        return (position + 1e-3) / cfg.warmup
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (position - cfg.warmup) / (1 - cfg.warmup)))
    return 1.0


def train_epochs(
    model: nn.Module, samples: Samples, cfg: TrainConfig, n_classes: int, seed: int, proximal_mu: float = 0.0,
    progress: tuple[int, int] = (0, 1),
) -> float:
    """Adam on ``samples`` for ``cfg.steps`` steps (or ``cfg.local_epochs`` passes); returns the mean loss.

    ``proximal_mu > 0`` adds FedProx's term (Li et al., MLSys 2020),
    ``mu / 2 * ||w - w_start||^2``, keeping a site near the global model it
    received. ``progress`` is (rounds done, rounds in all): where this update sits in the run's learning-rate
    schedule (:func:`lr_factor`), each round's steps one equal share of it.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    rng = np.random.default_rng(seed)
    loss_fn = nn.CrossEntropyLoss(weight=class_weights(samples.labels, n_classes, cfg.class_weights))
    opt = torch.optim.Adam(param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    base_lrs = [group["lr"] for group in opt.param_groups]
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    model.train()
    total, count, steps = 0.0, 0, 0
    budget = cfg.steps if cfg.steps > 0 else cfg.local_epochs * -(-len(samples) // cfg.batch_size)
    with fast_layout(model) as layout:
        while steps < budget and len(samples):
            order = rng.permutation(len(samples))
            for start in range(0, len(order), cfg.batch_size):
                if steps == budget:
                    break
                for group, base_lr in zip(opt.param_groups, base_lrs):
                    group["lr"] = base_lr * lr_factor(cfg, (progress[0] + steps / budget) / progress[1])
                steps += 1
                idx = order[start : start + cfg.batch_size]
                images, ehr, labels = make_batch(samples, idx, cfg, gen)
                loss = model.loss(images.contiguous(memory_format=layout), ehr, labels, loss_fn)
                total += loss.item() * len(idx)
                count += len(idx)
                if anchor is not None:
                    loss = loss + proximal_mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
                opt.zero_grad()
                loss.backward()
                opt.step()
    return total / max(count, 1)


@contextlib.contextmanager
def fast_layout(model: nn.Module):
    """``model`` in its faster memory layout (``shared.models.memory_format``) inside the block, which gets the
    layout to give its image batches; back in the usual layout after it, whatever happens."""
    layout = memory_format(model)
    model.to(memory_format=layout)
    try:
        yield layout
    finally:
        model.to(memory_format=torch.contiguous_format)


@torch.no_grad()
def predict(model: nn.Module, samples: Samples, batch_size: int = 256) -> tuple[np.ndarray, float]:
    """Class probabilities ``(n, K)`` and the mean (unweighted) cross-entropy."""
    model.eval()
    probs, loss = [], 0.0
    with fast_layout(model) as layout:
        for start in range(0, len(samples), batch_size):
            idx = np.arange(start, min(start + batch_size, len(samples)))
            images, ehr, labels = make_batch(samples, idx, None, None)
            logits = model(images.contiguous(memory_format=layout), ehr)
            loss += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
            probs.append(torch.softmax(logits, 1).numpy())
    return (np.concatenate(probs) if probs else np.zeros((0, model.n_classes))), loss / max(len(samples), 1)
