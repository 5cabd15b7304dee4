"""The end of a search: pick the best trial from the MLflow record, log it on the parent run,
print the table of the top trials, draw the search plots."""

from __future__ import annotations

import math
import warnings
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from mmsa.config import Config
from mmsa.final import peak_epoch
from mmsa.run_tags import TAG_BEST_RUN, TAG_ENDED, TAG_TRIAL
from search.tracking import child_runs, log_metrics


@dataclass
class TrialRecord:
    run_id: str
    trial_id: str
    ended: str
    epochs: int
    score: float
    metrics: dict
    params: dict
    seconds: float = 0.0  # its MLflow run's start to end: the compute it took


def collect_trials(client: MlflowClient, experiment_id: str, parent_run_id: str, metric: str) -> list[TrialRecord]:
    out = []
    for run in child_runs(client, experiment_id, parent_run_id):
        ended = run.data.tags.get(TAG_ENDED, "running")
        score = run.data.metrics.get(f"best_{metric}", float("nan"))
        out.append(TrialRecord(run_id=run.info.run_id, trial_id=run.data.tags.get(TAG_TRIAL, "?"), ended=ended,
                               epochs=int(run.data.metrics.get("epoch", 0)), score=score,
                               metrics=dict(run.data.metrics), params=dict(run.data.params),
                               seconds=(run.info.end_time - run.info.start_time) / 1000 if run.info.end_time else 0.0))
    return out


def best_trial(trials: list[TrialRecord], mode: str = "max") -> TrialRecord | None:
    scored = [t for t in trials if t.ended in ("completed", "stopped early") and not math.isnan(t.score)]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda t: t.score)


def config_from_params(params: dict) -> dict:
    """A run's logged params back to a typed flat config (unknown keys are dropped)."""
    known = Config.known_keys()
    return Config.from_flat({k: v for k, v in params.items() if k in known}, source="run params").to_flat()


def top_table(trials: list[TrialRecord], metric: str, searched: list[str], k: int = 10, mode: str = "max") -> str:
    ranked = sorted((t for t in trials if not math.isnan(t.score)), key=lambda t: t.score, reverse=mode == "max")[:k]
    other = "val_macro_f1" if metric == "val_acc" else "val_acc"
    head = ["rank", "trial", "ended", "epochs", f"best_{metric}", f"{other} (same epoch)"] + searched
    rows = [head]
    for i, t in enumerate(ranked, 1):
        rows.append([str(i), t.trial_id, t.ended, str(t.epochs), f"{t.score:.4f}",
                     f"{t.metrics.get(other + '_at_best', float('nan')):.4f}"] +
                    [_fmt(t.params.get(p, "")) for p in searched])
    widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows)


def _fmt(value: str) -> str:
    try:
        f = float(value)
    except ValueError:
        return value
    return value if f.is_integer() and "." not in value and "e" not in value else f"{f:.3g}"


def search_plots(trials: list[TrialRecord], spec, out_dir: Path) -> list[Path]:
    """Optimisation history and parameter importances, from the recorded trials (Optuna's plots)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.trial import TrialState, create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    dists = spec.optuna_space()
    study = optuna.create_study(direction="maximize" if spec.mode == "max" else "minimize")
    for t in sorted(trials, key=lambda t: t.trial_id):
        if math.isnan(t.score) or not all(k in t.params for k in dists):
            continue
        params = {k: _typed(t.params[k], d) for k, d in dists.items()}
        state = TrialState.COMPLETE if t.ended == "completed" else TrialState.PRUNED
        study.add_trial(create_trial(params=params, distributions=dists,
                                     value=t.score if state == TrialState.COMPLETE else None,
                                     intermediate_values={1: t.score}, state=state))
    paths = []
    completed = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if completed:
        optuna.visualization.matplotlib.plot_optimization_history(study)
        paths.append(out_dir / "optimization_history.png")
        plt.gcf().set_size_inches(8, 5)
        plt.tight_layout()
        plt.savefig(paths[-1], dpi=100)
        plt.close("all")
    if len(completed) >= 3 and len(dists) >= 2:
        try:
            optuna.visualization.matplotlib.plot_param_importances(study)
            paths.append(out_dir / "param_importances.png")
            plt.gcf().set_size_inches(8, 5)
            plt.tight_layout()
            plt.savefig(paths[-1], dpi=100)
        except (ValueError, RuntimeError):  # e.g. all scores equal
            pass
        plt.close("all")
    return paths


def _typed(value: str, dist):
    from optuna.distributions import CategoricalDistribution, IntDistribution
    if isinstance(dist, CategoricalDistribution):
        for choice in dist.choices:
            if str(choice) == value:
                return choice
        return value
    return int(float(value)) if isinstance(dist, IntDistribution) else float(value)


def finalize_parent(client: MlflowClient, experiment_id: str, parent_run_id: str, spec) -> tuple[TrialRecord | None, list[TrialRecord]]:
    trials = collect_trials(client, experiment_id, parent_run_id, spec.metric)
    best = best_trial(trials, spec.mode)
    counts = {"n_trials": len(trials)}
    for ended in ("completed", "stopped early", "failed", "interrupted"):
        counts["n_" + ended.replace(" ", "_")] = sum(t.ended == ended for t in trials)
    counts["epochs_trained"] = sum(t.epochs for t in trials if t.ended != "interrupted")
    counts["epochs_without_early_stopping"] = spec.max_epochs * sum(t.ended != "interrupted" for t in trials)
    counts["trial_seconds"] = sum(t.seconds for t in trials if t.ended != "interrupted")
    log_metrics(client, parent_run_id, counts, step=0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if best is not None:
            flat = config_from_params(best.params)
            (tmp / "best_config.yaml").write_text(yaml.safe_dump(flat, sort_keys=True))
            client.log_artifact(parent_run_id, str(tmp / "best_config.yaml"))
            client.set_tag(parent_run_id, TAG_BEST_RUN, best.run_id)
            log_metrics(client, parent_run_id, {
                f"best_{spec.metric}": best.score,
                "best_trial_val_macro_f1": _metric_at_best_epoch(client, best, spec.metric, "val_macro_f1"),
                "best_trial_val_acc": _metric_at_best_epoch(client, best, spec.metric, "val_acc"),
                "best_trial_epoch": peak_epoch(client, best.run_id, spec.metric)}, step=0)
        for path in search_plots(trials, spec, tmp):
            client.log_artifact(parent_run_id, str(path), artifact_path="plots")
    return best, trials


def cost_line(client: MlflowClient, parent_run_id: str) -> str:
    """What the search cost, from its parent run's metrics: epochs against every trial running to
    max_epochs, and the trials' run times summed."""
    m = client.get_run(parent_run_id).data.metrics
    trained, full = int(m.get("epochs_trained", 0)), int(m.get("epochs_without_early_stopping", 0))
    share = f" ({trained / full:.0%})" if full else ""
    return (f"cost: {trained} epochs trained, of {full} if every trial ran max_epochs{share}; "
            f"trials ran {m.get('trial_seconds', 0) / 60:.1f} min in all")


def _metric_at_best_epoch(client: MlflowClient, trial: TrialRecord, monitor: str, name: str) -> float:
    epoch = peak_epoch(client, trial.run_id, monitor)
    for m in client.get_metric_history(trial.run_id, name):
        if m.step == epoch:
            return float(m.value)
    return float("nan")
