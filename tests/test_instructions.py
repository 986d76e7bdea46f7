"""Instruction data: prompt/completion and chat files, the answer-only loss, generation metrics, mixtures."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from leanft import cli, evaluate, models, objectives, train
from leanft.config import TrainConfig
from leanft.loading import Loaded, accelerator
from leanft.tasks import instruction_task, load_tasks, render_chat, score_instruction
from leanft.tasks.collate import encode

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def qa_rows(n: int) -> list[dict]:
    return [{"instruction": f"Question {i}: is it great?\nAnswer:", "output": "Yes" if i % 2 else "No, it was terrible."}
            for i in range(n)]


def chat_rows(n: int) -> list[dict]:
    return [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Is {i} great?"},
                          {"role": "assistant", "content": "Yes"}, {"role": "user", "content": "Why?"},
                          {"role": "assistant", "content": f"It was great {i}."}]} for i in range(n)]


@pytest.fixture(scope="module")
def chat_model_dir(tiny_llama_dir, tmp_path_factory) -> str:
    """The tiny LLaMA with a small chat template in its tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-chat") / "model"
    shutil.copytree(tiny_llama_dir, folder)
    tokenizer = models.load_tokenizer(str(folder))
    tokenizer.chat_template = CHAT
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_only_the_completion_tokens_are_scored_and_the_loss_matches_masked_labels(tiny_llama_dir, tmp_path):
    """The scored positions are exactly the completion's tokens (and EOS); the loss equals the causal LM loss
    with every prompt position masked (-100), so nothing on the prompt side can change it."""
    model, tokenizer = models.load_model(tiny_llama_dir)
    rows = [{"instruction": "Is it great?\nAnswer:", "output": "Yes"},
            {"instruction": "Suppose the premise. Can we infer that?", "output": "No, or Maybe. It was terrible."}]
    task, splits = instruction_task(jsonl(tmp_path / "qa.jsonl", rows), jsonl(tmp_path / "ev.jsonl", rows),
                                    prompt_column="instruction", completion_column="output", num_dev=0)
    examples = splits.eval
    assert examples == [{"prompt": r["instruction"], "completion": " " + r["output"]} for r in rows]
    batch = encode(task, examples, tokenizer, max_length=256, decoder=True, training=True)
    net = objectives.network(model, decoder=True)
    losses = []
    for row, ex in enumerate(examples):
        prompt = tokenizer(ex["prompt"]).input_ids
        full = tokenizer(ex["prompt"] + ex["completion"]).input_ids + [tokenizer.eos_token_id]
        assert full[:len(prompt)] == prompt  # no token straddles these boundaries
        mine = batch["rows"] == row
        assert batch["cols"][mine].tolist() == list(range(len(prompt), len(full)))
        assert batch["targets"][mine].tolist() == full[len(prompt):]
        assert tokenizer.decode(full[len(prompt):], skip_special_tokens=True) == ex["completion"]
        labels = torch.tensor([[-100] * len(prompt) + full[len(prompt):]])
        with torch.no_grad():
            losses.append(model(input_ids=torch.tensor([full]), labels=labels).loss)
    with torch.no_grad():
        loss, _ = objectives.batch_loss(net, batch, decoder=True)
    assert loss.item() == pytest.approx(torch.stack(losses).mean().item(), rel=1e-5)


def test_chat_prompt_is_the_template_of_the_messages_before_the_last_assistant_one(tiny_llama_dir, tmp_path):
    tokenizer = models.load_tokenizer(tiny_llama_dir)
    tokenizer.chat_template = CHAT
    rows = chat_rows(10)
    path = jsonl(tmp_path / "chat.jsonl", rows)
    task, splits = instruction_task(path, messages_column="messages", tokenizer=tokenizer, num_dev=2)
    assert (len(splits.train), len(splits.dev), len(splits.eval)) == (6, 2, 2)
    by_completion = {r["messages"][-1]["content"]: r["messages"] for r in rows}
    for ex in splits.train + splits.dev + splits.eval:
        messages = by_completion[ex["completion"]]
        expected = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        assert task.prompt(ex) == expected and expected.endswith("<|user|>Why?\n<|assistant|>")
        assert task.candidates(ex) == task.references(ex) == [messages[-1]["content"]]
    # the same through a run's configuration: the model's own tokenizer renders it
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        load_tasks(TrainConfig(model=tiny_llama_dir, train_file=str(path), messages_column="messages"))


def test_a_template_bos_is_dropped_when_the_tokenizer_adds_its_own():
    class Stub:
        bos_token, bos_token_id = "<s>", 1

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return "<s>[INST] " + messages[-1]["content"] + " [/INST]"

        def __call__(self, text):
            return type("Encoding", (), {"input_ids": [1]})()

    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert render_chat(Stub(), messages, "f line 1", "messages") == ("[INST] hi [/INST]", "hello")


RAISES = "{{ raise_exception('roles must alternate') }}"


@pytest.mark.parametrize("name, text, columns, expected", [
    ("x.jsonl", ['{"instruction": "a", "output": "b"}', '{"instruction": "a", "output": "b"',], "qa",
     r"x\.jsonl line 2, column 35: not valid JSON"),
    ("x.jsonl", ['{"instruction": "a", "output": "b"}', '{"instruction": "a"}'], "qa",
     r"x\.jsonl line 2: no column 'output'; columns are \['instruction'\]"),
    ("x.csv", ["instruction,answer", "a,b"], "qa", r"x\.csv line 1 \(header\): no column 'output'"),
    ("x.csv", ["instruction,output", "a,b", "c,  "], "qa", r"x\.csv line 3, column 'output': empty completion"),
    ("x.jsonl", ['{"instruction": "", "output": "b"}'], "qa", r"x\.jsonl line 1, column 'instruction': empty text"),
    ("x.jsonl", ['{"instruction": ["a"], "output": "b"}'], "qa",
     r"x\.jsonl line 1, column 'instruction': expected text, got list"),
    ("x.csv", ["id,messages", '1,"[{""role"": ""user""}"'], "chat", r"x\.csv line 2, column 'messages': not valid JSON"),
    ("x.jsonl", ['{"messages": [{"role": "user", "content": "hi"}]}'], "chat",
     r"x\.jsonl line 1, column 'messages': no assistant message"),
    ("x.jsonl", [('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, '
                  '{"role": "user", "content": "c"}]}')], "chat",
     r"x\.jsonl line 1, column 'messages': message 3 \(user\) follows the last assistant message"),
    ("x.jsonl", ['{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
                 '{"messages": [{"content": "b"}]}'], "chat",
     r"x\.jsonl line 2, column 'messages': message 1 has no text 'role'"),
    ("x.jsonl", ['{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]}'], "chat",
     r"x\.jsonl line 1, column 'messages': empty completion \(the last assistant message\)"),
    ("x.jsonl", ['{"messages": [{"role": "assistant", "content": "a"}]}'], "chat",
     r"x\.jsonl line 1, column 'messages': no message before the assistant's, so no prompt"),
    ("x.jsonl", ['{"messages": "hello"}'], "chat", r"x\.jsonl line 1, column 'messages': not valid JSON"),
    ("x.jsonl", ['{"text": "hello"}'], "chat", r"x\.jsonl line 1: no column 'messages'"),
    ("x.jsonl", ['{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}'],
     "refusing", r"x\.jsonl line 1, column 'messages': the chat template refused these messages: roles must alternate"),
])
def test_malformed_files_name_the_file_line_and_column(tiny_llama_dir, tmp_path, name, text, columns, expected):
    tokenizer = models.load_tokenizer(tiny_llama_dir)
    tokenizer.chat_template = RAISES if columns == "refusing" else CHAT
    kw = ({"prompt_column": "instruction", "completion_column": "output"} if columns == "qa"
          else {"messages_column": "messages", "tokenizer": tokenizer})
    path = tmp_path / name
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=expected):
        instruction_task(path, **kw)


def test_instruction_columns_are_checked_by_the_config(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        TrainConfig(messages_column="m", prompt_column="p", completion_column="c")
    with pytest.raises(ValueError, match="go together"):
        TrainConfig(prompt_column="p")
    with pytest.raises(ValueError, match="text_columns, label_column do not apply to instruction data"):
        TrainConfig(prompt_column="p", completion_column="c", text_columns=["t"], label_column="y")
    path = jsonl(tmp_path / "qa.jsonl", qa_rows(10))
    with pytest.raises(ValueError, match=r"qa\.jsonl: no training rows left of 10 after 8 dev and 2 held-out eval "
                                         r"rows; lower num_dev"):
        instruction_task(path, prompt_column="instruction", completion_column="output", num_dev=8)
    with pytest.raises(ValueError, match=r"task name\(s\) \['qa'\] appear more than once"):
        load_tasks(TrainConfig(task=f"{path},{path}", prompt_column="instruction", completion_column="output",
                               num_dev=2))


def test_score_instruction_by_hand():
    scores = score_instruction(["Paris.", "the big red dog", "", "x"], [["paris"], ["a big dog"], [""], ["y", "x"]])
    # F1: 1; precision 2/4, recall 2/3 -> 4/7; both empty: 1; best reference: 1
    assert scores["token_f1"] == pytest.approx(100 * (1 + 4 / 7 + 1 + 1) / 4)
    assert scores["exact_match"] == pytest.approx(75.0)
    assert list(scores) == ["token_f1", "exact_match", "bleu", "rouge_l"] and 0 <= scores["rouge_l"] <= 100


@pytest.mark.slow
def test_instruction_file_trains_end_to_end_through_the_cli(tiny_llama_dir, tmp_path, capsys):
    path = jsonl(tmp_path / "qa.jsonl", qa_rows(30))
    out = tmp_path / "run"
    cli.main(["train", "--model", tiny_llama_dir, "--train-file", str(path), "--prompt-column", "instruction",
              "--completion-column", "output", "--max-steps", "2", "--batch-size", "4", "--num-dev", "4",
              "--eval-every", "2", "--max-new-tokens", "6", "--max-length", "64", "--lr", "1e-2",
              "--output-dir", str(out), "--rank", "2", "--tt-rank", "2"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tasks"] == ["qa"] and metrics["steps"] == 2
    for scores in (metrics["eval"]["qa"], metrics["eval_before"]["qa"]):
        assert list(scores) == ["token_f1", "exact_match", "bleu", "rouge_l", "loss", "perplexity"]
        assert all(0 <= scores[k] <= 100 for k in ("token_f1", "exact_match", "rouge_l"))
        assert scores["loss"] > 0 and scores["perplexity"] == pytest.approx(math.exp(scores["loss"]))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in rows) and "token_f1" in rows[-1]["dev"]["qa"]
    capsys.readouterr()
    cli.main(["eval", "--adapter", str(out / "best"), "--train-file", str(path), "--prompt-column", "instruction",
              "--completion-column", "output", "--num-dev", "4", "--max-new-tokens", "6", "--max-length", "64"])
    assert json.loads(capsys.readouterr().out)["qa"] == pytest.approx(metrics["eval"]["qa"])


def long_and_short_rows(n: int) -> list[dict]:
    """Every third prompt far beyond 40 tokens, the others far below."""
    return [{"instruction": ("It was great. Does this mean that the movie is good? " * (12 if i % 3 == 0 else 0))
             + f"Question {i}?\nAnswer:", "output": "Yes"} for i in range(n)]


@pytest.mark.slow
def test_long_prompts_are_cut_alike_counted_once_and_every_answer_saved(tiny_llama_dir, tmp_path, capsys):
    """Prompts too long for --max-length are cut from the left in training and evaluation alike; the run says how
    many rows of each split once and records them in metrics.json; each eval row's output is saved, by
    ``leanft train`` next to the metrics and by ``leanft eval`` in the adapter's folder."""
    train_file, eval_file = jsonl(tmp_path / "qa.jsonl", long_and_short_rows(12)), jsonl(tmp_path / "qa_eval.jsonl",
                                                                                         long_and_short_rows(6))
    out = tmp_path / "run"
    flags = ["--train-file", str(train_file), "--eval-file", str(eval_file), "--prompt-column", "instruction",
             "--completion-column", "output", "--num-dev", "2", "--max-new-tokens", "8", "--max-length", "40"]
    cli.main(["train", "--model", tiny_llama_dir, *flags, "--max-steps", "2", "--batch-size", "4", "--eval-every", "2",
              "--no-eval-before", "--output-dir", str(out), "--rank", "2", "--tt-rank", "2"])
    printed = capsys.readouterr().out
    [(_, splits)] = load_tasks(TrainConfig(train_file=str(train_file), eval_file=str(eval_file),
                                           prompt_column="instruction", completion_column="output", num_dev=2))
    long = {split: sum(len(ex["prompt"]) > 200 for ex in getattr(splits, split)) for split in ("train", "dev", "eval")}
    assert long["train"] and long["eval"] == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["truncated"] == {"qa": long}
    line = (f"qa: {long['train']} of 10 train, {long['dev']} of 2 dev, 2 of 6 eval rows are longer than --max-length "
            "40 tokens (with --max-new-tokens 8 when generating); their prompts are cut from the left")
    assert line.replace(", 0 of 2 dev", "") in printed and printed.count("are longer than --max-length") == 1
    rows = [json.loads(r) for r in (out / "predictions-qa-eval.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["index"] for r in rows] == list(range(6)) and [r["input"] for r in rows] == [ex["prompt"] for ex in
                                                                                           splits.eval]
    assert all(r["references"] == [" Yes"] and isinstance(r["prediction"], str) and r["loss"] > 0 for r in rows)
    scores = metrics["eval"]["qa"]
    assert 100 * sum(r["token_f1"] for r in rows) / 6 == pytest.approx(scores["token_f1"])
    assert 100 * sum(r["rouge_l"] for r in rows) / 6 == pytest.approx(scores["rouge_l"])
    assert scores["bleu"] is None  # one-word answers: BLEU-4 measures nothing
    cli.main(["eval", "--adapter", str(out / "best"), *flags])
    captured = capsys.readouterr()
    assert json.loads(captured.out)["qa"] == pytest.approx(scores)
    assert "qa: 2 of 6 eval rows are longer than --max-length 40" in captured.err
    assert (out / "best" / "predictions-qa-eval.jsonl").read_text() == (out / "predictions-qa-eval.jsonl").read_text()


def test_generation_reads_the_prompt_cut_to_leave_room_for_the_new_tokens(tiny_llama_dir, tmp_path, monkeypatch):
    model, tokenizer = models.load_model(tiny_llama_dir)
    task, splits = instruction_task(jsonl(tmp_path / "qa.jsonl", long_and_short_rows(3)), prompt_column="instruction",
                                    completion_column="output", num_dev=0, num_eval=None)
    cfg = TrainConfig(model=tiny_llama_dir, max_length=40, max_new_tokens=8)
    run = Loaded(model, objectives.network(model, True), tokenizer, True, accelerator(), cfg)
    seen, generate = [], model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: seen.append(kw) or generate(**kw))
    examples = [{"prompt": r["instruction"], "completion": " Yes"} for r in long_and_short_rows(2)]
    evaluate.generate(run, task, examples)
    ids, mask = seen[0]["input_ids"], seen[0]["attention_mask"]
    assert ids.shape[1] == 32  # 40 - 8 new tokens
    assert ids[0].tolist() == tokenizer(examples[0]["prompt"]).input_ids[-32:]  # the long one: its end
    short = tokenizer(examples[1]["prompt"]).input_ids
    assert ids[1, -len(short):].tolist() == short and mask[1].sum() == len(short)  # left-padded, whole
    assert evaluate.report_truncation(run, [(task, splits)]) == {"qa": {"train": 1, "dev": 0, "eval": 0}}


@pytest.mark.parametrize("settings, message", [
    ({"max_length": 4096}, r"--max-length 4096 is beyond the context of .* \(2048 tokens, its max_position_embeddings"
                           r"\): give --max-length 2048 or less"),
    ({"max_length": 64, "max_new_tokens": 64}, r"task qa: --max-new-tokens 64 leaves no room for a prompt in "
                                               r"--max-length 64; raise --max-length or lower --max-new-tokens"),
    ({"max_length": 12, "max_new_tokens": 2}, r"task qa: the answer ' A long answer.*' is \d+ tokens, which leaves no "
                                              r"room for its prompt in --max-length 12; raise --max-length above"),
])
def test_what_cannot_fit_is_refused_saying_what_to_change(tiny_llama_dir, tmp_path, settings, message):
    rows = [{"instruction": "Question?", "output": "A long answer: it was great, it was terrible, so the movie."}] * 6
    task, splits = instruction_task(jsonl(tmp_path / "qa.jsonl", rows), prompt_column="instruction",
                                    completion_column="output", num_dev=0)
    model, tokenizer = models.load_model(tiny_llama_dir)
    run = Loaded(model, objectives.network(model, True), tokenizer, True, accelerator(),
                 TrainConfig(model=tiny_llama_dir, **settings))
    with pytest.raises(ValueError, match=message):
        evaluate.report_truncation(run, [(task, splits)])


@pytest.mark.slow
def test_chat_file_and_a_builtin_task_train_in_one_mixture(chat_model_dir, tmp_path, monkeypatch):
    path = jsonl(tmp_path / "chat.jsonl", chat_rows(20))
    seen = []
    batches = train.task_batches

    def recording(items, *args, **kwargs):
        seen.append({ti for ti, _ in items})
        return batches(items, *args, **kwargs)

    monkeypatch.setattr(train, "task_batches", recording)
    cfg = TrainConfig(model=chat_model_dir, method="lora", task=f"sst2,{path}", messages_column="messages",
                      num_train=12, num_dev=2, num_eval=4, max_steps=3, batch_size=8, eval_every=3, eval_before=False,
                      max_new_tokens=4, max_length=96, lr=1e-2, output_dir=str(tmp_path / "run"),
                      method_options={"rank": 2})
    metrics = train.train(cfg)
    assert metrics["tasks"] == ["sst2", "chat"]
    assert set(metrics["eval"]["sst2"]) == {"accuracy", "macro_f1"}
    assert set(metrics["eval"]["chat"]) == {"token_f1", "exact_match", "bleu", "rouge_l", "loss", "perplexity"}
    assert {0, 1} <= set().union(*seen) and any(s == {0, 1} for s in seen)  # mixed micro-batches
