"""The training loop, shared by the foreground CLI and the detached engine process.

    state = train(run_dir, resume=False, init_from=None, control=None, echo=print)

The run folder exists already, with its config.toml (run_setup.create_run writes it): that
file is the one way a config reaches the trainer.

Everything the loop does is written as events to the run's events.jsonl (see
workbench.engine.events); `echo` also prints them, one line each, in the foreground.

Exact resume needs no data-loader state: the batch of optimizer step s, micro-step m is
a pure function of (seed, s, m) -- numpy's default_rng([seed, s, m]) picks the window
starts in the train memmap -- so a run resumed from step s sees exactly the batches an
uninterrupted run would. Weights, AdamW moments, step, token count and every RNG state
come back from the checkpoint, so on the CPU a resumed run is bit-identical.

Chat fine-tuning is the same loop on a chat dataset (`dataset.chat`, workbench.engine.data.dataset):
a batch is whole packed rows, their indices picked by default_rng([seed, step, micro]) as the
window starts are (get_rows), so exact resume holds the same way; targets where the loss mask is 0
(system and user turns, role markers, padding) are set to IGNORE (-1), which the reference loss and
our fused kernel both skip, and the loss is the mean over the step's trained (assistant) targets
across all its micro-batches. `tokens` (and tokens/s, MFU) count the positions the model runs over,
padding included, as for plain text (batch_size * row length per micro-step): the compute done; the
trained share is logged at setup. The periodic sample of a chat run is a reply (see _periodic_sample).
"""

from __future__ import annotations

import math
import signal
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workbench.engine import checkpoint
from workbench.engine import config as config_mod
from workbench.engine.chat import ChatError
from workbench.engine.config import RunConfig
from workbench.engine.control import Control
from workbench.engine.data.dataset import Dataset
from workbench.engine.device import device_info
from workbench.engine.errors import ConfigError, WorkbenchError
from workbench.engine.events import EventWriter
from workbench.engine.formatting import count, format_event, nbytes
from workbench.engine.model import GPT
from workbench.engine.rundir import RunDir
from workbench.kernels import KernelsUnavailable, select

MAX_BAD_STEPS = 3  # non-finite steps in a row before rolling back to the last checkpoint
MAX_ROLLBACKS = 5  # then give up: lowering the lr again and again is not going to help
MAX_SAVE_FAILURES = 3  # failed checkpoint saves in a row (a full disk) before the run gives up
IGNORE = -1  # target id the loss skips (model.forward's ignore_index)
# The user turns a chat run's periodic sample replies to, one per sample in turn, when eval.sample_prompt is
# empty (a non-empty one is the one prompt); in the built-in chat data's phrasing (engine/data/builtin_chat.py).
CHAT_PROMPTS = ("What does os.path.join do?", "What is the json module?", "What does the `yield` keyword do?",
                "Explain str.split.")


def get_batch(data: np.ndarray, seed: int, step: int, micro: int, batch_size: int,
              seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets (batch_size, seq_len) int64 for (step, micro): a pure function of its arguments."""
    rng = np.random.default_rng([seed, step, micro])
    starts = rng.integers(0, len(data) - seq_len, size=batch_size)
    chunk = np.asarray(data[starts[:, None] + np.arange(seq_len + 1)], dtype=np.int64)
    return chunk[:, :-1], chunk[:, 1:]


def get_rows(tokens: np.ndarray, mask: np.ndarray, seed: int, step: int, micro: int,
             batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """A chat batch for (step, micro): inputs and targets (batch_size, row_tokens - 1) int64 from whole rows
    of `tokens` (n_rows, row_tokens), targets IGNORE where `mask` is 0. A pure function of its arguments."""
    rng = np.random.default_rng([seed, step, micro])
    rows = rng.integers(0, len(tokens), size=batch_size)
    chunk = np.asarray(tokens[rows], dtype=np.int64)
    y = np.where(np.asarray(mask[rows][:, 1:]) > 0, chunk[:, 1:], IGNORE)
    return chunk[:, :-1], y


def lr_at(step: int, cfg: RunConfig, elapsed_s: float = 0.0) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then decay to lr * min_lr_ratio
    over max_steps or, with a time budget, over max_seconds if that comes first."""
    o, max_steps = cfg.optim, cfg.train.max_steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    min_lr = o.lr * o.min_lr_ratio
    progress = (step - o.warmup_steps) / max(1, max_steps - o.warmup_steps)
    if cfg.train.max_seconds > 0:
        progress = max(progress, elapsed_s / cfg.train.max_seconds)
    progress = min(1.0, progress)
    if o.decay == "cosine":
        return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (o.lr - min_lr)
    if o.decay == "linear":
        return o.lr - progress * (o.lr - min_lr)
    return o.lr


class Trainer:
    """One run's training: model, optimizer, data, schedule, checkpoints and events.

    The attributes and methods a Control may use are listed in workbench.engine.control.
    """

    def __init__(self, run_dir: str | Path, *, resume: bool = False, init_from: str | Path | None = None,
                 control: Control | None = None, echo: Callable[[str], Any] | None = print):
        self.rundir = RunDir.at(run_dir)
        if not self.rundir.exists():
            raise ConfigError(f"no run at {run_dir} (no config.toml there)")
        self.cfg: RunConfig = config_mod.load(self.rundir.config)
        self.resume, self.init_from = resume, init_from
        self.control = control or Control()
        self._echo = echo
        self.events = EventWriter(self.rundir.events, echo=self._print_event if echo else None)
        self.step = 0
        self.tokens = 0
        self.elapsed_s = 0.0
        self.lr_scale = 1.0
        self.stop_requested = False
        self._stop_signal: str | None = None
        self.last_eval: dict[str, Any] | None = None
        self.last_loss: float | None = None
        self._bad_steps = 0
        self._rollbacks = 0
        self._saved_step: int | None = None  # the step of the last checkpoint this process wrote
        self._save_failures = 0  # failed saves in a row (see save_checkpoint)
        self._save_error = ""  # the last failure's message

    @property
    def max_steps(self) -> int:
        return self.cfg.train.max_steps

    def _print_event(self, event: dict) -> None:
        # System stats every second would drown the steps (`workbench attach --system` shows them);
        # an error is re-raised, and whoever called train() reports it once.
        if event["type"] in ("system", "error"):
            return
        line = format_event(event)
        if line is not None:
            self._echo(line)

    def log(self, message: str) -> None:
        self.events.emit("log", level="info", message=message)

    def emit_state(self, state: str) -> None:
        """A `state` event; a running one says what it runs on (set up by then: see setup)."""
        if state == "running":
            self.events.emit("state", state=state, device=self.device.name,
                             dtype=str(self.device.dtype).removeprefix("torch."), kernels=self.ops.name)
        else:
            self.events.emit("state", state=state)

    # --- setup -----------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.cfg
        self.dataset = Dataset.open(cfg.data.path)
        self.dataset.check_seq_len(cfg.model.seq_len)
        tok = self.dataset.tokenizer
        config_mod.resolve_data_fields(cfg, tok.vocab_size, len(self.dataset.train))
        self.device = device_info(cfg.train)
        try:
            self.ops = select(cfg.train.kernels, self.device.type)
        except KernelsUnavailable as e:  # the kernels' own error, told to the user as a config error
            raise ConfigError(str(e)) from None
        torch.manual_seed(cfg.train.seed)
        self.model = GPT(cfg.model, self.ops).to(self.device.device)
        self.optimizer = self.ops.adamw(self.model.param_groups(cfg.optim.weight_decay), cfg.optim.lr,
                                        (cfg.optim.beta1, cfg.optim.beta2), cfg.optim.eps,
                                        fused=self.device.type == "cuda")
        self.params = [p for p in self.model.parameters()]
        self.flops_per_token = self.model.flops_per_token()
        # Positions per step: a chat row's seq_len (padding included) or a window's (see the module docstring).
        self.tokens_per_step = cfg.train.grad_accum * cfg.train.batch_size * (self.dataset.seq_len or cfg.model.seq_len)
        checkpoint.clean_temporaries(self.rundir)
        self.log(f"kernels: {self.ops.name} ({self.ops.reason})")
        peak = f"peak {count(self.device.peak_flops, 'FLOP/s')}" if self.device.peak_flops else "unknown peak (MFU n/a)"
        self.log(f"device: {self.device.name}, {str(self.device.dtype).removeprefix('torch.')}, {peak}")
        self.log(f"model: {count(self.model.num_params())} parameters, {count(self.flops_per_token, 'FLOPs')}/token, "
                 f"~{nbytes(self.model.memory_estimate(cfg.train.batch_size, self.device.bf16))} to train; "
                 f"data: {count(len(self.dataset.train))} train / {count(len(self.dataset.val))} val tokens")
        if self.dataset.chat is not None:
            n_rows = len(self.dataset.rows("train")[0])
            self.log(f"chat data: {count(n_rows)} rows of {self.dataset.seq_len} positions, loss on assistant "
                     f"tokens only ({float(np.mean(self.dataset.train_mask)):.0%} of the train tokens)")
        if self.resume:
            latest = self.rundir.latest_checkpoint()
            if latest is None:
                self.log("no checkpoint yet: starting from step 0")
            else:
                self._load(latest, optimizer=True)
                self.log(f"resumed from {latest.relative_to(self.rundir.root)} at step {self.step}")
        elif self.init_from:
            ckpt = checkpoint.resolve(self.init_from)
            checkpoint.load_model(ckpt, self.model, tok.sha256)
            self.log(f"initialised weights from {ckpt} (fresh optimizer, step 0)")
        self.train_model = self.model
        if cfg.train.compile:
            self.log("torch.compile: the first step compiles the model (a minute or more); later steps are faster")
            self.train_model = torch.compile(self.model)

    def _load(self, ckpt: Path, optimizer: bool) -> dict:
        state = checkpoint.load_model(ckpt, self.model, self.dataset.tokenizer.sha256)
        if optimizer:
            checkpoint.load_optimizer(ckpt, self.model, self.optimizer, state)
        self.step = int(state["step"])
        self.tokens = int(state.get("tokens", 0))
        self.elapsed_s = float(state.get("elapsed_s", 0.0))
        self.lr_scale = float(state.get("lr_scale", 1.0))
        metrics = state.get("metrics", {})
        if metrics.get("val_loss") is not None:
            self.last_eval = {"step": metrics.get("val_step"), "val_loss": metrics["val_loss"],
                              "val_bpb": metrics.get("val_bpb")}
        if "rng" in state:
            checkpoint.restore_rng(state["rng"])
        return state

    # --- the pieces a Control can call ------------------------------------------------------------

    def save_checkpoint(self, final: bool = False) -> Path:
        """Write a checkpoint of this step; checkpoint.SaveFailed (one line) if it cannot be written.

        A failed save (a full disk) leaves no partial files and touches no earlier checkpoint.
        Every failure counts, periodic or asked for over the socket (which answers ok=false with
        the message); a success resets the count. Below MAX_SAVE_FAILURES in a row the failure is
        logged and training goes on, the next checkpoint interval retrying; at MAX_SAVE_FAILURES,
        or when the `final` save (end of run, or stop) fails, the message is the run's error.
        """
        ev = self.last_eval if self.last_eval and self.last_eval.get("step") == self.step else {}
        state = {
            "step": self.step,
            "tokens": self.tokens,
            "elapsed_s": round(self.elapsed_s, 3),
            "lr_scale": self.lr_scale,
            "rng": checkpoint.capture_rng(),
            "data_position": {"scheme": "numpy default_rng([seed, step, micro_step]) "
                                        + ("chat rows" if self.dataset.chat else "window starts"),
                              "seed": self.cfg.train.seed, "next_step": self.step},
            "config": self.cfg.to_dict(),
            "config_hash": self.cfg.hash(),
            "tokenizer_sha256": self.dataset.tokenizer.sha256,
            "metrics": {"train_loss": self.last_loss, "val_loss": ev.get("val_loss"),
                        "val_bpb": ev.get("val_bpb"), "val_step": ev.get("step")},
            "saved_at": time.time(),
        }
        try:
            path = checkpoint.save(self.rundir, self.model, self.optimizer, state,
                                   self.cfg.checkpoint.keep_last, self.cfg.checkpoint.keep_best)
        except OSError as e:
            raise self._save_failed(e, final) from None
        self._saved_step = self.step
        self._save_failures = 0
        self.events.emit("checkpoint", step=self.step, path=str(path.relative_to(self.rundir.root)),
                         val_loss=ev.get("val_loss"))
        return path

    def _save_failed(self, error: OSError, final: bool) -> checkpoint.SaveFailed:
        self._save_failures += 1
        intact = self.rundir.latest_checkpoint()
        kept = f"{intact.name} is intact" if intact else "no checkpoint of this run is saved yet"
        if final:
            then = "the run ends without its final checkpoint"
        elif self._save_failures >= MAX_SAVE_FAILURES:
            then = f"giving up after {MAX_SAVE_FAILURES} failed saves in a row"
            self.stop_requested = True  # ends the loop (and a pause); it then raises this as the run's error
        else:
            interval = self.cfg.checkpoint.interval
            retry = (self.step // interval + 1) * interval if interval > 0 else self.max_steps
            when = f"at step {retry}" if retry < self.max_steps else "with the final checkpoint"
            then = f"retrying {when} (failure {self._save_failures} of {MAX_SAVE_FAILURES})"
        self._save_error = (f"checkpoint {checkpoint.checkpoint_name(self.step)} not saved: "
                            f"{checkpoint.write_error_reason(error)}; {kept}; {then}")
        if not final and self._save_failures < MAX_SAVE_FAILURES:
            self.log(self._save_error)  # else it is the run's error, reported once
        return checkpoint.SaveFailed(self._save_error)

    def run_eval(self) -> dict:
        from workbench.engine.evaluate import evaluate

        e = self.cfg.eval
        result = evaluate(self.model, self.dataset, self.cfg.train.batch_size, self.cfg.model.seq_len,
                          e.max_batches, self.device)
        if result["val_loss"] is None:
            self.log("the val split is too short to evaluate")
            return result
        self.last_eval = {"step": self.step, **result}
        self.events.emit("eval", step=self.step, val_loss=result["val_loss"], val_ppl=result["val_ppl"],
                         val_bpb=result["val_bpb"])
        return self.last_eval

    def sample(self, prompt: str = "", max_tokens: int = 64, temperature: float = 0.8, top_k: int | None = 0,
               top_p: float = 1.0, seed: int | None = None) -> str:
        """Generate text from the current weights (emits a `sample` event) and return it.

        On a chat run `prompt` is a user turn (empty: the first of CHAT_PROMPTS), rendered with the chat
        template's render_prompt, and the text is the reply, up to the model's <|end|>."""
        tok = self.dataset.tokenizer
        template = None
        if self.dataset.chat is not None:
            from workbench.engine.chat import ChatTemplate

            template = ChatTemplate(tok)
            prompt = prompt or CHAT_PROMPTS[0]
            # The prompt may take all but one position of the context; the reply gets what is left, up to max_tokens.
            ids = template.render_prompt([{"role": "user", "content": prompt}], self.cfg.model.seq_len - 1).ids
            max_tokens = min(max_tokens, self.cfg.model.seq_len - len(ids))
        else:
            ids = [tok.bos_id] + tok.encode(prompt)
        self.model.eval()
        try:
            with self.device.autocast():
                out = self.model.generate(ids, max_tokens, temperature=temperature, top_k=top_k or 0,
                                          top_p=top_p, stop_ids=[tok.end_id], seed=seed)
        finally:
            self.model.train()
        text = template.reply_text(out) if template is not None else tok.decode(out)
        self.events.emit("sample", step=self.step, prompt=prompt, text=text)
        return text

    # --- the loop ----------------------------------------------------------------------------------

    def _batch_arrays(self, step: int, micro: int) -> tuple[np.ndarray, np.ndarray]:
        if self.dataset.chat is not None:
            tokens, mask = self.dataset.rows("train")
            return get_rows(tokens, mask, self.cfg.train.seed, step, micro, self.cfg.train.batch_size)
        return get_batch(self.dataset.train, self.cfg.train.seed, step, micro,
                         self.cfg.train.batch_size, self.cfg.model.seq_len)

    def _batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._to_device(*self._batch_arrays(step, micro))

    def _to_device(self, x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.device.device
        if dev.type == "cuda":
            return (torch.from_numpy(x).pin_memory().to(dev, non_blocking=True),
                    torch.from_numpy(y).pin_memory().to(dev, non_blocking=True))
        return torch.from_numpy(x), torch.from_numpy(y)

    def train_step(self) -> tuple[float, float, float, bool]:
        """One optimizer step (with gradient accumulation); returns (loss, grad norm, lr, applied)."""
        cfg = self.cfg
        lr = lr_at(self.step, cfg, self.elapsed_s) * self.lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        accum = cfg.train.grad_accum
        loss_sum = torch.zeros((), device=self.device.device)
        arrays = [self._batch_arrays(self.step, micro) for micro in range(accum)]
        chat = self.dataset.chat is not None
        if chat:  # the mean over the step's trained targets, whichever micro-batch holds them (counted on the host)
            trained = max(1, sum(int((y != IGNORE).sum()) for _, y in arrays))
        for x, y in map(lambda a: self._to_device(*a), arrays):
            with self.device.autocast():
                token_loss = self.train_model(x, y)
            if chat:
                loss = token_loss.sum() / trained
                loss.backward()
                loss_sum += loss.detach() * accum
            else:
                loss = token_loss.mean()
                (loss / accum).backward()
                loss_sum += loss.detach()
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        # The one host sync per step: needed to skip a non-finite step before it touches the weights.
        loss_value, norm_value = torch.stack([loss_sum / accum, grad_norm.float()]).tolist()
        applied = math.isfinite(loss_value) and math.isfinite(norm_value)
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += self.tokens_per_step
        return loss_value, norm_value, lr, applied

    def _handle_bad_step(self, loss: float, norm: float) -> None:
        self._bad_steps += 1
        self.log(f"step {self.step}: non-finite loss ({loss}) or grad norm ({norm}); optimizer step skipped "
                 f"({self._bad_steps} in a row)")
        if self._bad_steps < MAX_BAD_STEPS:
            return
        latest = self.rundir.latest_checkpoint()
        if latest is None or self._rollbacks >= MAX_ROLLBACKS:
            why = "before the first checkpoint" if latest is None else f"after {self._rollbacks} rollbacks"
            raise WorkbenchError(f"training diverged (non-finite loss {MAX_BAD_STEPS} steps in a row) {why}; "
                                 "lower optim.lr or raise optim.warmup_steps")
        scale = self.lr_scale * 0.5
        self._load(latest, optimizer=True)
        self.lr_scale = scale
        self._rollbacks += 1
        self._bad_steps = 0
        self.log(f"rolled back to {latest.name} after {MAX_BAD_STEPS} non-finite steps; "
                 f"lr scale lowered to {scale:g}")

    def out_of_time(self) -> bool:
        budget = self.cfg.train.max_seconds
        return budget > 0 and self.elapsed_s >= budget

    def _eta(self, seconds_per_step: float) -> float:
        eta = (self.max_steps - self.step) * seconds_per_step
        if self.cfg.train.max_seconds > 0:
            eta = min(eta, max(0.0, self.cfg.train.max_seconds - self.elapsed_s))
        return round(eta, 1)

    def _due(self, interval: int) -> bool:
        return interval > 0 and self.step % interval == 0

    def _loop(self) -> str:
        cfg = self.cfg
        tokens_per_step = self.tokens_per_step
        self.control.poll(self)
        # Throughput counts only train_step time; evals and checkpoints add to elapsed_s, and time
        # inside control.poll (a pause) counts nowhere.
        window_time, window_losses = 0.0, []
        while self.step < self.max_steps and not self.stop_requested and not self.out_of_time():
            t0 = time.perf_counter()
            loss, norm, lr, applied = self.train_step()
            step_time = time.perf_counter() - t0
            self.elapsed_s += step_time
            if not applied:
                self._handle_bad_step(loss, norm)
                window_time, window_losses = 0.0, []
            else:
                self._bad_steps = 0
                self.last_loss = loss
                window_time += step_time
                window_losses.append(loss)
                if (len(window_losses) >= cfg.train.log_interval or self.step >= self.max_steps
                        or self.out_of_time()):
                    seconds_per_step = window_time / len(window_losses)
                    tps = tokens_per_step / max(seconds_per_step, 1e-9)
                    self.events.emit(
                        "step", step=self.step, max_steps=self.max_steps,
                        loss=float(np.mean(window_losses)), lr=lr, grad_norm=norm, tokens=self.tokens,
                        tokens_per_s=round(tps, 1), mfu=self.device.mfu(self.flops_per_token, tps),
                        eta_s=self._eta(seconds_per_step),
                        elapsed_s=round(self.elapsed_s, 2))
                    window_time, window_losses = 0.0, []
            t1 = time.perf_counter()
            if self._due(cfg.eval.interval) and self.step < self.max_steps:
                self.run_eval()
            if self._due(cfg.eval.sample_interval):
                self._periodic_sample()
            if self._due(cfg.checkpoint.interval) and self.step < self.max_steps:
                try:
                    self.save_checkpoint()
                except checkpoint.SaveFailed:
                    pass  # logged and counted: the next interval retries, or the loop ends below
            self.elapsed_s += time.perf_counter() - t1
            self.control.poll(self)
        if self._save_failures >= MAX_SAVE_FAILURES:  # the last save (periodic or asked for) gave up
            raise checkpoint.SaveFailed(self._save_error)
        if self.stop_requested and self.step < self.max_steps:
            if self._stop_signal:
                self.log(f"{self._stop_signal} received: stopping at step {self.step} with a checkpoint")
            if self._saved_step != self.step:  # e.g. a periodic checkpoint at this very step
                self.save_checkpoint(final=True)
            return "stopped"
        if self.last_eval is None or self.last_eval.get("step") != self.step:
            self.run_eval()
        self.save_checkpoint(final=True)
        return "finished"

    def _periodic_sample(self) -> None:
        e = self.cfg.eval
        prompt = e.sample_prompt
        if self.dataset.chat is not None and not prompt:  # a reply to each fixed prompt in turn
            prompt = CHAT_PROMPTS[(self.step // max(1, e.sample_interval) - 1) % len(CHAT_PROMPTS)]
        # Seeded by (seed, step): the same sample after a resume, and no global RNG consumed.
        try:
            self.sample(prompt, e.sample_tokens, temperature=0.8, top_k=0, top_p=0.95,
                        seed=self.cfg.train.seed * 1_000_003 + self.step)
        except ChatError as err:  # a chat prompt longer than the context: say so, keep training
            self.log(f"periodic sample skipped: {err}")

    def run(self, handle_signals: bool = True) -> str:
        """Set up, train to max_steps (or a stop), write the final checkpoint; return the final state."""
        self.emit_state("starting")
        try:
            with self._signals(handle_signals):
                self.setup()
                if self.step >= self.max_steps:
                    self.log(f"already at step {self.step} of {self.max_steps}: nothing to train "
                             "(pass --max-steps to go further)")
                    final = "finished"
                else:
                    self.emit_state("running")
                    final = self._loop()
        except KeyboardInterrupt:
            # A second Ctrl-C (the first asks for a clean stop): the weights may be mid-update, so no save.
            latest = self.rundir.latest_checkpoint()
            self.log(f"interrupted; not saving a half-finished step (last checkpoint: "
                     f"{latest.name if latest else 'none'})")
            self.emit_state("stopped")
            self.events.close()
            raise
        except BaseException as e:
            # A user-caused failure is its one-line message; a bug keeps its traceback.
            details = {} if isinstance(e, WorkbenchError) else {"traceback": traceback.format_exc()}
            self.events.emit("error", message=str(e) or type(e).__name__, **details)
            self.emit_state("crashed")
            self.events.close()
            raise
        self.emit_state(final)
        self.events.close()
        return final

    @contextmanager
    def _signals(self, enabled: bool):
        """SIGTERM and a first Ctrl-C ask for a clean stop (checkpoint, state `stopped`); a second Ctrl-C interrupts."""
        if not enabled or threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum, frame):
            # Only flags here: writing an event from a signal handler could deadlock on the writer's lock.
            if signum == signal.SIGINT and self.stop_requested:
                raise KeyboardInterrupt
            self.stop_requested = True
            self._stop_signal = signal.Signals(signum).name

        # Only where nobody else (the detached engine) installed handlers of their own.
        defaults = (signal.SIG_DFL, signal.default_int_handler)
        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)
                    if signal.getsignal(s) in defaults}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def train(run_dir: str | Path, *, resume: bool = False, init_from: str | Path | None = None,
          control: Control | None = None, echo: Callable[[str], Any] | None = print,
          handle_signals: bool = True) -> str:
    """Train the run in `run_dir` (its config.toml: see run_setup.create_run) and return its final
    state: finished or stopped (or raise after `crashed`)."""
    return Trainer(run_dir, resume=resume, init_from=init_from, control=control, echo=echo).run(handle_signals)
