"""Running the app: ``ServerThread`` (its own loop in a thread, for tests and benchmarks) and
``serve`` (the ``persona serve`` command, in the foreground until Ctrl+C)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from .app import build_app
from .state import ServedState

SHUTDOWN_S = 1.0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ServerThread:
    """The server on ``host:port`` (0: a free port) in a daemon thread; ``stop()`` drops every
    connection at once, as a killed server would."""

    def __init__(self, state: ServedState, key: str, host: str = "127.0.0.1", port: int = 0):
        self.state, self.key, self.host, self.port = state, key, host, port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="persona-serve", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the server did not start within {timeout:g} s")
        if self._error is not None:
            raise self._error
        return self

    def _main(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._start())
        except BaseException as e:  # noqa: BLE001 - handed to start()
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(self._cleanup())
        loop.close()

    async def _start(self) -> None:
        self._runner = web.AppRunner(build_app(self.state, self.key), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, shutdown_timeout=SHUTDOWN_S)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]

    async def _cleanup(self) -> None:
        self.state.futures.cancel_all()
        if self._runner is not None:
            await self._runner.cleanup()

    def stop(self, timeout: float = 10.0) -> None:
        loop = self._loop
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(
    host: str,
    port: int,
    key_file: Path | None,
    root: Path,
    say: Callable[[str], Any] = print,
    threads: int = 0,
) -> int:
    """``persona serve``: announce, then serve until interrupted."""
    from engine.backends import configure_hub
    from engine.backends.local import LocalServiceClient

    from .keys import load_or_create_key, readable_by_others

    key, key_path, created = load_or_create_key(key_file)
    configure_hub("local")
    service = LocalServiceClient(checkpoint_dir=root, **({"threads": threads} if threads else {}))
    state = ServedState(service)
    url_host = f"[{host}]" if ":" in host else host
    url = f"http://{url_host}:{port}"
    say(f"Serving the local service with Tinker's API at {url}")
    say(f"  models: {', '.join(state.models_served)}; checkpoints under {state.root}")
    if created:
        say(f"A new API key was written to {key_path} (readable by you only). On the client:")
        say(f"  export TINKER_API_KEY={key}")
    else:
        say(f"API key: {key_path}. On the client:")
        say(f"  export TINKER_API_KEY=$(cat {key_path})")
    say(f"  export TINKER_BASE_URL={url}")
    if readable_by_others(key_path):
        say(f"Warning: {key_path} is readable by other users; chmod 600 it.")
    if not is_loopback(host):
        say(
            f"Warning: {host} is not a loopback address. The traffic is plain HTTP: the key and "
            "your texts travel unencrypted. Prefer the default 127.0.0.1 and an SSH tunnel from "
            f"the client: ssh -N -L {port}:127.0.0.1:{port} you@this-machine"
        )
    try:
        web.run_app(
            build_app(state, key),
            host=host,
            port=port,
            print=None,
            access_log=None,
            shutdown_timeout=SHUTDOWN_S,
        )
    finally:
        with contextlib.suppress(Exception):
            service.close()
    return 0
