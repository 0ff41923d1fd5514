"""ratings.jsonl reading/appending and the Bradley-Terry leaderboard (pure numpy, no torch)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from workbench import ratings as R


def side(checkpoint, text="x", **settings):
    return {"text": text, "checkpoint": checkpoint, "settings": settings}


def vote(a, b, verdict, prompt="p"):
    return R.make_vote(prompt, side(a), side(b), verdict, when=1.0)


def test_append_then_read_roundtrip(tmp_path):
    path = tmp_path / "ratings.jsonl"
    v1 = R.make_vote("Once", side("step_000100", "hello", temperature=0.8), side("step_000200", "world"), "a")
    v2 = R.make_vote("Twice ünïcode", side("step_000200"), side("step_000100"), "both_bad")
    R.append_rating(path, v1)
    R.append_rating(path, v2)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    assert json.loads(lines[0])["a"] == {"text": "hello", "checkpoint": "step_000100",
                                         "settings": {"temperature": 0.8}}
    assert R.read_ratings(path) == [v1, v2]
    assert set(v1) == {"v", "time", "prompt", "a", "b", "verdict"}


def test_torn_last_line_is_skipped_and_next_append_starts_a_fresh_line(tmp_path):
    path = tmp_path / "ratings.jsonl"
    good = vote("step_000100", "step_000200", "tie")
    R.append_rating(path, good)
    with open(path, "ab") as f:  # a writer died mid-line
        f.write(b'{"v":1,"prompt":"half a vo')
    assert R.read_ratings(path) == [good]
    R.append_rating(path, vote("step_000200", "step_000100", "b"))
    assert [v["verdict"] for v in R.read_ratings(path)] == ["tie", "b"]


def test_missing_file_and_malformed_lines(tmp_path):
    assert R.read_ratings(tmp_path / "nope.jsonl") == []
    path = tmp_path / "ratings.jsonl"
    path.write_text('[1,2]\n{"verdict":"maybe","a":{},"b":{}}\nnot json\n\n')
    assert R.read_ratings(path) == []
    with pytest.raises(ValueError):
        R.make_vote("p", side("a"), side("b"), "maybe")


def test_player_names_include_settings():
    assert R.player_name(side("step_000100")) == "step_000100"
    assert R.player_name(side("step_000100", temperature=0.8, top_p=0.95)) == "step_000100 T0.8 p0.95"


def test_settings_are_named_only_where_they_vary():
    same = [R.make_vote("p", side("c1", temperature=0.8), side("c2", temperature=0.8), "a", 1.0)]
    assert [s.player for s in R.leaderboard(same, rounds=0)] == ["c1", "c2"]
    varied = [R.make_vote("p", side("c1", temperature=0.7), side("c1", temperature=1.0), "b", 1.0)]
    assert [s.player for s in R.leaderboard(varied, rounds=0)] == ["c1 T1", "c1 T0.7"]


def test_bradley_terry_recovers_known_strengths():
    """Votes drawn from a known BT model: the fit ranks players correctly and lands near the truth."""
    rng = np.random.default_rng(1)
    true = np.array([0.0, 200.0, 400.0])  # Elo-scale strengths
    votes = []
    for _ in range(1500):
        i, j = rng.choice(3, size=2, replace=False)
        p_i = 1 / (1 + 10 ** ((true[j] - true[i]) / 400))
        votes.append(vote(f"m{i}", f"m{j}", "a" if rng.random() < p_i else "b"))
    table = R.leaderboard(votes, rounds=50)
    assert [s.player for s in table] == ["m2", "m1", "m0"]
    by = {s.player: s for s in table}
    assert abs((by["m2"].rating - by["m0"].rating) - 400) < 60
    assert abs((by["m1"].rating - by["m0"].rating) - 200) < 60
    for s in table:
        assert s.low <= s.rating <= s.high
        assert s.votes == s.wins + s.ties + s.losses
    assert np.isclose(np.mean([s.rating for s in table]), 1000.0)


def test_ties_count_half_and_both_bad_is_a_tie():
    # A beats B twice, they tie twice: A ahead; B is not minus infinity (the prior keeps it finite)
    votes = [vote("A", "B", "a"), vote("B", "A", "b"), vote("A", "B", "tie"), vote("A", "B", "both_bad")]
    table = R.leaderboard(votes, rounds=20)
    a, b = table
    assert (a.player, b.player) == ("A", "B")
    assert a.rating > b.rating and np.isfinite(b.rating)
    assert (a.votes, a.wins, a.ties, a.losses, a.both_bad) == (4, 2, 2, 0, 1)
    assert (b.wins, b.losses) == (0, 2)
    # only ties: equal strengths
    even = R.leaderboard([vote("A", "B", "tie"), vote("A", "B", "both_bad")], rounds=10)
    assert abs(even[0].rating - even[1].rating) < 1e-6


def test_symmetry_and_determinism():
    votes = [vote("A", "B", "a"), vote("B", "C", "a"), vote("C", "A", "b"), vote("A", "C", "tie")]
    t1, t2 = R.leaderboard(votes, seed=3), R.leaderboard(votes, seed=3)
    assert [(s.player, s.rating, s.low, s.high) for s in t1] == [(s.player, s.rating, s.low, s.high) for s in t2]
    # swapping sides (and the verdict with them) changes nothing
    swapped = [R.make_vote(v["prompt"], v["b"], v["a"], {"a": "b", "b": "a"}.get(v["verdict"], v["verdict"]), 1.0)
               for v in votes]
    t3 = R.leaderboard(swapped, seed=3)
    assert {s.player: round(s.rating, 6) for s in t1} == {s.player: round(s.rating, 6) for s in t3}


def test_same_player_both_sides_and_empty():
    assert R.leaderboard([]) == []
    assert R.leaderboard([vote("A", "A", "a")]) == []


def test_ratings_module_imports_no_torch():
    code = "import sys, workbench.ratings; assert 'torch' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr
