"""The Task and Splits types, where data lives, and the seeded sampling every task shares."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# The default dev size (``--num-dev``): built-in tasks with small training splits and users' small files scale
# it down (``load_splits``, ``user.sample_sizes``).
DEFAULT_DEV = 500


@dataclass(frozen=True)
class Task:
    """How to turn an example into model inputs and a gold answer.

    A decoder LM scores ``prompt(ex) + candidates(ex)[i]`` for every i and predicts the best; an
    encoder classifier reads ``encoder_text(ex)``; both are checked against ``label(ex)``.
    """

    name: str
    kind: str  # "classification" | "multiple_choice" | "generation"
    prompt: Callable[[dict], str]
    candidates: Callable[[dict], list[str]]
    label: Callable[[dict], int]
    encoder_text: Callable[[dict], tuple[str, str | None]]
    num_labels: int
    references: Callable[[dict], list[str]] | None = None
    metric: str = "accuracy"
    # generation only: the metrics of the outputs (None: BLEU and ROUGE-L); whether outputs are one line
    # (E2E) or keep every line up to EOS (instruction answers); whether loss and perplexity on the gold
    # answer's tokens are reported as well
    scorer: Callable[[list[str], list[list[str]]], dict[str, float]] | None = None
    first_line: bool = True
    answer_loss: bool = False


@dataclass
class Splits:
    """Examples (JSON-serialisable dicts) for training, model selection and the final score."""

    train: list[dict]
    dev: list[dict]
    eval: list[dict]
    # rows they were sampled from: (training pool, eval pool), the eval pool None when eval was held out of
    # the training pool; None where no single pool applies (E2E)
    pool: tuple[int, int | None] | None = None
    # how the sizes were chosen when not as asked (a default scaled down to a small file), for rows_used
    note: str = ""


def rows_used(name: str, splits: Splits) -> str:
    """One line saying how many rows a task uses of how many, so a sample is never mistaken for the file."""
    train, dev, held = len(splits.train), len(splits.dev), len(splits.eval)
    note = f" ({splits.note})" if splits.note else ""
    if splits.pool is None:
        return f"{name}: {train:,} train, {dev:,} dev, {held:,} eval rows{note}"
    pool, eval_pool = splits.pool
    if eval_pool is None:
        return f"{name}: {train:,} train, {dev:,} dev and {held:,} eval rows of {pool:,}{note}"
    return f"{name}: {train:,} train and {dev:,} dev rows of {pool:,}; {held:,} eval rows of {eval_pool:,}{note}"


def data_root(data_dir: str | Path | None = None) -> Path:
    """The folder of benchmark files: ``data_dir``, else ``$LEANFT_DATA``, else the shipped copy."""
    if data_dir is not None:
        return Path(data_dir)
    if os.environ.get("LEANFT_DATA"):
        return Path(os.environ["LEANFT_DATA"])
    return Path(__file__).parent / "data"


def data_file(relative: str, data_dir: str | Path | None = None) -> Path:
    """A benchmark file, failing early with a hint on how to point at another data folder."""
    path = data_root(data_dir) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass data_dir=... or set LEANFT_DATA to a folder "
                                f"that holds {relative}")
    return path


def check_sizes(**sizes: int) -> None:
    """Negative sizes are always a caller bug; say which one."""
    for key, value in sizes.items():
        if value < 0:
            raise ValueError(f"{key} must be >= 0, got {value}")


def check_training_left(name: str, train: list, dev: list, pool: int, held_out: int | None = None) -> None:
    """A sample with no training row (a dev or held-out eval set that took the whole pool) is refused before
    the model loads, with the change that would leave one; ``held_out``: eval rows taken from the same pool."""
    if train:
        return
    held = "" if held_out is None else f" and {held_out} held-out eval"
    hint = "lower num_dev" if dev else "add rows, or give an eval file (eval_file) so that none are held out"
    raise ValueError(f"{name}: no training rows left of {pool:,} after {len(dev)} dev{held} rows; {hint}")


def split_train_dev(pool: list, num_train: int, num_dev: int, seed: int) -> tuple[list, list]:
    """Disjoint random train and dev samples of ``pool``.

    Dev gets first claim when the pool is too small for both (CB: 250 -> dev 100, train 150), so
    model selection never runs on a smaller set than asked for.
    """
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    n_dev = min(num_dev, len(pool))
    n_train = min(num_train, len(pool) - n_dev)
    return [pool[i] for i in order[:n_train]], [pool[i] for i in order[n_train:n_train + n_dev]]


def sample_indices(n: int, k: int, seed: int) -> list[int]:
    """A seeded sample of ``k`` of ``range(n)``, in file order (all of them when ``k >= n``)."""
    if k >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), k))
