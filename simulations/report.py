"""``runs/<run>/report.html``: one self-contained page (images embedded) for a finished run.

Built from what the run left (``config.yaml``, ``metrics.json``, the model) and,
where the server has a central test set, from predictions on it: ROC curves,
Grad-CAM montages and SHAP plots need rows, which only the server's own test
set provides (the sites keep theirs). Every section either shows its plot or
says why it does not apply to this run. ``fedfuse report RUN_DIR`` rebuilds it.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np

from shared.config import classes_of, eval_data_path, load, task_of
from shared.errors import DataFormatError
from shared.metrics import focus_class
from shared.mimic import FEATURES
from simulations.runs import write_safely

# What a report reads from metrics.json, and its type (the rest is optional).
REQUIRED = {"name": str, "model": str, "task": str, "classes": list, "sites": list, "rounds": list, "pairing": str,
            "final": dict | None}
MONTAGE = 6  # patches per row (correct / wrong) in a class's Grad-CAM montage


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _plt().close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _curves(metrics: dict, focus: str) -> str:
    """Macro AUC, the focus class's AUC and the loss per round: central, and each site."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    rounds = metrics["rounds"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (title, get) in zip(axes, [("macro AUC", lambda m: m["macro_auc"]),
                                       (f"{focus} AUC", lambda m: m["auc"][focus]),
                                       ("loss", lambda m: m["loss"])]):
        for source in ("central", "federated"):
            pts = [(r["round"], get(r[source])) for r in rounds if r.get(source)]
            if pts:
                ax.plot(*zip(*pts), "o-", lw=2, label=source)
        for site in sorted({s for r in rounds for s in r.get("sites", {})}):
            pts = [(r["round"], get(r["sites"][site])) for r in rounds if site in r.get("sites", {})]
            ax.plot(*zip(*pts), ".--", alpha=0.6, label=site)
        ax.set(title=title, xlabel="round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _png(fig)


def _confusion(final: dict, classes: tuple[str, ...]) -> str:
    plt = _plt()
    cm = np.asarray(final["confusion"], float)
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ax.imshow(cm, cmap="Blues")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{cm[i, j]:.0f}", ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes, yticklabels=classes,
           xlabel="predicted", ylabel="true", title=f"confusion ({final['source']})")
    return _png(fig)


def _site_matrix(metrics: dict, classes: tuple[str, ...]) -> str | None:
    """The final global model on every test split it was scored on: rows splits, columns AUCs."""
    last = next((r for r in reversed(metrics["rounds"]) if r.get("sites") or r.get("central")), None)
    if last is None:
        return None
    rows = {**{s: m for s, m in sorted(last.get("sites", {}).items())},
            **({"central test set": last["central"]} if last.get("central") else {})}
    cols = ["macro_auc", *classes]
    values = np.array([[m["macro_auc"], *[m["auc"][c] for c in classes]] for m in rows.values()], float)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.4 * len(cols) + 2, 0.5 * len(rows) + 1.5))
    ax.imshow(values, cmap="viridis", vmin=0.5, vmax=1.0)
    for i in range(len(rows)):
        for j in range(len(cols)):
            ax.text(j, i, f"{values[i, j]:.3f}", ha="center", va="center", color="black")
    ax.set(xticks=range(len(cols)), yticks=range(len(rows)), xticklabels=[c.replace("_", " ") for c in cols],
           yticklabels=list(rows), title=f"global model of round {last['round']}, tested on each split")
    return _png(fig)


def _epsilon(metrics: dict) -> str | None:
    rounds = [r for r in metrics["rounds"] if r.get("privacy")]
    if not rounds:
        return None
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    if metrics.get("privacy", {}).get("mode") == "central":
        ax.plot([r["round"] for r in rounds], [r["privacy"]["epsilon"] for r in rounds], "o-", label="central")
    else:
        for site in sorted({s for r in rounds for s in r["privacy"]}):
            pts = [(r["round"], r["privacy"][site]["epsilon"]) for r in rounds if site in r["privacy"]]
            ax.plot(*zip(*pts), "o-", label=site)
    ax.set(xlabel="round", ylabel="cumulative epsilon", title="privacy spent")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def _roc(labels: np.ndarray, probs: np.ndarray, classes: tuple[str, ...]) -> str:
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    for k, c in enumerate(classes):
        y = labels == k
        if y.any() and (~y).any():
            fpr, tpr, _ = roc_curve(y, probs[:, k])
            ax.plot(fpr, tpr, label=f"{c} (AUC {roc_auc_score(y, probs[:, k]):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC, central test set (one vs rest)")
    ax.legend(fontsize=8)
    return _png(fig)


def _montages(cfg, weights, data, probs) -> dict[str, str]:
    """Per class: Grad-CAM for that class over correctly and wrongly classified patches of it."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    from shared import explain, learner

    plt = _plt()
    net = learner.network(cfg, weights).eval()
    predicted = probs.argmax(1)
    out = {}
    for k, c in enumerate(classes_of(cfg)):
        groups = {"correct": np.flatnonzero((data.labels == k) & (predicted == k))[:MONTAGE],
                  "wrong": np.flatnonzero((data.labels == k) & (predicted != k))[:MONTAGE]}
        fig, axes = plt.subplots(2, MONTAGE, figsize=(1.6 * MONTAGE, 3.6))
        for row, (kind, idx) in enumerate(groups.items()):
            maps = explain.gradcam(net, data.images[idx], data.ehr[idx], [k] * len(idx)) if len(idx) else []
            for col in range(MONTAGE):
                ax = axes[row, col]
                ax.axis("off")
                if col < len(idx):
                    ax.imshow(show_cam_on_image(data.images[idx[col]] / 255.0, maps[col], use_rgb=True))
                    ax.set_title(f"{kind}: {classes_of(cfg)[predicted[idx[col]]]}", fontsize=7)
        fig.suptitle(f"Grad-CAM for '{c}' on true {c} patches (title: predicted class)", fontsize=9)
        out[c] = _png(fig)
    return out


def _shap_plots(cfg, weights, data) -> dict[str, str]:
    import shap

    from shared import explain

    plt = _plt()
    rows = explain.explained_rows(data, cfg.report.shap_rows or 200, cfg.seed)
    values = explain.ehr_shap(cfg, weights, rows)
    shown = np.where(np.isnan(rows.ehr), np.nanmean(rows.ehr, 0), rows.ehr)
    out = {}
    for kind in ("dot", "bar"):
        shap.summary_plot(values, shown, feature_names=list(FEATURES), plot_type=kind, show=False, max_display=15)
        out[kind] = _png(plt.gcf())
    return out


def _federated_shap(cfg, run_dir: Path, metrics: dict) -> tuple[str, str]:
    """The federation's importances next to those of the same model trained on pooled data, and their rank correlation."""
    from simulations.pooled import importance_reference

    importance = metrics.get("importance") or {}
    title = "Federated SHAP (each site sends mean |SHAP| per feature and its row count)"
    if not importance:
        return title, ('<p class="na">not computed in this run (report.shap_rows: 0, a model without EHR input, '
                       'or secure aggregation)</p>')
    reference = importance_reference(cfg, run_dir, metrics)
    pooled = reference.get("mean_abs_shap", {})
    pooled_rank = {f: i + 1 for i, f in enumerate(pooled)}
    rows = "".join(f"<tr><td>{i + 1}</td><td>{html.escape(f)}</td><td>{v:.4f}</td>"
                   + (f"<td>{pooled[f]:.4f}</td><td>{pooled_rank[f]}</td>" if pooled else "") + "</tr>"
                   for i, (f, v) in enumerate(list(importance["mean_abs_shap"].items())[:10]))
    if pooled:
        compared = (f"<p>Against the same model trained on all sites' training data in one place (same initial "
                    f"weights, {reference['steps']} optimiser steps as the sites took in {reference['rounds']} "
                    f"rounds, no differential privacy), explained on the same rows: Spearman rank correlation "
                    f"<b>{reference['spearman']:.3f}</b> over {len(pooled)} features; "
                    f"{reference['top5_shared']} of the top 5 features shared.</p>")
        head = "<tr><th>rank</th><th>feature</th><th>federated</th><th>pooled</th><th>pooled rank</th></tr>"
    else:
        compared = f'<p class="na">No rank correlation with a pooled model: {html.escape(reference["why_not"])}.</p>'
        head = "<tr><th>rank</th><th>feature</th><th>federated</th></tr>"
    return title, (f"<p>{html.escape(importance['method'])}, class {html.escape(importance['class'])}; rows per "
                   f"site: {html.escape(json.dumps(importance['rows']))}.</p>{compared}<table>{head}{rows}</table>")


def read_metrics(run_dir: Path) -> dict:
    """``run_dir/metrics.json`` with what a report needs; anything else is one error naming the file and the keys."""
    path = Path(run_dir) / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file; expected a run folder written by `fedfuse simulate`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataFormatError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(metrics, dict):
        raise DataFormatError(f"{path}: expected a JSON object, got {type(metrics).__name__}")
    missing = [k for k in REQUIRED if k not in metrics]
    wrong = [k for k, kind in REQUIRED.items() if k in metrics and not isinstance(metrics[k], kind)]
    if not wrong and not missing and not all(isinstance(r, dict) and isinstance(r.get("round"), int)
                                             for r in metrics["rounds"]):
        wrong.append("rounds (each an object with its round number)")
    if missing or wrong:
        raise DataFormatError(f"{path}: " + "; ".join(
            ([f"missing key(s) {', '.join(missing)}"] if missing else [])
            + ([f"wrong type for {', '.join(wrong)}"] if wrong else []))
            + "; expected the metrics.json `fedfuse simulate` writes, with "
            + ", ".join(f"{k} ({getattr(t, '__name__', str(t))})" for k, t in REQUIRED.items()))
    return metrics


def build(run_dir: Path) -> Path:
    """Write ``run_dir/report.html`` from the run's outputs; returns its path."""
    from shared import learner
    from shared.data import load_folder
    from simulations.predict import load_model

    run_dir = Path(run_dir)
    cfg = load(run_dir / "config.yaml")
    metrics = read_metrics(run_dir)
    classes = tuple(metrics["classes"])
    focus = focus_class(classes)
    final = metrics.get("final") or {"source": "none"}
    sections: list[tuple[str, str]] = []

    def image(title: str, png: str | None, why_not: str) -> None:
        body = f'<img alt="{html.escape(title)}" src="data:image/png;base64,{png}">' if png else \
            f'<p class="na">{html.escape(why_not)}</p>'
        sections.append((title, body))

    image("Metrics per round", _curves(metrics, focus) if metrics["rounds"] else None, "no round completed")
    image("Confusion matrix", _confusion(final, classes) if final.get("confusion") else None,
          "no final evaluation (no central test set and no site evaluated)")
    image("Evaluation matrix", _site_matrix(metrics, classes), "no round was evaluated")
    image("Privacy: epsilon per round", _epsilon(metrics),
          "no privacy ledger: this run trained without differential privacy (privacy.mode: none)")

    holdout = eval_data_path(cfg)
    weights = load_model(cfg, run_dir) if (run_dir / "model.pt").is_file() or (run_dir / "model.json").is_file() \
        else None
    why = ("no central test set (server.eval_data: null): ROC curves, Grad-CAM and SHAP plots need rows, and the "
           "sites keep theirs") if holdout is None or not Path(holdout).is_dir() else "no final model in the run folder"
    if weights is not None and holdout is not None and Path(holdout).is_dir():
        data = load_folder(Path(holdout), cfg.data, cfg.seed, task_of(cfg), metrics.get("stain", {}).get("reference"))
        if cfg.federation.fedbn:  # Grad-CAM and SHAP too need BatchNorm statistics: this data's, as predict's
            weights = learner.adapt_bn(cfg, weights, data)
        probs, _ = learner.predict(cfg, weights, data, adapt=False)
        image("ROC curves", _roc(data.labels, probs, classes), "")
        if task_of(cfg) == "patch" and cfg.model.name != "mlp":
            for c, png in _montages(cfg, weights, data, probs).items():
                image(f"Grad-CAM: {c}", png, "")
        else:
            image("Grad-CAM", None, f"model {cfg.model.name} has no image input")
        if cfg.model.name in ("fusion", "late_fusion", "mlp", "xgboost"):
            plots = _shap_plots(cfg, weights, data)
            image(f"SHAP of the EHR features for {focus} (central test set)", plots["dot"], "")
            image("SHAP: mean |SHAP| per feature (central test set)", plots["bar"], "")
        else:
            image("SHAP", None, f"model {cfg.model.name} has no EHR input")
    else:
        for title in ("ROC curves", "Grad-CAM", "SHAP"):
            image(title, None, why)
    sections.append(_federated_shap(cfg, run_dir, metrics))
    ledger = metrics.get("privacy")
    sections.append(("Privacy ledger", f"<pre>{html.escape(json.dumps(ledger, indent=1))}</pre>" if ledger else
                     '<p class="na">no privacy ledger: privacy.mode none</p>'))
    summary = {k: final.get(k) for k in ("source", "round", "macro_auc", "accuracy", "auc", "ci95") if k in final}
    head = (f"<p>model <b>{html.escape(metrics['model'])}</b> ({html.escape(metrics['task'])} task), sites "
            f"{html.escape(', '.join(metrics['sites']))}; data {html.escape(str(metrics.get('data_root')))}, pairing "
            f"<b>{html.escape(metrics['pairing'])}</b>; pretrained: {html.escape(str(metrics.get('pretrained')))}</p>"
            + (f"<p><b>stopped:</b> {html.escape(metrics['stopped'])}</p>" if metrics.get("stopped") else ""))
    body = "".join(f"<section><h2>{html.escape(t)}</h2>{b}</section>" for t, b in sections)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fedfuse report: {html.escape(metrics['name'])}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}}img{{max-width:100%}}
.na{{color:#777;font-style:italic}}pre{{background:#f4f4f4;padding:.6em;overflow:auto;font-size:12px}}
td{{padding:2px 12px}}section{{border-top:1px solid #ddd;margin-top:1.2em}}</style></head><body>
<h1>fedfuse run: {html.escape(run_dir.name)}</h1>{head}
<h2>Final metrics</h2><pre>{html.escape(json.dumps(summary, indent=1))}</pre>
{body}
<section><h2>Configuration</h2><pre>{html.escape((run_dir / 'config.yaml').read_text())}</pre></section>
</body></html>
"""
    path = run_dir / "report.html"
    write_safely(path, lambda temporary: temporary.write_text(page))
    return path
