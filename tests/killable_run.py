"""Run a recipe in this process and SIGKILL it at a chosen moment; the resume tests drive it.

    python tests/killable_run.py RECIPE [OVERRIDES...]
    KILL_AT_STEP=3          kill -9 right after optimizer step 3
    KILL_IN_SAVE_AT_STEP=4  kill -9 while checkpoint 4 is being written (weights and optimizer
                            written, trainer state not yet)
    PAUSE_AT_STEP=2         after optimizer step 2, create the file PAUSED_FILE and wait there until killed
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from transformers import Trainer, TrainerCallback

from adapterkit.cli import main

KILL_AT = int(os.environ.get("KILL_AT_STEP", -1))
KILL_IN_SAVE_AT = int(os.environ.get("KILL_IN_SAVE_AT_STEP", -1))
PAUSE_AT = int(os.environ.get("PAUSE_AT_STEP", -1))


class KillAtStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)
        if state.global_step == PAUSE_AT:
            Path(os.environ["PAUSED_FILE"]).touch()
            for _ in range(600):  # bounded: 5 minutes at most
                time.sleep(0.5)


_save_rng_state = Trainer._save_rng_state


def _save_rng_state_then_maybe_die(self, output_dir):
    if self.state.global_step == KILL_IN_SAVE_AT:
        os.kill(os.getpid(), signal.SIGKILL)
    return _save_rng_state(self, output_dir)


Trainer._save_rng_state = _save_rng_state_then_maybe_die
_init = Trainer.__init__


def _init_with_killer(self, *args, **kwargs):
    kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), KillAtStep()]
    _init(self, *args, **kwargs)


Trainer.__init__ = _init_with_killer

if __name__ == "__main__":
    main(["recipe", "run", *sys.argv[1:]])
