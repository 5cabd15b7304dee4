"""The end of a search, from its typed trial records (search.record.TrialRecord): the best trial,
the table of the top trials, what the search cost, the search plots. Pure: search.run records
what these compute.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

from mmsa.training.plan import stored_config
from search.record import TrialRecord

ENDINGS = ("completed", "stopped early", "failed", "interrupted")


def best_trial(trials: list[TrialRecord]) -> TrialRecord | None:
    """The best trial scored on every fold; only where none was, the best of those stopped early
    (a mean over fewer folds is noisier, and would win by luck)."""
    scored = [t for t in trials if not math.isnan(t.score)]
    for ended in ("completed", "stopped early"):
        candidates = [t for t in scored if t.ended == ended]
        if candidates:
            return max(candidates, key=lambda t: t.score)
    return None


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


def summary(trials: list[TrialRecord], spec) -> dict[str, float]:
    """The search's counts: trials by how they ended, the folds and epochs trained against every
    trial running every fold, and the trials' run times summed."""
    counts = {"n_trials": len(trials)}
    for ended in ENDINGS:
        counts["n_" + ended.replace(" ", "_")] = sum(t.ended == ended for t in trials)
    ran = [t for t in trials if t.ended != "interrupted"]
    counts["epochs_trained"] = sum(t.epochs for t in ran)
    counts["folds_trained"] = sum(t.folds for t in ran)
    counts["folds_without_early_stopping"] = spec.cv_folds * len(ran)
    # A space may search the schedule's length: each trial's own.
    counts["epochs_without_early_stopping"] = spec.cv_folds * sum(
        int(float(t.params.get("max_epochs", spec.max_epochs))) for t in ran)
    counts["trial_seconds"] = sum(t.seconds for t in ran)
    return counts


def best_metrics(best: TrialRecord, metric: str) -> dict[str, float]:
    """The best trial's figures, as the search's own metrics."""
    return {f"best_{metric}": best.score,
            "best_trial_val_macro_f1": best.metrics.get("val_macro_f1", float("nan")),
            "best_trial_val_acc": best.metrics.get("val_acc", float("nan")),
            "best_trial_epoch": best.best_epoch, "best_trial_folds": best.folds}


def best_config(best: TrialRecord) -> dict:
    """The best trial's whole config (best_config.yaml)."""
    return stored_config(best.params, f"run {best.run_id} params").to_flat()


def cost_line(counts: dict[str, float]) -> str:
    """What the search cost (`summary`): folds and epochs against every trial running every fold,
    and the trials' run times summed."""
    folds, all_folds = int(counts["folds_trained"]), int(counts["folds_without_early_stopping"])
    trained, full = int(counts["epochs_trained"]), int(counts["epochs_without_early_stopping"])
    share = f" ({trained / full:.0%})" if full else ""
    return (f"cost: {folds} folds ({trained} epochs) trained, of {all_folds} ({full}) if every trial ran every "
            f"fold{share}; trials ran {counts['trial_seconds'] / 60:.1f} min in all")


def baseline_line(probe: dict[str, float], best: TrialRecord | None, metric: str) -> str:
    """The linear probe on the same folds, against the best trial: the yardstick of every search."""
    if "probe_val_acc" not in probe:
        return "baseline: linear probe not measured (a search recorded before every search measured it)"
    line = (f"baseline: linear probe on the same folds: val_acc {probe['probe_val_acc']:.4f}, "
            f"val_macro_f1 {probe['probe_val_macro_f1']:.4f}")
    if best is not None:
        line += f"; best trial {best.score - probe[f'probe_{metric}']:+.4f} {metric} against it"
    return line


def budget_line(budget: dict | None, trials: list[TrialRecord]) -> str:
    """What the time budget ({seconds, left} at the search's end) covered: the trials it let start,
    and how they ended."""
    from search.time_budget import describe
    if budget is None:
        return "time budget: not used (the search ran no trial)"
    seconds, left = budget["seconds"], budget["left"]
    if left > 0:
        return f"time budget {describe(seconds)}: {describe(left)} left when the last of num_samples trials ended"
    return (f"time budget {describe(seconds)}: spent; {len(trials)} trials started within it, "
            f"{sum(t.ended == 'completed' for t in trials)} ran every fold (trials in flight when it ran out ended "
            f"with the epoch they were in, scored on the folds they finished)")


def time_line(features_s: float, trials_s: float, after_s: float, budgeted: bool) -> str:
    """Where a search's wall time went: the start and the features, the probe and the trials (what
    a time budget bounds), the selection and the report."""
    part = " (the time budget's part)" if budgeted else ""
    return (f"time: start and features {features_s:.0f} s, then probe and trials {trials_s:.0f} s{part}, then "
            f"selection and report {after_s:.0f} s")
