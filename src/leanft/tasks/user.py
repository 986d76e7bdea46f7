"""Classification tasks from users' own files (CSV, TSV, JSONL) or a Hugging Face dataset.

Every problem in the data is reported with the file, the line and the column, because a bad row
in a 50k-line file is otherwise hopeless to find.
"""

from __future__ import annotations

import csv
import json
import re
import string
from dataclasses import dataclass
from pathlib import Path

from .base import DEFAULT_DEV, Splits, Task, check_sizes, check_training_left, sample_indices, split_train_dev

_EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json-lines": "jsonl"}
_MAX_HELD_OUT_EVAL = 1000
# Stems that name a split, not a task: such a file takes its folder's name ("mrpc/train.tsv" -> "mrpc").
_SPLIT_WORDS = "train|training|dev|devel|val|valid|validation|eval|evaluation|test|data"


@dataclass
class _Table:
    """Rows of one source, each with its location ("train.csv line 7") for error messages."""

    name: str
    header: list[str] | None  # CSV/TSV column names; None for JSONL, where each row has its own keys
    rows: list[tuple[str, dict]]


def is_data_file(name: str | Path) -> bool:
    """Whether ``name`` is a users' data file by its extension (a ``--task`` entry can be one)."""
    return Path(name).suffix.lower() in _EXTENSIONS


def file_task_name(path: str | Path) -> str:
    """A users' file's task name: its stem without a split word ("mrpc_train" -> "mrpc"), or, for a stem that
    is only one ("train"), its folder's name, so that metrics and reports are not all headed "train"."""
    path = Path(path)
    stem = re.sub(rf"^(?:{_SPLIT_WORDS})[-_. ]+|[-_. ]+(?:{_SPLIT_WORDS})$", "", path.stem, flags=re.IGNORECASE)
    if re.fullmatch(_SPLIT_WORDS, stem, flags=re.IGNORECASE):
        return path.resolve().parent.name or stem
    return stem


def _read_table(path: str | Path) -> _Table:
    path = Path(path)
    kind = _EXTENSIONS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: unknown file type {path.suffix!r}; use one of {', '.join(_EXTENSIONS)}")
    table = _read_jsonl(path) if kind == "jsonl" else _read_delimited(path, kind)
    if not table.rows:
        raise ValueError(f"{path}: empty file (no examples)")
    return table


def _read_delimited(path: Path, kind: str) -> _Table:
    """CSV with standard quoting; TSV as one row per line split on tabs (no quoting, as in GLUE)."""
    options = {"delimiter": ","} if kind == "csv" else {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, **options)
        header = next(reader, None)
        if not header:
            raise ValueError(f"{path}: empty file (expected a header line with column names)")
        rows = []
        end = reader.line_num
        for fields in reader:
            line, end = end + 1, reader.line_num
            if not fields:
                continue  # blank line
            if len(fields) < len(header):
                raise ValueError(f"{path} line {line}, column {header[len(fields)]!r}: missing; the row has "
                                 f"{len(fields)} fields but the header has {len(header)}")
            if len(fields) > len(header):
                raise ValueError(f"{path} line {line}: {len(fields)} fields but the header has {len(header)}")
            rows.append((f"{path} line {line}", dict(zip(header, fields))))
    return _Table(str(path), header, rows)


def _read_jsonl(path: Path) -> _Table:
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text.rstrip())  # the line alone: an error at its end is not "line 2, column 1"
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {line}, column {e.colno}: not valid JSON: {e.msg}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path} line {line}: expected a JSON object, got {type(row).__name__}")
            rows.append((f"{path} line {line}", row))
    return _Table(str(path), None, rows)


def _template_columns(template: str) -> list[str]:
    """Column names a format string refers to ("{review} ..." -> ["review"])."""
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as e:
        raise ValueError(f"template {template!r} is not a valid format string: {e}") from None
    names = [re.split(r"[.\[]", field)[0] for field in fields]
    if any(name == "" or name.isdigit() for name in names):
        raise ValueError(f"template {template!r}: name every field after a column, e.g. {{text}}")
    return names


def _check_columns(table: _Table, columns: list[str], template_columns: list[str]) -> None:
    """Every row must have every needed column; CSV/TSV know this from the header alone."""
    for column in dict.fromkeys(columns):
        why = " (used by the template)" if column in template_columns else ""
        if table.header is not None and column not in table.header:
            raise ValueError(f"{table.name} line 1 (header): no column {column!r}{why}; "
                             f"columns are {table.header}")
        if table.header is None:
            for where, row in table.rows:
                if column not in row:
                    raise ValueError(f"{where}: no column {column!r}{why}; columns are {list(row)}")


def _label_text(value) -> str:
    """Labels compare as strings, so JSON's 1 and CSV's "1" are the same label."""
    return value if isinstance(value, str) else json.dumps(value)


def _labels_of(table: _Table, text_columns: list[str], label_column: str) -> list[str]:
    """Check every row's texts and label; return the label of each row."""
    labels = []
    for where, row in table.rows:
        for column in text_columns:
            if row[column] is None or str(row[column]).strip() == "":
                raise ValueError(f"{where}, column {column!r}: empty text")
        if row[label_column] is None or _label_text(row[label_column]).strip() == "":
            raise ValueError(f"{where}, column {label_column!r}: empty label")
        labels.append(_label_text(row[label_column]))
    return labels


def _label_count_error(table: _Table, label_column: str, row_labels: list[str], label_words: list[str],
                       labels: list[str]) -> ValueError:
    """Too many labels usually means a stray one: name the row where, in file order, the first label beyond
    the words' count appears."""
    seen: set[str] = set()
    where = ""
    for (row_where, _), label in zip(table.rows, row_labels):
        seen.add(label)
        if len(seen) > len(label_words):
            where = f"{row_where}, column {label_column!r}: label {label!r} first appears here, one label too many; "
            break
    return ValueError(f"{where}label_words has {len(label_words)} words but {table.name} has {len(labels)} "
                      f"labels: {labels} (give one word per label, in that order)")


def _label_order(labels: list[str]) -> list[str]:
    """Sorted distinct labels; numerically when all are integers, so "10" comes after "2"."""
    distinct = set(labels)
    if all(re.fullmatch(r"-?\d+", label) for label in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def _build(name: str, train: _Table, eval_: _Table | None, *, text_columns: list[str], label_column: str,
           template: str | None, label_words: list[str] | None, num_train: int | None, num_dev: int,
           num_eval: int | None, seed: int) -> tuple[Task, Splits]:
    """The task and splits shared by ``user_task`` and ``hub_task``."""
    if len(text_columns) not in (1, 2):
        raise ValueError(f"text_columns must name 1 or 2 columns (text_a[, text_b]), got {text_columns}")
    template_columns = _template_columns(template) if template else []
    for table in (train, eval_) if eval_ is not None else (train,):
        _check_columns(table, [*text_columns, *template_columns, label_column], template_columns)
    row_labels = _labels_of(train, text_columns, label_column)
    labels = _label_order(row_labels)
    index = {label: i for i, label in enumerate(labels)}
    if label_words is None:
        label_words = [" " + label for label in labels]
    elif len(label_words) != len(labels):
        raise _label_count_error(train, label_column, row_labels, label_words, labels)
    if eval_ is not None:
        for (where, _), label in zip(eval_.rows, _labels_of(eval_, text_columns, label_column)):
            if label not in index:
                raise ValueError(f"{where}, column {label_column!r}: unknown label {label!r}; "
                                 f"known labels: {labels}")

    def prompt(ex: dict) -> str:
        if template is None:
            return "\n".join(str(ex[c]) for c in text_columns) + "\nAnswer:"
        return template.format(**ex)

    def encoder_text(ex: dict) -> tuple[str, str | None]:
        return str(ex[text_columns[0]]), str(ex[text_columns[1]]) if len(text_columns) == 2 else None

    words = list(label_words)
    task = Task(name, "classification", prompt, lambda ex: list(words),
                lambda ex: index[_label_text(ex[label_column])], encoder_text, len(labels))
    eval_rows = None if eval_ is None else [row for _, row in eval_.rows]
    return task, split_rows(train.name, [row for _, row in train.rows], eval_rows, num_train, num_dev, num_eval, seed)


def split_rows(name: str, rows: list[dict], eval_rows: list[dict] | None, num_train: int | None, num_dev: int,
               num_eval: int | None, seed: int) -> Splits:
    """Seeded train/dev/eval samples of the sizes ``sample_sizes`` gives, drawn as ``load_splits`` draws a
    built-in task's (``split_train_dev``, ``sample_indices``); without eval rows, eval is held out of ``rows``
    first. A file too small to leave a training row is refused with the change that would leave one."""
    pool = (len(rows), None if eval_rows is None else len(eval_rows))
    num_train, num_dev, num_eval, note = sample_sizes(*pool, num_train, num_dev, num_eval)
    check_sizes(num_train=num_train, num_dev=num_dev, num_eval=num_eval)
    if eval_rows is None:
        held = set(sample_indices(len(rows), num_eval, seed))
        eval_rows = [rows[i] for i in sorted(held)]
        rows = [row for i, row in enumerate(rows) if i not in held]
    else:
        eval_rows = [eval_rows[i] for i in sample_indices(len(eval_rows), num_eval, seed)]
    train_rows, dev_rows = split_train_dev(rows, num_train, num_dev, seed)
    if num_train:
        check_training_left(name, train_rows, dev_rows, pool[0], len(eval_rows) if pool[1] is None else None)
    return Splits(train_rows, dev_rows, eval_rows, pool, note)


def _held_out(n: int) -> int:
    """Size of the eval set carved out of the training data when there is no eval data: 20%, <= 1000."""
    return min(_MAX_HELD_OUT_EVAL, max(1, n // 5))


def _scaled_dev(n: int) -> int:
    """The default dev size for a training pool of ``n`` rows: 20%, at most ``DEFAULT_DEV``, and at least 1
    while a row is left to train on."""
    return min(DEFAULT_DEV, max(1, n // 5)) if n > 1 else 0


def sample_sizes(n_train: int, n_eval: int | None, num_train: int | None, num_dev: int,
                 num_eval: int | None) -> tuple[int, int, int, str]:
    """``num_train``, ``num_dev``, ``num_eval`` for files of ``n_train`` and ``n_eval`` rows (None: no eval file),
    and a note when a default was scaled to the file. A None size takes every row; without an eval file, eval
    is held out of the training rows: ``num_eval`` of them but at most ``_held_out``, so that most rows stay for
    training. ``num_dev`` left at ``DEFAULT_DEV`` is scaled to the rows left for training (``_scaled_dev``), as
    ``load_splits`` lowers it for the small built-in tasks, so a 64-row file is not all dev."""
    if n_eval is None:
        held = _held_out(n_train)
        num_eval = held if num_eval is None else min(num_eval, held)
    elif num_eval is None:
        num_eval = n_eval
    note = ""
    if num_dev == DEFAULT_DEV:
        pool = n_train - (num_eval if n_eval is None else 0)
        num_dev = _scaled_dev(pool)
        if num_dev < DEFAULT_DEV:
            note = f"the default num_dev {DEFAULT_DEV} scaled to the file: {num_dev} of its {pool:,} training rows"
    return (n_train if num_train is None else num_train), num_dev, num_eval, note


def user_task(train_file: str | Path, eval_file: str | Path | None = None, *, text_columns: list[str],
              label_column: str, template: str | None = None, label_words: list[str] | None = None,
              num_train: int | None = None, num_dev: int = 0, num_eval: int | None = None,
              seed: int = 0) -> tuple[Task, Splits]:
    """A classification task from your own CSV, TSV or JSONL files.

    ``text_columns`` name text_a (and optionally text_b) for encoder models; ``template`` is a
    format string over column names for decoder LMs (default: the text columns, one per line, then
    "Answer:"). Label ids are the train file's distinct label values sorted (numerically when all
    are integers); ``label_words`` are the decoder's words for them in that order (default: each
    label with a leading space). ``num_train``, ``num_dev`` and ``num_eval`` are seeded samples as for a
    built-in task (None: every row); without ``eval_file``, eval is held out of the train file: at most 20%
    of it, 1000 rows (``sample_sizes``). The task is named by ``file_task_name``.
    """
    train = _read_table(train_file)
    eval_ = _read_table(eval_file) if eval_file is not None else None
    return _build(file_task_name(train_file), train, eval_, text_columns=list(text_columns),
                  label_column=label_column, template=template, label_words=label_words, num_train=num_train,
                  num_dev=num_dev, num_eval=num_eval, seed=seed)


def hub_task(dataset: str, *, config: str | None = None, text_columns: list[str], label_column: str,
             template: str | None = None, label_words: list[str] | None = None, train_split: str = "train",
             eval_split: str | None = "validation", num_train: int = 1000, num_dev: int = 0,
             num_eval: int = 1000, seed: int = 0) -> tuple[Task, Splits]:
    """A classification task from a Hugging Face dataset, with the same rules as ``user_task``.

    Needs the optional ``datasets`` package and network access (or its cache). Integer class labels
    are turned into their names, which then serve as the default label words.
    """
    try:
        import datasets
    except ImportError:
        raise ImportError("hub_task needs the `datasets` package: pip install datasets "
                          "(or pip install 'leanft[hub]')") from None
    loaded = datasets.load_dataset(dataset, config)

    def table(split: str) -> _Table:
        feature = loaded[split].features.get(label_column)
        rows = []
        for i, row in enumerate(loaded[split], start=1):
            row = dict(row)
            if hasattr(feature, "int2str") and label_column in row and row[label_column] >= 0:
                row[label_column] = feature.int2str(row[label_column])
            rows.append((f"{dataset}/{split} row {i}", row))
        return _Table(f"{dataset}/{split}", list(loaded[split].column_names), rows)

    train = table(train_split)
    eval_ = table(eval_split) if eval_split in loaded else None
    return _build(dataset.split("/")[-1], train, eval_, text_columns=list(text_columns), label_column=label_column,
                  template=template, label_words=label_words, num_train=num_train, num_dev=num_dev,
                  num_eval=num_eval, seed=seed)
