"""LaMDA in a plain PyTorch loop: one call after each optimiser step freezes P_B on schedule.

    python examples/plain_loop_lamda.py                         # SmolLM2-135M, SST-2 as text, 50 steps

LaMDA trains an r x r core S between a frozen projection A and a projection B that is frozen column by
column over the first 30 % of the steps (``LamdaConfig.freeze_fraction``):
``model.base_model.update_freezing(step, total_steps)`` after ``optimizer.step()`` is the whole
integration. (In a ``Trainer``, pass ``callbacks=[leanft.LamdaCallback()]``.)
"""

from __future__ import annotations

import argparse

import torch
from peft import get_peft_model
from transformers import DataCollatorForLanguageModeling

import leanft
from leanft import tasks


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="a leanft model name, a local folder or a hub id")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    model, tokenizer = leanft.models.load_model(args.model)
    model = get_peft_model(model, leanft.LamdaConfig(task_type="CAUSAL_LM", r=args.rank))
    task = tasks.get_task("sst2")
    examples = tasks.load_splits("sst2", args.steps * args.batch_size, 0, 0).train
    texts = [tokenizer(task.prompt(ex) + task.candidates(ex)[task.label(ex)]) for ex in examples]
    collate = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    model.train()
    for step in range(args.steps):
        batch = collate(texts[step * args.batch_size : (step + 1) * args.batch_size])
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        frozen = model.base_model.update_freezing(step + 1, args.steps)  # LaMDA's schedule: the one extra line
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step + 1}: loss {loss.item():.4f}, P_B columns frozen {frozen}")
    return model


if __name__ == "__main__":
    main()
