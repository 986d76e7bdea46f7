import json
import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from fault_driver import nan_gradient
from safetensors.torch import load_file

from leanft import cli, models, objectives, optim, runfolder, tasks, train
from leanft.config import TrainConfig
from leanft.objectives import CandidateLogProbs, candidate_scores
from leanft.stops import Interrupted
from leanft.tasks.collate import encode_candidates


def tiny_cfg(model_dir: str, out: Path, **kw) -> TrainConfig:
    base = dict(model=model_dir, method="loretta-rep", task="sst2", num_train=24, num_dev=8, num_eval=8,
                max_steps=4, batch_size=4, eval_every=2, eval_before=False, output_dir=str(out), lr=1e-2,
                max_length=64, method_options={"rank": 4, "tt_rank": 2})
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("name,shared", [("sst2", True), ("rte", True), ("cb", False), ("copa", False), ("e2e", False)])
def test_candidate_scoring_matches_full_logits(tiny_llama_dir, name, shared):
    """Each candidate's score is the mean log-probability of its tokens after the prompt, computed from
    the model's full logits on ``prompt + candidate`` (single-token candidates share one sequence)."""
    model, tokenizer = models.load_model(tiny_llama_dir)
    task = tasks.get_task(name)
    examples = tasks.load_splits(name, 3, 0, 0).train
    batch = encode_candidates(task, examples, tokenizer, max_length=1024)
    n_cands = sum(len(task.candidates(ex)) for ex in examples)
    single = all(len(tokenizer(c, add_special_tokens=False).input_ids) == 1 for c in task.candidates(examples[0]))
    assert single == shared  # the tiny tokenizer knows the verbalisers as single tokens
    assert batch["input_ids"].shape[0] == (3 if shared else n_cands)
    with torch.no_grad():
        net = CandidateLogProbs(model)
        scores = candidate_scores(net(*(batch[k] for k in ("input_ids", "attention_mask", "rows", "cols", "targets"))),
                                  batch)
    slot = 0
    for ex in examples:
        prompt = tokenizer(task.prompt(ex)).input_ids
        for cand in task.candidates(ex):
            ids = tokenizer(cand, add_special_tokens=False).input_ids
            if name == "e2e":
                ids = ids + [tokenizer.eos_token_id]
            full = torch.tensor([prompt + ids])
            with torch.no_grad():
                logp = model(input_ids=full).logits.log_softmax(-1)[0]
            expected = logp[len(prompt) - 1 : -1].gather(-1, full[0, len(prompt):, None]).mean()
            torch.testing.assert_close(scores[slot], expected, rtol=1e-4, atol=1e-4)
            slot += 1
    assert slot == n_cands


def test_long_prompts_are_cut_from_the_left_keeping_the_answer(tiny_llama_dir):
    _, tokenizer = models.load_model(tiny_llama_dir)
    task = tasks.get_task("copa")
    ex = tasks.load_splits("copa", 1, 0, 0).train[0]
    n_answer = len(tokenizer(task.candidates(ex)[0], add_special_tokens=False).input_ids)
    batch = encode_candidates(task, [ex], tokenizer, max_length=n_answer + 3)
    assert batch["input_ids"].shape[1] == n_answer + 3 < len(tokenizer(task.prompt(ex)).input_ids)
    targets = batch["targets"][batch["slots"] == 0]
    assert tokenizer.decode(targets) == task.candidates(ex)[0]


def llama2_style_tokenizer(append_eos: bool = False):
    """A SentencePiece-like tokenizer as LLaMA-2 ships it: '▁' prepended and spaces made '▁' by the
    normalizer, so " great" alone is ['▁', '▁great'] but after "It was" it is ['▁great']."""
    import string

    from tokenizers import Tokenizer, decoders, normalizers, processors
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    words = ["▁It", "▁was", "▁great", "▁terrible", "▁the", "▁movie", "▁so", "Yes", "No", "▁Yes", "▁No", "▁A"]
    pieces = ([(p, 0.0) for p in ["<unk>", "<pad>", "<s>", "</s>"]] + [(w, -1.0) for w in words]
              + [(c, -5.0) for c in ["▁", "\n", *".?,:\"[]", *string.ascii_letters]])
    tok = Tokenizer(tok_models.Unigram(pieces, unk_id=0))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>" if append_eos else "<s> $A",
                                                       special_tokens=[("<s>", 2), ("</s>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


SP_EXAMPLES = {
    "sst2": {"sentence": "the movie", "label": 1},
    "rte": {"premise": "the movie", "hypothesis": "It was great", "label": "entailment"},
    "copa": {"premise": "the movie.", "choice1": "The movie.", "choice2": "It was great.", "question": "effect",
             "label": 0},
    "e2e": {"mr": "name[A]", "ref": "A great movie.", "refs": ["A great movie."]},
}


@pytest.mark.parametrize("name", list(SP_EXAMPLES))
def test_candidates_are_scored_as_tokenised_after_the_prompt(name):
    """Every scored token, and the context it is scored in, comes from ``tokenizer(prompt + option)``:
    the tokens the model reads at inference, not those of the option tokenised alone."""
    tokenizer, task, ex = llama2_style_tokenizer(), tasks.get_task(name), SP_EXAMPLES[name]
    assert len(tokenizer) <= 128  # fits the tiny model's vocabulary
    prompt = tokenizer(task.prompt(ex)).input_ids
    eos = [tokenizer.eos_token_id] if name == "e2e" else []
    fulls, spans = [], []
    for cand in task.candidates(ex):
        full = tokenizer(task.prompt(ex) + cand).input_ids + eos
        assert full[:len(prompt)] == prompt  # no token straddles the boundary in these examples
        fulls.append(full), spans.append(full[len(prompt):])
        alone = tokenizer(cand, add_special_tokens=False).input_ids + eos
        assert alone != spans[-1]  # the old way scored tokens the model never sees here
    batch = encode_candidates(task, [ex], tokenizer, max_length=1024)
    assert batch["input_ids"].shape[0] == (1 if name in ("sst2", "rte") else len(fulls))  # one-token answers share
    for row, col, target, slot in zip(*(batch[k].tolist() for k in ("rows", "cols", "targets", "slots"))):
        assert batch["input_ids"][row, :col].tolist() == fulls[slot][:col] and target == fulls[slot][col]
    for j, span in enumerate(spans):
        assert batch["targets"][batch["slots"] == j].tolist() == span
    model = tiny_llama()
    with torch.no_grad():
        scores = candidate_scores(CandidateLogProbs(model)(*(batch[k] for k in ("input_ids", "attention_mask", "rows",
                                                                                 "cols", "targets"))), batch)
        for j, full in enumerate(fulls):
            logp = model(input_ids=torch.tensor([full])).logits.log_softmax(-1)[0]
            expected = logp[len(prompt) - 1:-1].gather(-1, torch.tensor(full[len(prompt):])[:, None]).mean()
            torch.testing.assert_close(scores[j], expected, rtol=1e-4, atol=1e-4)


def test_tokens_straddling_the_prompt_end_belong_to_the_option():
    """A prompt ending mid-word ("It was gr" + "eat") is tokenised differently alone; the merged token
    is the option's, scored after the prompt tokens the joint text keeps."""
    tokenizer = llama2_style_tokenizer()
    task = tasks.Task("partial", "classification", lambda ex: "the movie It was gr", lambda ex: ["eat", "eatgr"],
                      lambda ex: 0, lambda ex: ("", None), 2)
    batch = encode_candidates(task, [{}], tokenizer, max_length=1024)
    great = tokenizer.convert_tokens_to_ids("▁great")
    assert batch["input_ids"].shape[0] == 2  # "eatgr" is three tokens: no shared sequence
    assert batch["targets"][batch["slots"] == 0].tolist() == [great]
    assert batch["input_ids"][0, :batch["cols"][0]].tolist() == tokenizer("the movie It was").input_ids
    single = tasks.Task("partial", "classification", lambda ex: "the movie It was gr", lambda ex: ["eat"],
                        lambda ex: 0, lambda ex: ("", None), 1)
    batch = encode_candidates(single, [{}], tokenizer, max_length=1024)
    assert batch["input_ids"].tolist() == [tokenizer("the movie It was").input_ids]
    assert batch["targets"].tolist() == [great] and batch["cols"].tolist() == [batch["input_ids"].shape[1]]


def test_a_trailing_special_token_is_not_scored_and_an_empty_option_is_an_error():
    tokenizer = llama2_style_tokenizer(append_eos=True)  # "<s> $A </s>"
    task, ex = tasks.get_task("sst2"), SP_EXAMPLES["sst2"]
    batch = encode_candidates(task, [ex], tokenizer, max_length=1024)
    assert tokenizer.convert_ids_to_tokens(batch["targets"].tolist()) == ["▁terrible", "▁great"]
    assert tokenizer.eos_token_id not in batch["input_ids"][0].tolist()
    empty = tasks.Task("blank", "classification", lambda ex: "It was", lambda ex: [" great", ""], lambda ex: 0,
                       lambda ex: ("", None), 2)
    with pytest.raises(ValueError, match=r"task blank: answer option '' adds no tokens"):
        encode_candidates(empty, [{}], llama2_style_tokenizer(), max_length=1024)


@pytest.mark.slow
def test_end_to_end_train_writes_metrics_curves_and_a_loadable_adapter(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "run"
    cli.main(["train", "--model", tiny_llama_dir, "--task", "sst2", "--num-train", "24", "--num-dev", "8",
              "--num-eval", "8", "--max-steps", "4", "--batch-size", "4", "--eval-every", "2", "--lr", "1e-2",
              "--output-dir", str(out), "--rank", "4", "--tt-rank", "2"])
    text = capsys.readouterr().out
    assert "before:" in text and "after:" in text and "trainable parameters" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["eval"]["sst2"]) >= {"accuracy"} and metrics["steps"] == 4
    assert 0 < metrics["trainable"] < metrics["total"] and metrics["peak_memory_mb"] > 0
    assert metrics["examples_per_s"] > 0 and metrics["time_per_step_s"] > 0
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3, 4] and "dev" in lines[1]
    assert (out / "curves.png").stat().st_size > 1000
    assert (out / "best" / "adapter_config.json").is_file()
    cli.main(["eval", "--adapter", str(out / "best"), "--num-eval", "8"])
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["sst2"]["accuracy"] == pytest.approx(metrics["eval"]["sst2"]["accuracy"])


@pytest.mark.slow
@pytest.mark.parametrize("method,options", [("loretta-rep", {"rank": 4, "tt_rank": 2, "dropout": 0.1}),
                                            ("lamda", {"rank": 4, "dropout": 0.1})])
def test_resume_continues_exactly_like_an_uninterrupted_run(tiny_llama_dir, tmp_path, monkeypatch, method, options):
    kw = dict(max_steps=6, eval_every=3, scheduler="linear", method=method, method_options=options)
    train.train(tiny_cfg(tiny_llama_dir, tmp_path / "full", **kw))
    full = load_file(str(tmp_path / "full" / "checkpoint" / "trainable.safetensors"))

    real_save = runfolder.save_checkpoint

    def crash_after_first_save(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(runfolder, "save_checkpoint", crash_after_first_save)
    with pytest.raises(KeyboardInterrupt):
        train.train(tiny_cfg(tiny_llama_dir, tmp_path / "cut", **kw))
    assert json.loads((tmp_path / "cut" / "checkpoint" / "trainer_state.json").read_text())["step"] == 3
    monkeypatch.setattr(runfolder, "save_checkpoint", real_save)
    train.train(tiny_cfg(tiny_llama_dir, tmp_path / "cut", resume=True, **kw))
    resumed = load_file(str(tmp_path / "cut" / "checkpoint" / "trainable.safetensors"))
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
    logged = [[(r["step"], r["loss"]) for r in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines())]
              for d in ("full", "cut")]
    assert logged[0] == logged[1] and len(logged[0]) == 6


def test_nan_loss_is_a_clear_error_and_keeps_the_checkpoint(tiny_llama_dir, tmp_path, monkeypatch):
    real = objectives.batch_loss
    calls = {"n": 0}

    def nan_on_third(net, batch, decoder):
        loss, scores = real(net, batch, decoder)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] >= 3 and net.training else loss), scores

    monkeypatch.setattr(objectives, "batch_loss", nan_on_third)
    with pytest.raises(FloatingPointError, match="loss became nan at step 2.*lower the learning rate"):
        train.train(tiny_cfg(tiny_llama_dir, tmp_path, eval_every=1, num_dev=0))
    assert (tmp_path / "checkpoint" / "trainable.safetensors").is_file()


@pytest.mark.slow
def test_encoder_classification_mixture_and_sequential_forgetting(tiny_bert_dir, tmp_path, capsys):
    mixed = train.train(tiny_cfg(tiny_bert_dir, tmp_path / "mix", method="loretta-adp", task="sst2,cb",
                                 method_options={"bottleneck": 8, "tt_rank": 2}))
    assert set(mixed["eval"]) == {"sst2", "cb"} and mixed["examples_seen"] == 16
    seq = train.train(tiny_cfg(tiny_bert_dir, tmp_path / "seq", method="lora", task="sst2,rte", sequential=True,
                               max_steps=2, method_options={"rank": 2}))
    assert [s["task"] for s in seq["stages"]] == ["sst2", "rte"]
    assert set(seq["stages"][0]["eval"]) == {"sst2"} and set(seq["stages"][1]["eval"]) == {"sst2", "rte"}
    assert set(seq["forgetting"]) == {"sst2", "rte"} and seq["forgetting"]["rte"] == 0
    for stage in (0, 1):  # each stage's adapter, evaluated again as after its stage
        capsys.readouterr()
        cli.main(["eval", "--adapter", str(tmp_path / "seq" / f"stage{stage}" / "best")])
        assert json.loads(capsys.readouterr().out) == seq["stages"][stage]["eval"]


def test_decoder_only_tasks_on_an_encoder_are_a_clear_error(tiny_bert_dir, tmp_path):
    with pytest.raises(ValueError, match=r"\['copa'\] need a decoder LM"):
        train.train(tiny_cfg(tiny_bert_dir, tmp_path, task="copa"))


def test_yaml_config_with_flags_overriding(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("method: lora\nlr: 0.001\nmethod_options: {rank: 4}\ntask: rte\n")
    args = cli.build_parser().parse_args(["train", "--config", str(config), "--lr", "0.01", "--tt-rank", "3"])
    cfg = cli.train_config(args)
    assert (cfg.method, cfg.lr, cfg.task, cfg.method_options) == ("lora", 0.01, "rte", {"rank": 4, "tt_rank": 3})
    config.write_text("methd: lora\n")
    with pytest.raises(ValueError, match=r"unknown configuration key\(s\) \['methd'\]"):
        cli.train_config(cli.build_parser().parse_args(["train", "--config", str(config)]))


@pytest.mark.slow
def test_generation_task_trains_and_is_scored_with_bleu_and_rouge(tiny_llama_dir, tmp_path):
    metrics = train.train(tiny_cfg(tiny_llama_dir, tmp_path, task="e2e", max_steps=2, num_train=8, num_dev=2,
                                   num_eval=3, max_new_tokens=8, max_length=256))
    assert set(metrics["eval"]["e2e"]) == {"bleu", "rouge_l"}
    assert all(0 <= v <= 100 for v in metrics["eval"]["e2e"].values())


@pytest.mark.slow
def test_early_stopping_when_dev_stops_improving(tiny_llama_dir, tmp_path):
    metrics = train.train(tiny_cfg(tiny_llama_dir, tmp_path, lr=1e-12, max_steps=8, eval_every=1, patience=2))
    assert metrics["steps"] == 3  # best at step 1, no improvement at steps 2 and 3


def test_users_csv_file_through_the_cli(tiny_llama_dir, tmp_path, capsys):
    rows = ["review,stars"] + [f"{'great fun' if i % 2 else 'dull and slow'} film {i},{'pos' if i % 2 else 'neg'}"
                               for i in range(30)]
    (tmp_path / "reviews.csv").write_text("\n".join(rows) + "\n")
    cli.main(["train", "--model", tiny_llama_dir, "--train-file", str(tmp_path / "reviews.csv"), "--text-columns",
              "review", "--label-column", "stars", "--label-words", " bad, good", "--template", "{review} It was",
              "--max-steps", "2", "--batch-size", "4", "--num-dev", "4", "--output-dir", str(tmp_path / "run"),
              "--rank", "2", "--tt-rank", "2"])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["tasks"] == ["reviews"] and "accuracy" in metrics["eval"]["reviews"]
    (tmp_path / "bad.csv").write_text("review,score\nnice,1\n")
    with pytest.raises(SystemExit, match="bad.csv.*no column 'stars'"):
        cli.main(["train", "--model", tiny_llama_dir, "--train-file", str(tmp_path / "bad.csv"), "--text-columns",
                  "review", "--label-column", "stars", "--output-dir", str(tmp_path / "bad")])


@pytest.mark.slow
def test_lamda_freezes_p_b_during_training_and_counts_fewer_updates(tiny_llama_dir, tmp_path):
    lamda = train.train(tiny_cfg(tiny_llama_dir, tmp_path / "lamda", method="lamda", max_steps=10, num_dev=0,
                                 method_options={"rank": 4}))
    rows = [json.loads(l) for l in (tmp_path / "lamda" / "metrics.jsonl").read_text().splitlines()]
    s_only = rows[-1]["updated_params"]
    assert rows[0]["updated_params"] > rows[1]["updated_params"] > rows[3]["updated_params"] == s_only  # P_B frozen by 30 %
    assert s_only == 2 * 2 * 4 * 4 == lamda["trainable_at_end"]  # S (r x r) of q and v in 2 layers
    lora = train.train(tiny_cfg(tiny_llama_dir, tmp_path / "lora", method="lora", max_steps=10, num_dev=0,
                                method_options={"rank": 4}))
    assert lamda["parameter_updates"] < lora["parameter_updates"] / 3


def tiny_flags(model_dir: str, out: Path, method: str = "lora") -> list[str]:
    options = ["--rank", "2"] if method == "lora" else ["--bottleneck", "8", "--tt-rank", "2"]
    return ["train", "--model", model_dir, "--method", method, "--num-train", "8", "--num-dev", "4", "--num-eval", "4",
            "--max-steps", "2", "--batch-size", "4", "--eval-every", "2", "--lr", "1e-2", "--no-eval-before",
            "--output-dir", str(out), *options]


@pytest.mark.slow
def test_a_fresh_run_over_another_run_is_refused_and_overwrite_deletes_it_first(tiny_llama_dir, tmp_path, capsys):
    """A LoRETTA_adp run in the folder of a finished LoRA run once replaced its best adapter and checkpoint."""
    out = tmp_path / "run"
    cli.main(tiny_flags(tiny_llama_dir, out, "lora"))
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    with pytest.raises(SystemExit) as refused:
        cli.main(tiny_flags(tiny_llama_dir, out, "loretta-adp"))
    message = str(refused.value)
    assert message.startswith(f"leanft: error: {out} holds another run (checkpoint, best, metrics.json, metrics.jsonl")
    assert f"leanft train --resume --output-dir {out}" in message and "--overwrite" in message
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before  # untouched
    with pytest.raises(SystemExit, match=r"\['nope'\] match no module"):  # a typo with --overwrite loses nothing
        cli.main(tiny_flags(tiny_llama_dir, out) + ["--overwrite", "--target-modules", "q_proj,nope"])
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    (out / "notes.txt").write_text("mine")  # not a run's file: kept
    cli.main(tiny_flags(tiny_llama_dir, out, "loretta-adp") + ["--overwrite"])
    assert json.loads((out / "best" / "leanft_run.json").read_text())["method"] == "loretta-adp"
    assert (out / "notes.txt").read_text() == "mine"
    with pytest.raises(SystemExit, match="resume continues the run in output_dir and overwrite deletes it"):
        cli.main(tiny_flags(tiny_llama_dir, out) + ["--overwrite", "--resume"])


def test_an_output_dir_that_cannot_be_written_is_one_line_naming_it(tiny_llama_dir, tmp_path, monkeypatch):
    """A file, a folder under a file, and an unwritable folder once gave FileExistsError, NotADirectoryError and
    PermissionError tracebacks (the last only after loading and evaluating)."""
    (tmp_path / "taken").write_text("a file")
    for out, says in ((tmp_path / "taken", f"--output-dir {tmp_path / 'taken'} is a file, not a folder"),
                      (tmp_path / "taken" / "run", f"cannot use --output-dir {tmp_path / 'taken' / 'run'}: "
                                                    "[Errno 20] Not a directory")):
        with pytest.raises(SystemExit) as error:
            cli.main(tiny_flags(tiny_llama_dir, out))
        assert str(error.value).startswith(f"leanft: error: {says}")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() != 0:  # root writes anyway: a read-only folder is then simulated below
        with pytest.raises(SystemExit, match=f"leanft: error: cannot use --output-dir {locked}: .*Permission denied"):
            cli.main(tiny_flags(tiny_llama_dir, locked / "run"))

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(SystemExit, match=f"leanft: error: cannot use --output-dir {locked}/run: .*Permission denied"):
        cli.main(tiny_flags(tiny_llama_dir, locked / "run"))


def test_sigint_mid_step_finishes_the_step_checkpoints_it_and_restores_the_handlers(tiny_llama_dir, tmp_path,
                                                                                    monkeypatch):
    """Ctrl-C once raised KeyboardInterrupt mid-step, losing the steps since the last checkpoint (here: all)."""
    import signal

    real_step = optim.FirstOrder.step

    def interrupt_step_3(self, step, epoch, micro_batches):
        result = real_step(self, step, epoch, micro_batches)
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(optim.FirstOrder, "step", interrupt_step_3)
    mine = lambda signum, frame: None  # noqa: E731
    before = signal.signal(signal.SIGTERM, mine), signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(Interrupted) as stopped:
            train.train(tiny_cfg(tiny_llama_dir, tmp_path, max_steps=6, eval_every=50, save_every="0", num_dev=0))
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == (mine, before[1])
    finally:
        signal.signal(signal.SIGTERM, before[0])
    assert (stopped.value.exit_code, stopped.value.step) == (130, 3) and "stopped by SIGINT after step 3" in str(
        stopped.value)
    assert json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["step"] == 3
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    assert cli.resume_command(["train", "--overwrite", "--output-dir", "a b"]) == "leanft train --output-dir 'a b' --resume"


def reviews_csv(path: Path) -> Path:
    rows = ["review,stars"] + [f"{'great fun' if i % 2 else 'dull and slow'} film {i},{'pos' if i % 2 else 'neg'}"
                               for i in range(40)]
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.slow
def test_eval_of_a_run_on_a_users_file_reruns_its_evaluation_without_data_flags(tiny_llama_dir, tmp_path, capsys,
                                                                               monkeypatch):
    """`leanft eval --adapter` once answered "unknown task 'arith'" (or evaluated SST-2) unless every data flag
    was given again: the run's data options are in best/leanft_run.json, its files found from another folder."""
    monkeypatch.chdir(tmp_path)
    reviews_csv(tmp_path / "reviews.csv")
    cli.main(["train", "--model", tiny_llama_dir, "--train-file", "reviews.csv", "--text-columns", "review",
              "--label-column", "stars", "--label-words", " bad, good", "--template", "{review} It was",
              "--num-train", "20", "--num-dev", "4", "--num-eval", "7", "--seed", "3", "--max-steps", "2",
              "--batch-size", "4", "--eval-every", "2", "--lr", "1e-2", "--max-length", "48", "--output-dir", "run",
              "--rank", "2", "--tt-rank", "2"])
    final = json.loads((tmp_path / "run" / "metrics.json").read_text())["eval"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    cli.main(["eval", "--adapter", str(tmp_path / "run" / "best")])
    assert json.loads(capsys.readouterr().out) == final and set(final) == {"reviews"}
    cli.main(["eval", "--adapter", str(tmp_path / "run" / "best"), "--task", "sst2", "--num-eval", "4"])  # flags win
    assert set(json.loads(capsys.readouterr().out)) == {"sst2"}


def test_eval_reruns_an_instruction_run_from_a_file_in_task(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = [{"q": f"add {i} and 1", "a": str(i + 1)} for i in range(16)]
    (tmp_path / "arith.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = train.train(tiny_cfg(tiny_llama_dir, tmp_path / "run", method="lora", task="arith.jsonl",
                                   prompt_column="q", completion_column="a", num_train=12, num_dev=2, num_eval=3,
                                   max_steps=1, max_new_tokens=4, method_options={"rank": 2}))
    monkeypatch.chdir(tmp_path / "run")
    capsys.readouterr()
    cli.main(["eval", "--adapter", "best"])
    evaluated = json.loads(capsys.readouterr().out)
    assert set(evaluated) == {"arith"} and evaluated["arith"] == pytest.approx(metrics["eval"]["arith"])  # same rows


class Affine(torch.nn.Module):
    """``loss = <g_w, w> + <g_b, b>``: the gradient is the batch ``(g_w, g_b)`` itself."""

    def __init__(self) -> None:
        super().__init__()
        self.w, self.b = torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.ones(3))

    @staticmethod
    def loss(net, g) -> torch.Tensor:
        return (g[0] * net.w).sum() + (g[1] * net.b).sum()


def test_gradients_are_clipped_to_max_grad_norm_as_the_trainer_clips():
    """AdamW with weight decay through ``FirstOrder`` against torch's AdamW fed the same gradients clipped by
    ``clip_grad_norm_``, as the HF Trainer does: norms 10 and 2 are clipped to 1, 0.5 is not; 0 turns it off."""
    gen = torch.Generator().manual_seed(0)
    grads = []
    for norm in (10.0, 0.5, 2.0):
        g = (torch.randn(2, 3, generator=gen), torch.randn(3, generator=gen))
        total = torch.cat([t.flatten() for t in g]).norm()
        grads.append(tuple(t * norm / total for t in g))

    def by_hand(max_norm: float) -> Affine:
        model = Affine()
        groups = [{"params": [model.w], "weight_decay": 0.1}, {"params": [model.b], "weight_decay": 0.0}]
        adamw = torch.optim.AdamW(groups, lr=1e-2)
        for gw, gb in grads:
            model.w.grad, model.b.grad = gw.clone(), gb.clone()
            if max_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            adamw.step()
        return model

    for max_norm in (1.0, 0.0):
        model = Affine()
        step = optim.FirstOrder(model, model, Affine.loss, 1e-2, weight_decay=0.1, max_grad_norm=max_norm)
        rows = [step.step(k, 0, [g]) for k, g in enumerate(grads)]
        assert [r["grad_norm"] for r in rows] == pytest.approx([10.0, 0.5, 2.0], rel=1e-5)  # before clipping
        expected = by_hand(max_norm)
        for name in ("w", "b"):
            torch.testing.assert_close(getattr(model, name), getattr(expected, name), rtol=1e-6, atol=1e-7)
    clipped, unclipped = by_hand(1.0), by_hand(0.0)
    assert (clipped.w - unclipped.w).abs().max() > 1e-3  # clipping changes AdamW's update here


def test_a_nan_gradient_behind_a_finite_loss_stops_before_any_update(tiny_llama_dir, tmp_path, monkeypatch):
    """A finite loss whose gradient is NaN (in one tensor) must not update the weights with it: the run stops
    saying so, with the weights and the checkpoint those of the step before."""
    real, seen = objectives.mean_loss, {"calls": 0}

    def nan_gradient_in_step_3(net, batches, decoder):
        loss = real(net, batches, decoder)
        if net.training:
            seen["calls"] += 1
            if seen["calls"] == 3:
                seen["net"] = net
                seen["before"] = {n.removeprefix("model."): p.detach().clone()
                                  for n, p in net.named_parameters() if p.requires_grad}
                return loss + nan_gradient(net)
        return loss

    monkeypatch.setattr(objectives, "mean_loss", nan_gradient_in_step_3)
    with pytest.raises(FloatingPointError, match=r"the gradient became non-finite \(norm nan\) at step 2 with a finite "
                                                 r"training loss [0-9.]+ .*no update was made; every process stops; "
                                                 r"the last good checkpoint is in .*lower the learning rate"):
        train.train(tiny_cfg(tiny_llama_dir, tmp_path, num_dev=0, save_every="1"))
    now = {n.removeprefix("model."): p for n, p in seen["net"].named_parameters() if p.requires_grad}
    assert all(torch.equal(now[n], p) for n, p in seen["before"].items())
    assert json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["step"] == 2
    saved = load_file(str(tmp_path / "checkpoint" / "trainable.safetensors"))
    assert all(torch.equal(saved[n], p) for n, p in seen["before"].items())


def test_float16_keeps_skipping_an_overflowed_step_instead_of_stopping():
    """In float16 an inf/NaN gradient is the loss scaler's signal: that step is skipped and the scale lowered."""
    model = Affine()
    step = optim.FirstOrder(model, model, lambda net, g: Affine.loss(net, g) + nan_gradient(net), 1e-2,
                            scaler=torch.amp.GradScaler("cpu"))
    scale = step.scaler.get_scale()
    row = step.step(0, 0, [(torch.ones(2, 3), torch.ones(3))])
    assert row["skipped"] and row["updated_params"] == 0 and step.scaler.get_scale() < scale
    assert torch.equal(model.w, torch.ones(2, 3)) and torch.equal(model.b, torch.ones(3))


@pytest.mark.parametrize("cfg,message", [
    (dict(max_grad_norm=-1.0), "max_grad_norm must not be negative, got -1.0"),
    (dict(max_grad_norm=float("nan")), "max_grad_norm must not be negative, got nan"),
    (dict(method="mezo-lora", max_grad_norm=0.0), "max_grad_norm applies to first-order \\(AdamW\\) training; a "
                                                  "zeroth-order run has no gradient to clip"),
])
def test_max_grad_norm_that_cannot_apply_is_refused(cfg, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**cfg)


def test_a_repeated_signal_at_once_is_one_stop_and_one_a_moment_later_aborts(monkeypatch):
    """Under torchrun a Ctrl-C reaches each process twice at once (the terminal's, and torchrun's forward): that
    is one request to stop after the step; a signal given again later stops at once."""
    import signal
    from types import SimpleNamespace

    from leanft import stops

    with stops.StopSignals(SimpleNamespace(is_main_process=False, num_processes=1)) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.agreed() == (signal.SIGINT, False)
        monkeypatch.setattr(stops, "REPEAT_S", 0.0)
        with pytest.raises(KeyboardInterrupt, match="SIGINT again: stopped at once"):
            os.kill(os.getpid(), signal.SIGINT)
            sum(range(1000))  # the handler runs between bytecodes
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_zeroth_order_on_an_encoders_new_head_says_it_is_slow_and_what_to_use(tiny_bert_dir, tiny_llama_dir, tmp_path,
                                                                             capsys):
    """Measured on MiniLM SST-2 (BENCHMARKS 14): zeroth-order training of a fresh classification head learns only
    the class prior in thousands of forwards; a user who picks it is told, a decoder's user is not."""
    zo = dict(method="mezo-lora", max_steps=1, method_options={"rank": 2})
    train.train(tiny_cfg(tiny_bert_dir, tmp_path / "encoder", **zo))
    assert "note: zeroth-order training of an encoder's new classification head" in capsys.readouterr().out
    train.train(tiny_cfg(tiny_llama_dir, tmp_path / "decoder", **zo))
    train.train(tiny_cfg(tiny_bert_dir, tmp_path / "first-order", method="lora", max_steps=1, method_options={"rank": 2}))
    assert "classification head" not in capsys.readouterr().out
