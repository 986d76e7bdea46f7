"""README's "Bad input and faults: what you get" table, row by row, against what ``leanft`` prints.

Each row's input cell names an entry of ``CASES``: the commands that reproduce it on tiny model folders,
each checked for its exit status (a refusal: status 1 and one ``leanft: error:`` line) and for saying
what the row quotes. A row without an entry fails, and so does an entry whose row is gone. Rows of Python
scripts, signals, two processes and injected faults are in ``FROM_CODE`` instead, each naming the tests that run it.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import huggingface_hub
import pytest
import torch
from conftest import make_model_dir
from test_gguf import write_tiny_gguf

from leanft import cli

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Bad input and faults: what you get"


# ---- the table -----------------------------------------------------------------------------------

def readme_rows() -> dict[str, list[tuple[str, str]]]:
    """Input cell -> its rows' (command, says) cells; a row with an empty input cell continues the one above.
    The table is the first run of ``|`` lines after the section heading, less its header and ``|---|`` line."""
    lines = README.read_text(encoding="utf-8").splitlines()
    body = lines[lines.index(SECTION) + 1:]
    first = next(i for i, line in enumerate(body) if line.startswith("|"))
    rows: dict[str, list[tuple[str, str]]] = {}
    key = ""
    for line in body[first + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 3, f"README table row is not 3 cells: {line}"
        key = cells[0] or key
        rows.setdefault(key, []).append((cells[1], cells[2]))
    return rows


def quoted(cell: str) -> list[str]:
    """The backticked parts of a Markdown cell (````a `b` c```` spans included)."""
    return [m.group(2).strip() for m in re.finditer(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", cell)]


def is_message(fragment: str) -> bool:
    """A quoted message, not a flag with its values (``--tt-rank 0``) or a file name (``leanft_run.json``)."""
    return " " in fragment and not (fragment.startswith("-") and ":" not in fragment)


def pattern(fragment: str) -> re.Pattern:
    """A quoted message as a regex: ``...`` (with the spaces around it) and ``<placeholder>`` stand for any
    text, the rest is literal."""
    return re.compile(".*?".join(re.escape(part) for part in re.split(r"\s*\.\.\.\s*|<[\w-]+>", fragment)))


def test_pattern_reads_ellipses_and_placeholders_as_any_text():
    assert pattern("evaluating on <model-B> (the run ...)").search("evaluating on /m/b (the run was on /m/a)")
    assert pattern("known keys: [...]").search("known keys: ['a', 'b']")
    assert pattern("zip archive ...)").search("zip archive: failed.)")
    assert not pattern("has shape (8, 32)").search("has shape 8, 32")  # the rest is literal
    assert quoted("x `a b` and ``c `d` e`` y") == ["a b", "c `d` e"]


# ---- the commands --------------------------------------------------------------------------------

TRAIN = ("--num-train 4 --num-dev 2 --num-eval 2 --max-steps 1 --batch-size 2 --no-eval-before --max-length 32 "
         "--save-every 1")


def train(flags: str, model: str = "{llama}", file: str | None = "data/train.csv") -> str:
    """``leanft train`` of one step on a tiny model folder (``{llama}`` and the like, see ``folders``) and a
    users' file of 12 rows (``None``: the flags name the data; reading SST-2 takes a second a run)."""
    data = f"--train-file {file} --text-columns review --label-column stars " if file else ""
    return f"train --model {model} {TRAIN} {data}{flags}"


def evaluate(flags: str) -> str:
    return f"eval --num-eval 2 --max-length 32 {flags}"


def write(path: str, text: str) -> Callable[[], None]:
    return lambda: Path(path).write_text(text)


def cut(path: str, keep: int = 100, source: str | None = None) -> Callable[[], None]:
    """Keep the first ``keep`` bytes of ``source`` (default: the file itself) in ``path``; negative: drop the last."""
    return lambda: Path(path).write_bytes(Path(source or path).read_bytes()[:keep])


def rename(path: str, to: str) -> Callable[[], None]:
    return lambda: Path(path).rename(to)


def delete(path: str) -> Callable[[], None]:
    return lambda: Path(path).unlink()


def edit_json(path: str, drop: tuple[str, ...] = (), **changes) -> Callable[[], None]:
    def edit():
        data = {k: v for k, v in json.loads(Path(path).read_text()).items() if k not in drop}
        Path(path).write_text(json.dumps({**data, **changes}))
    return edit


def drawn_on_cuda(run: str) -> Callable[[], None]:
    """Make a zeroth-order checkpoint read as one whose directions were drawn on a GPU."""
    def edit():
        path = Path(run) / "checkpoint" / "optimizer.pt"
        state = torch.load(path, weights_only=False)
        state["engine"]["device_type"] = "cuda"
        torch.save(state, path)
    return edit


def as_a_step_log(run: str) -> Callable[[], None]:
    """Make a zeroth-order run look as an older leanft left it: the checkpoint a step log beside it."""
    def edit():
        for name in ("trainable.safetensors", "optimizer.pt"):
            (Path(run) / "checkpoint" / name).unlink()
        (Path(run) / "zo_log.jsonl").write_text("")
    return edit


def as_if_two_processes(ckpt: str) -> Callable[[], None]:
    """Make a one-process checkpoint read as one that two processes wrote (each with its random states)."""
    def edit():
        state = torch.load(f"{ckpt}/optimizer.pt", weights_only=False)
        torch.save({**state, "processes": 2}, f"{ckpt}/optimizer.pt")
        shutil.copy(f"{ckpt}/rng-0.pt", f"{ckpt}/rng-1.pt")
    return edit


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


@dataclass(frozen=True)
class Run:
    """One command of a row, run in a fresh folder that reads as the workspace (``data/``, ``runs/``, ...)."""

    command: str  # leanft's argv as a shell line; {llama}, {wide}, ... are the model folders
    status: int = 1  # 1: refused in one line; 2: argparse's usage and error; 0: runs
    quotes: bool = True  # False: the row describes this case without quoting its message
    before: Callable[[], None] | None = None  # writes or damages a file first


ZO_RESUME = "--method mezo-lora --resume --output-dir runs/z --max-steps 3"
LORA_RESUME = "--method lora --resume --output-dir runs/k"
QA = "--prompt-column prompt --completion-column answer"
LONG_ANSWER = jsonl([{"prompt": f"What is {i}?", "answer": f"It is {i}."} for i in range(9)]
                    + [{"prompt": "What is long?", "answer": "A long answer: " + " ".join(["word"] * 30)}])
LONG_PROMPTS = jsonl([{"prompt": "Tell me " + "very " * (12 if i % 2 else 0) + f"about {i}.", "answer": f"{i}."}
                      for i in range(10)])
ADAPTER = "runs/a/best/adapter_config.json"

# README row (its input cell) -> the commands that show it; a row continued below (empty input cell) adds runs
CASES: dict[str, list[Run]] = {
    "missing file": [Run(train("", file="data/nothere.csv"))],
    "bad JSON line": [Run(train("", file="data/bad.jsonl"))],
    "CSV row with too many / too few fields": [Run(train("", file="data/bad.csv")),
                                               Run(train("", file="data/short.csv"))],
    "column not in the file": [Run(train("--text-columns text")), Run(train("--template '{text} It was'"))],
    "no label column given": [Run(train("--train-file data/train.csv --text-columns review", file=None))],
    "fewer label words than labels": [Run(train("--label-words ' bad, good'", file="data/three.csv"))],
    "eval label the train file lacks": [Run(train("--eval-file data/eval.csv"))],
    "label word with no tokens": [Run(train("--label-words ' bad,'"))],
    "broken template": [Run(train("--template '{review It was'"))],
    "empty file": [Run(train("", file="data/empty.csv")), Run(train("", file="data/header_only.csv")),
                   Run(train("", file="data/empty.jsonl"))],
    "unknown file type": [Run(train("", file="data/train.txt"))],
    "eval file alone": [Run(train("--eval-file data/eval.csv", file=None))],
    "a 1-row file, no eval file": [Run(train("", file="data/one.csv"))],
    "`--num-dev` as large as the file": [Run(train("--num-dev 10"))],
    "`--num-dev` taking a built-in task's whole training split": [Run(train("--task cb --num-dev 300", file=None))],
    "`--num-eval 0`": [Run(train("--num-eval 0"))],
    "`--max-length` beyond the model's context (SmolLM2: 8192 tokens)": [Run(train("--max-length 10000"))],
    "`--max-new-tokens` >= `--max-length` on a generation task": [
        Run(train(f"--train-file data/qa.jsonl {QA} --max-length 64 --max-new-tokens 64", file=None))],
    "an answer (or answer option) longer than `--max-length` allows": [
        Run(train(f"--train-file qa.jsonl {QA} --max-length 12 --max-new-tokens 4", file=None),
            before=write("qa.jsonl", LONG_ANSWER))],
    "method typo": [Run(train("--method lorra"))],
    "model name typo": [Run(train("", "smollm-135m"))],
    "model folder that does not exist": [Run(train("", "models/nothere"))],
    "hub id that cannot be loaded (offline, or no such repository)": [
        Run(train("", "org/name"))],
    "folder that is not a model": [Run(train("", "emptydir")), Run("params --model emptydir --method lora")],
    "model folder with only `config.json`": [Run(train("", "cfgonly")),
                                             Run("params --model cfgonly --method lora", status=0, quotes=False)],
    "`.gguf` cut inside its header (SmolLM2's cut at 1 MB: `at 1,000,000 bytes`)": [
        Run("params --model x.gguf --method lora", before=cut("x.gguf", 1000, "models/tiny.gguf")),
        Run(train("", "x.gguf"), before=cut("x.gguf", 1000, "models/tiny.gguf"))],
    "`.gguf` cut inside its tensor data (SmolLM2's 98 MB file cut at 50 MB: `tensor 'output_norm.weight' ends at "
    "byte 98,362,432, the file has 50,000,000`)": [
        Run("params --model x.gguf --method lora", before=cut("x.gguf", -1000, "models/tiny.gguf")),
        Run(train("", "x.gguf"), before=cut("x.gguf", -1000, "models/tiny.gguf"))],
    "a `.gguf` that is no GGUF file / an empty one": [
        Run("params --model x.gguf --method lora", before=write("x.gguf", "not a model\n")),
        Run("params --model x.gguf --method lora", before=write("x.gguf", ""))],
    "task typo": [Run(train("--task sst", file=None))],
    "not a run's `best/`": [Run(evaluate("--adapter runs/a"))],
    "`adapter_config.json` truncated": [Run(evaluate("--adapter runs/a/best"), before=cut(ADAPTER, 200))],
    "`adapter_config.json` edited: a key renamed, a rank not a positive integer, a wrong type, an unknown or missing "
    "`peft_type`": [Run(evaluate("--adapter runs/a/best"), before=edit_json(ADAPTER, drop=("r",), rr=8)),
                    Run(evaluate("--adapter runs/a/best"), before=edit_json(ADAPTER, r=-4)),
                    Run(evaluate("--adapter runs/a/best"), before=edit_json(ADAPTER, use_dora=1)),
                    Run(evaluate("--adapter runs/a/best"), before=edit_json(ADAPTER, peft_type="LORAX")),
                    Run(evaluate("--adapter runs/a/best"), before=edit_json(ADAPTER, drop=("peft_type",)))],
    "`leanft_run.json` not valid JSON": [
        Run(evaluate("--adapter runs/a/best"), before=cut("runs/a/best/leanft_run.json", 50))],
    "another base model at eval": [Run(evaluate("--adapter runs/a/best --model {twin}"), status=0)],
    "adapter on another base model (`leanft_run.json` names model B)": [
        Run(evaluate("--adapter runs/r-wide/best")), Run(evaluate("--adapter runs/r-deep/best")),
        Run(evaluate("--adapter runs/b/best")),
        Run(evaluate("--adapter runs/c/best")),
        Run(evaluate("--adapter runs/d/best"))],
    "rank 0 or negative": [Run(train("--method lora --rank 0")), Run(train("--method loretta-rep --rank 0")),
                           Run(train("--method loretta-rep --tt-rank 0"), quotes=False),
                           Run(train("--method loretta-adp --bottleneck 0")), Run(train("--method lamda --rank -2"))],
    "LoRA rank above a targeted layer (SmolLM2: `v_proj` is 576 -> 192, so at most 192)": [
        Run(train("--method lora --rank 100000")), Run("params --model {llama} --method lora --rank 100000"),
        Run(train("--method mezo-lora --rank 100000"))],
    "LoRETTA_rep rank above a targeted layer (SmolLM2: 576)": [Run(train("--method loretta-rep --rank 100000"))],
    "TT rank above what a TT factor can use (any TT method, the TT classifier head too; SmolLM2: 48, a 576x8 matrix "
    "of shape [12, 8, 6, 8])": [Run(train("--method loretta-rep --tt-rank 100000"))],
    "LaMDA rank above the layer": [Run(train("--method lamda --rank 64")), Run(train("--method lamda++ --rank 64"))],
    "TT shape that cannot be factored": [
        Run(train("--method loretta-rep", "{w284}")),
        Run(train("--method loretta-rep --tt-shapes 284x8=4,71,8 8x284=8,4,71", "{w284}"), status=0, quotes=False),
        Run(train("--tt-shapes 284x8=4,71"), status=2), Run(train("--tt-shapes 284x8"), status=2)],
    "option the method does not take": [Run(train("--method lora --bottleneck 8")),
                                        Run(train("--method full --bottleneck 8"))],
    "target module typo": [Run(train("--method lora --target-modules q_prj"))],
    "dropout out of range": [Run(train("--method lora --dropout 1.5"))],
    "unknown init": [Run(train("--init-mode zeros"))],
    "unknown flag value": [
        Run(train("--optimizer sgd"), status=2), Run(train("--zo-schedule adaptive"), status=2, quotes=False),
        Run(train("--dtype fp16"), status=2, quotes=False), Run(train("--scheduler cosin"), status=2, quotes=False),
        Run(train("--config run.yaml"), before=write("run.yaml", "optimizer: sgd\n"))],
    "impossible numbers": [Run(train("--batch-size 0")), Run(train("--lr -1")),
                           Run(train("--batch-size 2.5"), status=2), Run(train("--save-every 5x")),
                           Run(train("--warmup-ratio 2")), Run(train("--max-grad-norm -1")),
                           Run(train("--max-grad-norm nan"), quotes=False)],
    "YAML config": [Run(train("--config run.yaml"), before=write("run.yaml", "methd: lora\n")),
                    Run(train("--config run.yaml"), before=write("run.yaml", "method: [lora\n")),
                    Run(train("--config run.yaml"), before=write("run.yaml", "epochs: two\n"))],
    "ZO optimiser option it does not take": [Run(train("--method mezo-lora --zo-optimizer lozo --zo-sparsity 0.5"))],
    "fzoo with one query": [Run(train("--method mezo-lora --zo-optimizer fzoo"))],
    "odd ZO budget": [Run(train("--method mezo-lora --max-forwards 7"))],
    "ZO options with a first-order method": [Run(train("--method lora --max-forwards 8")),
                                             Run(train("--method lora --zo-schedule adazeta"), quotes=False)],
    "clipping asked of a zeroth-order run": [Run(train("--method mezo-lora --max-grad-norm 0"))],
    "accumulation with ZO": [Run(train("--method mezo-lora --grad-accum 2"))],
    "LaMDA under ZO": [Run(train("--method lamda --optimizer zo"))],
    "full fine-tuning in low precision": [Run(train("--method full --dtype bfloat16")),
                                          Run(train("--method full --dtype float16"), quotes=False)],
    "a fresh run in a folder holding another run": [
        Run(train("--output-dir runs/a")),
        Run(train("--output-dir runs/a --resume --overwrite"))],
    "`--output-dir` is a file": [Run(train("--output-dir notes.txt"), before=write("notes.txt", "notes\n"))],
    "`--output-dir` under a file, or not writable": [
        Run(train("--output-dir notes.txt/run"), before=write("notes.txt", "notes\n"))],
    "killed run": [
        Run(train(f"{LORA_RESUME} --max-steps 2"), status=0),
        Run(train(f"{LORA_RESUME} --max-steps 2"), status=0,
            before=rename("runs/k/checkpoint", "runs/k/.checkpoint.old-123")),
        Run(train(f"{LORA_RESUME} --max-steps 2"), status=0,
            before=rename("runs/k/checkpoint", "runs/k/.checkpoint.new-123"))],
    "`--resume` with no checkpoint": [Run(train("--method lora --resume --output-dir runs/new"), status=0)],
    "damaged checkpoint": [
        Run(train(LORA_RESUME), before=cut("runs/k/checkpoint/trainable.safetensors")),
        Run(train(LORA_RESUME), before=delete("runs/k/checkpoint/optimizer.pt")),
        Run(train(LORA_RESUME), before=cut("runs/k/checkpoint/optimizer.pt")),
        Run(train(LORA_RESUME), before=cut("runs/k/checkpoint/trainer_state.json", 10)),
        Run(train(ZO_RESUME), before=cut("runs/z/checkpoint/optimizer.pt")),
        Run(train(LORA_RESUME), before=delete("runs/k/checkpoint/rng-0.pt")),
        Run(train(LORA_RESUME), before=cut("runs/k/checkpoint/rng-0.pt"))],
    "a checkpoint written by 2 processes, resumed on 1": [
        Run(train(LORA_RESUME), before=as_if_two_processes("runs/k/checkpoint"))],
    "resume with other settings": [
        Run(train(f"{LORA_RESUME} --rank 4")),
        Run(train("--method loretta-adp --bottleneck 8 --resume --output-dir runs/k")),
        Run(train("--method lora --resume --output-dir runs/z")),
        Run(train("--method mezo-lora --resume --output-dir runs/k"))],
    "ZO checkpoint from another device type": [Run(train(ZO_RESUME), status=0, before=drawn_on_cuda("runs/z"))],
    "ZO checkpoint of an older leanft": [Run(train(ZO_RESUME), before=as_a_step_log("runs/z"))],
}

# rows run by other tests (Python scripts, signals, two processes, injected NaNs): each names its tests as
# "file.py::test_name", and those must exist
FROM_CODE: dict[str, list[str]] = {
    "prompts longer than `--max-length`": [
        "test_instructions.py::test_long_prompts_are_cut_alike_counted_once_and_every_answer_saved"],
    "`leanft eval` of a run on your own file": [
        "test_train.py::test_eval_of_a_run_on_a_users_file_reruns_its_evaluation_without_data_flags"],
    "LaMDA in a `Trainer` without `LamdaCallback`": [
        "test_hf.py::test_lamda_in_a_trainer_freezes_on_schedule_with_or_without_the_callback"],
    "LaMDA in a plain loop that never calls `update_freezing`": [
        "test_hf.py::test_lamda_in_a_plain_loop_without_its_schedule_warns_once"],
    "ZOTrainer with FSDP or DeepSpeed": ["test_hf.py::test_zo_trainer_refuses_sharded_training"],
    "ZOTrainer with fp16 on a GPU": ["test_faults.py::test_fp16_zo_trainer_on_the_scaler_path_steps"],
    "ZOSFTTrainer on 2 processes with 1 query (or a count that does not divide)": [
        "test_hf.py::test_zo_sft_trainer_on_two_processes_with_fewer_or_uneven_queries"],
    "NaN loss, first-order": ["test_faults.py::test_data_parallel_matrix_and_a_nan_on_one_process",
                              "test_train.py::test_nan_loss_is_a_clear_error_and_keeps_the_checkpoint"],
    "NaN gradient behind a finite loss, first-order": [
        "test_train.py::test_a_nan_gradient_behind_a_finite_loss_stops_before_any_update",
        "test_faults.py::test_a_nan_gradient_on_one_process_stops_every_process",
        "test_train.py::test_float16_keeps_skipping_an_overflowed_step_instead_of_stopping"],
    "NaN loss, zeroth-order": ["test_zo.py::test_divergence_rolls_back_and_halves_the_learning_rate",
                               "test_zo.py::test_divergence_that_persists_stops_with_a_clear_error",
                               "test_zo.py::test_with_the_guard_off_the_first_non_finite_step_stops_and_leaves_the_"
                               "parameters_finite",
                               "test_faults.py::test_data_parallel_matrix_and_a_nan_on_one_process"],
    "activations overflow into a finite loss, zeroth-order": [
        "test_zo.py::test_activations_that_overflow_into_a_finite_loss_are_divergence_not_convergence",
        "test_zo.py::test_a_healthy_model_whose_loss_no_query_moves_takes_a_normal_step_not_a_rollback",
        "test_zo.py::test_the_overflow_check_is_a_counted_forward"],
    "Ctrl-C or SIGTERM (scheduler, spot machine)": [
        "test_faults.py::test_sigterm_mid_step_checkpoints_that_step_and_resumes_to_the_uninterrupted_result",
        "test_faults.py::test_two_processes_signalled_at_different_steps_stop_together_and_resume_exactly",
        "test_train.py::test_sigint_mid_step_finishes_the_step_checkpoints_it_and_restores_the_handlers",
        "test_train.py::test_a_repeated_signal_at_once_is_one_stop_and_one_a_moment_later_aborts"],
}
# continued rows (an empty input cell) that other tests run, by (input cell of the row above, command cell)
FROM_CODE_CONTINUED: dict[tuple[str, str], list[str]] = {
    ("killed run", "killed while `ZOTrainer` rewrites its engine state beside a checkpoint"): [
        "test_checkpoint.py::test_a_kill_while_a_file_beside_a_checkpoint_is_rewritten_leaves_the_old_one_whole"],
}


def test_from_code_rows_name_tests_that_exist():
    """A FROM_CODE reference that no longer names a test would let its row rot unseen."""
    for name in [n for names in [*FROM_CODE.values(), *FROM_CODE_CONTINUED.values()] for n in names]:
        file, function = name.split("::")
        assert f"def {function}(" in (Path(__file__).parent / file).read_text(), f"{name} is not a test"
    assert not set(FROM_CODE) & set(CASES)


# ---- the workspace -------------------------------------------------------------------------------

DATA = {
    "train.csv": "review,stars\n" + "".join(f"{'a great film' if i % 2 else 'a dull film'} {i},"
                                            f"{'good' if i % 2 else 'bad'}\n" for i in range(12)),
    "bad.csv": "review,stars\nfine,good\ndull,bad\nfine,good\nfine,too,good\n",
    "short.csv": "review,stars\nfine,good\ndull,bad\nfine,good\ndull,bad\nfine\n",
    "bad.jsonl": "".join(json.dumps({"review": f"film {i}", "stars": "good"}) + "\n" for i in range(6))
                 + '{"review": "film 6", "stars": "good"\n',
    "three.csv": "review,stars\n" + "".join(f"film {i},{('bad', 'good', 'meh')[i % 3]}\n" for i in range(9)),
    "eval.csv": "review,stars\nfine,good\ndull,bad\nfine,good\nodd,meh\n",
    "one.csv": "review,stars\nfine,good\n",
    "qa.jsonl": jsonl([{"prompt": f"What is {i} plus {i}?", "answer": f"It is {2 * i}."} for i in range(10)]),
    "empty.csv": "", "header_only.csv": "review,stars\n", "empty.jsonl": "", "train.txt": "a film, good\n",
}


@pytest.fixture(scope="module")
def folders(tiny_llama_dir, tiny_bert_dir, tmp_path_factory) -> dict[str, str]:
    """The model folders commands name: the tiny LLaMA, a copy of it, wider, deeper, of width 284 (4 x 71),
    and BERT."""
    made = {name: make_model_dir(tmp_path_factory.mktemp(name), "llama", **sizes) for name, sizes in {
        "twin": {}, "wide": {"hidden_size": 48, "intermediate_size": 96}, "deep": {"num_hidden_layers": 3},
        "w284": {"hidden_size": 284, "num_attention_heads": 2}}.items()}
    return {"llama": tiny_llama_dir, "bert": tiny_bert_dir, **made}


def argv(command: str, folders: dict[str, str]) -> list[str]:
    words = shlex.split(command)
    for name, folder in folders.items():
        words = [w.replace("{" + name + "}", folder) for w in words]
    return words


def leanft(command: str, folders: dict[str, str], capsys) -> tuple[int, str, str, str]:
    """Run ``leanft`` in-process: (exit status, the SystemExit message or "", stdout, stderr and warnings)."""
    capsys.readouterr()
    status, message = 0, ""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            cli.main(argv(command, folders))
        except SystemExit as e:
            status, message = (1, e.code) if isinstance(e.code, str) else (e.code, "")
    out, err = capsys.readouterr()
    return status, message, out, "".join([err, *(f"{w.message}\n" for w in caught)])


@pytest.fixture(scope="module")
def workspace(folders, tmp_path_factory) -> Path:
    """``data/`` files, empty folders, and trained runs: ``runs/a`` and ``runs/k`` (LoRA rank 8, 1 step),
    ``runs/z`` (MeZO-LoRA, 2 steps), and copies whose ``leanft_run.json`` names another base model."""
    root = tmp_path_factory.mktemp("workspace")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        Path("data").mkdir()
        for name, text in DATA.items():
            (Path("data") / name).write_text(text)
        Path("emptydir").mkdir()
        Path("models").mkdir()  # models/nothere: a local path, not the hub id 'org/name'
        write_tiny_gguf(Path("models/tiny.gguf"))
        Path("cfgonly").mkdir()
        shutil.copy(Path(folders["llama"]) / "config.json", "cfgonly")
        for command in (train("--method lora --output-dir runs/a"), train("--method loretta-rep --output-dir runs/r"),
                        train("--method mezo-lora --max-steps 2 --output-dir runs/z")):
            cli.main(argv(command, folders))
        shutil.copytree("runs/a", "runs/k")
        for source, copy, model in (("a", "b", "wide"), ("a", "c", "deep"), ("a", "d", "bert"),
                                    ("r", "r-wide", "wide"), ("r", "r-deep", "deep")):
            shutil.copytree(f"runs/{source}", f"runs/{copy}")
            edit_json(f"runs/{copy}/best/leanft_run.json", model=folders[model])()
    return root


def fresh(workspace: Path, where: Path, command: str) -> Path:
    """A folder that reads as ``workspace``: the runs ``command`` names are copies (it may write there),
    everything else links to the original."""
    named = set(re.findall(r"runs/[\w-]+", command))
    (where / "runs").mkdir(parents=True)
    for path in [p for p in workspace.iterdir() if p.name != "runs"] + list((workspace / "runs").iterdir()):
        name = str(path.relative_to(workspace))
        if name in named:
            shutil.copytree(path, where / name)
        else:
            (where / name).symlink_to(path)
    return where


# ---- the test ------------------------------------------------------------------------------------

ROWS = readme_rows()


def check(run: Run, row: str, messages: list[str], folders: dict[str, str], capsys) -> set[str]:
    """Run one command; its exit status and form as ``run`` says; the README quotes it says."""
    status, message, out, err = leanft(run.command, folders, capsys)
    output = {0: out + err, 1: message, 2: err}.get(status, "")
    said = f"leanft {run.command}\n  exit {status}: {output[-3000:]}"
    assert status == run.status, said
    if status == 1:  # the exit line is all of stderr
        assert message.startswith("leanft: error: ") and "\n" not in message and not err, f"{said}\n{err}"
    elif status == 2:
        assert re.match(r"leanft \w+: error: ", err.strip().splitlines()[-1]), said
    if not run.quotes:
        return set()
    hits = {m for m in messages if pattern(m).search(output)}
    assert hits, f"{said}\n  matches none of README's quotes for {row!r}:\n    " + "\n    ".join(messages)
    return hits


@pytest.mark.parametrize("row", sorted(set(ROWS) | set(CASES) | set(FROM_CODE)))
def test_readme_row_is_what_leanft_says(row, folders, workspace, tmp_path, monkeypatch, capsys):
    assert row in ROWS, f"CASES or FROM_CODE has {row!r}, a row README.md no longer has: remove it there"
    assert row in CASES or row in FROM_CODE, f"README.md row {row!r} has no command here: add it to CASES"
    if row in FROM_CODE:
        pytest.skip(f"run by {', '.join(FROM_CODE[row])}")
    # no run reaches the network: a hub id is looked up as offline, at once
    monkeypatch.setitem(huggingface_hub.is_offline_mode.__globals__, "HF_HUB_OFFLINE", True)
    messages = [f for command, cell in ROWS[row] if (row, command) not in FROM_CODE_CONTINUED
                for f in quoted(cell) if is_message(f)]
    matched = set()
    for i, run in enumerate(CASES[row]):
        monkeypatch.chdir(fresh(workspace, tmp_path / str(i), run.command))
        if run.before:
            run.before()
        matched |= check(run, row, messages, folders, capsys)
    unsaid = [m for m in messages if m not in matched]
    assert not unsaid, f"README quotes for {row!r} that no command here says: {unsaid}"
