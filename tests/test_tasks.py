"""leanft.tasks: templates on real benchmark rows, the sampling protocol, users' files, metrics."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest

from leanft.tasks import (
    TASK_NAMES,
    classification_metrics,
    get_task,
    hub_task,
    load_splits,
    score_generation,
    score_instruction,
    user_task,
)
from leanft.tasks.metrics import words

SHIPPED = Path(__file__).parent.parent / "src" / "leanft" / "tasks" / "data"


def everything(name: str) -> list[dict]:
    """The whole validation split in file order (BoolQ: the whole file, nothing held for training)."""
    return load_splits(name, num_train=0, num_dev=0, num_eval=10**6).eval


def find(examples: list[dict], **fields) -> dict:
    (match,) = [ex for ex in examples if all(ex[k] == v for k, v in fields.items())]
    return match


def key(ex: dict) -> str:
    return json.dumps(ex, sort_keys=True)


# ---- templates on real rows ---------------------------------------------------------------------

def test_sst2_template():
    task, ex = get_task("sst2"), everything("sst2")[0]  # "it 's a charming and often affecting journey . \t1"
    assert task.prompt(ex) == "it 's a charming and often affecting journey . It was"
    assert task.candidates(ex) == [" terrible", " great"]
    assert task.label(ex) == 1
    assert task.encoder_text(ex) == ("it 's a charming and often affecting journey .", None)
    assert (task.kind, task.num_labels, task.metric) == ("classification", 2, "accuracy")


def test_rte_template():
    task, ex = get_task("rte"), everything("rte")[0]
    premise = ("Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, "
               "according to the Christopher Reeve Foundation.")
    assert task.prompt(ex) == (premise + "\nDoes this mean that \"Christopher Reeve had an accident.\" is true? "
                               "Yes or No?\n")
    assert task.candidates(ex) == ["Yes", "No"]
    assert task.label(ex) == 1  # not_entailment
    assert task.encoder_text(ex) == (premise, "Christopher Reeve had an accident.")


def test_cb_template():
    task, ex = get_task("cb"), find(everything("cb"), idx=14)
    assert task.prompt(ex) == ("Suppose A: Your turn. B: Okay. Uh, I don't think they should abolish it. "
                               "Can we infer that \"they should abolish it\"? Yes, No, or Maybe?\n")
    assert task.candidates(ex) == ["Yes", "No", "Maybe"]
    assert task.label(ex) == 1  # contradiction
    labels = {task.label(e) for e in everything("cb")}
    assert labels == {0, 1, 2} and task.num_labels == 3


def test_boolq_template():
    task, ex = get_task("boolq"), find(everything("boolq"), idx=2644)
    assert task.prompt(ex) == ("The Punisher (season 2) -- The season is set for release in 2019. "
                               "are they going to make a punisher season 2?")
    assert task.candidates(ex) == [" No", " Yes"]
    assert task.label(ex) == 1
    assert task.encoder_text(ex) == ("are they going to make a punisher season 2",
                                     "The Punisher (season 2) -- The season is set for release in 2019.")


def test_copa_template():
    task, examples = get_task("copa"), everything("copa")
    effect = examples[0]  # "The man turned on the faucet." / effect
    assert task.prompt(effect) == "The man turned on the faucet so"
    assert task.candidates(effect) == [" the toilet filled with water.", " water flowed from the spout."]
    assert task.label(effect) == 1
    cause = find(examples, idx=4)  # "The hamburger meat browned." / cause
    assert task.prompt(cause) == "The hamburger meat browned because"
    assert task.candidates(cause) == [" the cook froze it.", " the cook grilled it."]
    assert task.kind == "multiple_choice" and task.num_labels == 2
    with pytest.raises(ValueError, match="copa needs a decoder LM"):
        task.encoder_text(effect)


def test_copa_premise_with_stray_space():
    # idx 209 of train.jsonl is "The parents forbade their children from watching the movie. " (trailing space)
    splits = load_splits("copa", num_train=1000, num_dev=0, num_eval=0)
    ex = find(splits.train, idx=209)
    assert get_task("copa").prompt(ex) == "The parents forbade their children from watching the movie because"


def test_wsc_template():
    task, ex = get_task("wsc"), everything("wsc")[0]
    assert task.prompt(ex) == (
        "Bernard , who had not told the government official that he was less than 21 when he filed for a "
        "homestead claim, did not consider that he had done anything dishonest. Still, anyone who knew that he "
        "was 19 years old could take his claim away from him .\nIn the previous sentence, does the pronoun "
        "\"him\" refer to anyone? Yes or No?\n")
    assert task.candidates(ex) == ["No", "Yes"] and task.label(ex) == 0
    assert task.encoder_text(ex)[1] == "him -> anyone"


def test_multirc_flattened():
    task, examples = get_task("multirc"), everything("multirc")
    assert len(examples) == 4848  # answer options in val.jsonl
    ex = find(examples, question="Did Susan's sick friend recover?", answer="Yes, she was at Susan's party")
    prompt = task.prompt(ex)
    assert prompt.startswith("Susan wanted to have a birthday party.")
    assert prompt.endswith("sent each friend a thank you card the next week.\nQuestion: Did Susan's sick friend "
                           "recover?\nI found this answer \"Yes, she was at Susan's party\". Is that correct? "
                           "Yes or No?\n")
    assert task.label(ex) == 1 and task.candidates(ex) == ["No", "Yes"]
    assert task.encoder_text(ex)[1] == "Did Susan's sick friend recover? Yes, she was at Susan's party"


def test_e2e_template_and_grouping():
    task, examples = get_task("e2e"), everything("e2e")
    assert len(examples) == 630 and len({ex["mr"] for ex in examples}) == 630
    assert sum(len(ex["refs"]) for ex in examples) == 4693  # every pair of testset_w_refs.csv, once
    ex = examples[0]
    assert task.prompt(ex) == ("Meaning representation: name[Blue Spice], eatType[coffee shop], "
                               "area[city centre]\nDescription:")
    assert task.references(ex) == ["A coffee shop in the city centre area called Blue Spice.",
                                   "Blue Spice is a coffee shop in city centre."]
    assert task.candidates(ex) == [" A coffee shop in the city centre area called Blue Spice."]
    assert (task.kind, task.label(ex), task.num_labels, task.metric) == ("generation", 0, 0, "bleu")
    with pytest.raises(ValueError, match="e2e needs a decoder LM"):
        task.encoder_text(ex)


def test_unknown_task_suggests_closest():
    with pytest.raises(ValueError, match=r"unknown task 'sst-2'.*sst2, rte.*did you mean 'sst2'"):
        get_task("sst-2")
    with pytest.raises(ValueError, match="unknown task"):
        load_splits("mnli")


# ---- sampling -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, sizes", [
    ("sst2", (1000, 500, 872)), ("rte", (1000, 500, 277)), ("cb", (150, 100, 56)), ("boolq", (1000, 500, 1000)),
    ("copa", (300, 100, 100)), ("wsc", (454, 100, 104)), ("multirc", (1000, 500, 1000)), ("e2e", (1000, 100, 630)),
])
def test_default_sizes_disjoint_and_reproducible(name, sizes):
    splits = load_splits(name)
    assert (len(splits.train), len(splits.dev), len(splits.eval)) == sizes
    train, dev = {key(ex) for ex in splits.train}, {key(ex) for ex in splits.dev}
    assert not train & dev
    assert load_splits(name) == splits
    other = load_splits(name, seed=1)
    assert [key(ex) for ex in other.train] != [key(ex) for ex in splits.train]
    json.dumps([splits.train, splits.dev, splits.eval])  # plain data, e.g. for logging the exact samples


def test_task_names_all_load():
    assert TASK_NAMES == ("sst2", "rte", "cb", "boolq", "copa", "wsc", "multirc", "e2e")
    for name in TASK_NAMES:
        assert get_task(name).name == name


def test_boolq_train_dev_eval_disjoint():
    splits = load_splits("boolq", seed=3)
    ids = [{ex["idx"] for ex in part} for part in (splits.train, splits.dev, splits.eval)]
    assert [len(i) for i in ids] == [1000, 500, 1000]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    rest = load_splits("boolq", num_eval=10**6).eval
    assert len(rest) == 3270 - 1500  # eval is everything not sampled for training


def test_e2e_train_pairs_and_dev_mrs_disjoint():
    splits = load_splits("e2e", seed=2)
    assert all(ex["ref"] in ex["refs"] for ex in splits.train)
    assert len({ex["mr"] for ex in splits.train}) > 100  # pairs of many MRs, not 1000 refs of a few
    assert not {ex["mr"] for ex in splits.train} & {ex["mr"] for ex in splits.dev}
    assert len({ex["mr"] for ex in splits.dev}) == 100


def test_sizes_zero_and_too_large():
    splits = load_splits("cb", num_train=0, num_dev=0, num_eval=0)
    assert (splits.train, splits.dev, splits.eval) == ([], [], [])
    splits = load_splits("rte", num_train=10**6, num_dev=10, num_eval=10**6)
    assert (len(splits.train), len(splits.dev), len(splits.eval)) == (2480, 10, 277)
    assert len(load_splits("cb", num_dev=30).train) == 220  # an explicit dev size is kept
    with pytest.raises(ValueError, match="num_train"):
        load_splits("cb", num_train=-1)


def test_data_dir_and_env_override(tmp_path, monkeypatch):
    (tmp_path / "CB").mkdir()
    rows = [{"premise": f"p{i}", "hypothesis": f"h{i}", "label": "neutral", "idx": i} for i in range(5)]
    for split in ("train", "val"):
        (tmp_path / "CB" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits = load_splits("cb", num_dev=2, data_dir=tmp_path)
    assert (len(splits.train), len(splits.dev), len(splits.eval)) == (3, 2, 5)
    monkeypatch.setenv("LEANFT_DATA", str(tmp_path))
    assert load_splits("cb", num_dev=2) == splits
    with pytest.raises(FileNotFoundError, match="LEANFT_DATA"):
        load_splits("rte")


def test_shipped_data_matches_checksums():
    lines = (SHIPPED / "SHA256SUMS").read_text().splitlines()
    assert len(lines) == 15
    for line in lines:
        digest, name = line.split("  ")
        assert hashlib.sha256((SHIPPED / name).read_bytes()).hexdigest() == digest, name
        assert f"`{name}`" in (SHIPPED / "SOURCES.md").read_text()


# ---- users' own files ---------------------------------------------------------------------------

def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_user_csv_with_template_and_label_words(tmp_path):
    rows = "".join(f'"review {i}, with a comma",{"pos" if i % 2 else "neg"}\n' for i in range(20))
    train = write(tmp_path / "reviews.csv", "review,label\n" + rows)
    task, splits = user_task(train, text_columns=["review"], label_column="label",
                             template="{review} Overall it was", label_words=[" bad", " good"], num_dev=3)
    assert (len(splits.train), len(splits.dev), len(splits.eval)) == (13, 3, 4)  # eval: 20% held out
    ex = {"review": "review 1, with a comma", "label": "pos"}
    assert task.prompt(ex) == "review 1, with a comma Overall it was"
    assert task.candidates(ex) == [" bad", " good"] and task.label(ex) == 1  # sorted: neg, pos
    assert task.encoder_text(ex) == ("review 1, with a comma", None)
    keys = [key(e) for e in splits.train + splits.dev + splits.eval]
    assert len(set(keys)) == 20
    assert user_task(train, text_columns=["review"], label_column="label", num_dev=3)[1] == splits


def test_user_tsv_pair_default_template(tmp_path):
    train = write(tmp_path / "train.tsv", 'a\tb\ty\n"quoted" start\tsecond\tyes\nx\tz\tno\n')
    evalf = write(tmp_path / "dev.tsv", "a\tb\ty\nq\tr\tno\n")
    task, splits = user_task(train, evalf, text_columns=["a", "b"], label_column="y")
    assert splits.train[0]["a"] == '"quoted" start'  # TSV is not quoted
    assert task.prompt(splits.eval[0]) == "q\nr\nAnswer:"
    assert task.candidates(splits.eval[0]) == [" no", " yes"] and task.label(splits.eval[0]) == 0
    assert task.encoder_text(splits.eval[0]) == ("q", "r")
    assert task.name == tmp_path.name and task.num_labels == 2  # train.tsv: named after its folder


def test_user_jsonl_numeric_labels(tmp_path):
    rows = [{"text": f"t{i}", "stars": s} for i, s in enumerate([2, 10, 1, 2, 10, 1])]
    train = write(tmp_path / "data.jsonl", "".join(json.dumps(r) + "\n" for r in rows) + "\n")
    task, splits = user_task(train, text_columns=["text"], label_column="stars")
    assert task.candidates(rows[0]) == [" 1", " 2", " 10"]  # numeric order, not "1" < "10" < "2"
    assert [task.label(r) for r in rows] == [1, 2, 0, 1, 2, 0]
    assert len(splits.eval) == 1 and len(splits.train) == 5


def _labelled_csv(path: Path, labels: list[str]) -> Path:
    return write(path, "text,label\n" + "".join(f"row {i},{y}\n" for i, y in enumerate(labels)))


@pytest.mark.parametrize("files, kwargs, expected", [
    ({"reviews.csv": "text,labels\nok,pos\n"}, {},
     r"reviews\.csv line 1 \(header\): no column 'label'; columns are \['text', 'labels'\]"),
    ({"data.jsonl": '{"text": "a", "label": 1}\n' * 4 + '{"text": "b", "label": 1\n'}, {},  # "}" missing at 25
     r"data\.jsonl line 5, column 25: not valid JSON: Expecting ',' delimiter"),
    ({"data.jsonl": '{"text": "a", "label": 1}\n{"text": "b" "label": 1}\n'}, {},
     r"data\.jsonl line 2, column 14: not valid JSON"),
    ({"data.jsonl": '{"text": "a", "label": 1}\n{"label": 0}\n'}, {},
     r"data\.jsonl line 2: no column 'text'"),
    ({"empty.csv": ""}, {}, r"empty\.csv: empty file"),
    ({"header_only.csv": "text,label\n"}, {}, r"header_only\.csv: empty file"),
    ({"empty.jsonl": "\n\n"}, {}, r"empty\.jsonl: empty file"),
    ({"blank.csv": "text,label\nok,pos\n  ,neg\n"}, {}, r"blank\.csv line 3, column 'text': empty text"),
    ({"short.csv": "text,label\nok,pos\nmissing label\n"}, {}, r"short\.csv line 3, column 'label': missing"),
    ({"nolabel.csv": "text,label\nok,pos\nfine,\n"}, {}, r"nolabel\.csv line 3, column 'label': empty label"),
    ({"multi.csv": 'text,label\n"two\nlines",pos\n"","neg\n"\n'}, {},  # quoted newlines: the row's first line
     r"multi\.csv line 4, column 'text': empty text"),
    ({"t.csv": "text,label\nok,pos\n"}, {"template": "{txt} It was"},
     r"t\.csv line 1 \(header\): no column 'txt' \(used by the template\)"),
    ({"t.csv": "text,label\nok,pos\n"}, {"template": "{} It was"}, r"name every field"),
    ({"w.csv": "text,label\nok,pos\nbad,neg\n"}, {"label_words": [" yes"]},
     r"w\.csv line 3, column 'label': label 'neg' first appears here, one label too many; "
     r"label_words has 1 words but .*w\.csv has 2 labels: \['neg', 'pos'\]"),
    ({"data.txt": "text,label\nok,pos\n"}, {}, r"data\.txt: unknown file type '\.txt'"),
])
def test_user_errors_name_file_line_and_column(tmp_path, files, kwargs, expected):
    (name, text), = files.items()
    path = write(tmp_path / name, text)
    with pytest.raises(ValueError, match=expected):
        user_task(path, text_columns=["text"], label_column="label", **kwargs)


def test_user_unknown_eval_label(tmp_path):
    train = _labelled_csv(tmp_path / "train.csv", ["positive", "negative"] * 5)
    evalf = _labelled_csv(tmp_path / "eval.csv", ["positive"] * 15 + ["neutral"])  # row 16 is on line 17
    with pytest.raises(ValueError, match=r"eval\.csv line 17, column 'label': unknown label 'neutral'; "
                                         r"known labels: \['negative', 'positive'\]"):
        user_task(train, evalf, text_columns=["text"], label_column="label")


def test_user_eval_file_missing_column(tmp_path):
    train = _labelled_csv(tmp_path / "train.csv", ["a", "b"])
    evalf = write(tmp_path / "eval.csv", "text,gold\nx,a\n")
    with pytest.raises(ValueError, match=r"eval\.csv line 1 \(header\): no column 'label'"):
        user_task(train, evalf, text_columns=["text"], label_column="label")


def test_user_text_columns_count(tmp_path):
    train = _labelled_csv(tmp_path / "train.csv", ["a", "b"])
    with pytest.raises(ValueError, match="1 or 2 columns"):
        user_task(train, text_columns=["text", "text", "text"], label_column="label")


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets is installed")
def test_hub_task_without_datasets():
    with pytest.raises(ImportError, match="pip install datasets"):
        hub_task("glue", config="sst2", text_columns=["sentence"], label_column="label")


def test_hub_task_with_a_stand_in_datasets(monkeypatch):
    """The conversion from a datasets split, offline: a stand-in module with the few attributes used."""
    class ClassLabel:
        def int2str(self, i: int) -> str:
            return ["negative", "positive"][i]

    class Split(list):
        column_names = ["sentence", "label"]
        features = {"label": ClassLabel()}

    def load_dataset(name, config):
        assert (name, config) == ("glue", "sst2")
        return {split: Split({"sentence": f"{split} {i}", "label": i % 2} for i in range(n))
                for split, n in (("train", 30), ("validation", 7))}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    task, splits = hub_task("glue", config="sst2", text_columns=["sentence"], label_column="label",
                            template="{sentence} It was", num_train=20, num_dev=5)
    assert (len(splits.train), len(splits.dev), len(splits.eval)) == (20, 5, 7)
    ex = splits.eval[1]
    assert ex == {"sentence": "validation 1", "label": "positive"}
    assert task.prompt(ex) == "validation 1 It was"
    assert task.candidates(ex) == [" negative", " positive"] and task.label(ex) == 1


# ---- metrics ------------------------------------------------------------------------------------

def test_score_generation():
    refs = [["The Eagle is a cheap coffee shop near Burger King.", "Cheap coffee at The Eagle."],
            ["Blue Spice is a pub in the city centre."]]
    perfect = score_generation(["Cheap coffee at The Eagle.", "Blue Spice is a pub in the city centre."], refs)
    assert perfect["bleu"] == pytest.approx(100) and perfect["rouge_l"] == pytest.approx(100)
    worse = score_generation(["The Eagle sells coffee.", "A pub called Blue Spice is in the centre."], refs)
    assert 0 < worse["bleu"] < 60 and 0 < worse["rouge_l"] < 100
    unrelated = score_generation(["xyz", "qqq"], refs)
    assert unrelated == {"bleu": 0.0, "rouge_l": 0.0}
    with pytest.raises(ValueError, match="2 predictions but 1"):
        score_generation(["a", "b"], [["a"]])


def test_score_generation_rouge_best_reference():
    # one reference matches exactly: ROUGE-L takes the best, not the mean, over references
    assert score_generation(["a b c d"], [["w x y z", "a b c d"]])["rouge_l"] == pytest.approx(100)
    half = score_generation(["a b c d"], [["a b x y"]])["rouge_l"]
    assert half == pytest.approx(50)  # LCS 2 of 4 tokens on both sides


def test_generation_scores_count_the_words_of_any_script():
    """Chinese has no spaces: its characters are the words, for token F1, ROUGE-L and BLEU alike (rouge-score's
    own tokenizer drops every non-ASCII letter, and BLEU's 13a takes a sentence as one word); Hindi's vowel signs
    stay inside their words."""
    assert words("东京是日本的首都。") == list("东京是日本的首都") and words("हिंदी भाषा।") == ["हिंदी", "भाषा"]
    assert words("It's Paris, café!") == ["it", "s", "paris", "café"]
    swapped = score_instruction(["东京是日本的首都"], [["日本的首都是东京"]])
    assert swapped["token_f1"] == pytest.approx(100) and swapped["exact_match"] == 0  # the same characters
    assert swapped["rouge_l"] == pytest.approx(100 * 5 / 8)  # longest common subsequence 日本的首都
    assert 0 < swapped["bleu"] < 100
    same = score_generation(["东京是日本的首都", "大阪有很多好吃的东西"], [["东京是日本的首都"], ["大阪有很多好吃的东西"]])
    assert same == {"bleu": pytest.approx(100), "rouge_l": pytest.approx(100)}


def test_bleu_is_none_where_references_are_too_short_for_it():
    """BLEU matches up to 4-grams: one-word answers score 0 whatever the model says, so it is reported as None;
    token F1, exact match and ROUGE-L still grade them."""
    right = score_instruction(["Paris.", "rome"], [["Paris"], ["Rome"]])
    assert right == {"token_f1": 100.0, "exact_match": 100.0, "bleu": None, "rouge_l": 100.0}
    assert score_generation(["blue", "red"], [["Blue"], ["green"]]) == {"bleu": None, "rouge_l": 50.0}
    assert score_generation(["a b c d"], [["a b c d"]])["bleu"] == pytest.approx(100)  # 4 words: BLEU counts


def test_classification_metrics_by_hand():
    # class 0: F1 1; class 1: tp 1, fp 1 -> 2/3; class 2: tp 1, fn 1 -> 2/3; class 3 absent -> skipped
    got = classification_metrics([0, 1, 1, 2], [0, 1, 2, 2], num_labels=4)
    assert got["accuracy"] == pytest.approx(75)
    assert got["macro_f1"] == pytest.approx(100 * 7 / 9)
    assert classification_metrics([1, 1], [0, 0], 2) == {"accuracy": 0.0, "macro_f1": 0.0}


# ---- token ids made once per run ----------------------------------------------------------------

def _tokenizer(name: str):
    from conftest import tiny_tokenizer

    from leanft import models

    if name == "tiny":
        return tiny_tokenizer()
    try:
        return models.load_tokenizer(name)
    except (OSError, ValueError) as e:
        pytest.skip(f"{name} is not available offline: {e}")


class _Counting:
    """A tokenizer that counts how often it tokenises."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.calls = tokenizer, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def _decoder_tasks(tokenizer, folder: Path) -> list:
    """A task of every decoder kind (classification, multiple choice, generation, instruction, chat when the
    tokenizer has a template), each with a twin of another kind that reads the very same example objects:
    the same prompt and candidates, another choice of what is scored and whether EOS ends it."""
    from dataclasses import replace

    from leanft.tasks import instruction_task

    words = ["it", "was", "great", "terrible", "the", "movie", "a", "film", "with", "story", "yes", "no", "maybe"]
    rows = [{"q": " ".join(words[i % 7:]), "a": " ".join(words[:2 + i % 5]),
             "messages": [{"role": "user", "content": " ".join(words[i % 5:])},
                          {"role": "assistant", "content": " ".join(words[:1 + i % 4])}]} for i in range(16)]
    path = folder / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    found = [(get_task(n), load_splits(n, 10, 4, 10, 0)) for n in ("sst2", "rte", "copa", "e2e")]
    found.append(instruction_task(path, prompt_column="q", completion_column="a", num_dev=4))
    if getattr(tokenizer, "chat_template", None):
        found.append(instruction_task(path, messages_column="messages", tokenizer=tokenizer, num_dev=4))
    other = {"classification": "multiple_choice", "multiple_choice": "classification", "generation": "multiple_choice"}
    return found + [(replace(t, name=f"{t.name}-twin", kind=other[t.kind]), s) for t, s in found]


@pytest.mark.parametrize("name", ["tiny", "smollm2-135m"])
def test_token_ids_made_once_give_the_batches_of_a_fresh_encoding(name, tmp_path):
    """Training steps and evaluations batch ids made once per run (``Tokenized``): after a run has read every
    example, in both tasks that share them and as training and as evaluation read them, each batch is
    bit-identical to tokenising its examples afresh, cut rows included, and nothing is tokenised again."""
    import torch

    from leanft.tasks.collate import Tokenized, encode

    tokenizer = _tokenizer(name)
    runs = _decoder_tasks(tokenizer, tmp_path)
    for max_length in (256 if name == "tiny" else 64, 1024):  # the first cuts prompts from the left
        tokenized = Tokenized(_Counting(tokenizer), max_length, decoder=True)
        cut = []
        for task, splits in runs:
            for examples in (splits.train, splits.dev, splits.eval):
                for training in (True, False):
                    cut += tokenized.cut(task, examples, training)
                    fresh = Tokenized(tokenizer, max_length, decoder=True)
                    assert cut[-len(examples):] == fresh.cut(task, examples, training)
        assert any(cut) == (max_length < 1024)
        made = tokenized.tokenizer.calls
        for task, splits in runs:
            examples = splits.eval[:3] + splits.train[::-1][:5]
            for training in (True, False):
                batch = tokenized.batch(task, examples, training)
                expected = encode(task, examples, tokenizer, max_length, True, training)
                assert list(batch) == list(expected)
                for key, value in expected.items():
                    same = torch.equal(batch[key], value) and batch[key].dtype == value.dtype \
                        if torch.is_tensor(value) else batch[key] == value
                    assert same, (task.name, training, key)
        assert tokenized.tokenizer.calls == made


@pytest.mark.parametrize("name", ["tiny", "minilm-l6"])
def test_encoder_pairs_made_once_are_padded_as_the_tokenizer_pads_a_batch(name):
    """An encoder's batch of ids made once is the tokenizer's own batch of those text pairs (cut from the end,
    padded to the longest), and the rows it reports cut are those longer than ``max_length``."""
    import torch

    from leanft.tasks.collate import Tokenized

    tokenizer = _tokenizer(name)
    for task_name in ("sst2", "rte", "boolq"):
        task, examples = get_task(task_name), load_splits(task_name, 12, 0, 0, 0).train
        tokenized = Tokenized(tokenizer, 48, decoder=False)
        texts = [task.encoder_text(ex) for ex in examples]
        assert tokenized.cut(task, examples) == [len(tokenizer(a, b).input_ids) > 48 for a, b in texts]
        for chunk in (slice(0, 5), slice(3, 12)):
            a, b = zip(*texts[chunk])
            expected = tokenizer(list(a), None if b[0] is None else list(b), truncation=True, max_length=48,
                                 padding=True, return_tensors="pt")
            batch = tokenized.batch(task, examples[chunk], training=True)
            assert list(batch) == [*expected, "labels", "num_labels"]
            assert all(torch.equal(batch[k], v) and batch[k].dtype == v.dtype for k, v in expected.items())
