"""`python -m mmsa.final --run-id ID`: retrain the chosen config on all labeled pairs, predict the test set.

ID is a search's parent run (its chosen config, best_config.yaml) or one trial's run (that
trial's params). The number of epochs comes from the search: the retrain replays the trial's
learning-rate schedule (warm-up + cosine over its max_epochs) and stops at the trial's
`best_epoch`, where its mean over the cross-validation folds peaked. A chosen config that scored
below the linear probe on the same folds gets a one-line warning.

The final model is a list of weighted members (mmsa.models.ensemble): by default the chosen config
trained from 5 seeds (`--ensemble`; `--bag folds`: one model per fold of the search), together
weighing as one member, plus the `--blend` members (the linear probe, a fine-tuned MiniLM) at
the same weight each. The predictions file is written atomically; the config, metrics,
datasets, the cross-validated confusion matrix of the chosen trial, the predictions and the model
(an MLflow pyfunc model holding every member, mmsa.app.pyfunc; registered with `--register`) are
logged as a child run of the search.
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

from mmsa.app.commands import quiet_libraries, run_main
from mmsa.config import Config
from mmsa.data.dataset import LABELS
from mmsa.errors import UserError
from mmsa.app.run_tags import TAG_BEST_RUN, TAG_KIND, TAG_PARENT, TAG_SOURCE, sqlite_file, tracking_uri

DEFAULT_ENSEMBLE = 5
BLENDS = ("probe", "finetune")
DEFAULT_BLEND = "probe,finetune"
# The fine-tuned text member (--blend finetune): the whole MiniLM trains at lr * text_lr_scale
# = 3e-5 on the cached embedding output, an mlp head on it and the cached image tokens at 1e-3,
# on a 3-epoch warm-up + cosine schedule stopped after epoch 2, the epoch cross-validation chose
# (bench/results/cv_finetune.md).
FINETUNE_EPOCHS = 2
FINETUNE_MEMBER = {"finetune": "last_k", "head": "mlp", "pooling": "mean", "lr": 1e-3, "text_lr_scale": 0.03,
                   "max_epochs": 3, "stop_epoch": FINETUNE_EPOCHS}  # + every text layer
DEFAULT_MODEL_NAME = "mmsa-sentiment"  # what --register names the model when given no name
BAGS = ("seeds", "folds")
DEFAULT_BAG = "seeds"


@dataclass
class Plan:
    """What final does, resolved once from the flags and the tracking store."""

    client: object  # MlflowClient
    uri: str
    cfg: Config  # the chosen config, stopping at its best epoch
    what: str  # where the config came from, for the user
    trial: object  # the trial run that scored it
    parent_id: str | None
    bag: str
    models: int  # of the chosen config: seeds, or folds of the search
    blend: list[str]
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
    p = argparse.ArgumentParser(prog="python -m mmsa.final", description=__doc__.splitlines()[0])
    p.add_argument("--run-id", required=True, help="a search's parent run id, or one trial's run id")
    p.add_argument("--data", help="dataset folder (default: the one the search used)")
    p.add_argument("--out", default="predictions.txt", help="predictions file (default: predictions.txt)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                   "sqlite:///mlruns/mlflow.db)")
    p.add_argument("--ensemble", type=int, metavar="K",
                   help=f"models of the chosen config trained from K seeds, together one member of the final "
                        f"model (default {DEFAULT_ENSEMBLE}, or 1 with finetune=full; 1: one model, as a trial trains)")
    p.add_argument("--register", nargs="?", const=DEFAULT_MODEL_NAME, metavar="NAME",
                   help="register the logged model in the MLflow model registry as NAME (a new version "
                        f"each time; bare --register: {DEFAULT_MODEL_NAME}). Without it the model is "
                        "still logged on the final run, as an MLflow model")
    p.add_argument("--blend", default=DEFAULT_BLEND, metavar="MEMBERS",
                   help="members whose class probabilities are averaged with the chosen config's, comma-separated: "
                        "probe (the linear probe on all labeled pairs), finetune (MiniLM fine-tuned with an mlp "
                        f"head on cached image features, {FINETUNE_EPOCHS} epochs of a 3-epoch schedule), or none. "
                        f"Default {DEFAULT_BLEND} (docs/results.md measures each)")
    p.add_argument("--bag", choices=BAGS, default=DEFAULT_BAG,
                   help="seeds: the chosen config's models train on all labeled pairs from different seeds; folds: "
                        "one model per cross-validation fold of the search, each on that fold's training part "
                        f"(as many models as folds; --ensemble does not apply). Default {DEFAULT_BAG}")
    return p.parse_args(argv)


def resolve(args) -> Plan:
    """Every flag and the run's records checked and combined, before anything trains."""
    blend = parse_blend(args.blend)
    from mlflow.tracking import MlflowClient
    uri = tracking_uri(args.tracking_uri)
    if sqlite_file(uri) is not None and not sqlite_file(uri).exists():
        raise UserError(f"tracking URI {uri}: no MLflow store there (run a search first)")
    client = MlflowClient(uri)
    flat, epochs, parent_id, what, trial = resolve_run(client, args.run_id)
    cfg = Config.from_stored(flat, source=f"config of {what}")
    if args.data:
        cfg.data.data_dir = args.data
    cfg.train.stop_epoch = epochs
    cv_folds = int(client.get_run(parent_id).data.params.get("cv_folds", 1)) if parent_id else 1
    if args.bag == "folds":
        if args.ensemble is not None:
            raise UserError("--ensemble: does not apply with --bag folds (one model per fold)")
        if cv_folds < 2:
            raise UserError(f"--bag folds: {what} was not cross-validated (cv_folds {cv_folds}); use --bag seeds")
        models = cv_folds
    else:
        models = args.ensemble if args.ensemble is not None else (1 if cfg.data.finetune == "full" else DEFAULT_ENSEMBLE)
        if models < 1:
            raise UserError(f"--ensemble {args.ensemble}: must be >= 1")
    if models > 1 and cfg.data.finetune == "full":
        raise UserError(f"--{'bag folds' if args.bag == 'folds' else f'ensemble {models}'}: several models of "
                        f"{what} would each fine-tune both backbones (finetune=full); use --ensemble 1")
    return Plan(client, uri, cfg, what, trial, parent_id, args.bag, models, blend, Path(args.out), args.register)


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    plan = resolve(parse_args(argv))
    warning = probe_warning(plan.client, plan.trial, plan.parent_id, plan.cfg.train.monitor)
    if warning:
        print(warning, flush=True)
    cfg = plan.cfg
    models = (f"one model on each of the search's {plan.models} folds' training parts" if plan.bag == "folds" else
              (f"{plan.models} models (seeds {cfg.train.seed}..{cfg.train.seed + plan.models - 1})"
               if plan.models > 1 else "1 model") + " on all labeled pairs")
    print(f"config of {plan.what}; retraining {models} for {cfg.train.stop_epoch} of {cfg.train.max_epochs} "
          f"scheduled epochs", flush=True)

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
    members, train_loss = chosen_members(plan, data)
    blended = blend_members(cfg, plan.blend, prepared_for, _show)
    if blended:
        chosen = "chosen config" + (f" ({plan.models} models)" if plan.models > 1 else "")
        print(f"blend: {' + '.join([chosen] + [m.name for m in blended])}, class probabilities averaged, "
              f"each of the {1 + len(blended)} with the same weight", flush=True)
    members += blended
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
    _log_final_run(plan, members, data, tags, {"train_loss": train_loss, "epochs": cfg.train.stop_epoch,
                                               "seconds": time.time() - t0, "n_single_modality": len(partial)})
    print(f"done in {time.time() - t0:.0f}s", flush=True)
    print(f"predictions={plan.out}", flush=True)
    return 0


def _show(epoch: int, metrics: dict) -> None:
    from mmsa.training.fit import format_epoch
    print(format_epoch(epoch, metrics), flush=True)


def chosen_members(plan: Plan, data) -> tuple[list, float]:
    """The chosen config's models, together one member's weight: one per seed on all labeled
    pairs, or (--bag folds) one per fold of the search on that fold's training part. Returns
    them and their mean last training loss."""
    from mmsa.models.ensemble import Member
    from mmsa.features.prepare import cv_splits
    from mmsa.training.fit import fit
    cfg, k = plan.cfg, plan.models
    if plan.bag == "folds":
        parts = cv_splits(data.train, k, cfg.data.split_seed, cfg.data.val_fraction)
        runs = [(f"fold {i + 1}", cfg, train, f"fold {i + 1} of {k}: {len(train)} pairs")
                for i, (train, _) in enumerate(parts)]
    else:
        runs = []
        for i in range(k):
            seeded = copy.deepcopy(cfg)
            seeded.train.seed = cfg.train.seed + i
            runs.append((f"seed {seeded.train.seed}", seeded, data.train, f"seed {seeded.train.seed}" if k > 1 else ""))
    members, losses = [], []
    for name, run_cfg, train, say in runs:
        if say:
            print(say, flush=True)
        result = fit(run_cfg, data.features, train, None, on_epoch=_show, progress=cfg.data.finetune == "full")
        members.append(Member(f"chosen config, {name}" if k > 1 else "chosen config", result.cfg, result.model,
                              weight=1 / k))
        losses.append(result.metrics["train_loss"])
    return members, sum(losses) / len(losses)


def parse_blend(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["none"]:
        return []
    unknown = [n for n in names if n not in BLENDS]
    if unknown or not names:
        raise UserError(f"--blend {text}: expected a comma-separated subset of {', '.join(BLENDS)}, or none")
    return names


def blend_members(cfg: Config, blend: list[str], prepared_for, on_epoch=None) -> list:
    """The members `blend` names, trained on all labeled pairs. prepared_for(data config) ->
    Prepared (features built once per kind)."""
    from mmsa.models.ensemble import Member
    from mmsa.training.fit import fit
    out = []
    if "probe" in blend:
        from mmsa.models.factory import probe_config, probe_head
        from mmsa.models.probe import fit_probe
        probe_cfg = probe_config(cfg)
        data = prepared_for(probe_cfg.data)
        probe_cfg = probe_cfg.with_features(data.features)
        out.append(Member("linear probe", probe_cfg, probe_head(probe_cfg, *fit_probe(data.features, data.train))))
    if "finetune" in blend:
        keep = {k: getattr(cfg.data, k) for k in ("data_dir", "cache_dir", "text_encoder", "image_encoder",
                                                   "max_text_len", "text_clean", "split_seed")}
        from mmsa.features.encoders import build_text_encoder
        layers = build_text_encoder(cfg.data.text_encoder).num_layers  # the whole text model trains
        ft_cfg = Config.from_flat({**keep, **FINETUNE_MEMBER, "text_finetune_layers": layers, "seed": cfg.train.seed,
                                   "device": cfg.train.device, "num_threads": cfg.train.num_threads},
                                  source="--blend finetune")
        data = prepared_for(ft_cfg.data)
        print(f"blend member: fine-tuned {cfg.data.text_encoder}, {ft_cfg.train.stop_epoch} of "
              f"{ft_cfg.train.max_epochs} scheduled epochs", flush=True)
        result = fit(ft_cfg, data.features, data.train, None, on_epoch=on_epoch)
        out.append(Member(f"fine-tuned {cfg.data.text_encoder}", result.cfg, result.model))
    return out


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


def cli() -> None:
    """The console script's entry point."""
    run_main(main)


if __name__ == "__main__":
    cli()
