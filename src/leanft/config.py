"""``TrainConfig``: everything a run needs. ``leanft train`` flags and ``--config run.yaml`` keys map onto it."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from .methods import ZO_METHODS

# Default learning rates per method, for decoder LMs and for encoders (whose fresh classification head
# needs more); how they were picked is in BENCHMARKS.md.
DEFAULT_LR = {
    "causal": {"full": 1e-5, "lora": 5e-4, "loretta-rep": 1e-3, "loretta-adp": 1e-3, "lamda": 5e-4,
               "lamda++": 5e-4, "mezo": 1e-6, "mezo-lora": 1e-4, "adazeta": 1e-4},
    "encoder": {"full": 1e-4, "lora": 2e-3, "loretta-rep": 5e-3, "loretta-adp": 5e-3, "lamda": 1e-2,
                "lamda++": 1e-2, "mezo": 1e-6, "mezo-lora": 1e-4, "adazeta": 1e-4},
}


@dataclass
class TrainConfig:
    """Everything a run needs; ``leanft train --help`` explains each field."""

    model: str = "smollm2-135m"
    method: str = "loretta-rep"
    task: str = "sst2"  # comma-separated: one adapter on the mixture (or in stages with sequential)
    sequential: bool = False
    num_train: int = 1000
    num_dev: int = 500  # the protocol: 100 for CB and COPA, fewer where a split is smaller
    num_eval: int = 1000
    epochs: float = 1.0
    max_steps: int = 0  # > 0 overrides epochs
    max_forwards: int = 0  # zeroth-order budget: stop after this many forward passes (> 0)
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 0.0  # 0 = DEFAULT_LR of the method
    weight_decay: float = 0.0
    scheduler: str = "linear"
    warmup_ratio: float = 0.0
    eval_every: int = 50
    patience: int = 0  # evaluations without dev improvement before stopping; 0 = never stop early
    eval_before: bool = True
    max_length: int = 256
    max_new_tokens: int = 64
    eval_batch_size: int = 16
    seed: int = 0
    output_dir: str = "runs/latest"
    resume: bool = False
    dtype: str = "float32"
    optimizer: str = "adamw"  # "adamw" or "zo" (implied by the methods mezo, mezo-lora, adazeta)
    zo_eps: float = 1e-3
    zo_queries: int = 1  # queries per step with a fixed schedule
    zo_schedule: str = "auto"  # "fixed", "adazeta", or "auto" (adazeta for the adazeta method)
    zo_alpha: float = 0.85
    zo_beta: float = 0.45
    zo_q_max: int = 20
    zo_blowup: float = 10.0  # roll back when the loss exceeds this multiple of its running mean
    method_options: dict[str, Any] = field(default_factory=dict)  # rank, tt_rank, bottleneck, ...
    # users' own data instead of built-in tasks
    train_file: str | None = None
    eval_file: str | None = None
    text_columns: list[str] | None = None
    label_column: str | None = None
    template: str | None = None
    label_words: list[str] | None = None
    dataset: str | None = None  # a hub dataset name (needs network and the datasets package)
    dataset_config: str | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown configuration key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    @property
    def zeroth_order(self) -> bool:
        return self.optimizer == "zo" or self.method in ZO_METHODS
