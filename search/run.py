"""`python -m search.run --space FILE`: the hyper-parameter search.

Flow: validate the space file (before Ray) -> load the dataset and build the feature cache once
-> cut the cross-validation folds -> MLflow parent run, with the linear probe's score on those
folds -> Ray Tune (Optuna TPE + ASHA over folds) over the trainable -> pick the best trial, log
best_config.yaml, metrics and plots on the parent. Last line: `parent_run_id=<id>`.
"""

from __future__ import annotations

import argparse
import os
import time
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


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    args = parse_args(argv)
    if args.address and args.address.startswith("ray://"):
        # Under Ray Client the Tuner, the MLflow callback and the sqlite store would run on the head
        # node, not here: untested, so refused.
        raise UserError(f"--address {args.address}: Ray Client (ray://) is not supported; run the search on a "
                        "cluster node with --address auto")
    from search.job import check_job_locations, inside, job_cache_dir, job_working_dir
    job_dir = job_working_dir()
    if job_dir is not None and not args.address:
        args.address = "auto"  # submitted with `ray job submit`: the search runs on that cluster
    from search.space import check_against_data, load_space
    spec = load_space(args.space)  # every config error surfaces here, before any heavy work
    if args.data:
        spec.data_dir = args.data
    if args.num_samples is not None:
        if args.num_samples <= 0:
            raise UserError("--num-samples: must be > 0")
        spec.num_samples = args.num_samples
    if args.max_epochs is not None:
        if args.max_epochs <= 0:
            raise UserError("--max-epochs: must be > 0")
        spec.max_epochs = args.max_epochs
    from mmsa.config import parse_overrides
    from search.space import apply_flags
    unsearched = apply_flags(spec, args.cpus_per_trial, args.gpus_per_trial, args.max_concurrent, args.seed,
                             parse_overrides(args.overrides))
    if unsearched:
        print(f"--set fixes {', '.join(unsearched)}: not searched in this run", flush=True)
    base = spec.base_config()
    from mmsa.app.run_tags import tracking_uri as resolve_tracking_uri
    if job_dir is not None:
        check_job_locations(job_dir, resolve_tracking_uri(args.tracking_uri), args.storage, base.data.data_dir)
        from search.trainable import NODE_CACHE_ENV
        node_cache = job_cache_dir(job_dir, base.data.cache_dir, os.environ.get(NODE_CACHE_ENV))
        if node_cache:
            print(f"cache: {node_cache} (${NODE_CACHE_ENV} of this node), not the job's temporary copy", flush=True)
            apply_flags(spec, sets={"cache_dir": node_cache})
            base = spec.base_config()
    if args.address:
        from search.driver import check_cluster
        check_cluster(args.address)

    from mlflow.tracking import MlflowClient

    from mmsa.app.run_tags import TAG_KIND, TAG_RAY_PATH, TAG_SPACE, TAG_STATE, experiment_name
    from search.tracking import (find_resumable_search, get_experiment_id, log_params, prepare_tracking_uri,
                                 unreachable)
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
    parent = None
    if args.resume:
        parent = find_resumable_search(client, experiment_id, space_key)
        if parent is None:
            raise UserError(f"{args.space}: --resume found no unfinished search of this space file "
                            f"in experiment '{experiment}'")

    from mmsa.features.prepare import prepare_in_subprocess
    t0 = time.time()
    full = base.data.finetune == "full"
    print(f"data: {base.data.data_dir}; " + ("finetune=full: no feature cache, trials read the files" if full
                                             else "preparing features (built once, then cached)"), flush=True)
    # Cached features: built or checked in a child process, so this driver never holds torch.
    # Every labeled pair comes back as `train`; the folds cut it here, the same for every trial.
    data = prepare_in_subprocess(base.data, val_fraction=0.0)
    if spec.cv_folds == 1 and base.data.val_fraction <= 0:
        raise UserError(f"{spec.path}: cv_folds: 1 holds out one validation split, and needs val_fraction > 0")
    from mmsa.features.prepare import cv_splits
    folds = cv_splits(data.train, spec.cv_folds, base.data.split_seed, base.data.val_fraction)
    check_against_data(spec, min(len(tr) for tr, _ in folds))
    how = (f"{spec.cv_folds}-fold cross-validation" if spec.cv_folds > 1
           else f"one held-out split of {len(folds[0][1])}")
    print(f"data: {len(data.train)} labeled pairs, trials scored by {how} (seed {base.data.split_seed}); "
          f"{'read' if full else 'features ready'} in {time.time() - t0:.1f}s; {data.dataset.report.summary()}",
          flush=True)
    budget_text = args.memory_budget or spec.memory_budget
    if budget_text:
        from search.budget import parse_size, plan_for_space
        if full:
            raise UserError(f"{spec.path}: memory_budget plans cached-feature searches, not finetune=full")
        budget = parse_size(budget_text, "--memory-budget" if args.memory_budget else f"{spec.path}: memory_budget")
        chosen = plan_for_space(spec, budget, data.features, base.data.max_text_len)
        spec.max_concurrent = chosen.concurrent
        if chosen.micro_batch:  # as if given as --set micro_batch=N
            apply_flags(spec, sets={"micro_batch": chosen.micro_batch})
            base = spec.base_config()
        print(chosen.describe(budget), flush=True)

    from mmsa.app.records import context_tags, fold_digests, log_datasets
    datasets = fold_digests(data.features, folds)
    if parent is None:
        parent = client.create_run(experiment_id, run_name=f"search-{Path(args.space).stem}", tags=context_tags(
            {TAG_KIND: "search", TAG_SPACE: space_key, TAG_STATE: "running"}))
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
            "ray_results_path": ray_path, "address": args.address or "local"})
        client.log_artifact(parent_id, str(spec.path), artifact_path="space")
        client.log_dict(parent_id, data.dataset.report.as_dict(), "data_report.json")
        if not full:  # the yardstick: the linear probe on the same folds
            from mmsa.models.probe import probe_cv
            from search.tracking import log_metrics
            probe = probe_cv(data.features, folds)
            log_metrics(client, parent_id, probe, step=0)
            print(f"baseline: linear probe, {how}: val_acc {probe['probe_val_acc']:.4f}, "
                  f"val_macro_f1 {probe['probe_val_macro_f1']:.4f}", flush=True)
    else:
        parent_id = parent.info.run_id
        ray_path = parent.data.tags[TAG_RAY_PATH]
        client.set_tag(parent_id, TAG_STATE, "running")
        client.update_run(parent_id, status="RUNNING")
        print(f"resuming search {parent_id} from {ray_path}", flush=True)

    from search.driver import run_tuner
    interrupted = run_tuner(spec, base, data, folds, tracking_uri, experiment_id, parent_id, ray_path,
                            address=args.address, resume=args.resume, datasets=datasets)

    from search.report import baseline_line, cost_line, finalize_parent, top_table
    if interrupted:
        client.set_tag(parent_id, TAG_STATE, "interrupted")
        client.set_terminated(parent_id, status="KILLED")
        print(f"search interrupted; state saved. Continue it with: python -m search.run --space {args.space} "
              f"--resume" + (f" --data {args.data}" if args.data else ""), flush=True)
        print(f"parent_run_id={parent_id}", flush=True)
        return 130
    best, trials = finalize_parent(client, experiment_id, parent_id, spec)
    client.set_tag(parent_id, TAG_STATE, "finished")
    client.set_terminated(parent_id, status="FINISHED")
    print(f"\ntop trials ({len(trials)} recorded, {time.time() - t0:.0f}s):", flush=True)
    print(top_table(trials, spec.metric, list(spec.params)), flush=True)
    print(baseline_line(client, parent_id, spec.metric), flush=True)
    print(cost_line(client, parent_id), flush=True)
    if best is None:
        print("no trial produced a score; see the failed runs in MLflow", flush=True)
    else:
        print(f"best: trial {best.trial_id}, cv_{spec.metric} {best.score:.4f} over {best.folds} fold(s) at epoch "
              f"{best.best_epoch} (run {best.run_id}); best_config.yaml logged on the parent run", flush=True)
        store = f" --tracking-uri {args.tracking_uri}" if args.tracking_uri else ""
        print(f"next: python -m mmsa.final --run-id {parent_id}" + (f" --data {args.data}" if args.data else "")
              + store + "   (retrain on all labeled pairs, predict the test set)", flush=True)
    print(f"parent_run_id={parent_id}", flush=True)
    return 0 if best is not None else 1


def cli() -> None:
    """The console script's entry point."""
    run_main(main)


if __name__ == "__main__":
    cli()
