"""`python -m mmsa.final --run-id ID`: train the final model on all labeled pairs, predict the test set.

ID is a search's parent run, whose plan (mmsa.training.plan: the members its ensemble selection
chose, each with its config, best epoch, weight and seeds) is trained as written; or one trial's
run, trained alone. `--members` builds another plan from named parts instead. The predictions
file is written atomically; the plan, the members, metrics, datasets, the cross-validated
confusion matrix of the chosen config, the predictions and the model (an MLflow pyfunc model
holding every member, mmsa.app.pyfunc; registered with `--register`) are logged as a child run of
the search.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from mmsa.app.commands import quiet_libraries
from mmsa.app.run_tags import (PLAN_ARTIFACT, TAG_BEST_RUN, TAG_KIND, TAG_PARENT, TAG_SOURCE, TAG_TRIAL, sqlite_file,
                               tracking_uri)
from mmsa.config import Config
from mmsa.data.dataset import LABELS
from mmsa.errors import ConfigError, UserError
from mmsa.training.plan import FINETUNE_EPOCHS, Plan, PlanMember, finetune_recipe, merge, stored_config, trial_member

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

DEFAULT_MODEL_NAME = "mmsa-sentiment"  # what --register names the model when given no name
DEFAULT_JOBS = 2  # models trained at once: on 2 cores, 2 processes of 1 thread each (docs/results.md: final's time)
PARTS = ("ensemble", "best", "probe", "finetune")
RETIRED_FLAGS = {"--blend": "--members (e.g. --members best,probe,finetune)",
                 "--ensemble": "--members ensemble:seeds=K", "--seeds": "--members ensemble:seeds=K",
                 "--bag": "--members (one model per fold is gone: 5 seeds scored better, docs/results.md)"}
MEMBERS_HELP = f"""\
other members than the plan the run holds: comma-separated parts, each the same share of the final
model, each optionally NAME:seeds=K (models of each of its trained members from K seeds).
ensemble: the plan the search selected (its members keep their weights within the share);
best: the search's best trial (or the trial ID names); probe: the linear probe;
finetune: a fixed recipe fine-tuning the whole text backbone ({FINETUNE_EPOCHS} epochs of a 3-epoch
schedule). A member named by two parts is one member with both shares.
Example: --members ensemble:seeds=1,probe"""


@dataclass(frozen=True)
class RunPlan:
    """What a run id resolves to, before anything trains."""

    what: str  # "search <id>" or "trial <id>", for the user
    plan: Plan  # the plan it holds: a search's, or the trial alone
    best: PlanMember  # the best trial as a member (the search's chosen config, or the trial itself)
    best_run_id: str  # whose cross-validated confusion matrix describes the chosen config
    parent_id: str | None  # the search the final run is recorded under


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    for arg in argv if argv is not None else sys.argv[1:]:
        flag = arg.split("=", 1)[0]
        if flag in RETIRED_FLAGS:
            raise UserError(f"{flag}: removed; use {RETIRED_FLAGS[flag]}")
    p = argparse.ArgumentParser(prog="python -m mmsa.final", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run-id", required=True, help="a search's parent run id (its plan), or one trial's run id")
    p.add_argument("--data", help="dataset folder (default: the one the search used)")
    p.add_argument("--out", default="predictions.txt", help="predictions file (default: predictions.txt)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                   "sqlite:///mlruns/mlflow.db)")
    p.add_argument("--members", metavar="PARTS", help=MEMBERS_HELP)
    p.add_argument("--jobs", type=int, default=DEFAULT_JOBS, metavar="N",
                   help=f"models on cached features trained N at a time, each in a process of its own with its\n"
                        f"share of the cores (default {DEFAULT_JOBS}; models that fine-tune both backbones train one\n"
                        f"at a time)")
    p.add_argument("--register", nargs="?", const=DEFAULT_MODEL_NAME, metavar="NAME",
                   help="register the logged model in the MLflow model registry as NAME (a new version\n"
                        f"each time; bare --register: {DEFAULT_MODEL_NAME}). Without it the model is\n"
                        "still logged on the final run, as an MLflow model")
    return p.parse_args(argv)


# ---------------------------------------------------------------- a run id -> its plan

def resolve_run(client: MlflowClient, run_id: str) -> RunPlan:
    from mlflow.exceptions import MlflowException
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise UserError(f"--run-id {run_id}: no such run in the tracking store") from None
    if run.info.lifecycle_stage == "deleted":
        raise UserError(f"--run-id {run_id}: the run is deleted")
    kind = run.data.tags.get(TAG_KIND)
    if kind == "trial":
        best = run_member(client, run)
        return RunPlan(f"trial {run_id}", Plan((best,), origin=f"trial {run_id}"), best, run_id,
                       run.data.tags.get(TAG_PARENT))
    if kind != "search":
        raise UserError(f"--run-id {run_id}: not a search or trial run of mmsa-search (no config to use)")
    best_id = run.data.tags.get(TAG_BEST_RUN)
    if not best_id:
        raise UserError(f"--run-id {run_id}: this search has no chosen config yet (unfinished or all trials failed)")
    best = run_member(client, client.get_run(best_id))
    plan = read_plan(client, run_id) or Plan((best,), origin=f"search {run_id}")  # searches before plans
    return RunPlan(f"search {run_id}", plan, best, best_id, run_id)


def read_plan(client: MlflowClient, run_id: str) -> Plan | None:
    """The run's PLAN_ARTIFACT, or None where it has none; a plan that does not load is one line."""
    import json

    from mlflow.exceptions import MlflowException
    with tempfile.TemporaryDirectory() as tmp:
        try:
            text = Path(client.download_artifacts(run_id, PLAN_ARTIFACT, tmp)).read_text()
        except (MlflowException, OSError):
            return None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise UserError(f"run {run_id}: {PLAN_ARTIFACT} is not JSON ({e})") from None
    return Plan.from_dict(data, where=f"run {run_id}: {PLAN_ARTIFACT}")


def run_member(client: MlflowClient, run: Run) -> PlanMember:
    """A trial run as a member (mmsa.training.plan.trial_member) for its best epoch (the mean over
    its folds peaked there; trials recorded before cross-validation: the peak of their one split's
    curve)."""
    run_id = run.info.run_id
    if not any(k in Config.known_keys() for k in run.data.params):
        raise UserError(f"--run-id {run_id}: the trial run has no config params")
    if "best_epoch" in run.data.metrics:
        epochs = int(run.data.metrics["best_epoch"])
    else:
        monitor = stored_config(run.data.params, f"run {run_id} params").train.monitor
        history = client.get_metric_history(run_id, monitor)
        if not history:
            raise UserError(f"--run-id {run_id}: the trial logged no '{monitor}' history to choose epochs from")
        epochs = int(max(history, key=lambda m: (m.value, -m.step)).step)
    return trial_member(f"trial {run.data.tags.get(TAG_TRIAL) or run_id}", run.data.params, epochs, run_id)


# ---------------------------------------------------------------- --members: another plan

def members_plan(source: RunPlan, text: str) -> Plan:
    """The plan `--members` names, every part the same share (a part's seeds as it says)."""
    parts = []
    for item in (p.strip() for p in text.split(",")):
        name, *options = item.split(":")
        seeds = None
        for option in options:
            key, _, value = option.partition("=")
            if key != "seeds" or not value.isdigit() or int(value) < 1:
                raise UserError(f"--members {text}: '{item}': the one option is seeds=K, K >= 1")
            seeds = int(value)
        if name not in PARTS:
            raise UserError(f"--members {text}: '{name}' is not one of {', '.join(PARTS)}")
        parts.append((name, seeds))
    if len({name for name, _ in parts}) < len(parts):
        raise UserError(f"--members {text}: a part is named twice")
    plans = []
    for name, seeds in parts:
        if name == "ensemble":
            if source.what.startswith("trial"):
                raise UserError(f"--members ensemble: --run-id names one trial ({source.what}), which has no "
                                f"plan of a search; give the search's parent run, or use --members best")
            plan = source.plan
        elif name == "best":
            plan = Plan((source.best,))
        elif name == "probe":
            from mmsa.models.probe import probe_config
            plan = Plan((PlanMember("linear probe", "probe", probe_config(source.best.config), 0, 1.0, 1,
                                    source.parent_id or ""),))
        else:
            plan = Plan((finetune_recipe(source.best.config),))
        if seeds is not None:
            plan = Plan(tuple(m if m.kind == "probe" else replace(m, seeds=seeds) for m in plan.members))
        plans.append((1 / len(parts), plan))
    return merge(plans, origin=f"--members {text} of {source.what}")


def probe_warning(client: MlflowClient, best_run_id: str, parent_id: str | None, monitor: str) -> str | None:
    """One line when the chosen config scored below the linear probe on the same folds."""
    if not parent_id:
        return None
    probe = client.get_run(parent_id).data.metrics.get(f"probe_{monitor}")
    score = client.get_run(best_run_id).data.metrics.get(f"best_{monitor}")
    if probe is None or score is None or score >= probe:
        return None
    return (f"warning: the chosen config's cross-validated {monitor} ({score:.4f}) is below the linear probe's "
            f"on the same folds ({probe:.4f}): the search found nothing better than logistic regression")


# ---------------------------------------------------------------- the command

def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    args = parse_args(argv)
    from mlflow.tracking import MlflowClient
    uri = tracking_uri(args.tracking_uri)
    if sqlite_file(uri) is not None and not sqlite_file(uri).exists():
        raise UserError(f"tracking URI {uri}: no MLflow store there (run a search first)")
    client = MlflowClient(uri)
    source = resolve_run(client, args.run_id)
    try:
        plan = members_plan(source, args.members) if args.members else source.plan
    except ConfigError as e:
        raise UserError(f"--members {args.members}: {e}") from None
    if args.data:
        plan = plan.reading(args.data)
    if any(m.source == source.best.source for m in plan.members):
        warning = probe_warning(client, source.best_run_id, source.parent_id, plan.chosen().config.train.monitor)
        if warning:
            print(warning, flush=True)
    print(f"final model of {source.what}: {plan.describe()}", flush=True)

    from mmsa.data.files import write_predictions
    from mmsa.features.prepare import Preparations
    from mmsa.models.ensemble import predict_members
    from mmsa.models.runtime import resolve_device
    from mmsa.training.fit import format_epoch
    from mmsa.training.plan import train_plan
    t0 = time.time()
    prepared = Preparations()
    data = prepared(plan.chosen().config.data)
    if not data.test.guids:
        raise UserError(f"{data.dataset.root}: test_without_label.txt is missing or empty")
    if args.jobs < 1:
        raise UserError(f"--jobs {args.jobs}: must be >= 1")
    ready = time.time()
    members, losses = train_plan(plan, prepared, on_epoch=lambda e, m: print(format_epoch(e, m), flush=True),
                                 log=lambda line: print(line, flush=True), jobs=args.jobs)
    trained = time.time()
    print(f"trained {len(members)} model(s) in {trained - ready:.0f}s ({args.jobs} at a time; data ready in "
          f"{ready - t0:.0f}s)", flush=True)
    probs = predict_members(members, lambda c: (prepared(c).features, prepared(c).test.rows),
                            resolve_device(plan.chosen().config.train.device))
    tags = [LABELS[i] for i in probs.argmax(1)]
    out = Path(args.out)
    write_predictions(out, data.test.guids, tags)

    report = data.dataset.report
    partial = sorted(set(report.missing_image + report.unreadable_image + report.missing_text) & set(data.test.guids))
    if partial:
        print(f"{len(partial)} test pairs predicted from one modality (missing or unreadable file): "
              f"{', '.join(partial[:10])}{' ...' if len(partial) > 10 else ''}", flush=True)
    pred_share = Counter(tags)
    train_share = Counter(LABELS[i] for i in data.train.labels)
    print("class balance   " + "  ".join(f"{name}: pred {pred_share[name] / len(tags):.1%} / train "
                                         f"{train_share[name] / len(data.train):.1%}" for name in LABELS), flush=True)
    metrics = {"seconds": time.time() - t0, "n_single_modality": len(partial)}
    if losses:
        metrics["train_loss"] = sum(losses) / len(losses)
    recording = time.time()
    record_final_run(client, uri, source, plan, members, data, tags, metrics, out, args.register)
    print(f"done in {time.time() - t0:.0f}s (predicted in {recording - trained:.0f}s, model logged in "
          f"{time.time() - recording:.0f}s)", flush=True)
    print(f"predictions={out}", flush=True)
    return 0


def record_final_run(client: MlflowClient, uri: str, source: RunPlan, plan: Plan, members: list, data,
                     tags: list[str], metrics: dict, out: Path, register: str | None) -> None:
    """The final run, a child of the search: the plan it executed, the chosen config's params, the
    members, metrics, datasets, the cross-validated confusion matrix, the predictions and the model
    (registered if asked)."""
    from mlflow.entities import Metric, Param

    from mmsa.app.records import context_tags, digests, load_confusion, log_confusion, log_datasets
    parent_id = source.parent_id
    experiment_id = (client.get_run(parent_id).info.experiment_id if parent_id
                     else client.get_experiment_by_name("Default").experiment_id)
    run_tags = {TAG_KIND: "final", TAG_SOURCE: source.what}
    if parent_id:
        run_tags[TAG_PARENT] = parent_id
    rid = client.create_run(experiment_id, run_name="final-retrain", tags=context_tags(run_tags)).info.run_id
    chosen = plan.chosen().config
    log_datasets(client, rid, chosen.data.data_dir, digests(data.features, {"train": data.train, "test": data.test}))
    # The test labels are unknown: the matrix that says how this config errs is its trial's
    # cross-validated one.
    confusion = load_confusion(client, source.best_run_id)
    if confusion is not None:
        log_confusion(client, rid, confusion["matrix"], f"cross-validated, {confusion['title']}")
    now = int(time.time() * 1000)
    client.log_batch(rid, params=[Param(k, str(v)) for k, v in sorted(chosen.to_flat().items())]
                     + [Param("members", " + ".join(f"{m.name} ({m.weight:.3g})" for m in members)[:6000])])
    metrics = {**metrics, "n_predictions": len(tags), "n_members": len(members),
               **{f"pred_share_{n}": tags.count(n) / len(tags) for n in LABELS}}
    client.log_batch(rid, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    client.log_dict(rid, plan.to_dict(), PLAN_ARTIFACT)
    client.log_artifact(rid, str(out), artifact_path="predictions")
    import mlflow

    from mmsa.app.pyfunc import input_example, log_model
    from mmsa.models.ensemble import save_members
    mlflow.set_tracking_uri(uri)
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=rid):
        ckpt = Path(tmp) / "model.pt"
        save_members(ckpt, members)
        info = log_model(ckpt, members, input_example(chosen.data.data_dir, data.test.guids[:2]), register)
    print(f"logged final run {rid}" + (f" under search {parent_id}" if parent_id else "")
          + f"; model {info.model_uri}", flush=True)
    if register:
        print(f"registered: models:/{register}/{info.registered_model_version}", flush=True)
