"""``TrainConfig``: everything a run needs, and the one place each ``leanft train`` option is described.

Each field is a ``--flag`` (``batch_size`` -> ``--batch-size``) and a ``--config run.yaml`` key. Its declaration
holds the type, the default, the ``help`` text and any ``choices``; ``cli.add_train_flags`` builds the flags from
them and ``__post_init__`` checks the values (from flags, YAML and Python alike). The method options (rank,
tt_rank, ...) are the exception: one ``method_options`` field, whose flags are ``cli.METHOD_FLAGS``."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from .methods import METHODS, ZO_METHODS, resolve_method
from .precision import DTYPES
from .tasks import is_data_file
from .zo.noise import DIRECTIONS
from .zo.optimizers import OPTIMIZERS, make_optimizer

# Fields that must be positive (> 0) and those that must not be negative.
POSITIVE = ("num_train", "num_eval", "epochs", "batch_size", "grad_accum", "eval_every", "max_length",
            "max_new_tokens", "eval_batch_size", "zo_eps", "zo_queries", "zo_q_max", "zo_recover")
NON_NEGATIVE = ("num_dev", "max_steps", "max_forwards", "lr", "weight_decay", "max_grad_norm", "warmup_ratio",
                "patience", "zo_blowup", "zo_alpha", "zo_beta", "zo_max_rollbacks")
SAVE_UNITS = {"s": 1, "m": 60, "h": 3600}


def save_cadence(value: str) -> tuple[int, float]:
    """``--save-every``: ``"N"`` steps or ``"Ns"``/``"Nm"``/``"Nh"`` of training time -> (steps, seconds),
    the unused one 0; ``"0"`` saves only with evaluations and at the end."""
    text = str(value).strip().lower()
    unit = text[-1:] if text[-1:] in SAVE_UNITS else ""
    try:
        number = float(text[: len(text) - len(unit)]) if unit else int(text)
    except ValueError:
        number = -1
    if number < 0:
        raise ValueError(f"save_every {value!r} is not a step count (e.g. 20) or a time (e.g. 90s, 2m, 1h)")
    return (0, number * SAVE_UNITS[unit]) if unit else (int(number), 0.0)

# Default learning rates per method, for decoder LMs and for encoders (whose fresh classification head
# needs more); how they were picked is in BENCHMARKS.md.
DEFAULT_LR = {
    "causal": {"full": 1e-5, "lora": 5e-4, "loretta-rep": 1e-3, "loretta-adp": 1e-3, "lamda": 5e-4,
               "lamda++": 5e-4, "mezo": 1e-6, "mezo-lora": 1e-4, "adazeta": 1e-4},
    "encoder": {"full": 1e-4, "lora": 2e-3, "loretta-rep": 5e-3, "loretta-adp": 5e-3, "lamda": 1e-2,
                "lamda++": 1e-2, "mezo": 1e-6, "mezo-lora": 1e-4, "adazeta": 1e-4},
}


ZO_OPTION_FIELDS = ("zo_directions", "zo_momentum", "zo_adam_betas", "zo_rank", "zo_interval", "zo_sparsity",
                    "zo_hessian_smoothing")


@dataclass
class TrainConfig:
    """Everything a run needs. Each field is one ``leanft train`` flag (``batch_size`` -> ``--batch-size``) and one
    ``--config`` YAML key: its type, default, ``help`` and any ``choices`` are declared here and nowhere else."""

    model: str = field(default="smollm2-135m", metadata={
        "help": "model name (smollm2-135m, minilm-l6), local folder, hub id or .gguf file (converted once, cached)"})
    method: str = field(default="loretta-rep", metadata={"help": f"fine-tuning method: {', '.join(METHODS)}"})
    task: str = field(default="sst2", metadata={
        "help": "built-in task(s), comma-separated for a mixture: sst2, rte, cb, boolq, copa, wsc, multirc, e2e; an "
                "entry ending in .jsonl/.csv/.tsv is your own file, read with the column flags (e.g. sst2,notes.jsonl)"})
    sequential: bool = field(default=False, metadata={
        "help": "train the comma-separated tasks one after another and report forgetting"})
    num_train: int = field(default=1000, metadata={
        "help": "training examples sampled per task (built-in or your files alike; the run prints how many of how "
                "many)"})
    num_dev: int = field(default=500, metadata={  # the protocol: 100 for CB and COPA, fewer where a split is smaller
        "help": "dev examples (model selection), sampled from the training rows (left at 500, a users' file gets "
                "20% of its training rows, at least 1)"})
    num_eval: int = field(default=1000, metadata={
        "help": "evaluation examples, sampled from the labelled validation split or --eval-file (without one, held "
                "out of your training file: at most 20%)"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the training sample"})
    max_steps: int = field(default=0, metadata={"help": "optimiser steps; overrides --epochs when > 0"})
    max_forwards: int = field(default=0, metadata={
        "help": "zeroth-order budget in forward passes (2 per query); stops the run when reached"})
    batch_size: int = field(default=8, metadata={"help": "examples per process and micro-step"})
    grad_accum: int = field(default=1, metadata={"help": "micro-steps per optimiser step"})
    lr: float = field(default=0.0, metadata={"help": "peak learning rate (0 = the method's default)"})  # DEFAULT_LR
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (not on biases/norms)"})
    max_grad_norm: float = field(default=1.0, metadata={
        "help": "AdamW: clip the gradient's total norm at this value, as the HF Trainer does (0 = no clipping; "
                "zeroth-order runs have no gradient to clip)"})
    scheduler: str = field(default="linear", metadata={
        "help": "linear, cosine, constant, constant_with_warmup, ...",
        "choices": ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                    "inverse_sqrt")})
    warmup_ratio: float = field(default=0.0, metadata={"help": "fraction of steps warming up"})
    eval_every: int = field(default=50, metadata={"help": "evaluate on dev every N steps (and keep the best adapter)"})
    save_every: str = field(default="2m", metadata={
        "help": "checkpoint every N steps (20) or N s/m/h of training (90s, 2m, 1h), besides evaluations; 0 = only "
                "with evaluations"})
    patience: int = field(default=0, metadata={"help": "stop after N evaluations without dev improvement (0 = never)"})
    eval_before: bool = field(default=True, metadata={"help": "evaluate before training too"})
    max_length: int = field(default=256, metadata={"help": "maximum tokens of prompt + answer"})
    max_new_tokens: int = field(default=64, metadata={"help": "generation length when evaluating generation tasks"})
    eval_batch_size: int = field(default=16, metadata={"help": "examples per evaluation batch"})
    seed: int = field(default=0, metadata={"help": "seed of sampling, data order and init"})
    output_dir: str = field(default="runs/latest", metadata={"help": "where metrics, checkpoints and the best adapter go"})
    resume: bool = field(default=False, metadata={"help": "continue from output_dir's checkpoint"})
    overwrite: bool = field(default=False, metadata={  # without it, a fresh run over another run's files is refused
        "help": "start afresh in an output_dir that holds another run, deleting that run's files first"})
    dtype: str = field(default="float32", metadata={
        "help": "base weights dtype: float32, bfloat16 or float16; every trainable parameter stays float32 and the "
                "forward runs under autocast (float16 scales the loss); full-model MeZO keeps low-precision weights "
                "and rounds stochastically",
        "choices": tuple(DTYPES)})
    optimizer: str = field(default="adamw", metadata={
        "help": "adamw, or zo for zeroth-order SPSA (implied by mezo, mezo-lora, adazeta)", "choices": ("adamw", "zo")})
    zo_eps: float = field(default=1e-3, metadata={"help": "ZO perturbation size"})
    zo_queries: int = field(default=1, metadata={"help": "ZO queries per step (fixed schedule)"})
    zo_schedule: str = field(default="auto", metadata={
        "help": "fixed, adazeta (Q = min(max(floor(alpha e^beta), 1), q_max) per epoch e), or auto",
        "choices": ("auto", "fixed", "adazeta")})  # auto: adazeta for the adazeta method
    zo_alpha: float = field(default=0.85, metadata={"help": "AdaZeta schedule alpha"})
    zo_beta: float = field(default=0.45, metadata={"help": "AdaZeta schedule beta"})
    zo_q_max: int = field(default=20, metadata={"help": "AdaZeta query cap"})
    zo_blowup: float = field(default=0.0, metadata={
        "help": "ZO: > 0 also rolls back a loss above this multiple of its running mean (non-finite always does)"})
    zo_recover: int = field(default=10, metadata={
        "help": "ZO: good steps after a rollback before the halved lr doubles back"})
    zo_max_rollbacks: int = field(default=5, metadata={
        "help": "ZO: rollbacks in a row before the run stops; 0 turns the guard off (the first non-finite step "
                "stops the run, so divergence shows in the log instead of being rolled back)"})
    zo_optimizer: str = field(default="sgd", metadata={
        "help": "ZO optimiser: sgd (MeZO), momentum, adam, sign, fzoo (one-sided, normalised by the queries' loss "
                "spread; needs --zo-queries >= 2), hizoo (diagonal Hessian), lozo (low-rank directions), sparse "
                "(perturbs the smallest weights); see leanft.zo.optimizers", "choices": tuple(OPTIMIZERS)})
    zo_directions: str | None = field(default=None, metadata={
        "help": "ZO directions: gaussian or rademacher (default: rademacher for fzoo, gaussian otherwise)",
        "choices": (None, *DIRECTIONS)})
    zo_momentum: float | None = field(default=None, metadata={
        "help": "momentum (default 0.9) and lozo (LOZO-M when > 0; default 0): the moment's decay", "type": float})
    zo_adam_betas: list[float] | None = field(default=None, metadata={
        "help": "adam: the moments' decays, comma-separated (default 0.9,0.999)"})
    zo_rank: int | None = field(default=None, metadata={"help": "lozo: rank of each matrix's direction (default 2)",
                                                        "type": int})
    zo_interval: int | None = field(default=None, metadata={
        "help": "lozo: steps between new subspaces (V resampled; default 50)", "type": int})
    zo_sparsity: float | None = field(default=None, metadata={
        "help": "sparse: fraction of each tensor's largest-magnitude weights left unperturbed (default 0.75)",
        "type": float})
    zo_hessian_smoothing: float | None = field(default=None, metadata={
        "help": "hizoo: the Hessian estimate's running-average weight (default 1e-3)", "type": float})
    # rank, tt_rank, bottleneck, ...: YAML key method_options, or the method option flags (cli.METHOD_FLAGS)
    method_options: dict[str, Any] = field(default_factory=dict)
    # users' own data instead of built-in tasks
    train_file: str | None = field(default=None, metadata={"help": "your own CSV/TSV/JSONL training file"})
    eval_file: str | None = field(default=None, metadata={"help": "your own evaluation file"})
    text_columns: list[str] | None = field(default=None, metadata={
        "help": "comma-separated text column(s) of your files"})
    label_column: str | None = field(default=None, metadata={"help": "label column of your files"})
    template: str | None = field(default=None, metadata={
        "help": "prompt template over your columns, e.g. '{review} It was'"})
    label_words: list[str] | None = field(default=None, metadata={
        "help": "comma-separated answer words, one per label (sorted label order)"})
    dataset: str | None = field(default=None, metadata={
        "help": "a hub dataset name (needs network and `pip install datasets`)"})
    dataset_config: str | None = field(default=None, metadata={"help": "its config name"})
    task_name: str | None = field(default=None, metadata={  # the default: tasks.file_task_name
        "help": "name of your file's task in metrics and reports (default: the file's stem without a split word, "
                "or its folder's name for train.tsv and the like)"})
    # instruction data in users' files, instead of text_columns and label_column
    prompt_column: str | None = field(default=None, metadata={
        "help": "instruction data: the prompt column of your files (with --completion-column; loss on the "
                "completion only, scored by generation: token F1, exact match, ROUGE-L, loss, perplexity)"})
    completion_column: str | None = field(default=None, metadata={
        "help": "instruction data: the completion column (the answer to learn after the prompt)"})
    messages_column: str | None = field(default=None, metadata={
        "help": "chat data: a column of [{role, content}, ...] messages rendered with the tokenizer's chat "
                "template; the last assistant message is the completion, the messages before it the prompt"})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown configuration key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    def __post_init__(self) -> None:
        self._check_types()
        for f in fields(self):
            valid = f.metadata.get("choices")
            if valid and getattr(self, f.name) not in valid:
                raise ValueError(f"{f.name} {getattr(self, f.name)!r} is not one of: "
                                 f"{', '.join(str(v) for v in valid if v is not None)}")
        for name in POSITIVE:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in NON_NEGATIVE:
            if not getattr(self, name) >= 0:  # NaN too
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)!r}")
        save_cadence(self.save_every)
        if self.warmup_ratio > 1:
            raise ValueError(f"warmup_ratio is a fraction of the steps, at most 1; got {self.warmup_ratio}")
        if self.resume and self.overwrite:
            raise ValueError("resume continues the run in output_dir and overwrite deletes it: give one, not both "
                             "(--no-overwrite clears an overwrite: true of a --config file)")
        if self.eval_file and not self.train_file:
            raise ValueError("eval_file needs train_file (the task whose evaluation it holds); without train_file "
                             "the run would train and evaluate the built-in task instead")
        self._check_instruction_columns()
        self._check_task_name()
        self._check_optimizer_flags()

    def _check_types(self) -> None:
        """A value of the wrong type (``batch_size: two`` in a YAML file) named with its field."""
        for f in fields(self):
            value, default = getattr(self, f.name), f.default
            if isinstance(default, bool):
                ok = isinstance(value, bool)
            elif isinstance(default, (int, float)):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
                    isinstance(default, float) or float(value).is_integer())
            elif isinstance(default, str):
                ok = isinstance(value, (str, int)) if f.name == "save_every" else isinstance(value, str)
            else:
                continue
            if not ok:
                raise ValueError(f"{f.name}: expected {type(default).__name__} like {default!r}, got {value!r}")

    def _check_optimizer_flags(self) -> None:
        """Zeroth-order settings on a first-order run would be ignored: refused instead."""
        try:
            zo = self.zeroth_order
        except ValueError:
            return  # an unknown method is reported where it is resolved, with the closest name
        set_zo = [k for k, given in (("max_forwards", self.max_forwards > 0),
                                     ("zo_schedule", self.zo_schedule != "auto"),
                                     ("zo_max_rollbacks",
                                      self.zo_max_rollbacks != TrainConfig.zo_max_rollbacks)) if given]
        set_zo += [f.name for f in fields(self) if f.name in ZO_OPTION_FIELDS and getattr(self, f.name) is not None]
        set_zo += ["zo_optimizer"] if self.zo_optimizer != "sgd" else []
        if set_zo and not zo:
            raise ValueError(f"{', '.join(set_zo)} apply to zeroth-order training; method {self.method!r} trains with "
                             "AdamW (use --optimizer zo, or a zeroth-order method: mezo, mezo-lora, adazeta)")
        if zo:
            optimizer = make_optimizer(self.zo_optimizer, **self.zo_options())  # an option it does not take
            adazeta = self.zo_schedule == "adazeta" or (self.zo_schedule == "auto" and self.method == "adazeta")
            if optimizer.min_queries > 1 and (adazeta or self.zo_queries < optimizer.min_queries):
                raise ValueError(f"zo_optimizer {self.zo_optimizer} needs at least {optimizer.min_queries} queries a "
                                 f"step (it normalises by their spread); "
                                 + ("AdaZeta's schedule starts at 1: use --zo-schedule fixed and " if adazeta else "")
                                 + f"--zo-queries {optimizer.min_queries} or more")
        if zo and self.max_grad_norm != TrainConfig.max_grad_norm:
            raise ValueError("max_grad_norm applies to first-order (AdamW) training; a zeroth-order run has no "
                             "gradient to clip (drop it: its guard against divergence is zo_blowup and "
                             "zo_max_rollbacks)")

    def _check_task_name(self) -> None:
        """``task_name`` names the one users' task of a run (a file, or a hub dataset)."""
        if self.task_name is None:
            return
        if not self.task_name.strip() or "," in self.task_name:
            raise ValueError(f"task_name {self.task_name!r} must be a non-empty name without commas")
        files = 1 if self.train_file or self.dataset else sum(map(is_data_file, self.task.split(",")))
        if files != 1:
            raise ValueError(f"task_name names a run's one users' task (--train-file, --dataset, or one file in "
                             f"--task); --task {self.task!r} has {files} files")

    def _check_instruction_columns(self) -> None:
        """Instruction files take either prompt and completion columns or a messages column, and none
        of the classification settings."""
        if self.messages_column and (self.prompt_column or self.completion_column):
            raise ValueError("give messages_column, or prompt_column and completion_column, not both")
        if bool(self.prompt_column) != bool(self.completion_column):
            raise ValueError("prompt_column and completion_column go together")
        if not self.instruction:
            return
        clash = [k for k in ("text_columns", "label_column", "template", "label_words", "dataset") if getattr(self, k)]
        if clash:
            raise ValueError(f"{', '.join(clash)} do not apply to instruction data (prompt_column/completion_column "
                             "or messages_column), which reads --train-file or files in --task")

    @property
    def instruction(self) -> bool:
        return bool(self.messages_column or self.prompt_column)

    def zo_options(self) -> dict[str, Any]:
        """The zeroth-order optimiser's options as ``leanft.zo.make_optimizer`` takes them (None: its default)."""
        betas = None if self.zo_adam_betas is None else tuple(float(b) for b in self.zo_adam_betas)
        return {"directions": self.zo_directions, "momentum": self.zo_momentum, "betas": betas, "rank": self.zo_rank,
                "interval": self.zo_interval, "sparsity": self.zo_sparsity,
                "hessian_smoothing": self.zo_hessian_smoothing}

    @property
    def zeroth_order(self) -> bool:
        return self.optimizer == "zo" or resolve_method(self.method) in ZO_METHODS
