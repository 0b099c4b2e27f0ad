"""The ``serve`` subcommand: its arguments and its run (engine/cli.py registers it)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

DEFAULT_PORT = 8765


def port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1-65535)")
    return port


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the local service with Tinker's API (for the app on another machine)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    p.add_argument("--port", type=port_number, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    p.add_argument(
        "--key-file",
        type=Path,
        help="file holding the API key (tml-...); default: one generated under ~/.cache/persona",
    )
    p.add_argument(
        "--root",
        type=Path,
        help="folder for the served checkpoints (default: ~/.cache/persona/served)",
    )


def run(args: argparse.Namespace, workspace: Any) -> int:
    from engine.errors import PersonaError

    from .keys import cache_root
    from .server import serve

    root = args.root or cache_root() / "served"
    try:
        return serve(args.host, args.port, args.key_file, root)
    except PersonaError as e:
        print(f"persona serve: {e}")
        return 1
    except OSError as e:  # the port is taken, the address is not this machine's
        print(f"persona serve: cannot listen on {args.host}:{args.port} ({e.strerror or e})")
        return 1
