"""Tasks to fine-tune on: built-in benchmarks, users' own files, prompts, sampling and metrics.

The benchmark files ship in ``data/`` (provenance and licences in ``data/SOURCES.md``); point
``LEANFT_DATA`` or ``data_dir=`` at another folder with the same layout to use a different copy.
"""

from .base import Splits, Task
from .builtin import TASK_NAMES, get_task, load_splits
from .metrics import classification_metrics, score_generation
from .user import hub_task, user_task

__all__ = ["TASK_NAMES", "Splits", "Task", "classification_metrics", "get_task", "hub_task", "load_splits",
           "score_generation", "user_task"]
