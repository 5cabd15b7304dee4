"""Cheap sentiment signals beside the frozen features, scored with the linear probe.

    python bench/cheap_signals.py --data ../shared/mvsa [--repeats 2] [--out cheap_signals]

Tweets' sentiment often sits in emoji, hashtags and slang, which a lexicon built for tweets reads
directly. Each row is the probe (mmsa.models.probe: L2-normed pooled text and image features,
LogisticRegression(C=1)) with a signal appended as a third block, standardised on the fold's
training part and scaled to norm about 1 like the other two, on the same stratified 5-fold
partitions as bench/cv.py, paired against the plain probe:

- vader: VADER's four polarity scores (neg, neu, pos, compound) of the raw text; VADER ships its
  tweet lexicon and reads emoticons and emoji itself;
- vader+emoji: the same of the text with every emoji written as its name (`emoji.demojize`);
- vader+hashtags: the same with each hashtag split into words (`wordsegment`: #bestdayever ->
  best day ever);
- vader+both: both rewrites.

Also, for scale, VADER alone (logistic regression on its four scores).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.common import PAIRED_HEADER, paired_cells, table, write_result  # noqa: E402

HASHTAG = re.compile(r"#(\w+)")


def rewrite(text: str, emoji_names: bool, hashtags: bool) -> str:
    if emoji_names:
        import emoji
        text = emoji.demojize(text, delimiters=(" ", " ")).replace("_", " ")
    if hashtags:
        import wordsegment
        text = HASHTAG.sub(lambda m: " ".join(wordsegment.segment(m.group(1))) or m.group(0), text)
    return text


def vader_scores(texts: list[str]) -> np.ndarray:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    analyzer = SentimentIntensityAnalyzer()
    return np.array([[s["neg"], s["neu"], s["pos"], s["compound"]]
                     for s in (analyzer.polarity_scores(t) for t in texts)], dtype=np.float32)


def score_cv(x: np.ndarray, folds) -> tuple[list[float], list[float]]:
    """Logistic regression on x (rows in the order of the labeled pairs) over the folds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    accs, f1s = [], []
    for train, val in folds:
        pred = LogisticRegression(C=1.0, max_iter=3000).fit(x[train.pos], train.labels).predict(x[val.pos])
        accs.append(float(accuracy_score(val.labels, pred)))
        f1s.append(float(f1_score(val.labels, pred, labels=[0, 1, 2], average="macro", zero_division=0)))
    return accs, f1s


def with_block(base: np.ndarray, signal: np.ndarray, folds) -> list[np.ndarray]:
    """Per fold: base with the signal appended, standardised on that fold's training part and
    scaled to norm about 1 (the text and image blocks are L2-normed)."""
    out = []
    for train, _ in folds:
        mean, std = signal[train.pos].mean(0), signal[train.pos].std(0) + 1e-6
        out.append(np.concatenate([base, (signal - mean) / std / np.sqrt(signal.shape[1])], 1))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/mvsa")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="cheap_signals")
    args = p.parse_args()
    from dataclasses import dataclass

    import wordsegment

    from mmsa.config import DataConfig
    from mmsa.features.prepare import cv_splits, prepare
    from mmsa.models.probe import pooled_features
    wordsegment.load()
    data = prepare(DataConfig(data_dir=args.data), val_fraction=0.0)
    texts = {ex.guid: ex.text for ex in data.dataset.train}
    pos_of = {g: i for i, g in enumerate(data.train.guids)}
    base = pooled_features(data.features, data.train.rows)
    raw = [texts[g] for g in data.train.guids]
    signals = {"vader": vader_scores(raw),
               "vader+emoji": vader_scores([rewrite(t, True, False) for t in raw]),
               "vader+hashtags": vader_scores([rewrite(t, False, True) for t in raw]),
               "vader+both": vader_scores([rewrite(t, True, True) for t in raw])}

    @dataclass
    class Part:  # a fold's part as positions in the labeled pairs
        pos: np.ndarray
        labels: np.ndarray
    results: dict[str, tuple[list, list]] = {}
    for seed in range(args.repeats):
        folds = [tuple(Part(np.array([pos_of[g] for g in s.guids]), s.labels) for s in fold)
                 for fold in cv_splits(data.train, 5, seed)]

        def add(name, accs_f1s):
            a, f = results.setdefault(name, ([], []))
            a += accs_f1s[0]
            f += accs_f1s[1]
        add("probe", score_cv(base, folds))
        add("VADER alone (4 scores)", score_cv(signals["vader+both"], folds))
        for name, signal in signals.items():
            per_fold = with_block(base, signal, folds)
            accs, f1s = [], []
            for k, fold in enumerate(folds):
                a, f = score_cv(per_fold[k], [fold])
                accs += a
                f1s += f
            add(f"probe + {name}", (accs, f1s))
        print(f"repeat {seed} done", flush=True)
    probe_accs = results["probe"][0]
    rows = [[name, *paired_cells(accs, f1s, probe_accs)] for name, (accs, f1s) in results.items()]
    write_result(args.out, "Cheap sentiment signals beside the frozen features (linear probe)",
                 table(["probe variant", *PAIRED_HEADER], rows)
                 + f"\n\n{args.repeats} x 5 folds, split seeds 0..{args.repeats - 1}; {len(base)} labeled pairs.",
                 "python bench/cheap_signals.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
