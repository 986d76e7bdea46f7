"""Instruction tasks from users' files: prompt and completion columns, or chat messages.

Each row becomes ``{"prompt": ..., "completion": ...}`` when the file is read, so that every problem
(a malformed conversation, a template that refuses it, an empty answer) is reported with the file,
the line and the column, as for users' classification files. The task is a generation task: training
scores the completion's tokens only (``collate.encode_candidates`` with the gold answer), evaluation
generates and compares with the completion (``metrics.score_instruction``) and reports the loss and
perplexity of the completion's tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

from .base import Splits, Task
from .builtin import _decoder_only
from .metrics import score_instruction
from .user import _check_columns, _read_table, _Table, file_task_name, split_rows


def _text(value, where: str, column: str, what: str) -> str:
    """A cell as text: JSON numbers and booleans as written, anything else but a string refused."""
    if isinstance(value, (int, float, bool)):
        value = json.dumps(value)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{where}, column {column!r}: expected text, got {type(value).__name__}")
    if value is None or value.strip() == "":
        raise ValueError(f"{where}, column {column!r}: empty {what}")
    return value


def _messages(value, where: str, column: str) -> list[dict]:
    """The conversation of a cell: a JSON list (a string in CSV/TSV) of role/content messages."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}, column {column!r}: not valid JSON: {e.msg} (character {e.pos + 1} of the "
                             "cell)") from None
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}, column {column!r}: expected a non-empty list of messages "
                         f'{{"role": ..., "content": ...}}, got {type(value).__name__}')
    for i, message in enumerate(value, start=1):
        if not isinstance(message, dict):
            raise ValueError(f"{where}, column {column!r}: message {i} is a {type(message).__name__}, not an object")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise ValueError(f"{where}, column {column!r}: message {i} has no text {key!r}")
    return value


def render_chat(tokenizer, messages: list[dict], where: str, column: str) -> tuple[str, str]:
    """The prompt (the messages before the last assistant one, in the chat template, with the generation
    prompt) and the completion (that message's content)."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ValueError(f"{where}, column {column!r}: no assistant message (the last one is the completion)")
    if last != len(messages) - 1:
        raise ValueError(f"{where}, column {column!r}: message {last + 2} ({messages[last + 1]['role']}) follows the "
                         "last assistant message; end each conversation with the assistant reply to learn")
    if last == 0:
        raise ValueError(f"{where}, column {column!r}: no message before the assistant's, so no prompt")
    completion = _text(messages[last]["content"], where, column, "completion (the last assistant message)")
    try:
        prompt = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001  (a template raises jinja2's errors or its own)
        raise ValueError(f"{where}, column {column!r}: the chat template refused these messages: {e}") from None
    bos = tokenizer.bos_token
    if bos and prompt.startswith(bos) and tokenizer.bos_token_id in tokenizer("").input_ids:
        prompt = prompt[len(bos):]  # the tokenizer adds BOS itself: the template's own would be a second one
    return prompt, completion


def _examples(table: _Table, prompt_column: str | None, completion_column: str | None,
              messages_column: str | None, tokenizer) -> list[dict]:
    """Every row of ``table`` as ``{"prompt", "completion"}``, checked."""
    _check_columns(table, [messages_column] if messages_column else [prompt_column, completion_column], [])
    examples = []
    for where, row in table.rows:
        if messages_column:
            messages = _messages(row[messages_column], where, messages_column)
            prompt, completion = render_chat(tokenizer, messages, where, messages_column)
        else:
            prompt = _text(row[prompt_column], where, prompt_column, "text")
            completion = _text(row[completion_column], where, completion_column, "completion")
            if not prompt[-1].isspace() and not completion[0].isspace():
                completion = " " + completion  # like label words: the answer is a new word after the prompt
        examples.append({"prompt": prompt, "completion": completion})
    return examples


def instruction_task(train_file: str | Path, eval_file: str | Path | None = None, *,
                     prompt_column: str | None = None, completion_column: str | None = None,
                     messages_column: str | None = None, tokenizer=None, num_train: int | None = None,
                     num_dev: int = 0, num_eval: int | None = None, seed: int = 0) -> tuple[Task, Splits]:
    """An instruction task from your own CSV, TSV or JSONL files.

    Either ``prompt_column`` and ``completion_column`` (the completion follows the prompt directly, after
    a space when neither has one), or ``messages_column``: a conversation rendered with ``tokenizer``'s
    chat template (needed then). Splits and the task's name follow ``user_task``: seeded samples of
    ``num_train``, ``num_dev`` and ``num_eval`` rows (None: every row), eval held out of the train file when
    there is no ``eval_file``.
    """
    if bool(prompt_column) != bool(completion_column) or bool(messages_column) == bool(prompt_column):
        raise ValueError("instruction data needs prompt_column and completion_column, or messages_column alone")
    if messages_column and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("messages_column needs a tokenizer with a chat template; this model's has none "
                         "(use prompt_column and completion_column instead)")
    columns = (prompt_column, completion_column, messages_column, tokenizer)
    train = _examples(_read_table(train_file), *columns)
    eval_rows = _examples(_read_table(eval_file), *columns) if eval_file is not None else None
    splits = split_rows(str(train_file), train, eval_rows, num_train, num_dev, num_eval, seed)
    name = file_task_name(train_file)
    task = Task(name, "generation", lambda ex: ex["prompt"], lambda ex: [ex["completion"]], lambda ex: 0,
                _decoder_only(name), 0, references=lambda ex: [ex["completion"]], metric="token_f1",
                scorer=score_instruction, first_line=False, answer_loss=True)
    return task, splits
