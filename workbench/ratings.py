"""Blind A/B ratings: the ratings.jsonl file and Bradley-Terry strengths with bootstrap intervals.

One line per vote, appended (never rewritten), as FastChat's arena logs its battles:

    {"v": 1, "time": 1732530000.1, "prompt": "...", "verdict": "a",
     "a": {"text": "...", "checkpoint": "step_000200", "settings": {"temperature": 0.8, "top_p": 0.95}},
     "b": {...}}

`verdict` is one of "a", "b", "tie", "both_bad". A skipped pair writes nothing.

Scoring decision: a tie counts as half a win for each side, and "both bad" counts as a tie
(FastChat does the same: it says neither side was better). Both are still counted separately
in the leaderboard's vote columns so the user can see them.

The strength fit is Hunter's MM algorithm for the Bradley-Terry model, with a weak prior
(one virtual tie of every player against a fixed reference of strength 1) so that a player
that never won, or never lost, still gets a finite rating. Ratings are shown on the familiar
Elo scale: 400 * log10(strength), centred so the players' mean is 1000.

Pure Python and numpy: the TUI imports this, and the TUI never imports torch.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from workbench.engine import formatting as fmt

SCHEMA_VERSION = 1
VERDICTS = ("a", "b", "tie", "both_bad")
VERDICT_LABELS = {"a": "A better", "b": "B better", "tie": "tie", "both_bad": "both bad"}
ELO_SCALE = 400.0
ELO_BASE = 1000.0


# ---------------------------------------------------------------- the file

def read_ratings(path: str | Path) -> list[dict[str, Any]]:
    """Every complete, well-formed vote in the file; a torn or malformed line is skipped."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    votes = []
    for raw in data.splitlines():
        try:
            vote = json.loads(raw)
        except ValueError:
            continue  # torn last line (crash mid-write) or garbage: not a vote
        if _is_vote(vote):
            votes.append(vote)
    return votes


def _is_vote(vote: Any) -> bool:
    return (isinstance(vote, dict) and vote.get("verdict") in VERDICTS
            and isinstance(vote.get("a"), dict) and isinstance(vote.get("b"), dict))


def make_vote(prompt: str, a: dict[str, Any], b: dict[str, Any], verdict: str,
              when: float | None = None) -> dict[str, Any]:
    """A vote record. `a` and `b` are {"text", "checkpoint", "settings"} as shown on each side."""
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}, not {verdict!r}")
    def side(s: dict[str, Any]) -> dict[str, Any]:
        return {"text": s.get("text", ""), "checkpoint": s.get("checkpoint"), "settings": dict(s.get("settings") or {})}

    return {"v": SCHEMA_VERSION, "time": round(time.time() if when is None else when, 3),
            "prompt": prompt, "a": side(a), "b": side(b), "verdict": verdict}


def append_rating(path: str | Path, vote: dict[str, Any]) -> None:
    """Append one vote as one line, durably.

    If an earlier writer died mid-line, the file does not end in a newline: start on a fresh
    line so this vote is not glued onto the torn one (which readers skip).
    """
    if not _is_vote(vote):
        raise ValueError("not a vote record (see make_vote)")
    line = json.dumps(vote, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"
    path = Path(path)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- players

def player_name(side: dict[str, Any]) -> str:
    """Who a side was: its checkpoint, plus its decoding settings when it had any.

    Comparing two checkpoints at the same settings and comparing two settings of one
    checkpoint both rank cleanly this way.
    """
    name = str(side.get("checkpoint") or "?")
    settings = side.get("settings") or {}
    short = {"temperature": "T", "top_p": "p", "top_k": "k"}
    parts = [f"{short[k]}{fmt.sig(settings[k], 6, na=str(settings[k]))}" for k in short if settings.get(k) is not None]
    return f"{name} {' '.join(parts)}" if parts else name


def namer(votes: list[dict[str, Any]]):
    """A side -> player-name function for these votes: settings are named only where they vary.

    A checkpoint always rated at one setting is just its checkpoint name; one rated at
    several settings becomes one player per setting.
    """
    settings_of: dict[str, set[str]] = {}
    for vote in votes:
        for side in (vote["a"], vote["b"]):
            settings_of.setdefault(str(side.get("checkpoint") or "?"), set()).add(player_name(side))
    return lambda side: (player_name(side) if len(settings_of.get(str(side.get("checkpoint") or "?"), ())) > 1
                         else str(side.get("checkpoint") or "?"))


# ---------------------------------------------------------------- Bradley-Terry

@dataclass
class Standing:
    player: str
    rating: float          # Elo scale, mean 1000
    low: float             # bootstrap 2.5th percentile
    high: float            # bootstrap 97.5th percentile
    votes: int             # votes this player took part in
    wins: int
    ties: int              # ties and "both bad" together
    losses: int
    both_bad: int          # of which "both bad"


def outcomes(votes: list[dict[str, Any]]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Players, and per vote: index of side a, index of side b, score of a (1, 0.5 or 0).

    A vote whose two sides are the same player says nothing about strength and is dropped.
    """
    players: dict[str, int] = {}
    ia, ib, score = [], [], []
    name = namer(votes)
    for vote in votes:
        pa, pb = name(vote["a"]), name(vote["b"])
        if pa == pb:
            continue
        ia.append(players.setdefault(pa, len(players)))
        ib.append(players.setdefault(pb, len(players)))
        score.append({"a": 1.0, "b": 0.0}.get(vote["verdict"], 0.5))
    return (list(players), np.array(ia, dtype=np.int64), np.array(ib, dtype=np.int64),
            np.array(score, dtype=np.float64))


def fit_strengths(n_players: int, ia: np.ndarray, ib: np.ndarray, score: np.ndarray,
                  weights: np.ndarray | None = None, iters: int = 2000, tol: float = 1e-10) -> np.ndarray:
    """Bradley-Terry log-strengths by Hunter's MM updates; returns Elo-scale ratings (mean 1000).

    `weights` counts how often each vote is used (the bootstrap resamples through it).
    """
    if n_players == 0:
        return np.zeros(0)
    w = np.ones_like(score) if weights is None else weights.astype(np.float64)
    wins = np.zeros((n_players, n_players))          # wins[i, j]: points i scored against j
    np.add.at(wins, (ia, ib), w * score)
    np.add.at(wins, (ib, ia), w * (1.0 - score))
    games = wins + wins.T
    prior = 1.0  # one virtual tie with a reference player of strength 1 keeps every strength finite
    won = wins.sum(axis=1) + prior / 2
    p = np.ones(n_players)
    for _ in range(iters):
        denom = (games / (p[:, None] + p[None, :])).sum(axis=1) + prior / (p + 1.0)
        new = won / denom
        if np.max(np.abs(new - p) / p) < tol:
            p = new
            break
        p = new
    log_p = np.log(p)
    return ELO_BASE + ELO_SCALE / np.log(10) * (log_p - log_p.mean())


def leaderboard(votes: list[dict[str, Any]], rounds: int = 200, seed: int = 0) -> list[Standing]:
    """Players ranked by Bradley-Terry rating, with 95% bootstrap intervals and vote counts.

    The bootstrap resamples whole votes with replacement `rounds` times (seeded: the same
    file always gives the same table).
    """
    players, ia, ib, score = outcomes(votes)
    k, n = len(players), len(score)
    if k == 0:
        return []
    ratings = fit_strengths(k, ia, ib, score)
    low, high = ratings.copy(), ratings.copy()
    if n > 1 and rounds > 0:
        rng = np.random.default_rng(seed)
        samples = np.array([fit_strengths(k, ia, ib, score, rng.multinomial(n, np.full(n, 1.0 / n)))
                            for _ in range(rounds)])
        low, high = np.percentile(samples, 2.5, axis=0), np.percentile(samples, 97.5, axis=0)

    counts = {name: [0, 0, 0, 0, 0] for name in players}  # votes, wins, ties, losses, both_bad
    name = namer(votes)
    for vote in votes:
        pa, pb = name(vote["a"]), name(vote["b"])
        if pa == pb:
            continue
        for me, mine in ((pa, "a"), (pb, "b")):
            c = counts[me]
            c[0] += 1
            verdict = vote["verdict"]
            if verdict in ("a", "b"):
                c[1 if verdict == mine else 3] += 1
            else:
                c[2] += 1
                c[4] += verdict == "both_bad"
    table = [Standing(player, float(ratings[i]), float(low[i]), float(high[i]), *counts[player])
             for i, player in enumerate(players)]
    table.sort(key=lambda s: (-s.rating, s.player))
    return table
