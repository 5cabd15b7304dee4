"""A search resolved once, at the command line's edge, before any heavy work: every flag over the
space file into a frozen `Search` (nothing later reads the command line), the Ray cluster, the job
folder of a submitted search, the tracking store, the search to resume and the earlier searches to
warm-start from; then the memory plans that decide more of it (each a new `Search`)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from mmsa.errors import UserError

if TYPE_CHECKING:
    from mlflow.entities import Run

    from mmsa.config import Config
    from search.record import TrackingStore
    from search.space import SearchSpec


@dataclass(frozen=True)
class Search:
    spec: SearchSpec
    base: Config  # what every trial starts from: spec.base_config(), built once
    space_file: str  # as given: names the search's run and the command that resumes it
    data_flag: str | None  # --data as given, repeated in the commands the search prints
    tracking_flag: str | None  # --tracking-uri as given, likewise
    storage: str  # where Ray keeps the search's state (--storage)
    card: int | None  # bytes of the GPU planned for (--gpu-memory); None: this machine's
    memory_budget: int | None  # bytes the whole search stays under (--memory-budget); None: no limit
    address: str | None  # the Ray cluster to join; None: a local one
    job_dir: Path | None
    store: TrackingStore | None  # None in a dry run
    space_key: str  # what --resume matches a search by
    resumed: Run | None  # the parent run to continue
    warm_runs: tuple = ()  # the earlier searches' parent runs it starts from (search.warm_start)

    def with_spec(self, spec: SearchSpec) -> Search:
        return replace(self, spec=spec, base=spec.base_config())


def resolve(args: argparse.Namespace, dry_run: bool = False) -> Search:
    """Every flag, the space file and the tracking store checked, each error one line; Ray started
    (not in a dry run: no Ray, nothing recorded)."""
    if args.address and args.address.startswith("ray://"):
        # Under Ray Client the Tuner, the MLflow callback and the sqlite store would run on the head
        # node, not here: untested, so refused.
        raise UserError(f"--address {args.address}: Ray Client (ray://) is not supported; run the search on a "
                        "cluster node with --address auto")
    spec = space_with_flags(args)
    card = None
    if args.gpu_memory:
        from search.gpu_memory import parse_card
        card = parse_card(args.gpu_memory)
    memory_budget = None
    if args.memory_budget or spec.memory_budget:
        from search.sizes import parse_size
        memory_budget = parse_size(args.memory_budget or spec.memory_budget,
                                   "--memory-budget" if args.memory_budget else f"{spec.path}: memory_budget")
    search = Search(spec, spec.base_config(), args.space, args.data, args.tracking_uri, args.storage, card,
                    memory_budget, None, None, None, "", None)
    return search if dry_run else _connect(search, args)


def _connect(search: Search, args: argparse.Namespace) -> Search:
    """The Ray cluster, the tracking store, the search to resume, the warm start."""
    from mmsa.app.run_tags import experiment_name, tracking_uri
    from search.driver import check_cluster, check_resources, start_ray
    from search.job import inside, job_working_dir
    from search.record import TrackingStore
    job_dir = job_working_dir()
    # submitted with `ray job submit`: the search runs on that cluster
    address = args.address or ("auto" if job_dir is not None else None)
    spec = search.spec
    if job_dir is not None:
        spec = _keep_out_of_the_job_copy(job_dir, spec, tracking_uri(args.tracking_uri), args.storage)
    spec = _absolute_paths(spec)
    if address:
        check_cluster(address)
    start_ray(address)
    check_resources(spec)  # trials no node can hold: refused before anything is recorded
    store = TrackingStore.open(tracking_uri(args.tracking_uri), experiment_name(args.experiment))
    space_key = str(Path(args.space).resolve())
    if job_dir is not None and inside(Path(space_key), job_dir):  # the copy's folder differs from job to job
        space_key = f"ray-job:{Path(space_key).relative_to(job_dir)}"
    resumed, warm_ids = _resumed(store, args, spec, space_key)
    from search.warm_start import refuse_own
    refuse_own(warm_ids, resumed.info.run_id if resumed is not None else None)
    warm_runs = tuple(store.search_run(run_id) for run_id in warm_ids)
    return replace(search, address=address, job_dir=job_dir, store=store, space_key=space_key, resumed=resumed,
                   warm_runs=warm_runs).with_spec(spec)


def _resumed(store: TrackingStore, args: argparse.Namespace, spec: SearchSpec, space_key: str):
    """The parent run --resume continues (or None), and the warm start's run ids."""
    from search.warm_start import recorded_ids, run_ids
    warm_ids = run_ids(args.warm_start, spec)
    if not args.resume:
        return None, warm_ids
    resumed = store.resumable(space_key)
    if resumed is None:
        raise UserError(f"{args.space}: --resume found no unfinished search of this space file "
                        f"in experiment '{store.experiment}'")
    began_with = recorded_ids(resumed.data.params)
    if warm_ids and set(warm_ids) != set(began_with):
        raise UserError(f"--warm-start {','.join(warm_ids)}: a search's warm start is fixed when it starts; "
                        f"this one began with {','.join(began_with) or 'none'} (give no --warm-start with --resume)")
    return resumed, began_with


def space_with_flags(args: argparse.Namespace) -> SearchSpec:
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
    from mmsa.config import CACHE_DIR_ENV
    from search.job import check_job_locations, job_cache_dir
    from search.space import apply_flags
    base = spec.base_config()
    check_job_locations(job_dir, tracking_uri, storage, base.data.data_dir)
    node_cache = job_cache_dir(job_dir, base.data.cache_dir, os.environ.get(CACHE_DIR_ENV))
    if not node_cache:
        return spec
    print(f"cache: {node_cache} (${CACHE_DIR_ENV} of this node), not the job's temporary copy", flush=True)
    return apply_flags(spec, sets={"cache_dir": node_cache})[0]


def plan_gpu(search: Search) -> Search:
    """Trials that train on GPUs: their memory planned (search.gpu_memory), the micro-batch and the
    trials per GPU set from it, or the search refused in one line where one trial cannot fit."""
    spec = search.spec
    if spec.gpu == 0 and not spec.gpu_auto:
        return search
    from search.gpu_memory import applied, choose_for_space
    try:
        chosen = choose_for_space(spec, search.card)
    except UserError as e:
        if "no GPU on this machine" not in str(e):
            raise
        print("plan: skipped: this machine (the driver's) has no GPU to plan for; --gpu-memory SIZE plans the "
              "trials' GPU memory for the cluster's cards", flush=True)
        return search
    print(chosen.line(), flush=True)
    return search.with_spec(applied(spec, chosen))


def plan_memory(search: Search, data) -> Search:
    """--memory-budget: concurrency and micro-batch chosen to fit `data` (search.search_data.SearchData)."""
    if search.memory_budget is None:
        return search
    from search.host_memory import choose_for_space
    from search.space import apply_flags
    spec = search.spec
    if data.raw is not None:
        raise UserError(f"{spec.path}: memory_budget plans host memory of searches on cached features; trials of "
                        f"finetune=full are planned on the GPU (--gpu-memory, --dry-run)")
    more = sum(f.stat().st_size for d in data.text_dirs.values() for f in Path(d).iterdir())
    chosen = choose_for_space(spec, search.memory_budget, data.prepared.features, search.base.data.max_text_len, more)
    spec = replace(spec, max_concurrent=chosen.concurrent)
    if chosen.micro_batch:  # as if given as --set micro_batch=N
        spec = apply_flags(spec, sets={"micro_batch": chosen.micro_batch})[0]
    print(chosen.describe(search.memory_budget), flush=True)
    return search.with_spec(spec)
