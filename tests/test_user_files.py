"""Users' files and local models get what built-in ones get (issue 16): the sampling flags, a task name,
errors that point at a line, parameter counts for any model, and LoRETTA_adp's input adapters by flag."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_bert, tiny_llama, tiny_opt

from leanft import cli, methods, models
from leanft.config import TrainConfig
from leanft.tasks import file_task_name, instruction_task, load_splits, load_tasks, rows_used, user_task
from leanft.tasks.base import data_root
from leanft.tuners.loretta_adp.layer import LorettaAdpLayer


def write_rows(path: Path, header: str, rows: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def pair_rows(n: int) -> list[str]:
    return [f"first {i}\tsecond {i}\t{i % 2}" for i in range(n)]


# ---- sampling flags ------------------------------------------------------------------------------

def test_users_files_are_sampled_exactly_as_the_built_in_task(tmp_path):
    """CB's own files given as users' files: the same seeded train, dev and eval rows as ``load_splits``."""
    cb = data_root() / "CB"
    cfg = TrainConfig(train_file=str(cb / "train.jsonl"), eval_file=str(cb / "val.jsonl"),
                      text_columns=["premise", "hypothesis"], label_column="label", num_train=16, num_dev=8,
                      num_eval=12, seed=5)
    [(task, splits)] = load_tasks(cfg)
    builtin = load_splits("cb", num_train=16, num_dev=8, num_eval=12, seed=5)
    assert (splits.train, splits.dev, splits.eval) == (builtin.train, builtin.dev, builtin.eval)
    assert task.name == "CB"  # train.jsonl is named after its folder
    assert rows_used(task.name, splits) == "CB: 16 train and 8 dev rows of 250; 12 eval rows of 56"
    assert rows_used("cb", builtin) == "cb: 16 train and 8 dev rows of 250; 12 eval rows of 56"


def test_held_out_eval_and_instruction_files_take_the_flags_too(tmp_path):
    train = write_rows(tmp_path / "reviews.tsv", "a\tb\ty", pair_rows(100))
    _, splits = user_task(train, text_columns=["a", "b"], label_column="y", num_train=10, num_dev=5, num_eval=7)
    assert (len(splits.train), len(splits.dev), len(splits.eval), splits.pool) == (10, 5, 7, (100, None))
    assert rows_used("reviews", splits) == "reviews: 10 train, 5 dev and 7 eval rows of 100"
    _, capped = user_task(train, text_columns=["a", "b"], label_column="y", num_eval=50)
    assert len(capped.eval) == 20 and len(capped.train) == 80  # held out: at most 20% of the file
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"q": f"question {i}", "a": f"answer {i}"}) + "\n" for i in range(50)))
    _, splits = instruction_task(qa, prompt_column="q", completion_column="a", num_train=6, num_dev=2, num_eval=3)
    assert (len(splits.train), len(splits.dev), len(splits.eval)) == (6, 2, 3)


@pytest.mark.slow
def test_the_run_says_how_many_rows_it_used_and_names_the_task_after_the_folder(tiny_llama_dir, tmp_path, capsys):
    train = write_rows(tmp_path / "mrpc" / "train.tsv", "s1\ts2\tquality", pair_rows(40))
    dev = write_rows(tmp_path / "mrpc" / "dev.tsv", "s1\ts2\tquality", pair_rows(20))
    out = tmp_path / "run"
    cli.main(["train", "--model", tiny_llama_dir, "--train-file", str(train), "--eval-file", str(dev),
              "--text-columns", "s1,s2", "--label-column", "quality", "--label-words", " No, Yes",
              "--num-train", "8", "--num-dev", "4", "--num-eval", "6", "--max-steps", "1", "--batch-size", "4",
              "--no-eval-before", "--output-dir", str(out), "--rank", "2", "--tt-rank", "2"])
    assert "mrpc: 8 train and 4 dev rows of 40; 6 eval rows of 20" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tasks"] == ["mrpc"] and "accuracy" in metrics["eval"]["mrpc"]
    assert metrics["rows"] == {"mrpc": {"train": 8, "dev": 4, "eval": 6, "of": [40, 20]}}
    assert metrics["truncated"] == {"mrpc": {"train": 0, "dev": 0, "eval": 0}}
    # what the model answered to each eval row, next to the metrics
    rows = [json.loads(line) for line in (out / "predictions-mrpc-eval.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(6)) and rows[0]["input"].endswith("\nAnswer:")
    assert all(r["prediction"] in (" No", " Yes") and r["correct"] == (r["prediction"] == r["label"]) for r in rows)
    assert 100 * sum(r["correct"] for r in rows) / 6 == pytest.approx(metrics["eval"]["mrpc"]["accuracy"])


def test_a_small_file_keeps_rows_to_train_on_with_the_default_sizes(tmp_path):
    """With --num-dev and --num-eval left at their defaults (500, 1000), a 64-row file is split 20% eval, then 20%
    dev of the rest, and the run says so; before, dev took every row left and the file was refused."""
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"q": f"question {i}", "a": f"answer {i}"}) + "\n" for i in range(64)))
    reviews = write_rows(tmp_path / "reviews.tsv", "a\tb\ty", pair_rows(64))
    for cfg in (TrainConfig(train_file=str(qa), prompt_column="q", completion_column="a"),
                TrainConfig(train_file=str(reviews), text_columns=["a", "b"], label_column="y")):
        [(task, splits)] = load_tasks(cfg)
        assert (len(splits.train), len(splits.dev), len(splits.eval)) == (42, 10, 12)
        assert rows_used(task.name, splits) == (f"{task.name}: 42 train, 10 dev and 12 eval rows of 64 (the default "
                                                "num_dev 500 scaled to the file: 10 of its 52 training rows)")
    [(_, asked)] = load_tasks(TrainConfig(train_file=str(qa), prompt_column="q", completion_column="a", num_dev=30))
    assert (len(asked.train), len(asked.dev), asked.note) == (22, 30, "")  # a size given is taken as given


@pytest.mark.parametrize("rows,sizes,message", [
    (1, {"num_dev": 0}, r"one\.jsonl: no training rows left of 1 after 0 dev and 1 held-out eval rows; add rows, or "
                        r"give an eval file"),
    (1, {}, r"one\.jsonl: no training rows left of 1 after 0 dev and 1 held-out eval rows; add rows"),
    (10, {"num_dev": 8}, r"no training rows left of 10 after 8 dev and 2 held-out eval rows; lower num_dev"),
])
def test_a_file_too_small_to_train_on_gets_the_hint_that_helps(tmp_path, rows, sizes, message):
    path = tmp_path / "one.jsonl"
    path.write_text("".join(json.dumps({"q": f"question {i}", "a": "yes"}) + "\n" for i in range(rows)))
    with pytest.raises(ValueError, match=message):
        load_tasks(TrainConfig(train_file=str(path), prompt_column="q", completion_column="a", **sizes))


def test_impossible_sizes_are_refused_before_the_model_loads(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"leanft: error: num_eval must be positive, got 0"):
        cli.main(["train", "--model", str(tmp_path / "no-such-model"), "--num-eval", "0"])
    with pytest.raises(ValueError, match=r"task cb: no training rows left of 250 after 250 dev rows; lower num_dev"):
        load_tasks(TrainConfig(task="cb", num_dev=300))


# ---- task names ----------------------------------------------------------------------------------

@pytest.mark.parametrize("path,name", [
    ("data/mrpc/train.tsv", "mrpc"), ("mrpc/dev.tsv", "mrpc"), ("data/mine_train.csv", "mine"),
    ("notes.jsonl", "notes"), ("wic/Train-Data.jsonl", "wic"), ("x/sst2.train.jsonl", "sst2"),
])
def test_a_file_task_is_named_by_its_stem_or_its_folder(path, name):
    assert file_task_name(path) == name


def test_task_name_flag_names_the_users_task(tmp_path):
    train = write_rows(tmp_path / "train.tsv", "a\tb\ty", pair_rows(20))
    cfg = cli.train_config(cli.build_parser().parse_args(
        ["train", "--train-file", str(train), "--text-columns", "a,b", "--label-column", "y", "--task-name", "para"]))
    [(task, _)] = load_tasks(cfg)
    assert task.name == "para"
    a = write_rows(tmp_path / "a" / "train.tsv", "a\tb\ty", pair_rows(20))
    b = write_rows(tmp_path / "b" / "train.tsv", "a\tb\ty", pair_rows(20))
    mixture = load_tasks(TrainConfig(task=f"{a},{b}", text_columns=["a", "b"], label_column="y"))
    assert [t.name for t, _ in mixture] == ["a", "b"]


@pytest.mark.parametrize("values,message", [
    ({"task_name": "x"}, r"task_name names a run's one users' task .* has 0 files"),
    ({"task_name": "x", "task": "a.csv,b.csv"}, r"has 2 files"),
    ({"task_name": "a,b", "train_file": "f.csv"}, r"without commas"),
    ({"task_name": " ", "train_file": "f.csv"}, r"non-empty"),
])
def test_task_name_is_checked(values, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**values)


# ---- the label-count error -----------------------------------------------------------------------

@pytest.mark.parametrize("name,text", [
    ("x.csv", "text,label\n" + "".join(f"row {i},{y}\n" for i, y in enumerate(["pos", "neg"] * 3 + ["Pos", "neg"]))),
    ("x.jsonl", "".join(json.dumps({"text": f"row {i}", "label": y}) + "\n"
                        for i, y in enumerate(["pos", "neg"] * 3 + ["Pos", "neg"]))),
])
def test_label_count_error_names_the_line_of_the_first_unexpected_label(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    line = 8 if name.endswith(".csv") else 7  # the 7th row, after the CSV header
    with pytest.raises(ValueError, match=rf"x\.{path.suffix[1:]} line {line}, column 'label': label 'Pos' first appears "
                                         rf"here.*label_words has 2 words but .*x\.\w+ has 3 labels"):
        user_task(path, text_columns=["text"], label_column="label", label_words=[" bad", " good"])


# ---- counts for any model ------------------------------------------------------------------------

def _no_weights(*args, **kwargs):
    raise AssertionError("counting must not load weights")


@pytest.mark.slow
def test_params_counts_a_local_folder_from_its_config(tiny_llama_dir, capsys, monkeypatch):
    real = models.load_model(tiny_llama_dir)[0]
    expected = methods.count_parameters(methods.apply_method(real, "lora", "CAUSAL_LM"))
    monkeypatch.setattr(models, "load_model", _no_weights)
    cli.main(["params", "--model", tiny_llama_dir, "--method", "lora", "--json"])
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"model": tiny_llama_dir, "method": "lora", **expected}
    assert "meta device, no weights" in captured.err
    cli.main(["params", "--model", tiny_llama_dir, "--bottleneck", "8"])
    text = capsys.readouterr().out
    assert "loretta-adp" in text and "adazeta" in text and "lamda++ left out" in text


def test_params_counts_a_gguf_file_without_converting_it(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    pytest.importorskip("gguf")
    from test_gguf import write_tiny_gguf

    monkeypatch.setenv("LEANFT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    monkeypatch.setattr(models, "load_model", _no_weights)
    counts = {}
    for model in (str(path), tiny_llama_dir):  # the same shapes: LoRA's count is equal
        cli.main(["params", "--model", model, "--method", "lora", "--json"])
        counts[model] = json.loads(capsys.readouterr().out)["trainable"]
    assert counts[str(path)] == counts[tiny_llama_dir] > 0
    assert not (tmp_path / "cache").exists()


def test_show_ranks_loads_weights_for_lamda_plus_plus_only_and_says_so(tiny_llama_dir, capsys, monkeypatch):
    cli.main(["params", "--model", tiny_llama_dir, "--method", "lamda,lamda++", "--show-ranks", "--rank", "4"])
    text = capsys.readouterr().out
    assert "lamda++ on the real weights (loaded" in text and "lamda++: 4 modules" in text
    monkeypatch.setattr(models, "load_model", _no_weights)
    cli.main(["params", "--model", tiny_llama_dir, "--method", "lamda", "--show-ranks", "--rank", "4"])
    text = capsys.readouterr().out
    assert "meta device, no weights" in text and "lamda: 4 modules, total rank 16" in text


# ---- LoRETTA_adp's input adapters by flag --------------------------------------------------------

def placements(model) -> dict[str, str]:
    return {name: m.placement["default"] for name, m in model.named_modules() if isinstance(m, LorettaAdpLayer)}


def test_input_modules_flag_places_input_adapters(tiny_llama_dir, capsys):
    args = cli.build_parser().parse_args(["train", "--method", "loretta-adp", "--target-modules", "down_proj",
                                          "--input-modules", "gate_proj,up_proj", "--bottleneck", "8"])
    options = cli.train_config(args).method_options
    assert options == {"target_modules": ["down_proj"], "input_modules": ["gate_proj", "up_proj"], "bottleneck": 8}
    placed = placements(methods.apply_method(tiny_llama(), "loretta-adp", "CAUSAL_LM", **options))
    assert {name.split(".")[-1]: p for name, p in placed.items()} == {
        "gate_proj": "input", "up_proj": "input", "down_proj": "output"}
    assert len(placed) == 6  # 3 per layer, as the default placement
    cli.main(["params", "--model", tiny_llama_dir, "--method", "loretta-adp", "--json", "--bottleneck", "8"])
    default = json.loads(capsys.readouterr().out)["trainable"]
    cli.main(["params", "--model", tiny_llama_dir, "--method", "loretta-adp", "--json", "--bottleneck", "8",
              "--target-modules", "down_proj", "--input-modules", "gate_proj,up_proj"])
    assert json.loads(capsys.readouterr().out)["trainable"] == default


def test_input_modules_join_the_default_targets_of_other_architectures():
    opt = placements(methods.apply_method(tiny_opt(), "loretta-adp", "CAUSAL_LM", input_modules=["fc1"], bottleneck=8))
    assert len(opt) == 6 and {(name.split(".")[-1], p) for name, p in opt.items()} == {
        ("fc1", "input"), ("fc2", "output"), ("out_proj", "output")}
    bert = placements(methods.apply_method(tiny_bert(), "loretta-adp", "SEQ_CLS", input_modules=["intermediate.dense"],
                                          bottleneck=8))
    assert sorted(p for name, p in bert.items() if name.endswith("intermediate.dense")) == ["input", "input"]
    assert sum(p == "output" for p in bert.values()) == 4  # the default output.dense adapters stay


def test_an_unknown_input_module_is_named():
    with pytest.raises(ValueError, match=r"input_modules: target module\(s\) \['gate'\] match no module"):
        methods.apply_method(tiny_llama(), "loretta-adp", "CAUSAL_LM", input_modules=["gate"], bottleneck=8)
    with pytest.raises(ValueError, match="does not take option"):
        methods.make_config("lora", "CAUSAL_LM", input_modules=["gate_proj"])
