"""leanft in the user's own training script: ``ZOTrainer`` (SPSA inside ``transformers.Trainer``),
``ZOSFTTrainer`` (the same for TRL's ``SFTTrainer``), and ``LamdaCallback`` (LaMDA's freezing, which lives
with LaMDA in ``leanft.tuners.lamda.trainer``).

leanft's configs are PEFT configs, so ``Trainer(model=get_peft_model(m, LorettaRepConfig(...)))`` and
``SFTTrainer(..., peft_config=LorettaAdpConfig(...))`` need nothing from here; their trainable tensors
are float32 whatever the base model's dtype (train with ``bf16=True`` for bfloat16 compute).

``ZOTrainingMixin`` replaces ``Trainer.training_step`` by one step of ``leanft.zo.ZOEngine``, the engine
``leanft train`` uses: for each query, the loss of the batch at ``theta +- eps z`` (forward passes only,
no autograd graph, eval mode), then ``theta -= lr * mean_q p_q z_q``. ``zo_optimizer`` (with
``zo_optimizer_options``) picks another zeroth-order rule of ``leanft.zo.optimizers`` (momentum, adam, sign,
fzoo, hizoo, lozo, sparse), as ``leanft train --zo-optimizer`` does; each step logs its mean queries and
forward passes (``zo_queries``, ``zo_forwards``: fzoo takes ``Q + 1``, hizoo ``2Q + 1``). The Trainer keeps
what it is good at (data, lr schedule, logging, checkpoints); its own optimiser is a stateless stand-in that
carries the lr.
Under ``torchrun``/``accelerate launch`` every process gathers the whole global batch and evaluates its
share of the queries, so a run equals a single-process run with the same global batch (the data order
is a permutation drawn from the seed and epoch, ``EpochPermutation``, the same for any process count); FSDP and
DeepSpeed, which shard the tensors each process perturbs whole, are refused. ``fp16``/``bf16`` set the forwards'
autocast; no loss scaler runs (there are no gradients), and no ``grad_norm`` is logged. Checkpoints hold
the weights plus the engine's ``state_dict`` (lr scale after rollbacks, its rollback copy, the zeroth-order
optimiser's state such as Adam's moments), written and read as ``leanft train`` writes and reads it, so
``resume_from_checkpoint`` continues exactly.
"""

from __future__ import annotations

import os
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from . import checkpoint
from .optim import decays, start_anchors
from .tuners.lamda.schedule import lamda_tuner
from .tuners.lamda.trainer import LamdaCallback  # noqa: F401  (leanft.LamdaCallback; LaMDA's own)
from .zo import ZOEngine, make_optimizer, query_schedule

ZO_ENGINE = "leanft_zo_engine.pt"  # the engine's state_dict, in each checkpoint-N folder
SCHEDULES = ("fixed", "adazeta")


class _SaveZOState(TrainerCallback):
    def __init__(self, trainer: ZOTrainingMixin) -> None:
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.trainer.engine is not None:
            self.trainer.save_zo_state(Path(args.output_dir) / f"checkpoint-{state.global_step}")


class EpochPermutation(torch.utils.data.Sampler):
    """A permutation of the examples drawn from (seed, epoch) alone: the same on every process and after a
    resume, so that the shards of ``num_processes`` processes make up a single process's batches."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


class ZOTrainingMixin:
    """Zeroth-order training for a ``transformers.Trainer`` subclass (see the module docstring).

    ``zo_schedule="fixed"`` takes ``zo_queries`` queries a step; ``"adazeta"`` takes AdaZeta's
    ``min(max(floor(alpha * epoch**beta), 1), q_max)``. ``zo_blowup``, ``zo_recover`` and ``zo_max_rollbacks`` (0: off)
    are the divergence guard's (``leanft.zo``); the Trainer's ``weight_decay`` decays matrices towards their start.
    ``zo_optimizer`` names a ``leanft.zo.optimizers`` rule and ``zo_optimizer_options`` its options
    (``leanft.zo.OPTIONS``), e.g. ``{"momentum": 0.9}`` or, for lozo, ``{"rank": 2, "interval": 50}``.
    """

    def __init__(self, *args, zo_eps: float = 1e-3, zo_queries: int = 1, zo_schedule: str = "fixed",
                 zo_alpha: float = 0.85, zo_beta: float = 0.45, zo_q_max: int = 20, zo_blowup: float = 0.0,
                 zo_recover: int = 10, zo_max_rollbacks: int = 5, zo_optimizer: str = "sgd",
                 zo_optimizer_options: dict | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if zo_schedule not in SCHEDULES:
            raise ValueError(f"zo_schedule {zo_schedule!r} is not one of: {', '.join(SCHEDULES)}")
        if not (zo_eps > 0 and zo_queries >= 1):
            raise ValueError(f"zo_eps must be positive and zo_queries at least 1, got {zo_eps} and {zo_queries}")
        optimizer = make_optimizer(zo_optimizer, **(zo_optimizer_options or {}))
        least = optimizer.min_queries
        if zo_schedule == "adazeta" and least > 1:
            raise ValueError(f"zo_optimizer {zo_optimizer!r} needs at least {least} queries a step and the "
                             "adazeta schedule takes 1 in its first epochs: use zo_schedule='fixed' with "
                             f"zo_queries >= {least}")
        if zo_schedule == "fixed" and zo_queries < least:
            raise ValueError(f"zo_optimizer {zo_optimizer!r} needs at least {least} queries a step, got "
                             f"zo_queries={zo_queries}: set zo_queries >= {least}")
        if self.is_fsdp_enabled or self.is_fsdp_xla_enabled or self.is_deepspeed_enabled:
            sharder = "DeepSpeed" if self.is_deepspeed_enabled else "FSDP"
            raise ValueError(f"zeroth-order training perturbs each trainable tensor whole, the same on every process, "
                             f"and {sharder} shards them: leave it out and launch the processes plain (torchrun runs "
                             "them data-parallel, each on its share of the queries) or use one process")
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError("zeroth-order training takes one batch per step: set gradient_accumulation_steps=1 "
                             "and raise per_device_train_batch_size instead")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        alone = self.accelerator.num_processes == 1 or self.accelerator.distributed_type == DistributedType.NO
        if world > 1 and alone:
            raise ValueError(f"{world} processes were launched but the Trainer does not run them as one: each would train "
                             "alone on its shard. On CPU pass use_cpu=True (transformers only sets up gloo then)")
        if lamda_tuner(self.model) is not None:
            raise ValueError("LaMDA freezes P_B on a schedule of optimiser steps, which zeroth-order training does "
                             "not follow: train LaMDA with Trainer (and leanft.LamdaCallback), or use LoRA/AdaZeta here")
        self.zo_eps, self.zo_blowup, self.zo_recover = zo_eps, zo_blowup, zo_recover
        self.zo_max_rollbacks = zo_max_rollbacks
        self.zo_optimizer = optimizer  # bound to the engine when it is built, at the first step
        self.zo_queries = ((lambda epoch: query_schedule(epoch, zo_alpha, zo_beta, zo_q_max)) if zo_schedule == "adazeta"
                           else (lambda epoch: zo_queries))
        self.engine: ZOEngine | None = None
        self._resume_from: Path | None = None
        self._stats: list[tuple[int, int, float, bool]] = []  # (queries, forwards, projected gradient, rolled back)
        self.add_callback(_SaveZOState(self))

    # -- the Trainer's optimiser: a stand-in that carries the lr schedule, no state --------------------

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self._lr_carrier = torch.nn.Parameter(torch.zeros(1))
            self.optimizer = torch.optim.SGD([self._lr_carrier], lr=self.args.learning_rate)
        # fp16's loss scaler (GPU) would step the stand-in through a scaler that scaled no loss, which it refuses;
        # with no gradients there is nothing to scale, and fp16 keeps its autocast forwards
        self.accelerator.scaler = None
        return self.optimizer

    def _clip_grad_norm(self, model):
        """No gradients: nothing to clip, and no ``grad_norm`` to log."""
        return None

    def _get_grad_norm(self, model, grad_norm=None):
        return None

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return EpochPermutation(len(dataset), seed)

    # -- one step ------------------------------------------------------------------------------------

    def _engine(self, model) -> ZOEngine:
        if self.engine is None:
            wd = self.args.weight_decay
            self.engine = ZOEngine(model, eps=self.zo_eps, weight_decay=wd, seed=self.args.seed, blowup=self.zo_blowup,
                                   recover=self.zo_recover, max_rollbacks=self.zo_max_rollbacks, decays=decays,
                                   anchors=start_anchors(model) if wd else None, optimizer=self.zo_optimizer)
            if self._resume_from is not None:
                self.load_zo_state(self._resume_from)
        return self.engine

    def _whole_batch(self, inputs: dict) -> dict:
        """The global batch on every process (each holds its shard): tensors padded to one length, gathered."""
        if self.accelerator.num_processes == 1:
            return inputs
        tokenizer = getattr(self, "processing_class", None)
        first = getattr(tokenizer, "padding_side", "right") == "left"
        whole = {}
        for key, value in inputs.items():
            if torch.is_tensor(value) and value.dim() >= 2:
                pad = -100 if key == "labels" else 0
                value = self.accelerator.pad_across_processes(value, dim=1, pad_index=pad, pad_first=first)
            whole[key] = self.accelerator.gather(value) if torch.is_tensor(value) and value.dim() >= 1 else value
        return whole

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        net = self.accelerator.unwrap_model(model)
        engine = self._engine(net)
        batch = self._whole_batch(self._prepare_inputs(inputs))
        net.eval()  # dropout off during the perturbed forwards

        def loss_fn() -> float:
            with torch.no_grad(), self.compute_loss_context_manager():
                return float(self.compute_loss(net, batch))

        epoch = int(self.state.epoch or 0)
        record = engine.step(self.state.global_step, loss_fn, self.zo_queries(epoch), self._get_learning_rate())
        net.train()  # as a Trainer's step leaves it: logging reads the mode (TRL's logs eval metrics otherwise)
        self._stats.append((len(record.seeds), engine.last_forwards, float(sum(record.grads) / len(record.grads)),
                            record.rolled_back))
        return torch.tensor(record.loss, device=self.args.device)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._stats and "loss" in logs:
            queries, forwards, grads, rolled = zip(*self._stats)
            logs.update(zo_queries=sum(queries) / len(queries), zo_forwards=sum(forwards) / len(forwards),
                        zo_projected_grad=sum(grads) / len(grads), zo_rollbacks=sum(rolled))
            self._stats.clear()
        super().log(logs, *args, **kwargs)

    # -- exact resume ---------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint:
            folder = (get_last_checkpoint(self.args.output_dir) if resume_from_checkpoint is True
                      else resume_from_checkpoint)
            self._resume_from = Path(folder) if folder else None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def save_zo_state(self, folder: Path) -> None:
        """The engine's ``state_dict`` beside the Trainer's checkpoint (the Trainer saves the weights)."""
        checkpoint.write_object(folder / ZO_ENGINE, self.engine.state_dict())

    def load_zo_state(self, folder: Path) -> None:
        file = folder / ZO_ENGINE
        if not file.is_file():
            warnings.warn(f"{folder} holds no {ZO_ENGINE} (a checkpoint of another trainer, or of an older leanft): "
                          "the divergence guard restarts (lr scale 1, the weights as its rollback copy), so the "
                          "resumed run may differ from an uninterrupted one", stacklevel=2)
            return
        state = checkpoint.read_object(file, "the zeroth-order engine's state")
        written, mine = state.get("optimizer", {}).get("name", "sgd"), self.engine.optimizer.name
        if written != mine:
            raise ValueError(f"{folder} was written by a run with zo_optimizer={written!r}, and this trainer has "
                             f"{mine!r}: resume with zo_optimizer={written!r} (and its zo_optimizer_options)")
        self.engine.load_state_dict(state)


class _SFTMetrics:
    """For ``ZOSFTTrainer``: TRL's ``compute_loss`` records entropy, token accuracy and the tokens seen under the
    model's mode, and the zeroth-order forwards (two a query for most optimisers) run in eval mode. What they
    record becomes one training record a step, and the step's tokens are counted once, as TRL counts a first-order
    step's."""

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        held, self._metrics["eval"] = self._metrics["eval"], defaultdict(list)
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            forwards, self._metrics["eval"] = self._metrics["eval"], held
        train = self._metrics["train"]
        for key, values in forwards.items():
            if key != "num_tokens" and values:
                train[key].append(sum(values) / len(values))
        mask = inputs.get("attention_mask")
        local = mask.sum() if mask is not None else torch.tensor(inputs["input_ids"].numel())  # padding-free: all
        self._total_train_tokens += int(self.accelerator.gather_for_metrics(local.to(self.accelerator.device)).sum())
        train["num_tokens"] = [self._total_train_tokens]
        return loss


class ZOTrainer(ZOTrainingMixin, Trainer):
    """``transformers.Trainer`` trained by zeroth-order SPSA (MeZO; AdaZeta with ``zo_schedule="adazeta"``
    on a ``LorettaAdpConfig`` model): forward passes only, memory of inference."""


def __getattr__(name: str):
    """``ZOSFTTrainer`` needs TRL (``pip install leanft[trl]``): built on first use."""
    if name == "ZOSFTTrainer":
        try:
            from trl import SFTTrainer
        except ImportError as e:
            raise ImportError("leanft.ZOSFTTrainer needs TRL: pip install 'leanft[trl]'") from e
        cls = type("ZOSFTTrainer", (_SFTMetrics, ZOTrainingMixin, SFTTrainer), {
            "__doc__": "TRL's SFTTrainer trained by zeroth-order SPSA (see leanft.hf.ZOTrainingMixin).",
            "__module__": __name__})
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

