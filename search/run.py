"""`python -m search.run --space FILE`: the hyper-parameter search.

Flow: validate the space file (before Ray) -> load the dataset and build the feature cache once
-> cut the cross-validation folds -> MLflow parent run, with the linear probe's score on those
folds -> Ray Tune (Optuna TPE + ASHA over folds) over the trainable -> pick the best trial, log
best_config.yaml, metrics and plots on the parent -> ensemble selection over the out-of-fold
predictions of the trials and the probe (plan.json: what mmsa.final retrains). Last line:
`parent_run_id=<id>`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import TYPE_CHECKING

from mmsa.app.commands import quiet_libraries, run_main

if TYPE_CHECKING:
    from search.ensemble import Ensemble
    from search.record import SearchRecord, TrialRecord
    from search.search_data import SearchData
    from search.setup import Search

RAY_STORAGE = os.path.join(os.path.expanduser("~"), "ray_results")  # Ray Tune's own default


def _gpus(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a share of a GPU (e.g. 0.5) or auto") from None


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m search.run", description=__doc__.splitlines()[0])
    p.add_argument("--space", required=True, help="search-space YAML file (see spaces/fusion.yaml)")
    p.add_argument("--data", help="dataset folder (default: data_dir of the space file)")
    p.add_argument("--num-samples", type=int, help="number of trials (default: from the space file)")
    p.add_argument("--max-epochs", type=int, help="epochs per trial at most (default: from the space file)")
    p.add_argument("--address", help="Ray cluster to join, from one of its nodes: auto, or HOST:PORT of the head "
                   "(default: start a local one; under `ray job submit`, the job's cluster)")
    p.add_argument("--resume", action="store_true", help="continue the newest unfinished search of this space file")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                   "else sqlite:///mlruns/mlflow.db)")
    p.add_argument("--experiment", default=None, help="MLflow experiment name (default: $MLFLOW_EXPERIMENT_NAME, "
                   "else mmsa-search)")
    p.add_argument("--time-budget", metavar="DURATION",
                   help="the search's wall time once its features exist, e.g. 20m or 1h30m: no trial starts after it, "
                        "trials in flight end with the epoch they are in, scored on the folds they finished (default: "
                        "time_budget of the space file, else no limit; a resumed search keeps what its budget had left)")
    p.add_argument("--memory-budget", help="keep the whole search under this much memory, e.g. 12GB "
                   "(default: memory_budget of the space file, else no limit)")
    p.add_argument("--storage", default=RAY_STORAGE, help="folder or URI (s3://, gs://, file:///...) for Ray's "
                   f"search state (default: {RAY_STORAGE}, as Ray Tune's)")
    p.add_argument("--cpus-per-trial", type=float,
                   help="CPUs each trial reserves (default: resources.cpu of the space)")
    p.add_argument("--gpus-per-trial", type=_gpus, metavar="SHARE",
                   help="GPU each trial reserves, e.g. 0.5 to share one between two trials, or auto: as many trials "
                        "per GPU as its memory holds (default: resources.gpu of the space)")
    p.add_argument("--gpu-memory", metavar="SIZE", help="plan the trials' GPU memory for a card of this size: 16GB "
                   "(as sold: planned at what torch sees of such a card), 14.7GiB (as torch reports it), or a card's "
                   "name, e.g. T4 (default: this machine's GPU, where it has one)")
    p.add_argument("--warm-start", action="append", default=[], metavar="RUN_ID",
                   help="an earlier search's parent run id (repeatable; also warm_start: in the space file): its "
                        "finished trials tell the searcher where they lie in this space, and enter the ensemble "
                        "where they were scored on the same labeled pairs and folds; none is trained again")
    p.add_argument("--dry-run", action="store_true", help="print the plan (GPU memory per trial, micro-batch, trials "
                   "per GPU: a line starting `plan:`) and stop: no data read, no trial, nothing recorded")
    p.add_argument("--max-concurrent", type=int, help="trials running at once at most (default: from the space)")
    p.add_argument("--seed", type=int, help="the searcher's seed (default: from the space)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="fix a config key for every trial, e.g. --set head=mlp (a searched key is then not "
                        "searched; repeatable)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    args = parse_args(argv)
    from search.setup import plan_gpu, plan_memory, resolve
    if args.dry_run:  # the GPU memory of its trials planned and printed: no data, no Ray, nothing recorded
        from search.gpu_memory import choose_for_space
        search = resolve(args, dry_run=True)
        print(choose_for_space(search.spec, search.card).line(), flush=True)
        return 0
    t0 = time.time()
    try:
        search = plan_gpu(resolve(args))  # starts Ray once the space and flags are checked
        from search.search_data import prepare_data
        data = prepare_data(search)
        ready = time.time()  # the time budget counts from here
        search = plan_memory(search, data)
        record = open_record(search, data)
        probe = measure_probe(search, data, record) if search.resumed is None else record.probe_scores()
        from search.driver import run_tuner
        interrupted = run_tuner(search, data, record, ready)
    finally:
        if "ray" in sys.modules:  # stops a local Ray; only disconnects from a cluster
            sys.modules["ray"].shutdown()
    if interrupted:
        return report_interrupted(search, record)
    ended = time.time()
    trials, best = summarize(search, record, ended - t0, probe)
    candidates = trials + (data.warm.candidates if data.warm is not None else [])
    ensemble = select(search, record, candidates, len(trials), probe)
    from search.report import time_line
    print(time_line(ready - t0, ended - ready, time.time() - ended, bool(search.spec.time_budget)), flush=True)
    return report_best(search, record, best, candidates, len(trials), ensemble)


def open_record(search: Search, data: SearchData) -> SearchRecord:
    """The search's record: new, with its params, datasets, space file, data report and warm start;
    or the one --resume continues."""
    from search.record import SearchRecord
    if search.resumed is not None:
        record = SearchRecord.resume(search.store, search.resumed)
        print(f"resuming search {record.parent_id} from {record.ray_path}", flush=True)
        return record
    spec, base, prepared = search.spec, search.base, data.prepared
    record = SearchRecord.create(search.store, f"search-{os.path.splitext(os.path.basename(search.space_file))[0]}",
                                 search.space_key, data.fingerprint, search.storage)
    record.log_start({
        "space_file": search.space_file, "num_samples": spec.num_samples, "max_epochs": spec.max_epochs,
        "seed": spec.seed, "searcher": spec.searcher, "scheduler": spec.scheduler,
        "metric": spec.metric, "max_concurrent": spec.max_concurrent, "data_dir": base.data.data_dir,
        "cv_folds": spec.cv_folds, "split_seed": base.data.split_seed,
        "n_labeled": len(prepared.train), "n_test": len(prepared.test),
        "ray_results_path": record.ray_path, "address": search.address or "local", "time_budget": spec.time_budget,
        "warm_start": ",".join(r.info.run_id for r in search.warm_runs)},
        base.data.data_dir, data.datasets, spec.path, prepared.dataset.report.as_dict())
    if data.warm is not None:
        record.log_warm_start(data.warm.record, len(data.warm.sampler), len(data.warm.candidates))
    return record


def measure_probe(search: Search, data: SearchData, record: SearchRecord) -> dict[str, float]:
    """The yardstick of every search: the linear probe on the same folds, on the frozen backbones'
    features; recorded with its out-of-fold predictions (a candidate of the ensemble)."""
    from mmsa.models.probe import probe_cv
    from mmsa.training import oof
    from search.trial_report import scalar_metrics
    features, lexicon = data.prepared.features, search.base.model.lexicon
    measured = probe_cv(features, data.folds, keep_probs=True, lexicon=lexicon)
    predictions, probe = oof.oof_arrays(data.folds, measured["probe_fold_probs"]), scalar_metrics(measured)
    probe["probe_params"] = 3 * (features.text_dim + features.image_dim + 4 * lexicon + 1)
    record.log_probe(probe, predictions)
    print(f"baseline: linear probe{' with lexicon scores' if lexicon else ''}, {data.how}: "
          f"val_acc {probe['probe_val_acc']:.4f}, val_macro_f1 {probe['probe_val_macro_f1']:.4f}", flush=True)
    return probe


def summarize(search: Search, record: SearchRecord, seconds: float,
              probe: dict[str, float]) -> tuple[list[TrialRecord], TrialRecord | None]:
    """The trials as recorded, the best of them, the counts, best_config.yaml and the plots on the
    parent run; the top trials, the probe, the cost, the storage and the budget printed."""
    import tempfile
    from pathlib import Path

    from search.checkpoints import storage_line
    from search.report import (baseline_line, best_config, best_metrics, best_trial, budget_line, cost_line,
                               search_plots, summary, top_table)
    spec = search.spec
    trials = record.trials(spec.metric)
    best = best_trial(trials)
    counts = summary(trials, spec)
    record.log_metrics(counts)
    if best is not None:
        record.log_best(best, best_config(best), best_metrics(best, spec.metric))
    with tempfile.TemporaryDirectory() as tmp:
        record.log_plots(search_plots(trials, spec, Path(tmp)))
    print(f"\ntop trials ({len(trials)} recorded, {seconds:.0f}s):", flush=True)
    print(top_table(trials, spec.metric, list(spec.params)), flush=True)
    print(baseline_line(probe, best, spec.metric), flush=True)
    print(cost_line(counts), flush=True)
    print(storage_line(record.ray_path), flush=True)
    if spec.time_budget:
        print(budget_line(record.budget, trials), flush=True)
    return trials, best


def select(search: Search, record: SearchRecord, candidates: list[TrialRecord], own: int,
           probe: dict[str, float]) -> Ensemble | None:
    """Ensemble selection over the candidates (this search's `own` trials, then the warm start's) and the probe."""
    from search.ensemble import select_ensemble
    spec = search.spec
    if len(candidates) > own:
        print(f"reused: {len(candidates) - own} trial(s) of earlier searches are candidates of the ensemble, beside "
              f"this search's {own}; none was trained again", flush=True)
    ensemble = select_ensemble(candidates, search.store.predictions, record.probe_predictions(), spec.metric,
                               spec.max_members, spec.max_params, probe_params=int(probe.get("probe_params", 0)))
    if ensemble is not None:
        record.log_metrics(ensemble.metrics())
        print(ensemble.line(), flush=True)
        if ensemble.skipped:
            print(f"note: trial(s) {', '.join(ensemble.skipped)} ran every fold but left no out-of-fold predictions "
                  f"on these folds (recorded by an earlier version?): not candidates", flush=True)
    return ensemble


def report_best(search: Search, record: SearchRecord, best: TrialRecord | None, candidates: list[TrialRecord],
                own: int, ensemble: Ensemble | None) -> int:
    """The plan written, the search finished, the chosen trial and what to run next; last line
    `parent_run_id=<id>`."""
    from mmsa.models.probe import probe_config
    from search.ensemble import make_plan
    spec, parent_id = search.spec, record.parent_id
    plan = make_plan(parent_id, spec.metric, ensemble, best, candidates, probe_config(search.base))
    if plan is not None:
        record.log_plan(plan)
    record.end("finished")
    trials = candidates[:own]  # this search's own
    if best is None:
        if trials and spec.time_budget and not any(t.ended == "failed" for t in trials):
            print(f"no trial finished a fold within the time budget ({len(trials)} stopped on the way): give it more "
                  f"time (--time-budget) or shorter folds (--max-epochs)", flush=True)
        else:
            print("no trial produced a score; see the failed runs in MLflow", flush=True)
    else:
        print(f"best: trial {best.trial_id}, cv_{spec.metric} {best.score:.4f} over {best.folds} fold(s) at epoch "
              f"{best.best_epoch} (run {best.run_id}); best_config.yaml logged on the parent run", flush=True)
        store = f" --tracking-uri {search.tracking_flag}" if search.tracking_flag else ""
        print(f"next: python -m mmsa.final --run-id {parent_id}" + (f" --data {search.data_flag}" if search.data_flag
              else "") + store + "   (retrain the ensemble on all labeled pairs, predict the test set)", flush=True)
    print(f"parent_run_id={parent_id}", flush=True)
    return 0 if best is not None else 1


def report_interrupted(search: Search, record: SearchRecord) -> int:
    """How to continue an interrupted search; last line `parent_run_id=<id>`."""
    from search.checkpoints import storage_line
    print(storage_line(record.ray_path), flush=True)
    record.end("interrupted")
    print(f"search interrupted; state saved. Continue it with: python -m search.run --space {search.space_file} "
          f"--resume" + (f" --data {search.data_flag}" if search.data_flag else ""), flush=True)
    print(f"parent_run_id={record.parent_id}", flush=True)
    return 130


def cli() -> None:
    """The console script's entry point."""
    run_main(main)


if __name__ == "__main__":
    cli()
