"""`python -m mmsa.final --run-id ID`: retrain what the search selected on all labeled pairs, predict the test set.

ID is a search's parent run or one trial's run. By default the final model is the ensemble the
search selected (search/ensemble.py: trials and the linear probe, with weights, chosen on their
out-of-fold predictions); for one trial's run, or a search recorded before ensembles, the best
trial's config. `--members` picks instead, e.g. `best,probe,finetune`.

Each trial member retrains with its own config on all labeled pairs and stops at its
`best_epoch` (replaying its warm-up + cosine schedule), from 5 seeds (`--seeds`; `--bag folds`:
one model per fold of the search), 1 when it fine-tunes both backbones (`finetune: full`). The final
model is a list of weighted members (mmsa.models.ensemble). The predictions file is written
atomically; the config, members, metrics, datasets, the cross-validated confusion matrix of the
best trial, the predictions and the model (an MLflow pyfunc model holding every member,
mmsa.app.pyfunc; registered with `--register`) are logged as a child run of the search.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import yaml

from mmsa.app.commands import quiet_libraries
from mmsa.config import Config
from mmsa.data.dataset import LABELS
from mmsa.errors import UserError
from mmsa.app.run_tags import TAG_BEST_RUN, TAG_KIND, TAG_PARENT, TAG_SOURCE, sqlite_file, tracking_uri

DEFAULT_SEEDS = 5  # models of a trial member; one where it fine-tunes both backbones (finetune=full)
MEMBER_KINDS = ("ensemble", "best", "probe", "finetune")
# The fine-tuned text member (--members ...,finetune): a fixed recipe, kept for comparison with what
# the search selects. The whole MiniLM trains at lr * text_lr_scale = 3e-5 on the cached embedding
# output, an mlp head on it and the cached image tokens at 1e-3, on a 3-epoch warm-up + cosine
# schedule stopped after epoch 2, the epoch cross-validation chose (bench/results/cv_finetune.md).
FINETUNE_EPOCHS = 2
FINETUNE_MEMBER = {"finetune": "last_k", "head": "mlp", "pooling": "mean", "lr": 1e-3, "text_lr_scale": 0.03,
                   "max_epochs": 3, "stop_epoch": FINETUNE_EPOCHS}  # + every text layer
DEFAULT_MODEL_NAME = "mmsa-sentiment"  # what --register names the model when given no name
BAGS = ("seeds", "folds")
DEFAULT_BAG = "seeds"
RENAMED_FLAGS = {"--blend": "--members (e.g. --members best,probe,finetune)", "--ensemble": "--seeds"}


@dataclass
class MemberPlan:
    """One member of the final model, before it trains."""

    name: str  # "trial 3f2a_00004", "linear probe", "fine-tuned minilm"
    kind: str  # trial | probe | finetune
    cfg: Config  # a trial's config stopping at its best epoch, the recipe, or the config whose data the probe reads
    weight: float  # its share of the final model
    source: str  # what it is made from: a trial's run id, or its kind: members with the same are merged
    models: int = 1  # a trial's: seeds, or folds of the search (--bag folds), sharing its weight


@dataclass
class Plan:
    """What final does, resolved once from the flags and the tracking store."""

    client: object  # MlflowClient
    uri: str
    cfg: Config  # the chosen (best) config, stopping at its best epoch: the data every member reads
    what: str  # where the config came from, for the user
    trial: object  # the trial run that scored it
    parent_id: str | None
    bag: str
    members: list[MemberPlan]
    out: Path
    register: str | None


def resolve_run(client, run_id: str):
    """-> (flat config dict, epochs to train, the search's parent run id, description, the trial run)."""
    from mlflow.exceptions import MlflowException
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise UserError(f"--run-id {run_id}: no such run in the tracking store") from None
    if run.info.lifecycle_stage == "deleted":
        raise UserError(f"--run-id {run_id}: the run is deleted")
    kind = run.data.tags.get(TAG_KIND)
    if kind == "search":
        trial_id = run.data.tags.get(TAG_BEST_RUN)
        if not trial_id:
            raise UserError(f"--run-id {run_id}: this search has no chosen config yet (unfinished or all trials failed)")
        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = client.download_artifacts(run_id, "best_config.yaml", tmp)
            except (MlflowException, OSError):
                raise UserError(f"--run-id {run_id}: best_config.yaml is missing from the run's artifacts") from None
            flat = yaml.safe_load(Path(local).read_text())
        trial = client.get_run(trial_id)
        return flat, _peak_epoch(client, trial, flat), run_id, f"search {run_id} (best trial {trial_id})", trial
    if kind == "trial":
        known = Config.known_keys()
        flat = {k: v for k, v in run.data.params.items() if k in known}
        if not flat:
            raise UserError(f"--run-id {run_id}: the trial run has no config params")
        flat = Config.from_flat(flat, source=f"run {run_id} params").to_flat()
        return flat, _peak_epoch(client, run, flat), run.data.tags.get(TAG_PARENT), f"trial {run_id}", run
    raise UserError(f"--run-id {run_id}: not a search or trial run of mmsa-search (no config to use)")


def _peak_epoch(client, trial, flat: dict) -> int:
    """The epoch whose mean over the trial's folds was best (its `best_epoch`). Trials recorded
    before cross-validation logged one split's per-epoch history instead: its peak."""
    if "best_epoch" in trial.data.metrics:
        return int(trial.data.metrics["best_epoch"])
    monitor = flat.get("monitor", "val_acc")
    history = client.get_metric_history(trial.info.run_id, monitor)
    if not history:
        raise UserError(f"--run-id {trial.info.run_id}: the trial logged no '{monitor}' history to choose epochs from")
    return int(max(history, key=lambda m: (m.value, -m.step)).step)


def probe_warning(client, trial, parent_id: str | None, monitor: str) -> str | None:
    """One line when the chosen config scored below the linear probe on the same folds."""
    if not parent_id:
        return None
    probe = client.get_run(parent_id).data.metrics.get(f"probe_{monitor}")
    score = trial.data.metrics.get(f"best_{monitor}")
    if probe is None or score is None or score >= probe:
        return None
    return (f"warning: the chosen config's cross-validated {monitor} ({score:.4f}) is below the linear probe's "
            f"on the same folds ({probe:.4f}): the search found nothing better than logistic regression")


def parse_args(argv):
    import sys
    for arg in argv if argv is not None else sys.argv[1:]:
        flag = arg.split("=", 1)[0]
        if flag in RENAMED_FLAGS:
            raise UserError(f"{flag}: renamed; use {RENAMED_FLAGS[flag]}")
    p = argparse.ArgumentParser(prog="python -m mmsa.final", description=__doc__.splitlines()[0])
    p.add_argument("--run-id", required=True, help="a search's parent run id, or one trial's run id")
    p.add_argument("--data", help="dataset folder (default: the one the search used)")
    p.add_argument("--out", default="predictions.txt", help="predictions file (default: predictions.txt)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                   "sqlite:///mlruns/mlflow.db)")
    p.add_argument("--members", metavar="LIST",
                   help="what the final model averages, comma-separated, each listed item the same share: "
                        "ensemble (the members and weights the search selected), best (the best trial's config), "
                        "probe (the linear probe), finetune (a fixed MiniLM fine-tuning recipe, "
                        f"{FINETUNE_EPOCHS} epochs of a 3-epoch schedule). Default: ensemble for a search that "
                        "selected one, else best")
    p.add_argument("--seeds", type=int, metavar="K",
                   help=f"models of each trial member trained from K seeds, sharing its weight (default "
                        f"{DEFAULT_SEEDS}; 1 for a member that fine-tunes both backbones, finetune=full)")
    p.add_argument("--register", nargs="?", const=DEFAULT_MODEL_NAME, metavar="NAME",
                   help="register the logged model in the MLflow model registry as NAME (a new version "
                        f"each time; bare --register: {DEFAULT_MODEL_NAME}). Without it the model is "
                        "still logged on the final run, as an MLflow model")
    p.add_argument("--bag", choices=BAGS, default=DEFAULT_BAG,
                   help="seeds: each trial member's models train on all labeled pairs from different seeds; "
                        "folds: one model per cross-validation fold of the search, each on that fold's training "
                        f"part (--seeds does not apply). Default {DEFAULT_BAG}")
    return p.parse_args(argv)


def parse_members(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in MEMBER_KINDS]
    if unknown or not names or len(set(names)) < len(names):
        raise UserError(f"--members {text}: expected distinct names among {', '.join(MEMBER_KINDS)}, "
                        f"comma-separated")
    return names


def read_ensemble(client, parent_id: str | None) -> dict | None:
    """The ensemble the search selected (its parent run's ENSEMBLE_ARTIFACT), or None."""
    import json

    from mlflow.exceptions import MlflowException
    from mmsa.app.run_tags import ENSEMBLE_ARTIFACT
    if not parent_id:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return json.loads(Path(client.download_artifacts(parent_id, ENSEMBLE_ARTIFACT, tmp)).read_text())
        except (MlflowException, OSError, ValueError):
            return None


def resolve(args) -> Plan:
    """Every flag and the run's records checked and combined, before anything trains."""
    from mlflow.tracking import MlflowClient
    uri = tracking_uri(args.tracking_uri)
    if sqlite_file(uri) is not None and not sqlite_file(uri).exists():
        raise UserError(f"tracking URI {uri}: no MLflow store there (run a search first)")
    client = MlflowClient(uri)
    flat, epochs, parent_id, what, trial = resolve_run(client, args.run_id)
    cfg = _stopping(Config.from_stored(flat, source=f"config of {what}"), epochs, args.data)
    is_search = what.startswith("search")
    ensemble = read_ensemble(client, parent_id) if is_search else None
    if args.members is None:
        kinds = ["ensemble"] if ensemble else ["best"]
    else:
        kinds = parse_members(args.members)
    if "ensemble" in kinds and not ensemble:
        raise UserError(f"--members ensemble: {what if is_search else f'--run-id {args.run_id} is one trial, and'} "
                        f"has no selected ensemble (a search logs ensemble.json once a trial ran every fold); "
                        f"use --members best")
    if args.seeds is not None and (args.seeds < 1 or args.bag == "folds"):
        raise UserError(f"--seeds {args.seeds}: " + ("does not apply with --bag folds (one model per fold)"
                                                     if args.bag == "folds" else "must be >= 1"))
    cv_folds = int(client.get_run(parent_id).data.params.get("cv_folds", 1)) if parent_id else 1
    if args.bag == "folds" and cv_folds < 2:
        raise UserError(f"--bag folds: {what} was not cross-validated (cv_folds {cv_folds}); use --bag seeds")
    members = plan_members(client, kinds, cfg, trial, ensemble, args.data)
    for m in members:
        if m.kind != "trial":
            continue
        # top layers trained on their cached inputs cost about what a frozen head does; both whole
        # backbones do not
        both_backbones = m.cfg.data.finetune == "full"
        m.models = cv_folds if args.bag == "folds" else (args.seeds or (1 if both_backbones else DEFAULT_SEEDS))
        if m.models > 1 and m.cfg.data.finetune == "full":
            raise UserError(f"--{'bag folds' if args.bag == 'folds' else f'seeds {m.models}'}: several models of "
                            f"{m.name} would each fine-tune both backbones (finetune=full); use --seeds 1")
    return Plan(client, uri, cfg, what, trial, parent_id, args.bag, members, Path(args.out), args.register)


def plan_members(client, kinds: list[str], cfg: Config, trial, ensemble: dict | None,
                 data_dir: str | None) -> list[MemberPlan]:
    """The members `kinds` name, each kind the same share; a member named twice (the probe listed
    and also in the ensemble) is one member with both shares."""
    share = 1 / len(kinds)
    planned: dict[str, MemberPlan] = {}

    def add(m: MemberPlan) -> None:
        if m.source in planned:
            planned[m.source].weight += m.weight
        else:
            planned[m.source] = m
    for kind in kinds:
        if kind == "best":
            add(MemberPlan("chosen config", "trial", cfg, share, trial.info.run_id))
        elif kind == "probe":
            add(MemberPlan("linear probe", "probe", cfg, share, "probe"))
        elif kind == "finetune":
            add(MemberPlan(f"fine-tuned {cfg.data.text_encoder}", "finetune", finetune_recipe(cfg), share, "finetune"))
        else:
            for m in ensemble["members"]:
                if m["run_id"] is None:
                    add(MemberPlan("linear probe", "probe", cfg, share * m["weight"], "probe"))
                    continue
                flat, epochs, _, _, _ = resolve_run(client, m["run_id"])
                member_cfg = _stopping(Config.from_stored(flat, source=f"config of trial {m['name']}"), epochs, data_dir)
                add(MemberPlan(f"trial {m['name']}", "trial", member_cfg, share * m["weight"], m["run_id"]))
    return list(planned.values())


def _stopping(cfg: Config, epochs: int, data_dir: str | None) -> Config:
    """`cfg` stopping at `epochs` of its schedule, reading `data_dir` where given."""
    if data_dir:
        cfg.data.data_dir = data_dir
    cfg.train.stop_epoch = epochs
    return cfg


def finetune_recipe(cfg: Config) -> Config:
    """The fixed fine-tuning recipe (FINETUNE_MEMBER) on `cfg`'s data."""
    keep = {k: getattr(cfg.data, k) for k in ("data_dir", "cache_dir", "text_encoder", "image_encoder",
                                               "max_text_len", "text_clean", "split_seed")}
    from mmsa.features.encoders import build_text_encoder
    layers = build_text_encoder(cfg.data.text_encoder).num_layers  # the whole text model trains
    return Config.from_flat({**keep, **FINETUNE_MEMBER, "text_finetune_layers": layers, "seed": cfg.train.seed,
                             "device": cfg.train.device, "num_threads": cfg.train.num_threads},
                            source="--members finetune")


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    plan = resolve(parse_args(argv))
    if any(m.name == "chosen config" for m in plan.members):
        warning = probe_warning(plan.client, plan.trial, plan.parent_id, plan.cfg.train.monitor)
        if warning:
            print(warning, flush=True)
    cfg = plan.cfg
    print(f"final model of {plan.what}: " + " + ".join(f"{m.name} ({m.weight:.2f})" for m in plan.members),
          flush=True)

    from mmsa.features.prepare import prepare
    from mmsa.data.files import write_predictions
    from mmsa.models.ensemble import feature_key, predict_members
    from mmsa.models.runtime import resolve_device
    t0 = time.time()
    data = prepare(cfg.data, val_fraction=0.0)
    if not data.test.guids:
        raise UserError(f"{cfg.data.data_dir}: test_without_label.txt is missing or empty")
    prepared = {feature_key(cfg.data): data}

    def prepared_for(data_cfg):
        key = feature_key(data_cfg)
        if key not in prepared:
            prepared[key] = prepare(data_cfg, val_fraction=0.0)
        return prepared[key]
    members, losses = [], []
    for m in plan.members:
        trained, loss = train_member(m, plan.bag, prepared_for)
        members += trained
        losses += loss
    probs = predict_members(members, lambda c: (prepared_for(c).features, prepared_for(c).test.rows),
                            resolve_device(cfg.train.device))
    tags = [LABELS[i] for i in probs.argmax(1)]
    write_predictions(plan.out, data.test.guids, tags)

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
    _log_final_run(plan, members, data, tags, metrics)
    print(f"done in {time.time() - t0:.0f}s", flush=True)
    print(f"predictions={plan.out}", flush=True)
    return 0


def _show(epoch: int, metrics: dict) -> None:
    from mmsa.training.fit import format_epoch
    print(format_epoch(epoch, metrics), flush=True)


def train_member(m: MemberPlan, bag: str, prepared_for) -> tuple[list, list[float]]:
    """The models of one planned member, trained on all labeled pairs (a trial's, with --bag folds,
    on each fold's training part), sharing its weight; and their last training losses.
    prepared_for(data config) -> Prepared (features built once per kind)."""
    from mmsa.models.ensemble import Member
    from mmsa.training.fit import fit
    data = prepared_for(m.cfg.data)
    if m.kind == "probe":
        from mmsa.models.factory import probe_config, probe_head
        from mmsa.models.probe import fit_probe
        probe_cfg = probe_config(m.cfg)
        data = prepared_for(probe_cfg.data)
        probe_cfg = probe_cfg.with_features(data.features)
        print(f"member: {m.name}", flush=True)
        weights = fit_probe(data.features, data.train, lexicon=probe_cfg.model.lexicon)
        return [Member(m.name, probe_cfg, probe_head(probe_cfg, *weights), m.weight)], []
    cfg, k = m.cfg, m.models
    if bag == "folds" and m.kind == "trial":
        from mmsa.features.prepare import cv_splits
        parts = cv_splits(data.train, k, cfg.data.split_seed, cfg.data.val_fraction)
        runs = [(f"fold {i + 1}", cfg, train) for i, (train, _) in enumerate(parts)]
    else:
        runs = []
        for i in range(k):
            seeded = copy.deepcopy(cfg)
            seeded.train.seed = cfg.train.seed + i
            runs.append((f"seed {seeded.train.seed}", seeded, data.train))
    print(f"member: {m.name}, {k} model(s) for {cfg.train.stop_epoch} of {cfg.train.max_epochs} scheduled epochs",
          flush=True)
    members, losses = [], []
    for name, run_cfg, train in runs:
        if k > 1:
            print(f"{m.name}: {name}", flush=True)
        result = fit(run_cfg, data.features, train, None, on_epoch=_show, progress=cfg.data.finetune == "full")
        members.append(Member(f"{m.name}, {name}" if k > 1 else m.name, result.cfg, result.model, weight=m.weight / k))
        losses.append(result.metrics["train_loss"])
    return members, losses


def _log_final_run(plan: Plan, members: list, data, tags: list[str], metrics: dict) -> None:
    """The final run, a child of the search: config, members, metrics, datasets, the trial's
    cross-validated confusion matrix, the predictions and the model (registered if asked)."""
    from mlflow.entities import Metric, Param

    from mmsa.app.records import context_tags, digests, load_confusion, log_confusion, log_datasets
    client, cfg, parent_id = plan.client, plan.cfg, plan.parent_id
    experiment_id = (client.get_run(parent_id).info.experiment_id if parent_id
                     else client.get_experiment_by_name("Default").experiment_id)
    run_tags = {TAG_KIND: "final", TAG_SOURCE: plan.what}
    if parent_id:
        run_tags[TAG_PARENT] = parent_id
    rid = client.create_run(experiment_id, run_name="final-retrain", tags=context_tags(run_tags)).info.run_id
    log_datasets(client, rid, cfg.data.data_dir, digests(data.features, {"train": data.train, "test": data.test}))
    # The test labels are unknown: the matrix that says how this config errs is its trial's
    # cross-validated one.
    confusion = load_confusion(client, plan.trial.info.run_id)
    if confusion is not None:
        log_confusion(client, rid, confusion["matrix"], f"cross-validated, {confusion['title']}")
    now = int(time.time() * 1000)
    client.log_batch(rid, params=[Param(k, str(v)) for k, v in sorted(cfg.to_flat().items())]
                     + [Param("members", " + ".join(f"{m.name} ({m.weight:.3g})" for m in members)[:6000])])
    metrics = {**metrics, "n_predictions": len(tags), "n_members": len(members),
               **{f"pred_share_{n}": tags.count(n) / len(tags) for n in LABELS}}
    client.log_batch(rid, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    client.log_artifact(rid, str(plan.out), artifact_path="predictions")
    import mlflow

    from mmsa.models.ensemble import save_members
    from mmsa.app.pyfunc import input_example, log_model
    mlflow.set_tracking_uri(plan.uri)
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=rid):
        ckpt = Path(tmp) / "model.pt"
        save_members(ckpt, members)
        info = log_model(ckpt, members, input_example(cfg.data.data_dir, data.test.guids[:2]), plan.register)
    print(f"logged final run {rid}" + (f" under search {parent_id}" if parent_id else "")
          + f"; model {info.model_uri}", flush=True)
    if plan.register:
        print(f"registered: models:/{plan.register}/{info.registered_model_version}", flush=True)

