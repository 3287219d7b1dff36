"""Metric functions against hand-checked values, and against the reference libraries they wrap."""

from __future__ import annotations

import pytest

from adapterkit import metrics as M


def test_squad_normalisation_and_exact_match():
    assert M.squad_normalize("  The Eiffel   Tower! ") == "eiffel tower"
    assert M.squad_normalize("An apple, a pear.") == "apple pear"
    assert M.exact_match("the Eiffel Tower", "Eiffel tower.") == 1.0
    assert M.exact_match("Eiffel", "Eiffel tower") == 0.0


@pytest.mark.parametrize("pred, ref, expected", [
    ("Paris, France", "Paris", 2 / 3),            # precision 1/2, recall 1
    ("x b c", "b c d", 2 / 3),                    # 2 shared of 3 each
    ("a b c", "b c d", 0.8),                      # "a" is an article: [b, c] vs [b, c, d]
    ("the cat", "a cat cat", 2 / 3),              # articles dropped: [cat] vs [cat, cat]: p=1, r=1/2
    ("moss bark", "moss, bark, and low shrubs", 2 * (1 * 0.4) / 1.4),
    ("nothing here", "moss", 0.0),
    ("", "", 1.0),
])
def test_token_f1_by_hand(pred, ref, expected):
    assert M.token_f1(pred, ref) == pytest.approx(expected)


def test_qa_metrics_are_percentages_over_examples():
    out = M.qa_metrics(["Paris", "London"], ["paris.", "Berlin"])
    assert out == {"exact_match": 50.0, "f1": 50.0}


def test_rouge_by_hand_and_against_rouge_score():
    from rouge_score import rouge_scorer

    assert M.rouge(["the cat sat"], ["the cat sat"])["rougeL"] == pytest.approx(100)
    assert M.rouge(["dogs bark"], ["the cat sat"])["rouge1"] == pytest.approx(0)
    # "the cat sat" vs "the cat ran": 2 of 3 unigrams, 1 of 2 bigrams.
    one = M.rouge(["the cat sat"], ["the cat ran"])
    assert one["rouge1"] == pytest.approx(200 / 3) and one["rouge2"] == pytest.approx(50)
    preds = ["a quick brown fox jumps", "rain falls in spain mainly", "hello"]
    refs = ["the quick brown fox jumped over", "the rain in spain falls mainly on the plain", "goodbye"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    direct = [scorer.score(r, p) for p, r in zip(preds, refs)]
    for key, value in M.rouge(preds, refs).items():
        assert value == pytest.approx(100 * sum(d[key].fmeasure for d in direct) / 3)


def test_translation_metrics_against_sacrebleu():
    import sacrebleu

    assert M.translation_metrics(["the cat is on the mat"], ["the cat is on the mat"])["bleu"] == pytest.approx(100)
    preds = ["the cat sat on the mat", "a dog ran in the park today"]
    refs = ["the cat is sitting on the mat", "the dog ran in the park"]
    out = M.translation_metrics(preds, refs)
    assert out["bleu"] == pytest.approx(sacrebleu.BLEU().corpus_score(preds, [refs]).score)
    assert out["chrf"] == pytest.approx(sacrebleu.CHRF().corpus_score(preds, [refs]).score)
    assert 0 < out["bleu"] < 100 and 0 < out["chrf"] < 100


def test_classification_metrics_by_hand():
    out = M.classification_metrics(["a", "b", "b", "b"], ["a", "a", "b", "b"], ["a", "b"])
    # F1(a) = 2*1/(2+0+1) = 2/3, F1(b) = 2*2/(4+1+0) = 4/5.
    assert out["accuracy"] == 75.0
    assert out["macro_f1"] == pytest.approx(100 * (2 / 3 + 4 / 5) / 2)
    # A label that never occurs in either list does not drag the mean down (as scikit-learn).
    assert M.classification_metrics(["a", "b"], ["a", "b"], ["a", "b", "c"])["macro_f1"] == 100.0
    # Always predicting one label: accuracy is the majority share, macro-F1 exposes it.
    lazy = M.classification_metrics(["a"] * 4, ["a", "a", "a", "b"], ["a", "b"])
    assert lazy["accuracy"] == 75.0 and lazy["macro_f1"] == pytest.approx(100 * (6 / 7) / 2)


def test_example_scores_rank_better_outputs_higher():
    for task, score in M.EXAMPLE_SCORES.items():
        good = score("the quick brown fox", "the quick brown fox")
        bad = score("purple elephants", "the quick brown fox")
        assert good > bad, task
