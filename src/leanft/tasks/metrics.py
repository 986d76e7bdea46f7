"""Scores for classification and generation, in percent like the papers report them."""

from __future__ import annotations

import string
from collections import Counter


def score_generation(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus BLEU (sacrebleu, all references of each input) and mean best-reference ROUGE-L F1.

    Examples may have different numbers of references (E2E MRs have 1 to 45); sacrebleu takes
    missing ones as None. The scorers are imported here: classification never needs them.
    """
    import sacrebleu

    _check_pairs(predictions, references)
    depth = max(len(refs) for refs in references)
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(depth)]
    bleu = sacrebleu.corpus_bleu(predictions, streams).score
    return {"bleu": bleu, "rouge_l": _rouge_l(predictions, references)}


def _check_pairs(predictions: list[str], references: list[list[str]]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("no predictions to score")
    if any(not refs for refs in references):
        raise ValueError("every prediction needs at least one reference")


def _rouge_l(predictions: list[str], references: list[list[str]]) -> float:
    """Mean best-reference ROUGE-L F1 in percent."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = [scorer.score_multi(refs, pred)["rougeL"].fmeasure for pred, refs in zip(predictions, references)]
    return 100 * sum(rouge) / len(rouge)


def _normalise(text: str) -> list[str]:
    """Lower-cased words without punctuation: "Paris." and "paris" are the same answer."""
    return "".join(" " if c in string.punctuation else c for c in text.lower()).split()


def _token_f1(prediction: list[str], reference: list[str]) -> float:
    """F1 of the bags of words (SQuAD's answer F1); two empty answers agree."""
    if not prediction or not reference:
        return float(prediction == reference)
    common = sum((Counter(prediction) & Counter(reference)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(prediction), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def score_instruction(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Token F1 (first: dev model selection needs a graded score), exact match, ROUGE-L and corpus BLEU.

    F1 and exact match compare normalised words (``_normalise``) with the best reference of each input.
    """
    _check_pairs(predictions, references)
    f1, exact = [], []
    for pred, refs in zip(predictions, references):
        words, gold = _normalise(pred), [_normalise(r) for r in refs]
        f1.append(max(_token_f1(words, g) for g in gold))
        exact.append(any(words == g for g in gold))
    n = len(predictions)
    return {"token_f1": 100 * sum(f1) / n, "exact_match": 100 * sum(exact) / n,
            **score_generation(predictions, references)}


def classification_metrics(predictions: list[int], labels: list[int], num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 in percent.

    Macro-F1 averages over the classes that occur in the labels or the predictions: a class absent
    from both has no defined F1 and would otherwise drag the mean down for nothing.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    if not labels:
        raise ValueError("no predictions to score")
    pairs = list(zip(predictions, labels))
    f1s = []
    for c in range(num_labels):
        tp = sum(p == c and y == c for p, y in pairs)
        wrong = sum((p == c) != (y == c) for p, y in pairs)  # false positives + false negatives
        if tp or wrong:
            f1s.append(2 * tp / (2 * tp + wrong))
    accuracy = sum(p == y for p, y in pairs) / len(pairs)
    return {"accuracy": 100 * accuracy, "macro_f1": 100 * sum(f1s) / len(f1s)}
