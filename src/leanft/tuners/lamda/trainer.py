"""LaMDA in a ``transformers.Trainer``: ``LamdaCallback`` runs P_B's freezing schedule after every optimiser
step, and a Trainer that trains a LaMDA model without it gets it (``schedule_lamda_in_trainer``, called by
the model's training forwards until its schedule first runs). Re-exported as ``leanft.LamdaCallback``."""

from __future__ import annotations

import logging
import sys

from transformers import Trainer, TrainerCallback

from .schedule import lamda_tuner

logger = logging.getLogger(__name__)


class LamdaCallback(TrainerCallback):
    """LaMDA's gradual freezing of P_B in a ``Trainer``/``SFTTrainer``: after every optimiser step,
    ``update_freezing(global_step, max_steps)``. ``Trainer(..., callbacks=[leanft.LamdaCallback()])``; a Trainer
    that trains a LaMDA model without it gets it at its first training forward."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        tuner = lamda_tuner(model)
        if tuner is None:
            raise ValueError("LamdaCallback needs a model made with leanft.LamdaConfig (get_peft_model)")
        tuner.update_freezing(state.global_step, state.max_steps)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        tuner = lamda_tuner(model)
        if tuner is not None and state.global_step:  # resumed: re-apply what the schedule had reached
            tuner.update_freezing(state.global_step, state.max_steps)


def _running_trainer() -> Trainer | None:
    """The ``Trainer`` whose method is on the call stack, if any."""
    frame = sys._getframe(1)
    while frame is not None and not isinstance(frame.f_locals.get("self"), Trainer):
        frame = frame.f_back
    return None if frame is None else frame.f_locals["self"]


def schedule_lamda_in_trainer(tuner) -> bool:
    """Called by a LaMDA model's training forwards until its schedule first runs: when a ``Trainer`` (or
    ``SFTTrainer``) runs it without ``LamdaCallback``, add the callback, so P_B freezes on schedule anyway
    (the Trainer's steps are the schedule's, and only the call stack ties a forward to its Trainer).
    Whether a Trainer was found: once it was, the callback is there and the stack need not be walked again."""
    trainer = _running_trainer()
    if trainer is None:
        return False
    if any(isinstance(c, LamdaCallback) for c in trainer.callback_handler.callbacks):
        return True
    trainer.add_callback(LamdaCallback())
    logger.info("LaMDA freezes P_B on a schedule of optimiser steps: added leanft.LamdaCallback() to the %s",
                type(trainer).__name__)
    if trainer.state.global_step:  # resumed: re-apply what the schedule had reached, as the callback would have
        tuner.update_freezing(trainer.state.global_step, trainer.state.max_steps)
    return True
