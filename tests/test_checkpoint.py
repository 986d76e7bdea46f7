"""Tests for leanft.checkpoint and the run folder's checkpoints: exact RNG round trips (CUDA faked), a
zeroth-order run's state, and damaged checkpoints that fail clearly without a half load."""

from __future__ import annotations

import os
import pathlib
import random
from types import SimpleNamespace

import numpy as np
import peft
import pytest
import torch
from conftest import perturb, tiny_llama

from leanft import checkpoint, optim, runfolder


def lora_model() -> torch.nn.Module:
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return peft.get_peft_model(tiny_llama(), cfg)


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in checkpoint.trainable_state(model).items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def draws() -> tuple:
    return torch.rand(4).tolist(), random.random(), np.random.rand(3).tolist()


def seed_all(seed: int) -> None:
    torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)


@pytest.fixture
def model():
    m = lora_model()
    perturb(m)
    return m


def save_run(out, model, state=None):
    checkpoint.save(out, state or {"step": 3}, model, {"optimizer": {"lr": 0.1}})


# ---- RNG states ----------------------------------------------------------------------------------


def test_rng_states_and_tensors_round_trip(model, tmp_path):
    seed_all(5)
    draws()
    saved = trainable(model)
    save_run(tmp_path, model)
    expected = draws()
    perturb(model)  # parameters move and the RNGs advance after the save
    draws()
    assert not same(trainable(model), saved)
    state, extra = checkpoint.load(tmp_path, model)
    assert state == {"step": 3} and extra["optimizer"] == {"lr": 0.1}
    assert draws() == expected
    assert same(trainable(model), saved)


class FakeCuda:
    """torch.cuda with ``n`` devices whose RNG states are plain byte tensors held here."""

    def __init__(self, monkeypatch, n: int, initialized: bool = True) -> None:
        self.states = [torch.full((16,), i + 1, dtype=torch.uint8) for i in range(n)]
        self.restored = None
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialized)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in self.states])
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: setattr(self, "restored", list(states)))


def test_cuda_rng_states_are_saved_and_restored(model, tmp_path, monkeypatch):
    cuda = FakeCuda(monkeypatch, 2)
    save_run(tmp_path, model)
    rng = torch.load(tmp_path / "checkpoint" / "rng-0.pt", weights_only=False)
    assert [s.tolist() for s in rng["cuda"]] == [s.tolist() for s in cuda.states]
    cuda.states = [torch.zeros(16, dtype=torch.uint8)] * 2  # the run goes on: the states move
    checkpoint.load(tmp_path, model)
    assert [s.tolist() for s in cuda.restored] == [[1] * 16, [2] * 16]


def test_a_run_that_never_initialised_cuda_saves_no_cuda_states(model, tmp_path, monkeypatch):
    FakeCuda(monkeypatch, 1, initialized=False)
    save_run(tmp_path, model)
    assert "cuda" not in torch.load(tmp_path / "checkpoint" / "rng-0.pt", weights_only=False)
    monkeypatch.undo()
    checkpoint.load(tmp_path, model)  # resumable on a CPU-only machine


@pytest.mark.parametrize("devices_then,devices_now,says", [(1, 0, "no CUDA"), (2, 1, "1 GPU")])
def test_cuda_states_this_machine_cannot_take_are_refused_before_any_restore(model, tmp_path, monkeypatch,
                                                                           devices_then, devices_now, says):
    with monkeypatch.context() as m:
        FakeCuda(m, devices_then)
        save_run(tmp_path, model)
    cuda = FakeCuda(monkeypatch, devices_now)
    perturb(model)
    before = trainable(model)
    seed_all(9)
    expected = draws()
    seed_all(9)
    with pytest.raises(checkpoint.CheckpointError, match=f"{devices_then} GPU.*{says}.*same kind of machine") as e:
        checkpoint.load(tmp_path, model)
    assert "rng-0.pt" in str(e.value)
    assert same(trainable(model), before) and draws() == expected and cuda.restored is None  # nothing restored
    with pytest.warns(UserWarning, match="not be bit-exact"):
        checkpoint.load(tmp_path, model, allow_inexact=True)
    assert not same(trainable(model), before) and cuda.restored is None


# ---- damaged checkpoints ---------------------------------------------------------------------------


def truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage,file,error", [
    (lambda p: p.unlink(), "trainable.safetensors", FileNotFoundError),
    (truncate, "trainable.safetensors", checkpoint.CheckpointError),
    (lambda p: p.write_bytes(b"\x00" * 7), "trainable.safetensors", checkpoint.CheckpointError),
    (lambda p: p.unlink(), "trainer_state.json", FileNotFoundError),
    (lambda p: p.write_text('{"step": 3'), "trainer_state.json", checkpoint.CheckpointError),
    (lambda p: p.unlink(), "optimizer.pt", FileNotFoundError),
    (truncate, "optimizer.pt", checkpoint.CheckpointError),
    (lambda p: p.unlink(), "rng-0.pt", FileNotFoundError),
    (truncate, "rng-0.pt", checkpoint.CheckpointError),
])
def test_a_damaged_checkpoint_is_a_clear_error_naming_the_file_and_nothing_is_restored(model, tmp_path, damage, file,
                                                                                      error):
    save_run(tmp_path, model)
    damage(tmp_path / "checkpoint" / file)
    assert checkpoint.exists(tmp_path)  # a damaged folder is not mistaken for "no checkpoint": no silent restart
    perturb(model)
    before = trainable(model)
    seed_all(9)
    expected = draws()
    seed_all(9)
    with pytest.raises(error, match=f"damaged checkpoint: .*{file}"):
        checkpoint.load(tmp_path, model)
    assert same(trainable(model), before) and draws() == expected


def test_tensors_for_another_model_are_refused_before_any_copy(model, tmp_path):
    save_run(tmp_path, model)
    other = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                               task_type="CAUSAL_LM"))
    before = trainable(other)
    with pytest.raises(checkpoint.CheckpointError, match="trainable.safetensors: tensor .* has shape"):
        checkpoint.load(tmp_path, other)
    assert same(trainable(other), before)


def test_no_checkpoint_at_all_is_still_the_resume_hint(tmp_path):
    assert not checkpoint.exists(tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        checkpoint.load(tmp_path)


# ---- a zeroth-order run's checkpoint ---------------------------------------------------------------

ONE_PROCESS = SimpleNamespace(num_processes=1, process_index=0, is_main_process=True)


def zo_updater(model) -> optim.ZerothOrder:
    tokens = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    objective = lambda net, batch: net(input_ids=tokens, labels=tokens).loss  # noqa: E731
    return optim.ZerothOrder(model, model, objective, 1e-2, eps=1e-3, recover=3, scheduler="linear", total_steps=10)


def test_a_zeroth_order_checkpoint_resumes_exactly_on_any_number_of_processes(tmp_path):
    model = lora_model()
    updater = zo_updater(model)
    for step in range(3):
        updater.step(step, 0, [None])
    updater.engine.rollback("a test")  # the guard's books (lr halved) are part of the state
    runfolder.save_checkpoint(tmp_path, updater, {"step": 3}, ONE_PROCESS)
    assert not list((tmp_path / "checkpoint").glob("rng-*"))  # directions come from seeds: no RNG states
    expected = [updater.step(step, 0, [None])["loss"] for step in range(3, 6)]
    for world in (1, 2):  # the same parameters, lr scale, schedule and forwards whatever the process count
        fresh = zo_updater(lora_model())
        state = runfolder.resume(tmp_path, fresh, SimpleNamespace(num_processes=world, process_index=world - 1))
        assert state["step"] == 3 and fresh.forwards == 6 and fresh.engine.lr_scale == 0.5
        assert [fresh.step(step, 0, [None])["loss"] for step in range(3, 6)] == expected
        assert same(trainable(fresh.model), trainable(model))


def test_a_step_log_checkpoint_of_an_older_leanft_is_refused_with_what_to_do(tmp_path):
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "trainer_state.json").write_text('{"step": 3, "forwards": 6}')
    (tmp_path / "zo_log.jsonl").write_text("")
    with pytest.raises(checkpoint.CheckpointError, match="step log.*leanft version that wrote it.*--overwrite"):
        runfolder.resume(tmp_path, zo_updater(lora_model()), ONE_PROCESS)


# ---- durability: whole or not at all, on disk, and found again after a crash ---------------------


class Killed(Exception):
    """A simulated kill at a chosen point of a write."""


def test_a_kill_while_a_file_beside_a_checkpoint_is_rewritten_leaves_the_old_one_whole(tmp_path, monkeypatch):
    checkpoint.write_object(tmp_path / "state.pt", {"step": 1})
    real = torch.save

    def killed(obj, f, *args, **kwargs):  # half the bytes written, then the process dies
        real(obj, f, *args, **kwargs)
        pathlib.Path(f).write_bytes(pathlib.Path(f).read_bytes()[:20])
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(torch, "save", killed)
        with pytest.raises(Killed):
            checkpoint.write_object(tmp_path / "state.pt", {"step": 2})
    assert checkpoint.read_object(tmp_path / "state.pt", "a state") == {"step": 1}


@pytest.fixture
def disk_events(monkeypatch) -> list[tuple]:
    """In order: ``("fsync", path)`` for each fsync and ``("rename", source, target)`` for each rename."""
    if not pathlib.Path("/proc/self/fd").is_dir():
        pytest.skip("naming an fsynced descriptor needs /proc")
    events = []
    real_fsync, real_rename, real_replace = os.fsync, pathlib.Path.rename, os.replace

    def fsync(fd):
        events.append(("fsync", pathlib.Path(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    def rename(self, target):
        events.append(("rename", pathlib.Path(self).resolve(), pathlib.Path(target).resolve()))
        return real_rename(self, target)

    def replace(source, target):
        events.append(("rename", pathlib.Path(source).resolve(), pathlib.Path(target).resolve()))
        return real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(pathlib.Path, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_a_checkpoint_is_on_disk_before_it_replaces_the_old_one_and_the_swap_after(model, tmp_path, disk_events):
    save_run(tmp_path, model)
    disk_events.clear()
    save_run(tmp_path, model, {"step": 4})
    out = tmp_path.resolve()
    first = next(i for i, e in enumerate(disk_events) if e[0] == "rename")
    written = disk_events[first][1]  # the temporary folder the checkpoint was written to
    synced = {e[1] for e in disk_events[:first] if e[0] == "fsync"}
    assert {written / f.name for f in (tmp_path / "checkpoint").iterdir()} | {written} <= synced
    last = max(i for i, e in enumerate(disk_events) if e[0] == "rename")
    assert ("fsync", out) in disk_events[last:]


def test_a_file_beside_a_checkpoint_is_on_disk_before_it_replaces_the_old(tmp_path, disk_events):
    checkpoint.write_object(tmp_path / "state.pt", {"step": 1})
    disk_events.clear()
    checkpoint.write_object(tmp_path / "state.pt", {"step": 2})
    out = tmp_path.resolve()
    swap = next(i for i, e in enumerate(disk_events) if e[0] == "rename" and e[2] == out / "state.pt")
    assert ("fsync", disk_events[swap][1]) in disk_events[:swap] and ("fsync", out) in disk_events[swap:]
    assert checkpoint.read_object(tmp_path / "state.pt", "a state") == {"step": 2}


def kill_at_rename(monkeypatch, n: int) -> None:
    """The process dies instead of doing its ``n``-th rename (0: while writing the files)."""
    real, done = pathlib.Path.rename, []

    def rename(self, target):
        done.append(self)
        if len(done) == n:
            raise Killed
        return real(self, target)

    def write_killed(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(pathlib.Path, "rename", rename)
    if n == 0:
        monkeypatch.setattr(checkpoint, "save_file", write_killed)


# the step a resume finds after the save of step 4 over step 3 is killed: before its folder is complete,
# step 3; after it (before, between or after the swap's renames), step 4
@pytest.mark.parametrize("kill_at,resumes_at", [(0, 3), (1, 3), (2, 4), (3, 4)])
def test_a_save_killed_at_any_point_leaves_the_newest_complete_checkpoint(model, tmp_path, monkeypatch, kill_at,
                                                                          resumes_at):
    save_run(tmp_path, model, {"step": 3})
    with monkeypatch.context() as m:
        kill_at_rename(m, kill_at)
        with pytest.raises(Killed):
            save_run(tmp_path, model, {"step": 4})
    assert checkpoint.exists(tmp_path)
    assert checkpoint.load(tmp_path, model)[0]["step"] == resumes_at
    save_run(tmp_path, model, {"step": 5})  # the next save takes the recovered one's place and clears the rest
    assert checkpoint.load(tmp_path, model)[0]["step"] == 5
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]


@pytest.mark.parametrize("kill_at", [2, 3])
def test_the_best_adapter_survives_a_kill_between_its_renames(tmp_path, monkeypatch, kill_at):
    first, second = lora_model(), lora_model()
    perturb(first), perturb(second), perturb(second)
    runfolder.save_best(tmp_path, first, None, {"step": 1})
    with monkeypatch.context() as m:
        kill_at_rename(m, kill_at)
        with pytest.raises(Killed):
            runfolder.save_best(tmp_path, second, None, {"step": 2})
    loaded = lora_model()
    runfolder.load_best(tmp_path, loaded)
    assert same(trainable(loaded), trainable(second))


# ---- one set of random states per process --------------------------------------------------------


def per_process_states(world: int) -> tuple[list[dict], list[tuple]]:
    """``world`` processes' RNG states (seeded by rank) and what each then draws."""
    states, expected = [], []
    for rank in range(world):
        seed_all(rank)
        states.append(checkpoint.rng_states())
        expected.append(draws())
    return states, expected


def test_each_process_saves_and_restores_its_own_random_states(model, tmp_path):
    states, expected = per_process_states(2)
    checkpoint.save(tmp_path, {"step": 3}, model, {}, rngs=states)
    assert sorted(p.name for p in (tmp_path / "checkpoint").glob("rng-*")) == ["rng-0.pt", "rng-1.pt"]
    for rank in (1, 0):
        seed_all(9)
        checkpoint.load(tmp_path, model, rank=rank, world=2)
        assert draws() == expected[rank]


def test_resuming_on_another_number_of_processes_is_refused_before_any_restore(model, tmp_path):
    states, expected = per_process_states(2)
    checkpoint.save(tmp_path, {"step": 3}, model, {}, rngs=states)
    perturb(model)
    before = trainable(model)
    with pytest.raises(checkpoint.CheckpointError, match="states of 2 process.*resumed on 1.*--nproc_per_node 2"):
        checkpoint.load(tmp_path, model)
    assert same(trainable(model), before)
    with pytest.warns(UserWarning, match="random states of 2 process.*not be bit-exact"):
        checkpoint.load(tmp_path, model, allow_inexact=True)
    assert draws() == expected[0]


def test_a_checkpoint_with_the_random_states_in_optimizer_pt_still_resumes(model, tmp_path):
    """Written by an older leanft: one process's states inside optimizer.pt, no rng files."""
    save_run(tmp_path, model)
    ckpt = tmp_path / "checkpoint"
    for f in ckpt.glob("rng-*.pt"):
        f.unlink()
    seed_all(4)
    torch.save({"optimizer": {"lr": 0.1}, "rng": checkpoint.rng_states()}, ckpt / "optimizer.pt")
    expected = draws()
    _, extra = checkpoint.load(tmp_path, model)
    assert draws() == expected and extra["optimizer"] == {"lr": 0.1}
