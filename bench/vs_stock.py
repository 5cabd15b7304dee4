"""This project's search side by side with what a user would write instead, inside nested CV.

    python -m bench.vs_stock --data ../shared/mvsa [--budgets 2m 5m] [--outer 5] [--only 0,1]
        [--systems project random stock_tune optuna] [--work .cache/vs-stock] [--out vs_stock]

The outer folds are bench/nested_cv.py's (the same seed, the same folders): no search sees an
outer fold's pairs; each system's submitted model is scored there, and every difference is
paired by outer fold. Every system gets the same space (spaces/fusion.yaml's params, as far as
it can express them), the same cached features, the same wall-clock budget for its search and
2 concurrent trials of 1 CPU each where it runs trials concurrently:

- project: `search.run` (5-fold CV per trial, ASHA over folds, TPE with pruned trials, the
  time budget) then `mmsa.final` with its defaults (the selected ensemble);
- random: the same with `searcher: random` (what TPE adds);
- stock_tune: Ray Tune as its documentation teaches: `Tuner` + `OptunaSearch` (TPE) +
  `ASHAScheduler` over epochs, every trial scored on one 80/20 held-out split, `time_budget_s`;
  the best trial's config retrained on all training pairs for its best epoch;
- optuna: Optuna alone: TPE + `MedianPruner` over epochs on the same split, `timeout`, two
  trials at a time (`n_jobs=2`: one at a time, its default, left a core idle, as the first runs
  of 2026-12-04 did); the same retrain.

Results are kept in WORK/results.json as they come (a stopped run continues where it was).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


import numpy as np
import yaml

from bench.common import ROOT, command_line, mean_se, scores, table, write_result
from bench.nested_cv import outer_folders, run, score

SYSTEMS = ("project", "random", "stock_tune", "optuna")
# What each system can express of the project's search (the table says it beside each row).
SCORING = {
    "project": "k-fold CV per trial, ASHA over folds, TPE; ensemble selected from out-of-fold predictions, retrained",
    "random": "the project's, with random proposals instead of TPE",
    "stock_tune": "one 80/20 split, ASHA over epochs, TPE (OptunaSearch); the best config retrained; no CV, no ensemble",
    "optuna": "one 80/20 split, MedianPruner over epochs, TPE; the best config retrained; no CV, no ensemble",
}
SEED = 0


def stock_setting(folder: Path, space_file: Path):
    """(the space, its base config on `folder`) for the stock systems, with the features cached
    before any clock starts (search.run builds them before its budget starts too)."""
    import dataclasses

    from mmsa.features.prepare import prepare
    from search.space import load_space
    spec = load_space(space_file)
    base = spec.base_config().updated({"data_dir": str(folder)}, source="--data")
    for finetune in spec.params["finetune"].values if "finetune" in spec.params else [base.data.finetune]:
        prepare(dataclasses.replace(base.data, finetune=finetune), val_fraction=0.2)
    return spec, base


def trial_fit(base, params: dict, report, stop_epoch: int = 0, val_fraction: float = 0.2):
    """Train `base` + `params` on the folder's 80/20 split (val_fraction 0: on every labeled
    pair, for stop_epoch epochs), calling report(epoch, val_acc) after each epoch."""
    from mmsa.features.prepare import prepare
    from mmsa.training.fit import fit
    cfg = base.updated(params, source="trial").with_train(patience=0, stop_epoch=stop_epoch, num_threads=1)
    data = prepare(cfg.data, val_fraction=val_fraction)
    on_epoch = (lambda e, m: report(e, m["val_acc"])) if val_fraction else None
    return fit(cfg, data.features, data.train, data.val if val_fraction else None, on_epoch=on_epoch), data


def retrain_and_score(base, params: dict, best_epoch: int, truth: dict[str, int]) -> dict:
    """The chosen config trained on every labeled pair for its best epoch, scored on the outer fold."""
    import torch

    from mmsa.models.runtime import predict_proba
    result, data = trial_fit(base, params, None, stop_epoch=best_epoch, val_fraction=0.0)
    probs = predict_proba(result.model, data.features, data.test.rows, torch.device("cpu"))
    return scores([truth[g] for g in data.test.guids], probs.argmax(1))


def stock_tune(folder: Path, space_file: Path, budget_s: float, truth: dict[str, int]) -> dict:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch
    spec, base = stock_setting(folder, space_file)

    def trainable(config):
        trial_fit(base, config, lambda epoch, acc: tune.report({"val_acc": acc, "epoch": epoch}))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": 1}),
            tune_config=tune.TuneConfig(
                metric="val_acc", mode="max", num_samples=spec.num_samples, max_concurrent_trials=2,
                search_alg=OptunaSearch(space={k: p.to_optuna() for k, p in spec.params.items()}, metric="val_acc",
                                        mode="max", seed=SEED),
                scheduler=ASHAScheduler(time_attr="training_iteration", max_t=spec.max_epochs, grace_period=1,
                                        reduction_factor=3),
                time_budget_s=budget_s),
            run_config=tune.RunConfig(storage_path=str(folder.parent / "ray_results"), verbose=0))
        results = tuner.fit()
        best = results.get_best_result(metric="val_acc", mode="max", scope="all")
        frame = best.metrics_dataframe
        best_epoch = int(frame.loc[frame["val_acc"].idxmax(), "epoch"])
        params = {k: best.config[k] for k in spec.params}
        trials = len(results)
    finally:
        ray.shutdown()
    return {**retrain_and_score(base, params, best_epoch, truth), "trials": trials, "best_epoch": best_epoch,
            "inner_val_acc": float(frame["val_acc"].max())}


def optuna_alone(folder: Path, space_file: Path, budget_s: float, truth: dict[str, int]) -> dict:
    import optuna
    spec, base = stock_setting(folder, space_file)

    def objective(trial: optuna.Trial) -> float:
        params = {}
        for name, p in spec.params.items():
            if p.kind == "choice":
                params[name] = trial.suggest_categorical(name, p.values)
            elif p.kind in ("int", "logint"):
                params[name] = trial.suggest_int(name, int(p.low), int(p.high), log=p.kind == "logint")
            else:
                params[name] = trial.suggest_float(name, p.low, p.high, log=p.kind == "loguniform")
        curve = []

        def report(epoch: int, acc: float) -> None:
            curve.append(acc)
            trial.report(acc, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        trial_fit(base, params, report)
        trial.set_user_attr("best_epoch", int(np.argmax(curve)) + 1)
        return max(curve)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=SEED),
                                pruner=optuna.pruners.MedianPruner(n_warmup_steps=1))
    # Two trials at a time, one torch thread each: the two cores the other systems get (its
    # documented n_jobs; torch releases the GIL inside its kernels).
    study.optimize(objective, timeout=budget_s, n_jobs=2)
    best = study.best_trial
    return {**retrain_and_score(base, best.params, best.user_attrs["best_epoch"], truth), "trials": len(study.trials),
            "best_epoch": best.user_attrs["best_epoch"], "inner_val_acc": best.value}


def project(folder: Path, space_file: Path, budget: str, truth: dict[str, int], work: Path, tag: str) -> dict:
    uri = f"sqlite:///{work}/mlruns/mlflow.db"
    out, _ = run([sys.executable, "-m", "search.run", "--space", str(space_file), "--data", str(folder),
                  "--tracking-uri", uri, "--storage", str(work / "ray_results"), "--time-budget", budget])
    parent = out.strip().splitlines()[-1].split("=", 1)[1]
    pred = work / f"pred-{tag}.txt"
    run([sys.executable, "-m", "mmsa.final", "--run-id", parent, "--data", str(folder), "--tracking-uri", uri,
         "--out", str(pred)])
    return {**score(pred, truth), "parent": parent}


def random_space(space_file: Path, work: Path) -> Path:
    space = yaml.safe_load(space_file.read_text())
    space.setdefault("searcher", {})["type"] = "random"
    path = work / "space-random.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def seconds(budget: str) -> float:
    from search.time_budget import parse_duration
    return parse_duration(budget, "--budgets")


def one(system: str, folder: Path, truth: dict[str, int], budget: str, space: Path, work: Path) -> dict:
    """One system's search and submitted model on one outer fold, timed: wall clock, and the
    machine's CPU time (Ray's workers are no children of this process; run nothing else beside)."""
    start, cpu = time.time(), _cpu()
    tag = f"{folder.name}-{system}-{budget}"
    if system in ("project", "random"):
        out = project(folder, space if system == "project" else random_space(space, work), budget, truth, work, tag)
    else:  # in a child: Ray and Optuna state stay out of this process
        result = work / f"{tag}.json"
        run([sys.executable, "-m", "bench.vs_stock", "--child", system, "--folder", str(folder), "--budget", budget,
             "--space", str(space), "--result", str(result), "--truth", json.dumps(truth)])
        out = json.loads(result.read_text())
    return {**out, "wall_min": (time.time() - start) / 60, "cpu_min": (_cpu() - cpu) / 60}


def _cpu() -> float:
    import psutil
    t = psutil.cpu_times()
    return t.user + t.nice + t.system


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.vs_stock", description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/mvsa")
    p.add_argument("--space", default="spaces/fusion.yaml")
    p.add_argument("--budgets", nargs="+", default=["2m", "5m"])
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    p.add_argument("--outer", type=int, default=5)
    p.add_argument("--only", help="comma-separated outer folds to run now")
    p.add_argument("--work", default=".cache/vs-stock")
    p.add_argument("--out", default="vs_stock")
    p.add_argument("--child", choices=("stock_tune", "optuna"), help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--budget", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--truth", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    space = (ROOT / args.space).resolve()
    if args.child:
        fn = stock_tune if args.child == "stock_tune" else optuna_alone
        out = fn(Path(args.folder), space, seconds(args.budget), {g: int(v) for g, v in json.loads(args.truth).items()})
        Path(args.result).write_text(json.dumps(out))
        return
    data, work = Path(args.data).resolve(), (ROOT / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    folders = outer_folders(data, work, args.outer, 0)
    results_file = work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    todo = [int(i) for i in args.only.split(",")] if args.only else list(range(args.outer))
    for i in todo:
        folder, truth = folders[i]
        for budget in args.budgets:
            for system in args.systems:
                key = f"{i}/{budget}/{system}"
                if key in results:
                    continue
                print(f"outer fold {i}, {budget}: {system} ...", flush=True)
                results[key] = one(system, folder, truth, budget, space, work)
                print(f"  {results[key]}", flush=True)
                results_file.write_text(json.dumps(results, indent=1))
    report(results, args, argv)


def report(results: dict, args, argv: list[str] | None) -> None:
    """One row per system and budget over the outer folds it has run; each row's difference is
    paired with the project on the folds both have run."""
    runs = {(budget, system): {int(k.split("/")[0]): v for k, v in results.items()
                               if k.endswith(f"/{budget}/{system}")}
            for budget in args.budgets for system in args.systems}
    rows = []
    for (budget, system), by_fold in runs.items():
        if not by_fold:
            continue
        folds, r = sorted(by_fold), [by_fold[i] for i in sorted(by_fold)]
        project = {i: results.get(f"{i}/{budget}/project") for i in folds} if system != "project" else {}
        paired = [i for i, run in project.items() if run]
        diff = _paired(np.array([project[i]["acc"] - by_fold[i]["acc"] for i in paired])) if paired else ""
        rows.append([budget, system, SCORING[system], ", ".join(map(str, folds)), mean_se([x["acc"] for x in r]),
                     mean_se([x["macro_f1"] for x in r]), diff,
                     f"{np.mean([x['cpu_min'] for x in r]):.1f}", f"{np.mean([x['wall_min'] for x in r]):.1f}"])
    body = table(["budget", "system", "what it scores and submits", "outer folds run", "accuracy (mean ± s.e.)",
                  "macro-F1 (mean ± s.e.)", "project minus it, points (± s.e.; folds project won), paired on "
                  "the folds both ran", "CPU min per fold", "wall min per fold"], rows)
    if len(args.budgets) > 1:
        body += "\n\nAccuracy against budget (mean over the outer folds each budget ran):\n\n" + table(
            ["system"] + list(args.budgets),
            [[system] + [mean_se([v["acc"] for v in runs[b, system].values()]) if runs[b, system] else "not run"
                         for b in args.budgets] for system in args.systems])
    write_result(args.out, "This project against stock Ray Tune, Optuna alone and random search (nested CV)", body,
                 command_line("bench.vs_stock", argv))


def _paired(d: np.ndarray) -> str:
    se = d.std(ddof=1) / np.sqrt(len(d)) * 100 if len(d) > 1 else 0.0
    return f"{d.mean() * 100:+.2f} ± {se:.2f} ({int((d > 0).sum())} of {len(d)})"


if __name__ == "__main__":
    main()
