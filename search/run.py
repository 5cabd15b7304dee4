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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from mmsa.app.commands import quiet_libraries, run_main
from mmsa.errors import UserError

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

    from mmsa.config import Config
    from mmsa.features.prepare import Prepared, Split
    from mmsa.features.rawsource import RawSource
    from search.space import SearchSpec
    from search.warm_start import WarmStart

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
                   help="train for this long at most, e.g. 20m or 1h30m: no trial starts after it, trials in flight "
                        "end at their next fold, scored on the folds they finished (default: time_budget of the "
                        "space file, else no limit; a resumed search keeps what its budget had left)")
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


@dataclass(frozen=True)
class Tracking:
    """The MLflow store a search records in."""

    uri: str
    client: MlflowClient
    experiment: str
    experiment_id: str


@dataclass(frozen=True)
class Search:
    """A search resolved once, before any heavy work: flags over the space file, the Ray cluster,
    the job folder of a submitted search, the tracking store, and the search to resume if any.
    Never changed; a step that decides more (the memory plan) makes a new one (`with_spec`)."""

    args: argparse.Namespace
    spec: SearchSpec
    base: Config  # what every trial starts from: spec.base_config(), built once
    address: str | None  # the Ray cluster to join; None: a local one
    job_dir: Path | None
    tracking: Tracking
    space_key: str  # what --resume matches a search by
    resumed: Run | None  # the parent run to continue
    warm_runs: tuple = ()  # the earlier searches' parent runs it starts from (search.warm_start)

    def with_spec(self, spec: SearchSpec) -> Search:
        return replace(self, spec=spec, base=spec.base_config())


@dataclass(frozen=True)
class SearchData:
    """The labeled pairs with their features, and the folds every trial and the probe share."""

    prepared: Prepared
    folds: list[tuple[Split, Split]]
    how: str  # how trials are scored, in words
    text_dirs: dict[str, str]  # the other text caches trials read (TrialData.text_dirs)
    datasets: dict[str, str]  # {context: digest} of the pairs, logged on every run (mmsa.app.records)
    raw: RawSource | None = None  # what finetune=full trials read, where the space has them
    fingerprint: str = ""  # of the labeled pairs, fold seed and cv_folds (TAG_FOLDS)
    warm: WarmStart | None = None  # what the earlier searches give (search.warm_start)


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    args = parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    t0 = time.time()
    try:
        search = resolve(args)  # starts Ray once the space and flags are checked
        search = plan_gpu(search)
        data = prepare_data(search)
        search = plan_memory(search, data)
        parent_id, ray_path = open_parent_run(search, data)
        from search.driver import run_tuner
        interrupted = run_tuner(search, data, parent_id, ray_path)
    finally:
        if "ray" in sys.modules:  # stops a local Ray; only disconnects from a cluster
            sys.modules["ray"].shutdown()
    return report(search, data, parent_id, ray_path, interrupted, time.time() - t0)


def dry_run(args: argparse.Namespace) -> int:
    """--dry-run: the space and flags checked, the GPU memory of its trials planned and printed;
    no data read, no Ray, nothing recorded."""
    from search.gpu_plan import plan_for_space
    spec = _space_with_flags(args)
    print(plan_for_space(spec, _card(args)).line(), flush=True)
    return 0


def _card(args: argparse.Namespace) -> int | None:
    """--gpu-memory in bytes; None: this machine's GPU."""
    if not args.gpu_memory:
        return None
    from search.gpu_plan import parse_card
    return parse_card(args.gpu_memory)


def plan_gpu(search: Search) -> Search:
    """Trials that train on GPUs: their memory planned (search.gpu_plan), the micro-batch and the
    trials per GPU set from it, or the search refused in one line where one trial cannot fit."""
    spec = search.spec
    if spec.gpu == 0 and not spec.gpu_auto:
        return search
    from search.gpu_plan import applied, plan_for_space
    try:
        chosen = plan_for_space(spec, _card(search.args))
    except UserError as e:
        if "no GPU on this machine" not in str(e):
            raise
        print("plan: skipped: this machine (the driver's) has no GPU to plan for; --gpu-memory SIZE plans the "
              "trials' GPU memory for the cluster's cards", flush=True)
        return search
    print(chosen.line(), flush=True)
    return search.with_spec(applied(spec, chosen))


def resolve(args: argparse.Namespace) -> Search:
    """Every flag, the space file and the tracking store checked, each error one line."""
    if args.address and args.address.startswith("ray://"):
        # Under Ray Client the Tuner, the MLflow callback and the sqlite store would run on the head
        # node, not here: untested, so refused.
        raise UserError(f"--address {args.address}: Ray Client (ray://) is not supported; run the search on a "
                        "cluster node with --address auto")
    from search.job import job_working_dir
    job_dir = job_working_dir()
    # submitted with `ray job submit`: the search runs on that cluster
    address = args.address or ("auto" if job_dir is not None else None)
    spec = _space_with_flags(args)
    from mmsa.app.run_tags import tracking_uri as resolve_tracking_uri
    if job_dir is not None:
        spec = _keep_out_of_the_job_copy(job_dir, spec, resolve_tracking_uri(args.tracking_uri), args.storage)
    spec = _absolute_paths(spec)
    if address:
        from search.driver import check_cluster
        check_cluster(address)
    from search.driver import check_resources, start_ray
    start_ray(address)
    check_resources(spec)  # trials no node can hold: refused before anything is recorded
    from mlflow.tracking import MlflowClient

    from mmsa.app.run_tags import experiment_name
    from search.job import inside
    from search.tracking import find_resumable_search, get_experiment_id, prepare_tracking_uri, unreachable
    # A tracking server that stops answering mid-search is waited out (search/tracking.py): each
    # attempt gives up after seconds, not MLflow's default minutes, so the search does not stall.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    uri = prepare_tracking_uri(resolve_tracking_uri(args.tracking_uri))
    client = MlflowClient(uri)
    experiment = experiment_name(args.experiment)
    try:
        experiment_id = get_experiment_id(client, experiment, uri)
    except Exception as e:
        if not unreachable(e):
            raise
        raise UserError(f"--tracking-uri {uri}: the tracking server does not answer") from None
    space_key = str(Path(args.space).resolve())
    if job_dir is not None and inside(Path(space_key), job_dir):  # the copy's folder differs from job to job
        space_key = f"ray-job:{Path(space_key).relative_to(job_dir)}"
    resumed = None
    from search.warm_start import check_runs, recorded_ids, run_ids
    warm_ids = run_ids(args.warm_start, spec)
    if args.resume:
        resumed = find_resumable_search(client, experiment_id, space_key)
        if resumed is None:
            raise UserError(f"{args.space}: --resume found no unfinished search of this space file "
                            f"in experiment '{experiment}'")
        began_with = recorded_ids(resumed)
        if warm_ids and set(warm_ids) != set(began_with):
            raise UserError(f"--warm-start {','.join(warm_ids)}: a search's warm start is fixed when it starts; "
                            f"this one began with {','.join(began_with) or 'none'} (give no --warm-start with --resume)")
        warm_ids = began_with
    warm_runs = check_runs(client, warm_ids, own_id=resumed.info.run_id if resumed is not None else None)
    return Search(args, spec, spec.base_config(), address, job_dir, Tracking(uri, client, experiment, experiment_id),
                  space_key, resumed, tuple(warm_runs))


def _space_with_flags(args: argparse.Namespace) -> SearchSpec:
    """The space file, every config error surfacing here, with the command line's flags over it."""
    from mmsa.config import parse_overrides
    from search.space import apply_flags, load_space
    spec = load_space(args.space)
    changes = {}
    if args.data:
        changes["data_dir"] = args.data
    for flag, attr in (("--num-samples", "num_samples"), ("--max-epochs", "max_epochs")):
        value = getattr(args, attr)
        if value is not None:
            if value <= 0:
                raise UserError(f"{flag}: must be > 0")
            changes[attr] = value
    if args.time_budget is not None:
        from search.time_budget import parse_duration
        parse_duration(args.time_budget, "--time-budget")
        changes["time_budget"] = args.time_budget
    spec, unsearched = apply_flags(replace(spec, **changes), args.cpus_per_trial, args.gpus_per_trial,
                                   args.max_concurrent, args.seed, parse_overrides(args.overrides))
    if unsearched:
        print(f"--set fixes {', '.join(unsearched)}: not searched in this run", flush=True)
    return spec


def _absolute_paths(spec: SearchSpec) -> SearchSpec:
    """The data and cache folders as absolute paths: trials run in folders of Ray's own (a trial's
    working dir, another node), and a plan names them for mmsa.final, run from anywhere."""
    base = spec.base_config().data
    spec = replace(spec, data_dir=os.path.abspath(base.data_dir))
    if "cache_dir" in spec.fixed and not os.path.isabs(spec.fixed["cache_dir"]):
        spec = replace(spec, fixed={**spec.fixed, "cache_dir": os.path.abspath(spec.fixed["cache_dir"])})
    return spec


def _keep_out_of_the_job_copy(job_dir: Path, spec: SearchSpec, tracking_uri: str, storage: str) -> SearchSpec:
    """A submitted search: refuse records inside the job's temporary copy of its working dir, and
    keep a cache_dir that would land there in the node's own folder instead."""
    from search.job import check_job_locations, job_cache_dir
    from search.space import apply_flags
    from search.trainable import NODE_CACHE_ENV
    base = spec.base_config()
    check_job_locations(job_dir, tracking_uri, storage, base.data.data_dir)
    node_cache = job_cache_dir(job_dir, base.data.cache_dir, os.environ.get(NODE_CACHE_ENV))
    if not node_cache:
        return spec
    print(f"cache: {node_cache} (${NODE_CACHE_ENV} of this node), not the job's temporary copy", flush=True)
    return apply_flags(spec, sets={"cache_dir": node_cache})[0]


def prepare_data(search: Search) -> SearchData:
    """The labeled pairs and their frozen features (built or checked in a child process, so this
    driver never holds torch: the probe and the trials on cached features read them), the other
    kinds of features trials read (the text caches of finetune=last_k, the pairs themselves for
    finetune=full), and the folds every trial and the probe share."""
    from dataclasses import replace as replaced

    from mmsa.app.records import fold_digests
    from mmsa.features.prepare import at_text_depth, cv_splits, prepare_in_subprocess
    from mmsa.features.rawsource import RawSource
    from search.space import check_against_data
    spec, base, t0 = search.spec, search.base, time.time()
    kinds = spec.feature_configs()
    print(f"data: {base.data.data_dir}; preparing features (built once, then cached)", flush=True)
    # every labeled pair comes back as `train`; the text caches of finetune=last_k (the hidden
    # states entering the layers that train) are built in the same pass of the text backbone
    depths = tuple(sorted({kind.text_depth for kind in kinds if kind.finetune == "last_k"}))
    if depths:
        print(f"data: caching the text features of finetune=last_k ({', '.join(map(str, depths))} text layers "
              f"train) beside the frozen ones", flush=True)
    data = prepare_in_subprocess(replaced(base.data, finetune="none"), val_fraction=0.0, also_depths=depths)
    from search.trainable import text_variant
    text_dirs = {text_variant(at_text_depth(base.data, d)): folder for d, folder in data.text_dirs.items()}
    raw = None
    if any(kind.finetune == "full" for kind in kinds):
        print("data: finetune=full trials read the pairs themselves (backbones trained per batch); their images "
              "decoded once into the pixel cache", flush=True)
        from mmsa.features.prepare import in_child
        raw = in_child(RawSource.from_files, data.dataset.all_examples, next(k for k in kinds if k.finetune == "full"))
    if spec.cv_folds == 1 and base.data.val_fraction <= 0:
        raise UserError(f"{spec.path}: cv_folds: 1 holds out one validation split, and needs val_fraction > 0")
    folds = cv_splits(data.train, spec.cv_folds, base.data.split_seed, base.data.val_fraction)
    check_against_data(spec, min(len(tr) for tr, _ in folds))
    how = (f"{spec.cv_folds}-fold cross-validation" if spec.cv_folds > 1
           else f"one held-out split of {len(folds[0][1])}")
    print(f"data: {len(data.train)} labeled pairs, trials scored by {how} (seed {base.data.split_seed}); "
          f"features ready in {time.time() - t0:.1f}s; {data.dataset.report.summary()}", flush=True)
    datasets = fold_digests(data.features, folds)
    from mmsa.features.featureset import digest
    fingerprint = digest(datasets["train"], datasets["validation"], str(spec.cv_folds), str(base.data.split_seed),
                         str(base.data.val_fraction) if spec.cv_folds == 1 else "")
    warm = None
    if search.warm_runs:
        from search.warm_start import gather
        warm = gather(search.tracking.client, list(search.warm_runs), spec, fingerprint)
        print(warm.line(), flush=True)
    return SearchData(data, folds, how, text_dirs, datasets, raw, fingerprint, warm)


def plan_memory(search: Search, data: SearchData) -> Search:
    """--memory-budget: concurrency and micro-batch chosen to fit: the search with them."""
    args, spec = search.args, search.spec
    budget_text = args.memory_budget or spec.memory_budget
    if not budget_text:
        return search
    from search.budget import parse_size, plan_for_space
    from search.space import apply_flags
    if data.raw is not None:
        raise UserError(f"{spec.path}: memory_budget plans host memory of searches on cached features; trials of "
                        f"finetune=full are planned on the GPU (--gpu-memory, --dry-run)")
    budget = parse_size(budget_text, "--memory-budget" if args.memory_budget else f"{spec.path}: memory_budget")
    more = sum(f.stat().st_size for d in data.text_dirs.values() for f in Path(d).iterdir())
    chosen = plan_for_space(spec, budget, data.prepared.features, search.base.data.max_text_len, more)
    spec = replace(spec, max_concurrent=chosen.concurrent)
    if chosen.micro_batch:  # as if given as --set micro_batch=N
        spec = apply_flags(spec, sets={"micro_batch": chosen.micro_batch})[0]
    print(chosen.describe(budget), flush=True)
    return search.with_spec(spec)


def open_parent_run(search: Search, data: SearchData) -> tuple[str, str]:
    """The search's MLflow run, new (with its params, data report and the probe's score on the
    folds) or the one --resume continues: (its id, Ray's state path)."""
    from mmsa.app.records import context_tags, log_datasets
    from mmsa.app.run_tags import TAG_FOLDS, TAG_KIND, TAG_RAY_PATH, TAG_SPACE, TAG_STATE
    from search.tracking import log_params
    args, spec, base, client = search.args, search.spec, search.base, search.tracking.client
    if search.resumed is not None:
        parent_id = search.resumed.info.run_id
        ray_path = search.resumed.data.tags[TAG_RAY_PATH]
        client.set_tag(parent_id, TAG_STATE, "running")
        client.update_run(parent_id, status="RUNNING")
        print(f"resuming search {parent_id} from {ray_path}", flush=True)
        return parent_id, ray_path
    parent = client.create_run(search.tracking.experiment_id, run_name=f"search-{Path(args.space).stem}",
                               tags=context_tags({TAG_KIND: "search", TAG_SPACE: search.space_key, TAG_STATE: "running",
                                                  TAG_FOLDS: data.fingerprint}))
    parent_id = parent.info.run_id
    log_datasets(client, parent_id, base.data.data_dir, data.datasets)
    ray_path = os.path.join(os.path.abspath(args.storage) if "://" not in args.storage else args.storage,
                            f"search-{parent_id[:12]}")
    client.set_tag(parent_id, TAG_RAY_PATH, ray_path)
    prepared = data.prepared
    log_params(client, parent_id, {
        "space_file": args.space, "num_samples": spec.num_samples, "max_epochs": spec.max_epochs,
        "seed": spec.seed, "searcher": spec.searcher, "scheduler": spec.scheduler,
        "metric": spec.metric, "max_concurrent": spec.max_concurrent, "data_dir": base.data.data_dir,
        "cv_folds": spec.cv_folds, "split_seed": base.data.split_seed,
        "n_labeled": len(prepared.train), "n_test": len(prepared.test),
        "ray_results_path": ray_path, "address": search.address or "local", "time_budget": spec.time_budget,
        "warm_start": ",".join(r.info.run_id for r in search.warm_runs)})
    if data.warm is not None:
        from search.warm_start import record
        record(client, parent_id, data.warm)
    client.log_artifact(parent_id, str(spec.path), artifact_path="space")
    client.log_dict(parent_id, prepared.dataset.report.as_dict(), "data_report.json")
    # the yardstick, for every search: the linear probe on the same folds, on the frozen backbones' features
    from mmsa.models.probe import probe_cv
    from mmsa.training import oof
    from search.ensemble import PROBE_OOF_ARTIFACT
    from search.tracking import log_bytes, log_metrics
    probe = probe_cv(prepared.features, data.folds, keep_probs=True, lexicon=base.model.lexicon)
    probe["probe_params"] = 3 * (prepared.features.text_dim + prepared.features.image_dim + 4 * base.model.lexicon + 1)
    log_bytes(client, parent_id, oof.to_bytes(oof.oof_arrays(data.folds, probe.pop("probe_fold_probs"))),
              PROBE_OOF_ARTIFACT)
    log_metrics(client, parent_id, probe, step=0)
    print(f"baseline: linear probe{' with lexicon scores' if base.model.lexicon else ''}, {data.how}: "
          f"val_acc {probe['probe_val_acc']:.4f}, val_macro_f1 {probe['probe_val_macro_f1']:.4f}", flush=True)
    return parent_id, ray_path


def report(search: Search, data: SearchData, parent_id: str, ray_path: str, interrupted: bool, seconds: float) -> int:
    """The end: how to continue an interrupted search, or the chosen trial, the top trials, the
    probe and the cost; what its storage keeps; last line `parent_run_id=<id>`."""
    from mmsa.app.run_tags import TAG_STATE
    from search.checkpoints import storage_line
    from search.report import baseline_line, cost_line, finalize_parent, top_table
    args, spec, client = search.args, search.spec, search.tracking.client
    if interrupted:
        print(storage_line(ray_path), flush=True)
        client.set_tag(parent_id, TAG_STATE, "interrupted")
        client.set_terminated(parent_id, status="KILLED")
        print(f"search interrupted; state saved. Continue it with: python -m search.run --space {args.space} "
              f"--resume" + (f" --data {args.data}" if args.data else ""), flush=True)
        print(f"parent_run_id={parent_id}", flush=True)
        return 130
    best, trials = finalize_parent(client, search.tracking.experiment_id, parent_id, spec)
    client.set_tag(parent_id, TAG_STATE, "finished")
    client.set_terminated(parent_id, status="FINISHED")
    print(f"\ntop trials ({len(trials)} recorded, {seconds:.0f}s):", flush=True)
    print(top_table(trials, spec.metric, list(spec.params)), flush=True)
    print(baseline_line(client, parent_id, spec.metric), flush=True)
    print(cost_line(client, parent_id), flush=True)
    print(storage_line(ray_path), flush=True)
    if spec.time_budget:
        print(budget_line(client, parent_id, trials), flush=True)
    from mmsa.models.probe import probe_config
    from search.ensemble import select_ensemble, write_plan
    warm = data.warm.candidates if data.warm is not None else []
    if warm:
        print(f"reused: {len(warm)} trial(s) of earlier searches are candidates of the ensemble, beside this "
              f"search's {len(trials)}; none was trained again", flush=True)
    ensemble = select_ensemble(client, parent_id, trials + warm, spec.metric, spec.max_members, spec.max_params,
                               probe_params=int(client.get_run(parent_id).data.metrics.get("probe_params", 0)))
    if ensemble is not None:
        print(ensemble.line(), flush=True)
        if ensemble.skipped:
            print(f"note: trial(s) {', '.join(ensemble.skipped)} ran every fold but left no out-of-fold predictions "
                  f"on these folds (recorded by an earlier version?): not candidates", flush=True)
    write_plan(client, parent_id, spec.metric, ensemble, best, trials + warm, probe_config(search.base))
    if best is None:
        if trials and spec.time_budget and not any(t.ended == "failed" for t in trials):
            print(f"no trial finished a fold within the time budget ({len(trials)} stopped on the way): give it more "
                  f"time (--time-budget) or shorter folds (--max-epochs)", flush=True)
        else:
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
    they ended (what it had left is on the parent run, recorded as the trials ended)."""
    from search.time_budget import describe
    m = client.get_run(parent_id).data.metrics
    if "time_budget_left_s" not in m:
        return "time budget: not used (the search ran no trial)"
    seconds, left = m["time_budget_s"], m["time_budget_left_s"]
    if left > 0:
        return f"time budget {describe(seconds)}: {describe(left)} left when the last of num_samples trials ended"
    return (f"time budget {describe(seconds)}: spent; {len(trials)} trials started within it, "
            f"{sum(t.ended == 'completed' for t in trials)} ran every fold (trials in flight when it ran out ended "
            f"at their next fold, scored on the folds they finished)")


def cli() -> None:
    """The console script's entry point."""
    run_main(main)


if __name__ == "__main__":
    cli()
