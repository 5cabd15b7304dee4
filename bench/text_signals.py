"""Two more text signals beside the probe that reads the lexicon scores (the project's yardstick).

    python bench/text_signals.py --data ../shared/mvsa [--repeats 2] [--afinn] [--out text_signals]

- TF-IDF: logistic regression on word 1-2-grams and character 2-5-grams of the raw text (the
  classic tweet baseline), alone, and its class probabilities averaged into the probe's with
  weight 0.2, 0.3 or 0.5;
- AFINN (`--afinn`; `pip install afinn`, not a dependency): its score of the text with hashtags
  split, and its positive and negative sums over words, appended to the probe's features as a
  block, standardised on the fold's training part like the lexicon scores.

The same stratified 5-fold partitions as bench/cv.py; each row paired, fold by fold, against the
probe with the lexicon scores (mmsa.models.probe, `lexicon=True`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.common import PAIRED_HEADER, paired_cells, table, write_result  # noqa: E402

BLEND_WEIGHTS = (0.2, 0.3, 0.5)


def tfidf_probs(train_texts: list[str], train_labels, val_texts: list[str]) -> np.ndarray:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union
    model = make_pipeline(make_union(TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
                                     TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), min_df=2,
                                                     sublinear_tf=True)),
                          LogisticRegression(C=1.0, max_iter=3000))
    return model.fit(train_texts, train_labels).predict_proba(val_texts)


def afinn_scores(texts: list[str]) -> np.ndarray:
    try:
        from afinn import Afinn
    except ImportError:
        sys.exit("--afinn needs the AFINN lexicon: pip install afinn")
    from mmsa.features.lexicon import split_hashtags
    afinn = Afinn(emoticons=True)
    out = []
    for text in texts:
        text = split_hashtags(text)
        words = [afinn.score(w) for w in text.split()]
        out.append([afinn.score(text), sum(s for s in words if s > 0), -sum(s for s in words if s < 0)])
    return np.array(out, dtype=np.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/mvsa")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--afinn", action="store_true", help="also AFINN's scores as a block (pip install afinn)")
    p.add_argument("--out", default="text_signals")
    args = p.parse_args()
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    from mmsa.config import DataConfig
    from mmsa.features.prepare import cv_splits, prepare
    from mmsa.models.probe import LexiconScaler, pooled_features, probe_cv
    data = prepare(DataConfig(data_dir=args.data), val_fraction=0.0)
    texts = {ex.guid: ex.text for ex in data.dataset.train}
    raw = [texts[g] for g in data.train.guids]
    pos_of = {g: i for i, g in enumerate(data.train.guids)}
    afinn = afinn_scores(raw) if args.afinn else None
    pooled = pooled_features(data.features, data.train.rows) if args.afinn else None
    lexicon = data.features.lexicon_of(data.train.rows)
    results: dict[str, tuple[list, list]] = {}

    def add(name: str, probs: np.ndarray, labels: np.ndarray) -> None:
        accs, f1s = results.setdefault(name, ([], []))
        pred = probs.argmax(1)
        accs.append(float((pred == labels).mean()))
        f1s.append(float(f1_score(labels, pred, labels=[0, 1, 2], average="macro", zero_division=0)))
    for seed in range(args.repeats):
        folds = cv_splits(data.train, 5, seed)
        probe = probe_cv(data.features, folds, keep_probs=True, lexicon=True)["probe_fold_probs"]
        for k, (train, val) in enumerate(folds):
            tr = np.array([pos_of[g] for g in train.guids])
            va = np.array([pos_of[g] for g in val.guids])
            add("probe with lexicon scores", probe[k], val.labels)
            tfidf = tfidf_probs([raw[i] for i in tr], train.labels, [raw[i] for i in va])
            add("TF-IDF alone", tfidf, val.labels)
            for w in BLEND_WEIGHTS:
                add(f"probe with lexicon, TF-IDF averaged in at weight {w}", (1 - w) * probe[k] + w * tfidf, val.labels)
            if afinn is not None:
                # Each block standardised on the fold's training rows, as the probe does its lexicon's.
                x = np.concatenate([pooled, LexiconScaler(lexicon[tr])(lexicon), LexiconScaler(afinn[tr])(afinn)], 1)
                model = LogisticRegression(C=1.0, max_iter=2000).fit(x[tr], train.labels)
                add("probe with lexicon + AFINN (3 scores)", model.predict_proba(x[va]), val.labels)
        print(f"repeat {seed} done", flush=True)
    probe_accs = results["probe with lexicon scores"][0]
    rows = [[name, *paired_cells(accs, f1s, probe_accs)] for name, (accs, f1s) in results.items()]
    write_result(args.out, "More text signals beside the probe with lexicon scores",
                 table(["variant", *PAIRED_HEADER[:2], "accuracy - probe with lexicon, points (± s.e.)"], rows)
                 + f"\n\n{args.repeats} x 5 folds, split seeds 0..{args.repeats - 1}; {len(raw)} labeled pairs.",
                 "python bench/text_signals.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
