"""The loss of a batch: how encoded examples become a number to minimise and per-example scores.

Path of one training micro-batch (``leanft.train`` builds it, ``leanft.optim`` minimises it):

1. ``tasks.collate.task_batches`` turns ``(task, example)`` pairs into one encoded batch per task, from
   token ids that ``tasks.collate.Tokenized`` made once per example and keeps for the run.
   Decoders get the prompt followed by the answer candidates and, for every candidate token, the
   ``(row, col, target, slot)`` position that predicts it; encoders get ``(text_a, text_b)`` pairs.
2. ``network(model, decoder)`` wraps a decoder in ``CandidateLogProbs``: it runs the transformer and
   applies the LM head at the candidate positions only, returning each candidate token's log-probability.
   An encoder is its own network (its classification head gives the class logits).
3. ``batch_loss``: a candidate's score is the mean log-probability of its tokens. Classification trains
   with cross-entropy over the candidates' scores (MeZO's ``train_as_classification``); multiple-choice
   and generation train on the negative score of the gold continuation; encoders use cross-entropy over
   their logits. The scores double as predictions for evaluation (``argmax``).
4. ``mean_loss`` weights the per-task losses of a mixed micro-batch by their example counts.
"""

from __future__ import annotations

import torch
from peft import PeftModel
from torch import nn


class CandidateLogProbs(nn.Module):
    """Log-probabilities of the candidate tokens only: the LM head runs on those positions alone.

    A module of its own so that data-parallel wrappers (DDP) see the forward that produces the loss.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, rows, cols, targets) -> torch.Tensor:
        base = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
        hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        logits = base.get_output_embeddings()(hidden[rows, cols - 1]).float()
        return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


def network(model: nn.Module, decoder: bool) -> nn.Module:
    """The module whose forward gives what ``batch_loss`` needs: candidate log-probs or class logits."""
    return CandidateLogProbs(model) if decoder else model


def candidate_scores(token_logp: torch.Tensor, batch: dict) -> torch.Tensor:
    """Mean log-likelihood of each candidate over its tokens (its score)."""
    n = int(batch["first"][-1])
    total = torch.zeros(n, device=token_logp.device).index_add(0, batch["slots"], token_logp)
    count = torch.zeros(n, device=token_logp.device).index_add(0, batch["slots"], torch.ones_like(token_logp))
    return total / count


def batch_loss(net: nn.Module, batch: dict, decoder: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Loss of one encoded batch, and per example the candidate scores (or class logits)."""
    if decoder:
        token_logp = net(batch["input_ids"], batch["attention_mask"], batch["rows"], batch["cols"], batch["targets"])
        scores = candidate_scores(token_logp, batch)
        per_example = [scores[a:b] for a, b in zip(batch["first"][:-1], batch["first"][1:])]
        if batch["kind"] == "classification":
            losses = [nn.functional.cross_entropy(s[None], g[None]) for s, g in zip(per_example, batch["gold"])]
        else:
            losses = [-s[g] for s, g in zip(per_example, batch["gold"])]
        return torch.stack(losses).mean(), per_example
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "num_labels")}
    logits = net(**inputs).logits[:, : batch["num_labels"]]
    return nn.functional.cross_entropy(logits.float(), batch["labels"]), list(logits)


def mean_loss(net: nn.Module, batches: list[tuple[int, dict]], decoder: bool) -> torch.Tensor:
    """Example-weighted mean loss over the per-task batches of one micro-batch."""
    total = sum(n for n, _ in batches)
    return sum(batch_loss(net, b, decoder)[0] * n / total for n, b in batches)
