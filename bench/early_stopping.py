"""ASHA versus no early stopping (FIFO) over several searcher seeds: epochs, time, best val_acc.

Per seed, both searches run the same space and number of trials: epochs trained, trial time
summed (the parent run's `trial_seconds`), wall time and best validation accuracy found, with
the ratios.

    python bench/early_stopping.py --data ../shared/mvsa [--space spaces/fusion.yaml] [--num-samples N]
        [--searcher random] [--seeds 0,1,2]

For each searcher seed (default 0, 1 and 2) an ASHA search and a FIFO search run as many trials as
the space file asks for (40 for the default space); the table gives each pair's ratios and their
mean.

`--searcher random` replaces the space's searcher (TPE) by seeded random search: both searches
then train the very same configurations, so the comparison isolates the scheduler. Its table
goes to bench/results/early_stopping_random.md, with a replay of Ray's ASHA rule (successive
halving against the 1 - 1/rf percentile of each rung's earlier results) over the FIFO search's
recorded learning curves, taken in the order the ASHA search's trials reached epoch 1, for other
reduction factors. The replay at the space's own factor must give the epochs ASHA really trained
(it is printed beside them): a check that the replay follows Ray's rule.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import yaml  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from bench.common import run_search, table, write_result  # noqa: E402
from search.space import load_space  # noqa: E402
from search.tracking import child_runs  # noqa: E402


def recorded_trials(client: MlflowClient, parent: str) -> dict[tuple, tuple[int, list[float]]]:
    """Each trial of a search, keyed by its params: (when it reported epoch 1, its val_acc per epoch)."""
    out = {}
    for child in child_runs(client, client.get_run(parent).info.experiment_id, parent):
        history = sorted(client.get_metric_history(child.info.run_id, "val_acc"), key=lambda m: m.step)
        if history:
            out[tuple(sorted(child.data.params.items()))] = (history[0].timestamp, [m.value for m in history])
    return out


def replay_asha(curves: list[list[float]], grace: int, rf: int, max_t: int) -> tuple[int, float]:
    """(epochs trained, best val_acc seen) if ASHA decided as Ray's ASHAScheduler does on these
    learning curves in this order (each curve as long as the trial ran without a scheduler)."""
    rungs, milestone = [], grace
    while milestone < max_t:
        rungs.append(milestone)
        milestone *= rf
    recorded: dict[int, list[float]] = {r: [] for r in rungs}
    total, best = 0, float("-inf")
    for curve in curves:
        epochs = len(curve)
        for r in rungs:
            if r > len(curve):
                break
            score = max(curve[:r])  # trials report best_val_acc so far
            cutoff = np.nanpercentile(recorded[r], 100 * (1 - 1 / rf)) if recorded[r] else None
            recorded[r].append(score)
            if cutoff is not None and score < cutoff:
                epochs = r
                break
        total += epochs
        best = max(best, max(curve[:epochs]))
    return total, best


def replay_table(client: MlflowClient, asha_parent: str, fifo_parent: str, spec, asha_epochs: int) -> str:
    asha, fifo = recorded_trials(client, asha_parent), recorded_trials(client, fifo_parent)
    shared = sorted((k for k in asha if k in fifo), key=lambda k: asha[k][0])
    if len(shared) != len(fifo):
        return f"(replay skipped: only {len(shared)} of {len(fifo)} configurations appear in both searches)"
    curves = [fifo[k][1] for k in shared]
    fifo_epochs = sum(len(c) for c in curves)
    grace, max_t, own = spec.grace_period, spec.cv_folds, spec.reduction_factor  # ASHA rungs are folds
    rows = []
    for rf in sorted({2, 3, 4, 5, 6, 8, 10, own}):
        epochs, best = replay_asha(curves, grace, rf, max_t)
        note = f"measured: {asha_epochs}" if rf == own else ""
        rows.append([f"{rf}", epochs, f"{epochs / fifo_epochs:.2f}", f"{best:.4f}", note])
    return ("Replay of ASHA's rule on the FIFO search's learning curves, in the order the ASHA search's trials "
            f"reached epoch 1 (grace period {grace}, max {max_t} epochs; FIFO trained {fifo_epochs}). "
            "Not measured runs: a stricter cut frees workers sooner, which shifts the order a little.\n\n"
            + table(["reduction factor", "epochs (replay)", "of FIFO's", "best val_acc seen", "the real ASHA search"],
                    rows))


def run_pair(args, base_space: dict, seed: int, tmp: Path, uri: str) -> dict:
    """The ASHA and the FIFO search of one searcher seed: epochs, wall seconds, best val_acc, its F1."""
    outcome = {}
    for scheduler in ("asha", "fifo"):
        space = copy.deepcopy(base_space)
        space["seed"] = seed
        space.setdefault("scheduler", {})["type"] = scheduler
        if args.searcher:
            space.setdefault("searcher", {})["type"] = args.searcher
        path = tmp / f"{scheduler}-seed{seed}.yaml"
        path.write_text(yaml.safe_dump(space))
        print(f"seed {seed}: running the {scheduler} search ({args.num_samples} trials)...", flush=True)
        parent, wall, _ = run_search(path, uri, tmp / "ray", "--data", args.data, "--num-samples",
                                     str(args.num_samples), "--experiment", f"bench-{scheduler}-seed{seed}")
        client = MlflowClient(uri)
        m = client.get_run(parent).data.metrics
        outcome[scheduler] = dict(epochs=int(m["epochs_trained"]), wall=wall, best=m["best_val_acc"],
                                  trial_s=m["trial_seconds"],
                                  f1=m.get("best_trial_val_macro_f1", float("nan")), parent=parent, space=path)
        print(f"seed {seed}: {scheduler} trained {outcome[scheduler]['epochs']} epochs in {wall / 60:.1f} min, "
              f"best val_acc {outcome[scheduler]['best']:.4f}", flush=True)
    return outcome


def pairs_summary(pairs: dict[int, dict]) -> str:
    """Per seed and on average: ASHA's epochs, wall time and best val_acc against FIFO's, and whether
    the target holds (mean epoch ratio at most 0.40, best within 1 point of FIFO's in every seed)."""
    rows, ratios, time_ratios, wall_ratios, gaps = [], [], [], [], []
    for seed, o in pairs.items():
        a, f = o["asha"], o["fifo"]
        ratios.append(a["epochs"] / f["epochs"])
        time_ratios.append(a["trial_s"] / f["trial_s"])
        wall_ratios.append(a["wall"] / f["wall"])
        gaps.append(a["best"] - f["best"])
        rows.append([f"{seed}", f"{a['epochs']} / {f['epochs']}", f"{ratios[-1]:.2f}",
                     f"{a['trial_s'] / 60:.1f} / {f['trial_s'] / 60:.1f}", f"{time_ratios[-1]:.2f}",
                     f"{a['wall'] / 60:.1f} / {f['wall'] / 60:.1f}", f"{wall_ratios[-1]:.2f}",
                     f"{a['best']:.4f} / {f['best']:.4f}", f"{gaps[-1]:+.4f}", f"{a['f1']:.4f} / {f['f1']:.4f}"])
    if len(pairs) > 1:
        rows.append([f"mean of {len(pairs)}", "", f"{np.mean(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f})",
                     "", f"{np.mean(time_ratios):.2f}", "", f"{np.mean(wall_ratios):.2f}", "",
                     f"{np.mean(gaps):+.4f} (worst {min(gaps):+.4f})", ""])
    met = np.mean(ratios) <= 0.40 and min(gaps) >= -0.01
    return (table(["seed", "epochs ASHA / FIFO", "epoch ratio", "trial min ASHA / FIFO", "trial-time ratio",
                   "wall min ASHA / FIFO", "wall ratio", "best val_acc ASHA / FIFO", "difference",
                   "its val macro-F1 ASHA / FIFO"], rows)
            + f"\n\nTarget: ASHA trains at most 40 % of FIFO's epochs (mean over seeds: {np.mean(ratios):.0%}) "
            f"and finds a best val_acc within 1 point of FIFO's in every seed (worst: {100 * min(gaps):+.2f} "
            f"points): {'met' if met else 'not met'}.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--space", default="spaces/fusion.yaml")
    p.add_argument("--num-samples", type=int, help="trials per search (default: the space file's num_samples)")
    p.add_argument("--searcher", choices=("tpe", "random"), help="override the space's searcher type")
    p.add_argument("--seeds", default="0,1,2",
                   help="searcher seeds, comma-separated; each runs one ASHA and one FIFO search (default 0,1,2)")
    args = p.parse_args()
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")

    base_space = yaml.safe_load(Path(args.space).read_text())
    if args.num_samples is None:
        args.num_samples = int(base_space.get("num_samples", 20))
    tmp = Path(tempfile.mkdtemp(prefix="mmsa-bench-es-"))
    uri = f"sqlite:///{tmp}/mlflow.db"
    print(f"MLflow record of these searches: {uri}", flush=True)
    pairs = {seed: run_pair(args, base_space, seed, tmp, uri) for seed in seeds}

    searcher = args.searcher or base_space.get("searcher", {}).get("type", "tpe")
    body = (f"Space `{args.space}`, searcher {searcher}, {args.num_samples} trials per search; for each searcher "
            "seed one ASHA and one FIFO (no early stopping) search. Trial minutes are the trials' run times "
            "summed (the compute they took); wall time includes Ray start-up (the feature cache already built). "
            "Two trials run at once, so a TPE search's proposals depend on which results arrive first: the "
            "same seed can vary from run to run, hence several seeds.\n\n" + pairs_summary(pairs))
    if args.searcher == "random":
        client = MlflowClient(uri)
        for seed, o in pairs.items():
            a, f = o["asha"], o["fifo"]
            body += (f"\n\nSeed {seed}. "
                     + replay_table(client, a["parent"], f["parent"], load_space(a["space"]), a["epochs"]))
    name = "early_stopping_random" if args.searcher == "random" else "early_stopping"
    write_result(name, f"Early stopping: ASHA vs FIFO ({searcher} search)", body,
                 "python bench/early_stopping.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
