"""`python -m mmsa.predict --model MODEL_URI --data DIR`: predict a dataset's test pairs with a
logged model, without training.

MODEL_URI: `models:/NAME/VERSION` (the registry), `runs:/RUN_ID/model` (a final run) or a local
MLflow model folder. DIR in the course layout: its test_without_label.txt pairs are predicted and
written as mmsa.final writes them (`guid,tag`, atomically); the last line is `predictions=<path>`.
Features come from the same cache as training (`--cache-dir`), so the same pairs give the same
features, and the same model gives final's predictions exactly.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

from mmsa.app.commands import quiet_libraries
from mmsa.config import DEFAULT_CACHE_DIR
from mmsa.errors import UserError


def load_model(uri: str):
    """The SentimentModel behind an MLflow model URI, or a one-line UserError."""
    import mlflow
    from mlflow.exceptions import MlflowException
    try:
        loaded = mlflow.pyfunc.load_model(uri)
    except (MlflowException, OSError) as e:
        raise UserError(f"--model {uri}: cannot load it ({str(e).splitlines()[0]})") from None
    try:
        return loaded.unwrap_python_model()
    except MlflowException:
        raise UserError(f"--model {uri}: not an mmsa model (no python model inside)") from None


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    p = argparse.ArgumentParser(prog="python -m mmsa.predict", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, metavar="MODEL_URI",
                   help="models:/NAME/VERSION, runs:/RUN_ID/model, or a local MLflow model folder")
    p.add_argument("--data", required=True, help="dataset folder in the course layout (its test_without_label.txt)")
    p.add_argument("--out", default="predictions.txt", help="predictions file (default: predictions.txt)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ and runs:/ (default: "
                   "$MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db)")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR,
                   help=f"feature cache, the one final used (default: {DEFAULT_CACHE_DIR})")
    args = p.parse_args(argv)

    import mlflow

    from mmsa.data.dataset import LABELS, load_dataset
    from mmsa.data.files import write_predictions
    from mmsa.app.run_tags import sqlite_file, tracking_uri
    uri = tracking_uri(args.tracking_uri)
    if sqlite_file(uri) is not None and not sqlite_file(uri).exists() and args.model.startswith(("models:/", "runs:/")):
        raise UserError(f"tracking URI {uri}: no MLflow store there (--tracking-uri?)")
    mlflow.set_tracking_uri(uri)
    t0 = time.time()
    model = load_model(args.model)
    dataset = load_dataset(args.data)
    if not dataset.test:
        raise UserError(f"{args.data}: test_without_label.txt is missing or empty")
    print(f"model {args.model}: {len(model.members)} member(s) "
          f"({', '.join(m.name for m in model.members)}); {len(dataset.test)} test pairs", flush=True)
    table = model.predict_examples(dataset.test, cache_dir=args.cache_dir)
    tags = list(table["label"])
    out = Path(args.out)
    write_predictions(out, [ex.guid for ex in dataset.test], tags)
    share = Counter(tags)
    print("class balance   " + "  ".join(f"{n}: {share[n] / len(tags):.1%}" for n in LABELS), flush=True)
    print(f"done in {time.time() - t0:.0f}s (no training)", flush=True)
    print(f"predictions={out}", flush=True)
    return 0

