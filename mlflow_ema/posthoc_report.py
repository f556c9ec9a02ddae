"""What ``mlflow-ema posthoc`` logs to its run: the curve ``sigma_rel -> score`` as metrics
(``<metric>/sigma_rel_<value>``) and a chart (``posthoc.png``), the choice
(``chosen_sigma_rel``) and every reconstruction's coefficients (``posthoc.json``, the
command's ``--json`` output)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow_ema.posthoc import PosthocResult
    from mlflow_ema.posthoc_options import PosthocOptions


def log_curve(options: PosthocOptions, result: PosthocResult, folder: Path) -> None:
    """Log to the active run; ``folder`` is a scratch folder for the files."""
    import mlflow

    metrics = {
        f"{options.metric}/sigma_rel_{plan.sigma_rel}": plan.score
        for plan in result.reconstructions
        if plan.score is not None
    }
    if result.chosen is not None:
        metrics["chosen_sigma_rel"] = result.chosen.sigma_rel
    mlflow.log_metrics(metrics)
    report = folder / "posthoc.json"
    report.write_text(json.dumps([plan.as_dict() for plan in result.reconstructions], indent=1))
    mlflow.log_artifact(str(report))
    if any(plan.score is not None for plan in result.reconstructions):
        mlflow.log_artifact(str(_chart(options, result, folder / "posthoc.png")))


def _chart(options: PosthocOptions, result: PosthocResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = sorted((p.sigma_rel, p.score) for p in result.reconstructions if p.score is not None)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([s for s, _ in scored], [v for _, v in scored], marker="o", color="#4a6fa5")
    if result.chosen is not None and result.chosen.score is not None:
        ax.plot([result.chosen.sigma_rel], [result.chosen.score], marker="*", markersize=14, color="#c0392b",
                linestyle="none", label=f"chosen: sigma_rel {result.chosen.sigma_rel:g}")  # fmt: skip
        ax.legend(loc="best", fontsize=8)
    tracked = sorted({s.sigma_rel for p in result.reconstructions for s, _ in p.coefficients})
    ax.axvspan(tracked[0], tracked[-1], color="#dddddd", alpha=0.5, zorder=0)  # where the snapshots are exact
    ax.set_xlabel("sigma_rel (EMA length)")
    ax.set_ylabel(options.metric)
    ax.set_title(f"post-hoc EMA at step {result.reconstructions[0].step} (grey: tracked range)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
