"""The built-in benchmarks: prompt templates (MeZO-style) and how each one's files become splits."""

from __future__ import annotations

import csv
import difflib
import functools
import json
from pathlib import Path

from .base import (
    DEFAULT_DEV,
    Splits,
    Task,
    check_sizes,
    check_training_left,
    data_file,
    sample_indices,
    split_train_dev,
)

TASK_NAMES: tuple[str, ...] = ("sst2", "rte", "cb", "boolq", "copa", "wsc", "multirc", "e2e")

# Training pools too small for 1000 + 500 (CB 250, COPA 400, WSC 554 examples; E2E 547 MRs, and its
# dev counts MRs): the default dev size drops to 100, as MeZO does for CB and COPA (for WSC a dev of
# 500 would leave 54 examples to train on).
_SMALL_DEV_TASKS = ("cb", "copa", "wsc", "e2e")
_SMALL_DEV = 100


# ---- prompts, verbalizers, labels and encoder inputs -------------------------------------------

def _sst2_prompt(ex: dict) -> str:
    return f"{ex['sentence']} It was"


def _rte_prompt(ex: dict) -> str:
    return f"{ex['premise']}\nDoes this mean that \"{ex['hypothesis']}\" is true? Yes or No?\n"


def _cb_prompt(ex: dict) -> str:
    return f"Suppose {ex['premise']} Can we infer that \"{ex['hypothesis']}\"? Yes, No, or Maybe?\n"


def _boolq_prompt(ex: dict) -> str:
    return f"{ex['passage']} {ex['question']}?"


def _copa_prompt(ex: dict) -> str:
    connective = " because" if ex["question"] == "cause" else " so"
    return ex["premise"].removesuffix(".") + connective


def _copa_candidates(ex: dict) -> list[str]:
    # The choice continues the premise's sentence, hence the space and the lower-case first letter.
    return [" " + c[0].lower() + c[1:] for c in (ex["choice1"], ex["choice2"])]


def _wsc_prompt(ex: dict) -> str:
    pronoun, noun = ex["target"]["span2_text"].lower(), ex["target"]["span1_text"]
    return f"{ex['text']}\nIn the previous sentence, does the pronoun \"{pronoun}\" refer to {noun}? Yes or No?\n"


def _multirc_prompt(ex: dict) -> str:
    return (f"{ex['paragraph']}\nQuestion: {ex['question']}\n"
            f"I found this answer \"{ex['answer']}\". Is that correct? Yes or No?\n")


def _e2e_prompt(ex: dict) -> str:
    return f"Meaning representation: {ex['mr']}\nDescription:"


def _fixed(words: list[str]):
    """Verbalizer of a classification task: the same words for every example."""
    return lambda ex: list(words)


def _mapped(mapping: dict):
    """Label id of an example whose raw label is a string or bool (as stored in the file)."""
    return lambda ex: mapping[ex["label"]]


def _int_label(ex: dict) -> int:
    return int(ex["label"])


def _decoder_only(name: str):
    def encoder_text(ex: dict) -> tuple[str, str | None]:
        raise ValueError(f"task {name} needs a decoder LM")
    return encoder_text


_TASKS: dict[str, Task] = {t.name: t for t in [
    Task("sst2", "classification", _sst2_prompt, _fixed([" terrible", " great"]), _int_label,
         lambda ex: (ex["sentence"], None), 2),
    Task("rte", "classification", _rte_prompt, _fixed(["Yes", "No"]),
         _mapped({"entailment": 0, "not_entailment": 1}), lambda ex: (ex["premise"], ex["hypothesis"]), 2),
    Task("cb", "classification", _cb_prompt, _fixed(["Yes", "No", "Maybe"]),
         _mapped({"entailment": 0, "contradiction": 1, "neutral": 2}),
         lambda ex: (ex["premise"], ex["hypothesis"]), 3),
    Task("boolq", "classification", _boolq_prompt, _fixed([" No", " Yes"]), _int_label,
         lambda ex: (ex["question"], ex["passage"]), 2),
    Task("copa", "multiple_choice", _copa_prompt, _copa_candidates, _int_label, _decoder_only("copa"), 2),
    Task("wsc", "classification", _wsc_prompt, _fixed(["No", "Yes"]), _int_label,
         lambda ex: (ex["text"], f"{ex['target']['span2_text']} -> {ex['target']['span1_text']}"), 2),
    Task("multirc", "classification", _multirc_prompt, _fixed(["No", "Yes"]), _int_label,
         lambda ex: (ex["paragraph"], f"{ex['question']} {ex['answer']}"), 2),
    Task("e2e", "generation", _e2e_prompt, lambda ex: [" " + ex["ref"]], lambda ex: 0, _decoder_only("e2e"), 0,
         references=lambda ex: list(ex["refs"]), metric="bleu"),
]}


def get_task(name: str) -> Task:
    """The built-in task called ``name``; a typo gets the closest known name as a hint."""
    if name in _TASKS:
        return _TASKS[name]
    close = difflib.get_close_matches(name.lower(), TASK_NAMES, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASK_NAMES)}{hint}")


# ---- reading the files --------------------------------------------------------------------------

def _rows(read, path: Path) -> tuple[dict, ...]:
    """``read(path)``, parsed once per process and file version: a process that samples a task again (a
    sequential run, the bench's runs, a test session) reads SST-2's 67k rows once. Callers copy what they
    sample, so the cached rows are never changed."""
    return _parsed(read, path, path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _parsed(read, path: Path, version: int) -> tuple[dict, ...]:
    return tuple(read(path))


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _sst2(path: Path) -> list[dict]:
    # GLUE TSV has no quoting (sentences contain bare quotes) and a trailing space on every sentence.
    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [{"sentence": r["sentence"].strip(), "label": int(r["label"])} for r in rows]


def _copa(path: Path) -> list[dict]:
    rows = _jsonl(path)
    for r in rows:  # a few premises and choices carry stray spaces, which would break the template
        for key in ("premise", "choice1", "choice2"):
            r[key] = r[key].strip()
    return rows


def _wsc(path: Path) -> list[dict]:
    rows = _jsonl(path)
    for r in rows:
        r["text"] = r["text"].strip()
    return rows


def _multirc(path: Path) -> list[dict]:
    """One example per (paragraph, question, answer option), labelled 1 when the option is correct."""
    rows = []
    for doc in _jsonl(path):
        for q in doc["passage"]["questions"]:
            for a in q["answers"]:
                rows.append({"paragraph": doc["passage"]["text"].strip(), "question": q["question"],
                             "answer": a["text"], "label": a["label"],
                             "idx": {"paragraph": doc["idx"], "question": q["idx"], "answer": a["idx"]}})
    return rows


def _e2e(path: Path) -> list[dict]:
    """One example per meaning representation, with all its references (file order)."""
    refs: dict[str, list[str]] = {}
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            refs.setdefault(row["mr"], []).append(row["ref"].strip())
    return [{"mr": mr, "ref": rs[0], "refs": rs} for mr, rs in refs.items()]


# (training file, validation file, reader) of the tasks that follow the plain protocol.
_FILES = {
    "sst2": ("SST-2/train.tsv", "SST-2/dev.tsv", _sst2),
    "rte": ("RTE/superglue/train.jsonl", "RTE/superglue/val.jsonl", _jsonl),
    "cb": ("CB/train.jsonl", "CB/val.jsonl", _jsonl),
    "copa": ("COPA/train.jsonl", "COPA/val.jsonl", _copa),
    "wsc": ("WSC/train.jsonl", "WSC/val.jsonl", _wsc),
    "multirc": ("MultiRC/train.jsonl", "MultiRC/val.jsonl", _multirc),
}


def load_splits(name: str, num_train: int = 1000, num_dev: int = DEFAULT_DEV, num_eval: int = 1000,
                seed: int = 0, data_dir: str | Path | None = None) -> Splits:
    """Seeded MeZO-style samples of a built-in task.

    train and dev are disjoint random samples of the task's training split (dev first when it is
    too small for both); eval is a seeded sample of the labelled validation split. A size of 0
    means none; a size beyond what exists takes everything. For cb, copa, wsc and e2e the default
    ``num_dev`` of 500 means 100.

    Exceptions, because the public files lack a split:

    * boolq has no training split here: train and dev are sampled from ``BoolQ/val.jsonl`` and eval
      is a sample of the examples left over (so BoolQ scores are not comparable with results on
      the full official dev set).
    * e2e has no training split here: train and dev come from ``devset.csv`` and eval from
      ``testset_w_refs.csv``. train holds one example per (MR, reference) pair, while dev and eval
      hold one example per MR with all its references; dev and train share no MR.
    """
    task = get_task(name)
    if name in _SMALL_DEV_TASKS and num_dev == DEFAULT_DEV:
        num_dev = _SMALL_DEV
    check_sizes(num_train=num_train, num_dev=num_dev, num_eval=num_eval)
    if task.name == "boolq":
        splits = _boolq_splits(num_train, num_dev, num_eval, seed, data_dir)
    elif task.name == "e2e":
        splits = _e2e_splits(num_train, num_dev, num_eval, seed, data_dir)
    else:
        train_file, eval_file, read = _FILES[task.name]
        rows = _rows(read, data_file(train_file, data_dir))
        train, dev = split_train_dev(rows, num_train, num_dev, seed)
        pool = _rows(read, data_file(eval_file, data_dir))
        splits = Splits([dict(ex) for ex in train], [dict(ex) for ex in dev],
                        [dict(pool[i]) for i in sample_indices(len(pool), num_eval, seed)], (len(rows), len(pool)))
    if num_train:
        check_training_left(f"task {name}", splits.train, splits.dev, len(splits.train) + len(splits.dev))
    return splits


def _boolq_splits(num_train: int, num_dev: int, num_eval: int, seed: int, data_dir) -> Splits:
    pool = _jsonl(data_file("BoolQ/val.jsonl", data_dir))
    train, dev = split_train_dev(pool, num_train, num_dev, seed)
    taken = {id(ex) for ex in train + dev}  # the very dicts of pool, so identity tells them apart
    rest = [ex for ex in pool if id(ex) not in taken]
    return Splits(train, dev, [rest[i] for i in sample_indices(len(rest), num_eval, seed)], (len(pool), None))


def _e2e_splits(num_train: int, num_dev: int, num_eval: int, seed: int, data_dir) -> Splits:
    groups = _e2e(data_file("E2E/original/devset.csv", data_dir))
    train_groups, dev = split_train_dev(groups, len(groups), num_dev, seed)
    pairs = [{"mr": g["mr"], "ref": ref, "refs": list(g["refs"])} for g in train_groups for ref in g["refs"]]
    train, _ = split_train_dev(pairs, num_train, 0, seed)
    tests = _e2e(data_file("E2E/original/testset_w_refs.csv", data_dir))
    return Splits(train, dev, [tests[i] for i in sample_indices(len(tests), num_eval, seed)])
