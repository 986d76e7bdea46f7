"""Checkpoints that a crash never leaves half-written, and the state a resume needs to be exact.

Every folder is written to a temporary sibling and renamed into place, replacing the older one only
afterwards. A first-order checkpoint holds the trainable tensors, optimiser and scheduler state and the
RNG states; a zeroth-order run keeps instead its trainable start state and one logged line per step
(``ZOLog``), and rebuilds the exact parameters by replaying the log.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel
from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING
from safetensors.torch import load_file, save_file
from torch import nn

from .zo import ZOEngine, ZOStep


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training changes or a resume needs: trainable parameters and the adapter's own buffers
    (e.g. the frozen initial factors of a noise-free start)."""
    state = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if isinstance(model, PeftModel):  # adapter tensors frozen during training (LaMDA's P_B) count too
        prefix = PEFT_TYPE_TO_PREFIX_MAPPING[model.peft_config[model.active_adapter].peft_type]
        state.update({n: t for n, t in [*model.named_parameters(), *model.named_buffers()] if prefix in n})
    return {n: t.detach().cpu().contiguous() for n, t in state.items()}


def load_tensors(model: nn.Module, path: Path) -> None:
    """Copy a ``trainable_state`` file back into ``model``'s parameters and buffers."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name, tensor in load_file(str(path)).items():
        tensors[name].data.copy_(tensor)


def atomic_dir(target: Path, write) -> None:
    """Run ``write(tmp_dir)`` and move the result to ``target``, replacing an older one only after."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def save(out: Path, state: dict, model: nn.Module | None = None, optimizer_state: dict | None = None) -> None:
    """``out/checkpoint``: the loop's ``state`` and, for first-order runs, the trainable tensors, the
    optimiser's ``optimizer_state`` and every RNG state."""
    def write(d: Path) -> None:
        if model is not None:
            save_file(trainable_state(model), str(d / "trainable.safetensors"))
            rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
            torch.save({**optimizer_state, "rng": rng}, d / "optimizer.pt")
        (d / "trainer_state.json").write_text(json.dumps(state, indent=1))

    atomic_dir(out / "checkpoint", write)


def exists(out: Path) -> bool:
    return (out / "checkpoint" / "trainer_state.json").is_file()


def load(out: Path, model: nn.Module | None = None) -> tuple[dict, dict | None]:
    """The loop's state and, when ``model`` is given, its trainable tensors restored, the RNG states
    restored and the optimiser's state returned."""
    ckpt = out / "checkpoint"
    if not exists(out):
        raise FileNotFoundError(f"cannot resume: no checkpoint in {ckpt} (was the run started with this output_dir?)")
    extra = None
    if model is not None:
        load_tensors(model, ckpt / "trainable.safetensors")
        extra = torch.load(ckpt / "optimizer.pt", weights_only=False)
        torch.set_rng_state(extra["rng"]["torch"])
        random.setstate(extra["rng"]["python"])
        np.random.set_state(extra["rng"]["numpy"])
    return json.loads((ckpt / "trainer_state.json").read_text()), extra


class ZOLog:
    """A zeroth-order run's checkpoint: the trainable start state and one JSON line per step."""

    def __init__(self, out: Path, main: bool = True) -> None:
        self.log, self.start, self.main = out / "zo_log.jsonl", out / "zo_start.safetensors", main

    def begin(self, model: nn.Module) -> None:
        if self.main:
            save_file(trainable_state(model), str(self.start))
            self.log.write_text("")

    def append(self, record: ZOStep) -> None:
        if self.main:
            with open(self.log, "a") as f:
                f.write(json.dumps(asdict(record)) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def replay(self, model: nn.Module, engine: ZOEngine, steps: int) -> list[ZOStep]:
        """Start state plus the first ``steps`` logged steps: the exact parameters at that step. Lines
        logged after it (lost work) are dropped: those steps are redone, identically."""
        load_tensors(model, self.start)
        lines = [line for line in self.log.read_text().splitlines() if line.strip()][:steps]
        records = [ZOStep(**json.loads(line)) for line in lines]
        engine.replay(records)
        if self.main:
            self.log.write_text("".join(line + "\n" for line in lines))
        return records


def save_best(out: Path, model: nn.Module, tokenizer, run_info: dict) -> None:
    """``out/best``: the adapter (or the whole fine-tuned model with its tokenizer) and the run's facts."""
    def write(d: Path) -> None:
        model.save_pretrained(d)
        if not isinstance(model, PeftModel):
            tokenizer.save_pretrained(d)
        (d / "leanft_run.json").write_text(json.dumps(run_info, indent=1))

    atomic_dir(out / "best", write)


def load_best_weights(best: Path, model: nn.Module) -> None:
    """Put the kept best trainable weights back into ``model``."""
    if isinstance(model, PeftModel):
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        set_peft_model_state_dict(model, load_peft_weights(str(best)))
    else:
        files = sorted(best.glob("*.safetensors"))
        model.load_state_dict({k: v for f in files for k, v in load_file(str(f)).items()}, strict=False)
