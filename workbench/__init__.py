"""The workbench TUI (Textual). Never imports torch or cupy: it starts fast and stays light over SSH."""
