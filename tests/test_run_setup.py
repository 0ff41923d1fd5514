"""The one config path: a run's config.toml is what every engine reads, foreground or detached."""

from __future__ import annotations

import pytest
from engine_helpers import events_of, tiny_config, tiny_raw, wait_for, workbench, write_toml

from workbench.engine import config as config_mod
from workbench.engine.errors import ConfigError
from workbench.engine.process import client
from workbench.engine.process.spawn import spawn_detached
from workbench.engine.run_setup import check_resume, create_run
from workbench.engine.rundir import RunDir
from workbench.engine.train import train


def test_create_run_resolves_the_data_fields_into_config_toml(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, model={"vocab_size": 0})
    run = create_run(tmp_path / "run", cfg)
    written = config_mod.load(RunDir.at(run).config)
    assert written.model.vocab_size > 0 and written == cfg
    assert (run / "tokenizer.model").is_file()


def test_a_failed_check_writes_nothing(tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="not more than model.seq_len 999999"):
        create_run(tmp_path / "run", tiny_config(tiny_data, model={"seq_len": 999999}))
    assert not (tmp_path / "run").exists()
    existing = create_run(tmp_path / "taken", tiny_config(tiny_data))
    before = RunDir.at(existing).config.read_text()
    with pytest.raises(ConfigError, match="already exists"):
        create_run(existing, tiny_config(tiny_data, train={"max_steps": 5}))
    assert RunDir.at(existing).config.read_text() == before


def _edit_config(run, **values) -> None:
    """Change the run's config.toml as a person with an editor would."""
    raw = config_mod.load(RunDir.at(run).config).to_dict()
    for dotted, value in values.items():
        section, key = dotted.split("__")
        raw[section][key] = value
    write_toml(RunDir.at(run).config, raw)


def test_the_foreground_trainer_reads_config_toml(tiny_data, tmp_path):
    run = create_run(tmp_path / "run", tiny_config(tiny_data))
    _edit_config(run, train__max_steps=4, checkpoint__interval=2)
    assert train(run, echo=None) == "finished"
    assert [e["step"] for e in events_of(run, "checkpoint")] == [2, 4]


def test_the_detached_engine_reads_config_toml(tiny_data, tmp_path):
    run = create_run(tmp_path / "run", tiny_config(tiny_data))
    _edit_config(run, train__max_steps=3, checkpoint__interval=0)
    spawn_detached(run, stats_interval=0)
    wait_for(lambda: client.run_state(run) == "finished", timeout=120, what="the engine to finish")
    assert events_of(run, "step")[-1]["step"] == 3


def test_resume_writes_its_changes_into_the_run(tiny_data, tmp_path):
    run = create_run(tmp_path / "run", tiny_config(tiny_data, train={"max_steps": 4}, checkpoint={"interval": 2}))
    assert train(run, echo=None) == "finished"
    with pytest.raises(ConfigError, match="already at step 4 of 4"):
        check_resume(run)
    check_resume(run, ["train.max_steps=6"])
    assert config_mod.load(RunDir.at(run).config).train.max_steps == 6
    assert train(run, resume=True, echo=None) == "finished"
    assert events_of(run, "step")[-1]["step"] == 6


def test_cli_new_run_and_resume_share_the_path(tiny_data, tmp_path):
    config = write_toml(tmp_path / "cfg.toml", tiny_raw(None, train={"max_steps": 2}, checkpoint={"interval": 0}))
    made = workbench("train", config, "--data", tiny_data, "--run", tmp_path / "run", timeout=300)
    assert made.returncode == 0, made.stderr
    assert config_mod.load(tmp_path / "run" / "config.toml").data.path == str(tiny_data.resolve())
    again = workbench("train", "--resume", tmp_path / "run", "--max-steps", "3", timeout=300)
    assert again.returncode == 0, again.stderr
    assert config_mod.load(tmp_path / "run" / "config.toml").train.max_steps == 3
