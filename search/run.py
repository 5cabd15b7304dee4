"""`python -m search.run --space FILE`: the hyper-parameter search.

Flow: validate the space file (before Ray) -> load the dataset and build the feature cache once
-> cut the cross-validation folds -> MLflow parent run, with the linear probe's score on those
folds -> Ray Tune (Optuna TPE + ASHA over folds) over the trainable -> pick the best trial, log
best_config.yaml, metrics and plots on the parent -> ensemble selection over the out-of-fold
predictions of the trials and the probe (ensemble.json, what mmsa.final retrains). Last line:
`parent_run_id=<id>`.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from mmsa.app.commands import quiet_libraries, run_main
from mmsa.errors import UserError

RAY_STORAGE = os.path.join(os.path.expanduser("~"), "ray_results")  # Ray Tune's own default


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
                   help="train for this long at most, e.g. 20m or 1h30m: no trial starts after it, trials in flight "
                        "end at their next fold, scored on the folds they finished (default: time_budget of the "
                        "space file, else no limit; a resumed search keeps what its budget had left)")
    p.add_argument("--memory-budget", help="keep the whole search under this much memory, e.g. 12GB "
                   "(default: memory_budget of the space file, else no limit)")
    p.add_argument("--storage", default=RAY_STORAGE, help="folder or URI (s3://, gs://, file:///...) for Ray's "
                   f"search state (default: {RAY_STORAGE}, as Ray Tune's)")
    p.add_argument("--cpus-per-trial", type=float,
                   help="CPUs each trial reserves (default: resources.cpu of the space)")
    p.add_argument("--gpus-per-trial", type=float, help="GPUs each trial reserves, e.g. 0.5 to share one between two "
                   "trials (default: resources.gpu of the space)")
    p.add_argument("--max-concurrent", type=int, help="trials running at once at most (default: from the space)")
    p.add_argument("--seed", type=int, help="the searcher's seed (default: from the space)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="fix a config key for every trial, e.g. --set head=mlp (a searched key is then not "
                        "searched; repeatable)")
    return p.parse_args(argv)


@dataclass
class Search:
    """A search resolved once, before any heavy work: flags over the space file, the job folder of
    a submitted search, the tracking store, and the search to resume if any. The base config
    (what every trial starts from) follows from `spec`, which the memory plan may still adjust."""

    args: argparse.Namespace
    spec: object  # search.space.SearchSpec
    job_dir: Path | None
    tracking_uri: str
    client: object  # MlflowClient
    experiment: str
    experiment_id: str
    space_key: str  # what --resume matches a search by
    resumed: object | None  # the parent run to continue
    how: str = ""  # how trials are scored, once the folds are cut
    text_dirs: dict = field(default_factory=dict)  # the other text caches trials read (TrialData.text_dirs)

    @property
    def base(self):
        return self.spec.base_config()


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    search = resolve(parse_args(argv))
    t0 = time.time()
    data, folds = prepare_data(search)
    plan_memory(search, data)
    from mmsa.app.records import fold_digests
    datasets = fold_digests(data.features, folds)
    parent_id, ray_path = open_parent_run(search, data, folds, datasets)
    from search.driver import run_tuner
    interrupted = run_tuner(search, data, folds, parent_id, ray_path, datasets)
    return report(search, parent_id, interrupted, time.time() - t0)


def resolve(args: argparse.Namespace) -> Search:
    """Every flag, the space file and the tracking store checked, each error one line."""
    if args.address and args.address.startswith("ray://"):
        # Under Ray Client the Tuner, the MLflow callback and the sqlite store would run on the head
        # node, not here: untested, so refused.
        raise UserError(f"--address {args.address}: Ray Client (ray://) is not supported; run the search on a "
                        "cluster node with --address auto")
    from search.job import job_working_dir
    job_dir = job_working_dir()
    if job_dir is not None and not args.address:
        args.address = "auto"  # submitted with `ray job submit`: the search runs on that cluster
    spec = _space_with_flags(args)
    from mmsa.app.run_tags import tracking_uri as resolve_tracking_uri
    if job_dir is not None:
        _keep_out_of_the_job_copy(job_dir, spec, resolve_tracking_uri(args.tracking_uri), args.storage)
    if args.address:
        from search.driver import check_cluster
        check_cluster(args.address)
    from mlflow.tracking import MlflowClient

    from mmsa.app.run_tags import experiment_name
    from search.job import inside
    from search.tracking import find_resumable_search, get_experiment_id, prepare_tracking_uri, unreachable
    # A tracking server that stops answering mid-search is waited out (search/tracking.py): each
    # attempt gives up after seconds, not MLflow's default minutes, so the search does not stall.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    tracking_uri = prepare_tracking_uri(resolve_tracking_uri(args.tracking_uri))
    client = MlflowClient(tracking_uri)
    experiment = experiment_name(args.experiment)
    try:
        experiment_id = get_experiment_id(client, experiment, tracking_uri)
    except Exception as e:
        if not unreachable(e):
            raise
        raise UserError(f"--tracking-uri {tracking_uri}: the tracking server does not answer") from None
    space_key = str(Path(args.space).resolve())
    if job_dir is not None and inside(Path(space_key), job_dir):  # the copy's folder differs from job to job
        space_key = f"ray-job:{Path(space_key).relative_to(job_dir)}"
    resumed = None
    if args.resume:
        resumed = find_resumable_search(client, experiment_id, space_key)
        if resumed is None:
            raise UserError(f"{args.space}: --resume found no unfinished search of this space file "
                            f"in experiment '{experiment}'")
    return Search(args, spec, job_dir, tracking_uri, client, experiment, experiment_id, space_key, resumed)


def _space_with_flags(args: argparse.Namespace):
    """The space file, every config error surfacing here, with the command line's flags over it."""
    from mmsa.config import parse_overrides
    from search.space import apply_flags, load_space
    spec = load_space(args.space)
    if args.data:
        spec.data_dir = args.data
    for flag, attr in (("--num-samples", "num_samples"), ("--max-epochs", "max_epochs")):
        value = getattr(args, attr)
        if value is not None:
            if value <= 0:
                raise UserError(f"{flag}: must be > 0")
            setattr(spec, attr, value)
    if args.time_budget is not None:
        from search.time_budget import parse_duration
        parse_duration(args.time_budget, "--time-budget")
        spec.time_budget = args.time_budget
    unsearched = apply_flags(spec, args.cpus_per_trial, args.gpus_per_trial, args.max_concurrent, args.seed,
                             parse_overrides(args.overrides))
    if unsearched:
        print(f"--set fixes {', '.join(unsearched)}: not searched in this run", flush=True)
    return spec


def _keep_out_of_the_job_copy(job_dir: Path, spec, tracking_uri: str, storage: str) -> None:
    """A submitted search: refuse records inside the job's temporary copy of its working dir, and
    keep a cache_dir that would land there in the node's own folder instead."""
    from search.job import check_job_locations, job_cache_dir
    from search.space import apply_flags
    from search.trainable import NODE_CACHE_ENV
    base = spec.base_config()
    check_job_locations(job_dir, tracking_uri, storage, base.data.data_dir)
    node_cache = job_cache_dir(job_dir, base.data.cache_dir, os.environ.get(NODE_CACHE_ENV))
    if node_cache:
        print(f"cache: {node_cache} (${NODE_CACHE_ENV} of this node), not the job's temporary copy", flush=True)
        apply_flags(spec, sets={"cache_dir": node_cache})


def prepare_data(search: Search):
    """The labeled pairs and their features (built or checked in a child process, so this driver
    never holds torch), and the folds every trial and the probe share."""
    from mmsa.features.prepare import cv_splits, prepare_in_subprocess
    from search.space import check_against_data
    spec, base, t0 = search.spec, search.base, time.time()
    full = base.data.finetune == "full"
    print(f"data: {base.data.data_dir}; " + ("finetune=full: no feature cache, trials read the files" if full
                                             else "preparing features (built once, then cached)"), flush=True)
    data = prepare_in_subprocess(base.data, val_fraction=0.0)  # every labeled pair comes back as `train`
    if not full:  # a space that searches fine-tuning: the hidden states entering the layers that train
        from search.trainable import text_variant
        for variant in spec.feature_configs()[1:]:
            print(f"data: caching the text features of finetune={variant.finetune} "
                  f"({variant.text_finetune_layers} text layers train)", flush=True)
            search.text_dirs[text_variant(variant)] = str(
                prepare_in_subprocess(variant, val_fraction=0.0).features.text_dir.resolve())
    if spec.cv_folds == 1 and base.data.val_fraction <= 0:
        raise UserError(f"{spec.path}: cv_folds: 1 holds out one validation split, and needs val_fraction > 0")
    folds = cv_splits(data.train, spec.cv_folds, base.data.split_seed, base.data.val_fraction)
    check_against_data(spec, min(len(tr) for tr, _ in folds))
    search.how = (f"{spec.cv_folds}-fold cross-validation" if spec.cv_folds > 1
                  else f"one held-out split of {len(folds[0][1])}")
    print(f"data: {len(data.train)} labeled pairs, trials scored by {search.how} (seed {base.data.split_seed}); "
          f"{'read' if full else 'features ready'} in {time.time() - t0:.1f}s; {data.dataset.report.summary()}",
          flush=True)
    return data, folds


def plan_memory(search: Search, data) -> None:
    """--memory-budget: concurrency and micro-batch chosen to fit, set on the space."""
    args, spec = search.args, search.spec
    budget_text = args.memory_budget or spec.memory_budget
    if not budget_text:
        return
    from search.budget import parse_size, plan_for_space
    from search.space import apply_flags
    if search.base.data.finetune == "full":
        raise UserError(f"{spec.path}: memory_budget plans cached-feature searches, not finetune=full")
    budget = parse_size(budget_text, "--memory-budget" if args.memory_budget else f"{spec.path}: memory_budget")
    more = sum(f.stat().st_size for d in search.text_dirs.values() for f in Path(d).iterdir())
    chosen = plan_for_space(spec, budget, data.features, search.base.data.max_text_len, more)
    spec.max_concurrent = chosen.concurrent
    if chosen.micro_batch:  # as if given as --set micro_batch=N
        apply_flags(spec, sets={"micro_batch": chosen.micro_batch})
    print(chosen.describe(budget), flush=True)


def open_parent_run(search: Search, data, folds, datasets: dict) -> tuple[str, str]:
    """The search's MLflow run, new (with its params, data report and the probe's score on the
    folds) or the one --resume continues: (its id, Ray's state path)."""
    from mmsa.app.records import context_tags, log_datasets
    from mmsa.app.run_tags import TAG_KIND, TAG_RAY_PATH, TAG_SPACE, TAG_STATE
    from search.tracking import log_params
    args, spec, base, client = search.args, search.spec, search.base, search.client
    if search.resumed is not None:
        parent_id = search.resumed.info.run_id
        ray_path = search.resumed.data.tags[TAG_RAY_PATH]
        client.set_tag(parent_id, TAG_STATE, "running")
        client.update_run(parent_id, status="RUNNING")
        print(f"resuming search {parent_id} from {ray_path}", flush=True)
        return parent_id, ray_path
    parent = client.create_run(search.experiment_id, run_name=f"search-{Path(args.space).stem}", tags=context_tags(
        {TAG_KIND: "search", TAG_SPACE: search.space_key, TAG_STATE: "running"}))
    parent_id = parent.info.run_id
    log_datasets(client, parent_id, base.data.data_dir, datasets)
    ray_path = os.path.join(os.path.abspath(args.storage) if "://" not in args.storage else args.storage,
                            f"search-{parent_id[:12]}")
    client.set_tag(parent_id, TAG_RAY_PATH, ray_path)
    log_params(client, parent_id, {
        "space_file": args.space, "num_samples": spec.num_samples, "max_epochs": spec.max_epochs,
        "seed": spec.seed, "searcher": spec.searcher, "scheduler": spec.scheduler,
        "metric": spec.metric, "max_concurrent": spec.max_concurrent, "data_dir": base.data.data_dir,
        "cv_folds": spec.cv_folds, "split_seed": base.data.split_seed,
        "n_labeled": len(data.train), "n_test": len(data.test),
        "ray_results_path": ray_path, "address": args.address or "local", "time_budget": spec.time_budget})
    client.log_artifact(parent_id, str(spec.path), artifact_path="space")
    client.log_dict(parent_id, data.dataset.report.as_dict(), "data_report.json")
    if base.data.finetune != "full":  # the yardstick: the linear probe on the same folds
        from mmsa.models.probe import probe_cv
        from search.tracking import log_metrics
        from mmsa.training import oof
        from search.ensemble import PROBE_OOF_ARTIFACT
        from search.tracking import log_bytes
        probe = probe_cv(data.features, folds, keep_probs=True, lexicon=base.model.lexicon)
        log_bytes(client, parent_id, oof.to_bytes(oof.oof_arrays(folds, probe.pop("probe_fold_probs"))),
                  PROBE_OOF_ARTIFACT)
        log_metrics(client, parent_id, probe, step=0)
        print(f"baseline: linear probe{' with lexicon scores' if base.model.lexicon else ''}, {search.how}: val_acc {probe['probe_val_acc']:.4f}, "
              f"val_macro_f1 {probe['probe_val_macro_f1']:.4f}", flush=True)
    return parent_id, ray_path


def report(search: Search, parent_id: str, interrupted: bool, seconds: float) -> int:
    """The end: how to continue an interrupted search, or the chosen trial, the top trials, the
    probe and the cost; last line `parent_run_id=<id>`."""
    from mmsa.app.run_tags import TAG_STATE
    from search.report import baseline_line, cost_line, finalize_parent, top_table
    args, spec, client = search.args, search.spec, search.client
    if interrupted:
        client.set_tag(parent_id, TAG_STATE, "interrupted")
        client.set_terminated(parent_id, status="KILLED")
        print(f"search interrupted; state saved. Continue it with: python -m search.run --space {args.space} "
              f"--resume" + (f" --data {args.data}" if args.data else ""), flush=True)
        print(f"parent_run_id={parent_id}", flush=True)
        return 130
    best, trials = finalize_parent(client, search.experiment_id, parent_id, spec)
    client.set_tag(parent_id, TAG_STATE, "finished")
    client.set_terminated(parent_id, status="FINISHED")
    print(f"\ntop trials ({len(trials)} recorded, {seconds:.0f}s):", flush=True)
    print(top_table(trials, spec.metric, list(spec.params)), flush=True)
    print(baseline_line(client, parent_id, spec.metric), flush=True)
    print(cost_line(client, parent_id), flush=True)
    if spec.time_budget:
        print(budget_line(client, parent_id, trials), flush=True)
    from search.ensemble import select_ensemble
    ensemble = select_ensemble(client, parent_id, trials, spec.metric)
    if ensemble is not None:
        print(ensemble.line(), flush=True)
        if ensemble.skipped:
            print(f"note: trial(s) {', '.join(ensemble.skipped)} ran every fold but left no out-of-fold predictions "
                  f"on these folds (recorded by an earlier version?): not candidates", flush=True)
    if best is None:
        print("no trial produced a score; see the failed runs in MLflow", flush=True)
    else:
        print(f"best: trial {best.trial_id}, cv_{spec.metric} {best.score:.4f} over {best.folds} fold(s) at epoch "
              f"{best.best_epoch} (run {best.run_id}); best_config.yaml logged on the parent run", flush=True)
        store = f" --tracking-uri {args.tracking_uri}" if args.tracking_uri else ""
        print(f"next: python -m mmsa.final --run-id {parent_id}" + (f" --data {args.data}" if args.data else "")
              + store + "   (retrain the ensemble on all labeled pairs, predict the test set)", flush=True)
    print(f"parent_run_id={parent_id}", flush=True)
    return 0 if best is not None else 1


def budget_line(client, parent_id: str, trials: list) -> str:
    """What the time budget covered: the trials (search.report.TrialRecord) it let start, and how
    they ended."""
    from search.time_budget import TimeBudget, describe
    from search.tracking import log_metrics
    budget = TimeBudget.live.get(parent_id)
    if budget is None:
        return "time budget: not used (the search ran no trial)"
    log_metrics(client, parent_id, {"time_budget_s": budget.seconds, "time_budget_left_s": max(budget.left, 0.0)}, 0)
    if budget.left > 0:
        return (f"time budget {describe(budget.seconds)}: {describe(budget.left)} left when the last of num_samples "
                f"trials ended")
    return (f"time budget {describe(budget.seconds)}: spent; {len(trials)} trials started within it, "
            f"{sum(t.ended == 'completed' for t in trials)} ran every fold (trials in flight when it ran out ended "
            f"at their next fold, scored on the folds they finished)")


def cli() -> None:
    """The console script's entry point."""
    run_main(main)


if __name__ == "__main__":
    cli()
