"""Scores for classification and generation, in percent like the papers report them."""

from __future__ import annotations

import functools
import re
import types
import unicodedata
from collections import Counter

# Scripts written without spaces between words (Thai, Lao, Myanmar, Khmer, Japanese kana, Chinese characters):
# each of their characters counts as a word, as sacrebleu's Chinese tokenizer counts Chinese characters.
_UNSPACED = re.compile("[\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff"
                       "\uf900-\ufaff\U00020000-\U0002ffff]")
# BLEU counts matching 1- to 4-grams: on references shorter than 4 words it is 0 (or smoothing noise) whatever
# the outputs, so it is reported as None (JSON null) when most examples' references are.
_BLEU_MIN_WORDS = 4


def words(text: str) -> list[str]:
    """Lower-cased words of any script: runs of letters, marks and digits, punctuation and symbols dropped
    ("Paris." and "paris" are the same answer); each character of an unspaced script is a word."""
    return "".join(c if unicodedata.category(c)[0] in "LMN" else " " for c in _spaced(text.lower())).split()


def _spaced(text: str) -> str:
    """``text`` with a space around each character of an unspaced script, so that tokenizers split them."""
    return _UNSPACED.sub(r" \g<0> ", text)


def _check_pairs(predictions: list[str], references: list[list[str]]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("no predictions to score")
    if any(not refs for refs in references):
        raise ValueError("every prediction needs at least one reference")


def example_scores(prediction: str, references: list[str]) -> dict[str, float]:
    """One output's best-reference scores, as fractions: token F1 and exact match of ``words`` (SQuAD's answer
    F1 and EM), and ROUGE-L F1 (rouge-score, reading ``words``: its own tokenizer drops all but ASCII)."""
    tokens, gold = words(prediction), [words(r) for r in references]
    return {"token_f1": max(_token_f1(tokens, g) for g in gold), "exact_match": float(tokens in gold),
            "rouge_l": _rouge().score_multi(references, prediction)["rougeL"].fmeasure}


@functools.cache
def _rouge():
    """One ROUGE-L scorer reading ``words``, built on first use (rouge-score loads nltk)."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=types.SimpleNamespace(tokenize=words))


def _token_f1(prediction: list[str], reference: list[str]) -> float:
    """F1 of the bags of words (SQuAD's answer F1); two empty answers agree."""
    if not prediction or not reference:
        return float(prediction == reference)
    common = sum((Counter(prediction) & Counter(reference)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(prediction), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def _bleu(predictions: list[str], references: list[list[str]]) -> float | None:
    """Corpus BLEU (sacrebleu) over all references of each input, unspaced scripts split into characters; None
    when most inputs' references are shorter than ``_BLEU_MIN_WORDS`` words.

    Examples may have different numbers of references (E2E MRs have 1 to 45); sacrebleu takes missing ones
    as None. sacrebleu is imported here: classification never needs it.
    """
    import sacrebleu

    short = sum(max(len(words(r)) for r in refs) < _BLEU_MIN_WORDS for refs in references)
    if 2 * short > len(references):
        return None
    depth = max(len(refs) for refs in references)
    streams = [[_spaced(refs[i]) if i < len(refs) else None for refs in references] for i in range(depth)]
    return sacrebleu.corpus_bleu([_spaced(p) for p in predictions], streams).score


def _percent(scores: list[dict[str, float]], key: str) -> float:
    return 100 * sum(s[key] for s in scores) / len(scores)


def score_generation(predictions: list[str], references: list[list[str]]) -> dict[str, float | None]:
    """Corpus BLEU (``_bleu``) and mean best-reference ROUGE-L F1 (``example_scores``)."""
    _check_pairs(predictions, references)
    scores = list(map(example_scores, predictions, references))
    return {"bleu": _bleu(predictions, references), "rouge_l": _percent(scores, "rouge_l")}


def score_instruction(predictions: list[str], references: list[list[str]]) -> dict[str, float | None]:
    """Token F1 (first: dev model selection needs a graded score), exact match, ROUGE-L and corpus BLEU, each
    example compared with its best reference (``example_scores``)."""
    _check_pairs(predictions, references)
    scores = list(map(example_scores, predictions, references))
    return {"token_f1": _percent(scores, "token_f1"), "exact_match": _percent(scores, "exact_match"),
            "bleu": _bleu(predictions, references), "rouge_l": _percent(scores, "rouge_l")}


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
