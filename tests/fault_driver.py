"""A child process for ``test_faults.py``: ``leanft`` training with a fault injected where a test says.

    python tests/fault_driver.py kill CONFIG.json STEP MICRO   # SIGKILL itself in that step's micro-batch
    torchrun --nproc_per_node 2 tests/fault_driver.py plan PLAN.json OUT   # runs in turn, one process group

A plan is a list of ``{"name", "config", "fault"}``; each process writes ``OUT/<name>.rank<R>.json`` with
whether the run ended or the error it stopped with, and the micro-batch index of every DDP gradient sync.
Faults: ``{"kind": "kill"|"nan"|"flat", "steps": [...], "micro": m, "ranks": [...]}`` (``micro`` -1: any; a
zeroth-order step has no micro-batches; ``flat``: a finite loss that no perturbation moves, what activations
overflowed into zeros by a normalisation give).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
from pathlib import Path

from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from leanft import objectives, optim, train
from leanft.config import TrainConfig

NOW = {"step": None, "micro": -1}  # the step being taken (None between steps) and its micro-batch
FAULT: dict = {}
SYNCS: list[int] = []  # micro-batch index at each DDP gradient all-reduce


def _install() -> None:
    for cls in (optim.FirstOrder, optim.ZerothOrder):
        def step(self, step, epoch, micro_batches, _real=cls.step):
            NOW.update(step=step, micro=-1)
            try:
                return _real(self, step, epoch, micro_batches)
            finally:
                NOW["step"] = None
        cls.step = step

    real_loss = objectives.mean_loss

    def mean_loss(net, batches, decoder):
        if NOW["step"] is not None and net.training:
            NOW["micro"] += 1
        hit = (FAULT and NOW["step"] in FAULT["steps"] and FAULT.get("micro", -1) in (-1, NOW["micro"])
               and int(os.environ.get("RANK", "0")) in FAULT.get("ranks", [0]))
        if hit and FAULT["kind"] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        loss = real_loss(net, batches, decoder)
        if hit and FAULT["kind"] == "flat":
            return loss * 0 + math.log(2)
        return loss * float("nan") if hit else loss

    objectives.mean_loss = mean_loss

    real_wrap = optim.FirstOrder._wrap

    def wrap(self):
        real_wrap(self)
        if isinstance(self.net, DistributedDataParallel):
            def counted(state, bucket):
                SYNCS.append(NOW["micro"])
                return default_hooks.allreduce_hook(state, bucket)
            self.net.register_comm_hook(None, counted)

    optim.FirstOrder._wrap = wrap


def main() -> None:
    _install()
    mode = sys.argv[1]
    if mode == "kill":
        config, step, micro = json.loads(Path(sys.argv[2]).read_text()), int(sys.argv[3]), int(sys.argv[4])
        FAULT.update(kind="kill", steps=[step], micro=micro)
        train.train(TrainConfig(**config))
        raise SystemExit("the run ended without reaching the step it was to be killed at")
    plan, out = json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[3])
    rank = int(os.environ.get("RANK", "0"))
    for entry in plan:
        FAULT.clear()
        FAULT.update(entry.get("fault") or {})
        SYNCS.clear()
        result = {"ok": True}
        try:
            train.train(TrainConfig(**entry["config"]))
        except FloatingPointError as e:
            result = {"ok": False, "error": str(e)}
        result["syncs"] = list(SYNCS)
        (out / f"{entry['name']}.rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
