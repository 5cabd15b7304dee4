"""Blends of out-of-fold predictions, and decision rules chosen in CV, against the linear probe.

    python bench/blend.py --oof DIR --blend probe+mlp --blend probe+mlp+fusion-default ... [--out blend]

DIR holds bench/cv.py's `--save-oof` files (NAME-r<repeat>.npz). For every repeat and fold:

- `A+B+...`: the members' class probabilities averaged (each member scored out of fold);
- `A+B+.../prior`: the same, then each class's probability multiplied by a factor chosen on the
  other folds' out-of-fold predictions (grid over the neutral and negative factors), never on the
  fold it is scored on; once for accuracy (`/prior`) and once for macro-F1 (`/prior-f1`);
- `A+B+.../stack`: a logistic regression on the members' log-probabilities, trained on the other
  folds' out-of-fold predictions. The members' out-of-fold predictions on those folds come from
  models that saw the scored fold, a mild leak that stacking on out-of-fold predictions accepts.

Differences against the probe are paired (same folds) and reported with their standard error.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import accuracy_score, f1_score  # noqa: E402

from bench.common import PAIRED_HEADER, paired_cells, table, write_result  # noqa: E402

GRID = np.round(np.arange(0.6, 2.01, 0.1), 2)  # class factors tried for neutral and negative


def load(folder: Path, name: str, repeat: int) -> dict:
    path = folder / f"{name}-r{repeat}.npz"
    if not path.exists():
        sys.exit(f"bench/blend.py: {path} is missing (run bench/cv.py --save-oof {folder} with config {name})")
    from mmsa.training import oof
    return oof.load(path)


def aligned(folder: Path, names: list[str], repeat: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, fold index, probs of shape members x rows x classes), every member in the probe's
    row order."""
    base = load(folder, "probe", repeat)
    order = np.argsort(base["rows"])
    probs = []
    for name in names:
        m = load(folder, name, repeat)
        if not np.array_equal(np.sort(m["rows"]), base["rows"][order]):
            sys.exit(f"bench/blend.py: {name}-r{repeat} covers other rows than the probe's (other folds?)")
        probs.append(m["probs"][np.argsort(m["rows"])][np.argsort(order)])
    return base["labels"], base["fold"], np.stack(probs)


def scores(labels: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    return (float(accuracy_score(labels, pred)),
            float(f1_score(labels, pred, labels=[0, 1, 2], average="macro", zero_division=0)))


def best_factors(probs: np.ndarray, labels: np.ndarray, metric: int, neutral: int, negative: int) -> np.ndarray:
    """Class factors (1 for positive) that maximise accuracy (metric 0) or macro-F1 (1) on these
    predictions; ties go to the factors closest to 1."""
    best, best_w = -1.0, np.ones(probs.shape[1])
    for a, b in sorted(itertools.product(GRID, GRID), key=lambda ab: abs(ab[0] - 1) + abs(ab[1] - 1)):
        w = np.ones(probs.shape[1])
        w[neutral], w[negative] = a, b
        s = scores(labels, (probs * w).argmax(1))[metric]
        if s > best + 1e-12:
            best, best_w = s, w
    return best_w


def blend_rule(kind: str, probs: np.ndarray, labels: np.ndarray, fold: np.ndarray, k: int) -> np.ndarray:
    """Predictions for fold k's rows under the rule `kind` (mean | prior | prior-f1 | stack)."""
    from mmsa.data.dataset import LABELS
    neutral, negative = LABELS.index("neutral"), LABELS.index("negative")
    from mmsa.models.ensemble import average_probabilities
    held, rest = fold == k, fold != k
    mean = average_probabilities(probs)
    if kind == "mean":
        return mean[held].argmax(1)
    if kind in ("prior", "prior-f1"):
        w = best_factors(mean[rest], labels[rest], 0 if kind == "prior" else 1, neutral, negative)
        return (mean[held] * w).argmax(1)
    if kind == "stack":
        x = np.log(np.clip(probs, 1e-6, 1)).transpose(1, 0, 2).reshape(probs.shape[1], -1)
        return LogisticRegression(C=1.0, max_iter=2000).fit(x[rest], labels[rest]).predict(x[held])
    raise ValueError(kind)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--oof", required=True, help="folder of bench/cv.py --save-oof files")
    p.add_argument("--blend", action="append", default=[], metavar="A+B[/prior|/prior-f1|/stack]",
                   help="members joined by +, then an optional rule (repeatable)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="blend")
    args = p.parse_args()
    folder = Path(args.oof)

    def fold_scores(spec: str) -> tuple[list[float], list[float]]:
        members, _, rule = spec.partition("/")
        accs, f1s = [], []
        for r in range(args.repeats):
            labels, fold, probs = aligned(folder, members.split("+"), r)
            for k in np.unique(fold):
                a, f = scores(labels[fold == k], blend_rule(rule or "mean", probs, labels, fold, k))
                accs.append(a)
                f1s.append(f)
        return accs, f1s

    probe_acc, _ = fold_scores("probe")
    rows = []
    for spec in ["probe", *args.blend]:
        accs, f1s = fold_scores(spec)
        below = int(np.sum(np.array(accs) < np.array(probe_acc)))
        rows.append([spec, *paired_cells(accs, f1s, probe_acc), f"{below} / {len(accs)}"])
        print(" | ".join(rows[-1]), flush=True)
    body = table(["blend / rule", *PAIRED_HEADER, "folds below the probe"], rows)
    members = sorted({m for spec in args.blend for m in spec.partition("/")[0].split("+")})
    body += (f"\n\nOut-of-fold predictions of {args.repeats} repeat(s) of 5-fold CV over train.txt "
             f"(bench/cv.py --save-oof); members: {', '.join(members)}.")
    write_result(args.out, "Blends and decision rules on out-of-fold predictions", body,
                 "python bench/blend.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
