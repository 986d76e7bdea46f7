"""From task examples to model inputs: candidate token positions for decoders, text pairs for encoders.

A decoder never computes logits over every position: ``encode_candidates`` records, for each answer
candidate, which positions predict which tokens, so the loss (``leanft.objectives``) scores exactly those.
"""

from __future__ import annotations

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


def _candidate_pieces(task: Task, ex: dict, tokenizer, max_length: int, gold_only: bool
                      ) -> tuple[list[tuple[list[int], list[int]]], bool]:
    """The ``(prompt ids, answer ids)`` of each candidate of ``ex`` to score, and whether a prompt was cut.

    Prompts are cut from the left so that prompt and answer fit ``max_length`` (the end of a prompt, next to
    its answer, matters most); answers are never cut: one that leaves no room for a prompt token is refused.
    Generation targets end with EOS so that the model learns to stop.
    """
    text = task.prompt(ex)
    prompt = tokenizer(text).input_ids
    candidates = task.candidates(ex)
    eos = [tokenizer.eos_token_id] if task.kind == "generation" and tokenizer.eos_token_id is not None else []
    pieces, cut = [], False
    for i in [task.label(ex)] if gold_only else range(len(candidates)):
        full, start = _in_context(tokenizer, prompt, text, candidates[i], f"task {task.name}")
        answer = full[start:] + eos
        room = max_length - len(answer)
        if room < 1:
            raise ValueError(f"task {task.name}: the answer {candidates[i][:60]!r} is {len(answer)} tokens, which "
                             f"leaves no room for its prompt in --max-length {max_length}; raise --max-length "
                             f"above {len(answer)}")
        cut |= start > room
        pieces.append((full[:start][-room:], answer))
    return pieces, cut


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
    seqs, rows, cols, targets, slots, first, golds = [], [], [], [], [], [], []
    n_slots = 0
    for ex in examples:
        pieces, _ = _candidate_pieces(task, ex, tokenizer, max_length, gold_only)
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
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([s + [pad] * (width - len(s)) for s in seqs]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs]),
        "rows": torch.tensor(rows), "cols": torch.tensor(cols), "targets": torch.tensor(targets),
        "slots": torch.tensor(slots), "first": torch.tensor(first), "gold": torch.tensor(golds), "kind": task.kind,
    }


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


def encode_pairs(task: Task, examples: list[dict], tokenizer, max_length: int) -> dict[str, Any]:
    """Encoder classifier inputs: ``(text_a, text_b)`` pairs, labels, and the task's label count."""
    texts = [task.encoder_text(ex) for ex in examples]
    a = [t[0] for t in texts]
    b = [t[1] for t in texts] if texts[0][1] is not None else None
    enc = tokenizer(a, b, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    return {**enc, "labels": torch.tensor([task.label(ex) for ex in examples]), "num_labels": task.num_labels}


def encode(task: Task, examples: list[dict], tokenizer, max_length: int, decoder: bool,
           training: bool = False) -> dict[str, Any]:
    """One task's examples as a batch (``_gold_only`` says which candidates a decoder scores)."""
    if not decoder:
        return encode_pairs(task, examples, tokenizer, max_length)
    return encode_candidates(task, examples, tokenizer, max_length, gold_only=_gold_only(task, training))


def cut_rows(task: Task, examples: list[dict], tokenizer, max_length: int, decoder: bool,
             training: bool = False) -> list[bool]:
    """Which examples ``encode`` cuts to fit ``max_length``: a decoder's prompts, cut from the left; an
    encoder's text pairs, cut from the end (the tokenizer's ``truncation=True``)."""
    if not decoder:
        texts = [task.encoder_text(ex) for ex in examples]
        lengths = [len(tokenizer(a, b).input_ids) for a, b in texts]
        return [n > max_length for n in lengths]
    gold_only = _gold_only(task, training)
    return [_candidate_pieces(task, ex, tokenizer, max_length, gold_only)[1] for ex in examples]


def to_device(batch: dict, device: torch.device | str) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def task_batches(items: list[tuple[int, dict]], task_list: list[Task], tokenizer, max_length: int, decoder: bool,
                 device: torch.device | str) -> list[tuple[int, dict]]:
    """A training micro-batch of ``(task index, example)`` pairs, possibly of several tasks, as one encoded
    batch per task: ``[(n_examples, batch), ...]``."""
    out = []
    for ti in sorted({ti for ti, _ in items}):
        exs = [ex for t, ex in items if t == ti]
        batch = encode(task_list[ti], exs, tokenizer, max_length, decoder, training=True)
        out.append((len(exs), to_device(batch, device)))
    return out
