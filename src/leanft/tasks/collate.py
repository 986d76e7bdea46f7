"""From task examples to model inputs: candidate token positions for decoders, text pairs for encoders.

A decoder never computes logits over every position: ``encode_candidates`` records, for each answer
candidate, which positions predict which tokens, so the loss (``leanft.objectives``) scores exactly those.

Tokenising and batching are apart: ``Tokenized`` tokenises each example once per run and keeps its ids, so
a training step or an evaluation only pads and indexes ids already made (``encode`` is the one-off form).
"""

from __future__ import annotations

from array import array
from typing import Any

import torch

from .base import Task


def _in_context(tokenizer, prompt: list[int], text: str, option: str, where: str) -> tuple[list[int], int]:
    """The ids of ``text + option`` as the model reads them, and where the option's tokens start.

    Tokenising the option on its own can give tokens the model never sees after the prompt
    (SentencePiece prepends '▁': " great" alone is ['▁', '▁great'], after "It was" it is ['▁great']),
    so the joint text is tokenised and the prompt part is its longest common prefix with the prompt's
    own ids: a token straddling the boundary belongs to the option. Special tokens a tokenizer appends
    (a trailing EOS) are dropped, since the option follows the prompt directly.
    """
    full = tokenizer(text + option).input_ids
    start = 0
    while start < min(len(prompt), len(full)) and prompt[start] == full[start]:
        start += 1
    tail = prompt[start:]
    if tail and len(tail) < len(full) - start and full[-len(tail):] == tail \
            and all(t in tokenizer.all_special_ids for t in tail):
        full = full[:-len(tail)]
    if start == len(full):
        raise ValueError(f"{where}: answer option {option!r} adds no tokens after the prompt")
    return full, start


def _gold_only(task: Task, training: bool) -> bool:
    """Training on a decoder scores only the gold continuation of multiple-choice and generation tasks;
    classification always scores every candidate."""
    return training and task.kind != "classification"


def _scored(task: Task, ex: dict, gold_only: bool) -> tuple[str, tuple[str, ...], bool]:
    """All that a decoder's ids of ``ex`` follow from: the prompt, the candidates scored (the gold one alone
    with ``gold_only``), and whether they end with EOS (generation targets, so that the model learns to stop)."""
    text = task.prompt(ex)
    candidates = task.candidates(ex)
    chosen = [candidates[task.label(ex)]] if gold_only else candidates
    return text, tuple(chosen), task.kind == "generation"


def _candidate_pieces(tokenizer, max_length: int, text: str, options: tuple[str, ...], eos: bool, name: str
                      ) -> tuple[list[tuple[array, array]], bool]:
    """The ``(prompt ids, answer ids)`` of each option after ``text``, and whether the prompt was cut.

    Prompts are cut from the left so that prompt and answer fit ``max_length`` (the end of a prompt, next to
    its answer, matters most); answers are never cut: one that leaves no room for a prompt token is refused.
    Ids are kept as 32-bit arrays: a run holds those of all its examples.
    """
    prompt = tokenizer(text).input_ids
    end = [tokenizer.eos_token_id] if eos and tokenizer.eos_token_id is not None else []
    pieces, cut = [], False
    for option in options:
        full, start = _in_context(tokenizer, prompt, text, option, f"task {name}")
        answer = full[start:] + end
        room = max_length - len(answer)
        if room < 1:
            raise ValueError(f"task {name}: the answer {option[:60]!r} is {len(answer)} tokens, which "
                             f"leaves no room for its prompt in --max-length {max_length}; raise --max-length "
                             f"above {len(answer)}")
        cut |= start > room
        pieces.append((array("i", full[:start][-room:]), array("i", answer)))
    return pieces, cut


def _collate_candidates(task: Task, examples: list[dict], pieces_of: list[list[tuple[array, array]]], pad: int,
                        gold_only: bool) -> dict[str, Any]:
    """The batch of ``encode_candidates`` from each example's pieces."""
    seqs, rows, cols, targets, slots, first, golds = [], [], [], [], [], [], []
    n_slots = 0
    for ex, pieces in zip(examples, pieces_of):
        first.append(n_slots)
        shared = all(len(answer) == 1 for _, answer in pieces) and len({tuple(p) for p, _ in pieces}) == 1
        for j, (prompt, answer) in enumerate(pieces):
            if not shared or j == 0:
                seqs.append(prompt if shared else prompt + answer)
            for k, token in enumerate(answer):
                rows.append(len(seqs) - 1), cols.append(len(prompt) + k), targets.append(token)
                slots.append(n_slots + j)
        n_slots += len(pieces)
        golds.append(0 if gold_only else task.label(ex))
    first.append(n_slots)
    width = max(map(len, seqs))
    return {
        "input_ids": torch.tensor([s.tolist() + [pad] * (width - len(s)) for s in seqs]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs]),
        "rows": torch.tensor(rows), "cols": torch.tensor(cols), "targets": torch.tensor(targets),
        "slots": torch.tensor(slots), "first": torch.tensor(first), "gold": torch.tensor(golds), "kind": task.kind,
    }


def encode_candidates(
    task: Task, examples: list[dict], tokenizer, max_length: int, gold_only: bool = False
) -> dict[str, Any]:
    """Token ids of the prompts and candidates, padded on the right, with every candidate token located.

    Each candidate is a *slot*; each of its tokens is a ``(row, col, target, slot)`` entry: the model's
    prediction at ``col - 1`` of sequence ``row`` is scored against ``target``. Candidate tokens are
    those of ``prompt + candidate`` tokenised together (see ``_in_context``), cut to fit as
    ``_candidate_pieces`` says. When all candidates of an example are single tokens after the same prompt
    tokens (most classification verbalisers), they share one sequence, the prompt alone, scored at its last
    position: the same numbers at a fraction of the compute. Otherwise each candidate gets its own
    ``prompt + candidate`` sequence.
    """
    pieces_of = [_candidate_pieces(tokenizer, max_length, *_scored(task, ex, gold_only), task.name)[0]
                 for ex in examples]
    return _collate_candidates(task, examples, pieces_of, tokenizer.pad_token_id, gold_only)


def generation_prompts(task: Task, examples: list[dict], tokenizer, max_length: int,
                       max_new_tokens: int) -> tuple[list[list[int]], list[bool]]:
    """The prompt ids to generate from, each cut from the left as for scoring, so that it and ``max_new_tokens``
    fit ``max_length``; and which were cut."""
    room = max_length - max_new_tokens
    if room < 1:
        raise ValueError(f"task {task.name}: --max-new-tokens {max_new_tokens} leaves no room for a prompt in "
                         f"--max-length {max_length}; raise --max-length or lower --max-new-tokens")
    ids = [tokenizer(task.prompt(ex)).input_ids for ex in examples]
    return [i[-room:] for i in ids], [len(i) > room for i in ids]


class Tokenized:
    """The ids of every example a run encodes, made the first time it is and kept: ``batch`` and ``cut`` then
    pad and index them, so that training steps, repeated evaluations and the truncation report tokenise an
    example once (prompts to generate from are tokenised apart, by ``generation_prompts``).

    Ids are keyed by what they follow from (a decoder's prompt text, scored candidates and EOS; an encoder's
    text pair), not by the example object: an example in two tasks or splits gets the ids its text gives.
    """

    def __init__(self, tokenizer, max_length: int, decoder: bool) -> None:
        self.tokenizer, self.max_length, self.decoder = tokenizer, max_length, decoder
        self._ids: dict[tuple, Any] = {}

    def _pieces(self, task: Task, ex: dict, gold_only: bool) -> tuple[list[tuple[array, array]], bool]:
        key = _scored(task, ex, gold_only)
        if key not in self._ids:
            self._ids[key] = _candidate_pieces(self.tokenizer, self.max_length, *key, task.name)
        return self._ids[key]

    def _pair(self, task: Task, ex: dict) -> dict[str, list[int]]:
        """An encoder's ids of ``ex``, cut from the end to ``max_length`` (the tokenizer's ``truncation=True``)."""
        key = tuple(task.encoder_text(ex))
        if key not in self._ids:
            self._ids[key] = dict(self.tokenizer(*key, truncation=True, max_length=self.max_length))
        return self._ids[key]

    def batch(self, task: Task, examples: list[dict], training: bool = False) -> dict[str, Any]:
        """One task's examples as a batch (``_gold_only`` says which candidates a decoder scores); an encoder's
        is its ``(text_a, text_b)`` pairs padded as the tokenizer pads them, with labels and the label count."""
        if not self.decoder:
            enc = self.tokenizer.pad([self._pair(task, ex) for ex in examples], padding=True, return_tensors="pt")
            return {**enc, "labels": torch.tensor([task.label(ex) for ex in examples]), "num_labels": task.num_labels}
        gold_only = _gold_only(task, training)
        pieces_of = [self._pieces(task, ex, gold_only)[0] for ex in examples]
        return _collate_candidates(task, examples, pieces_of, self.tokenizer.pad_token_id, gold_only)

    def cut(self, task: Task, examples: list[dict], training: bool = False) -> list[bool]:
        """Which examples ``batch`` cuts to fit ``max_length``: a decoder's prompts, cut from the left; an
        encoder's text pairs, cut from the end (only a pair cut to exactly ``max_length`` is tokenised
        again, whole, to tell)."""
        if self.decoder:
            gold_only = _gold_only(task, training)
            return [self._pieces(task, ex, gold_only)[1] for ex in examples]
        return [len(self._pair(task, ex)["input_ids"]) >= self.max_length
                and len(self.tokenizer(*task.encoder_text(ex)).input_ids) > self.max_length for ex in examples]


def encode(task: Task, examples: list[dict], tokenizer, max_length: int, decoder: bool,
           training: bool = False) -> dict[str, Any]:
    """``Tokenized.batch`` for examples encoded once (a run keeps one ``Tokenized`` instead)."""
    return Tokenized(tokenizer, max_length, decoder).batch(task, examples, training)


def to_device(batch: dict, device: torch.device | str) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def task_batches(items: list[tuple[int, dict]], task_list: list[Task], tokenized: Tokenized,
                 device: torch.device | str) -> list[tuple[int, dict]]:
    """A training micro-batch of ``(task index, example)`` pairs, possibly of several tasks, as one encoded
    batch per task: ``[(n_examples, batch), ...]``."""
    out = []
    for ti in sorted({ti for ti, _ in items}):
        exs = [ex for t, ex in items if t == ti]
        out.append((len(exs), to_device(tokenized.batch(task_list[ti], exs, training=True), device)))
    return out
