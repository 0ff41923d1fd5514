"""Blind side-by-side rating, as FastChat's arena does it.

A prompt (typed, or the next line of a prompt list file) goes to two contenders: two
checkpoints at the same decoding settings, or one checkpoint at two settings. Both
sides use the same seed; which one is shown as A is a coin flip, and who is who stays
hidden until the vote. Each vote is one line in the run's ratings.jsonl (skips write
nothing); the leaderboard ranks what the votes say.

Generation runs in a thread worker that starts `python -m workbench.engine sample ... --json`
child processes (both sides at once), so the TUI process never imports torch.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Input, Label, Static

from workbench import engine_calls, ratings
from workbench.engine.rundir import RunDir

# A generator takes (run_dir, checkpoint, prompt, settings) and returns the generated text.
Generator = Callable[[Path, str, str, dict[str, Any]], str]

DEFAULT_SETTINGS = {"temperature": 0.8, "top_p": 0.95}
SETTINGS_PAIR = ({"temperature": 0.7, "top_p": 0.9}, {"temperature": 1.0, "top_p": 1.0})
MAX_TOKENS = 64


class EngineSampler:
    """The rating screen's generator: one text per call, from engine_calls.Sampler's children."""

    def __init__(self) -> None:
        self._sampler = engine_calls.Sampler()

    def __call__(self, run_dir: Path, checkpoint: str, prompt: str, settings: dict[str, Any]) -> str:
        try:
            sample = self._sampler(run_dir, prompt, checkpoint, max_tokens=settings.get("max_tokens", MAX_TOKENS),
                                   temperature=settings.get("temperature", 0.8), top_p=settings.get("top_p", 1.0),
                                   seed=settings.get("seed"))[0]
        except engine_calls.EngineCallError as e:
            raise RuntimeError(str(e)) from None
        return str(sample.get("text", ""))

    def close(self) -> None:
        self._sampler.close()


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line (blank lines skipped); a line that is a JSON object gives its "prompt"."""
    prompts = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                value = json.loads(line)
                if isinstance(value, dict) and isinstance(value.get("prompt"), str):
                    prompts.append(value["prompt"])
                    continue
            except ValueError:
                pass
        prompts.append(line.rstrip("\n"))
    return prompts


class RatingScreen(Screen):
    TITLE = "Rate samples"
    HELP = """\
Blind A/B: both sides answer the same prompt with the same seed; which contender is A
is a coin flip, and names stay hidden until you vote. Contenders are two checkpoints
(the pair with the fewest votes so far) at the same settings, or, in settings mode,
the newest checkpoint at two decoding settings. Each vote is one line in the run's
ratings.jsonl; a skip writes nothing. Type a prompt and press enter, or `@FILE` to use a
prompt list (one prompt per line; a run's own `prompts.txt` is used when it has one):
`n` then takes the next prompt.
"""

    BINDINGS = [
        Binding("1", "vote('a')", "A", tooltip="Side A is better"),
        Binding("2", "vote('b')", "B", tooltip="Side B is better"),
        Binding("t", "vote('tie')", "Tie", tooltip="Equally good"),
        Binding("x", "vote('both_bad')", "Both bad", tooltip="Neither is acceptable (scored as a tie)"),
        Binding("s", "skip", "Skip", tooltip="No vote; next pair"),
        Binding("n", "next", "Next", tooltip="Next pair (next prompt from the list, if any)"),
        # p and m are hinted on the status line: the footer is full at 80 columns
        Binding("p", "edit_prompt", "Prompt", tooltip="Type a new prompt", show=False),
        Binding("m", "toggle_mode", "Mode", tooltip="Compare checkpoints, or decoding settings", show=False),
        Binding("b", "leaderboard", "Board", tooltip="Checkpoints ranked by Bradley-Terry strength"),
        Binding("escape", "back", "Back", tooltip="Back (or leave the prompt box)", show=False),
    ]

    AUTO_FOCUS = ""  # the prompt box gets focus only when there is no prompt list (else 1/2/t... would type)

    DEFAULT_CSS = """
    RatingScreen { layout: vertical; }
    RatingScreen #rate-status { height: 1; padding: 0 1; background: $boost; }
    RatingScreen #prompt-row { height: 1; margin: 1 0 0 0; }
    RatingScreen #prompt-label { width: auto; padding: 0 1; color: $accent; text-style: bold; }
    RatingScreen #prompt { width: 1fr; }
    RatingScreen #sides { height: 1fr; }
    RatingScreen .side { width: 1fr; border: round $primary 60%; padding: 0 1; }
    RatingScreen .side.-winner { border: round $success; }
    RatingScreen .side.-loser { border: round $error 60%; }
    RatingScreen #verdict { height: 2; padding: 0 1; }
    """

    def __init__(self, run_dir: str | Path, prompts_file: str | Path | None = None, *,
                 generator: Generator | None = None, seed: int | None = None,
                 name: str | None = None, id: str | None = None) -> None:
        super().__init__(name=name, id=id)
        self.run_dir = Path(run_dir)
        self.run = RunDir.at(self.run_dir)
        self.generator = generator or EngineSampler()
        self.rng = random.Random(seed)
        self.prompts: list[str] = []
        self.prompt_index = -1
        self.prompt_error: str | None = None
        if prompts_file is None and (self.run_dir / "prompts.txt").is_file():
            prompts_file = self.run_dir / "prompts.txt"  # a run's own prompt list, if it has one
        if prompts_file:
            self.prompt_error = self._load_prompts(prompts_file)
        self.mode = "checkpoints"
        # a round: prompt, mode, a and b (checkpoint, settings, text once generated), texts, error
        self.round: dict[str, Any] | None = None       # the pair on screen
        self.next_round: dict[str, Any] | None = None  # the next pair, generated ahead after a vote
        self.voted: str | None = None
        self.votes = len(ratings.read_ratings(self.run.ratings))

    # ------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        yield Label("", id="rate-status")
        with Horizontal(id="prompt-row"):
            yield Label("prompt ›", id="prompt-label")
            yield Input(placeholder="type a prompt (or @FILE, one prompt a line), then enter", id="prompt",
                        compact=True)
        with Horizontal(id="sides"):
            with VerticalScroll(id="side-a", classes="side"):
                yield Static("", id="text-a")
            with VerticalScroll(id="side-b", classes="side"):
                yield Static("", id="text-b")
        yield Static("", id="verdict")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.query_one("#side-a").border_title = "A"
        self.query_one("#side-b").border_title = "B"
        if self.prompt_error:
            self.notify(self.prompt_error, severity="error")
        if len(engine_calls.checkpoint_names(self.run_dir)) < 2:
            self.mode = "settings"
        if self.prompts:
            self.action_next()
        else:
            self.query_one("#prompt", Input).focus()
            self._say("Type a prompt and press enter to generate a pair.")
        self._update_status()

    def on_unmount(self) -> None:
        close = getattr(self.generator, "close", None)
        if close is not None:
            close()  # end running samplers now: nobody will read what they write

    # ------------------------------------------------------------ rounds

    def _load_prompts(self, path: str | Path) -> str | None:
        """Use the prompt list in `path`; the reason it could not be used, or None."""
        try:
            prompts = read_prompts(Path(path).expanduser())
        except OSError as e:
            return f"cannot read prompts from {path}: {e.strerror or e}"
        if not prompts:
            return f"no prompts in {path}"
        self.prompts, self.prompt_index = prompts, -1
        return None

    @on(Input.Submitted, "#prompt")
    def _prompt_submitted(self, event: Input.Submitted) -> None:
        prompt = event.value
        if not prompt.strip():
            self.notify("type a prompt first", severity="warning")
            return
        self.set_focus(None)
        if prompt.startswith("@"):  # @FILE: a prompt list, one prompt per line
            error = self._load_prompts(prompt[1:].strip())
            if error:
                self.notify(error, severity="error")
                self.query_one("#prompt", Input).focus()
                return
            self.notify(f"{len(self.prompts)} prompts from {prompt[1:].strip()}", timeout=3)
            self.action_next()
            return
        self.prompts, self.prompt_index = [], -1  # a typed prompt replaces the list
        self._update_status()
        self._start_round(prompt)

    def _contenders(self, quiet: bool = False) -> tuple[dict[str, Any], dict[str, Any]] | None:
        names = engine_calls.checkpoint_names(self.run_dir)
        if not names:
            if not quiet:
                self.notify(f"{self.run.name} has no checkpoint yet: save one first (s on the dashboard)",
                            severity="error", timeout=8)
            return None
        if self.mode == "checkpoints" and len(names) >= 2:
            # the pair with the fewest votes so far, ties broken at random: coverage without bookkeeping
            seen: dict[frozenset, int] = {}
            for vote in ratings.read_ratings(self.run.ratings):
                key = frozenset((vote["a"].get("checkpoint"), vote["b"].get("checkpoint")))
                seen[key] = seen.get(key, 0) + 1
            pairs = list(itertools.combinations(names, 2))
            self.rng.shuffle(pairs)
            first, second = min(pairs, key=lambda p: seen.get(frozenset(p), 0))
            return ({"checkpoint": first, "settings": dict(DEFAULT_SETTINGS)},
                    {"checkpoint": second, "settings": dict(DEFAULT_SETTINGS)})
        newest = names[-1]
        return ({"checkpoint": newest, "settings": dict(SETTINGS_PAIR[0])},
                {"checkpoint": newest, "settings": dict(SETTINGS_PAIR[1])})

    @property
    def generating(self) -> bool:
        return self.round is not None and self.round["texts"] is None and self.round["error"] is None

    def _new_round(self, prompt: str, quiet: bool = False) -> dict[str, Any] | None:
        contenders = self._contenders(quiet)
        if contenders is None:
            return None
        a, b = contenders
        if self.rng.random() < 0.5:
            a, b = b, a  # the blind part: which contender is A is a coin flip
        seed = self.rng.randrange(2**31)
        for side in (a, b):
            side["settings"].update(seed=seed, max_tokens=MAX_TOKENS)
        round_ = {"prompt": prompt, "mode": self.mode, "a": a, "b": b, "texts": None, "error": None}
        self._generate(round_)
        return round_

    def _start_round(self, prompt: str) -> None:
        if self.generating:
            self.notify("still generating the current pair", severity="warning")
            return
        ahead, self.next_round = self.next_round, None
        if ahead is not None and ahead["prompt"] == prompt and ahead["mode"] == self.mode and not ahead["error"]:
            round_ = ahead  # generated (or still generating) while you read the last pair
        else:
            round_ = self._new_round(prompt)
            if round_ is None:
                return
        self.round, self.voted = round_, None
        for side in ("a", "b"):
            panel = self.query_one(f"#side-{side}")
            panel.border_title = side.upper()
            panel.remove_class("-winner", "-loser")
            self.query_one(f"#text-{side}", Static).update("")
        if round_["texts"] is None:
            for side in ("a", "b"):
                self.query_one(f"#side-{side}").loading = True
            self._say(Text.assemble(("generating… ", "italic"), ("prompt: ", "dim"), prompt))
        else:
            self._show_pair(round_)
        self._update_status()
        self.refresh_bindings()

    def _prefetch(self) -> None:
        """Start the next pair while the user reads this one's reveal, so `n` is (nearly) instant."""
        if self.next_round is not None:
            return
        if self.prompts:
            prompt = self.prompts[(self.prompt_index + 1) % len(self.prompts)]
        else:
            prompt = self.query_one("#prompt", Input).value
        if prompt.strip() and not prompt.startswith("@"):
            self.next_round = self._new_round(prompt, quiet=True)

    @work(thread=True, group="generate", exit_on_error=False)
    def _generate(self, round_: dict[str, Any]) -> None:
        def one(side: dict[str, Any]) -> str:
            return self.generator(self.run_dir, side["checkpoint"], round_["prompt"], side["settings"])

        texts, error = None, None
        try:
            with ThreadPoolExecutor(max_workers=2) as pool:
                texts = list(pool.map(one, (round_["a"], round_["b"])))
        except Exception as e:  # a failed sampler: one line, never a traceback
            error = (str(e) or type(e).__name__).strip().splitlines()[-1]
        try:
            self.app.call_from_thread(self._round_done, round_, texts, error)
        except RuntimeError:  # the app closed meanwhile
            pass

    def _round_done(self, round_: dict[str, Any], texts: list[str] | None, error: str | None) -> None:
        if texts is not None:
            for side, text in zip(("a", "b"), texts, strict=True):
                round_[side]["text"] = text
        round_["texts"], round_["error"] = texts, error
        if round_ is not self.round or not self.is_mounted:
            return  # a pair generated ahead (kept for `n`) or an abandoned one
        if error:
            self._generation_failed(error)
        else:
            self._show_pair(round_)

    def _show_pair(self, round_: dict[str, Any]) -> None:
        for side in ("a", "b"):
            self.query_one(f"#side-{side}").loading = False
            self.query_one(f"#text-{side}", Static).update(self._as_text(round_["prompt"], round_[side]["text"]))
        self._say(Text.assemble(("Which is better?  ", "bold"), "1 A · 2 B · t tie · x both bad · s skip"))
        self.refresh_bindings()

    def _generation_failed(self, message: str) -> None:
        for side in ("a", "b"):
            self.query_one(f"#side-{side}").loading = False
        self.round = None
        self.notify(f"generation failed: {message}", severity="error", timeout=10)
        self._say(Text(f"generation failed: {message}  (n to try again)", "red"))
        self.refresh_bindings()

    @staticmethod
    def _as_text(prompt: str, text: str) -> Text:
        # the prompt dim, then the continuation (a sampler that echoes the prompt is handled too)
        if text.startswith(prompt):
            text = text[len(prompt):]
        return Text.assemble((prompt, "dim"), text)

    # ------------------------------------------------------------ voting

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("vote", "skip"):
            ready = self.round is not None and not self.generating and self.voted is None
            return True if ready else None
        return True

    def action_vote(self, verdict: str) -> None:
        if self.round is None or self.generating or self.voted is not None:
            return
        self.voted = verdict
        vote = ratings.make_vote(self.round["prompt"], self.round["a"], self.round["b"], verdict)
        self._save_vote(vote)
        self._reveal(verdict)
        self.refresh_bindings()

    @work(thread=True, group="save", exit_on_error=False)
    def _save_vote(self, vote: dict[str, Any]) -> None:
        try:
            ratings.append_rating(self.run.ratings, vote)
        except OSError as e:
            self.app.call_from_thread(self.notify, f"vote not saved: {e.strerror or e}", severity="error")
            return
        self.app.call_from_thread(self._vote_saved)

    def _vote_saved(self) -> None:
        self.votes += 1
        self._update_status()
        if self.is_mounted:
            self._prefetch()

    def _reveal(self, verdict: str) -> None:
        assert self.round is not None
        names = {side: ratings.player_name(self.round[side]) for side in ("a", "b")}
        for side in ("a", "b"):
            panel = self.query_one(f"#side-{side}")
            panel.border_title = f"{side.upper()} · {names[side]}"
            if verdict in ("a", "b"):
                panel.set_class(side == verdict, "-winner")
                panel.set_class(side != verdict, "-loser")
        self._say(Text.assemble(("You said: ", "bold"), (ratings.VERDICT_LABELS[verdict], "bold green"),
                                ("   n: next pair", "dim"), f"\nA was {names['a']} · B was {names['b']}"))

    def action_skip(self) -> None:
        self.action_next()

    def action_next(self) -> None:
        if self.prompts:
            self.prompt_index = (self.prompt_index + 1) % len(self.prompts)
            prompt = self.prompts[self.prompt_index]
            self.query_one("#prompt", Input).value = prompt
        else:
            prompt = self.query_one("#prompt", Input).value
            if not prompt.strip():
                self.query_one("#prompt", Input).focus()
                self.notify("type a prompt first", severity="warning")
                return
        self._start_round(prompt)

    def action_edit_prompt(self) -> None:
        self.query_one("#prompt", Input).focus()

    def action_toggle_mode(self) -> None:
        if self.mode == "settings" and len(engine_calls.checkpoint_names(self.run_dir)) < 2:
            self.notify("only one checkpoint: comparing decoding settings", severity="warning")
            return
        self.mode = "settings" if self.mode == "checkpoints" else "checkpoints"
        self.next_round = None
        self._update_status()
        self.notify(f"next pair compares {self.mode}", timeout=3)

    def action_leaderboard(self) -> None:
        from workbench.screens.leaderboard import LeaderboardScreen

        stack = self.app.screen_stack
        if len(stack) > 1 and isinstance(stack[-2], LeaderboardScreen) and stack[-2].run_dir == self.run_dir:
            self.app.pop_screen()  # came here from the leaderboard: go back to it
        else:
            self.app.push_screen(LeaderboardScreen(self.run_dir))

    def action_back(self) -> None:
        if isinstance(self.focused, Input) and self.focused.value:
            self.set_focus(None)  # leave the prompt box (so 1/2/t/x vote again); escape again goes back
            return
        if len(self.app.screen_stack) > 1:
            self.app.pop_screen()
        else:
            self.app.exit()

    # ------------------------------------------------------------ status

    def _update_status(self) -> None:
        what = "two checkpoints" if self.mode == "checkpoints" else "two decoding settings"
        prompts = f" · prompt {self.prompt_index + 1}/{len(self.prompts)}" if self.prompts else ""
        votes = f"{self.votes} vote{'' if self.votes == 1 else 's'}"
        self.query_one("#rate-status", Label).update(Text.assemble(
            ("Rate ", "bold"), (self.run.name, "bold"), f" · {votes} · {what}{prompts}",
            ("  p prompt · m mode", "dim")))

    def _say(self, text: str | Text) -> None:
        self.query_one("#verdict", Static).update(text)
