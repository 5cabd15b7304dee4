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
from mmsa.app.run_tags import TAG_BEST_RUN, TAG_ENDED, TAG_TRIAL
from search.tracking import child_runs, log_metrics


@dataclass
class TrialRecord:
    run_id: str
    trial_id: str
    ended: str
    folds: int  # folds trained (of the space's cv_folds)
    epochs: int  # epochs trained, all folds together
    best_epoch: int  # the epoch whose mean over folds is best: what mmsa.final retrains
    score: float
    metrics: dict
    params: dict
    seconds: float = 0.0  # its MLflow run's start to end: the compute it took


def collect_trials(client: MlflowClient, experiment_id: str, parent_run_id: str, metric: str) -> list[TrialRecord]:
    out = []
    for run in child_runs(client, experiment_id, parent_run_id):
        ended = run.data.tags.get(TAG_ENDED, "running")
        score = run.data.metrics.get(f"best_{metric}", float("nan"))
        m = run.data.metrics
        out.append(TrialRecord(run_id=run.info.run_id, trial_id=run.data.tags.get(TAG_TRIAL, "?"), ended=ended,
                               folds=int(m.get("folds_done", 0)), epochs=int(m.get("epochs_trained", 0)),
                               best_epoch=int(m.get("best_epoch", 0)), score=score,
                               metrics=dict(run.data.metrics), params=dict(run.data.params),
                               seconds=(run.info.end_time - run.info.start_time) / 1000 if run.info.end_time else 0.0))
    return out


def best_trial(trials: list[TrialRecord]) -> TrialRecord | None:
    """The best trial scored on every fold; only where none was, the best of those stopped early
    (a mean over fewer folds is noisier, and would win by luck)."""
    scored = [t for t in trials if not math.isnan(t.score)]
    for ended in ("completed", "stopped early"):
        candidates = [t for t in scored if t.ended == ended]
        if candidates:
            return max(candidates, key=lambda t: t.score)
    return None


def config_from_params(params: dict) -> dict:
    """A run's logged params back to a typed flat config (unknown keys are dropped)."""
    known = Config.known_keys()
    return Config.from_flat({k: v for k, v in params.items() if k in known}, source="run params").to_flat()


def top_table(trials: list[TrialRecord], metric: str, searched: list[str], k: int = 10) -> str:
    # Trials scored on every fold first: their means are the comparable ones.
    ranked = sorted((t for t in trials if not math.isnan(t.score)),
                    key=lambda t: (t.ended == "completed", t.score), reverse=True)[:k]
    other = "val_macro_f1" if metric == "val_acc" else "val_acc"
    head = ["rank", "trial", "ended", "folds", "epoch", f"cv_{metric}", f"{other} (same epoch)"] + searched
    rows = [head]
    for i, t in enumerate(ranked, 1):
        rows.append([str(i), t.trial_id, t.ended, str(t.folds), str(t.best_epoch), f"{t.score:.4f}",
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
    study = optuna.create_study(direction="maximize")
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
    best = best_trial(trials)
    counts = {"n_trials": len(trials)}
    for ended in ("completed", "stopped early", "failed", "interrupted"):
        counts["n_" + ended.replace(" ", "_")] = sum(t.ended == ended for t in trials)
    ran = [t for t in trials if t.ended != "interrupted"]
    counts["epochs_trained"] = sum(t.epochs for t in ran)
    counts["folds_trained"] = sum(t.folds for t in ran)
    counts["folds_without_early_stopping"] = spec.cv_folds * len(ran)
    # A space may search the schedule's length: each trial's own.
    counts["epochs_without_early_stopping"] = spec.cv_folds * sum(
        int(float(t.params.get("max_epochs", spec.max_epochs))) for t in ran)
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
                "best_trial_val_macro_f1": best.metrics.get("val_macro_f1", float("nan")),
                "best_trial_val_acc": best.metrics.get("val_acc", float("nan")),
                "best_trial_epoch": best.best_epoch, "best_trial_folds": best.folds}, step=0)
        for path in search_plots(trials, spec, tmp):
            client.log_artifact(parent_run_id, str(path), artifact_path="plots")
    return best, trials


def cost_line(client: MlflowClient, parent_run_id: str) -> str:
    """What the search cost, from its parent run's metrics: folds and epochs against every trial
    running every fold, and the trials' run times summed."""
    m = client.get_run(parent_run_id).data.metrics
    folds, all_folds = int(m.get("folds_trained", 0)), int(m.get("folds_without_early_stopping", 0))
    trained, full = int(m.get("epochs_trained", 0)), int(m.get("epochs_without_early_stopping", 0))
    share = f" ({trained / full:.0%})" if full else ""
    return (f"cost: {folds} folds ({trained} epochs) trained, of {all_folds} ({full}) if every trial ran every "
            f"fold{share}; trials ran {m.get('trial_seconds', 0) / 60:.1f} min in all")


def baseline_line(client: MlflowClient, parent_run_id: str, metric: str) -> str:
    """The linear probe on the same folds, against the best trial: the yardstick of every search."""
    m = client.get_run(parent_run_id).data.metrics
    if "probe_val_acc" not in m:
        return "baseline: linear probe not measured (a search recorded before every search measured it)"
    line = (f"baseline: linear probe on the same folds: val_acc {m['probe_val_acc']:.4f}, "
            f"val_macro_f1 {m['probe_val_macro_f1']:.4f}")
    best = m.get(f"best_{metric}")
    probe = m.get(f"probe_{metric}")
    if best is not None and probe is not None:
        line += f"; best trial {best - probe:+.4f} {metric} against it"
    return line
