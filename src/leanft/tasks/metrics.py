"""Scores for classification and generation, in percent like the papers report them."""

from __future__ import annotations


def score_generation(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus BLEU (sacrebleu, all references of each input) and mean best-reference ROUGE-L F1.

    Examples may have different numbers of references (E2E MRs have 1 to 45); sacrebleu takes
    missing ones as None. The scorers are imported here: classification never needs them.
    """
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("no predictions to score")
    if any(not refs for refs in references):
        raise ValueError("every prediction needs at least one reference")
    depth = max(len(refs) for refs in references)
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(depth)]
    bleu = sacrebleu.corpus_bleu(predictions, streams).score
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = [scorer.score_multi(refs, pred)["rougeL"].fmeasure for pred, refs in zip(predictions, references)]
    return {"bleu": bleu, "rouge_l": 100 * sum(rouge) / len(rouge)}


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
