"""Write E2E as a users' instruction file would be: ``train.jsonl`` / ``eval.jsonl`` with ``prompt`` and
``completion`` columns (one reference per row), sampled from leanft's carried E2E data.

    python scripts/e2e_jsonl.py runs/e2e-sft [--train 300 --eval 60 --seed 0]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from leanft import tasks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--train", type=int, default=300)
    p.add_argument("--eval", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    task, out = tasks.get_task("e2e"), Path(args.out)
    splits = tasks.load_splits("e2e", args.train, 0, args.eval, args.seed)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", splits.train), ("eval", splits.eval)):
        with open(out / f"{name}.jsonl", "w") as f:
            for ex in rows:
                answer = task.candidates(ex)[task.label(ex)].strip()
                f.write(json.dumps({"prompt": task.prompt(ex), "completion": answer}) + "\n")


if __name__ == "__main__":
    main()
