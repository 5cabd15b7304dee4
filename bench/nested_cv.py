"""The honest estimate of the whole pipeline: nested cross-validation.

An outer stratified K-fold over train.txt. For each outer fold, a course-layout folder is made
whose train.txt holds the outer training part and whose test_without_label.txt holds the outer
fold (files linked, never copied); then the pipeline runs on it as a user runs it:
`search.run` with the space (cross-validation inside) and `mmsa.final`, whose predictions are
scored against the outer fold's labels. Beside it, the linear probe is trained on the same
outer training part. `--final ensemble best+probe+finetune ensemble:seeds=1 ...` scores several
of mmsa.final's variants (its `--members`, parts joined by +) on the same searches.

    python -m bench.nested_cv --data ../shared/mvsa [--space spaces/fusion.yaml] [--outer 5]
        [--only 0,1] [--final ensemble best+probe+finetune ...]

Each outer fold's search and every final variant's score are kept in WORK/results.json as soon
as they are measured: a run that is stopped continues where it was, and a later run with a new
variant reuses the searches (`--only` picks folds; `--reselect` re-runs their ensemble selection
with the current code, for a change to the search's last step alone). The table is written to
bench/results/nested_cv.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from bench.common import ROOT, command_line, mean_std, scores, table, write_result
from mmsa.data.dataset import LABEL_TO_ID, LABELS, DataReport, parse_label_file


def outer_folders(data: Path, work: Path, k: int, seed: int) -> list[tuple[Path, dict[str, int]]]:
    """One course-layout folder per outer fold (links into `data`), and that fold's true labels."""
    from mmsa.data.folds import cv_indices
    rows = parse_label_file(data / "train.txt", labeled=True, report=DataReport())
    labels = np.array([label for _, label in rows])
    out = []
    for i, (train, held) in enumerate(cv_indices(labels, k, seed)):
        folder = work / f"outer{i}"
        if not (folder / "test_without_label.txt").exists():
            (folder / "data").mkdir(parents=True, exist_ok=True)
            for j in np.concatenate([train, held]):
                for ext in ("jpg", "txt"):
                    link = folder / "data" / f"{rows[j][0]}.{ext}"
                    if not link.exists() and (data / "data" / link.name).exists():
                        os.symlink((data / "data" / link.name).resolve(), link)
            (folder / "train.txt").write_text(
                "guid,tag\n" + "".join(f"{rows[j][0]},{LABELS[rows[j][1]]}\n" for j in train))
            (folder / "test_without_label.txt").write_text("guid,tag\n" + "".join(f"{rows[j][0]},null\n" for j in held))
        out.append((folder, {rows[j][0]: int(rows[j][1]) for j in held}))
    return out


def score(pred_file: Path, truth: dict[str, int]) -> dict:
    """A predictions file (`guid,tag`) against the held-out labels."""
    rows = [ln.split(",") for ln in pred_file.read_text().split()[1:]]
    return scores([truth[g] for g, _ in rows], [LABEL_TO_ID[t] for _, t in rows])


def probe_on(folder: Path, truth: dict[str, int], cache_dir: str, lexicon: bool = False) -> dict:
    """The linear probe trained on the folder's train.txt, scored on its test pairs (mmsa.models.probe,
    with the held-out labels as the one fold's validation part); with the lexicon scores or not."""
    from dataclasses import replace

    from mmsa.config import DataConfig
    from mmsa.features.prepare import prepare
    from mmsa.models.probe import probe_cv
    data = prepare(DataConfig(data_dir=str(folder), cache_dir=cache_dir), val_fraction=0.0)
    held = replace(data.test, labels=np.array([truth[g] for g in data.test.guids], dtype=np.int64))
    out = probe_cv(data.features, [(data.train, held)], lexicon=lexicon)
    return {"acc": out["probe_val_acc"], "macro_f1": out["probe_val_macro_f1"]}


def final_flags(variant: str) -> list[str]:
    """mmsa.final's flags for a variant: its --members, parts joined by + ("ensemble:seeds=1+probe")."""
    return ["--members", variant.replace("+", ",")]


def run(cmd: list[str]) -> tuple[str, float]:
    start = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        sys.exit(f"failed ({out.returncode}): {' '.join(cmd)}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out.stdout, time.time() - start


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.nested_cv", description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/mvsa")
    p.add_argument("--space", default="spaces/fusion.yaml")
    p.add_argument("--outer", type=int, default=5, help="outer folds (default 5)")
    p.add_argument("--seed", type=int, default=0, help="outer folds' seed (default 0)")
    p.add_argument("--only", help="comma-separated outer folds to run now (default: all not yet measured)")
    p.add_argument("--final", nargs="+", default=["ensemble"], metavar="MEMBER[+MEMBER...]",
                   help="mmsa.final variants to score, each its --members with parts joined by + (ensemble: "
                        "the plan the search selected; ensemble:seeds=1: the same, one model per trial member; "
                        "best+probe+finetune: the best trial, the probe and the fixed fine-tuning recipe); the "
                        "first is the pipeline's. Searches are kept and reused by later variants")
    p.add_argument("--time-budget", help="the searches' --time-budget (default: the space's)")
    p.add_argument("--work", default=".cache/nested-cv", help="folders, MLflow store, results (git-ignored)")
    p.add_argument("--prepare-only", action="store_true", help="make the folders and their feature caches, then stop")
    p.add_argument("--reselect", metavar="LABEL",
                   help="re-run each stored search's ensemble selection with this code before final (it rewrites "
                        "the search's plan.json: copy --work first to keep it); the earlier finals' scores stay "
                        "as variant ensemble@LABEL, paired with the new ones")
    p.add_argument("--warm-budget", metavar="DURATION",
                   help="after each outer fold's search, a second one of this budget warm-started from it "
                        "(--warm-start, another searcher seed: --warm-seed), then final: variant 'warm'")
    p.add_argument("--warm-seed", type=int, default=1, help="the warm-started searches' searcher seed (default 1)")
    p.add_argument("--compare", nargs="*", default=[], metavar="LABEL=WORK",
                   help="another run's work folder (the same outer folds): its pipeline's scores as column LABEL, "
                        "paired by outer fold")
    p.add_argument("--out", default="nested_cv")
    args = p.parse_args(argv)
    data, work = Path(args.data).resolve(), (ROOT / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    folders = outer_folders(data, work, args.outer, args.seed)
    from mmsa.config import DEFAULT_CACHE_DIR
    cache_dir = DEFAULT_CACHE_DIR
    if args.prepare_only:
        from mmsa.config import DataConfig
        from mmsa.features.prepare import prepare
        for folder, _ in folders:
            prepare(DataConfig(data_dir=str(folder), cache_dir=cache_dir), val_fraction=0.0)
            print(f"ready: {folder}", flush=True)
        return
    results_file = work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    todo = [int(i) for i in args.only.split(",")] if args.only else list(range(args.outer))
    uri = f"sqlite:///{work}/mlruns/mlflow.db"
    for i in todo:
        folder, truth = folders[i]
        row = results.get(str(i))
        if args.reselect and row is not None and row.get("reselected") != args.reselect:
            row = reselect(row, uri, args.reselect)
            results[str(i)] = row
            results_file.write_text(json.dumps(results, indent=1))
        missing = [v for v in args.final if row is None or f"final_{v}" not in row]
        if not missing and not (args.warm_budget and "warm" not in row):
            continue
        if row is None:  # the search; kept, so that other final variants reuse it later
            print(f"outer fold {i}: {len(truth)} held-out pairs; searching ...", flush=True)
            budget = ["--time-budget", args.time_budget] if args.time_budget else []
            out, search_s = run([sys.executable, "-m", "search.run", "--space", args.space, "--data", str(folder),
                                 "--tracking-uri", uri, "--storage", str(work / "ray_results"), *budget])
            parent = out.strip().splitlines()[-1].split("=", 1)[1]
            from mlflow.tracking import MlflowClient
            m = MlflowClient(uri).get_run(parent).data.metrics
            best_cfg = yaml.safe_load(Path(MlflowClient(uri).download_artifacts(
                parent, "best_config.yaml", str(work / f"outer{i}"))).read_text())
            row = {"search_seconds": search_s, "parent": parent, "head": best_cfg.get("head", "fusion"),
                   "inner_cv_acc": m.get("best_val_acc"), "inner_probe_acc": m.get("probe_val_acc"),
                   "inner_ensemble_acc": m.get("ensemble_val_acc"),
                   "folds_trained": m.get("folds_trained"),
                   "folds_without_early_stopping": m.get("folds_without_early_stopping"),
                   "epochs_trained": m.get("epochs_trained"),
                   "epochs_without_early_stopping": m.get("epochs_without_early_stopping"),
                   "probe": probe_on(folder, truth, cache_dir),
                   "probe_lexicon": probe_on(folder, truth, cache_dir, lexicon=True)}
        for variant in missing:
            pred = work / f"outer{i}" / f"pred-{variant}.txt"
            _, final_s = run([sys.executable, "-m", "mmsa.final", "--run-id", row["parent"], "--data", str(folder),
                              "--tracking-uri", uri, "--out", str(pred), *final_flags(variant)])
            row[f"final_{variant}"] = {**score(pred, truth), "seconds": final_s}
            print(f"outer fold {i}: final {variant}: {row[f'final_{variant}']}, probe {row['probe']}", flush=True)
        if args.warm_budget and "warm" not in row:
            row["warm"] = warm_started(args, row, folder, truth, uri, work, i)
            print(f"outer fold {i}: warm-started: {row['warm']}", flush=True)
        results[str(i)] = row
        results_file.write_text(json.dumps(results, indent=1))
    report(results, args, argv)


def warm_started(args, row: dict, folder: Path, truth: dict, uri: str, work: Path, i: int) -> dict:
    """A search of --warm-budget warm-started from `row`'s (another searcher seed), then final."""
    out, search_s = run([sys.executable, "-m", "search.run", "--space", args.space, "--data", str(folder),
                         "--tracking-uri", uri, "--storage", str(work / "ray_results"), "--time-budget", args.warm_budget,
                         "--seed", str(args.warm_seed), "--warm-start", row["parent"]])
    parent = out.strip().splitlines()[-1].split("=", 1)[1]
    said = next((ln for ln in out.splitlines() if ln.startswith("warm start:")), "")
    pred = work / f"outer{i}" / "pred-warm.txt"
    _, final_s = run([sys.executable, "-m", "mmsa.final", "--run-id", parent, "--data", str(folder),
                      "--tracking-uri", uri, "--out", str(pred)])
    from mlflow.tracking import MlflowClient
    m = MlflowClient(uri).get_run(parent).data.metrics
    return {**score(pred, truth), "seconds": final_s, "search_seconds": search_s, "parent": parent,
            "reused_candidates": m.get("warm_trials_candidates"), "reused_told": m.get("warm_trials_told"),
            "said": said}


def reselect(row: dict, uri: str, label: str) -> dict:
    """`row`'s search with its ensemble selected again by this code; its ensemble final moved aside."""
    from mmsa.models.probe import probe_config
    from search.ensemble import make_plan, member, select_ensemble
    from search.record import SearchRecord, TrackingStore
    from search.report import best_trial
    store = TrackingStore(uri, "")
    parent = store.client.get_run(row["parent"])
    record = SearchRecord(store, row["parent"])
    metric = parent.data.params.get("metric", "val_acc")
    trials = store.trials(row["parent"], metric, parent.info.experiment_id)
    ensemble = select_ensemble(trials, store.predictions, record.probe_predictions(), metric)
    record.log_metrics(ensemble.metrics())
    best = best_trial(trials)
    record.log_plan(make_plan(row["parent"], metric, ensemble, best, trials, probe_config(member(best).config)))
    print(ensemble.line(), flush=True)
    row = dict(row)
    if "final_ensemble" in row:
        row[f"final_ensemble@{label}"] = row.pop("final_ensemble")
    row[f"inner_ensemble_acc@{label}"] = row.get("inner_ensemble_acc")
    row.update(inner_ensemble_acc=ensemble.score, reselected=label)
    return row


def report(results: dict, args, argv: list[str] | None) -> None:
    done = sorted(results, key=int)
    known = dict.fromkeys([*args.final, *(k[6:] for i in done for k in results[i] if k.startswith("final_"))])
    modes = [m for m in known if all(f"final_{m}" in results[i] for i in done)]
    rows = []
    for i in done:
        r = results[i]
        rows.append([i, r["head"], *[f"{r['final_' + m]['acc']:.4f} / {r['final_' + m]['macro_f1']:.4f}" for m in modes],
                     f"{r['probe']['acc']:.4f} / {r['probe']['macro_f1']:.4f}",
                     f"{r['inner_cv_acc']:.4f}", f"{r.get('inner_ensemble_acc') or float('nan'):.4f}",
                     f"{r['inner_probe_acc']:.4f}", f"{r['search_seconds'] / 60:.1f}",
                     f"{r['final_' + modes[0]]['seconds'] / 60:.1f}",
                     f"{r['folds_trained']:.0f} / {r['folds_without_early_stopping']:.0f}"])
    header = ["outer fold", "chosen head", *[f"pipeline ({m}) acc / macro-F1" for m in modes],
              "probe acc / macro-F1", "inner CV acc (best trial)", "inner OOF acc (ensemble)", "inner probe acc",
              "search min (cache built in it)", "final min",
              "folds trained / without ASHA"]
    body = table(header, rows)
    extra = {}  # label -> {outer fold: pipeline acc}
    if all("warm" in results[i] for i in done):
        extra["warm-started"] = {i: results[i]["warm"] for i in done}
    for spec in args.compare:
        label, _, folder = spec.partition("=")
        other = json.loads(((ROOT / folder).resolve() / "results.json").read_text())
        extra[label] = {i: other[i]["final_ensemble"] for i in done if i in other and "final_ensemble" in other[i]}
    summary = []
    for m in modes:
        acc = [results[i][f"final_{m}"]["acc"] for i in done]
        f1 = [results[i][f"final_{m}"]["macro_f1"] for i in done]
        summary.append([f"pipeline, final {m}", mean_std(acc), mean_std(f1)])
    probes = ["probe", *(["probe_lexicon"] if all("probe_lexicon" in results[i] for i in done) else [])]
    for probe in probes:
        summary.append([{"probe": "linear probe", "probe_lexicon": "linear probe with lexicon scores"}[probe],
                        mean_std([results[i][probe]["acc"] for i in done]),
                        mean_std([results[i][probe]["macro_f1"] for i in done])])
    for label, got in extra.items():
        if len(got) == len(done):
            summary.append([label, mean_std([got[i]["acc"] for i in done]), mean_std([got[i]["macro_f1"] for i in done])])
    body += "\n\n" + table(["", "accuracy (mean ± std over outer folds)", "macro-F1"], summary)
    for label, got in extra.items():
        if len(got) != len(done):
            continue
        body += "\n\n" + f"{label}, per outer fold: " + ", ".join(f"{got[i]['acc']:.4f}" for i in done)
        for other_label, other in [(f"pipeline ({modes[0]})", {i: results[i][f"final_{modes[0]}"] for i in done}),
                                   *[(k, v) for k, v in extra.items() if k != label and len(v) == len(done)]]:
            diff = np.array([got[i]["acc"] - other[i]["acc"] for i in done])
            body += (f"\n\n{label} minus {other_label}, accuracy, paired by outer fold: {diff.mean() * 100:+.2f} points "
                     f"(standard error {diff.std(ddof=1) / np.sqrt(len(diff)) * 100 if len(diff) > 1 else 0:.2f}); "
                     f"below it in {int((diff < 0).sum())} of {len(diff)} outer folds.")
        if label == "warm-started":
            body += ("\n\nThe warm-started searches: " + "; ".join(
                f"fold {i}: {got[i]['search_seconds'] / 60:.1f} min, {got[i]['reused_told']:.0f} earlier trials told "
                f"the searcher, {got[i]['reused_candidates']:.0f} ensemble candidates" for i in done))
    first = modes[0]
    for other in [*modes[1:], *probes]:
        diff = np.array([results[i][f"final_{first}"]["acc"] - (results[i][other] if other in probes else
                                                                 results[i][f"final_{other}"])["acc"] for i in done])
        body += (f"\n\nPipeline ({first}) minus {other}, accuracy, paired by outer fold: {diff.mean() * 100:+.2f} "
                 f"points (std {diff.std(ddof=1) * 100 if len(diff) > 1 else 0:.2f}, standard error "
                 f"{diff.std(ddof=1) / np.sqrt(len(diff)) * 100 if len(diff) > 1 else 0:.2f}); below it in "
                 f"{int((diff < 0).sum())} of {len(diff)} outer folds.")
    write_result(args.out, "Nested cross-validation: search + final against the linear probe", body,
                 command_line("bench.nested_cv", argv))


if __name__ == "__main__":
    main()
