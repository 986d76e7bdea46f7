import json
from dataclasses import replace

import pytest
import torch
from conftest import forked, tiny_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from leanft import cli, objectives, system, train
from leanft.measure import bench, budget, report, steps


def test_step_times_cover_first_and_zeroth_order_methods(tiny_llama_dir):
    result = steps.step_times(tiny_llama_dir, "sst2", ["lora", "mezo-lora"], batch_size=2, steps=2, queries=(1, 3))
    assert [(r["method"], r["queries"]) for r in result["rows"]] == [("lora", None), ("mezo-lora", 1), ("mezo-lora", 3)]
    assert all(r["step_s"] > 0 and r["trainable"] > 0 for r in result["rows"])


def test_step_times_time_lamda_before_and_after_freezing(tiny_llama_dir):
    rows = steps.step_times(tiny_llama_dir, "sst2", ["lamda"], batch_size=2, steps=2)["rows"]
    assert [r["method"] for r in rows] == ["lamda", "lamda (P_B frozen)"]
    assert rows[1]["trainable"] < rows[0]["trainable"]


@pytest.fixture(scope="module")
def small_llama_dir(tmp_path_factory) -> tuple[str, float]:
    """A random LLaMA big enough (19 MB of fp32 weights) that its optimiser state stands out of the RSS noise
    of a step on CPU (about 15-45 MB of activations and allocator slack); the folder and its weight MB."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                                         pad_token_id=0, bos_token_id=1, eos_token_id=2))
    path = tmp_path_factory.mktemp("small-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path), sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def working_mb(model_dir: str, method: str, mode: str) -> float:
    """``peak - baseline`` of one step, measured in this process, which earlier tests have used."""
    row = steps.memory_child(model_dir, method, mode, "sst2", 2, 1)
    assert row["mode"] == mode and row["method"] == method
    return row["peak_mb"] - row["baseline_mb"]


@pytest.mark.slow
def test_memory_child_measures_the_optimiser_state_of_the_step(small_llama_dir):
    """AdamW on every weight keeps a gradient and two moments of each, 3x the weights, which LoRA does not;
    a MeZO step on LoRA keeps no gradient nor state. Fails if the peak misses the step (a baseline taken after
    it, a sampler stopped before it) or if the optimiser state is built into the baseline."""
    model_dir, weight_mb = small_llama_dir
    full = working_mb(model_dir, "full", "first-order")
    lora = working_mb(model_dir, "lora", "first-order")
    mezo = working_mb(model_dir, "mezo-lora", "zo")
    assert full - lora >= 2 * weight_mb, (full, lora, weight_mb)
    assert mezo < full, (mezo, full)


@pytest.mark.slow
def test_memory_child_frozen_mode_trains_lamda_with_p_b_frozen(tiny_llama_dir):
    training = steps.memory_child(tiny_llama_dir, "lamda", "first-order", "sst2", 2, 1)
    frozen = steps.memory_child(tiny_llama_dir, "lamda", "frozen", "sst2", 2, 1)
    assert frozen["trainable"] < training["trainable"]  # P_B has left the trainable set


def test_report_tables_runs_with_zero_shot_and_ratio_to_lora(tmp_path):
    def run(method, trainable, acc):
        return {"model": "m", "method": method, "tasks": ["sst2"], "eval": {"sst2": {"accuracy": acc}},
                "eval_before": {"sst2": {"accuracy": 50.0}}, "trainable": trainable, "peak_memory_mb": 100.0,
                "time_per_step_s": 1.0, "steps": 10, "wall_time_s": 20.0, "config": {"num_train": 8, "num_eval": 4},
                "trainable_at_end": trainable // 2, "parameter_updates": trainable * 7}
    files = []
    for method, trainable, acc in [("lora", 400, 80.0), ("loretta-rep", 100, 81.0)]:
        files.append(tmp_path / f"{method}.json")
        files[-1].write_text(json.dumps(run(method, trainable, acc)))
    text = report.report(files)
    assert "| zero-shot | 50.0 |" in text and "| loretta-rep | 81.0 | 100 | 0.250x | 50 | 700 |" in text


def test_plot_runs_draws_loss_against_forward_passes_and_names_a_missing_log(tmp_path):
    for method in ("mezo-lora", "adazeta"):
        (tmp_path / f"{method}.json").write_text(json.dumps({"method": method}))
        rows = [{"step": i, "loss": 1.0 / (i + 1), "forwards": 2 * (i + 1)} for i in range(40)]
        (tmp_path / f"{method}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report.plot_runs([tmp_path / "mezo-lora.json", tmp_path / "adazeta.json"], tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "adazeta.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="adazeta.jsonl"):
        report.plot_runs([tmp_path / "adazeta.json"], tmp_path / "x.png")


def test_budget_overrides_change_only_what_they_name_and_bad_ones_are_refused():
    quick = budget.parse_budget("quick")
    assert budget.parse_budget("quick,forwards=600,epochs=2.5") == replace(quick, forwards=600, epochs=2.5)
    assert budget.parse_budget("train=10") == replace(budget.parse_budget("standard"), train=10)
    with pytest.raises(ValueError, match="even"):
        budget.parse_budget("smoke,forwards=7")
    with pytest.raises(ValueError, match="bad budget entry 'lr=1'"):
        budget.parse_budget("quick,lr=1")
    with pytest.raises(ValueError, match="unknown budget 'fast'"):
        budget.parse_budget("fast")


def test_plan_runs_defaults_then_the_rank_sweep_without_repeating_the_default():
    plan = bench.bench_plan(["sst2"], ["full", "lora", "loretta-adp"], [2, 8], ["lora", "loretta-adp"], "CAUSAL_LM")
    assert [r["slug"] for r in plan] == ["full", "lora", "lora-r2", "loretta-adp", "loretta-adp-tt2",
                                         "loretta-adp-tt8"]
    assert plan[2]["options"] == {"rank": 2} and plan[1]["options"] == {} and plan[1]["rank"] == 8


def print_memory(args: tuple, kwargs: dict) -> None:
    print(json.dumps(steps.memory_child(*args, **kwargs)))


@pytest.fixture
def forked_children(monkeypatch, tmp_path):
    """The bench's children (each run, each memory measurement: a fresh interpreter each, so that no two peaks
    mix) as forks of a process that has torch and transformers imported (``conftest.forked``): the bench's own
    logic, without seconds of imports per child."""
    from leanft import cli

    def run_child(argv: list[str], log) -> int:
        status = forked(cli.main, ["train", *argv], out=log)
        print(log.read_text())  # shown, as the real one shows its child's output
        return status

    def in_fresh_process(*args, **kwargs) -> dict:
        out, err = tmp_path / "memory.out", tmp_path / "memory.err"
        if forked(print_memory, args, kwargs, out=out, err=err):
            raise RuntimeError((err.read_text().strip().splitlines() or ["no output"])[-1])
        return json.loads(out.read_text().strip().splitlines()[-1])

    monkeypatch.setattr(bench, "run_child", run_child)
    monkeypatch.setattr(steps, "in_fresh_process", in_fresh_process)


@pytest.mark.slow
def test_the_benchs_children_are_fresh_interpreters_whose_failures_come_back(tmp_path, capsys):
    """What the forks above stand in for: a run in its own ``leanft train`` process, its output shown and kept,
    its exit status returned; a memory measurement in its own interpreter, its error's last line raised."""
    status = bench.run_child(["--model", "no-such-model"], tmp_path / "output.log")
    said = (tmp_path / "output.log").read_text()
    assert status == 1 and "unknown model 'no-such-model'" in said and said in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="unknown model 'no-such-model'"):
        steps.in_fresh_process("no-such-model", "lora", "first-order", "sst2", 2, 1)


@pytest.mark.slow
def test_bench_on_a_tiny_model_writes_results_report_and_plots_and_resumes(tiny_llama_dir, tmp_path, capsys,
                                                                          forked_children):
    out, smoke = tmp_path / "out", budget.parse_budget("smoke")
    results = bench.Bench(tiny_llama_dir, ["sst2"], ["lora", "mezo-lora"], smoke, out, tmp_path / "work",
                          ranks=[2], sweep=["lora"]).run()
    assert [r["bench"]["slug"] for r in results] == ["lora", "lora-r2", "mezo-lora"]
    assert not any(r.get("failed") for r in results)
    assert results[1]["trainable"] < results[0]["trainable"]
    assert results[2]["forward_passes"] == smoke.forwards and results[0]["steps"] == 2  # 8 examples, batch 4
    text = (out / "README.md").read_text()
    assert "## sst2 (accuracy)" in text and "| zero-shot |" in text and "| lora | r=2 |" in text
    assert f"exactly {smoke.forwards} training forward passes" in text and "| mezo-lora |" in text
    assert "Peak memory of one step" in text and "| inference |" in text
    for png in ("accuracy-vs-params-sst2.png", "loss-sst2.png", "zo-convergence-sst2.png", "memory.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG", png
        assert f"({png})" in text
    assert (out / "sst2" / "mezo-lora.jsonl").is_file()
    capsys.readouterr()
    again = bench.Bench(tiny_llama_dir, ["sst2"], ["lora", "mezo-lora"], smoke, out, tmp_path / "work",
                        ranks=[2], sweep=["lora"], memory=False).run()
    assert capsys.readouterr().out.count("done already") == 3 and again == results


def test_report_refuses_results_of_two_machines(tmp_path):
    (tmp_path / "sst2").mkdir()
    system.save({"model": "m", "budget": {}, "runs": ["sst2/a", "sst2/b"], "machine": "x", "dtype": "float32",
                "torch": "2", "date": "d"}, tmp_path / "bench.json")
    for name, machine in (("a", "GPU A"), ("b", "CPU B")):
        system.save({"machine": machine, "tasks": ["sst2"]}, tmp_path / "sst2" / f"{name}.json")
    with pytest.raises(ValueError, match="2 machines .*CPU B; GPU A"):
        report.bench_report(tmp_path)


def test_the_lr_is_chosen_on_dev_never_on_eval(tmp_path):
    """Two lrs: the one better on dev is kept even though eval would have preferred the other."""
    from leanft.measure import tuning

    logs = {}
    for multiplier, dev in ((0.5, [60.0, 70.0]), (2.0, [55.0, 65.0])):  # eval (not given here) favours 2.0
        logs[multiplier] = tmp_path / f"{multiplier}.jsonl"
        logs[multiplier].write_text("".join(json.dumps({"step": i, "dev": {"sst2": {"accuracy": d}}}) + "\n"
                                            for i, d in enumerate(dev)))
    scores = [(m, tuning.best_dev(path)) for m, path in logs.items()]
    assert scores == [(0.5, 70.0), (2.0, 65.0)] and tuning.choose(scores) == 0.5
    assert tuning.choose([(0.5, 70.0), (1.0, 70.0), (2.0, 70.0)]) == 1.0  # a tie keeps the default
    with pytest.raises(ValueError, match="needs a dev set"):
        tuning.choose([(0.5, None)])


def bench_run(model_dir: str, method: str, spent: budget.Budget, out, *extra: str, **run) -> tuple[dict, list[dict]]:
    """One run of a bench with the ``leanft train`` arguments the bench gives it (then ``extra``), trained in
    this process: its metrics and its per-step rows (without their speed)."""
    planned = {**bench.bench_plan(["sst2"], [method], [], [], "CAUSAL_LM")[0], **run}
    argv = bench.train_argv(planned, model_dir, spent, "float32", eval_before=False)
    metrics = train.train(cli.train_config(cli.build_parser().parse_args(["train", *argv, *extra, "--output-dir",
                                                                          str(out)])))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return metrics, [{k: v for k, v in row.items() if k != "examples_per_s"} for row in rows]


@pytest.mark.slow
def test_a_run_repeated_with_its_seed_is_identical_and_another_seed_draws_another_sample(tiny_llama_dir, tmp_path):
    """A bench's numbers can be reproduced: the same seed trains on the same sample in the same order to the
    same losses and the same predictions; another seed (a repeat of the bench) trains on another sample."""
    spent = budget.parse_budget("smoke")
    (first, rows), (again, rows_again), (_, rows_other) = (
        bench_run(tiny_llama_dir, "lora", spent, tmp_path / name, seed=seed) for name, seed in (("a", 3), ("b", 3),
                                                                                                ("c", 4)))
    assert rows == rows_again and first["eval"] == again["eval"]
    predictions = "predictions-sst2-eval.jsonl"
    assert (tmp_path / "a" / predictions).read_text() == (tmp_path / "b" / predictions).read_text()
    assert [r["loss"] for r in rows_other] != [r["loss"] for r in rows]


def test_a_zeroth_order_run_of_a_bench_spends_exactly_its_forward_budget(tiny_llama_dir, tmp_path, monkeypatch):
    """Methods compare at equal compute: a zeroth-order run trains past its epochs until exactly ``forwards``
    training forward passes are spent (counted where the loss is computed; evaluation is not included)."""
    real, calls = objectives.mean_loss, []
    monkeypatch.setattr(objectives, "mean_loss", lambda *args: calls.append(1) or real(*args))
    # a step cap far above the budget: a run that ignored the budget would fail here, not run 1e9 steps
    metrics, rows = bench_run(tiny_llama_dir, "mezo-lora", budget.parse_budget("smoke,forwards=10"), tmp_path,
                              "--max-steps", "50")
    assert metrics["forward_passes"] == len(calls) == rows[-1]["forwards"] == 10
    assert metrics["examples_seen"] > metrics["rows"]["sst2"]["train"]  # more than one epoch of 8 examples


@pytest.mark.slow
def test_bench_tunes_on_dev_repeats_over_seeds_and_reports_mean_and_sd(tiny_llama_dir, tmp_path, forked_children):
    out = tmp_path / "out"
    spent = budget.parse_budget("smoke,dev=4")
    results = bench.Bench(tiny_llama_dir, ["sst2"], ["lora", "mezo-lora"], spent, out, tmp_path / "work",
                          memory=False, lr_grid=[0.5, 2.0], seeds=[0, 1]).run()
    slugs = [r["bench"]["slug"] for r in results]
    chosen = results[0]["bench"]["chosen"]
    assert slugs == ["lora@lr0.5-seed0", "lora@lr2-seed0", f"lora@lr{chosen:g}-seed1",
                     "mezo-lora@lr1-seed0", "mezo-lora@lr1-seed1"]  # no dev set under ZO: no grid
    assert results[2]["lr"] == pytest.approx(5e-4 * chosen) and results[2]["config"]["seed"] == 1
    text = (out / "README.md").read_text()
    assert "tuned and repeated" in text and "| lora |" in text and " ± " in text
    assert (out / "accuracy-vs-params-sst2.png").read_bytes()[:4] == b"\x89PNG"
