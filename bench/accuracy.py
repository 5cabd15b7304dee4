"""Accuracy on one seeded validation split: linear-probe floor, default fusion, text-only,
image-only, and a search's best config, over several training seeds (mean ± std).

    python bench/accuracy.py --data ../shared/mvsa [--run-id SEARCH_OR_TRIAL_RUN] [--seeds 3]
        [--finetune-layers 1 2] [--ensembles 3 5 [--ensemble-seeds 20]]

`--finetune-layers K ...` adds the default config with `finetune: last_k` for each K (the top K
MiniLM layers train with the head; each K has its own cache, built on first use).
`--ensembles K ...` adds a second table in mmsa.final's protocol: a fixed number of epochs (the
median best epoch of the default fusion runs above) and no choice of epoch on validation; one
model, then ensembles of K models, the default config otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.common import RESULTS, mean_std, table, write_result  # noqa: E402
from mmsa.config import Config  # noqa: E402
from mmsa.data import LABELS  # noqa: E402
from mmsa.prepare import prepare  # noqa: E402
from mmsa.train import classification_metrics, fit, predict_proba  # noqa: E402


def pooled(features, rows):
    mask = features.text_mask[rows].astype(np.float32)[..., None]
    text = (features.text[rows].astype(np.float32) * mask).sum(1) / mask.sum(1)
    return np.concatenate([text, features.image[rows].astype(np.float32).mean(1)], 1)


def linear_probe(data) -> dict:
    """Logistic regression on mean-pooled frozen features; C chosen by 5-fold CV on train only."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    x_train, x_val = pooled(data.features, data.train.rows), pooled(data.features, data.val.rows)
    grid = GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)),
                        {"logisticregression__C": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]},
                        cv=StratifiedKFold(5, shuffle=True, random_state=0)).fit(x_train, data.train.labels)
    print(f"linear probe: C={grid.best_params_['logisticregression__C']}", flush=True)
    return classification_metrics(data.val.labels, grid.predict(x_val))


def summary_row(name: str, runs: list[dict]) -> list[str]:
    return ([name, mean_std([r["val_acc"] for r in runs]), mean_std([r["val_macro_f1"] for r in runs])]
            + [mean_std([r["val_f1_" + n] for r in runs]) for n in LABELS]
            + [f"{np.mean([r['mean_epoch_seconds'] for r in runs]):.1f}"])


def retrained(data, base: Config, k: int, epochs: int, seeds: int) -> list[dict]:
    """The default config as an ensemble of k, trained for `epochs` without validation, then scored."""
    import torch
    runs = []
    for seed in range(seeds):
        cfg = Config.from_flat({**base.to_flat(), "ensemble": k, "stop_epoch": epochs, "seed": seed})
        result = fit(cfg, data.features, data.train, None)
        probs = predict_proba(result.model, data.features, data.val.rows, torch.device("cpu"))
        runs.append({**classification_metrics(data.val.labels, probs.argmax(1)),
                     "mean_epoch_seconds": result.metrics["mean_epoch_seconds"]})
        print(f"retrained, {k} model(s), seed {seed}: acc {runs[-1]['val_acc']:.4f} "
              f"f1 {runs[-1]['val_macro_f1']:.4f}", flush=True)
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--run-id", help="a search parent (or trial) run whose config to include")
    p.add_argument("--tracking-uri", default="sqlite:///mlruns/mlflow.db")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--finetune-layers", type=int, nargs="*", default=[], metavar="K",
                   help="also run finetune=last_k with these numbers of top text layers")
    p.add_argument("--ensembles", type=int, nargs="*", default=[], metavar="K",
                   help="also score ensembles of K models, trained as mmsa.final retrains")
    p.add_argument("--ensemble-seeds", type=int, metavar="N",
                   help="training seeds for the ensemble table (default: --seeds); the gain is below one "
                        "seed's spread, so it needs more of them")
    args = p.parse_args()

    base = Config()
    base.data.data_dir = args.data
    data = prepare(base.data)
    variants = {"default fusion": {}, "text only": {"modalities": "text"}, "image only": {"modalities": "image"}}
    if args.run_id:
        from mlflow.tracking import MlflowClient

        from mmsa.final import resolve_run
        flat, _, _, what, _ = resolve_run(MlflowClient(args.tracking_uri), args.run_id)
        flat.update(data_dir=args.data)
        variants[f"search best ({args.run_id[:8]})"] = flat
    for k in args.finetune_layers:
        variants[f"default, last_k k={k}"] = {"finetune": "last_k", "text_finetune_layers": k}

    rows = []
    best_epochs = []
    probe = linear_probe(data)
    rows.append(["linear probe (floor)", f"{probe['val_acc']:.4f}", f"{probe['val_macro_f1']:.4f}"]
                + [f"{probe['val_f1_' + n]:.4f}" for n in LABELS] + ["-"])
    confusion = None
    scored: dict[tuple, tuple[str, list]] = {}  # config -> (variant name, its row)
    for name, overrides in variants.items():
        runs = []
        cfg = Config.from_flat({**base.to_flat(), **overrides})
        key = tuple(sorted(cfg.to_flat().items()))
        if key in scored:  # e.g. a search that chose the default config: the same runs, not trained again
            rows.append([f"{name} (the {scored[key][0]} config)"] + scored[key][1][1:])
            continue
        own = data if cfg.data == base.data else prepare(cfg.data)  # e.g. last_k: another cache
        assert own.val.guids == data.val.guids, "every variant must be scored on the same split"
        for seed in range(args.seeds):
            cfg = Config.from_flat({**base.to_flat(), **overrides, "seed": seed})
            result = fit(cfg, own.features, own.train, own.val)
            runs.append(result.metrics)
            print(f"{name} seed {seed}: acc {result.metrics['val_acc']:.4f} f1 {result.metrics['val_macro_f1']:.4f} "
                  f"({result.metrics['mean_epoch_seconds']:.1f}s/epoch)", flush=True)
            if name == "default fusion":
                best_epochs.append(result.metrics["best_epoch"])
                if seed == 0:
                    confusion = result.metrics["val_confusion"]
        rows.append(summary_row(name, runs))
        scored[key] = (name, rows[-1])
    header = ["model", "accuracy", "macro-F1"] + [f"F1 {n}" for n in LABELS] + ["s/epoch"]
    body = (f"Validation split: seed {base.data.split_seed}, {len(data.val)} of {len(data.train) + len(data.val)} "
            f"labeled pairs. Fusion rows: mean ± std over {args.seeds} training seeds, each the best epoch "
            f"on validation.\n\n" + table(header, rows))
    if args.ensembles:
        epochs = int(np.median(best_epochs))
        seeds = args.ensemble_seeds or args.seeds
        body += (f"\n\nAs `mmsa.final` retrains (a fixed {epochs} epochs of the {base.train.max_epochs}-epoch "
                 f"schedule: the median best epoch of the default fusion rows above; no epoch chosen on "
                 f"validation), trained on the training part only and scored on the same validation pairs, over {seeds} seeds:\n\n"
                 + table(header, [summary_row(f"default, {k} model{'s' if k > 1 else ''}",
                                              retrained(data, base, k, epochs, seeds))
                                  for k in [1] + args.ensembles]))
    if confusion is not None:
        import matplotlib
        matplotlib.use("Agg")
        from sklearn.metrics import ConfusionMatrixDisplay
        disp = ConfusionMatrixDisplay(np.asarray(confusion), display_labels=list(LABELS))
        disp.plot(colorbar=False).ax_.set_title("default fusion, validation (seed 0)")
        disp.figure_.savefig(RESULTS / "confusion_default.png", dpi=100, bbox_inches="tight")
        body += "\n\n![confusion matrix](confusion_default.png)"
    write_result("accuracy", "Accuracy on the seeded validation split", body,
                 "python bench/accuracy.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
