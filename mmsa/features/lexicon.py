"""Lexicon scores of a tweet: VADER's four polarity scores (neg, neu, pos, compound) of its raw
text with each hashtag split into words (#bestdayever -> best day ever).

Tweets carry much of their sentiment in slang, emoticons, emoji and hashtags, which VADER's tweet
lexicon reads directly and a frozen sentence encoder reads poorly; appended to the probe's
features the four scores were worth more than their noise (bench/results/cheap_signals.md).
Both packages ship their data (VADER's lexicons, wordsegment's word counts): no network. The
scores are part of the text feature cache (mmsa.features.cache), so every model, the search and a
served model read the same numbers.
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np

LEXICON_DIM = 4
HASHTAG = re.compile(r"#(\w+)")


def lexicon_version() -> str:
    """What the scores depend on besides the text (part of the text cache's key)."""
    from importlib.metadata import version
    return f"vader {version('vaderSentiment')}, wordsegment {version('wordsegment')}, hashtags split"


@lru_cache(maxsize=1)
def _analyzer():
    import wordsegment
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    wordsegment.load()
    return SentimentIntensityAnalyzer(), wordsegment.segment


def split_hashtags(text: str) -> str:
    segment = _analyzer()[1]
    return HASHTAG.sub(lambda m: " ".join(segment(m.group(1))) or m.group(0), text)


def lexicon_scores(texts: list[str]) -> np.ndarray:
    """(len(texts), LEXICON_DIM) float32: neg, neu, pos in [0, 1] and compound in [-1, 1]."""
    analyzer = _analyzer()[0]
    out = np.zeros((len(texts), LEXICON_DIM), dtype=np.float32)
    for i, text in enumerate(texts):
        s = analyzer.polarity_scores(split_hashtags(text))
        out[i] = s["neg"], s["neu"], s["pos"], s["compound"]
    return out
