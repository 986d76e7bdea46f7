import json

import pytest
import torch
from conftest import tiny_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from leanft.measure import bench, budget, report, steps, system


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


def test_budget_presets_overrides_and_errors():
    assert budget.parse_budget("quick,forwards=600,epochs=2") == budget.Budget(train=400, dev=100, eval=300, epochs=2.0,
                                                                           forwards=600)
    assert budget.parse_budget("train=10") == budget.Budget(train=10)
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


@pytest.mark.slow
def test_bench_on_a_tiny_model_writes_results_report_and_plots_and_resumes(tiny_llama_dir, tmp_path, capsys):
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


def test_cuda_benches_in_bfloat16_and_cpu_in_float32(monkeypatch):
    run = bench.bench_plan(["sst2"], ["lora"], [], [], "CAUSAL_LM")[0]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert budget.default_dtype() == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert budget.default_dtype() == "float32"
    argv = bench.train_argv(run, "m", budget.Budget(), budget.default_dtype(), eval_before=True)
    assert argv[argv.index("--dtype") + 1] == "float32" and argv[-1] == "--eval-before"


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


def test_seeds_draw_other_samples_in_another_order():
    from leanft import tasks

    a, b = (tasks.load_splits("sst2", 16, 0, 0, seed).train for seed in (0, 1))
    assert [x["sentence"] for x in a] != [x["sentence"] for x in b]


def test_bench_tunes_on_dev_repeats_over_seeds_and_reports_mean_and_sd(tiny_llama_dir, tmp_path):
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
