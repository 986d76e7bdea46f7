"""The fault matrix: every method killed (SIGKILL) mid-run and resumed, run on two processes, given a
NaN on one process, or resumed from a damaged checkpoint, ends where it should or says why.

Children run ``tests/fault_driver.py``: a real SIGKILL or SIGTERM in a chosen step and micro-batch, in a forked
process that has torch and transformers imported already (``in_child``), and a ``torchrun`` process group (gloo
on CPU) that runs every data-parallel case in turn.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import forked, free_port
from safetensors.torch import load_file

from leanft import checkpoint, runfolder, train
from leanft.checkpoint import CheckpointError
from leanft.config import TrainConfig
from leanft.methods import OPTION_FIELDS

DRIVER = Path(__file__).with_name("fault_driver.py")


def in_child(*argv: str) -> tuple[int, str]:
    """``fault_driver.py argv`` in a forked process (``conftest.forked``): its exit status (-9: it SIGKILLed
    itself) and what it wrote to stdout and stderr."""
    import fault_driver

    log = Path(argv[1]).with_suffix(".log")
    return forked(fault_driver.main, list(argv), out=log), log.read_text()


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}

OPTIONS = {
    "full": {}, "mezo": {},
    "lora": {"rank": 4}, "mezo-lora": {"rank": 4},
    "loretta-rep": {"rank": 4, "tt_rank": 2}, "loretta-adp": {"bottleneck": 8, "tt_rank": 2},
    "adazeta": {"bottleneck": 8, "tt_rank": 2}, "lamda": {"rank": 4}, "lamda++": {"rank": 4},
}
ZO = ("mezo", "mezo-lora", "adazeta")
LR = {"full": 1e-3, "mezo": 1e-3}


def config(model_dir: str, out: Path, method: str, **kw) -> TrainConfig:
    """8 steps on 16 examples; first-order methods take 2 micro-batches a step. AdaZeta's query count
    goes from 1 to 2 at step 4 (epoch 1, alpha 2); LaMDA's P_B (r 4) is partly frozen after steps 1-2
    and wholly after step 3."""
    zo = method in ZO
    base = dict(model=model_dir, method=method, task="sst2", num_train=16, num_dev=8, num_eval=8, max_steps=8,
                batch_size=4 if zo else 2, grad_accum=1 if zo else 2, eval_every=4, save_every="1",
                eval_before=False, output_dir=str(out), lr=LR.get(method, 1e-2), max_length=64,
                method_options=dict(OPTIONS[method]), zo_alpha=2.0)
    return TrainConfig(**{**base, **kw})


NO_DROPOUT = {**OPTIONS["loretta-rep"], "dropout": 0.0}  # two processes draw other masks than one

# where each method is killed: (step, micro-batch), the checkpoint it resumes from is the step before
KILL_AT = {m: (3, 1) for m in OPTIONS}
KILL_AT.update({"lamda": (2, 1), "lamda++": (2, 1), "adazeta": (4, -1), "mezo": (3, -1), "mezo-lora": (3, -1)})


def final_state(out: Path) -> dict:
    """What a run ends with: the steps' logged losses, the best adapter's tensors, and the final
    trainable tensors."""
    rows = [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    best = {k: v for f in sorted((out / "best").glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    last = load_file(str(out / "checkpoint" / "trainable.safetensors"))
    return {"rows": rows, "best": best, "last": last}


def assert_same(a: dict, b: dict) -> None:
    assert a["rows"] == b["rows"]
    for key in ("best", "last"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)


def damage(run: Path) -> tuple[Path, str]:
    """A copy of ``run`` with its checkpoint's tensor file truncated: the file the error must name."""
    copy = run.with_name(run.name + "-damaged")
    shutil.copytree(run, copy)
    target = copy / "checkpoint" / "trainable.safetensors"
    target.write_bytes(target.read_bytes()[:100])
    return copy, str(target)


# every method in float32; low precision where it has its own state (float16's loss scaler, bfloat16
# full-model MeZO's stochastically rounded weights)
KILLED = [(m, "float32") for m in OPTIONS] + [("loretta-rep", "bfloat16"), ("loretta-rep", "float16"),
                                              ("mezo", "bfloat16")]


# MeZO-LoRA on two processes takes 3 queries a step: 2 on one process, 1 on the other
DDP_EXTRA = {"mezo-lora": {"zo_queries": 3}}


@pytest.fixture
def one_thread():
    """The killed child computes on one thread (``ENV``); the whole and resumed runs here must too: two
    threads split the matrix products differently and AdamW runs then differ in the 7th digit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.parametrize("method,dtype", KILLED)
def test_killed_run_resumes_to_the_uninterrupted_result(tiny_llama_dir, tmp_path, method, dtype, one_thread):
    train.train(config(tiny_llama_dir, tmp_path / "whole", method, dtype=dtype))
    whole = final_state(tmp_path / "whole")

    cut = tmp_path / "cut"
    cfg = config(tiny_llama_dir, cut, method, dtype=dtype)
    (tmp_path / "cfg.json").write_text(json.dumps(asdict(cfg)))
    step, micro = KILL_AT[method]
    status, said = in_child("kill", str(tmp_path / "cfg.json"), str(step), str(micro))
    assert status == -9, said[-3000:]  # SIGKILL: no handler, no cleanup ran
    state, _ = checkpoint.load(cut)
    assert state["step"] == step  # the checkpoint of the step before the one killed

    broken, named = damage(cut)
    with pytest.raises((CheckpointError, FileNotFoundError), match="damaged checkpoint") as error:
        train.train(config(tiny_llama_dir, broken, method, dtype=dtype, resume=True))
    assert named in str(error.value)

    train.train(config(tiny_llama_dir, cut, method, dtype=dtype, resume=True))
    assert_same(whole, final_state(cut))


# every zeroth-order optimiser (leanft.zo.optimizers, on MeZO-LoRA), with settings under which its state carries
# across a resume: LOZO-M (momentum on LOZO) draws a new subspace at step 3, the first step a run killed in step 3
# redoes. FZOO's step is lr G / sigma, sigma ~ eps |grad|: its lr is about eps times MeZO's
ZO_OPTIMIZERS = {"sgd": {}, "momentum": {"zo_momentum": 0.8}, "adam": {"zo_adam_betas": [0.8, 0.99]}, "sign": {},
                 "fzoo": {}, "hizoo": {"zo_hessian_smoothing": 0.1},
                 "lozo": {"zo_rank": 2, "zo_interval": 3, "zo_momentum": 0.5}, "sparse": {"zo_sparsity": 0.5}}
ZO_LR = {"fzoo": 1e-4}


def zo_config(model_dir: str, out: Path, name: str, chosen: bool = True, queries: int = 2, **kw) -> TrainConfig:
    """MeZO-LoRA with ``queries`` a step, at ``name``'s lr, with the zeroth-order optimiser ``name`` (``chosen``)
    or the default one (for flags to choose)."""
    options = {"zo_optimizer": name, **ZO_OPTIMIZERS[name]} if chosen else {}
    return config(model_dir, out, "mezo-lora", zo_queries=queries, lr=ZO_LR.get(name, 1e-2), **options, **kw)


def zo_flags(name: str) -> list[str]:
    """``leanft train`` flags that choose ``name`` with its settings in ``ZO_OPTIMIZERS``."""
    flags = ["--zo-optimizer", name]
    for key, value in ZO_OPTIMIZERS[name].items():
        flags += ["--" + key.replace("_", "-"), ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return flags


def logged(out: Path) -> list[dict]:
    """The run's logged steps, without their timings."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "examples_per_s"} for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ZO_OPTIMIZERS))
def test_killed_run_of_each_zo_optimizer_resumes_to_the_uninterrupted_result(tiny_llama_dir, tmp_path, name,
                                                                            one_thread):
    """`leanft train --zo-optimizer NAME ...` SIGKILLed in step 4 resumes from step 3's checkpoint and ends as the
    uninterrupted run, row for row and tensor for tensor: the optimiser's state (moments, Adam's step count,
    HiZOO's Hessian, LOZO's subspace and moment) is in the checkpoint."""
    train.train(zo_config(tiny_llama_dir, tmp_path / "whole", name))
    cut = tmp_path / "cut"
    (tmp_path / "cfg.json").write_text(json.dumps(asdict(zo_config(tiny_llama_dir, cut, name, chosen=False))))
    status, said = in_child("kill", str(tmp_path / "cfg.json"), "3", "-1", *zo_flags(name))
    assert status == -9, said[-3000:]
    assert checkpoint.load(cut)[0]["step"] == 3
    train.train(zo_config(tiny_llama_dir, cut, name, resume=True))
    assert_same(final_state(tmp_path / "whole"), final_state(cut))
    rows = logged(cut)
    assert rows == logged(tmp_path / "whole")
    forwards = {"fzoo": 3, "hizoo": 5}.get(name, 4)  # Q + 1 (one-sided), 2Q + 1 (with l0), 2Q; Q = 2
    assert [r["forwards"] for r in rows] == [forwards * k for k in range(1, 9)]  # counted so far
    assert not any(r.get("rolled_back") for r in rows)


@pytest.mark.slow
def test_resuming_with_another_zo_optimizer_is_refused_naming_the_one_to_use(tiny_llama_dir, tmp_path):
    train.train(zo_config(tiny_llama_dir, tmp_path, "adam", max_steps=2))
    with pytest.raises(ValueError, match="written by optimiser 'adam', not 'momentum': resume with --zo-optimizer adam"):
        train.train(zo_config(tiny_llama_dir, tmp_path, "momentum", max_steps=4, resume=True))


@pytest.mark.slow
def test_lamda_resumes_from_inside_the_partial_freeze(tiny_llama_dir, tmp_path, monkeypatch):
    """The copy of P_B's frozen columns is working state: a checkpoint taken while only some columns are
    frozen resumes (it once held the copy, which a fresh model lacks) and ends as the whole run does."""
    train.train(config(tiny_llama_dir, tmp_path / "whole", "lamda"))
    real_save = runfolder.save_checkpoint

    def crash_after_save(out, updater, state, accel):
        real_save(out, updater, state, accel)
        if state["step"] == 2:
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(runfolder, "save_checkpoint", crash_after_save)
    with pytest.raises(KeyboardInterrupt):
        train.train(config(tiny_llama_dir, tmp_path / "cut", "lamda"))
    monkeypatch.setattr(runfolder, "save_checkpoint", real_save)
    train.train(config(tiny_llama_dir, tmp_path / "cut", "lamda", resume=True))
    assert_same(final_state(tmp_path / "whole"), final_state(tmp_path / "cut"))


def _plan(model_dir: str, root: Path) -> list[dict]:
    """Every method on two processes (half the batch each), one in bfloat16, then the NaN and flat-loss cases."""
    plan = []
    for method in OPTIONS:
        # no dropout: two processes draw other masks than one, and the runs are to be compared
        options = {**OPTIONS[method], **({"dropout": 0.0} if "dropout" in OPTION_FIELDS[method] else {})}
        cfg = config(model_dir, root / "ddp" / method, method, max_steps=6, method_options=options,
                     **DDP_EXTRA.get(method, {}))
        if method not in ZO:
            cfg.batch_size //= 2
        plan.append({"name": f"ddp-{method}", "config": asdict(cfg)})
    # bfloat16 compute (autocast, float32 adapters) on two processes
    bf16 = config(model_dir, root / "ddp-bf16", "loretta-rep", max_steps=6, dtype="bfloat16", method_options=NO_DROPOUT)
    bf16.batch_size //= 2
    plan.append({"name": "ddp-bf16", "config": asdict(bf16)})
    # a mixture: processes run as many forwards as their micro-batch has tasks (no collective per forward)
    mixed = config(model_dir, root / "ddp-mixture", "loretta-rep", task="sst2,rte", batch_size=1, max_steps=4)
    plan.append({"name": "ddp-mixture", "config": asdict(mixed)})
    nan = config(model_dir, root / "nan-adamw", "loretta-rep", batch_size=1)
    plan.append({"name": "nan-adamw", "config": asdict(nan),
                 "fault": {"kind": "nan", "steps": [2], "micro": 1, "ranks": [1]}})
    for name, steps in (("nan-zo-once", [2]), ("nan-zo-always", list(range(2, 8)))):
        cfg = config(model_dir, root / name, "mezo-lora", zo_queries=2, zo_recover=2, scheduler="constant")
        plan.append({"name": name, "config": asdict(cfg), "fault": {"kind": "nan", "steps": steps, "ranks": [1]}})
    off = config(model_dir, root / "nan-zo-guard-off", "mezo-lora", zo_queries=2, zo_max_rollbacks=0)
    plan.append({"name": "nan-zo-guard-off", "config": asdict(off), "fault": {"kind": "nan", "steps": [2], "ranks": [1]}})
    flat = config(model_dir, root / "flat-zo-guard-off", "mezo-lora", zo_queries=2, zo_max_rollbacks=0)
    plan.append({"name": "flat-zo-guard-off", "config": asdict(flat),
                 "fault": {"kind": "flat", "steps": [2], "ranks": [0, 1]}})
    return plan


# each zeroth-order optimiser on two processes with fewer queries than processes: one (FZOO, which needs two,
# three: two on one process, one on the other), so a process has no query of its own in some or every step
DDP_ZO_QUERIES = {"fzoo": 3}


def _zo_plan(model_dir: str, root: Path) -> list[dict]:
    return [{"name": f"ddp-zo-{name}", "config": asdict(zo_config(model_dir, root / "ddp-zo" / name, name, max_steps=4,
                                                                 queries=DDP_ZO_QUERIES.get(name, 1)))}
            for name in ZO_OPTIMIZERS]


def _torchrun(plan: list[dict], root: Path) -> subprocess.CompletedProcess:
    (root / "plan.json").write_text(json.dumps(plan))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
           str(DRIVER), "plan", str(root / "plan.json"), str(root)]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=1200)


def _lora_on_two(model_dir: str, root: Path, name: str, dropout: float, **kw) -> dict:
    """LoRA on two processes, each with half of one process's global batch."""
    c = config(model_dir, root / name, "lora", method_options={"rank": 4, "dropout": dropout}, **kw)
    c.batch_size //= 2
    return asdict(c)


@pytest.fixture(scope="module")
def two_processes(tiny_llama_dir, tmp_path_factory) -> dict:
    """Every two-process case, in two torchrun launches (each starts two interpreters that import torch and
    transformers, the most of a small case's time): the data-parallel matrix and the NaN cases (``_plan``), each
    zeroth-order optimiser (``_zo_plan``), a NaN gradient on one process, a SIGTERM to one process, dropout with a
    clock that runs fast on one process, and last a dropout run SIGKILLed mid-step, which ends the first launch;
    the second resumes that run.
    ``results``: each entry's per-process outcome (None where the process was killed before writing it)."""
    root = tmp_path_factory.mktemp("two-processes")
    lora = lambda name, dropout=0.0, **kw: _lora_on_two(tiny_llama_dir, root, name, dropout, **kw)  # noqa: E731
    nan_gradient = config(tiny_llama_dir, root / "nan-gradient", "lora", batch_size=1)
    plan = [*_plan(tiny_llama_dir, root), *_zo_plan(tiny_llama_dir, root),
            {"name": "nan-gradient", "config": asdict(nan_gradient),
             "fault": {"kind": "nan-gradient", "steps": [2], "micro": 0, "ranks": [1]}},
            {"name": "signal-whole", "config": lora("signal-whole", max_steps=6, save_every="0")},
            {"name": "signal-stopped", "config": lora("signal-cut", max_steps=6, save_every="0"),
             "fault": {"kind": "term", "steps": [2], "micro": 1, "ranks": [1]}},
            {"name": "signal-refused", "config": lora("signal-cut", max_steps=6, save_every="0")},
            {"name": "signal-resumed", "config": lora("signal-cut", max_steps=6, save_every="0", resume=True)},
            {"name": "dropout-whole", "config": lora("dropout-whole", 0.1)},
            {"name": "dropout-clock", "config": lora("dropout-clock", 0.1, save_every="60s", max_steps=6),
             "fault": {"kind": "clock", "steps": [], "ranks": [1]}},
            {"name": "dropout-cut", "config": lora("dropout-cut", 0.1),
             "fault": {"kind": "kill", "steps": [3], "micro": 1, "ranks": [0, 1]}}]
    first = _torchrun(plan, root)
    results = {e["name"]: [json.loads(f.read_text()) if (f := root / f"{e['name']}.rank{r}.json").exists() else None
                           for r in (0, 1)] for e in plan}
    resumed = _torchrun([{"name": "dropout-resumed", "config": lora("dropout-cut", 0.1, resume=True)}], root)
    return {"root": root, "plan": plan, "results": results, "first": first, "resumed": resumed}


def _launched(runs: dict, names) -> None:
    """The first launch reached every entry of ``names`` on both processes (the kill at its end aside)."""
    missing = [n for n in names if None in runs["results"][n]]
    assert not missing, f"{missing} did not finish: {runs['first'].stderr[-4000:]}"


@pytest.mark.slow
@pytest.mark.xdist_group("two-processes")
def test_data_parallel_matrix_and_a_nan_on_one_process(two_processes, tiny_llama_dir, one_thread):
    tmp_path, plan, result = two_processes["root"], two_processes["plan"], two_processes["results"]
    _launched(two_processes, [e["name"] for e in plan if not e["name"].startswith(("dropout-", "signal-", "nan-g"))])

    for method in OPTIONS:  # the same run on one process, with the whole batch
        ddp = result[f"ddp-{method}"]
        assert all(r["ok"] for r in ddp), ddp
        zo = method in ZO
        if not zo:  # gradients all-reduced once per step, on its last micro-batch only
            assert ddp[0]["syncs"] and set(ddp[0]["syncs"]) == {1}, ddp[0]["syncs"]
        single = config(tiny_llama_dir, tmp_path / "single" / method, method, max_steps=6, **DDP_EXTRA.get(method, {}),
                        method_options=plan[list(OPTIONS).index(method)]["config"]["method_options"])
        train.train(single)
        a, b = final_state(tmp_path / "ddp" / method), final_state(tmp_path / "single" / method)
        if zo:  # the same seeds; projected gradients equal to float tolerance, so the parameters too
            for name in b["last"]:
                torch.testing.assert_close(a["last"][name], b["last"][name], rtol=1e-4, atol=1e-6, msg=name)
        else:  # AdamW normalises each element's step, so summation-order noise in a near-zero gradient
            # can move that element by up to ~lr per step: tolerance 1e-4 against a total movement of ~1e-2
            for name in b["last"]:
                torch.testing.assert_close(a["last"][name], b["last"][name], rtol=1e-3, atol=1e-4, msg=name)
        assert [s for s, _ in a["rows"]] == [s for s, _ in b["rows"]]
        assert [x for _, x in a["rows"]] == pytest.approx([x for _, x in b["rows"]], rel=1e-5)
        metrics = [json.loads((tmp_path / run / method / "metrics.json").read_text()) for run in ("ddp", "single")]
        assert metrics[0]["num_processes"] == 2 and metrics[0]["examples_seen"] == metrics[1]["examples_seen"]

    # bfloat16 on two processes equals one process in bf16 to within bf16's rounding: far closer than bf16 is to
    # float32, so it did compute in bf16, and its adapters stayed float32
    assert all(r["ok"] for r in result["ddp-bf16"])
    train.train(config(tiny_llama_dir, tmp_path / "single-bf16", "loretta-rep", max_steps=6, dtype="bfloat16",
                       method_options=NO_DROPOUT))
    ddp, one = final_state(tmp_path / "ddp-bf16"), final_state(tmp_path / "single-bf16")
    fp32 = final_state(tmp_path / "single" / "loretta-rep")
    distance = lambda x, y: float(torch.cat([(x["last"][n] - y["last"][n]).flatten() for n in y["last"]]).norm())
    assert all(t.dtype == torch.float32 for t in ddp["last"].values())
    assert distance(ddp, one) < 0.6 * distance(one, fp32), (distance(ddp, one), distance(one, fp32))
    assert [x for _, x in ddp["rows"]] == pytest.approx([x for _, x in one["rows"]], abs=5e-3)

    assert all(r["ok"] for r in result["ddp-mixture"])
    stopped = result["nan-adamw"]
    assert not any(r["ok"] for r in stopped)
    assert stopped[0]["error"] == stopped[1]["error"]
    assert "loss became nan at step 2 on process(es) [1] of 2 (micro-batch 1" in stopped[0]["error"]
    state, _ = checkpoint.load(tmp_path / "nan-adamw")
    assert state["step"] == 2  # the checkpoint before the NaN, whole

    once = result["nan-zo-once"]
    assert all(r["ok"] for r in once)
    rows = [json.loads(x) for x in (tmp_path / "nan-zo-once" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("rolled_back")] == [3]
    lrs = [r["lr"] for r in rows]  # the lr each step used
    assert lrs[2] == lrs[1] and lrs[3] == lrs[4] == lrs[1] / 2 and lrs[5] == lrs[1]  # back after 2 good steps

    always = result["nan-zo-always"]
    assert not any(r["ok"] for r in always) and always[0]["error"] == always[1]["error"]
    assert "rolled back 5 steps in a row" in always[0]["error"]

    off = result["nan-zo-guard-off"]  # no rollback: every process stops at the NaN, the checkpoint before it intact
    assert not any(r["ok"] for r in off) and off[0]["error"] == off[1]["error"]
    assert "guard is off" in off[0]["error"]
    state, _ = checkpoint.load(tmp_path / "nan-zo-guard-off")
    assert state["step"] <= 2

    flat = result["flat-zo-guard-off"]  # a finite loss that stopped moving is divergence too, on every process
    assert not any(r["ok"] for r in flat) and flat[0]["error"] == flat[1]["error"]
    assert "did not change under any perturbation" in flat[0]["error"] and "guard is off" in flat[0]["error"]
    state, _ = checkpoint.load(tmp_path / "flat-zo-guard-off")
    assert state["step"] <= 2


@pytest.mark.slow
@pytest.mark.xdist_group("two-processes")
@pytest.mark.parametrize("name", list(ZO_OPTIMIZERS))
def test_each_zo_optimizer_on_two_processes_equals_one_process(two_processes, tiny_llama_dir, name, one_thread):
    """Each process evaluates its share of the queries on the whole batch and only seeds and losses are
    exchanged, so two processes make the run one makes, row for row and bit for bit, also when one process has
    no query of its own (it runs as many forwards anyway, of the unperturbed model)."""
    root, entry = two_processes["root"], f"ddp-zo-{name}"
    _launched(two_processes, [entry])
    assert all(r["ok"] for r in two_processes["results"][entry]), two_processes["results"][entry]
    train.train(zo_config(tiny_llama_dir, root / "single-zo" / name, name, max_steps=4,
                          queries=DDP_ZO_QUERIES.get(name, 1)))
    assert_same(final_state(root / "ddp-zo" / name), final_state(root / "single-zo" / name))
    assert logged(root / "ddp-zo" / name) == logged(root / "single-zo" / name)
    metrics = json.loads((root / "ddp-zo" / name / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["steps"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("save_every,saved_at", [("2", 4), ("0.001s", 5), ("0", 0)])
def test_checkpoints_come_at_their_own_cadence_not_only_with_evaluations(tiny_llama_dir, tmp_path, monkeypatch,
                                                                        save_every, saved_at):
    """A run that evaluates every 50 steps and is stopped at step 6 once resumed from step 0; with
    ``save_every`` in steps or time it resumes from the last checkpoint of that cadence."""
    from leanft import optim

    real_step = optim.FirstOrder.step

    def crash_at_6(self, step, epoch, micro_batches):
        if step == 5:
            raise KeyboardInterrupt("simulated crash")
        return real_step(self, step, epoch, micro_batches)

    monkeypatch.setattr(optim.FirstOrder, "step", crash_at_6)
    cfg = config(tiny_llama_dir, tmp_path, "lora", eval_every=50, save_every=save_every)
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg)
    assert (checkpoint.load(tmp_path)[0]["step"] if saved_at else checkpoint.exists(tmp_path)) == saved_at


@pytest.mark.slow
def test_resuming_with_the_other_optimizer_says_so_not_damaged(tiny_llama_dir, tmp_path, capsys):
    for first, then, says in (("mezo-lora", "lora", "holds a zeroth-order run"),
                              ("lora", "mezo-lora", "holds a first-order \\(AdamW\\) run")):
        out = tmp_path / first
        train.train(config(tiny_llama_dir, out, first, max_steps=2))
        with pytest.raises(CheckpointError, match=says):
            train.train(config(tiny_llama_dir, out, then, max_steps=4, resume=True))
    train.train(config(tiny_llama_dir, tmp_path / "fresh", "lora", max_steps=1, resume=True))
    assert "--resume: no checkpoint in" in capsys.readouterr().out


@pytest.mark.slow
def test_an_adapter_evaluated_on_another_base_model_is_refused_in_one_sentence(tiny_llama_dir, tiny_bert_dir, tmp_path):
    from leanft.evaluate import evaluate_saved

    train.train(config(tiny_llama_dir, tmp_path, "lora", max_steps=1))
    info = tmp_path / "best" / "leanft_run.json"
    info.write_text(info.read_text().replace(json.dumps(tiny_llama_dir), json.dumps(tiny_bert_dir)))
    with pytest.raises(ValueError, match="does not fit the base model"):
        evaluate_saved(tmp_path / "best", TrainConfig(num_eval=4, task=""))


@pytest.mark.slow
@pytest.mark.xdist_group("two-processes")
def test_two_processes_with_dropout_killed_and_resumed_equal_the_uninterrupted_run(two_processes, one_thread):
    """Each process draws its own dropout masks: the checkpoint keeps every process's random states and each
    restores its own. A clock that runs fast on one process (it finds a time-based save due at every step,
    the other does not) does not make the processes disagree on when to save, which they do together."""
    tmp_path = two_processes["root"]
    assert two_processes["first"].returncode != 0 and two_processes["results"]["dropout-cut"] == [None, None]
    _launched(two_processes, ["dropout-whole", "dropout-clock"])
    assert all(r["ok"] for name in ("dropout-whole", "dropout-clock") for r in two_processes["results"][name])
    assert checkpoint.load(tmp_path / "dropout-clock")[0]["step"] == 6
    resumed = two_processes["resumed"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at step 3" in resumed.stdout
    assert_same(final_state(tmp_path / "dropout-whole"), final_state(tmp_path / "dropout-cut"))
    states = [torch.load(tmp_path / "dropout-cut" / "checkpoint" / f"rng-{r}.pt", weights_only=False) for r in (0, 1)]
    assert not torch.equal(states[0]["torch"], states[1]["torch"])  # the processes' streams differ


TERM_AT = {"lora": (5, 1), "mezo-lora": (5, -1)}  # in step 6 of 8 (second micro-batch of a first-order step)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "mezo-lora"])
def test_sigterm_mid_step_checkpoints_that_step_and_resumes_to_the_uninterrupted_result(tiny_llama_dir, tmp_path,
                                                                                       method, one_thread):
    """A scheduler's SIGTERM in step 6 of a run that checkpoints with its evaluations only (steps 4 and 8) once
    ended it there, steps 5-6 lost. Now the step finishes and is checkpointed, `leanft train` says how to resume
    and exits 143, and the resumed run ends as the uninterrupted one."""
    train.train(config(tiny_llama_dir, tmp_path / "whole", method, save_every="0"))
    cut, cfg_file = tmp_path / "cut", tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(asdict(config(tiny_llama_dir, cut, method, save_every="0"))))
    status, said = in_child("term", str(cfg_file), *map(str, TERM_AT[method]))
    assert status == 143, said[-3000:]
    assert f"stopped by SIGTERM after step 6; the checkpoint is in {cut / 'checkpoint'}" in said
    assert f"resume with: leanft train --config {cfg_file} --resume" in said
    assert checkpoint.load(cut)[0]["step"] == 6
    train.train(config(tiny_llama_dir, cut, method, save_every="0", resume=True))
    assert_same(final_state(tmp_path / "whole"), final_state(cut))


@pytest.mark.slow
def test_overwrite_deletes_the_old_run_first_so_a_kill_before_the_first_save_cannot_resume_it(tiny_llama_dir,
                                                                                             tmp_path, one_thread):
    """A fresh run over a finished one, killed before its first checkpoint, once left the old run's checkpoint,
    which --resume then continued. With overwrite the old files go first: the resume starts the new run afresh."""
    train.train(config(tiny_llama_dir, tmp_path / "run", "lora"))
    new = dict(lr=5e-3, save_every="0")
    (tmp_path / "cfg.json").write_text(json.dumps(asdict(config(tiny_llama_dir, tmp_path / "run", "lora",
                                                                overwrite=True, **new))))
    status, said = in_child("kill", str(tmp_path / "cfg.json"), "1", "1")
    assert status == -9, said[-3000:]
    assert not checkpoint.exists(tmp_path / "run") and not (tmp_path / "run" / "best").exists()
    train.train(config(tiny_llama_dir, tmp_path / "run", "lora", resume=True, **new))
    train.train(config(tiny_llama_dir, tmp_path / "whole", "lora", **new))
    assert_same(final_state(tmp_path / "whole"), final_state(tmp_path / "run"))


@pytest.mark.slow
@pytest.mark.xdist_group("two-processes")
def test_two_processes_signalled_at_different_steps_stop_together_and_resume_exactly(two_processes):
    """SIGTERM reaches process 1 only, in step 3: both stop after step 3 with its checkpoint, and resume to the
    uninterrupted run; a fresh run over that folder in between is refused on both processes, which end."""
    tmp_path, result = two_processes["root"], two_processes["results"]
    _launched(two_processes, ["signal-whole", "signal-stopped", "signal-refused", "signal-resumed"])
    assert all(r["ok"] for name in ("signal-whole", "signal-resumed") for r in result[name])
    for name, says in (("signal-stopped", "stopped by SIGTERM after step 3"), ("signal-refused", "holds another run")):
        assert [says in r.get("error", "") for r in result[name]] == [True, True], result[name]
    assert f"resumed from {tmp_path / 'signal-cut' / 'checkpoint'} at step 3" in two_processes["first"].stdout
    assert_same(final_state(tmp_path / "signal-whole"), final_state(tmp_path / "signal-cut"))


@pytest.mark.slow
def test_lamda_with_weight_decay_through_the_freeze(tiny_llama_dir, tmp_path, monkeypatch):
    """Weight decay (towards P_B's SVD start) through LaMDA's freeze, stopped inside the partial freeze and
    resumed: every column of P_B stays bit-exactly as it was at the step it froze, in the whole run and in
    the resumed one, which ends as the whole one does."""
    from leanft.tuners.lamda.schedule import frozen_count

    real_save, seen, crash = runfolder.save_checkpoint, {}, [True]

    def save_and_record(out, updater, state, accel):
        real_save(out, updater, state, accel)
        seen[out.name, state["step"]] = {n: p.detach().clone() for n, p in updater.model.named_parameters()
                                         if ".lamda_B." in n}
        if out.name == "cut" and state["step"] == 2 and crash:
            crash.clear()
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(runfolder, "save_checkpoint", save_and_record)
    train.train(config(tiny_llama_dir, tmp_path / "whole", "lamda", weight_decay=0.1))
    with pytest.raises(KeyboardInterrupt):
        train.train(config(tiny_llama_dir, tmp_path / "cut", "lamda", weight_decay=0.1))
    train.train(config(tiny_llama_dir, tmp_path / "cut", "lamda", weight_decay=0.1, resume=True))
    assert_same(final_state(tmp_path / "whole"), final_state(tmp_path / "cut"))
    for run in ("whole", "cut"):
        assert sorted(k for r, k in seen if r == run) == list(range(1, 9))
        for k in range(1, 9):
            frozen = frozen_count(4, k, 8, 0.3)  # top_first: columns 0..frozen-1, all 4 from step 3
            for later in range(k + 1, 9):
                for name, b in seen[run, later].items():
                    assert torch.equal(b[:, :frozen], seen[run, k][name][:, :frozen]), (run, name, k, later)
        assert all(not torch.equal(b[:, 3], seen[run, 1][n][:, 3]) for n, b in seen[run, 2].items())  # live trains


@pytest.mark.slow
@pytest.mark.xdist_group("two-processes")
def test_a_nan_gradient_on_one_process_stops_every_process(two_processes):
    """A finite loss with a NaN gradient on process 1, in the first micro-batch (accumulated without a sync):
    the all-reduce carries it to every process, and all stop before the update with the step's checkpoint."""
    _launched(two_processes, ["nan-gradient"])
    stopped = two_processes["results"]["nan-gradient"]
    assert not any(r["ok"] for r in stopped) and stopped[0]["error"] == stopped[1]["error"]
    assert "gradient became non-finite (norm nan) at step 2 with a finite training loss" in stopped[0]["error"]
    state, _ = checkpoint.load(two_processes["root"] / "nan-gradient")
    assert state["step"] == 2
    saved = load_file(str(two_processes["root"] / "nan-gradient" / "checkpoint" / "trainable.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())


@pytest.mark.slow
def test_fp16_zo_trainer_on_the_scaler_path_steps(tiny_llama_dir, tmp_path):
    """fp16 on a GPU gives the Trainer a GradScaler, which refuses to step an optimiser when no loss was scaled
    ("Attempted step but _scale is None"), and zeroth-order steps scale none. A real CPU GradScaler stands in for
    the GPU's (fp16 on CPU has none): every step is taken, the adapters move, no grad_norm is logged."""
    from test_hf import trainable, trainer_of, zo_model

    import leanft

    model, tokenizer = zo_model(tiny_llama_dir)
    start = trainable(model)
    trainer = trainer_of(leanft.ZOTrainer, model, tokenizer, tmp_path, steps=3, zo_queries=2,
                         args={"learning_rate": 1e-3, "fp16": True, "use_cpu": True})
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu")
    trainer.train()
    assert trainer.state.global_step == 3
    assert all(not torch.equal(p, start[n]) for n, p in trainable(model).items())
    assert trainer.state.log_history and not any("grad_norm" in h for h in trainer.state.log_history)
