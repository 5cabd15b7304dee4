import numpy as np

from mmsa.features.lexicon import LEXICON_DIM, lexicon_scores, split_hashtags


def test_hashtags_are_split_into_words_and_the_rest_is_kept():
    assert split_hashtags("so #bestdayever :)") == "so best day ever :)"
    assert split_hashtags("no tags here") == "no tags here"


def test_scores_read_tweet_sentiment_including_hashtags_and_emoticons():
    scores = lexicon_scores(["I love this :)", "what a terrible day :(", "the bus leaves at 9", "#worstdayever"])
    assert scores.shape == (4, LEXICON_DIM) and scores.dtype == np.float32
    compound = scores[:, 3]
    assert compound[0] > 0.5 and compound[1] < -0.5 and compound[2] == 0 and compound[3] < 0
    assert np.allclose(scores[:, :3].sum(1), 1, atol=0.01)  # neg + neu + pos
    assert lexicon_scores([]).shape == (0, LEXICON_DIM)


def test_the_text_cache_holds_each_raw_text_s_scores(subset_prepared):
    _, p = subset_prepared
    examples = p.dataset.all_examples
    rows = p.features.rows([ex.guid for ex in examples])
    assert np.array_equal(p.features.lexicon_of(rows), lexicon_scores([ex.text for ex in examples]))
