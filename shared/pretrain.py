"""Image-encoder weights made outside the federation: their file, their provenance, and contrastive pretraining.

A weights file is a state dict with torchvision's key names for ResNet-18
(``conv1.weight``, ``layer1.0.bn1.weight``, ...; ``fc`` is the projection to
``model.image_latent``) and the CNN encoder's own names for the CNN. fedfuse
writes it as safetensors, which holds arrays only; a ``.pth`` / ``.pt`` file
(torchvision's ImageNet download) is read with ``torch.load(weights_only=True)``,
which refuses anything but tensors and plain containers. Beside a file
``fedfuse pretrain`` writes its provenance, ``<stem>.json``: what data, seed and
steps made it, and the weights' sha256, which every run that loads the file
checks and records (``pretrained`` in metrics.json).

How the weights are trained is ``simulations/pretrain.py`` (supervised) and
``shared/contrastive.py`` (SimCLR).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

PROVENANCE_SUFFIX = ".json"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def provenance_path(weights: Path) -> Path:
    return Path(weights).with_suffix(PROVENANCE_SUFFIX)


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (safetensors, or a torch file of tensors only); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.pretrained: {path} not found (weights are never downloaded at run time)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch and safetensors raise several types for a file that is not a state dict
        raise ValueError(f"model.pretrained: {path} is not a state dict of tensors: {err}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"model.pretrained: {path} holds no {{name: tensor}} state dict")
    return state


def read_provenance(path: Path) -> dict | None:
    """The provenance beside ``path``, checked against the file's hash; None when there is none."""
    prov = provenance_path(path)
    if not prov.is_file():
        return None
    try:
        record = json.loads(prov.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"model.pretrained: {prov} is not JSON: {err}") from None
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
        raise ValueError(f"model.pretrained: {prov} has no sha256 of the weights it describes")
    actual = sha256_of(path)
    if record["sha256"] != actual:
        raise ValueError(f"model.pretrained: {path} has sha256 {actual}, but its provenance {prov} describes "
                         f"{record['sha256']}: the weights were changed or the files do not belong together")
    return record


def load_into(module: nn.Module, path: Path) -> dict:
    """Load what fits of ``path`` into ``module``; report what did and did not.

    Returns ``{"path", "sha256", "provenance", "loaded", "not_loaded", "missing"}``: ``not_loaded`` maps the
    file's keys this module lacks, or whose shape differs (ImageNet's 1000-class ``fc``; BatchNorm statistics
    under GroupNorm), to the reason; ``missing`` lists the module's own keys that did not load (absent from the
    file, or of another shape), which keep their random initialisation. Neither is fatal: what loaded is said, not assumed.
    """
    path = Path(path)
    state, provenance = read_state(path), read_provenance(path)
    own = module.state_dict()
    usable, not_loaded = {}, {}
    for key, value in state.items():
        if key not in own:
            not_loaded[key] = "no such parameter in this model"
        elif own[key].shape != value.shape:
            not_loaded[key] = f"shape {tuple(value.shape)} != {tuple(own[key].shape)}"
        else:
            usable[key] = value
    module.load_state_dict(usable, strict=False)
    return {"path": str(path), "sha256": provenance["sha256"] if provenance else sha256_of(path),
            "provenance": provenance, "loaded": sorted(usable), "not_loaded": not_loaded,
            "missing": sorted(set(own) - set(usable))}


def write_weights(module: nn.Module, path: Path, provenance: dict) -> dict:
    """``module``'s state dict as safetensors at ``path`` and its provenance (with the file's sha256) beside it."""
    from safetensors.torch import save_file

    from shared.cache import write_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(path)
    record = {**provenance, "sha256": sha256_of(path), "keys": len(state)}
    write_atomic(provenance_path(path), "w", lambda f: json.dump(record, f, indent=2))
    return record
