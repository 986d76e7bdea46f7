"""Tasks to fine-tune on: built-in benchmarks, users' own files, prompts, sampling and metrics, and the
tasks a run's config names (``load_tasks``).

The benchmark files ship in ``data/`` (provenance and licences in ``data/SOURCES.md``); point
``LEANFT_DATA`` or ``data_dir=`` at another folder with the same layout to use a different copy.
"""

from .base import Splits, Task, rows_used
from .builtin import TASK_NAMES, get_task, load_splits
from .instruct import instruction_task, render_chat
from .metrics import classification_metrics, example_scores, score_generation, score_instruction
from .select import load_tasks
from .user import file_task_name, hub_task, is_data_file, user_task

__all__ = ["TASK_NAMES", "Splits", "Task", "classification_metrics", "example_scores", "file_task_name", "get_task",
           "hub_task", "instruction_task", "is_data_file", "load_splits", "load_tasks", "render_chat", "rows_used",
           "score_generation", "score_instruction", "user_task"]
