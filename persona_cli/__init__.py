"""The ``persona`` script: the engine's command line, and the app when no command is given.

It lives outside ``engine/`` so the engine never imports the app (``tui``): ``persona run``
and ``persona status`` never load Textual, and ``persona`` alone opens the app.
"""

from __future__ import annotations

import sys

from engine.cli import main as engine_main
from engine.store.workspace import Workspace
from persona_cli import speed

# Commands of the ``persona`` script beyond the engine's own (run, status, init).
COMMANDS = {"speed": speed}


def open_app(ws: Workspace) -> int:
    from engine.backends import quiet_libraries

    quiet_libraries()  # libraries must not draw progress bars over the screen
    from tui.app import main as tui_main

    return int(tui_main(str(ws.root)) or 0)


def main(argv: list[str] | None = None) -> int:
    return engine_main(argv, no_command=open_app, extra=COMMANDS)


__all__ = ["main", "open_app"]

if __name__ == "__main__":
    sys.exit(main())
