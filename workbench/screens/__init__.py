"""The TUI screens, one module each."""
