"""New run: data sources and tokenizer, model shape with live estimates, optimiser and schedule, start.

The form is one scrolling column (tab moves between fields) beside a panel of live
estimates from workbench.engine.estimates: parameters, FLOPs per token, memory, the ~20
tokens per parameter rule, and the time at the measured (an earlier run on this
kind of device) or estimated throughput. The config is validated as you type by
workbench.engine.config, the same code the engine runs, so a start never fails on a typo.
Preparation streams progress bars from `workbench prepare --progress-json`, then
shows its report; start writes the config and launches a detached engine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.suggester import SuggestFromList
from textual.widget import Widget
from textual.widgets import Footer, Header, Input, Label, ProgressBar, Select, Static

from workbench import engine_calls
from workbench.engine import estimates
from workbench.engine import formatting as fmt
from workbench.engine.config import RunConfig, from_dict, load, preset_names, to_toml
from workbench.engine.errors import WorkbenchError
from workbench.messages import PrepareFinished, PrepareProgress

DEFAULT_VOCAB = 4096
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# form field id -> (config section, key, type)
FIELDS: dict[str, tuple[str, str, type]] = {
    "model-n_layer": ("model", "n_layer", int),
    "model-n_head": ("model", "n_head", int),
    "model-n_kv_head": ("model", "n_kv_head", int),
    "model-d_model": ("model", "d_model", int),
    "model-d_ff": ("model", "d_ff", int),
    "model-seq_len": ("model", "seq_len", int),
    "train-batch_size": ("train", "batch_size", int),
    "train-grad_accum": ("train", "grad_accum", int),
    "train-max_steps": ("train", "max_steps", int),
    "optim-lr": ("optim", "lr", float),
    "optim-warmup_steps": ("optim", "warmup_steps", int),
    "optim-min_lr_ratio": ("optim", "min_lr_ratio", float),
    "optim-weight_decay": ("optim", "weight_decay", float),
    "eval-interval": ("eval", "interval", int),
    "checkpoint-interval": ("checkpoint", "interval", int),
}
SELECTS = {"optim-decay": ("optim", "decay"), "train-device": ("train", "device")}
MODEL_FIELDS = [f for f in FIELDS if f.startswith("model-")]

LABELS = {
    "model-n_layer": "Layers", "model-n_head": "Heads", "model-n_kv_head": "KV heads (0=all)",
    "model-d_model": "Width (d_model)", "model-d_ff": "FFN (0=auto)", "model-seq_len": "Context (tokens)",
    "train-batch_size": "Batch (sequences)", "train-grad_accum": "Grad accumulation",
    "train-max_steps": "Steps", "optim-lr": "Learning rate", "optim-warmup_steps": "Warmup steps",
    "optim-min_lr_ratio": "Final lr / lr", "optim-weight_decay": "Weight decay",
    "eval-interval": "Eval every (steps)", "checkpoint-interval": "Save every (steps)",
    "optim-decay": "Decay", "train-device": "Device",
}


def field(label: str, widget: Widget) -> Horizontal:
    return Horizontal(Label(label), widget, classes="field")


def unique_run_name(runs_root: Path, stem: str) -> str:
    n = 1
    while (runs_root / f"{stem}-{n}").exists():
        n += 1
    return f"{stem}-{n}"


# ---------------------------------------------------------------- hardware and throughput

@dataclass
class Hardware:
    kind: str  # "cuda" or "cpu"
    name: str
    peak_flops: float  # dense peak at the dtype training would use (bf16 on GPUs, fp32 on CPUs)
    assumed_mfu: float  # what a small model typically reaches, for the estimate

    @property
    def estimated_flops(self) -> float:
        return self.peak_flops * self.assumed_mfu


def detect_hardware() -> Hardware:
    """The first GPU through NVML (no torch), else this CPU. Blocking: call from a worker."""
    from workbench.engine.sysstats import open_nvml

    try:
        nvml, handles, _why = open_nvml()
    except Exception:
        handles = []
    if handles:
        name = ""
        try:
            raw = nvml.nvmlDeviceGetName(handles[0])
            name = raw.decode() if isinstance(raw, bytes) else str(raw)
        except Exception:
            pass
        peak = estimates.peak_flops(name, bf16=True)
        if peak:
            return Hardware("cuda", name or "GPU", peak, 0.35)
        return Hardware("cuda", name or "GPU", 100e12, 0.35)  # unknown card: a mid-range guess
    return Hardware("cpu", "cpu", estimates.cpu_peak_flops(), 0.25)


def measured_flops(runs_root: Path, kind: str) -> tuple[float, str] | None:
    """The best FLOP/s an earlier run reached on this kind of device (its tokens/s x its FLOPs per token)."""
    from workbench.engine.process.client import list_runs

    best: tuple[float, str] | None = None
    for run in list_runs(runs_root):
        tps, device = run.get("tokens_per_s"), str(run.get("device") or "")
        if not tps or not device or device.startswith("cpu") != (kind == "cpu"):
            continue
        try:
            cfg = load(Path(run["path"]) / "config.toml")
        except (WorkbenchError, OSError):
            continue
        vocab = cfg.model.vocab_size or _dataset_vocab(cfg.data.path) or DEFAULT_VOCAB
        flops = tps * estimates.flops_per_token(estimates.Shape.of(cfg.model, vocab))
        if best is None or flops > best[0]:
            best = (flops, run["name"])
    return best


def _dataset_vocab(path: str) -> int | None:
    report = engine_calls.read_report(path) if path else {}
    return (report.get("tokenizer") or {}).get("vocab_size")


# ---------------------------------------------------------------- preparation panel

def report_table(report: dict[str, Any]) -> Table:
    """kept / dropped per reason, splits, tokenizer: the report of `workbench prepare`."""
    table = Table(box=None, padding=(0, 1), show_edge=False, header_style="bold")
    table.add_column("")
    table.add_column("docs", justify="right")
    table.add_column("size", justify="right")
    table.add_column("tokens", justify="right")
    def mb(b: Any) -> str:
        return fmt.nbytes(b or 0)

    kept = report.get("kept", {})
    table.add_row("[green]kept[/]", f"{kept.get('documents', 0):,}", mb(kept.get("bytes")),
                  f"{kept.get('tokens', 0):,}")
    for reason, row in (report.get("dropped") or {}).items():
        if row.get("documents"):
            table.add_row(f"[red]dropped[/] {reason}", f"{row['documents']:,}", mb(row.get("bytes")),
                          f"~{row.get('tokens_est', 0):,}")
    for split, row in (report.get("splits") or {}).items():
        table.add_row(f"[dim]{split}[/]", f"{row.get('documents', 0):,}", mb(row.get("bytes")),
                      f"{row.get('tokens', 0):,}")
    return table


def report_summary(report: dict[str, Any]) -> str:
    tok = report.get("tokenizer") or {}
    if not tok:
        return ""
    return (f"vocab {tok.get('vocab_size', '?'):,} · {tok.get('bytes_per_token', 0):.2f} bytes/token"
            + (f" · {report['seconds']:.0f} s" if report.get("seconds") else ""))


STAGE_LABELS = {"read": "clean+filter", "tokenizer": "tokenizer", "encode": "encode"}


class PreparePanel(Vertical):
    """Runs `workbench prepare` in a worker: one progress bar per stage, then the report."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.job: engine_calls.PrepareJob | None = None
        self.running = False
        self._bars: dict[str, tuple[ProgressBar, Label]] = {}
        self._last: dict[str, dict[str, Any]] = {}  # the latest update of each stage

    def compose(self) -> ComposeResult:
        yield Static("", id="prepare-report")

    def show_report(self, report: dict[str, Any], title: str = "") -> None:
        widget = self.query_one("#prepare-report", Static)
        if not report:
            widget.update(title)
            return
        widget.update(Group(Text.from_markup(title), report_table(report), Text(report_summary(report), style="dim")))

    def start(self, args: list[str]) -> None:
        for row in self.query(".stage"):
            row.remove()
        self._bars.clear()
        self._last.clear()
        self.show_report({}, "[b]preparing…[/b] (tokenizer training can take a minute)")
        self.running = True
        self._run(args)

    @work(thread=True, exclusive=True, group="prepare", exit_on_error=False)
    def _run(self, args: list[str]) -> None:
        job = self.job = engine_calls.PrepareJob(args)
        try:
            report = job.run(lambda update: self.post_message(PrepareProgress(update)))
        except (engine_calls.EngineCallError, OSError) as e:
            self.post_message(PrepareFinished(job.out, None, str(e)))
        else:
            self.post_message(PrepareFinished(job.out, report))

    @on(PrepareProgress)
    def _progress(self, message: PrepareProgress) -> None:
        """{"stage": read|tokenizer|encode|done, "docs", "bytes", "fraction": 0..1 or null}."""
        message.stop()
        update = message.update
        stage = str(update.get("stage") or "working")
        if stage == "done":
            return
        if stage not in self._bars:
            bar = ProgressBar(total=1.0, show_eta=False, show_percentage=False)
            count = Label("", classes="stage-count")
            self._bars[stage] = (bar, count)
            self.mount(Horizontal(Label(STAGE_LABELS.get(stage, stage), classes="stage-name"), bar, count,
                                  classes="stage"), before=self.query_one("#prepare-report"))
        self._last[stage] = update
        bar, count = self._bars[stage]
        fraction = update.get("fraction")
        if fraction is None:
            bar.update(total=None)
        else:
            bar.update(total=1.0, progress=float(fraction))
        done = "" if fraction is None else f"{fraction:4.0%} "
        count.update(f"{done}{update.get('docs', 0):,} docs {fmt.nbytes(update.get('bytes', 0))}")

    @on(PrepareFinished)
    def _finished(self, message: PrepareFinished) -> None:
        self.running = False
        if message.report is not None:  # every stage is complete, whatever its last update said
            for stage in self._bars:
                self._progress(PrepareProgress({**self._last.get(stage, {}), "fraction": 1.0, "stage": stage}))
        if message.report is not None:
            self.show_report(message.report, f"[b]{message.data_dir}[/b] prepared")
        else:
            self.show_report({}, f"[red]preparation failed:[/red] {message.error}")
        # the message bubbles on to the screen, which decides what comes next

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()

    def on_unmount(self) -> None:
        self.cancel()


# ---------------------------------------------------------------- the screen

class NewRunScreen(Screen[Path | None]):
    TITLE = "New run"
    HELP = """\
Set up a run top to bottom, then **ctrl+s** to start it in a detached engine.

- **Data**: source paths (.txt, .md, .jsonl, folders; comma-separated; empty = the
  built-in corpus), the folder the prepared dataset goes to, the tokenizer's vocab
  size and the filters. **ctrl+r** prepares now and shows the report; a start with
  unprepared data prepares first. A prepared folder is reused as it is, never
  replaced (the runs trained on it need its tokenizer).
- **Model**: a preset, or any shape (the preset turns to *custom*). The panel on the
  right follows every keystroke: parameters, FLOPs per token, training memory, the
  ~20 tokens per parameter rule, and the time at the throughput an earlier run
  measured on this kind of device (else an estimate from its peak FLOP/s).
- **Training**: batch, steps, learning rate schedule, eval and checkpoint intervals.
"""
    BINDINGS = [
        Binding("ctrl+s", "start", "Start", tooltip="Prepare the data if needed, then start training detached"),
        Binding("ctrl+r", "prepare", "Prepare data", tooltip="Run the data preparation now and show its report"),
        Binding("escape", "back", "Back", tooltip="Back to the runs (a preparation in progress is cancelled)"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.hardware: Hardware | None = None
        self.measured: tuple[float, str] | None = None
        self._base = load(preset="tiny").to_dict()  # keys the form does not show come from the preset
        self._start_after_prepare = False
        self._starting = False
        self._reports: dict[str, dict[str, Any]] = {}  # dataset folder -> its report, {} if not prepared

    # -------------------------------------------------------------- layout

    def compose(self) -> ComposeResult:
        app = self.app
        datasets = [str(p) for p in engine_calls.prepared_datasets(app.data_root)]
        cfg = load(preset="tiny")
        yield Header()
        with Horizontal(id="new-run-body"):
            with VerticalScroll(id="new-run-form"):
                yield Static("Run", classes="section-title")
                yield field("Name", Input(unique_run_name(app.runs_root, "tiny"), id="run-name", compact=True))
                yield Static("Data", classes="section-title")
                yield field("Sources", Input("", id="data-sources", compact=True,
                                             placeholder="paths, comma-separated; empty = built-in"))
                yield field("Dataset folder", Input(datasets[0] if datasets else str(app.data_root / "builtin"),
                                                    id="data-dir", compact=True,
                                                    suggester=SuggestFromList(datasets, case_sensitive=True)))
                yield field("Vocab size", Input(str(DEFAULT_VOCAB), id="data-vocab", type="integer", compact=True))
                yield field("Min doc chars", Input("", id="data-min-chars", type="integer", compact=True,
                                                   placeholder="engine default"))
                yield field("Max line chars", Input("", id="data-max-line", type="integer", compact=True,
                                                    placeholder="engine default"))
                yield field("Near-dup removal", Select([("on (MinHash)", "on"), ("off", "off")], value="on",
                                                       allow_blank=False, id="data-near-dedup", compact=True))
                yield field("Blocklist file", Input("", id="data-blocklist", compact=True, placeholder="none"))
                yield PreparePanel(id="prepare")
                yield Static("Model", classes="section-title")
                options = [(name, name) for name in preset_names()] + [("custom", "custom")]
                yield field("Preset", Select(options, value="tiny", allow_blank=False, id="preset", compact=True))
                for fid in MODEL_FIELDS:
                    yield self._input(fid, cfg)
                yield Static("Training", classes="section-title")
                for fid in FIELDS:
                    if not fid.startswith("model-"):
                        yield self._input(fid, cfg)
                yield field(LABELS["optim-decay"], Select([(d, d) for d in ("cosine", "linear", "constant")],
                                                          value=cfg.optim.decay, allow_blank=False,
                                                          id="optim-decay", compact=True))
                yield field(LABELS["train-device"], Select([(d, d) for d in ("auto", "cpu", "cuda")],
                                                           value="auto", allow_blank=False, id="train-device",
                                                           compact=True))
            with VerticalScroll(id="new-run-side"):
                yield Static("", id="estimates")
                yield Static("", id="data-status")
                yield Static("", id="new-run-error", classes="error-line")
        yield Footer(compact=True)

    def _input(self, fid: str, cfg: RunConfig) -> Horizontal:
        section, key, kind = FIELDS[fid]
        value = getattr(getattr(cfg, section), key)
        return field(LABELS[fid], Input(f"{value:g}" if kind is float else str(value), id=fid,
                                        type="number" if kind is float else "integer", compact=True))

    def on_mount(self) -> None:
        self.query_one("#run-name", Input).focus()
        self.update_panel()
        self.detect()

    @work(thread=True, exclusive=True, group="detect", exit_on_error=False)
    def detect(self) -> None:
        hardware = detect_hardware()
        measured = measured_flops(self.app.runs_root, hardware.kind)
        self.app.call_from_thread(self._detected, hardware, measured)

    def _detected(self, hardware: Hardware, measured: tuple[float, str] | None) -> None:
        self.hardware, self.measured = hardware, measured
        self.update_panel()

    # -------------------------------------------------------------- reading the form

    def value(self, wid: str) -> str:
        return self.query_one(f"#{wid}", Input).value.strip()

    def build_config(self) -> RunConfig:
        """The run's config from the preset and the form, validated by workbench.engine.config (ConfigError)."""
        raw = {section: dict(values) for section, values in self._base.items()}
        for fid, (section, key, kind) in FIELDS.items():
            text = self.value(fid)
            try:
                raw[section][key] = kind(text)
            except ValueError:
                raise WorkbenchError(f"{LABELS[fid]}: {text!r} is not a number") from None
        for sid, (section, key) in SELECTS.items():
            raw[section][key] = self.query_one(f"#{sid}", Select).value
        raw["data"]["path"] = self.value("data-dir")
        raw["model"]["vocab_size"] = 0  # the dataset's tokenizer decides
        return from_dict(raw)

    def dataset_report(self) -> dict[str, Any]:
        """The report of the prepared dataset folder named in the form ({} if not prepared).

        Cached per folder: the panel asks on every keystroke and the UI thread should not
        read files that often. A finished preparation clears the cache.
        """
        path = self.value("data-dir")
        if path not in self._reports:
            self._reports[path] = engine_calls.read_report(path) if path and engine_calls.is_prepared(path) else {}
        return self._reports[path]

    def vocab_size(self) -> int:
        report = self.dataset_report()
        vocab = (report.get("tokenizer") or {}).get("vocab_size")
        if vocab:
            return int(vocab)
        try:
            return max(16, int(self.value("data-vocab")))
        except ValueError:
            return DEFAULT_VOCAB

    def dataset_prepared(self) -> bool:
        return bool(self.dataset_report())

    def prepare_args(self) -> list[str]:
        sources = [s.strip() for s in self.value("data-sources").split(",") if s.strip()]
        extra: list[str] = []
        if self.value("data-min-chars"):
            extra += ["--min-chars", self.value("data-min-chars")]
        if self.value("data-max-line"):
            extra += ["--max-line-chars", self.value("data-max-line")]
        if self.query_one("#data-near-dedup", Select).value == "off":
            extra.append("--no-near-dedup")
        if self.value("data-blocklist"):
            extra += ["--blocklist", self.value("data-blocklist")]
        vocab = self.value("data-vocab")
        return engine_calls.prepare_args(self.value("data-dir"), sources, int(vocab) if vocab.isdigit() else None,
                                         extra)

    # -------------------------------------------------------------- live estimates

    @on(Input.Changed)
    @on(Select.Changed)
    def _changed(self, event: Input.Changed | Select.Changed) -> None:
        wid = event.control.id or ""
        if wid == "preset" and event.value != "custom":
            self.fill_preset(str(event.value))
        elif wid in MODEL_FIELDS:
            self._maybe_custom()
        self.update_panel()

    def fill_preset(self, name: str) -> None:
        cfg = load(preset=name)
        self._base = cfg.to_dict()
        for fid, (section, key, kind) in FIELDS.items():
            value = getattr(getattr(cfg, section), key)
            self.query_one(f"#{fid}", Input).value = f"{value:g}" if kind is float else str(value)
        self.query_one("#optim-decay", Select).value = cfg.optim.decay
        name_input = self.query_one("#run-name", Input)
        if re.fullmatch(rf"({'|'.join(map(re.escape, preset_names()))})-\d+", name_input.value):
            name_input.value = unique_run_name(self.app.runs_root, name)

    def _maybe_custom(self) -> None:
        preset = self.query_one("#preset", Select)
        if preset.value == "custom":
            return
        model = load(preset=str(preset.value)).model
        for fid in MODEL_FIELDS:
            _, key, _ = FIELDS[fid]
            if self.value(fid) != str(getattr(model, key)):
                preset.value = "custom"
                return

    def update_panel(self) -> None:
        error = self.query_one("#new-run-error", Static)
        try:
            cfg = self.build_config()
        except WorkbenchError as e:
            error.update(f"✗ {e}")
            return
        error.update("")
        self.query_one("#estimates", Static).update(self.estimates_table(cfg))
        self.query_one("#data-status", Static).update(self.data_status(cfg))

    def estimates_table(self, cfg: RunConfig) -> Table:
        shape = estimates.Shape.of(cfg.model, self.vocab_size())
        params = estimates.param_count(shape)
        fpt = estimates.flops_per_token(shape)
        tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.model.seq_len
        planned = tokens_per_step * cfg.train.max_steps
        recommended = estimates.recommended_tokens(shape)
        hw = self.hardware
        bf16 = hw is not None and hw.kind == "cuda" and cfg.train.device != "cpu"
        memory = estimates.train_memory_bytes(shape, cfg.train.batch_size, bf16)
        t = Table(box=None, padding=(0, 1), show_header=False, title="[b]Estimates[/b]", title_justify="left")
        t.add_column(style="dim")
        t.add_column(justify="right")
        t.add_row("parameters", fmt.count(params))
        t.add_row("FLOPs / token", fmt.count(fpt))
        t.add_row("train memory", fmt.nbytes(memory))
        t.add_row("tokens / step", f"{tokens_per_step:,}")
        t.add_row("planned tokens", fmt.count(planned))
        t.add_row("20 tokens/param", fmt.count(recommended))
        t.add_row("  = steps", f"{-(-recommended // tokens_per_step):,}")
        t.add_row("planned / that", f"{planned / recommended:.0%}")
        if hw is None:
            t.add_row("time", "[dim]measuring hardware…[/]")
            return t
        if self.measured and (cfg.train.device != "cpu" or hw.kind == "cpu"):
            flops, source = self.measured
            how = f"measured ({source})"
        else:
            flops, how = hw.estimated_flops, f"est. {hw.assumed_mfu:.0%} of peak"
            if cfg.train.device == "cpu" and hw.kind != "cpu":
                flops, how = estimates.cpu_peak_flops() * 0.25, "est. 25% of CPU peak"
        tps = flops / fpt
        t.add_row("device", (hw.name if cfg.train.device != "cpu" else "cpu")[:18])
        t.add_row("throughput", f"{fmt.count(tps)} tok/s")
        t.add_row("time", f"[b]{fmt.duration(planned / tps, parts=1)}[/b]")
        t.caption, t.caption_justify = f"throughput {how}", "left"
        return t

    def data_status(self, cfg: RunConfig) -> str:
        path = self.value("data-dir")
        if not path:
            return "\n[b]Data[/b]\n[red]no dataset folder[/red]"
        if not self.dataset_prepared():
            sources = self.value("data-sources") or "the built-in corpus"
            return f"\n[b]Data[/b]\n{path}: [yellow]not prepared[/yellow]\nctrl+r prepares it from {sources}"
        report = self.dataset_report()
        train_tokens = ((report.get("splits") or {}).get("train") or {}).get("tokens") or 0
        tok = report.get("tokenizer") or {}
        tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.model.seq_len
        epochs = tokens_per_step * cfg.train.max_steps / train_tokens if train_tokens else 0
        return (f"\n[b]Data[/b]\n{path}: [green]prepared[/green]\n"
                f"{fmt.count(train_tokens)} train tokens, {tok.get('bytes_per_token', 0):.2f} B/token\n"
                f"vocab {tok.get('vocab_size', '?')} · plan = {epochs:{'.2g' if epochs < 10 else ',.0f'}} epochs")

    # -------------------------------------------------------------- actions

    def action_back(self) -> None:
        self.query_one(PreparePanel).cancel()
        self.dismiss(None)

    def action_prepare(self) -> None:
        panel = self.query_one(PreparePanel)
        if panel.running:
            self.app.notify("Preparation is already running")
            return
        if not self.value("data-dir"):
            self.app.notify("Name a dataset folder first", severity="error")
            return
        if self.dataset_prepared():
            # never replaced: runs trained on it need its tokenizer to resume
            self.app.notify(f"{self.value('data-dir')} is already prepared and is used as it is; name a new "
                            "folder to prepare other data", severity="warning")
            self.query_one(PreparePanel).show_report(self.dataset_report(),
                                                     f"{self.value('data-dir')} (prepared earlier)")
            return
        self._start_after_prepare = False
        panel.start(self.prepare_args())

    def action_start(self) -> None:
        if self._starting or self.query_one(PreparePanel).running:
            self.app.notify("Already on it…")
            return
        try:
            self.build_config()
        except WorkbenchError as e:
            self.app.notify(str(e), title="Cannot start", severity="error")
            return
        name = self.value("run-name")
        if not RUN_NAME.match(name):
            self.app.notify("Run name: letters, digits, '.', '_' or '-' (no spaces or slashes)",
                            title="Cannot start", severity="error")
            return
        if (self.app.runs_root / name).exists():
            self.app.notify(f"{self.app.runs_root / name} already exists; pick another name",
                            title="Cannot start", severity="error")
            return
        if not self.dataset_prepared():
            self._start_after_prepare = True
            self.app.notify(f"Preparing {self.value('data-dir')} first…")
            self.query_one(PreparePanel).start(self.prepare_args())
            return
        self._launch()

    @on(PrepareFinished)
    def _prepared(self, message: PrepareFinished) -> None:
        self._reports.clear()
        if message.error:
            self.app.notify(message.error, title="Preparation failed", severity="error", timeout=10)
            self._start_after_prepare = False
        else:
            self.app.notify(f"{message.data_dir} is ready")
            if self._start_after_prepare:
                self._start_after_prepare = False
                self._launch()
        self.update_panel()

    def _launch(self) -> None:
        cfg = self.build_config()
        run_dir = self.app.runs_root / self.value("run-name")
        self._starting = True
        self.app.notify(f"Starting {run_dir.name}…")
        self.start_engine(run_dir, Path(self.value("data-dir")), to_toml(cfg))

    @work(thread=True, exclusive=True, group="start", exit_on_error=False)
    def start_engine(self, run_dir: Path, data: Path, config_toml: str) -> None:
        try:
            engine_calls.start_training(run_dir, data, config_toml)
        except (engine_calls.EngineCallError, OSError) as e:
            self.app.call_from_thread(self._start_failed, run_dir, str(e))
        else:
            self.app.call_from_thread(self.dismiss, run_dir)

    def _start_failed(self, run_dir: Path, error: str) -> None:
        self._starting = False
        self.app.notify(error, title=f"Could not start {run_dir.name}", severity="error", timeout=10)
