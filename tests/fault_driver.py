"""A child process for ``test_faults.py``: ``leanft`` training with a fault injected where a test says.

    python tests/fault_driver.py kill CONFIG.json STEP MICRO   # SIGKILL itself in that step's micro-batch
                                                               # (test_faults.in_child: main(argv) in a fork)
    python tests/fault_driver.py kill CONFIG.json STEP MICRO --zo-optimizer adam ...   # the same under
                                                               # `leanft train --config CONFIG.json FLAGS`
    python tests/fault_driver.py term CONFIG.json STEP MICRO   # SIGTERM itself there, under `leanft train`
    torchrun --nproc_per_node 2 tests/fault_driver.py plan PLAN.json OUT   # runs in turn, one process group

A plan is a list of ``{"name", "config", "fault"}``; each process writes ``OUT/<name>.rank<R>.json`` with
whether the run ended or the error it stopped with, and the micro-batch index of every DDP gradient sync.
Faults: ``{"kind": "kill"|"term"|"nan"|"nan-gradient"|"flat"|"clock", "steps": [...], "micro": m,
"ranks": [...]}`` (``micro`` -1: any; a zeroth-order step has no micro-batches; ``nan-gradient``: a finite
loss with a NaN gradient; ``flat``: a finite loss that no perturbation moves, what activations overflowed
into zeros by a normalisation give).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from leanft import cli, objectives, optim, stops, train
from leanft.config import TrainConfig

NOW = {"step": None, "micro": -1}  # the step being taken (None between steps) and its micro-batch
FAULT: dict = {}
SYNCS: list[int] = []  # micro-batch index at each DDP gradient all-reduce


def nan_gradient(net) -> torch.Tensor:
    """Zero, with a NaN gradient for the first trainable tensor of ``net`` (sqrt's infinite slope at 0, times 0)."""
    p = next(p for p in net.parameters() if p.requires_grad)
    return 0 * (p - p.detach()).abs().sqrt().sum()


@torch.no_grad()
def overflow(net) -> None:
    """Blow up the last layer's LoRA B factor of v_proj, as a diverged run does: activations past 1.8e19 that the
    final RMSNorm turns into zeros, so the loss is finite and no perturbation moves it."""
    [p for n, p in net.named_parameters() if "v_proj.lora_B" in n][-1].fill_(1e24)


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
        if hit and FAULT["kind"] == "term":  # a scheduler's stop: the step goes on, the loss stays real
            os.kill(os.getpid(), signal.SIGTERM)
            hit = False
        if hit and FAULT["kind"] == "flat":  # every forward of the step, the overflow check's too
            overflow(net)
            return real_loss(net, batches, decoder)
        loss = real_loss(net, batches, decoder)
        if hit and FAULT["kind"] == "nan-gradient":
            return loss + nan_gradient(net)
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
    train.time = FaultClock()


class FaultClock:
    """``train``'s clock: with a ``clock`` fault it runs 1000 times fast on the faulted ranks, which then
    find a time-based checkpoint due at every step while the others do not."""

    def __getattr__(self, name):
        return getattr(time, name)

    def perf_counter(self) -> float:
        fast = FAULT.get("kind") == "clock" and int(os.environ.get("RANK", "0")) in FAULT.get("ranks", [0])
        return time.perf_counter() * (1000 if fast else 1)


def main(argv: list[str]) -> None:
    _install()
    mode = argv[0]
    if mode == "kill":
        config, step, micro = json.loads(Path(argv[1]).read_text()), int(argv[2]), int(argv[3])
        FAULT.update(kind="kill", steps=[step], micro=micro)
        if argv[4:]:  # flags: through the command line, which reads them over the config file
            cli.main(["train", "--config", argv[1], *argv[4:]])
        else:
            train.train(TrainConfig(**config))
        raise SystemExit("the run ended without reaching the step it was to be killed at")
    if mode == "term":  # through the command line, whose exit code and resume command the test reads
        step, micro = int(argv[2]), int(argv[3])
        FAULT.update(kind="term", steps=[step], micro=micro)
        cli.main(["train", "--config", argv[1]])
        raise SystemExit("the run ended without being stopped")
    plan, out = json.loads(Path(argv[1]).read_text()), Path(argv[2])
    rank = int(os.environ.get("RANK", "0"))
    for entry in plan:
        FAULT.clear()
        FAULT.update(entry.get("fault") or {})
        SYNCS.clear()
        result = {"ok": True}
        try:
            train.train(TrainConfig(**entry["config"]))
        except (FloatingPointError, ValueError, stops.Interrupted) as e:  # ValueError: a refusal
            result = {"ok": False, "error": str(e)}
        result["syncs"] = list(SYNCS)
        (out / f"{entry['name']}.rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
