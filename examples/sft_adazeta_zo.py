"""Zeroth-order SFT with TRL: AdaZeta (TT adapters + its query schedule) through ``leanft.ZOSFTTrainer``.

    pip install 'leanft[trl]'
    python examples/sft_adazeta_zo.py                           # SmolLM2-135M, E2E-style data, 40 steps
    torchrun --nproc_per_node 2 examples/sft_adazeta_zo.py --batch-size 4   # the same run on two processes

Forward passes only: no gradients, no optimiser state (sgd, the default), the memory of inference. TRL does the data
(prompt-completion pairs, loss on the completion only); leanft's engine does the SPSA step, the same
one ``leanft train --method adazeta`` runs. AdaZeta's adapters are LoRETTA_adp's with norms frozen and
the noise-free start; ``zo_schedule="adazeta"`` raises the query count with the epoch (``--queries N``
takes N every step instead). On several processes each evaluates its share of the queries on the whole
batch, so the result is that of one process with the same global batch. ``--optimizer`` picks another
zeroth-order rule (``zo_optimizer``; e.g. ``--optimizer adam``, which keeps two moments per trainable weight).
"""

from __future__ import annotations

import argparse

import torch
from datasets import Dataset
from trl import SFTConfig

import leanft
from leanft import tasks
from leanft.zo import OPTIMIZERS


def e2e_pairs(n: int) -> Dataset:
    task = tasks.get_task("e2e")
    rows = [{"prompt": task.prompt(ex), "completion": task.candidates(ex)[task.label(ex)]}
            for ex in tasks.load_splits("e2e", n, 0, 0).train]
    return Dataset.from_list(rows)


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="a leanft model name, a local folder or a hub id")
    p.add_argument("--output-dir", default="runs/example-sft-adazeta")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--examples", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--bottleneck", type=int, default=64)
    p.add_argument("--epochs", type=float, default=0, help="> 0: train for epochs (AdaZeta's queries grow with them)")
    p.add_argument("--queries", type=int, default=0, help="> 0: this many queries every step, not AdaZeta's schedule")
    p.add_argument("--optimizer", default="sgd", choices=tuple(OPTIMIZERS),
                   help="the zeroth-order rule (fzoo needs --queries 2 or more)")
    args = p.parse_args(argv)

    model, tokenizer = leanft.models.load_model(args.model)
    config = leanft.LorettaAdpConfig(task_type="CAUSAL_LM", bottleneck_size=args.bottleneck, tt_rank=5, train_norms=False,
                                     init_mode="noise_free")
    training = SFTConfig(output_dir=args.output_dir, max_steps=-1 if args.epochs else args.steps,
                         num_train_epochs=args.epochs or 1, per_device_train_batch_size=args.batch_size,
                         learning_rate=1e-4, lr_scheduler_type="constant", logging_steps=max(1, args.steps // 4),
                         save_steps=20, report_to=[], seed=0, max_length=256, bf16=False,  # TRL's default is bf16
                         use_cpu=not torch.cuda.is_available())  # processes on CPUs talk through gloo only then
    schedule = {"zo_schedule": "fixed", "zo_queries": args.queries} if args.queries else {"zo_schedule": "adazeta"}
    trainer = leanft.ZOSFTTrainer(model=model, args=training, train_dataset=e2e_pairs(args.examples),
                                  processing_class=tokenizer, peft_config=config, zo_eps=1e-3,
                                  zo_optimizer=args.optimizer, **schedule)
    trainer.train()
    trainer.save_model(f"{args.output_dir}/adapter")
    trainer.save_state()  # trainer_state.json: the logged loss, queries, entropy, token accuracy and tokens
    return trainer


if __name__ == "__main__":
    main()
