"""Data preparation (`workbench prepare`): sources -> clean -> filter -> dedup -> tokenizer -> shards.

prepare.py (pipeline, CLI), settings.py (every knob), sources.py (files, folders, JSONL),
builtin.py (Python's own documentation), clean.py, filters.py, dedup.py, stream.py (the read
pass, on worker processes), report.py (report.json / report.txt).
"""
