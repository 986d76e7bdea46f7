import json

import pytest

from leanft import bench


def test_step_times_cover_first_and_zeroth_order_methods(tiny_llama_dir):
    result = bench.step_times(tiny_llama_dir, "sst2", ["lora", "mezo-lora"], batch_size=2, steps=2, queries=(1, 3))
    assert [(r["method"], r["queries"]) for r in result["rows"]] == [("lora", None), ("mezo-lora", 1), ("mezo-lora", 3)]
    assert all(r["step_s"] > 0 and r["trainable"] > 0 for r in result["rows"])


def test_step_times_time_lamda_before_and_after_freezing(tiny_llama_dir):
    rows = bench.step_times(tiny_llama_dir, "sst2", ["lamda"], batch_size=2, steps=2)["rows"]
    assert [r["method"] for r in rows] == ["lamda", "lamda (P_B frozen)"]
    assert rows[1]["trainable"] < rows[0]["trainable"]


def test_memory_child_measures_the_step_not_the_loading(tiny_llama_dir):
    for mode, method in [("inference", "full"), ("zo", "mezo-lora"), ("first-order", "lora")]:
        row = bench.memory_child(tiny_llama_dir, method, mode, "sst2", 2, 1)
        assert row["peak_mb"] >= row["baseline_mb"] > 0 and row["mode"] == mode


def test_memory_child_frozen_mode_trains_lamda_with_p_b_frozen(tiny_llama_dir):
    training = bench.memory_child(tiny_llama_dir, "lamda", "first-order", "sst2", 2, 1)
    frozen = bench.memory_child(tiny_llama_dir, "lamda", "frozen", "sst2", 2, 1)
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
    text = bench.report(files)
    assert "| zero-shot | 50.0 |" in text and "| loretta-rep | 81.0 | 100 | 0.250x | 50 | 700 |" in text


def test_plot_runs_draws_loss_against_forward_passes_and_names_a_missing_log(tmp_path):
    for method in ("mezo-lora", "adazeta"):
        (tmp_path / f"{method}.json").write_text(json.dumps({"method": method}))
        rows = [{"step": i, "loss": 1.0 / (i + 1), "forwards": 2 * (i + 1)} for i in range(40)]
        (tmp_path / f"{method}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench.plot_runs([tmp_path / "mezo-lora.json", tmp_path / "adazeta.json"], tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "adazeta.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="adazeta.jsonl"):
        bench.plot_runs([tmp_path / "adazeta.json"], tmp_path / "x.png")
