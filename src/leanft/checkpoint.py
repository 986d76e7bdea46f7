"""Checkpoint files that a crash never leaves half-written, and loading that checks every file first.

File handling only: what goes in a checkpoint is its owners' (the run folder, ``leanft.runfolder``, decides
when; an updater's ``state_dict`` what). Every folder is written to a temporary sibling, fsynced, and renamed
into place, replacing the older one only afterwards; a crash between the renames leaves one of the two
complete, which ``complete_dir`` finds and the next write puts back in place. A checkpoint holds the loop's
state (``trainer_state.json``), the trainable tensors, the updater's state (``optimizer.pt``) and, for a run
that draws from the global RNGs (dropout), each process's RNG states (torch CPU, every CUDA device when the
run used CUDA, python, numpy; ``rng-<rank>.pt``). Loading reads and checks every file before it restores
anything, so a damaged checkpoint is a clear error, never a half load.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel
from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING
from safetensors.torch import load_file, save_file
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: damaged, or written where a resume could not be exact."""


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training changes or a resume needs: trainable parameters and the adapter's own persistent
    buffers (e.g. the frozen initial factors of a noise-free start). Non-persistent buffers (LaMDA's copy
    of P_B's frozen columns) are working state that a resume rebuilds, as a fresh model lacks them."""
    state = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if isinstance(model, PeftModel):  # adapter tensors frozen during training (LaMDA's P_B) count too
        prefix = PEFT_TYPE_TO_PREFIX_MAPPING[model.peft_config[model.active_adapter].peft_type]
        persistent = model.state_dict(keep_vars=True).keys()
        state.update({n: t for n, t in [*model.named_parameters(), *model.named_buffers()]
                      if prefix in n and n in persistent})
    return {n: t.detach().cpu().contiguous() for n, t in state.items()}


def _need(path: Path) -> None:
    """``path`` exists and is a readable file, or a clear error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"damaged checkpoint: {path} is missing (the checkpoint cannot be resumed from; "
                                "restore the file or start the run afresh)")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise CheckpointError(f"damaged checkpoint: cannot read {path}: {e}") from e


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or a clear error naming the file."""
    _need(path)
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for truncated or garbled files
        raise CheckpointError(f"damaged checkpoint: {path} is not a readable safetensors file ({e})") from e


def _fit(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """``model``'s tensor for each saved name, after checking every name and shape (nothing copied yet)."""
    own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise CheckpointError(f"{path} holds {len(unknown)} tensor(s) the model does not have (e.g. {unknown[0]}): "
                              "was it written for another model, method or adapter configuration?")
    for name, t in tensors.items():
        if own[name].shape != t.shape:
            raise CheckpointError(f"{path}: tensor {name} has shape {tuple(t.shape)}, the model's has "
                                  f"{tuple(own[name].shape)}: was it written for another configuration?")
    return {name: own[name] for name in tensors}


def _copy(targets: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, tensor in tensors.items():
            targets[name].data.copy_(tensor)


def load_tensors(model: nn.Module, path: Path) -> None:
    """Copy a ``trainable_state`` file back into ``model``'s parameters and buffers; the whole file is
    read and checked against the model first, so an error leaves the model untouched."""
    tensors = read_tensors(path)
    _copy(_fit(model, tensors, path), tensors)


def fsync(path: Path) -> None:
    """Flush ``path`` to disk: a file's bytes, or a folder's entries (the names of what was created or
    renamed in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: Path, write) -> None:
    """``write(tmp)`` a sibling and rename it over ``path``, both on disk: ``path`` is whole before and after."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    fsync(tmp)
    os.replace(tmp, path)
    fsync(path.parent)


def write_object(path: Path, obj: dict) -> None:
    """``torch.save(obj)`` to ``path`` through ``replace_file``: whole on disk, or the old file kept."""
    replace_file(path, lambda tmp: torch.save(obj, tmp))


def _leftovers(target: Path, kind: str) -> list[Path]:
    """``atomic_dir``'s folders of that ``kind`` for ``target``, newest last."""
    found = [p for p in target.parent.glob(f".{target.name}.{kind}-*") if p.is_dir()]
    return sorted(found, key=lambda p: p.stat().st_mtime_ns)


def complete_dir(target: Path) -> Path | None:
    """The newest complete folder ``atomic_dir`` left for ``target``, None when there is none.

    ``.new-`` folders are complete (written and fsynced before renamed to that name), newer than ``target``
    (a crash came before they replaced it); ``.old-`` ones are complete and older (moved aside, a crash came
    before the new one took their place); ``.tmp-`` ones may be half-written and never count."""
    new, old = _leftovers(target, "new"), _leftovers(target, "old")
    return new[-1] if new else target if target.is_dir() else old[-1] if old else None


def _recover(target: Path) -> None:
    """Put the folder a crash left for ``target`` (``complete_dir``) in place, and delete the others."""
    found = complete_dir(target)
    if found is not None and found != target:
        shutil.rmtree(target, ignore_errors=True)  # older: until the rename, ``found`` is still the one found
        found.rename(target)
        fsync(target.parent)
    for kind in ("tmp", "new", "old"):
        for stale in _leftovers(target, kind):
            shutil.rmtree(stale)


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` and ``root`` itself, deepest first."""
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        fsync(path)
    fsync(root)


def atomic_dir(target: Path, write) -> None:
    """Run ``write(tmp_dir)`` and move the result to ``target``, replacing an older one only after.

    The result is on disk (every file and folder fsynced) before it is renamed ``.new-``, which marks it
    complete, and the renames are fsynced, so a crash or power cut at any point leaves the older or the
    newer folder complete; ``complete_dir`` finds it, and this function, run again, first puts it back."""
    _recover(target)
    tmp, new, old = (target.with_name(f".{target.name}.{kind}-{os.getpid()}") for kind in ("tmp", "new", "old"))
    tmp.mkdir(parents=True)
    write(tmp)
    _fsync_tree(tmp)
    tmp.rename(new)
    fsync(target.parent)
    if target.exists():
        target.rename(old)
    new.rename(target)
    fsync(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def rng_states() -> dict:
    """Every RNG state a resume needs. CUDA's (one per visible device) only when this process has
    initialised CUDA: a run that never did drew nothing from it, and can be resumed anywhere."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = list(torch.cuda.get_rng_state_all())
    return rng


def _check_rng(rng, path: Path, allow_inexact: bool, on_cuda: bool) -> bool:
    """Whether the saved CUDA states are to be restored; a clear error for a malformed ``rng`` entry or
    for CUDA states this machine cannot take (a resume there could not be bit-exact)."""
    if not isinstance(rng, dict) or not {"torch", "python", "numpy"} <= rng.keys():
        raise CheckpointError(f"damaged checkpoint: {path} lacks the RNG states (torch, python, numpy)")
    if not (isinstance(rng["torch"], torch.Tensor) and rng["torch"].dtype == torch.uint8):
        raise CheckpointError(f"damaged checkpoint: {path}: the torch RNG state is not a byte tensor")
    if "cuda" not in rng:
        if on_cuda:
            warnings.warn(f"{path} holds no CUDA random states (written by an older leanft, or by a run that did not use CUDA): CUDA randomness such as "
                          "dropout will not continue exactly as in the uninterrupted run", stacklevel=3)
        return False
    saved = len(rng["cuda"])
    here = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if here == saved:
        return True
    why = (f"{path} holds the CUDA random states of {saved} GPU(s) (the run drew random numbers on CUDA, e.g. "
           f"for dropout), but this machine has {'no CUDA' if here == 0 else f'{here} GPU(s)'}")
    if allow_inexact:
        warnings.warn(f"{why}: the CUDA random states are not restored, so the resumed run will not be bit-exact",
                      stacklevel=3)
        return False
    raise CheckpointError(f"{why}, so the resume could not be bit-exact. Resume on the same kind of machine with "
                          f"{saved} visible GPU(s) (CUDA_VISIBLE_DEVICES) or start the run afresh; to resume here anyway, "
                          "accepting a run that differs from the uninterrupted one, load with allow_inexact=True")


def _set_rng(rng: dict, cuda: bool) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    if cuda:
        torch.cuda.set_rng_state_all(rng["cuda"])


def save(out: Path, state: dict, model: nn.Module, updater_state: dict, rngs: list[dict] | None = None) -> None:
    """``out/checkpoint``: the loop's ``state``, the trainable tensors of ``model``, the updater's
    ``updater_state`` and the RNG states of every process (``rngs``, in rank order, one ``rng-<rank>.pt``
    each; None: this process's ``rng_states``; ``[]``: none, for a run that draws no random numbers)."""
    every = [rng_states()] if rngs is None else rngs

    def write(d: Path) -> None:
        save_file(trainable_state(model), str(d / "trainable.safetensors"))
        torch.save({**updater_state, "processes": len(every)}, d / "optimizer.pt")
        for rank, rng in enumerate(every):
            torch.save(rng, d / f"rng-{rank}.pt")
        (d / "trainer_state.json").write_text(json.dumps(state, indent=1))

    atomic_dir(out / "checkpoint", write)


def exists(out: Path) -> bool:
    """Whether ``out`` has a checkpoint to resume from (``complete_dir``: also one a crash left aside). A
    ``checkpoint`` folder is only ever renamed into place complete, so one lacking files is damaged: it
    counts, and ``load`` says what is wrong with it (rather than a fresh start silently overwriting it)."""
    return complete_dir(out / "checkpoint") is not None


def _read_json(path: Path):
    _need(path)
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"damaged checkpoint: {path} is not valid JSON ({e})") from e


def read_object(path: Path, holds: str) -> dict:
    """The dict ``torch.save`` wrote to ``path`` (``holds`` names it in the error for a damaged file)."""
    _need(path)
    try:
        data = torch.load(path, weights_only=False)
    except Exception as e:  # truncated pickle / zip: EOFError, RuntimeError, UnpicklingError ...
        raise CheckpointError(f"damaged checkpoint: {path} cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"damaged checkpoint: {path} does not hold {holds}")
    return data


def _own_rng(ckpt: Path, extra: dict, rank: int, world: int, allow_inexact: bool) -> tuple[dict | None, Path | None]:
    """Process ``rank``'s saved RNG states and the file they are in (None for a run that saved none). A
    checkpoint of another number of processes is refused: neither the processes' random streams (dropout) nor
    their shares of every batch would continue as in the uninterrupted run; ``allow_inexact`` resumes with a
    warning."""
    extra_file = ckpt / "optimizer.pt"
    if "rng" in extra:  # written by an older leanft: the first process's states, in optimizer.pt
        saved, path = 1, extra_file
    else:
        saved = extra.get("processes")
        if not isinstance(saved, int) or saved < 0:
            raise CheckpointError(f"damaged checkpoint: {extra_file} does not say how many processes wrote it")
        if saved == 0:  # a run that draws no random numbers (zeroth-order): any process count resumes it
            return None, None
        path = ckpt / f"rng-{rank if rank < saved else 0}.pt"
    if saved != world:
        why = (f"{ckpt} holds the random states of {saved} process(es) and is resumed on {world}: their random "
               "streams (dropout) and their shares of every batch would not continue as in the uninterrupted run")
        if not allow_inexact:
            raise CheckpointError(f"{why}. Resume on {saved} process(es) (torchrun --nproc_per_node {saved}, "
                                  f"accelerate launch --num_processes {saved}) or start the run afresh; to resume "
                                  "anyway, accepting a run that differs from the uninterrupted one, load with "
                                  "allow_inexact=True")
        warnings.warn(f"{why}, so the resumed run will not be bit-exact", stacklevel=3)
    return (extra["rng"] if path == extra_file else read_object(path, "RNG states")), path


def load(out: Path, model: nn.Module | None = None, *, allow_inexact: bool = False, rank: int = 0,
         world: int = 1, check=lambda extra, path: None) -> tuple[dict, dict | None]:
    """The loop's state and, when ``model`` is given, its trainable tensors restored, process ``rank``'s
    RNG states restored (of ``world`` processes; when the run saved any) and the updater's state returned.

    Every file is read and checked before anything is restored: a missing, truncated or garbled file,
    or tensors that do not fit ``model``, raise an error naming the file and leave model and RNGs as they
    were. CUDA random states that this machine cannot take (no CUDA, another GPU count), or a checkpoint
    of another number of processes, are refused, as the resume could not be bit-exact;
    ``allow_inexact=True`` resumes anyway, with a warning. ``check(updater_state, path)`` may refuse the
    updater's state before anything is restored.
    """
    ckpt = complete_dir(out / "checkpoint")
    if ckpt is None:
        raise FileNotFoundError(f"cannot resume: no checkpoint in {out / 'checkpoint'} (was the run started with this "
                                "output_dir?)")
    state = _read_json(ckpt / "trainer_state.json")
    if not isinstance(state, dict):
        raise CheckpointError(f"damaged checkpoint: {ckpt / 'trainer_state.json'} does not hold the loop's state")
    if model is None:
        return state, None
    tensors_file, extra_file = ckpt / "trainable.safetensors", ckpt / "optimizer.pt"
    if not tensors_file.exists() and (out / "zo_log.jsonl").exists():
        raise CheckpointError(f"{out} holds a zeroth-order run checkpointed as a step log (zo_log.jsonl), as leanft "
                              "did before zeroth-order checkpoints held the trainable tensors: resume it with the "
                              "leanft version that wrote it, or start the run afresh (--overwrite)")
    _need(tensors_file)
    _need(extra_file)
    tensors = read_tensors(tensors_file)
    targets = _fit(model, tensors, tensors_file)
    extra = read_object(extra_file, "the optimiser state")
    check(extra, extra_file)
    rng, rng_file = _own_rng(ckpt, extra, rank, world, allow_inexact)
    on_cuda = any(t.device.type == "cuda" for t in targets.values())
    cuda = rng is not None and _check_rng(rng, rng_file, allow_inexact, on_cuda)
    _copy(targets, tensors)
    if rng is not None:
        _set_rng(rng, cuda)
    return state, extra
