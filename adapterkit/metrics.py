"""The metric each task deserves, on plain strings: one function per task, and a per-example score
used to pick the worst examples.

    qa             exact match and token F1, with SQuAD's answer normalisation (written here: it is
                   a few lines, and the official script is the reference)
    summarization  ROUGE-1/2/L F-measure (rouge-score, stemmed, as the ROUGE papers report it)
    translation    BLEU and chrF (sacrebleu, corpus level, its default tokenisation)
    sentiment      accuracy and macro-F1 over the label set
    generation     ROUGE-L of generated outputs (perplexity of the references comes from the model)

All scores are percentages (0-100) except perplexity, so a table can mix them.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def squad_normalize(text: str) -> str:
    """SQuAD v1.1's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(squad_normalize(prediction) == squad_normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1: overlap of normalised tokens (as multisets)."""
    pred, ref = squad_normalize(prediction).split(), squad_normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def qa_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    n = len(references)
    return {"exact_match": 100 * sum(map(exact_match, predictions, references)) / n,
            "f1": 100 * sum(map(token_f1, predictions, references)) / n}


def _rouge_scorer(types: tuple[str, ...] = ("rouge1", "rouge2", "rougeL")):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(types), use_stemmer=True)


def rouge(predictions: list[str], references: list[str], types: tuple[str, ...] = ("rouge1", "rouge2", "rougeL")
          ) -> dict[str, float]:
    """Mean ROUGE F-measure per type, in percent."""
    scorer = _rouge_scorer(types)
    totals = Counter()
    for pred, ref in zip(predictions, references):
        for name, score in scorer.score(ref, pred).items():
            totals[name] += score.fmeasure
    return {name: 100 * totals[name] / len(references) for name in types}


def translation_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    import sacrebleu

    return {"bleu": sacrebleu.corpus_bleu(predictions, [references]).score,
            "chrf": sacrebleu.corpus_chrf(predictions, [references]).score}


def classification_metrics(predictions: list[str], references: list[str], labels: list[str]) -> dict[str, float]:
    """Accuracy and macro-F1: the unweighted mean of each label's F1 (as scikit-learn computes it,
    leaving out labels that appear in neither the references nor the predictions)."""
    n = len(references)
    accuracy = 100 * sum(p == r for p, r in zip(predictions, references)) / n
    f1s = []
    for label in labels:
        tp = sum(p == label and r == label for p, r in zip(predictions, references))
        fp = sum(p == label and r != label for p, r in zip(predictions, references))
        fn = sum(p != label and r == label for p, r in zip(predictions, references))
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": accuracy, "macro_f1": 100 * sum(f1s) / len(f1s) if f1s else 0.0}


def _sentence_chrf(prediction: str, reference: str) -> float:
    import sacrebleu

    return sacrebleu.sentence_chrf(prediction, [reference]).score


def _rouge_l(prediction: str, reference: str) -> float:
    return 100 * _rouge_scorer(("rougeL",)).score(reference, prediction)["rougeL"].fmeasure


# Per-example score (higher is better) used to rank the worst examples of a generative task.
EXAMPLE_SCORES: dict[str, Callable[[str, str], float]] = {
    "qa": lambda p, r: 100 * token_f1(p, r),
    "summarization": _rouge_l,
    "translation": _sentence_chrf,
    "generation": _rouge_l,
    "chat": _rouge_l,
    "text": _rouge_l,
}


def generation_metrics(task: str, predictions: list[str], references: list[str]) -> dict[str, float]:
    """The corpus metrics of a generative task's outputs."""
    if task == "qa":
        return qa_metrics(predictions, references)
    if task == "summarization":
        return rouge(predictions, references)
    if task == "translation":
        return translation_metrics(predictions, references)
    return rouge(predictions, references, ("rougeL",))
