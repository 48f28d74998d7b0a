"""One typed configuration for every part of fedfuse.

YAML files in ``configs/`` load into the frozen dataclasses below; each
component owns its section. A field says everything about itself in one
place: its type, its choices (a ``Literal``) and its range (:func:`bounded`,
:func:`between`, :func:`path_field`); a test holds every number to a bound. Rules
that tie fields together are validators, each after the section it concerns.
Unknown keys and wrong types fail with the key's dotted path and what was
expected. Overrides (``fedfuse --set a.b=v`` and Flower's ``--run-config
"a.b=v"``) go through :func:`apply_overrides`, so both change the same
settings in the same way.

Why dataclasses with field metadata rather than pydantic 2: the sections are
frozen values that 80 call sites copy with ``dataclasses.replace`` and that
``to_dict`` writes back; pydantic's own messages ("Input should be ...") and
its coercions (``"3"`` to 3 in YAML, 1 to True) would each need undoing to
keep fedfuse's "key: expected X, got Y"; and the loader is 60 lines here.

Flower's ``run_config`` holds only flat scalars: :func:`flatten` writes a
config as dotted keys (lists and mappings as YAML text) and
:func:`from_run_config` rebuilds it, in this one place.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import sys
import types
import typing
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

IMAGE_CLASSES = ("mitosis", "tumor", "non_tumor")
BrecahadKey = Literal["mitosis", "non_mitosis", "apoptosis", "tumor", "non_tumor", "lumen", "non_lumen"]
BRECAHAD_KEYS = typing.get_args(BrecahadKey)
MAX_NAME = 100  # characters of ``name``: a run folder is <name>-<timestamp>, within every file system's 255 bytes
NAME_BYTES = 255  # the longest file or folder name common file systems take
RESUME_MAY_CHANGE = ("federation.rounds", "faults.")  # a resume may extend a run, and add or drop injected faults
WEEK_S = 7 * 24 * 3600.0


class ConfigError(ValueError):
    """A config value or key that cannot be used; the message names its dotted path."""


def bounded(default: Any, ok: Callable[[Any], bool], expected: str, **kwargs: Any) -> Any:
    """A field with its bound: ``ok(value)`` must hold, ``expected`` says what in an error.

    A bound written as ``0 < x < math.inf`` also refuses NaN; upper bounds keep a value within what a machine can
    run (threads, layer widths, seconds) or what the quantity means (a probability).
    """
    return field(default=default, metadata={"ok": ok, "expected": expected}, **kwargs)


def between(default: int, lo: int, hi: int) -> Any:
    """An integer field in ``[lo, hi]``."""
    return bounded(default, lambda v: lo <= v <= hi, f"between {lo} and {hi}")


def path_field(default: str | None, null: bool = True) -> Any:
    """A field naming a file or folder: an empty one would mean the working directory, a NUL cannot be opened."""
    return field(default=default, metadata={
        "ok": lambda v: (v is None and null) or (isinstance(v, str) and v != "" and "\0" not in v),
        "expected": "a path (not empty, no NUL character)" + (" or null" if null else ""), "path": True})


def positive(default: float | None, hi: float, null: bool = False) -> Any:
    """A float in ``(0, hi]``, or null when ``null``."""
    return bounded(default, lambda v: (null and v is None) or (v is not None and 0 < v <= hi),
                   ("null or positive" if null else "positive") + f", at most {hi:g}")


def distinct(items: tuple[str, ...]) -> bool:
    return len(set(items)) == len(items)


@dataclass(frozen=True)
class DataConfig:
    """Where the hospitals' data lives and how samples are made from it."""

    root: str = path_field("data/quickstart", null=False)  # holds site-<k>/ folders (simulation); generated if absent
    preset: Literal["quick", "brecahad"] = "quick"  # synthetic preset used when root is absent
    sites: int = between(3, 1, 1000)  # simulated hospitals (SuperNodes)
    # natural (one folder a site) | iid | dirichlet | quantity (cases re-dealt)
    partition: Literal["natural", "iid", "dirichlet", "quantity"] = "natural"
    alpha: float = bounded(0.5, lambda v: 0 < v <= 1000,  # dirichlet / quantity: concentration; smaller: more skewed
                           "positive, at most 1000 (beyond it the split is as good as iid)")
    # natural partition: this site trains nowhere (the unseen hospital); below data.sites: _check_data
    leave_out: int | None = bounded(None, lambda v: v is None or v >= 0, "a site index (at least 0), or null")
    patch_size: int = bounded(64, lambda v: 8 <= v <= 1024, "between 8 and 1024 (pixels; a patch is cut from a tile)")
    border: Literal["reflect", "drop"] = "reflect"  # patches at the image border: reflect-pad, or drop (and count)
    classes: tuple[BrecahadKey, ...] = bounded(  # BreCaHAD keys kept as patch classes, in label order
        IMAGE_CLASSES, lambda v: len(v) >= 2 and distinct(v), "at least 2 classes, each named once")
    pairing: Literal["linked", "by_label"] = "linked"  # linked: linkage.csv joins case and subject; by_label: by class
    label_map: dict[str, int] = bounded(
        dataclasses.MISSING, lambda v: all(k in BRECAHAD_KEYS and x in (0, 1) for k, x in v.items()),
        "BreCaHAD keys mapped to EHR labels 0 or 1", default_factory=lambda: {"mitosis": 1, "tumor": 1, "non_tumor": 0})
    # share of each site's cases (data.split: patch: patches) held out for its test split
    test_fraction: float = bounded(0.3, lambda v: 0 < v < 1, "between 0 and 1")
    split: Literal["case", "patch"] = "case"  # case: whole patients on one side | patch: single patches (the study's)
    # none | reinhard | macenko: tiles mapped onto a reference stain before patches are cut
    stain_norm: Literal["none", "reinhard", "macenko"] = "none"
    stain_reference: str = path_field("shipped", null=False)  # shipped | federated | an RGB image (relative: in data.root)
    cache_dir: str | None = path_field(None)  # default: <data folder>/.fedfuse-cache
    positive: tuple[Literal["invasive", "in_situ", "history", "family_history", "er_status"], ...] = bounded(
        ("invasive", "in_situ"), lambda v: len(v) >= 1 and distinct(v),  # ICD groups that label an EHR row positive
        "at least 1 ICD group, each named once")


def _check_data(cfg: Config) -> None:
    d = cfg.data
    if d.pairing == "by_label" and set(d.classes) - set(d.label_map):
        raise ConfigError(f"data.label_map: no EHR label for {sorted(set(d.classes) - set(d.label_map))}")
    if d.stain_reference == "federated" and d.stain_norm != "none":
        if d.partition != "natural":
            raise ConfigError("data.stain_reference: federated: each site averages the statistics of its own folder "
                              f"of tiles; with data.partition {d.partition!r} a site has no folder of its own "
                              "(use natural, or stain_reference: shipped)")
        if cfg.privacy.secure_aggregation:
            raise ConfigError("data.stain_reference: federated is not available with privacy.secure_aggregation "
                              "(Flower's SecAgg+ workflow carries no reference to the sites); use shipped")
    if d.leave_out is not None and not 0 <= d.leave_out < d.sites:
        raise ConfigError(f"data.leave_out: expected a site index in 0..{d.sites - 1}, got {d.leave_out}")
    if d.leave_out is not None and d.partition != "natural":
        raise ConfigError("data.leave_out: only with data.partition natural (a site is a folder)")


@dataclass(frozen=True)
class ModelConfig:
    """Which model, and its sizes."""

    # patch task: fusion | late_fusion | cnn | resnet18; EHR task: mlp | xgboost
    name: Literal["fusion", "late_fusion", "cnn", "resnet18", "mlp", "xgboost"] = "fusion"
    image_encoder: Literal["cnn", "resnet18"] = "cnn"  # fusion / late_fusion's image branch
    # resnet18: group (GroupNorm, out-of-place blocks; Opacus-ready) | batch
    resnet_norm: Literal["group", "batch"] = "group"
    # cnn: group (GroupNorm; Opacus-ready) | batch (BatchNorm statistics, what FedBN keeps local)
    cnn_norm: Literal["group", "batch"] = "group"
    small_stem: bool = False  # resnet18: drop the stem's max-pool (finer maps on 64 px patches, 3x slower)
    pretrained: str | None = path_field(None)  # image encoder: local weights (`fedfuse pretrain`, torchvision's ImageNet)
    freeze: bool = False  # image encoder: train only its projection (and the heads)
    image_latent: int = between(64, 1, 4096)
    ehr_latent: int = between(32, 1, 4096)
    hidden: int = between(64, 1, 4096)
    dropout: float = bounded(0.2, lambda v: 0 <= v < 1, "in [0, 1)")
    # fusion: weight of an image-only auxiliary loss (0: none); see shared/models.py
    image_aux_weight: float = bounded(1.0, lambda v: 0 <= v <= 100, "in [0, 100]")
    xgb_max_depth: int = between(4, 1, 32)  # xgboost
    xgb_eta: float = bounded(0.3, lambda v: 0 < v <= 1, "in (0, 1]")  # xgboost: learning rate
    xgb_local_rounds: int = between(1, 1, 1000)  # xgboost: trees a site adds per server round


def _check_model(cfg: Config) -> None:
    m = cfg.model
    if (m.pretrained or m.freeze) and image_encoder_of(m) is None:
        raise ConfigError("model.pretrained / model.freeze: only for a model with an image encoder (model.name cnn, "
                          "resnet18, fusion or late_fusion)")
    if cfg.federation.strategy == "xgb_bagging" and m.xgb_local_rounds != 1:
        raise ConfigError("model.xgb_local_rounds: xgb_bagging appends one tree per site a round "
                          f"(Flower keeps num_parallel_tree trees of each reply); got {m.xgb_local_rounds}")


@dataclass(frozen=True)
class TrainConfig:
    """Local training at a site, each round."""

    local_epochs: int = between(2, 0, 1000)
    steps: int = between(0, 0, 1_000_000)  # optimiser steps per local update (a fixed budget); 0: local_epochs passes
    batch_size: int = between(32, 1, 65536)
    lr: float = positive(0.001, 10)
    # the image encoder's learning rate (fine-tuning pretrained weights); null: lr
    encoder_lr: float | None = positive(None, 10, null=True)
    # learning rate over the whole run (every round's steps): constant | cosine (decay)
    schedule: Literal["constant", "cosine"] = "constant"
    # share of the run's steps over which the learning rate rises linearly from 0
    warmup: float = bounded(0.0, lambda v: 0 <= v < 1, "at least 0, below 1")
    weight_decay: float = bounded(0.0001, lambda v: 0 <= v <= 1, "in [0, 1]")
    # sqrt (of inverse frequency) | balanced (inverse frequency) | none
    class_weights: Literal["sqrt", "balanced", "none"] = "sqrt"
    threads: int = between(1, 1, 1024)  # torch threads per site process
    flips: bool = True  # training patches: random 90-degree rotations and mirror flips (never at evaluation)
    # training patches: HED stain jitter strength (0.05 light, 0.2 strong); 0: off
    hed_jitter: float = bounded(0.0, lambda v: 0 <= v < 1, "in [0, 1)")


def _check_train(cfg: Config) -> None:
    if cfg.train.local_epochs < 1 and cfg.train.steps < 1:
        raise ConfigError(f"train.local_epochs: expected at least 1 (or train.steps at least 1), got "
                          f"{cfg.train.local_epochs}")


def seconds(default: float) -> Any:
    """A timeout: positive, at most a week."""
    return bounded(default, lambda v: 0 < v <= WEEK_S, f"positive, at most {WEEK_S:g} (a week, in seconds)")


@dataclass(frozen=True)
class FederationConfig:
    """The server's round loop."""

    rounds: int = between(6, 1, 10000)
    # fedavg | fedprox | fedadam | fedyogi | fedmedian | fedtrimmedavg | krum; for xgboost: xgb_bagging | xgb_cyclic
    strategy: Literal["fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum",
                      "xgb_bagging", "xgb_cyclic"] = "fedavg"
    fraction_train: float = bounded(1.0, lambda v: 0 < v <= 1, "in (0, 1]")
    fraction_evaluate: float = bounded(1.0, lambda v: 0 <= v <= 1, "in [0, 1]")
    min_sites: int = bounded(2, lambda v: v >= 1, "at least 1")  # and at most data.sites: _check_federation
    # fedprox: weight of (mu/2) ||w - w_global||^2 in each site's loss
    proximal_mu: float = bounded(0.01, lambda v: 0 <= v <= 100, "in [0, 100]")
    server_lr: float = positive(0.01, 10)  # fedadam, fedyogi: the server optimiser's step size (eta)
    beta_1: float = bounded(0.9, lambda v: 0 <= v < 1, "in [0, 1)")  # fedadam, fedyogi: first-moment decay
    beta_2: float = bounded(0.99, lambda v: 0 <= v < 1, "in [0, 1)")  # fedadam, fedyogi: second-moment decay
    tau: float = bounded(0.001, lambda v: 0 < v <= 1, "in (0, 1]")  # fedadam, fedyogi: adaptivity (epsilon)
    # fedtrimmedavg: fraction cut from each end
    trim_beta: float = bounded(0.2, lambda v: 0 <= v < 0.5, "in [0, 0.5)")
    # krum: number of sites assumed malicious (below data.sites: _check_federation)
    krum_malicious: int = bounded(0, lambda v: v >= 0, "at least 0")
    # seconds the server waits for a round's replies; a later one counts as failed
    round_timeout: float = seconds(600.0)
    # seconds the server waits at the start for min_sites sites to connect
    connect_timeout: float = seconds(120.0)
    # seconds for the sites' first answer (each loads, and may first extract, its data)
    setup_timeout: float = seconds(600.0)
    # reject an update whose distance from the global model exceeds this multiple of the round's median (null: off)
    max_update_ratio: float | None = bounded(None, lambda v: v is None or 1 < v < math.inf,
                                             "above 1 and finite, or null")
    # reject an update farther from the global model than this multiple of the norm of its trained weights (null:
    # off): a bound that needs no other site, so it holds with two. Measured on honest quickstart runs (2 sites,
    # 2 rounds; round 1 is the largest): 0.16 at the defaults (fusion, FedAvg; also FedAdam, FedProx, local and
    # central DP, float16 uploads, 3 sites), 0.02 mlp, 0.15 late_fusion, 0.21 BatchNorm cnn, 0.27 with 10 local
    # epochs, 0.50 resnet18; train.lr 0.01: 1.1 (fusion), 1.8 (BatchNorm cnn); train.lr 0.1: 1.8 (mlp), 4.0 (mlp,
    # 10 epochs), 8.5 (fusion). Only a BatchNorm cnn at lr 0.1, diverging (its BatchNorm variances 6500-fold in one
    # round), goes beyond (12.8). Raise it for larger learning rates.
    max_relative_update: float | None = bounded(10.0, lambda v: v is None or 0 < v < math.inf,
                                                "positive and finite, or null")
    # all | trainable: a site sends only trained weights (buffers stay the global model's)
    upload: Literal["all", "trainable"] = "all"
    # float32 | float16: a site's upload at half the bytes (the server upcasts)
    upload_dtype: Literal["float32", "float16"] = "float32"
    fedbn: bool = False  # FedBN: BatchNorm layers stay at each site, never sent nor averaged (needs a batch norm)


def _check_federation(cfg: Config) -> None:
    f, sites = cfg.federation, cfg.data.sites
    if (cfg.model.name == "xgboost") != (f.strategy in TREE_STRATEGIES):
        raise ConfigError(f"federation.strategy: {f.strategy!r} does not fit model.name "
                          f"{cfg.model.name!r}; xgboost federates with {' or '.join(TREE_STRATEGIES)}, "
                          "the neural models with the others")
    if f.min_sites > sites:
        raise ConfigError(f"federation.min_sites: expected between 1 and data.sites ({sites}), got {f.min_sites}")
    if f.krum_malicious >= sites:
        raise ConfigError(f"federation.krum_malicious: expected between 0 and data.sites - 1 ({sites - 1}), got "
                          f"{f.krum_malicious}")
    if f.fedbn and not has_batch_norm(cfg.model):
        raise ConfigError(f"federation.fedbn keeps BatchNorm layers local, and model {cfg.model.name!r} has none: set "
                          "model.cnn_norm: batch (or model.resnet_norm: batch for resnet18). GroupNorm, which "
                          "local DP (privacy.mode: local) needs, keeps no statistics to keep local")
    if f.fedbn and cfg.privacy.secure_aggregation:
        raise ConfigError("federation.fedbn: not with privacy.secure_aggregation, whose SecAgg+ rounds send the whole "
                          "model (and BatchNorm statistics are not weights within its clipping range)")


@dataclass(frozen=True)
class ServerConfig:
    """What the server holds: a central test set, if any; and how many resamples its final intervals take."""

    eval_data: str | None = path_field("holdout")  # a hospital-layout folder; relative: inside data.root; null: none
    bootstrap: int = between(200, 1, 100_000)  # resamples of patients for the final model's 95 % intervals


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy and secure aggregation; the README's Privacy section says what each number protects."""

    # none | local (DP-SGD at every site, Opacus; shared/privacy.py) | central (Flower's DP wrapper on FedAvg)
    mode: Literal["none", "local", "central"] = "none"
    # target epsilon of the whole run (local: at each site); the noise is derived from it
    epsilon: float | None = bounded(8.0, lambda v: v is None or 0 < v <= 1000 or v == math.inf,
                                    "positive, at most 1000 (.inf: no noise)")
    delta: float = bounded(1e-5, lambda v: 0 < v < 1, "in (0, 1)")  # the delta of every reported epsilon
    # a fixed noise multiplier instead (then epsilon is only reported)
    noise_multiplier: float | None = bounded(None, lambda v: v is None or 0 <= v <= 1000, "in [0, 1000], or null")
    # central: where each site's update is clipped: server | client (Flower's mod)
    clipping: Literal["server", "client"] = "server"
    # central: L2 bound of one site's update (all its weights)
    clip_norm: float = bounded(1.0, lambda v: 0 < v < math.inf, "positive and finite")
    # local: clipping bound of one unit's gradient
    max_grad_norm: float = bounded(1.0, lambda v: 0 < v < math.inf, "positive and finite")
    # local: what one clipped contribution is: patch (one sample) | patient (all of a patient's)
    unit: Literal["patch", "patient"] = "patch"
    patches_per_patient: int = between(8, 1, 100_000)  # unit patient: at most this many of a patient's samples a step
    # local: a site's total epsilon in its ledger, across runs; null: epsilon
    budget: float | None = bounded(None, lambda v: v is None or v > 0, "positive (.inf: no limit), or null")
    # Simulated sites' ledgers; null: <data.root>/.fedfuse-privacy; relative: inside data.root. A SuperNode never
    # reads it: its ledger stays where its own node config says (ledger-dir, default <data-dir>/.fedfuse-privacy).
    ledger_dir: str | None = path_field(None)
    # share of each site's training units kept out of training (membership audit)
    audit_fraction: float = bounded(0.0, lambda v: 0 <= v < 1, "in [0, 1)")
    # the one-run audit (shared/audit.py): training samples a site turns into canaries (a wrong label each), each
    # trained on with probability one half; 0: none
    canaries: int = between(0, 0, 100_000)
    # SecAgg+ (Flower's legacy API, FedAvg only; server/secagg.py): the server learns only the sum of the sites' updates
    secure_aggregation: bool = False
    # secure_aggregation: every trained weight must lie in [-this, this]
    secagg_clipping_range: float = bounded(8.0, lambda v: 0 < v < math.inf, "positive and finite")
    # secure_aggregation: integer levels over that range (2**22, Flower's)
    secagg_quantization_range: int = bounded(4194304, lambda v: 2 <= v < 2**32, "between 2 and 2**32 - 1")


def _check_secure_aggregation(cfg: Config) -> None:
    """What SecAgg+ can sum: FedAvg's weighted mean of bounded arrays, from at least two sites a round."""
    f = cfg.federation
    if cfg.model.name == "xgboost":
        raise ConfigError("privacy.secure_aggregation: XGBoost's model is a tree ensemble in JSON, not arrays that "
                          "can be masked and summed; use model.name: mlp for the EHR task")
    if f.strategy != "fedavg":
        raise ConfigError(f"privacy.secure_aggregation: SecAgg+ runs on Flower's legacy API with FedAvg only; "
                          f"federation.strategy {f.strategy!r} needs each site's update, which the server never sees")
    if cfg.privacy.mode == "central":
        raise ConfigError("privacy.secure_aggregation: cannot be combined with privacy.mode: central, which clips and "
                          "noises each site's update at the server (SecAgg+ hides them); privacy.mode: local can be")
    if has_batch_norm(cfg.model):
        raise ConfigError("privacy.secure_aggregation: BatchNorm's running statistics and step counter are not "
                          "trained weights within the clipping range; set model.resnet_norm / model.cnn_norm: group")
    if f.min_sites < 2:
        raise ConfigError("privacy.secure_aggregation: needs federation.min_sites of at least 2 (a sum over one site "
                          "is that site's update)")
    if cfg.data.sites * cfg.privacy.secagg_quantization_range >= 2**32:  # Flower's modulus: the sum must not wrap
        raise ConfigError(f"privacy.secagg_quantization_range: the sum of {cfg.data.sites} sites' quantised values "
                          "must stay below SecAgg+'s modulus 2**32; lower it")


def compacted_upload(f: FederationConfig) -> bool:
    """Whether a site's upload is less than the whole float32 model (``shared.wire.compact``)."""
    return f.upload != "all" or f.upload_dtype != "float32" or f.fedbn


def _check_privacy(cfg: Config) -> None:
    """One noise setting; central DP: what Flower's accountant covers; local DP-SGD: per-sample gradients."""
    p = cfg.privacy
    if compacted_upload(cfg.federation) and (p.secure_aggregation or (p.mode == "central" and p.clipping == "client")):
        raise ConfigError("federation.upload / upload_dtype / fedbn: an upload without some of the model (BatchNorm "
                          "kept at the site under fedbn) or in float16 cannot be masked by privacy.secure_aggregation "
                          "or clipped at the site (privacy.clipping: client), which work on the whole float32 model; "
                          "set federation.upload: all, upload_dtype: float32, fedbn: false, or privacy.clipping: server")
    if p.secure_aggregation:
        _check_secure_aggregation(cfg)
    if p.mode == "none":
        return
    if (p.epsilon is None) == (p.noise_multiplier is None):
        raise ConfigError("privacy: set exactly one of privacy.epsilon (a target for the run) and "
                          "privacy.noise_multiplier (a fixed noise level)")
    if cfg.model.name == "xgboost":
        raise ConfigError(f"privacy.mode: {p.mode} adds noise to gradients or weights of the neural models; "
                          "XGBoost's trees have neither (model.name: mlp is the private EHR model)")
    if p.mode == "central":
        # Flower's accountant composes one Gaussian release of FedAvg's equal-weight mean of every site a round.
        if cfg.federation.strategy != "fedavg":
            raise ConfigError(f"privacy.mode: central wraps FedAvg (equal site weights, no amplification by "
                              f"sampling); federation.strategy {cfg.federation.strategy!r} is not accounted for")
        if cfg.federation.fraction_train != 1.0:
            raise ConfigError("privacy.mode: central accounts without amplification and needs every site every "
                              f"round: set federation.fraction_train: 1.0 (got {cfg.federation.fraction_train})")
        if p.noise_multiplier == 0 or (p.epsilon is not None and math.isinf(p.epsilon)):
            raise ConfigError("privacy.mode: central needs noise: a positive privacy.noise_multiplier or a finite "
                              "privacy.epsilon (privacy.mode: none trains without)")
        return
    if has_batch_norm(cfg.model):
        raise ConfigError("privacy.mode: local cannot train BatchNorm (its statistics mix the samples a step clips "
                          "one by one); set model.resnet_norm / model.cnn_norm: group, the Opacus-ready layers"
                          + (". So FedBN (federation.fedbn), which needs BatchNorm, does not combine with local DP"
                             if cfg.federation.fedbn else ""))
    if cfg.federation.strategy == "fedprox":
        raise ConfigError("privacy.mode: local does not take FedProx's proximal term (it is not clipped per sample); "
                          "choose another federation.strategy")


@dataclass(frozen=True)
class ReportConfig:
    """What a run explains at its end (shared/explain.py)."""

    # test rows a site explains for federated SHAP (mean |SHAP| per feature); 0: none
    shap_rows: int = between(200, 0, 1_000_000)
    pooled_reference: bool = True  # simulations: rank-correlate federated SHAP with a model trained on pooled data


@dataclass(frozen=True)
class LoggingConfig:
    """Where per-round metrics go besides metrics.json and the printed table."""

    tensorboard: bool = False  # also write them as TensorBoard scalars in <run>/tensorboard (the tensorboard extra)


@dataclass(frozen=True)
class FaultsConfig:
    """Failures injected at chosen sites and rounds (testing what the server survives); each entry is SITE@ROUND."""

    crash: tuple[str, ...] = ()  # the site raises while training, e.g. ["1@2"]: site 1 in round 2
    hang: tuple[str, ...] = ()  # the site answers only after federation.round_timeout
    nan: tuple[str, ...] = ()  # the site returns NaN weights


def _check_faults(cfg: Config) -> None:
    for kind in ("crash", "hang", "nan"):
        for i, entry in enumerate(getattr(cfg.faults, kind)):
            site, _, when = entry.partition("@")
            if not (re.fullmatch(r"[0-9]{1,9}@[0-9]{1,9}", entry) and int(site) < cfg.data.sites
                    and 1 <= int(when) <= cfg.federation.rounds):
                raise ConfigError(f"faults.{kind}[{i}]: expected SITE@ROUND, a site in 0..{cfg.data.sites - 1} and a "
                                  f"round in 1..{cfg.federation.rounds} (e.g. 1@2: site 1 in round 2), got "
                                  f"{_shown(entry)}")


@dataclass(frozen=True)
class SimulationConfig:
    """Flower's simulation engine on one machine."""

    cpus_per_site: float = bounded(1.0, lambda v: 0.01 <= v <= 1024, "between 0.01 and 1024")


@dataclass(frozen=True)
class Config:
    """A whole experiment."""

    name: str = "quickstart"
    seed: int = bounded(0, lambda v: 0 <= v < 2**32, "between 0 and 2**32 - 1 (a 32-bit seed)")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)


def _check_name(cfg: Config) -> None:
    check_plain_name(cfg.name, "name (it names the run's folder, with a timestamp)")


# The rules between fields, each after its section, run in this order once every field is within its bound.
VALIDATORS = (_check_federation, _check_model, _check_name, _check_data, _check_train, _check_privacy, _check_faults)

# Which task each model solves: the three-class patch task, or breast cancer yes/no from the cohort.
TASKS = {"fusion": "patch", "late_fusion": "patch", "cnn": "patch", "resnet18": "patch", "mlp": "ehr",
         "xgboost": "ehr"}
EHR_CLASSES = ("no_breast_cancer", "breast_cancer")
TREE_STRATEGIES = ("xgb_bagging", "xgb_cyclic")


def image_encoder_of(model: ModelConfig) -> str | None:
    """The model's image encoder (``cnn`` or ``resnet18``), or None for the EHR-only models."""
    if model.name in ("fusion", "late_fusion"):
        return model.image_encoder
    return model.name if model.name in ("cnn", "resnet18") else None


def has_batch_norm(model: ModelConfig) -> bool:
    """Whether the model's image encoder normalises with BatchNorm (what FedBN keeps local)."""
    encoder = image_encoder_of(model)
    return (encoder == "cnn" and model.cnn_norm == "batch") or (encoder == "resnet18" and model.resnet_norm == "batch")


def uses_resnet(model: ModelConfig) -> bool:
    """Whether the model has a ResNet-18 encoder (what ``pretrained`` and ``freeze`` act on)."""
    return image_encoder_of(model) == "resnet18"


def eval_data_path(cfg: Config) -> Path | None:
    """The server's test set: ``server.eval_data``, a relative path taken inside ``data.root``."""
    if not cfg.server.eval_data:
        return None
    folder = Path(cfg.server.eval_data)
    return folder if folder.is_absolute() else Path(cfg.data.root) / folder


def task_of(cfg: Config) -> str:
    return TASKS[cfg.model.name]


def classes_of(cfg: Config) -> tuple[str, ...]:
    """The class names the configured model predicts."""
    return cfg.data.classes if task_of(cfg) == "patch" else EHR_CLASSES


def check_plain_name(name: object, what: str, max_chars: int = MAX_NAME) -> str:
    """``name`` if it is one safe path component, else a ConfigError naming ``what`` and what was expected.

    The one rule for every name that becomes a file or folder (a run's, a site's, a key's): 1 to ``max_chars``
    characters and at most 255 bytes (a name on every common file system), not only dots and blanks, no
    separator, no ``..``, no control character.
    """
    if not (isinstance(name, str) and 0 < len(name) <= max_chars and len(name.encode()) <= NAME_BYTES
            and name.strip(". ") != "" and ".." not in name and not any(c in "/\\" for c in name)
            and not any(unicodedata.category(c).startswith("C") for c in name)):
        raise ConfigError(f"{what}: expected one plain name, 1 to {max_chars} characters ({NAME_BYTES} bytes) "
                          f"without '/', '\\', '..' or control characters; got {_shown(name)}")
    return name


def fixed_settings(cfg: Config) -> dict[str, Any]:
    """The flat settings a resumed run must keep: all but :data:`RESUME_MAY_CHANGE`."""
    return {k: v for k, v in flatten(cfg).items() if not k.startswith(RESUME_MAY_CHANGE)}


def settings_changed(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The keys whose values differ between two :func:`fixed_settings`, sorted."""
    return sorted(k for k in before.keys() | now.keys() if k not in before or k not in now or before[k] != now[k])


def _shown(value: Any) -> str:
    """A config value as an error message shows it: on one line, and short."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"  # repr of a huge one is long, or refused (4300 digits)
    text = repr(list(value) if isinstance(value, tuple) else value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _one_line(err: Exception) -> str:
    """An error's text on one line (PyYAML's point at the place on a second one)."""
    return " ".join(str(err).split())


def _type_name(tp: Any) -> str:
    return "str" if typing.get_origin(tp) is Literal else getattr(tp, "__name__", None) or str(tp)


def _coerce(path: str, tp: Any, value: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in the field's own type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(path, inner, value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping (section {tp.__name__}), got {_shown(value)}")
        return build_section(tp, value, path)
    if origin is tuple:
        (item,) = typing.get_args(tp)[:1]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list of {_type_name(item)}, got {_shown(value)}")
        return tuple(_coerce(f"{path}[{i}]", item, v) for i, v in enumerate(value))
    if origin is dict:
        ktp, vtp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of {_type_name(ktp)} to {_type_name(vtp)}, "
                              f"got {_shown(value)}")
        return {_coerce(f"{path}.<key>", ktp, k): _coerce(f"{path}.{k}", vtp, v) for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > sys.float_info.max:
            raise ConfigError(f"{path}: expected float, got {_shown(value)}, beyond any float")
        return float(value)
    if origin is Literal and not (isinstance(value, str) and value in typing.get_args(tp)):
        raise ConfigError(f"{path}: expected one of {', '.join(typing.get_args(tp))}, got {_shown(value)}")
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{path}: expected {tp.__name__}, got {type(value).__name__} {_shown(value)}")
    return value


def build_section(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    """A frozen dataclass from a mapping: unknown keys, wrong types and values out of bounds fail with the dotted
    path."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(f"{where}: unknown key; expected one of {', '.join(sorted(names))}")
    kwargs = {k: _coerce(f"{prefix}.{k}" if prefix else k, hints[k], v) for k, v in raw.items()}
    for f in dataclasses.fields(cls):  # each given value within its field's bound
        if f.name in kwargs and "ok" in f.metadata and not f.metadata["ok"](kwargs[f.name]):
            where = f"{prefix}.{f.name}" if prefix else f.name
            raise ConfigError(f"{where}: expected {f.metadata['expected']}, got {_shown(kwargs[f.name])}")
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), as written to YAML."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    """Build a :class:`Config` from a nested mapping; ``source`` names it in errors."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        cfg = build_section(Config, raw)
        for check in VALIDATORS:
            check(cfg)
        return cfg
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def load(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Load a YAML config and apply dotted-key ``overrides``."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as err:  # a folder, no permission
        raise ConfigError(f"{path}: cannot read the config file: {err.strerror}") from None
    except (yaml.YAMLError, ValueError) as err:  # ValueError: an integer of more than 4300 digits
        raise ConfigError(f"{path}: not valid YAML: {_one_line(err)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    cfg = from_dict(raw, str(path))
    return apply_overrides(cfg, overrides or {})


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a.b": "1", "c": "x"}`` (values parsed later, by field type)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        out[key.strip()] = value
    return out


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Set dotted keys. A string value for a non-string field is read as YAML (``"3"`` -> 3)."""
    raw = to_dict(cfg)
    hints = _flat_hints()
    for key, value in overrides.items():
        if key not in hints:
            close = difflib.get_close_matches(key, list(hints), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"{key}: unknown key{hint}")
        if isinstance(value, str) and hints[key] == (str | None):  # a path: kept as written, but null/none
            value = None if value.strip().lower() in ("", "null", "none", "~") else value
        elif isinstance(value, str) and not (hints[key] is str or typing.get_origin(hints[key]) is Literal):
            try:
                value = yaml.safe_load(value) if value.strip() else None
            except (yaml.YAMLError, ValueError) as err:  # ValueError: an integer of more than 4300 digits
                raise ConfigError(f"{key}: cannot read {_shown(value)}: {_one_line(err)}") from None
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return from_dict(raw, "overrides")


@functools.cache  # the dataclasses never change: every override, flatten and run config reads this
def _flat_hints(cls: type = Config, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, tp in typing.get_type_hints(cls).items():
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            out.update(_flat_hints(tp, key + "."))
        else:
            out[key] = tp
    return out


def flat_keys() -> list[str]:
    """Every setting's dotted key: what ``[tool.flwr.app.config]`` may override."""
    return sorted(_flat_hints())


def flatten(cfg: Config) -> dict[str, bool | int | float | str]:
    """Flat scalars for Flower's run_config; lists, mappings and None as YAML text."""
    out: dict[str, bool | int | float | str] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict) and f"{prefix}{k}" not in _flat_hints():
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, (bool, int, float, str)):
                out[f"{prefix}{k}"] = v
            elif v is None:
                out[f"{prefix}{k}"] = "null"
            else:
                out[f"{prefix}{k}"] = yaml.safe_dump(v, default_flow_style=True).strip()

    walk(to_dict(cfg), "")
    return out


RUN_KEYS = ("config", "run-dir", "resume")  # a run config's keys besides the flat settings


def run_envelope(cfg: Config, run_dir: Path | str, config: Path | str = "configs/quickstart.yaml",
                 resume: bool = False) -> dict[str, bool | int | float | str]:
    """The run config fedfuse hands Flower: the YAML ``config`` (absolute, or relative to the app's root), the run
    folder, whether to resume, and every setting of ``cfg`` flat (a run config holds scalars only). The apps read
    it back with :func:`read_envelope`."""
    return {"config": str(config), "run-dir": str(run_dir), "resume": "true" if resume else "", **flatten(cfg)}


def read_envelope(run_config: dict[str, Any], app_root: Path) -> tuple[Config, str, bool]:
    """A run config, in either app: the config, the run folder ("" when none is set) and whether to resume."""
    return (from_run_config(run_config, app_root), str(run_config.get("run-dir", "")),
            str(run_config.get("resume", "")).lower() == "true")


def from_run_config(run_config: dict[str, Any], app_root: Path) -> Config:
    """Rebuild the config inside a ServerApp or ClientApp.

    ``run_config["config"]`` is the YAML path, relative to the app's root; every
    other key that is not ``""`` (Flower's "not set") overrides that setting.
    """
    path = Path(str(run_config.get("config", "configs/quickstart.yaml")))
    if not path.is_absolute():
        path = app_root / path
    overrides = {k: v for k, v in run_config.items() if k in _flat_hints() and v != ""}
    return load(path, overrides)


def dump(cfg: Config, path: Path) -> None:
    """Write the resolved config as YAML (what a run folder keeps), whole and never through a planted link."""
    from shared.cache import write_atomic  # here: shared.cache imports numpy, which loading a config needs not

    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    write_atomic(Path(path), "w", lambda f: f.write(text))
