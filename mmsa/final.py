"""`python -m mmsa.final --run-id ID`: retrain the chosen config on all labeled pairs, predict the test set.

ID is a search's parent run (its chosen config, best_config.yaml) or one trial's run (that
trial's params). The number of epochs comes from the search: the retrain replays the trial's
learning-rate schedule (warm-up + cosine over its max_epochs) and stops at the trial's
`best_epoch`, where its mean over the cross-validation folds peaked. A chosen config that scored
below the linear probe on the same folds gets a one-line warning. By default it trains an
ensemble of 5 models from different seeds (`--ensemble`); `--bag folds` instead bags one model
per fold of the search. `--blend` adds members whose probabilities are averaged with the
ensemble's: the linear probe, a fine-tuned MiniLM (README, Results, measures each choice).
The predictions file is written atomically; the config, metrics, datasets, the cross-validated
confusion matrix of the chosen trial, the predictions and the model (an MLflow pyfunc model
holding every member's checkpoint, mmsa.pyfunc; registered with `--register`) are logged as a
child run of the search.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml

from mmsa.cli import quiet_libraries, run_main
from mmsa.config import Config
from mmsa.data import LABELS
from mmsa.errors import UserError
from mmsa.run_tags import TAG_BEST_RUN, TAG_KIND, TAG_PARENT, TAG_SOURCE, sqlite_file, tracking_uri

DEFAULT_ENSEMBLE = 5
BLENDS = ("probe", "finetune")
DEFAULT_BLEND = "probe,finetune"
# The fine-tuned text member (--blend finetune): the whole MiniLM trains at lr * text_lr_scale
# = 3e-5 on the cached embedding output, an mlp head on it and the cached image tokens at 1e-3,
# on a 3-epoch warm-up + cosine schedule stopped after epoch 2, the epoch cross-validation chose
# (bench/results/cv_finetune.md).
FINETUNE_EPOCHS = 2
FINETUNE_MEMBER = {"finetune": "last_k", "head": "mlp", "pooling": "mean", "lr": 1e-3, "text_lr_scale": 0.03,
                   "max_epochs": 3, "stop_epoch": FINETUNE_EPOCHS, "ensemble": 1}  # + every text layer
DEFAULT_MODEL_NAME = "mmsa-sentiment"  # what --register names the model when given no name
BAGS = ("seeds", "folds")
DEFAULT_BAG = "seeds"


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


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    p = argparse.ArgumentParser(prog="python -m mmsa.final", description=__doc__.splitlines()[0])
    p.add_argument("--run-id", required=True, help="a search's parent run id, or one trial's run id")
    p.add_argument("--data", help="dataset folder (default: the one the search used)")
    p.add_argument("--out", default="predictions.txt", help="predictions file (default: predictions.txt)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                   "sqlite:///mlruns/mlflow.db)")
    p.add_argument("--ensemble", type=int, metavar="K",
                   help=f"models trained from different seeds, probabilities averaged; replaces the config's "
                        f"ensemble (default {DEFAULT_ENSEMBLE}, or 1 with finetune=full; 1: one model, as a "
                        "trial trains)")
    p.add_argument("--register", nargs="?", const=DEFAULT_MODEL_NAME, metavar="NAME",
                   help="register the logged model in the MLflow model registry as NAME (a new version "
                        f"each time; bare --register: {DEFAULT_MODEL_NAME}). Without it the model is "
                        "still logged on the final run, as an MLflow model")
    p.add_argument("--blend", default=DEFAULT_BLEND, metavar="MEMBERS",
                   help="models whose class probabilities are averaged with the chosen config's, comma-separated: "
                        "probe (the linear probe on all labeled pairs), finetune (MiniLM fine-tuned with an mlp "
                        f"head on cached image features, {FINETUNE_EPOCHS} epochs of a 3-epoch schedule), or none. "
                        "Default "
                        f"{DEFAULT_BLEND} (README, Results, measures each)")
    p.add_argument("--bag", choices=BAGS, default=DEFAULT_BAG,
                   help="seeds: the ensemble's models train on all labeled pairs from different seeds; folds: "
                        "one model per cross-validation fold of the search, each on that fold's training part "
                        f"(as many models as folds; --ensemble does not apply). Default {DEFAULT_BAG}")
    args = p.parse_args(argv)
    blend = parse_blend(args.blend)

    from mlflow.tracking import MlflowClient
    uri = tracking_uri(args.tracking_uri)
    if sqlite_file(uri) is not None and not sqlite_file(uri).exists():
        raise UserError(f"tracking URI {uri}: no MLflow store there (run a search first)")
    client = MlflowClient(uri)
    flat, epochs, parent_id, what, trial = resolve_run(client, args.run_id)
    cfg = Config.from_flat(flat, source=f"config of {what}")
    warning = probe_warning(client, trial, parent_id, cfg.train.monitor)
    if warning:
        print(warning, flush=True)
    if args.data:
        cfg.data.data_dir = args.data
    cfg.train.stop_epoch = epochs
    cv_folds = int(client.get_run(parent_id).data.params.get("cv_folds", 1)) if parent_id else 1
    if args.bag == "folds":
        if args.ensemble is not None:
            raise UserError("--ensemble: does not apply with --bag folds (one model per fold)")
        if cv_folds < 2:
            raise UserError(f"--bag folds: {what} was not cross-validated (cv_folds {cv_folds}); use --bag seeds")
        cfg.model.ensemble = cv_folds
        cfg.validate("--bag folds")  # an ensemble: not with finetune=full
        models = f"one model on each of the search's {cv_folds} folds' training parts"
    else:
        if args.ensemble is not None:
            cfg.model.ensemble = args.ensemble
            cfg.validate(f"--ensemble {args.ensemble}")  # >= 1, and 1 with finetune=full
        elif cfg.data.finetune != "full":
            cfg.model.ensemble = DEFAULT_ENSEMBLE
        models = (f"an ensemble of {cfg.model.ensemble} models" if cfg.model.ensemble > 1 else "1 model") + \
            " on all labeled pairs"
    print(f"config of {what}; retraining {models} for {epochs} of {cfg.train.max_epochs} scheduled epochs",
          flush=True)

    from mmsa.prepare import prepare
    from mmsa.train import fit, format_epoch, resolve_device
    t0 = time.time()
    data = prepare(cfg.data, val_fraction=0.0)
    if not data.test.guids:
        raise UserError(f"{cfg.data.data_dir}: test_without_label.txt is missing or empty")
    report = data.dataset.report
    show = lambda e, m: print(format_epoch(e, m), flush=True)  # noqa: E731
    if args.bag == "folds":
        result = fit_fold_bag(cfg, data, cv_folds, show)
    else:
        result = fit(cfg, data.features, data.train, None, on_epoch=show, progress=cfg.data.finetune == "full")
    from mmsa.predictor import Member, feature_key, predict_members, write_predictions
    prepared = {feature_key(cfg.data): data}

    def prepared_for(data_cfg):
        key = feature_key(data_cfg)
        if key not in prepared:
            prepared[key] = prepare(data_cfg, val_fraction=0.0)
        return prepared[key]
    members = [Member("chosen config", cfg, result.model)]
    members += blend_members(cfg, blend, prepared_for, show)
    if len(members) > 1:
        print("blend: " + " + ".join(m.name for m in members) + ", class probabilities averaged", flush=True)
    probs = predict_members(members, lambda c: (prepared_for(c).features, prepared_for(c).test.rows),
                            resolve_device(cfg.train.device))
    tags = [LABELS[i] for i in probs.argmax(1)]
    out = Path(args.out)
    write_predictions(out, data.test.guids, tags)

    partial = sorted(set(report.missing_image + report.unreadable_image + report.missing_text) & set(data.test.guids))
    if partial:
        print(f"{len(partial)} test pairs predicted from one modality (missing or unreadable file): "
              f"{', '.join(partial[:10])}{' ...' if len(partial) > 10 else ''}", flush=True)
    pred_share = Counter(tags)
    train_share = Counter(LABELS[i] for i in data.train.labels)
    print("class balance   " + "  ".join(f"{name}: pred {pred_share[name] / len(tags):.1%} / train "
                                         f"{train_share[name] / len(data.train):.1%}" for name in LABELS), flush=True)
    _log_final_run(client, uri, parent_id, cfg, result, members, out, tags, what, time.time() - t0, partial, data,
                   trial, args.register)
    print(f"done in {time.time() - t0:.0f}s", flush=True)
    print(f"predictions={out}", flush=True)
    return 0


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
    import dataclasses

    from mmsa.config import ModelConfig
    from mmsa.predictor import Member
    from mmsa.train import fit
    out = []
    if "probe" in blend:
        from mmsa.model import PROBE_HEAD, probe_head
        from mmsa.probe import fit_probe
        data_cfg = dataclasses.replace(cfg.data, finetune="none")
        data = prepared_for(data_cfg)
        model_cfg = dataclasses.replace(ModelConfig(), **PROBE_HEAD, text_dim=data.features.text_dim,
                                        image_dim=data.features.image_dim)
        probe_cfg = Config(data=data_cfg, model=model_cfg, train=copy.deepcopy(cfg.train))
        out.append(Member("linear probe", probe_cfg, probe_head(model_cfg, *fit_probe(data.features, data.train))))
    if "finetune" in blend:
        keep = {k: getattr(cfg.data, k) for k in ("data_dir", "cache_dir", "text_encoder", "image_encoder",
                                                   "max_text_len", "text_clean", "split_seed")}
        from mmsa.encoders import build_text_encoder
        layers = build_text_encoder(cfg.data.text_encoder).num_layers  # the whole text model trains
        ft_cfg = Config.from_flat({**keep, **FINETUNE_MEMBER, "text_finetune_layers": layers, "seed": cfg.train.seed,
                                   "device": cfg.train.device, "num_threads": cfg.train.num_threads},
                                  source="--blend finetune")
        data = prepared_for(ft_cfg.data)
        print(f"blend member: fine-tuned {cfg.data.text_encoder}, {ft_cfg.train.stop_epoch} of "
              f"{ft_cfg.train.max_epochs} scheduled epochs", flush=True)
        out.append(Member(f"fine-tuned {cfg.data.text_encoder}", ft_cfg,
                          fit(ft_cfg, data.features, data.train, None, on_epoch=on_epoch).model))
    return out


def fit_fold_bag(cfg: Config, data, k: int, on_epoch=None):
    """`k` models, each trained on one cross-validation fold's training part (the search's folds:
    same labels, k and split seed), as one ensemble that averages their probabilities."""

    from mmsa.model import build_head
    from mmsa.prepare import cv_splits
    from mmsa.train import FitResult, fit
    single = copy.deepcopy(cfg)
    single.model.ensemble = 1
    parts = []
    for i, (train, _) in enumerate(cv_splits(data.train, k, cfg.data.split_seed, cfg.data.val_fraction)):
        print(f"fold {i + 1} of {k}: {len(train)} pairs", flush=True)
        parts.append(fit(single, data.features, train, None, on_epoch=on_epoch))
    cfg.model = copy.deepcopy(single.model)  # the feature sizes fit filled in
    cfg.model.ensemble = k
    model = build_head(cfg.model).to(next(parts[0].model.parameters()).device)
    for member, part in zip(model.members, parts):
        member.load_state_dict(part.model.state_dict())
    metrics = {**parts[-1].metrics, "train_loss": sum(p.metrics["train_loss"] for p in parts) / k}
    return FitResult(metrics=metrics, model=model, history=[h for p in parts for h in p.history])


def _log_final_run(client, uri, parent_id, cfg, result, members, out: Path, tags, what, seconds, partial, data,
                   trial, register: str | None) -> None:
    from mmsa.records import context_tags, digests, load_confusion, log_confusion, log_datasets
    run = client.get_run(parent_id) if parent_id else None
    experiment_id = run.info.experiment_id if run else client.get_experiment_by_name("Default").experiment_id
    run_tags = {TAG_KIND: "final", TAG_SOURCE: what}
    if parent_id:
        run_tags[TAG_PARENT] = parent_id
    final = client.create_run(experiment_id, run_name="final-retrain", tags=context_tags(run_tags))
    rid = final.info.run_id
    log_datasets(client, rid, cfg.data.data_dir, digests(data.features, {"train": data.train, "test": data.test}))
    # The test labels are unknown: the matrix that says how this config errs is its trial's
    # cross-validated one.
    confusion = load_confusion(client, trial.info.run_id)
    if confusion is not None:
        log_confusion(client, rid, confusion["matrix"], f"cross-validated, {confusion['title']}")
    from mlflow.entities import Metric, Param
    now = int(time.time() * 1000)
    client.log_batch(rid, params=[Param(k, str(v)) for k, v in sorted(cfg.to_flat().items())]
                     + [Param("blend_members", " + ".join(m.name for m in members))])
    metrics = {"train_loss": result.metrics["train_loss"], "epochs": result.metrics["epochs_run"],
               "seconds": seconds, "n_predictions": len(tags), "n_single_modality": len(partial)}
    metrics.update({f"pred_share_{n}": tags.count(n) / len(tags) for n in LABELS})
    client.log_batch(rid, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    client.log_artifact(rid, str(out), artifact_path="predictions")
    import mlflow

    from mmsa.predictor import save_members
    from mmsa.pyfunc import input_example, log_model
    mlflow.set_tracking_uri(uri)
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=rid):
        ckpt = Path(tmp) / "model.pt"
        save_members(ckpt, members)
        info = log_model(ckpt, members, input_example(cfg.data.data_dir, data.test.guids[:2]), register)
    print(f"logged final run {rid}" + (f" under search {parent_id}" if parent_id else "")
          + f"; model {info.model_uri}", flush=True)
    if register:
        print(f"registered: models:/{register}/{info.registered_model_version}", flush=True)


def cli() -> None:
    """The console script's entry point."""
    run_main(main)


if __name__ == "__main__":
    cli()
