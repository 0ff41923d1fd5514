"""The event schema (workbench.engine.events): the writer refuses what its definitions do not say,
readers get events of the current schema only (old runs' upgraded), and a real run writes
nothing but valid events."""

from __future__ import annotations

import json
import re
import threading
import typing

import pytest
from event_fixtures import RUNNING, complete, fields

from workbench.engine import events
from workbench.engine.events import EventReader, EventWriter, SchemaError, read_events


@pytest.fixture
def writer(tmp_path):
    w = EventWriter(tmp_path / "events.jsonl")
    yield w
    w.close()


@pytest.mark.parametrize("kind, given, why", [
    ("progress", {"step": 1}, "unknown event type 'progress'"),
    ("step", {k: v for k, v in fields("step").items() if k != "loss"}, "step event: missing loss"),
    ("step", {**fields("step"), "tok_per_s": 1.0}, "step event: unknown field 'tok_per_s'"),
    ("step", {**fields("step"), "step": "7"}, "step event: step: expected an int"),
    ("step", {**fields("step"), "step": 7.0}, "step event: step: expected an int"),
    ("step", {**fields("step"), "step": True}, "step event: step: expected an int"),
    ("step", {**fields("step"), "loss": float("nan")}, "step event: loss: expected a finite number"),
    ("step", {**fields("step"), "mfu": 1.5}, "step event: mfu: expected 0-1"),
    ("state", {"state": "sleeping"}, "state event: state: expected one of starting, running"),
    ("state", {"state": "running"}, "state event: a running state carries device, dtype, kernels"),
    ("state", {"state": "paused", **RUNNING}, "state event: only a running state carries device"),
    ("log", {"message": "no level"}, "log event: missing level"),
    ("log", {"level": "debug", "message": "x"}, "log event: level: expected one of info, warning, error"),
    ("log", {"level": "info", "message": "x", "settings": {"lr_scale": "half"}},
     "log event: settings: ['lr_scale']: expected a finite number"),
    ("system", {**fields("system"), "cpu_percent": 180.0}, "system event: cpu_percent: expected 0-100"),
    ("system", {**fields("system"), "rss_bytes": 1.5e9}, "system event: rss_bytes: expected an int"),
    ("system", {**fields("system"), "gpus": [{"index": 0}]}, "system event: gpus: [0]: missing mem_total_bytes"),
    ("system", {**fields("system"), "engine_gpu": {"device": 0}}, "system event: engine_gpu: missing"),
    ("eval", {**fields("eval"), "val_bpb": "n/a"}, "eval event: val_bpb: expected a finite number"),
])
def test_emit_refuses_an_event_its_definition_does_not_allow(writer, kind, given, why):
    with pytest.raises(SchemaError, match=re.escape(why)):
        writer.emit(kind, **given)
    writer.emit("log", level="info", message="still writable")
    writer.close()
    assert [e["type"] for e in read_events(writer.path)[0]] == ["log"]  # the refused event left no line


def test_emit_writes_every_complete_event_and_readers_get_it_back(writer):
    written = [writer.emit(kind, **fields(kind, **extra)) for kind, extra in (
        ("state", {"state": "running"}), ("step", {"step": 3}), ("eval", {"val_bpb": 1.5}), ("sample", {}),
        ("checkpoint", {"val_loss": 2.5}), ("system", {"gpus": [GPU], "engine_gpu": ENGINE_GPU}),
        ("log", {"settings": {"lr_scale": 0.5, "eval.interval": 100}}), ("error", {"traceback": "Traceback ..."}))]
    writer.close()
    assert {e["type"] for e in written} == set(events.EVENT_TYPES)
    assert read_events(writer.path)[0] == written
    assert all(e["v"] == events.SCHEMA_VERSION == 2 for e in written)


GPU = {"index": 0, "name": "NVIDIA H100 80GB HBM3", "util_percent": 97, "mem_used_bytes": 70 << 30,
       "mem_total_bytes": 80 << 30, "temp_c": 71, "power_w": 650.5, "power_limit_w": 700.0, "sm_clock_mhz": 1980}
ENGINE_GPU = {"device": 0, "allocated_bytes": 60 << 30, "reserved_bytes": 66 << 30}


def test_every_field_of_every_event_is_documented_in_its_docstring():
    """The TypedDicts and their docstrings are the protocol: no field without its meaning."""
    for cls in (*events.EVENTS.values(), events.Gpu, events.EngineGpu):
        doc = cls.__doc__ or ""
        for name in typing.get_type_hints(cls):
            if name not in ("v", "t", "type"):
                assert re.search(rf"^\s+{re.escape(name)}\s", doc, re.M), f"{cls.__name__}.{name} is not documented"


def test_readers_skip_lines_that_are_not_events_and_drop_fields_they_do_not_know(tmp_path):
    path = tmp_path / "events.jsonl"
    good = complete({"type": "step", "step": 2})
    lines = [
        json.dumps({"v": 2, "t": 1.0, "type": "step", "step": 1}),  # fields missing
        json.dumps({"v": 2, "t": 1.0, "type": "telemetry", "x": 1}),  # a type this version does not know
        json.dumps([1, 2, 3]),
        json.dumps({**good, "v": 3, "future_field": [1]}),  # a newer writer: read as far as understood
        json.dumps({**good, "v": "2"}),
        json.dumps(good),
    ]
    path.write_text("\n".join(lines) + "\n")
    got, end = read_events(path)
    assert got == [{**good, "v": 3}, good] and end == path.stat().st_size


def test_v1_events_are_upgraded_by_the_read_path(tmp_path):
    path = tmp_path / "events.jsonl"
    v1 = [
        {"v": 1, "t": 1.0, "type": "state", "state": "starting"},
        {"v": 1, "t": 2.0, "type": "log", "message": "kernels: cupy (CuPy kernels on NVIDIA H100 80GB HBM3)"},
        {"v": 1, "t": 2.0, "type": "log", "message": "device: NVIDIA H100 80GB HBM3, bfloat16, peak 989TFLOP/s"},
        {"v": 1, "t": 2.0, "type": "state", "state": "running"},
        {"v": 1, "t": 3.0, "type": "system", "cpu_percent": 250.0, "machine_cpu_percent": 31.5, "cpu_count": 8,
         "rss_bytes": 2 << 30, "ram_used_bytes": 9 << 30, "ram_total_bytes": 64 << 30, "gpus": [GPU],
         "engine_gpu": ENGINE_GPU},
        {"v": 1, "t": 4.0, "type": "state", "state": "paused"},
        {"v": 1, "t": 5.0, "type": "state", "state": "running"},  # resumed: no new device line in v1
    ]
    path.write_text("".join(json.dumps(e) + "\n" for e in v1))
    whole, _ = read_events(path)
    running = {"device": "NVIDIA H100 80GB HBM3", "dtype": "bfloat16", "kernels": "cupy"}
    assert whole[3] == {"v": 2, "t": 2.0, "type": "state", "state": "running", **running}
    assert whole[6] == {**whole[3], "t": 5.0}
    assert whole[1]["level"] == "info" and whole[1]["message"].startswith("kernels: ")
    system = whole[4]
    assert system["cpu_percent"] == 31.5 and system["process_cpu_percent"] == 250.0
    assert "machine_cpu_percent" not in system
    for e in whole:
        events.check(e)  # upgraded v1 events are exactly v2 events
    # read a line at a time, as a live reader does: the reader carries what the upgrade learnt
    reader, one_by_one = EventReader(path), []
    for _ in v1:
        one_by_one += reader.read(max_bytes=10)
    assert one_by_one == whole


def test_a_real_run_writes_only_valid_events(tiny_data, tmp_path):
    """Trainer, system sampler and request dispatcher (the in-process engine, driven over its socket):
    every line they write is exactly what the schema defines."""
    from engine_helpers import tiny_config, wait_for

    from workbench.engine.process import client
    from workbench.engine.process.host import host
    from workbench.engine.run_setup import create_run

    # a time budget only in case the requests go wrong: they end the run long before
    cfg = tiny_config(tiny_data, train={"max_steps": 100_000, "log_interval": 2, "max_seconds": 240},
                      eval={"interval": 50, "sample_interval": 50, "sample_prompt": "The "})
    run = create_run(tmp_path / "run", cfg)
    replies, failures = [], []

    def drive() -> None:
        try:
            wait_for(lambda: client.tail_events(run / "events.jsonl", {"running": client.RUNNING}), timeout=120)
            for op, args in (("pause", {}), ("set", {"values": {"lr_scale": 0.5, "eval.interval": 40}}),
                             ("resume", {}), ("eval", {}), ("sample", {"prompt": "A"}), ("save", {}),
                             ("stop", {})):
                replies.append(client.request(run, op, timeout=120, **args))
        except BaseException as e:  # reported by the test thread
            failures.append(e)

    driver = threading.Thread(target=drive)
    driver.start()
    assert host(run, stats_interval=0.05, echo=None) == "stopped"
    driver.join(60)
    assert not failures, failures
    assert all(r["ok"] for r in replies)

    lines = (run / "events.jsonl").read_text().splitlines()
    written = [json.loads(line) for line in lines]
    for event in written:
        events.check(event)  # raises on anything the schema does not define exactly
    assert {e["type"] for e in written} >= {"state", "step", "eval", "sample", "checkpoint", "system", "log"}
    assert all(e["v"] == 2 for e in written)
    running = [e for e in written if e["type"] == "state" and e["state"] == "running"]
    assert len(running) == 2 and all(e["device"].startswith("cpu") and e["kernels"] == "torch" for e in running)
    assert read_events(run / "events.jsonl")[0] == written  # and the readers take every one as it is
    assert any("settings" in e for e in written if e["type"] == "log")
