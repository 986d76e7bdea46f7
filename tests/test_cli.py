import json
import re
from dataclasses import fields

import pytest

from leanft import cli, methods
from leanft.config import TrainConfig
from leanft.train import train

PAPER_COUNTS = [("loretta-adp", 876_800), ("loretta-rep", 516_096), ("lora", 4_194_304)]


@pytest.mark.slow
@pytest.mark.parametrize("method,trainable", PAPER_COUNTS)
def test_params_reproduces_the_paper_counts_for_llama_2_7b(method, trainable, capsys):
    cli.main(["params", "--model", "llama-2-7b", "--method", method, "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["trainable"] == trainable
    assert result["total"] >= 6_738_415_616 and result["total"] - 6_738_415_616 <= trainable


def test_params_table_for_an_encoder(capsys):
    cli.main(["params", "--model", "roberta-base", "--method", "loretta-adp,loretta-rep"])
    text = capsys.readouterr().out
    assert "loretta-adp" in text and "loretta-rep" in text


# METHODS.md 2.3 / 3.2: adapters (24 at 2,392) or rep factors + 25 LayerNorms (38,400) + TT classifier dense
# (1,080 + bias 768) + out_proj (1,538). LoRETTA_rep on DeBERTa's in_proj: METHODS.md's 55,706 counts both
# factors 768 wide (580 each), but in_proj maps 768 -> 2304 (q, k, v), so B is 8 x 2304 ([8,8,8,6,6], 620):
# 12 x 40 = 480 more; every other term is the paper's.
ENCODER_COUNTS = [("roberta-base", "loretta-adp", [], 99_194), ("deberta-base", "loretta-adp", [], 99_194),
                  ("deberta-base", "loretta-rep", ["--target-modules", "in_proj", "--tt-rank", "5"], 55_706 + 480)]


@pytest.mark.slow
@pytest.mark.parametrize("model,method,flags,trainable", ENCODER_COUNTS)
def test_params_reproduces_the_paper_counts_for_encoders(model, method, flags, trainable, capsys):
    cli.main(["params", "--model", model, "--method", method, "--json", *flags])
    assert json.loads(capsys.readouterr().out)["trainable"] == trainable


@pytest.mark.parametrize("model", ["roberta-base", "deberta-base"])
def test_dense_classifier_flag_trains_the_whole_head_densely(model, capsys):
    """The dense head: 57,408 + 38,400 + 590,592 (hidden dense; DeBERTa's pooler no longer frozen) + 1,538."""
    cli.main(["params", "--model", model, "--method", "loretta-adp", "--json", "--dense-classifier"])
    assert json.loads(capsys.readouterr().out)["trainable"] == 687_938


@pytest.mark.slow
def test_options_change_the_counts(capsys):
    cli.main(["params", "--model", "llama-2-7b", "--method", "loretta-adp", "--json", "--tt-rank", "8",
              "--no-train-norms"])
    assert json.loads(capsys.readouterr().out)["trainable"] == 921_600  # METHODS.md 9.1


def test_method_typo_suggests_the_closest_name():
    with pytest.raises(ValueError, match="did you mean 'loretta-rep'"):
        methods.resolve_method("loreta-rep")
    with pytest.raises(SystemExit) as e:
        cli.main(["params", "--model", "llama-2-7b", "--method", "lorra"])
    assert str(e.value).startswith("leanft: error:") and "did you mean 'lora'" in str(e.value)


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(SystemExit) as e:
        cli.main(["params", "--model", "llama2-7b"])
    assert str(e.value).startswith("leanft: error:") and "llama-2-7b" in str(e.value)


def test_options_a_method_does_not_take_are_rejected():
    with pytest.raises(ValueError, match="does not take option"):
        methods.make_config("lora", "CAUSAL_LM", bottleneck=16)
    with pytest.raises(ValueError, match="positive integer"):
        methods.make_config("lora", "CAUSAL_LM", rank=0)


def test_lamda_counts_on_llama_2_7b_before_freezing(capsys):
    cli.main(["params", "--model", "llama-2-7b", "--method", "lamda", "--json", "--rank", "64", "--target-modules",
              "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"])
    assert json.loads(capsys.readouterr().out)["trainable"] == 87_031_808 + 917_504  # P_B + S (METHODS.md 6.4)


def test_lamda_plus_plus_needs_real_weights_for_its_ranks():
    with pytest.raises(SystemExit, match="spectra"):
        cli.main(["params", "--model", "llama-2-7b", "--method", "lamda++"])


@pytest.mark.slow
def test_estimate_command_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "est.json"
    cli.main(["estimate", "--models", "llama-2-7b", "--methods", "lora,adazeta", "--zo-optimizers", "none",
              "--output", str(out)])  # the optimisers table has its own test (test_estimate.py)
    text = capsys.readouterr().out
    assert "Training memory estimate" in text and "| llama-2-7b | lora | 4,194,304 |" in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["lora", "adazeta"] and rows[1]["total_mb"] < rows[0]["total_mb"]


@pytest.mark.slow
def test_micro_command_writes_both_results(tmp_path, capsys):
    cli.main(["micro", "--hidden-sizes", "96", "--methods", "lora,loretta-rep", "--tokens", "8",
              "--contraction-tokens", "1,8", "--output-dir", str(tmp_path)])
    assert "Adapter layers vs PEFT LoRA" in capsys.readouterr().out
    [layers_file] = tmp_path.glob("micro-layers-*.json")  # -cpu or -cuda: the device it ran on
    layers = json.loads(layers_file.read_text())
    assert [r["method"] for r in layers["rows"]] == ["base", "lora", "loretta-rep"]
    assert json.loads(next(tmp_path.glob("micro-contractions-*.json")).read_text())["rows"]


@pytest.mark.parametrize("flag,value,valid", [
    ("--optimizer", "sgd", "adamw, zo"), ("--zo-schedule", "adaptive", "auto, fixed, adazeta"),
    ("--dtype", "fp16", "float32, bfloat16, float16"), ("--scheduler", "cosin", "linear, cosine"),
])
def test_unknown_flag_values_are_refused_with_the_valid_ones(flag, value, valid, tmp_path, capsys):
    """Any value but ``zo`` once meant AdamW, any schedule but ``adazeta`` a fixed one: now each is checked,
    on the command line and in a YAML config alike."""
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", flag, value])
    assert "invalid choice" in capsys.readouterr().err
    config = tmp_path / "run.yaml"
    config.write_text(f"{flag[2:].replace('-', '_')}: {value}\n")
    with pytest.raises(ValueError, match=f"is not one of: {valid}"):
        cli.train_config(cli.build_parser().parse_args(["train", "--config", str(config)]))


def test_every_config_key_is_a_train_flag_in_the_help(capsys):
    """The flags are built from TrainConfig's fields: a field declared without a help text would be a YAML key
    with no flag and no line in ``leanft train --help``."""
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    missing = [f.name for f in fields(TrainConfig)
               if f.name != "method_options" and not re.search(rf"--{f.name.replace('_', '-')}(?![\w-])", text)]
    assert not missing


@pytest.mark.parametrize("key,value,message", [
    ("batch_size", 0, "batch_size must be positive"), ("zo_eps", 0.0, "zo_eps must be positive"),
    ("weight_decay", -0.1, "weight_decay must not be negative"), ("save_every", "5x", "save_every '5x' is not"),
])
def test_impossible_numbers_are_refused(key, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{key: value})


def test_lamda_under_zeroth_order_training_is_refused(tmp_path):
    """LaMDA's freezing follows optimiser steps; under --optimizer zo P_B was silently never frozen."""
    with pytest.raises(ValueError, match="lamda with --optimizer zo is refused.*mezo-lora or adazeta"):
        train(TrainConfig(method="lamda", optimizer="zo", output_dir=str(tmp_path)))


@pytest.mark.parametrize("text,message", [
    ("method: [lora\n", r"run.yaml line 2, column 1: not valid YAML: while parsing a flow sequence, expected ',' or "
                         r"'\]', but got '<stream end>'$"),
    ("batch_size: two\n", r"batch_size: expected int like 8, got 'two'"),
    ("warmup_ratio: 2\n", "warmup_ratio is a fraction of the steps, at most 1"),
    ("eval_file: data.csv\n", "eval_file needs train_file"),
    ("method: lora\nmax_forwards: 8\n", r"max_forwards apply to zeroth-order training; method 'lora' trains with AdamW"),
    ("method: lora\nzo_schedule: adazeta\n", "zo_schedule apply to zeroth-order training"),
    ("method: lora\nzo_max_rollbacks: 0\n", "zo_max_rollbacks apply to zeroth-order training"),
])
def test_config_files_that_would_be_misread_are_refused_naming_what(tmp_path, text, message):
    """Each of these once gave a library traceback or was silently ignored."""
    config = tmp_path / "run.yaml"
    config.write_text(text)
    with pytest.raises(ValueError, match=message):
        cli.train_config(cli.build_parser().parse_args(["train", "--config", str(config)]))


def test_a_hub_id_the_hub_does_not_give_is_one_line_naming_it(monkeypatch):
    """Offline (or an unknown or gated id) the hub client retries, then transformers raises an OSError whose
    traceback was all a user saw."""
    from leanft import models

    def offline(name, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.setattr(models.AutoConfig, "from_pretrained", offline)
    with pytest.raises(FileNotFoundError, match=r"^cannot load 'org/nothere': there is no such local folder, and the "
                                                r"Hugging Face hub did not give it \(We couldn't connect .* files\.\)$"):
        models.model_kind("org/nothere")


def test_a_missing_local_model_folder_is_not_tried_on_the_hub(tmp_path, monkeypatch):
    from leanft import models

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for name in ("models/nothere", "./nothere", "a/b/c"):
        with pytest.raises(FileNotFoundError, match=f"model folder '{name}' does not exist"):
            models.model_kind(name)
