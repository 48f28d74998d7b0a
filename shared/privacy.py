"""Local differential privacy: DP-SGD at each site (Opacus) and the site's privacy ledger.

DP-SGD (Abadi et al., CCS 2016): every step draws *units* by Poisson sampling
at rate ``q``, clips each unit's gradient to ``max_grad_norm``, adds Gaussian
noise of standard deviation ``noise_multiplier * max_grad_norm`` to the sum
and divides by the expected number of units. Opacus does the per-sample
gradients (``GradSampleModule``), the clipping and noise (``DPOptimizer``) and
the accounting (``RDPAccountant``); the sampling loop is ours, because Opacus
samples records and a unit may be a group of records:

* ``unit: patch``: a unit is one training sample (a patch, with its
  patient's EHR row). The epsilon protects one patch. A patient contributes
  up to ``k`` patches, so the patient-level guarantee is only the group
  privacy bound ``(k eps, k e^((k-1) eps) delta)``, reported alongside and
  vacuous for the hundreds of patches a BreCaHAD case has.
* ``unit: patient``: a unit is one patient: up to ``patches_per_patient`` of
  a sampled patient's samples, their per-sample gradients summed *before*
  clipping, so one clipped contribution is the whole patient's and the
  epsilon protects a patient (and so each of their patches).

The ledger is a site-local JSON file keyed by a fingerprint of who is in the
site's training data (patient ids and their EHR rows, not the pixels). It
holds the accountant's history (noise multiplier, sample rate, steps) of
every round these patients ever trained in, across runs and restarts, so
the epsilon a site reports is cumulative; it is written atomically after
every round and only ``fedfuse privacy reset`` empties it. Where it lives is
the hospital's to say, never the run's (``ledger_folder``), and a ledger
holding an entry the accountant cannot take is refused, never summed
(``read_ledger``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import numbers
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn

from shared.cache import write_json
from shared.config import Config, PrivacyConfig, TrainConfig
from shared.data import Samples
from shared.train import class_weights, make_batch, param_groups

Entry = tuple[float, float, int]  # (noise multiplier, sample rate, steps): one line of Opacus' RDP history
LEDGER_FOLDER = ".fedfuse-privacy"  # a site's ledgers, in its data folder (deployment) or data.root (simulation)
# Noise multipliers Opacus' RDP series computes, in bounded time. Below, sigma**2 underflows in the series of a
# fractional order to a NaN it never stops summing (1e-160 hangs), and epsilon is past 1e11 anyway; above, the
# series loses its precision (a ValueError from 1e7 at some rates, an overflow from 1e154) and takes seconds,
# while epsilon no longer moves in its 6th digit.
NOISE_RANGE = (1e-6, 1e5)
MAX_STEPS = 2**53  # Opacus multiplies by the step count as a float: exact up to here (10**400 overflows)
BUDGET_KEY = "privacy-budget"  # node config: the most epsilon a hospital allows; setting it requires local DP
LEDGER_KEYS = {"site": str, "unit": str, "history": list, "rounds": list}  # a ledger file's keys besides delta


def units(samples: Samples, unit: str) -> list[np.ndarray]:
    """Sample indices of each unit: one per sample, or all of a patient's samples."""
    if unit == "patch":
        return list(np.arange(len(samples))[:, None])
    _, inverse = np.unique(samples.cases, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(inverse[order])) + 1)


def audit_split(samples: Samples, fraction: float, seed: int, unit: str) -> tuple[Samples, Samples]:
    """(members, non-members): ``fraction`` of the units, drawn at random, kept out of training for an audit.

    Members and non-members then come from the same patients (unit patch) or
    the same hospital (unit patient), as a membership-inference audit needs.
    """
    groups = units(samples, unit)
    out = np.random.default_rng([seed, 7919]).random(len(groups)) < fraction
    held = np.zeros(len(samples), bool)
    for g, o in zip(groups, out):
        held[g] = o
    return samples.subset(~held), samples.subset(held)


@dataclass(frozen=True)
class Plan:
    """One site's DP-SGD settings for a round, derived from the config and the size of its data."""

    noise_multiplier: float
    sample_rate: float
    expected_units: float  # units in a step, on average: what the noisy sum is divided by
    steps: int  # optimiser steps a round
    max_patches: int  # the most samples one patient has here: the group size of the patch-level bound

    @property
    def entry(self) -> Entry:
        return (self.noise_multiplier, self.sample_rate, self.steps)


def plan(cfg: Config, samples: Samples) -> Plan:
    """Sample rate and steps per round for ``samples``; the noise for the target epsilon over all rounds."""
    p, t = cfg.privacy, cfg.train
    groups = units(samples, p.unit)
    per_step = t.batch_size if p.unit == "patch" else max(1.0, t.batch_size / p.patches_per_patient)
    q = min(1.0, per_step / max(len(groups), 1))
    steps = t.steps if t.steps > 0 else t.local_epochs * math.ceil(1 / q)
    if p.noise_multiplier is not None:
        sigma = p.noise_multiplier
    elif math.isinf(p.epsilon):
        sigma = 0.0  # clipping without noise: the non-private reference point of a sweep
    else:
        with _quiet_orders():
            sigma = get_noise_multiplier(target_epsilon=p.epsilon, target_delta=p.delta, sample_rate=q,
                                         steps=cfg.federation.rounds * steps, accountant="rdp")
    _, counts = np.unique(samples.cases, return_counts=True)
    return Plan(float(sigma), q, q * len(groups), steps, int(counts.max()) if len(counts) else 0)


def epsilon(history: list[Entry], delta: float) -> float:
    """Opacus' RDP epsilon at ``delta`` after ``history``; a ValueError for an entry or delta out of range.

    Bounded in time for every entry :func:`check_entry` accepts: a noise multiplier below ``NOISE_RANGE``
    (0: no noise) is accounted as no privacy at all, one above it at its top. Epsilon falls as the noise
    grows, so either can only report more epsilon than the exact one, never less.
    """
    check_delta(delta)
    history = [h for h in map(check_entry, history) if h[2] > 0]  # a line of no steps released nothing
    if not history:
        return 0.0
    if any(sigma < NOISE_RANGE[0] for sigma, _, _ in history):
        return math.inf
    accountant = RDPAccountant()
    accountant.history = [(min(sigma, NOISE_RANGE[1]), q, n) for sigma, q, n in history]
    with _quiet_orders():
        return float(accountant.get_epsilon(delta))


def check_entry(entry: object) -> Entry:
    """``entry`` as a ledger line, or a ValueError saying what is wrong with it.

    A line is [noise multiplier, sample rate, steps]: a finite noise multiplier >= 0 (0: clipping without
    noise), a sample rate in (0, 1] and a whole number of steps from 0 to ``MAX_STEPS``. Anything else, NaN
    or a negative step count above all, would make the accountant spin or report a negative epsilon.
    """
    if not isinstance(entry, (list, tuple)) or len(entry) != 3:
        raise ValueError(f"{entry!r}: expected [noise multiplier, sample rate, steps]")
    sigma, q, steps = entry
    if not _is_real(sigma) or not (0 <= sigma < math.inf):
        raise ValueError(f"noise multiplier {sigma!r}: expected a finite number >= 0 (0: no noise)")
    if not _is_real(q) or not (0 < q <= 1):
        raise ValueError(f"sample rate {q!r}: expected a number in (0, 1]")
    if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or not 0 <= steps <= MAX_STEPS:
        raise ValueError(f"steps {steps!r}: expected a whole number from 0 to {MAX_STEPS}")
    return float(sigma), float(q), int(steps)


def check_delta(delta: object) -> float:
    """``delta`` as a float in (0, 1), or a ValueError."""
    if not _is_real(delta) or not (0 < delta < 1):
        raise ValueError(f"delta {delta!r}: expected a number in (0, 1)")
    return float(delta)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@contextlib.contextmanager
def _quiet_orders():
    """Opacus warns when the best RDP order is at the end of its range: only at extreme epsilons, and harmless."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order")
        yield


def patient_bound(eps: float, delta: float, k: int) -> tuple[float, float]:
    """Group privacy: a patch-level ``(eps, delta)`` guarantee covers a patient of ``k`` patches as this pair."""
    if k <= 1:
        return eps, delta
    with np.errstate(over="ignore"):
        return k * eps, float(min(math.inf, k * np.exp((k - 1) * eps) * delta))


def fingerprint(samples: Samples) -> str:
    """Hash of who is in the training data: its patients (case ids) and their EHR rows, what the ledger's
    epsilon is about. Not the pixels: another patch size or stain normalisation trains on the same people
    and spends the same budget."""
    cases, first = np.unique(samples.cases.astype(str), return_index=True)
    h = hashlib.sha256("\n".join(cases).encode())
    h.update(np.ascontiguousarray(samples.ehr[first]).tobytes())
    return h.hexdigest()[:16]


def ledger_folder(node_config: Mapping[str, object], privacy: PrivacyConfig, data_root: str) -> Path:
    """Where a site keeps its privacy ledgers: the hospital decides, never the run.

    A SuperNode (its node config has ``data-dir``) keeps them in its own ``ledger-dir``, else in
    ``<data-dir>/.fedfuse-privacy``. The run config is the coordinator's: were it to say where, it could point
    a site at an empty folder and train the same patients again from epsilon 0. Only a simulated site
    (``partition-id``), whose run config is its owner's, reads ``privacy.ledger_dir`` (relative: inside
    ``data.root``; null: ``<data.root>/.fedfuse-privacy``).
    """
    if "ledger-dir" in node_config:
        return Path(str(node_config["ledger-dir"]))
    if "data-dir" in node_config:
        return Path(str(node_config["data-dir"])) / LEDGER_FOLDER
    return Path(data_root) / (privacy.ledger_dir or LEDGER_FOLDER)  # an absolute ledger_dir stays as it is


def run_budget(privacy: PrivacyConfig) -> float | None:
    """The epsilon a run lets a site (local DP) or the federation (central DP) spend: ``privacy.budget``, else
    the run's target ``privacy.epsilon``; None: no limit (a fixed noise multiplier and no budget)."""
    return privacy.budget if privacy.budget is not None else privacy.epsilon


def site_budget(node_config: Mapping[str, object], privacy: PrivacyConfig) -> float:
    """The epsilon a site may spend in this run: the run's (:func:`run_budget`; none: no limit), capped by its
    hospital's ``privacy-budget`` (node config), which the run config cannot raise."""
    budget = run_budget(privacy)
    budget = math.inf if budget is None else budget
    if BUDGET_KEY not in node_config:
        return budget
    value = node_config[BUDGET_KEY]
    try:
        hospital = float(value)
    except (TypeError, ValueError):
        hospital = math.nan
    if not hospital >= 0:  # NaN would cap nothing: ``min`` ignores it
        raise ValueError(f"node config {BUDGET_KEY} {value!r}: expected a number >= 0, the most epsilon this "
                         "hospital allows across all runs")
    return min(budget, hospital)


def local_dp_refusal(node_config: Mapping[str, object], privacy: PrivacyConfig, dp: Plan | None) -> str | None:
    """Why a site may not train this run, its hospital having asked for local DP; None: it may.

    A hospital asks by setting ``privacy-budget`` in its node config. Its data then trains only under local
    DP-SGD with noise (``privacy.mode`` local, a noise multiplier above 0: a plan with sigma 0 clips and adds
    nothing), whatever the coordinator's run config says: under mode none or central the site would train
    these patients without its ledger, so its budget would cap nothing. ``dp``: the run's plan at this site,
    None without local DP. Only training is refused: evaluation and the statistics queries spend no budget
    (a ledger accounts DP-SGD steps only), so they stay allowed.
    """
    if BUDGET_KEY not in node_config or (privacy.mode == "local" and dp is not None and dp.noise_multiplier > 0):
        return None
    asked = f"privacy.mode {privacy.mode}"
    if dp is not None:  # local, without noise
        asked += f" with noise multiplier {dp.noise_multiplier:g} (no noise)"
    return (f"the node config sets {BUDGET_KEY} = {node_config[BUDGET_KEY]!r}, so this site trains only under local "
            f"DP (privacy.mode local, a noise multiplier above 0); the run asks for {asked}")


def read_ledger(path: Path) -> dict:
    """A ledger file's contents, each entry checked (:func:`check_entry`), its history as tuples.

    A file that is not a ledger, or holds an entry the accountant cannot take, is refused with a ValueError
    naming the file and the entry, and left as it is: its owner repairs it or resets it on purpose.
    """
    def refuse(why: str) -> ValueError:
        return ValueError(f"{path}: not a valid privacy ledger: {why}; it is left as it is: repair it, or reset "
                          "it on purpose with `fedfuse privacy reset`")

    try:
        stored = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise refuse(f"not readable JSON ({err})") from None
    if not isinstance(stored, dict) or not all(isinstance(stored.get(k), t) for k, t in LEDGER_KEYS.items()):
        raise refuse("expected an object with " + ", ".join(f"{k} ({t.__name__})" for k, t in LEDGER_KEYS.items()))
    try:
        delta = check_delta(stored["delta"])
    except ValueError as err:
        raise refuse(str(err)) from None
    history = []
    for i, entry in enumerate(stored["history"]):
        try:
            history.append(check_entry(entry))
        except ValueError as err:
            raise refuse(f"history entry {i} {entry!r}: {err}") from None
    bad = next((i for i, r in enumerate(stored["rounds"]) if not isinstance(r, dict) or "run" not in r), None)
    if bad is not None:
        raise refuse(f"rounds entry {bad} {stored['rounds'][bad]!r}: expected an object with its run")
    return {**stored, "delta": delta, "history": history}


class Ledger:
    """A site's privacy spending on one data set: the accountant's history, kept across runs."""

    def __init__(self, folder: Path, samples: Samples, privacy: PrivacyConfig, site: str) -> None:
        key = fingerprint(samples)
        self.path = Path(folder) / f"ledger-{key}.json"
        self.data = {"fingerprint": key, "site": site, "unit": privacy.unit, "delta": privacy.delta,
                     "history": [], "rounds": []}
        if self.path.is_file():
            stored = read_ledger(self.path)
            for key_name in ("unit", "delta"):
                if stored[key_name] != self.data[key_name]:
                    raise ValueError(f"{self.path}: this data's ledger is kept with privacy.{key_name} = "
                                     f"{stored[key_name]!r}, the run asks for {self.data[key_name]!r}; "
                                     "epsilons of different units or deltas do not add up")
            self.data = stored

    @property
    def history(self) -> list[Entry]:
        return self.data["history"]

    def epsilon(self, extra: Entry | None = None) -> float:
        """The cumulative epsilon, or what it would be after one more round ``extra``."""
        return epsilon(self.history + ([extra] if extra else []), self.data["delta"])

    def spend(self, entry: Entry, run: str, server_round: int) -> float:
        """Add a trained round, save atomically, return the new cumulative epsilon."""
        entry = check_entry(entry)
        last = self.history[-1] if self.history else None
        if last and last[:2] == entry[:2]:  # Opacus merges steps at the same noise and rate the same way
            self.history[-1] = (last[0], last[1], last[2] + entry[2])
        else:
            self.history.append(tuple(entry))
        eps = self.epsilon()
        self.data["rounds"].append({"run": run, "round": server_round, "steps": entry[2],
                                    "noise_multiplier": entry[0], "sample_rate": entry[1], "epsilon": eps,
                                    "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        write_json(self.path, {**self.data, "history": [list(h) for h in self.history]})
        return eps


def check_module(model: nn.Module) -> None:
    """Opacus' validator: refuse, naming each layer, a model DP-SGD cannot train."""
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ValueError("the model cannot train under DP-SGD: " + "; ".join(map(str, errors))
                         + " (use model.resnet_norm: group)")


def dp_batch(samples: Samples, idx: np.ndarray, train: TrainConfig, gen: torch.Generator):
    """A training batch for Opacus: its images in plain NCHW memory. Opacus' per-sample gradients of a
    convolution come out wrong on a strided view (the loader's NHWC memory through a permute, a rotation)
    and on channels_last, silently: tests/test_privacy.py checks them against one backward per sample."""
    images, ehr, labels = make_batch(samples, idx, train, gen)
    return images.contiguous(), ehr, labels


def train_dp(model: nn.Module, samples: Samples, cfg: Config, n_classes: int, seed: int, p: Plan) -> float:
    """``p.steps`` DP-SGD steps on ``samples`` (Adam on the privatised gradient); returns the mean loss."""
    check_module(model)
    privacy, train = cfg.privacy, cfg.train
    groups = units(samples, privacy.unit)
    per_unit = 1 if privacy.unit == "patch" else privacy.patches_per_patient
    # The Poisson sample and the noise must be secret: drawn from the OS's entropy, never from the run's seed,
    # which the server knows and could use to subtract the noise. So DP-SGD is not bit-reproducible.
    secret = np.random.SeedSequence()
    rng = np.random.default_rng(secret)
    noise = torch.Generator().manual_seed(int(secret.generate_state(1, np.uint64)[0] >> 1))
    gen = torch.Generator().manual_seed(seed)  # augmentation
    torch.manual_seed(seed)  # dropout
    weights = class_weights(samples.labels, n_classes, train.class_weights)

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # A sum of per-sample losses: each row of grad_sample is then one sample's own gradient.
        return (nn.functional.cross_entropy(logits, labels, reduction="none") * weights[labels]).sum()

    gsm = GradSampleModule(model.to(memory_format=torch.contiguous_format), batch_first=True, loss_reduction="sum")
    params = [q for q in gsm.parameters() if q.requires_grad]
    opt = DPOptimizer(torch.optim.Adam(param_groups(model, train), lr=train.lr, weight_decay=train.weight_decay),
                      noise_multiplier=p.noise_multiplier, max_grad_norm=privacy.max_grad_norm,
                      expected_batch_size=max(1, round(p.expected_units)), loss_reduction="mean",
                      generator=noise)
    gsm.train()
    total, count = 0.0, 0
    with warnings.catch_warnings():  # Opacus' backward hooks fire on inputs that need no gradient: expected
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for _ in range(p.steps):
            chosen = [groups[u] for u in np.flatnonzero(rng.random(len(groups)) < p.sample_rate)]
            picks = [g if len(g) <= per_unit else rng.choice(g, per_unit, replace=False) for g in chosen]
            opt.zero_grad(set_to_none=True)
            if picks:
                idx = np.concatenate(picks)
                images, ehr, labels = dp_batch(samples, idx, train, gen)
                loss = gsm._module.loss(images, ehr, labels, loss_fn)
                loss.backward()
                total += float(loss.detach())
                count += len(idx)
                if per_unit > 1:  # sum each patient's per-sample gradients: one row, clipped as one, per patient
                    owner = torch.from_numpy(np.repeat(np.arange(len(picks)), [len(g) for g in picks]))
                    for q in params:
                        q.grad_sample = torch.zeros((len(picks), *q.shape)).index_add_(0, owner, q.grad_sample)
            else:  # no unit drawn: the step still releases noise, and the ledger counts it
                for q in params:
                    q.grad_sample = torch.zeros((1, *q.shape))
            opt.step()
    gsm.remove_hooks()
    return total / max(count, 1)
