"""The Textual application (issue 4 builds the screens)."""


def run_app() -> int:
    print("The workbench TUI is not built yet; use `workbench --help` for the headless commands.")
    return 0
