"""Local DP-SGD and the sites' privacy ledgers, through the real ServerApp and ClientApp (in process)."""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent
from opacus.accountants.utils import get_noise_multiplier

from client.app import app as client_app
from server.app import app as server_app
from server.strategy import central_accountant, central_noise
from shared import learner, privacy
from shared.audit import audited
from shared.config import ConfigError, ModelConfig, PrivacyConfig, apply_overrides, load, task_of
from shared.data import Samples, load_site
from shared.mimic import FEATURES
from shared.models import build_model
from simulations import flower
from simulations.cli import absolute_paths, main
from simulations.inprocess import run_server
from simulations.privacy_sweep import membership_auc, run_sweep
from tests.helpers import opacus_after

ROOT = Path(__file__).resolve().parent.parent
STEPS = 2  # optimiser steps a round: enough to account for, small enough for a test


def dp_config(quick_data, tmp_path, model="fusion", rounds=2, **changes):
    cfg = absolute_paths(load(ROOT / "configs/quickstart.yaml"))
    settings = {"model.name": model, "data.root": str(quick_data), "data.sites": 2, "train.steps": STEPS,
                "federation.rounds": rounds, "server.eval_data": None, "privacy.mode": "local",
                "privacy.ledger_dir": str(tmp_path / "ledgers"), "report.shap_rows": 0, **changes}
    return apply_overrides(cfg, settings)


def site_train(cfg, k: int) -> Samples:
    return load_site(Path(cfg.data.root) / f"site-{k}", cfg.data, cfg.seed + k, task_of(cfg))[0]


def opacus_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """Opacus' own accountant, stepped once per optimiser step."""
    return opacus_after([(sigma, q, steps)], delta)


def test_each_sites_cumulative_epsilon_is_opacus_accountants(federation, quick_data, tmp_path):
    cfg = dp_config(quick_data, tmp_path, rounds=3, **{"privacy.epsilon": 5.0})
    metrics = federation(tmp_path / "run", cfg)
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3] and "stopped" not in metrics
    for k in range(2):
        n = len(site_train(cfg, k))
        q = cfg.train.batch_size / n
        sigma = get_noise_multiplier(target_epsilon=5.0, target_delta=1e-5, sample_rate=q, steps=3 * STEPS,
                                     accountant="rdp")
        per_round = [r["privacy"][f"site-{k}"]["epsilon"] for r in metrics["rounds"]]
        for r, reported in enumerate(per_round, start=1):
            assert abs(reported - opacus_epsilon(sigma, q, r * STEPS, 1e-5)) < 1e-6
        final = metrics["privacy"]["sites"][f"site-{k}"]
        assert final["epsilon"] == per_round[-1] <= 5.0 and final["round"] == 3
        # patch-level DP says little about a patient with many patches: the group bound is far larger
        assert final["epsilon_patient"] > 10 * final["epsilon"]


def test_a_ledger_accumulates_across_runs_and_sites_decline_past_their_budget(federation, quick_data, tmp_path):
    sigma = 1.0
    eps = {}
    for k in range(2):
        q = 32 / len(site_train(dp_config(quick_data, tmp_path), k))
        eps[k] = [opacus_epsilon(sigma, q, r * STEPS, 1e-5) for r in (1, 2, 3)]
    budget = (max(e[1] for e in eps.values()) + min(e[2] for e in eps.values())) / 2  # room for 2 rounds, not 3
    assert max(e[1] for e in eps.values()) < budget < min(e[2] for e in eps.values())
    cfg = dp_config(quick_data, tmp_path, rounds=1, **{"privacy.epsilon": None, "privacy.noise_multiplier": sigma,
                                                       "privacy.budget": budget})
    first = federation(tmp_path / "first", cfg)  # one round; the ledger keeps it after the run has ended
    assert [first["privacy"]["sites"][f"site-{k}"]["epsilon"] for k in range(2)] == pytest.approx(
        [eps[k][0] for k in range(2)], abs=1e-6)

    second = federation(tmp_path / "second",
                        dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, rounds=4)))
    rounds = second["rounds"]
    assert rounds[0]["privacy"]["site-0"]["epsilon"] == pytest.approx(eps[0][1], abs=1e-6)  # continues the ledger
    declined = rounds[1]["failed"]
    assert set(declined) == {"site-0", "site-1"}
    assert all(reason.startswith("budget_exhausted") for reason in declined.values())
    assert len(rounds) == 2 and second["stopped"].startswith("round 2: every site has spent")
    assert all(s["epsilon"] <= budget for s in second["privacy"]["sites"].values())
    assert second["final"]["source"] == "federated" and second["final"]["round"] == 1
    assert (tmp_path / "second" / "model.pt").is_file()

    ledgers = sorted((tmp_path / "ledgers").glob("ledger-*.json"))
    assert len(ledgers) == 2
    for path in ledgers:  # two rounds spent in all, the declined round not at all
        ledger = json.loads(path.read_text())
        assert [r["round"] for r in ledger["rounds"]] == [1, 1] and ledger["history"][0][2] == 2 * STEPS


def test_a_site_out_of_budget_is_dropped_and_the_others_go_on(federation, quick_data, tmp_path):
    # federation.min_sites 1: the run may go on with one site (at 2 it would stop: tests/test_reliability.py)
    cfg = dp_config(quick_data, tmp_path, rounds=1, **{"privacy.epsilon": None, "privacy.noise_multiplier": 1.0,
                                                       "privacy.budget": 5.0, "federation.min_sites": 1})
    spent = privacy.Ledger(tmp_path / "ledgers", site_train(cfg, 0), cfg.privacy, "site-0")
    spent.spend((1.0, 0.5, 10_000), "an earlier study", 1)  # site-0's data has been used up before
    metrics = federation(tmp_path / "run", cfg)
    only = metrics["rounds"][0]
    assert list(only["failed"]) == ["site-0"] and only["failed"]["site-0"].startswith("budget_exhausted")
    assert list(only["privacy"]) == ["site-1"] and "stopped" not in metrics
    assert metrics["privacy"]["sites"]["site-1"]["epsilon"] < 5.0 and "site-0" not in metrics["privacy"]["sites"]
    assert json.loads(spent.path.read_text())["history"] == [[1.0, 0.5, 10_000]]  # nothing more spent


def test_a_run_every_site_declines_for_its_budget_is_an_error_of_the_cli(quick_data, tmp_path, monkeypatch, capsys):
    """From the sites' budget_exhausted replies through the server's BudgetSpent and metrics.json to
    `fedfuse simulate` exiting 2 with the budget named: only Flower's engine is replaced (by the in-process grid)."""
    monkeypatch.setattr(flower, "run_simulation", lambda run_dir, run_config, n, cpus, echo:
                        run_server(server_app, client_app, run_config, n))
    settings = {"model.name": "mlp", "data.root": str(quick_data), "data.sites": 2, "train.steps": STEPS,
                "federation.rounds": 1, "server.eval_data": "null", "report.shap_rows": 0, "privacy.mode": "local",
                "privacy.epsilon": "null", "privacy.noise_multiplier": 1.0, "privacy.budget": 1e-3,
                "privacy.ledger_dir": str(tmp_path / "ledgers")}  # one round of sigma 1 spends far more than 1e-3
    run_dir = tmp_path / "run"
    argv = ["simulate", str(ROOT / "configs/quickstart.yaml"), "--out", str(run_dir)]
    assert main([*argv, *(f"--set={k}={v}" for k, v in settings.items())]) == 2
    err = capsys.readouterr().err
    assert "the run trained nothing: round 1: every site has spent its privacy budget" in err
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["stopped"].startswith("round 1: every site has spent its privacy budget")
    declined = metrics["rounds"][0]["failed"]
    assert set(declined) == {"site-0", "site-1"} and all(r.startswith("budget_exhausted") for r in declined.values())
    assert not list((tmp_path / "ledgers").glob("ledger-*.json"))  # nothing spent


def test_two_runs_at_other_noise_and_sample_rates_add_up_in_the_ledger(federation, quick_data, tmp_path):
    """A second study of the same patients with another noise and batch size: the ledger is Opacus' accountant
    fed both runs' steps in order, neither run forgotten nor merged into the other's noise or rate."""
    first = dp_config(quick_data, tmp_path, **{"privacy.epsilon": None, "privacy.noise_multiplier": 1.0})
    second = apply_overrides(first, {"federation.rounds": 1, "privacy.noise_multiplier": 1.5,
                                     "train.batch_size": first.train.batch_size // 2})
    federation(tmp_path / "first", first)
    metrics = federation(tmp_path / "second", second)
    for k in range(2):
        n = len(site_train(first, k))
        expected = opacus_after([(1.0, first.train.batch_size / n, 2 * STEPS), (1.5, second.train.batch_size / n, STEPS)])
        assert metrics["privacy"]["sites"][f"site-{k}"]["epsilon"] == pytest.approx(expected, abs=1e-6)
        ledger = privacy.Ledger(tmp_path / "ledgers", site_train(first, k), first.privacy, f"site-{k}")
        assert ledger.epsilon() == pytest.approx(expected, abs=1e-6)


# resnet18's per-sample gradients under Opacus: tests/test_resnet.py (a federation of it takes 30 s here).
@pytest.mark.parametrize("model", ["fusion", "mlp"])
def test_models_train_two_rounds_under_dp(federation, quick_data, tmp_path, model):
    cfg = dp_config(quick_data, tmp_path, model=model, **{"privacy.epsilon": None, "privacy.noise_multiplier": 1.0,
                                                          "privacy.unit": "patient" if model == "mlp" else "patch",
                                                          "data.patch_size": 32})
    metrics = federation(tmp_path / "run", cfg)
    assert len(metrics["rounds"]) == 2 and "stopped" not in metrics
    for site in ("site-0", "site-1"):
        spent = metrics["privacy"]["sites"][site]
        assert 0 < spent["epsilon"] < math.inf and spent["round"] == 2
    assert math.isfinite(metrics["final"]["macro_auc"])


def test_patient_unit_groups_each_patients_samples_and_samples_patients():
    cases = np.array(["b", "a", "b", "c", "a", "b"])
    samples = Samples(np.zeros((6, 8, 8, 3), np.uint8), np.zeros((6, 2), np.float32), np.zeros(6, np.int64), cases)
    groups = privacy.units(samples, "patient")
    assert sorted(sorted(cases[g].tolist()) for g in groups) == [["a", "a"], ["b", "b", "b"], ["c"]]
    assert sorted(np.concatenate(groups).tolist()) == list(range(6))
    assert [g.tolist() for g in privacy.units(samples, "patch")] == [[i] for i in range(6)]


def test_patient_unit_clips_a_whole_patient_as_one(monkeypatch):
    """With unit patient, each clipped row is one patient's summed gradient: as many rows as patients drawn."""
    cases = np.repeat(np.array(["a", "b", "c"]), 4)
    samples = Samples(np.random.default_rng(0).integers(0, 255, (12, 16, 16, 3), np.uint8),
                      np.zeros((12, 2), np.float32), np.arange(12) % 3, cases)
    cfg = apply_overrides(load(ROOT / "configs/quickstart.yaml"), {
        "model.name": "cnn", "privacy.mode": "local", "privacy.unit": "patient", "privacy.epsilon": None,
        "privacy.noise_multiplier": 0.0, "privacy.patches_per_patient": 3, "train.batch_size": 9})
    plan = privacy.plan(cfg, samples)
    assert plan.sample_rate == 1.0 and plan.expected_units == 3  # 9 / 3 patients a step, of 3
    rows = []
    original = privacy.DPOptimizer.clip_and_accumulate

    def spy(self):
        rows.append({p.grad_sample.shape[0] for p in self.params})
        return original(self)

    monkeypatch.setattr(privacy.DPOptimizer, "clip_and_accumulate", spy)
    model = build_model(cfg.model, 2, 3)
    before = [p.detach().clone() for p in model.parameters()]
    privacy.train_dp(model, samples, dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=2)), 3, 0,
                     dataclasses.replace(plan, steps=2))
    assert rows == [{3}, {3}]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_batchnorm_and_xgboost_are_refused_under_local_dp():
    cfg = load(ROOT / "configs/quickstart.yaml")
    with pytest.raises(ConfigError, match="model.resnet_norm / model.cnn_norm: group"):
        apply_overrides(cfg, {"privacy.mode": "local", "model.name": "resnet18", "model.resnet_norm": "batch"})
    with pytest.raises(ConfigError, match="XGBoost"):
        apply_overrides(cfg, {"privacy.mode": "local", "model.name": "xgboost", "federation.strategy": "xgb_bagging"})
    with pytest.raises(ConfigError, match="exactly one"):
        apply_overrides(cfg, {"privacy.mode": "local", "privacy.noise_multiplier": 1.0})
    with pytest.raises(ValueError, match="BatchNorm"):
        privacy.check_module(build_model(ModelConfig(name="resnet18", resnet_norm="batch"), 4, 3))


def test_a_ledger_refuses_what_it_cannot_add_and_keeps_a_broken_file(tmp_path):
    samples = Samples(np.zeros((4, 8, 8, 3), np.uint8), np.zeros((4, 2), np.float32), np.zeros(4, np.int64),
                      np.array(["a", "a", "b", "b"]))
    ledger = privacy.Ledger(tmp_path, samples, PrivacyConfig(mode="local"), "site-0")
    eps = ledger.spend((1.0, 0.5, 3), "run-1", 1)
    assert eps == pytest.approx(opacus_epsilon(1.0, 0.5, 3, 1e-5), abs=1e-9)
    reopened = privacy.Ledger(tmp_path, samples, PrivacyConfig(mode="local"), "site-0")  # a restarted site
    assert reopened.epsilon() == eps
    with pytest.raises(ValueError, match="delta"):
        privacy.Ledger(tmp_path, samples, PrivacyConfig(mode="local", delta=1e-6), "site-0")
    restained = Samples(samples.images + 1, samples.ehr, samples.labels, samples.cases)  # the same patients
    assert privacy.Ledger(tmp_path, restained, PrivacyConfig(mode="local"), "site-0").epsilon() == eps
    others = Samples(samples.images, samples.ehr, samples.labels, np.array(["c", "c", "d", "d"]))
    assert privacy.Ledger(tmp_path, others, PrivacyConfig(mode="local"), "site-0").epsilon() == 0.0  # their own
    their_ehr = Samples(samples.images, samples.ehr + 1, samples.labels, samples.cases)  # other records
    assert privacy.Ledger(tmp_path, their_ehr, PrivacyConfig(mode="local"), "site-0").epsilon() == 0.0
    assert main(["privacy", "reset", str(tmp_path)]) == 2 and ledger.path.is_file()  # not without --yes
    assert main(["privacy", "reset", str(tmp_path), "--yes"]) == 0 and not ledger.path.exists()
    assert privacy.Ledger(tmp_path, samples, PrivacyConfig(mode="local"), "site-0").epsilon() == 0.0
    assert len(list(tmp_path.glob("reset-*-ledger-*.json"))) == 1  # the old ledger is kept for the record
    ledger.path.write_text("{ not json")
    with pytest.raises(ValueError, match=str(ledger.path.name)):
        privacy.Ledger(tmp_path, samples, PrivacyConfig(mode="local"), "site-0")
    assert ledger.path.read_text() == "{ not json"


def test_group_privacy_bound():
    assert privacy.patient_bound(1.0, 1e-5, 1) == (1.0, 1e-5)
    eps, delta = privacy.patient_bound(1.0, 1e-5, 3)
    assert eps == 3.0 and delta == pytest.approx(3 * math.exp(2) * 1e-5)
    assert privacy.patient_bound(8.0, 1e-5, 500)[1] == math.inf


def central_config(quick_data, tmp_path, **changes):
    return dp_config(quick_data, tmp_path, **{"privacy.mode": "central", **changes})


def test_central_dp_reports_flowers_accountant_and_meets_its_target(federation, quick_data, tmp_path):
    cfg = central_config(quick_data, tmp_path, **{"privacy.epsilon": 8.0})
    metrics = federation(tmp_path / "run", cfg)
    central = metrics["privacy"]["central"]
    sigma = central_noise(8.0, 1e-5, 2)
    accountant = central_accountant(1e-5, 2, None)
    accountant.compose(GaussianPrivacyEvent(noise_multiplier=sigma, sample_size=2, population_size=2), 2)
    assert central["releases"] == 2 and central["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    assert 7.9 < central["epsilon"] <= 8.0  # the noise is the least that meets the target
    assert [r["privacy"]["releases"] for r in metrics["rounds"]] == [1, 2]


@pytest.mark.parametrize("clipping", ["server", "client"])
def test_central_dp_clips_each_sites_update(federation, quick_data, tmp_path, clipping):
    cfg = central_config(quick_data, tmp_path, **{"privacy.epsilon": None, "privacy.noise_multiplier": 0.5,
                                                  "privacy.clipping": clipping, "privacy.clip_norm": 1e-4})
    federation(tmp_path / "run", cfg)
    torch.manual_seed(cfg.seed)
    start = build_model(cfg.model, len(FEATURES), 3).state_dict()
    final = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    moved = math.sqrt(sum(float(((final[k] - start[k]) ** 2).sum()) for k in learner.trained_names(cfg)))
    # Each round moves the model by at most the clipping norm plus the noise (0.5 * 1e-4 / 2 per weight):
    # ~0.01 in all; one unclipped round of Adam moves it by several units.
    assert moved < 0.05


def test_central_dp_stops_before_a_release_past_its_budget(federation, quick_data, tmp_path):
    accountant = central_accountant(1e-5, 2, None)
    accountant.compose(GaussianPrivacyEvent(noise_multiplier=2.0, sample_size=2, population_size=2), 1)
    one = accountant.get_epsilon(1e-5)
    cfg = central_config(quick_data, tmp_path, rounds=3, **{"privacy.epsilon": None, "privacy.noise_multiplier": 2.0,
                                                            "privacy.budget": one * 1.2})
    metrics = federation(tmp_path / "run", cfg)
    assert metrics["stopped"].startswith("central privacy budget")
    assert metrics["privacy"]["central"]["releases"] == 1 and metrics["privacy"]["central"]["epsilon"] <= one * 1.2
    assert (tmp_path / "run" / "model.pt").is_file() and metrics["final"]["round"] == 1


def test_central_dp_refuses_what_its_accountant_does_not_cover():
    cfg = load(ROOT / "configs/quickstart.yaml")
    with pytest.raises(ConfigError, match="FedAvg"):
        apply_overrides(cfg, {"privacy.mode": "central", "federation.strategy": "fedadam"})
    with pytest.raises(ConfigError, match="fraction_train"):
        apply_overrides(cfg, {"privacy.mode": "central", "federation.fraction_train": 0.5})
    with pytest.raises(ConfigError, match="needs noise"):
        apply_overrides(cfg, {"privacy.mode": "central", "privacy.epsilon": math.inf})


def test_membership_attack_auc_sees_memorisation_and_only_that():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 400)

    def probs(p_true):  # probability p_true on the true class, the rest spread evenly
        out = np.full((len(p_true), 3), 0.0)
        out[:] = ((1 - p_true) / 2)[:, None]
        out[np.arange(len(p_true)), labels[: len(p_true)]] = p_true
        return out

    same = membership_auc(probs(rng.uniform(0.3, 0.9, 400)), labels, probs(rng.uniform(0.3, 0.9, 400)), labels)
    remembered = membership_auc(probs(rng.uniform(0.8, 0.99, 400)), labels, probs(rng.uniform(0.3, 0.9, 400)), labels)
    assert abs(same - 0.5) < 0.07 and remembered > 0.85


def test_audit_split_holds_out_whole_units_at_random():
    cases = np.repeat(np.array([f"p{i}" for i in range(10)]), 6)
    samples = Samples(np.zeros((60, 4, 4, 3), np.uint8), np.zeros((60, 2), np.float32), np.zeros(60, np.int64), cases)
    members, others = privacy.audit_split(samples, 0.5, 0, "patch")
    assert len(members) + len(others) == 60 and 15 < len(others) < 45
    assert set(members.cases) & set(others.cases)  # patch unit: the same patients on both sides
    members, others = privacy.audit_split(samples, 0.5, 0, "patient")
    assert not set(members.cases) & set(others.cases) and len(others) % 6 == 0
    again = privacy.audit_split(samples, 0.5, 0, "patient")[1]
    assert np.array_equal(again.cases, others.cases)  # the sweep finds the same non-members as the sites


@pytest.mark.slow
def test_privacy_sweep_quick_writes_table_plot_and_attack_aucs(quick_data, tmp_path):
    cfg = absolute_paths(apply_overrides(load(ROOT / "configs/quickstart.yaml"), {
        "data.root": str(quick_data), "data.sites": 2, "train.steps": 2, "federation.rounds": 2}))
    table = run_sweep(cfg, [2.0, math.inf], [0], tmp_path / "sweep", "inprocess", echo=lambda line: None)
    text = table.read_text()
    assert "| 2 |" in text and "∞ (no DP)" in text
    rows = [line.split(",") for line in (tmp_path / "sweep" / "privacy_sweep.csv").read_text().splitlines()[1:]]
    assert [r[0] for r in rows] == ["2", "inf"]
    for target, _, spent, macro, _focus, attack, bound in rows:
        assert float(spent) <= 2.0 if target == "2" else math.isinf(float(spent))
        assert float(bound) <= float(spent)  # what the canaries prove never passes what the accountant allows
        run_dir = tmp_path / "sweep" / f"eps-{target}-seed-0"
        assert float(macro) == json.loads((run_dir / "metrics.json").read_text())["final"]["macro_auc"]
        point = load(run_dir / "config.yaml")  # the attack again, on the saved model: each site's own audit split
        weights, attacks = learner.load(point, run_dir), []
        for k in range(2):
            train, _ = load_site(quick_data / f"site-{k}", point.data, k, task_of(point))
            members, others = privacy.audit_split(train, point.privacy.audit_fraction, k, point.privacy.unit)
            site = audited(point, k, train)  # the canaries come out of the members: the attack's members are the rest
            assert len(site.members) + len(site.canaries) == len(members) and len(site.others) == len(others)
            attacks.append(membership_auc(learner.predict(point, weights, site.members)[0], site.members.labels,
                                          learner.predict(point, weights, others)[0], others.labels))
        assert float(attack) == pytest.approx(np.mean(attacks), abs=1e-9) and point.privacy.audit_fraction > 0
        assert point.privacy.canaries == 100
    png = tmp_path / "sweep" / "privacy_sweep.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert sorted(p.name for p in (tmp_path / "sweep" / "ledgers").iterdir()) == ["eps-2-seed-0"]


def test_central_dp_voids_a_round_with_a_failed_reply_and_goes_on(federation, quick_data, tmp_path, monkeypatch):
    import client.app

    calls = []
    real = client.app.learner.local_update

    def first_call_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(client.app.learner, "local_update", first_call_fails)
    cfg = central_config(quick_data, tmp_path, **{"privacy.epsilon": None, "privacy.noise_multiplier": 1.0,
                                                  "federation.min_sites": 1})
    metrics = federation(tmp_path / "run", cfg)
    first, second = metrics["rounds"]
    assert "no release" in first["voided"] and "disk full" in next(iter(first["failed"].values()))
    assert "privacy" not in first and second["privacy"]["releases"] == 1
    assert metrics["privacy"]["central"]["releases"] == 1 and "stopped" not in metrics


@pytest.mark.parametrize("name", ["cnn", "fusion"])
def test_dp_sgd_clips_each_samples_own_gradient(name):
    """Opacus' per-sample gradients on the batches train_dp builds (flipped, rotated) equal one backward per
    sample: on the loader's strided views they silently came out wrong, and so did every clipped update."""
    from opacus import GradSampleModule

    train = dataclasses.replace(load(ROOT / "configs/quickstart.yaml").train, flips=True)
    rng = np.random.default_rng(0)
    samples = Samples(rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8),
                      rng.normal(size=(6, len(FEATURES))).astype(np.float32), np.array([0, 1, 2, 0, 1, 2]),
                      np.array(list("abcdef")))
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name), len(FEATURES), 3).train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # the same function for the batch and for each sample

    def loss(logits, labels):
        return torch.nn.functional.cross_entropy(logits, labels, reduction="none").sum()

    def flat(grads):
        return torch.cat([g.flatten() for g in grads])

    for seed in range(4):  # rotations by 0-270 degrees, flipped or not
        images, ehr, labels = privacy.dp_batch(samples, np.arange(6), train, torch.Generator().manual_seed(seed))
        own = []
        for i in range(6):
            model.zero_grad()
            model.loss(images[i : i + 1], ehr[i : i + 1], labels[i : i + 1], loss).backward()
            own.append(flat(p.grad for p in model.parameters()))
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        gsm._module.loss(images, ehr, labels, loss).backward()
        per_sample = torch.stack([flat(p.grad_sample[i] for p in model.parameters()) for i in range(6)])
        gsm.remove_hooks()
        for p in model.parameters():
            p.grad_sample = None
        torch.testing.assert_close(per_sample, torch.stack(own), atol=1e-5, rtol=1e-4)
