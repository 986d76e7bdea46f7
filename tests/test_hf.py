"""leanft in users' own scripts: Trainer/SFTTrainer with leanft configs, ZOTrainer, LamdaCallback, examples."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import free_port
from peft import PeftModel, get_peft_model
from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

import leanft
from leanft import models, tasks
from leanft.zo import query_seed
from leanft.zo.noise import BLOCK, Z, mix

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))


def texts(tokenizer, n: int = 32) -> list[dict]:
    task = tasks.get_task("sst2")
    return [tokenizer(task.prompt(ex) + task.candidates(ex)[task.label(ex)]) for ex in tasks.load_splits("sst2", n, 0, 0).train]


def trainer_of(cls, model, tokenizer, out: Path, steps: int = 4, callbacks=(), **kw):
    settings = dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
                    lr_scheduler_type="linear", save_steps=2, logging_steps=1, report_to=[], seed=0)
    args = TrainingArguments(**{**settings, **kw.pop("args", {})})
    return cls(model=model, args=args, train_dataset=texts(tokenizer), callbacks=list(callbacks),
               data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), **kw)


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def stopped_and_resumed(make, out: Path) -> dict[str, torch.Tensor]:
    """Train to step 2 (checkpoint), stop, and resume in a fresh trainer to the end."""
    make(out, [StopAt(2)]).train()
    resumed = make(out, [])
    resumed.train(resume_from_checkpoint=True)
    return trainable(resumed.model)


@pytest.mark.slow
def test_trainer_with_a_leanft_config_resumes_exactly_and_reloads(tiny_llama_dir, tmp_path):
    def make(out, callbacks):
        torch.manual_seed(0)  # the same random TT start in both runs
        model, tokenizer = models.load_model(tiny_llama_dir)
        model = get_peft_model(model, leanft.LorettaRepConfig(task_type="CAUSAL_LM", r=4, tt_rank=2))
        return trainer_of(Trainer, model, tokenizer, out, callbacks=callbacks)

    whole = make(tmp_path / "whole", [])
    whole.train()
    expected = trainable(whole.model)
    assert all(torch.equal(expected[n], p) for n, p in stopped_and_resumed(make, tmp_path / "cut").items())
    whole.model.save_pretrained(tmp_path / "adapter")
    base, _ = models.load_model(tiny_llama_dir)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, whole.model.eval()(input_ids=ids).logits)


@pytest.mark.slow
@pytest.mark.parametrize("config", [lambda: leanft.LorettaRepConfig(task_type="CAUSAL_LM", r=4, tt_rank=2),
                                    lambda: leanft.LorettaAdpConfig(task_type="CAUSAL_LM", bottleneck_size=8, tt_rank=2),
                                    lambda: leanft.LamdaConfig(task_type="CAUSAL_LM", r=4)])
def test_a_bf16_model_in_the_trainer_moves_every_trainable_tensor(tiny_llama_dir, tmp_path, config):
    """``get_peft_model`` on a bf16 base: adapters and the norms in modules_to_save are float32 (PEFT alone
    would leave the norms in bf16, where AdamW's small steps round away); bf16=True computes in bf16."""
    model, tokenizer = models.load_model(tiny_llama_dir, dtype=torch.bfloat16)
    model = get_peft_model(model, config())
    start = trainable(model)
    assert start and all(t.dtype == torch.float32 for t in start.values())
    trainer_of(Trainer, model, tokenizer, tmp_path, steps=2, args={"bf16": True, "use_cpu": not torch.cuda.is_available(), "learning_rate": 1e-3}).train()
    unmoved = [n for n, p in trainable(model).items() if torch.equal(p, start[n]) and "lamda_B" not in n]
    assert not unmoved  # LaMDA's P_B is frozen by then on purpose


@pytest.mark.slow
def test_lamda_in_a_trainer_freezes_on_schedule_with_or_without_the_callback(tiny_llama_dir, tmp_path, caplog):
    """``LamdaCallback`` passed or not, P_B freezes on schedule (a Trainer without it gets it, once, and says so),
    and a run stopped at step 2 (P_B half frozen) and resumed without it ends where the whole run does."""
    def make(out, callbacks):
        model, tokenizer = models.load_model(tiny_llama_dir)
        model = get_peft_model(model, leanft.LamdaConfig(task_type="CAUSAL_LM", r=4))
        return trainer_of(Trainer, model, tokenizer, out, steps=10, callbacks=callbacks)

    whole = make(tmp_path / "cb", [leanft.LamdaCallback()])
    whole.train()
    with caplog.at_level("INFO", logger="leanft.tuners.lamda.trainer"):
        bare = make(tmp_path / "none", [])
        bare.train()
    for trainer in (whole, bare):
        layers = trainer.model.base_model.lamda_layers()
        assert all(layer.lamda_frozen["default"] == 4 and not layer.lamda_B["default"].requires_grad
                   for layer in layers)
        assert sum(isinstance(c, leanft.LamdaCallback) for c in trainer.callback_handler.callbacks) == 1
    assert [r.message for r in caplog.records].count("LaMDA freezes P_B on a schedule of optimiser steps: added "
                                                      "leanft.LamdaCallback() to the Trainer") == 1
    expected = trainable(whole.model)
    assert all(torch.equal(expected[n], p) for n, p in stopped_and_resumed(make, tmp_path / "cut").items())


@pytest.mark.slow
def test_lamda_in_a_plain_loop_without_its_schedule_warns_once(tiny_llama_dir):
    """Outside a Trainer nothing knows the planned steps: a loop that never calls ``update_freezing`` is told to."""
    model, tokenizer = models.load_model(tiny_llama_dir)
    model = get_peft_model(model, leanft.LamdaConfig(task_type="CAUSAL_LM", r=4)).train()
    batch = DataCollatorForLanguageModeling(tokenizer, mlm=False)(texts(tokenizer, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(25):
            model(**batch).loss.backward()
    said = [str(w.message) for w in caught if "P_B was never frozen" in str(w.message)]
    assert len(said) == 1 and "update_freezing(step, total_steps)" in said[0]


def zo_model(tiny_llama_dir):
    torch.manual_seed(0)  # the same random TT start every time
    model, tokenizer = models.load_model(tiny_llama_dir)
    config = leanft.LorettaAdpConfig(task_type="CAUSAL_LM", bottleneck_size=8, tt_rank=2, train_norms=False,
                                     init_mode="noise_free")
    return get_peft_model(model, config), tokenizer


@pytest.mark.slow
@pytest.mark.parametrize("optimizer,options,forwards,lr", [
    ("sgd", {}, 4, 1e-3), ("adam", {}, 4, 1e-3), ("hizoo", {}, 5, 1e-3),
    ("fzoo", {}, 3, 1e-6),  # normalised: each element moves by about lr / eps, whatever the loss's slope
    # rank 1: the TT cores (2 rows at most) are matrices only below rank 2; interval 1: a new subspace every
    # step, so the resumed step carries the moment over from the checkpoint's subspace
    ("lozo", {"rank": 1, "interval": 1, "momentum": 0.9}, 4, 1e-3)])
def test_zo_trainer_resumes_exactly(tiny_llama_dir, tmp_path, optimizer, options, forwards, lr):
    """A run stopped at step 2 and resumed from its checkpoint ends bit-identical to the whole run, the
    optimiser's state (Adam's moments, HiZOO's Hessian, LOZO's moment and subspace) carried over; each step
    logs its queries and the forward passes its optimiser takes (2 queries: fzoo Q + 1, hizoo 2Q + 1)."""
    def make(out, callbacks):
        model, tokenizer = zo_model(tiny_llama_dir)
        return trainer_of(leanft.ZOTrainer, model, tokenizer, out, steps=6, callbacks=callbacks, zo_queries=2,
                          zo_optimizer=optimizer, zo_optimizer_options=options, args={"learning_rate": lr})

    whole = make(tmp_path / "whole", [])
    start = trainable(whole.model)
    whole.train()
    assert whole.engine.optimizer.name == optimizer
    if optimizer == "lozo":
        assert any(shape is not None for shape in whole.engine.optimizer.shapes)  # some tensor perturbed low-rank
    expected = trainable(whole.model)
    assert not any(torch.equal(t, start[n]) for n, t in expected.items())
    assert all(torch.equal(expected[n], p) for n, p in stopped_and_resumed(make, tmp_path / "cut").items())
    logged = [h for h in whole.state.log_history if "zo_queries" in h]
    assert len(logged) == 6 and sum(h["zo_rollbacks"] for h in logged) == 0
    assert all(h["zo_queries"] == 2 and h["zo_forwards"] == forwards and "zo_projected_grad" in h for h in logged)
    if optimizer == "adam":  # resumed with another optimiser: refused, naming the one that wrote the checkpoint
        model, tokenizer = zo_model(tiny_llama_dir)
        wrong = trainer_of(leanft.ZOTrainer, model, tokenizer, tmp_path / "cut", steps=6, zo_queries=2,
                           args={"learning_rate": 1e-3})
        with pytest.raises(ValueError, match="resume with zo_optimizer='adam'"):
            wrong.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-2"))


@pytest.mark.slow
def test_zo_trainer_on_a_bf16_model_trains_float32_adapters_and_resumes_exactly(tiny_llama_dir, tmp_path):
    """A bfloat16 base with ``bf16=True``: the adapters stay float32 and all move, no step is mistaken for
    divergence (a perturbation lost in bf16 rounding would leave the loss unchanged), and a run stopped at
    step 2 and resumed ends where the whole run does."""
    def make(out, callbacks):
        torch.manual_seed(0)
        model, tokenizer = models.load_model(tiny_llama_dir, dtype=torch.bfloat16)
        model = get_peft_model(model, leanft.LorettaAdpConfig(task_type="CAUSAL_LM", bottleneck_size=8, tt_rank=2,
                                                              train_norms=False, init_mode="noise_free"))
        return trainer_of(leanft.ZOTrainer, model, tokenizer, out, steps=6, callbacks=callbacks, zo_queries=2,
                          args={"learning_rate": 1e-3, "bf16": True, "use_cpu": not torch.cuda.is_available()})

    whole = make(tmp_path / "whole", [])
    start = trainable(whole.model)
    assert start and all(t.dtype == torch.float32 for t in start.values())
    whole.train()
    expected = trainable(whole.model)
    assert all(t.dtype == torch.float32 and not torch.equal(t, start[n]) for n, t in expected.items())
    logged = [h for h in whole.state.log_history if "zo_rollbacks" in h]
    assert logged and sum(h["zo_rollbacks"] for h in logged) == 0
    assert all(torch.equal(expected[n], p) for n, p in stopped_and_resumed(make, tmp_path / "cut").items())


@pytest.mark.slow
def test_zo_trainer_takes_the_spsa_steps_computed_by_hand(tiny_llama_dir, tmp_path):
    """Two steps of ZOTrainer against SPSA done by hand on the batches it drew: query ``q`` of step ``t``
    draws ``z`` by the documented rule (``leanft.zo.noise``: the trainable tensors laid end to end in order,
    block 0 of that vector a ``randn`` from a generator seeded with ``mix(query_seed(args.seed, t, q), Z, 0, 0)``;
    the adapters fit in one block), ``p = (l+ - l-) / (2 eps)`` from the model's own loss at ``theta +- eps z``,
    and the step sets ``theta - lr * mean_q p_q z_q``."""
    model, tokenizer = zo_model(tiny_llama_dir)
    theta = trainable(model)
    trainer = trainer_of(leanft.ZOTrainer, model, tokenizer, tmp_path, steps=2, zo_queries=3, zo_eps=1e-3,
                         args={"learning_rate": 1e-3, "lr_scheduler_type": "constant", "seed": 7})
    batches, real_step = [], trainer.training_step

    def recording(model, inputs, *args):
        batches.append({k: v.clone() for k, v in inputs.items()})
        return real_step(model, inputs, *args)

    trainer.training_step = recording
    trainer.train()

    by_hand, _ = zo_model(tiny_llama_dir)
    by_hand.eval()

    def loss_at(values, batch) -> float:
        by_hand.load_state_dict(values, strict=False)
        with torch.no_grad():
            return float(by_hand(**batch).loss)

    sizes = [t.numel() for t in theta.values()]
    assert sum(sizes) <= BLOCK
    for step, batch in enumerate(batches):
        update = {n: torch.zeros_like(t) for n, t in theta.items()}
        for q in range(3):
            generator = torch.Generator().manual_seed(mix(query_seed(7, step, q), Z, 0, 0))
            parts = torch.randn(sum(sizes), generator=generator).split(sizes)
            z = {n: part.view(t.shape) for (n, t), part in zip(theta.items(), parts)}
            plus = loss_at({n: t + 1e-3 * z[n] for n, t in theta.items()}, batch)
            minus = loss_at({n: t - 1e-3 * z[n] for n, t in theta.items()}, batch)
            for n in theta:
                update[n] += (plus - minus) / 2e-3 * z[n] / 3
        theta = {n: t - 1e-3 * update[n] for n, t in theta.items()}
    trained = trainable(trainer.model)
    assert len(batches) == 2 and trained.keys() == theta.keys()
    for n, t in trained.items():
        torch.testing.assert_close(t, theta[n], msg=n)


def test_zo_trainer_refuses_lamda_and_gradient_accumulation(tiny_llama_dir, tmp_path):
    model, tokenizer = models.load_model(tiny_llama_dir)
    lamda = get_peft_model(model, leanft.LamdaConfig(task_type="CAUSAL_LM", r=4))
    with pytest.raises(ValueError, match="LaMDA freezes P_B"):
        trainer_of(leanft.ZOTrainer, lamda, tokenizer, tmp_path)
    model, tokenizer = zo_model(tiny_llama_dir)
    with pytest.raises(ValueError, match="gradient_accumulation_steps=1"):
        trainer_of(leanft.ZOTrainer, model, tokenizer, tmp_path, args={"gradient_accumulation_steps": 2})
    with pytest.raises(ValueError, match="zo_schedule 'ada' is not one of: fixed, adazeta"):
        trainer_of(leanft.ZOTrainer, model, tokenizer, tmp_path, zo_schedule="ada")


def test_zo_trainer_takes_an_optimizer_and_refuses_what_it_cannot_run(tiny_llama_dir, tmp_path):
    """``zo_optimizer``/``zo_optimizer_options`` reach the engine's optimiser; a bad name or option, and fzoo
    without the two queries a step its normalisation needs, fail at construction, saying what to do."""
    model, tokenizer = zo_model(tiny_llama_dir)
    trainer = trainer_of(leanft.ZOTrainer, model, tokenizer, tmp_path, zo_optimizer="lozo",
                         zo_optimizer_options={"rank": 3, "interval": 7, "momentum": 0.5})
    assert (trainer.zo_optimizer.name, trainer.zo_optimizer.rank, trainer.zo_optimizer.interval,
            trainer.zo_optimizer.beta) == ("lozo", 3, 7, 0.5)
    with pytest.raises(ValueError, match="unknown zeroth-order optimizer 'adamw'; choose one of sgd, momentum, adam"):
        trainer_of(leanft.ZOTrainer, model, tokenizer, tmp_path, zo_optimizer="adamw")
    with pytest.raises(ValueError, match="'sign' does not take momentum; it takes directions"):
        trainer_of(leanft.ZOTrainer, model, tokenizer, tmp_path, zo_optimizer="sign",
                   zo_optimizer_options={"momentum": 0.9})
    with pytest.raises(ValueError, match="zo momentum must be in"):
        trainer_of(leanft.ZOTrainer, model, tokenizer, tmp_path, zo_optimizer="momentum",
                   zo_optimizer_options={"momentum": 1.5})
    with pytest.raises(ValueError, match="'fzoo' needs at least 2 queries a step, got zo_queries=1"):
        trainer_of(leanft.ZOTrainer, model, tokenizer, tmp_path, zo_optimizer="fzoo")
    with pytest.raises(ValueError, match="use zo_schedule='fixed' with zo_queries >= 2"):
        trainer_of(leanft.ZOTrainer, model, tokenizer, tmp_path, zo_optimizer="fzoo", zo_schedule="adazeta",
                   zo_queries=4)
    fzoo = trainer_of(leanft.ZOTrainer, model, tokenizer, tmp_path, zo_optimizer="fzoo", zo_queries=2)
    assert fzoo.zo_optimizer.kind == "rademacher"  # fzoo's own default directions


@pytest.mark.parametrize("flag,name", [("is_fsdp_enabled", "FSDP"), ("is_deepspeed_enabled", "DeepSpeed")])
def test_zo_trainer_refuses_sharded_training(tiny_llama_dir, tmp_path, monkeypatch, flag, name):
    """FSDP and DeepSpeed shard the trainable tensors that every process perturbs whole: refused at construction
    (the Trainer's flags are set as ``accelerate launch`` with such a config sets them; both need several GPUs)."""
    real = Trainer.create_accelerator_and_postprocess

    def sharded(self):
        real(self)
        setattr(self, flag, True)

    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", sharded)
    model, tokenizer = zo_model(tiny_llama_dir)
    with pytest.raises(ValueError, match=f"{name} shards them: leave it out and launch the processes plain"):
        trainer_of(leanft.ZOTrainer, model, tokenizer, tmp_path)


@pytest.mark.slow
def test_zo_sft_trainer_logs_training_metrics_and_counts_tokens_once(tiny_llama_dir, tmp_path):
    """The perturbed forwards run in eval mode, yet what TRL logs of them is the training's: ``entropy``,
    ``mean_token_accuracy`` and ``num_tokens`` (each batch's tokens once, not once a forward), no ``eval_``
    keys and no ``grad_norm`` (there is no gradient)."""
    from datasets import Dataset
    from trl import SFTConfig

    model, tokenizer = zo_model(tiny_llama_dir)
    rows = [{"prompt": f"name[Eagle {i}] food[French]", "completion": " The Eagle serves French food." * (1 + i % 3)}
            for i in range(8)]
    args = SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, report_to=[], bf16=False,
                     learning_rate=1e-4, logging_steps=1, use_cpu=True)
    trainer = leanft.ZOSFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                  processing_class=tokenizer, zo_queries=2)
    tokens, real_step = [], trainer.training_step

    def recording(model, inputs, *args):
        tokens.append(int(inputs["attention_mask"].sum()))
        return real_step(model, inputs, *args)

    trainer.training_step = recording
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3 and not any(k.startswith("eval_") or k == "grad_norm" for h in logged for k in h)
    assert [h["num_tokens"] for h in logged] == [sum(tokens[:i + 1]) for i in range(3)]
    assert all(h["entropy"] > 0 and 0 <= h["mean_token_accuracy"] <= 1 for h in logged)


@pytest.mark.slow
def test_examples_run_on_a_tiny_model(tiny_llama_dir, tmp_path):
    import plain_loop_lamda
    import sft_adazeta_zo
    import trainer_loretta_rep

    trainer = trainer_loretta_rep.main(["--model", tiny_llama_dir, "--steps", "4", "--examples", "32",
                                        "--output-dir", str(tmp_path / "rep")])
    assert trainer.state.global_step == 4 and (tmp_path / "rep" / "adapter" / "adapter_config.json").is_file()
    model = plain_loop_lamda.main(["--model", tiny_llama_dir, "--steps", "10", "--batch-size", "2", "--rank", "4"])
    assert all(layer.lamda_frozen["default"] == 4 for layer in model.base_model.lamda_layers())
    sft = sft_adazeta_zo.main(["--model", tiny_llama_dir, "--steps", "4", "--examples", "16", "--batch-size", "2",
                               "--bottleneck", "8", "--output-dir", str(tmp_path / "sft"), "--optimizer", "adam"])
    assert sft.state.global_step == 4 and isinstance(sft, leanft.ZOSFTTrainer) and sft.engine.optimizer.name == "adam"


TWO_PROCESSES = """
import sys
sys.path[:0] = [{tests!r}, {examples!r}]
import leanft
import sft_adazeta_zo
from test_hf import trainer_of, zo_model, trainable
model, tokenizer = zo_model({model!r})
trainer = trainer_of(leanft.ZOTrainer, model, tokenizer, {out!r} + "/zo-trainer", steps=3, zo_queries=2,
                     args={{"learning_rate": 1e-3, "per_device_train_batch_size": 2, "use_cpu": True}})
trainer.train()
if trainer.is_world_process_zero():
    from safetensors.torch import save_file
    save_file(trainable(trainer.model), {out!r} + "/zo-trainer/final.safetensors")
model, tokenizer = zo_model({model!r})
trainer = trainer_of(leanft.ZOTrainer, model, tokenizer, {out!r} + "/zo-trainer-hizoo", steps=3, zo_queries=2,
                     zo_optimizer="hizoo", args={{"learning_rate": 1e-3, "per_device_train_batch_size": 2,
                                                 "use_cpu": True}})
trainer.train()
if trainer.is_world_process_zero():
    save_file(trainable(trainer.model), {out!r} + "/zo-trainer-hizoo/final.safetensors")
for queries in (1, 3):
    sft_adazeta_zo.main([*{sft!r}, "--queries", str(queries), "--batch-size", "2", "--output-dir",
                         {out!r} + f"/sft-q{{queries}}"])
"""
SFT = ["--steps", "3", "--examples", "16", "--bottleneck", "8"]


@pytest.fixture(scope="module")
def zo_trainers_on_two_processes(tiny_llama_dir, tmp_path_factory) -> Path:
    """``ZOTrainer`` (2 queries a step, sgd and hizoo) and ``examples/sft_adazeta_zo.py`` with 1 and 3 queries, on
    two processes with batch 2 each, in one torchrun launch (each launch starts two interpreters that import torch,
    transformers and TRL: most of a small run's time)."""
    out = tmp_path_factory.mktemp("zo-trainers")
    script = out / "run.py"
    script.write_text(TWO_PROCESSES.format(tests=str(Path(__file__).parent), examples=str(ROOT / "examples"),
                                           model=tiny_llama_dir, out=str(out), sft=["--model", tiny_llama_dir, *SFT]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
           str(script)]
    ran = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900)
    assert ran.returncode == 0, ran.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.xdist_group("zo-trainers")
@pytest.mark.parametrize("optimizer,folder", [("sgd", "zo-trainer"), ("hizoo", "zo-trainer-hizoo")])
def test_two_process_zo_trainer_equals_one_process(zo_trainers_on_two_processes, tiny_llama_dir, tmp_path, optimizer,
                                                   folder):
    """Two processes with batch 2 each end where one with batch 4 does; HiZOO's unperturbed loss, taken by each
    process, and its Hessian, updated by each, included."""
    from safetensors.torch import load_file

    model, tokenizer = zo_model(tiny_llama_dir)
    one = trainer_of(leanft.ZOTrainer, model, tokenizer, tmp_path, steps=3, zo_queries=2, zo_optimizer=optimizer,
                     args={"learning_rate": 1e-3, "per_device_train_batch_size": 4, "use_cpu": True})
    one.train()
    two = load_file(str(zo_trainers_on_two_processes / folder / "final.safetensors"))
    for name, value in trainable(one.model).items():
        torch.testing.assert_close(two[name], value, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.xdist_group("zo-trainers")
@pytest.mark.parametrize("queries", [1, 3])
def test_zo_sft_trainer_on_two_processes_with_fewer_or_uneven_queries(zo_trainers_on_two_processes, tiny_llama_dir,
                                                                     tmp_path, queries):
    """ZOSFTTrainer under torchrun with 1 query a step (one process has none) or 3 (one has one fewer): TRL
    gathers its metrics in every forward, so every process runs as many; the run finishes and equals one
    process: the same adapter, loss and tokens. Entropy and token accuracy are means over a step's forwards, at
    perturbed parameters (and, on the process with fewer queries, the unperturbed ones): the same to within a
    token's accuracy, not equal."""
    import json

    import sft_adazeta_zo
    from safetensors.torch import load_file

    sft_adazeta_zo.main(["--model", tiny_llama_dir, *SFT, "--queries", str(queries), "--batch-size", "4",
                         "--output-dir", str(tmp_path / "one")])
    runs = {"one": tmp_path / "one", "two": zo_trainers_on_two_processes / f"sft-q{queries}"}
    one, two = (load_file(str(runs[run] / "adapter" / "adapter_model.safetensors")) for run in ("one", "two"))
    assert one.keys() == two.keys()
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, rtol=1e-4, atol=1e-6, msg=name)
    logs = [[h for h in json.loads((runs[run] / "trainer_state.json").read_text())["log_history"] if "loss" in h]
            for run in ("one", "two")]
    assert len(logs[0]) == len(logs[1]) == 3
    for a, b in zip(*logs):
        assert a["num_tokens"] == b["num_tokens"] and a["zo_queries"] == b["zo_queries"] == queries
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["entropy"] == pytest.approx(a["entropy"], rel=1e-3)
        assert b["mean_token_accuracy"] == pytest.approx(a["mean_token_accuracy"], abs=0.01)


def test_zo_sft_trainer_scores_the_completion_only(tiny_llama_dir, tmp_path):
    """TRL's prompt-completion data through ZOSFTTrainer: the loss the SPSA step sees is the mean negative
    log-likelihood of the completion tokens alone (prompt labels masked)."""
    from datasets import Dataset
    from trl import SFTConfig

    model, tokenizer = zo_model(tiny_llama_dir)
    rows = [{"prompt": "name[The Eagle] food[French]", "completion": " The Eagle serves French food."}] * 4
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[], bf16=False,
                     learning_rate=1e-4)
    trainer = leanft.ZOSFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                  processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    prompt = len(tokenizer(rows[0]["prompt"]).input_ids)
    assert (batch["labels"][:, :prompt] == -100).all() and (batch["labels"][:, prompt:] != -100).any()
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        by_hand = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                                    ignore_index=-100)
        assert float(trainer.compute_loss(model, batch)) == pytest.approx(float(by_hand), rel=1e-5)
