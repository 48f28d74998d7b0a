"""``fedfuse privacy-sweep``: what local DP costs in accuracy, and what it buys against an attack.

For each target epsilon and seed, the federation trains under local DP-SGD
(``privacy.mode: local``; ``inf`` is the non-private reference,
``privacy.mode: none``). The final model is then scored on the server's test
set (macro and mitosis AUC) and audited with a loss-threshold
membership-inference attack (Yeom et al., CSF 2018) at every site. Members
and non-members must come from one distribution: each site keeps a random
half of its training units (``privacy.audit_fraction``: patches, or patients
with ``unit: patient``) out of training, and those are the non-members; the
rest are the members. The attack guesses "member" for a low loss; its AUC is
0.5 when the model reveals nothing about who trained it. (The site's test
split would not do: it holds other patients, and patients differ.)

An audit with a known positive runs beside it (Steinke, Nasr and Jagielski,
NeurIPS 2023; ``shared/audit.py``): each site turns ``privacy.canaries``
training samples into canaries (a wrong label each), each trained on with
probability one half; after training, the auditor guesses "in" for the
quarter of all canaries with the lowest loss and "out" for the quarter with
the highest, and the right guesses give a 95 % lower bound on the epsilon
the training can have had. It must never exceed the accountant's epsilon.

Each sweep point keeps its sites' ledgers under ``<out>/ledgers/<point>``: the
points are separate hypothetical deployments, so their spending must not add
up, and the sites' real ledgers are left alone. A point whose run finished
is not trained again, so an interrupted sweep continues.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from shared import learner
from shared.audit import audited, epsilon_lower_bound, guess
from shared.config import Config, classes_of, task_of
from shared.data import concat, load_sites
from shared.metrics import focus_class, sample_losses
from simulations.flower import federate

AUDIT_FRACTION = 0.5  # of each site's training units, kept out of training as non-members (privacy.audit_fraction)
CANARIES = 100  # a site's canaries when the config sets none (privacy.canaries)


def membership_auc(member_probs: np.ndarray, member_labels: np.ndarray, other_probs: np.ndarray,
                   other_labels: np.ndarray) -> float:
    """AUC of the loss-threshold attack: a lower loss on a record is taken as evidence it was trained on."""
    scores = -np.concatenate([sample_losses(member_labels, member_probs), sample_losses(other_labels, other_probs)])
    is_member = np.concatenate([np.ones(len(member_labels)), np.zeros(len(other_labels))])
    return float(roc_auc_score(is_member, scores))


def _label(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"


def _point(cfg: Config, eps: float, seed: int, ledgers: Path) -> Config:
    audits = {"audit_fraction": cfg.privacy.audit_fraction or AUDIT_FRACTION,
              "canaries": cfg.privacy.canaries or CANARIES}
    if math.isinf(eps):
        privacy = dataclasses.replace(cfg.privacy, mode="none", **audits)
    else:
        privacy = dataclasses.replace(cfg.privacy, mode="local", epsilon=eps, noise_multiplier=None, budget=None,
                                      ledger_dir=str(ledgers.resolve()), **audits)
    return dataclasses.replace(cfg, seed=seed, privacy=privacy)


def _audits(cfg: Config, weights: dict) -> tuple[float, float]:
    """The attack's AUC averaged over the sites (each site audits its own members and non-members), and the
    canaries' epsilon lower bound over every site's canaries together."""
    aucs, pools, drawn = [], [], []
    for k, (train, _) in enumerate(load_sites(cfg.data, cfg.seed, task_of(cfg))):
        site = audited(cfg, k, train)
        aucs.append(membership_auc(learner.predict(cfg, weights, site.members)[0], site.members.labels,
                                   learner.predict(cfg, weights, site.others)[0], site.others.labels))
        pools.append(site.canaries.prefixed(f"site-{k}"))
        drawn.append(site.drawn)
    pool, drawn = concat(pools), np.concatenate(drawn)
    r, v = guess(sample_losses(pool.labels, learner.predict(cfg, weights, pool)[0]), drawn, len(pool) // 2)
    return float(np.mean(aucs)), epsilon_lower_bound(len(pool), r, v, cfg.privacy.delta)


def run_sweep(cfg: Config, epsilons: list[float], seeds: list[int], out: Path, engine: str = "simulation",
              echo=print) -> Path:
    """Train and audit every (epsilon, seed); write the table, CSV and plot; return the table's path."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for eps in epsilons:
        for seed in seeds:
            name = f"eps-{_label(eps)}-seed-{seed}"
            point = _point(cfg, eps, seed, out / "ledgers" / name)
            run_dir = out / name
            metrics_path = run_dir / "metrics.json"
            if not (metrics_path.is_file() and json.loads(metrics_path.read_text()).get("final")):
                federate(point, run_dir, engine)
            metrics = json.loads(metrics_path.read_text())
            final = metrics["final"]
            spent = [s["epsilon"] for s in metrics.get("privacy", {}).get("sites", {}).values()]
            row = {"target_epsilon": _label(eps), "seed": seed, "epsilon_spent": max(spent) if spent else math.inf,
                   "macro_auc": final.get("macro_auc", math.nan),
                   "focus_auc": final.get("auc", {}).get(focus_class(classes_of(cfg)), math.nan),
                   **dict(zip(("attack_auc", "audit_epsilon"), _audits(point, learner.load(point, run_dir))))}
            rows.append(row)
            echo(f"epsilon {row['target_epsilon']:>4} seed {seed}: spent {row['epsilon_spent']:.3g}, macro AUC "
                 f"{row['macro_auc']:.3f}, {focus_class(classes_of(cfg))} AUC {row['focus_auc']:.3f}, "
                 f"membership-attack AUC {row['attack_auc']:.3f}, canary audit: epsilon >= "
                 f"{row['audit_epsilon']:.2f}")
    return _write(cfg, epsilons, rows, out)


def _write(cfg: Config, epsilons: list[float], rows: list[dict], out: Path) -> Path:
    keys = [("macro_auc", "macro AUC"), ("focus_auc", f"{focus_class(classes_of(cfg))} AUC"),
            ("attack_auc", "attack AUC")]
    summary = []
    for eps in epsilons:
        group = [r for r in rows if r["target_epsilon"] == _label(eps)]
        summary.append({"target_epsilon": _label(eps), "seeds": len(group),
                        "epsilon_spent": float(np.max([r["epsilon_spent"] for r in group])),
                        **{k: (float(np.mean([r[k] for r in group])), float(np.std([r[k] for r in group])))
                           for k in [*(k for k, _ in keys), "audit_epsilon"]}})
    lines = ["| target epsilon | epsilon spent (max over sites) | " + " | ".join(t for _, t in keys)
             + " | canary audit: epsilon at least (95 %) |", "|---" * (3 + len(keys)) + "|"]
    for s in summary:
        label = "∞ (no DP)" if s["target_epsilon"] == "inf" else s["target_epsilon"]
        lines.append(f"| {label} | {s['epsilon_spent']:.3g} | "
                     + " | ".join(f"{s[k][0]:.3f} ± {s[k][1]:.3f}" for k, _ in keys)
                     + f" | {s['audit_epsilon'][0]:.2f} ± {s['audit_epsilon'][1]:.2f} |")
    note = (f"\nModel {cfg.model.name}, {cfg.data.sites} sites, {cfg.federation.rounds} rounds, privacy unit "
            f"{cfg.privacy.unit}, delta {cfg.privacy.delta:g}; mean ± std over seeds "
            f"{', '.join(str(r) for r in sorted({r['seed'] for r in rows}))}. Scores on the server's test set; "
            "attack AUC: loss-threshold membership inference, members = each site's training records, "
            f"non-members = a random {cfg.privacy.audit_fraction or AUDIT_FRACTION:.0%} of its training "
            f"{ {'patch': 'patches', 'patient': 'patients'}[cfg.privacy.unit]} kept out of training, "
            "averaged over sites (0.5: nothing revealed). Canary audit (Steinke, Nasr and Jagielski 2023): "
            f"{cfg.privacy.canaries or CANARIES} training samples a site relabelled wrongly, each trained on with "
            "probability 1/2; guesses on the quarter of lowest and the quarter of highest loss; the epsilon their "
            "right guesses prove at 95 % (never above the epsilon spent, if the accounting is right).\n")
    table = out / "privacy_sweep.md"
    table.write_text(f"# Privacy sweep: {cfg.name}\n\n" + "\n".join(lines) + "\n" + note)
    columns = ("target_epsilon", "seed", "epsilon_spent", "macro_auc", "focus_auc", "attack_auc", "audit_epsilon")
    csv = [",".join(columns)] + [",".join(str(r[k]) for k in columns) for r in rows]
    (out / "privacy_sweep.csv").write_text("\n".join(csv) + "\n")
    _plot(summary, keys, out / "privacy_sweep.png", cfg)
    return table


def _plot(summary: list[dict], keys: list[tuple[str, str]], path: Path, cfg: Config) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [float(s["target_epsilon"]) for s in summary if s["target_epsilon"] != "inf"]
    # The non-private point sits one decade right of the largest epsilon, labelled as such.
    x_inf = max(finite) * 10 if finite else 1.0
    xs = [x_inf if s["target_epsilon"] == "inf" else float(s["target_epsilon"]) for s in summary]
    labels = ["∞\n(no DP)" if s["target_epsilon"] == "inf" else s["target_epsilon"] for s in summary]
    fig, (ax, audit) = plt.subplots(1, 2, figsize=(10.4, 4.2), dpi=120, width_ratios=[3, 2])
    for (key, title), marker in zip(keys, "osD"):
        ax.errorbar(xs, [s[key][0] for s in summary], yerr=[s[key][1] for s in summary], marker=marker,
                    capsize=3, label=title)
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_xscale("log")
    ax.set_xticks(xs, labels)
    ax.minorticks_off()
    ax.set_xlabel(f"target epsilon per site (delta {cfg.privacy.delta:g}, unit {cfg.privacy.unit})")
    ax.set_ylabel("AUC")
    lowest = min(s[k][0] - s[k][1] for s in summary for k, _ in keys)
    ax.set_ylim(max(0.0, min(0.3, lowest - 0.05)), 1.0)
    ax.set_title(f"{cfg.model.name}: utility and membership-attack AUC")
    ax.legend(loc="best", fontsize=8)
    audit.errorbar(xs, [s["audit_epsilon"][0] for s in summary], yerr=[s["audit_epsilon"][1] for s in summary],
                   marker="o", capsize=3, color="tab:red", label="canary audit: epsilon at least (95 %)")
    audit.plot(finite, finite, color="grey", linestyle=":", linewidth=1, label="the accountant's epsilon")
    audit.set_xscale("log")
    audit.set_xticks(xs, labels)
    audit.minorticks_off()
    audit.set_xlabel("target epsilon per site")
    audit.set_ylabel("epsilon")
    audit.set_title("what the canaries prove")
    audit.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
