"""The trainer's control hook: how something outside the loop steers a run between steps.

`Trainer` calls `control.poll(trainer)` after every optimizer step (and once before the
first). The default does nothing; the detached engine subclasses it to serve its control
socket. What a Control may use on the trainer:

    trainer.step, trainer.max_steps          completed optimizer steps, the target
    trainer.stop_requested = True            save a checkpoint and end with state `stopped`
    trainer.lr_scale                         live multiplier on the scheduled learning rate
    trainer.cfg.eval.interval / .sample_interval, trainer.cfg.checkpoint.interval   (mutable)
    trainer.save_checkpoint() -> Path, trainer.run_eval() -> dict,
    trainer.sample(prompt, max_tokens, temperature, top_k, top_p, seed) -> str,
    trainer.emit_state(state)                e.g. "paused" / "running" around a blocking pause

poll() runs on the training thread, so it may block (a pause) and may call the methods
above directly: the model is never mid-step while poll() runs.
"""

from __future__ import annotations


class Control:
    def poll(self, trainer) -> None:
        """Called between optimizer steps; the default does nothing."""


class StopAt(Control):
    """Ask for a stop once `step` steps are done (used by tests and scripted runs)."""

    def __init__(self, step: int):
        self.stop_step = step

    def poll(self, trainer) -> None:
        if trainer.step >= self.stop_step:
            trainer.stop_requested = True
