"""Fingerprints of short runs of every method: two versions of leanft compared bit for bit.

    python scripts/fingerprints.py OUT.json [--work DIR] [--smollm2]

Each run trains a few steps of a tiny random model (the tests' LLaMA and BERT) on SST-2 through
``leanft.train.train`` and is reduced to one hash: its logged losses and projected gradients, its evaluation
metrics and the bytes of every tensor of its best adapter. A refactoring that changes no behaviour leaves
every hash as it was; run the script on both versions (``PYTHONPATH=<other checkout>/src``) and diff the
files. ``--smollm2`` adds the main job (LoRETTA_rep on SmolLM2-135M), a few steps of it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import make_model_dir  # noqa: E402

from leanft.config import TrainConfig  # noqa: E402
from leanft.train import train  # noqa: E402

SHORT = dict(task="sst2", num_train=24, num_dev=8, num_eval=16, max_steps=6, eval_every=3, batch_size=4,
             save_every="2", eval_batch_size=8)
RUNS = {
    **{m: dict(model="llama", method=m) for m in ("full", "lora", "loretta-rep", "lamda", "lamda++", "mezo",
                                                     "mezo-lora")},
    **{m: dict(model="llama", method=m, method_options={"bottleneck": 8}) for m in ("loretta-adp", "adazeta")},
    "lora-bert": dict(model="bert", method="lora"),
    "loretta-adp-bert": dict(model="bert", method="loretta-adp", method_options={"bottleneck": 8}),
    "mezo-lora-bert": dict(model="bert", method="mezo-lora"),
    "loretta-rep-bf16": dict(model="llama", method="loretta-rep", dtype="bfloat16"),
    "mezo-bf16": dict(model="llama", method="mezo", dtype="bfloat16"),
    "mezo-lora-q3-wd": dict(model="llama", method="mezo-lora", zo_queries=3, weight_decay=0.1),
    "lamda-wd-accum": dict(model="llama", method="lamda", weight_decay=0.1, grad_accum=2, batch_size=2),
}


def fingerprint(out: Path) -> str:
    digest = hashlib.sha256()
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        digest.update(json.dumps({k: row.get(k) for k in ("step", "loss", "projected_grad", "grad_norm", "dev",
                                                           "updated_params")}, sort_keys=True).encode())
    metrics = json.loads((out / "metrics.json").read_text())
    digest.update(json.dumps([metrics["eval"], metrics["eval_before"], metrics["forward_passes"]],
                             sort_keys=True).encode())
    for file in sorted((out / "best").glob("*.safetensors")):
        for name, tensor in sorted(load_file(str(file)).items()):
            digest.update(name.encode() + tensor.contiguous().view(-1).view(dtype=torch.uint8)
                          .numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--work", default="runs/fingerprints")
    parser.add_argument("--smollm2", action="store_true")
    args = parser.parse_args()
    work = Path(args.work)
    models = {f: work / f"tiny-{f}" for f in ("llama", "bert")}
    for family, folder in models.items():
        if not folder.is_dir():
            make_model_dir(folder, family)
    runs = {name: {**SHORT, **spec, "model": str(models[spec["model"]])} for name, spec in RUNS.items()}
    if args.smollm2:
        runs["main-job"] = {**SHORT, "model": "smollm2-135m", "method": "loretta-rep", "max_steps": 3}
    result = {}
    for name, spec in runs.items():
        out = work / "runs" / name
        shutil.rmtree(out, ignore_errors=True)
        train(TrainConfig(**spec, output_dir=str(out)))
        result[name] = fingerprint(out)
        print(name, result[name], flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
