"""The real Tinker service as a run uses it: bounded connection, clear errors, retries, metadata.

``TinkerService`` wraps a ``tinker.ServiceClient`` and keeps its interface (the stages call
``create_lora_training_client``, ``create_training_client_from_state_with_optimizer``,
``create_sampling_client`` and await the result), adding what a person running Persona
needs from it:

- the first contact goes to a thread and must answer within ``connect_timeout`` seconds
  (retries included); otherwise ``TinkerUnreachable`` says the service could not be reached;
- nothing that can touch the network runs on the event loop: client creation and tokenizer
  loading run in daemon threads (the tokenizer is loaded once, when the client is created);
- authentication and billing errors become a ``BackendConfigError`` saying what to do;
  rate limits, server errors and dropped connections are retried with backoff;
- a missing checkpoint (``tinker.NotFoundError``) becomes ``CheckpointNotFound``, a
  ``FileNotFoundError``, so a stage starts over as it does for a missing local folder;
- periodic checkpoints carry a time-to-live (the cookbook's 7 days); ``final`` is kept;
- the session and each training run carry a display name and metadata (stage, workspace,
  renderer); a resume whose checkpoint was trained with another renderer is refused;
- with a ``probe`` (``make_service_client`` gives one), a call still waiting while the
  service stops answering fails with ``TinkerUnreachable`` once ``connect_timeout`` seconds
  pass without an answer (the SDK itself would retry for ever);
- the tokenizer of a model the local service serves (``persona serve``: a registered name
  or a model folder) is read from its local folder, never fetched from the hub.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from engine.errors import PersonaError

T = TypeVar("T")

PERIODIC_TTL_SECONDS = 7 * 24 * 3600  # tinker_cookbook.checkpoint_utils' default
KEPT_NAMES = ("final",)  # checkpoints saved without a time-to-live
RETRY_ATTEMPTS = 4
RETRY_BASE_DELAY = 0.5


class TinkerUnreachable(PersonaError):
    """No answer from the Tinker service within the connect timeout."""


class TinkerAccountError(PersonaError):
    """The service refused the key, the billing or the permission; the message says what to do."""


class CheckpointNotFound(FileNotFoundError):
    """A checkpoint the service no longer has (deleted, expired) or that cannot be resumed."""


def _tinker_errors() -> Any:
    import tinker

    return tinker


def classify(exc: BaseException) -> str:
    """'not_found' | 'auth' | 'billing' | 'transient' | 'other' for an SDK exception."""
    t = _tinker_errors()
    if isinstance(exc, t.NotFoundError):
        return "not_found"
    if isinstance(exc, t.AuthenticationError | t.PermissionDeniedError):
        return "auth"
    if isinstance(exc, t.BillingError):
        return "billing"
    if isinstance(exc, t.TinkerError) and "api_key" in str(exc):  # the SDK's key-form check
        return "auth"
    transient = (
        t.APIConnectionError,
        t.RateLimitError,
        t.InternalServerError,
        t.ConflictError,
        ConnectionError,
        TimeoutError,
    )
    if isinstance(exc, transient):
        return "transient"
    return "other"


def translate(exc: BaseException, what: str) -> BaseException:
    """The exception a person can act on for an SDK error (``exc`` itself when there is none)."""
    kind = classify(exc)
    if kind == "not_found":
        return CheckpointNotFound(f"{what}: the Tinker service has no such checkpoint ({exc})")
    if kind == "auth":
        return TinkerAccountError(
            f"Tinker refused the API key while trying to {what} ({exc}). Check TINKER_API_KEY in "
            "the workspace's .env file (a key from https://tinker-console.thinkingmachines.ai, "
            "or the one `persona serve` printed for your own server), or run with --backend "
            "local."
        )
    if kind == "billing":
        return TinkerAccountError(
            f"Tinker refused to {what}: the account's billing or quota is not set up or is used "
            f"up ({exc}). Check it in the Tinker console, or run with --backend local."
        )
    return exc


async def in_daemon_thread(fn: Callable[[], T], timeout: float | None = None) -> T:
    """``fn()`` in a daemon thread (one that cannot hold the process open at exit), awaited
    from the loop; ``TimeoutError`` after ``timeout`` seconds (the thread is left behind)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if fut.done():
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    def target() -> None:
        try:
            result = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting task
            ok, value = False, e
        else:
            ok, value = True, result
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(settle, ok, value)

    threading.Thread(target=target, name="persona-tinker", daemon=True).start()
    if timeout is None:
        return await fut
    return await asyncio.wait_for(fut, timeout)


async def with_retries(
    fn: Callable[[], T],
    *,
    what: str,
    attempts: int = RETRY_ATTEMPTS,
    base_delay: float = RETRY_BASE_DELAY,
    deadline: float | None = None,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
) -> T:
    """Run ``fn`` in a thread; retry transient errors with exponential backoff; translate the
    rest. With ``deadline`` (a ``time.monotonic()`` value) every attempt and wait fits before it."""
    attempt = 0
    while True:
        attempt += 1
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise TimeoutError(what)
        try:
            return await in_daemon_thread(fn, left)
        except TimeoutError:
            raise
        except Exception as e:
            err = translate(e, what)
            if err is not e:
                raise err from None
            if classify(e) != "transient" or (deadline is None and attempt >= attempts):
                raise
            delay = base_delay * 2 ** (attempt - 1)
            if deadline is not None and time.monotonic() + delay >= deadline:
                raise TimeoutError(what) from e
            await sleep(delay)


def local_tokenizer(base_model: str) -> Any | None:
    """The tokenizer of a model that the local service serves, from its local folder (the
    tiny test model is built here if needed); None for other models (the SDK's hub path)."""
    folder = _local_model_folder(base_model)
    return None if folder is None else _tokenizer_from(str(folder))


@functools.lru_cache(maxsize=8)
def _tokenizer_from(folder: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _local_model_folder(base_model: str) -> Any:
    from engine.backends.local.models import (
        REGISTERED_MODELS,
        ensure_model_dir,
        model_dir_if_present,
    )

    if base_model in REGISTERED_MODELS:
        return ensure_model_dir(base_model)
    return model_dir_if_present(base_model)


def http_probe(base_url: str, api_key: str, timeout: float) -> Callable[[], bool]:
    """True when the service at ``base_url`` answers at all (any HTTP status)."""

    def probe() -> bool:
        import httpx

        try:
            httpx.get(
                base_url.rstrip("/") + "/api/v1/healthz",
                headers={"X-API-Key": api_key},
                timeout=timeout,
            )
        except httpx.HTTPError:
            return False
        return True

    return probe


class Watched:
    """An SDK future whose wait fails with ``TinkerUnreachable`` when the service stops
    answering for ``connect_timeout`` seconds; everything else is the future's own."""

    def __init__(self, inner: Any, service: TinkerService) -> None:
        self._inner = inner
        self._service = service

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _concurrent(self) -> Any:
        get = getattr(self._inner, "future", None)
        return get() if callable(get) else None

    def __await__(self) -> Any:
        return self._wait().__await__()

    async def _wait(self) -> Any:
        cf = self._concurrent()
        if cf is None:
            return await self._inner
        pending = asyncio.wrap_future(cf)
        svc = self._service
        down_since: float | None = None
        while True:
            try:
                done, _ = await asyncio.wait({pending}, timeout=svc.probe_interval)
            except asyncio.CancelledError:
                cf.cancel()  # the stage was cancelled: so is its request
                raise
            if done:
                return pending.result()
            down_since = await in_daemon_thread(functools.partial(svc.still_there, down_since))
            if down_since is not None and time.monotonic() - down_since >= svc.connect_timeout:
                cf.cancel()
                raise svc.lost()

    def result(self, timeout: float | None = None) -> Any:
        import concurrent.futures

        cf = self._concurrent()
        if cf is None or timeout is not None:
            return self._inner.result(timeout)
        svc = self._service
        down_since: float | None = None
        while True:
            try:
                return cf.result(timeout=svc.probe_interval)
            except concurrent.futures.TimeoutError:
                down_since = svc.still_there(down_since)
                if down_since is not None and time.monotonic() - down_since >= svc.connect_timeout:
                    cf.cancel()
                    raise svc.lost() from None


WATCHED_CALLS = frozenset(
    {
        "forward",
        "forward_backward",
        "forward_backward_custom",
        "optim_step",
        "save_state",
        "load_state",
        "load_state_with_optimizer",
        "save_weights_for_sampler",
        "sample",
        "compute_logprobs",
    }
)


def _result(x: Any) -> Any:
    """The value of an SDK future (``.result()``), or ``x`` when it is a value already."""
    result = getattr(x, "result", None)
    return result() if callable(result) else x


def _base_model_of(client: Any) -> str:
    """The base model an SDK client reports (without asking the service), or ""."""
    with contextlib.suppress(Exception):
        if callable(getattr(client, "get_base_model", None)):
            return str(client.get_base_model() or "")
        info = client.get_info() if callable(getattr(client, "get_info", None)) else None
        return str(getattr(getattr(info, "model_data", None), "model_name", "") or "")
    return ""


class _Wrapped:
    """An SDK client with its tokenizer loaded once (in a thread), its long calls watched
    (``WATCHED_CALLS``, when the service has a probe) and everything else as is."""

    def __init__(self, client: Any, tokenizer: Any, service: TinkerService | None = None) -> None:
        self._client = client
        self._tokenizer = tokenizer
        self._service = service

    def get_tokenizer(self) -> Any:
        return self._tokenizer

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        svc = self._service
        if name not in WATCHED_CALLS or svc is None or svc.probe is None:
            return attr

        def watched(*args: Any, **kwargs: Any) -> Any:
            return Watched(attr(*args, **kwargs), svc)

        return watched


class TrainingClient(_Wrapped):
    def __init__(
        self,
        client: Any,
        tokenizer: Any,
        metadata: Mapping[str, str],
        service: TinkerService | None = None,
    ) -> None:
        super().__init__(client, tokenizer, service)
        self._metadata = dict(metadata)

    def _save_kwargs(self, name: str, ttl_seconds: Any, user_metadata: Any) -> dict[str, Any]:
        ttl = (
            ttl_seconds
            if ttl_seconds != "default"
            else (None if name in KEPT_NAMES else PERIODIC_TTL_SECONDS)
        )
        return {"ttl_seconds": ttl, "user_metadata": {**self._metadata, **(user_metadata or {})}}

    def save_state(
        self, name: str, ttl_seconds: Any = "default", user_metadata: Any = None, **kw: Any
    ) -> Any:
        return self.__getattr__("save_state")(
            name, **self._save_kwargs(name, ttl_seconds, user_metadata), **kw
        )

    def save_weights_for_sampler(
        self, name: str, ttl_seconds: Any = "default", user_metadata: Any = None, **kw: Any
    ) -> Any:
        return self.__getattr__("save_weights_for_sampler")(
            name, **self._save_kwargs(name, ttl_seconds, user_metadata), **kw
        )


class SamplingClient(_Wrapped):
    pass


class TinkerService:
    """A ``tinker.ServiceClient`` with the guarantees listed in the module docstring."""

    def __init__(
        self,
        client: Any,
        *,
        connect_timeout: float = 30.0,
        metadata: Mapping[str, str] | None = None,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        probe: Callable[[], bool] | None = None,
    ) -> None:
        self._client = client
        self.connect_timeout = float(connect_timeout)
        self.probe = probe
        self.probe_interval = min(5.0, max(0.2, self.connect_timeout / 4))
        self.metadata = {k: str(v) for k, v in (metadata or {}).items()}
        self._sleep = sleep
        self._connected = False
        self.closed_with: str | None = None

    # -- connection ------------------------------------------------------------
    async def connect(self) -> None:
        """One request that must answer within ``connect_timeout`` (retries included)."""
        if self._connected:
            return
        deadline = time.monotonic() + self.connect_timeout
        try:
            await with_retries(
                self._capabilities,
                what="reach the Tinker service",
                deadline=deadline,
                sleep=self._sleep,
            )
        except (TimeoutError, ConnectionError) as e:
            raise TinkerUnreachable(
                f"could not reach the Tinker service within {self.connect_timeout:g} s "
                f"(retries included{': ' + str(e) if str(e) else ''}). Check the network "
                "connection (and any proxy), raise backend.connect_timeout, or run with "
                "--backend local."
            ) from None
        except PersonaError:
            raise
        except Exception as e:
            if classify(e) == "transient":
                raise TinkerUnreachable(
                    f"could not reach the Tinker service ({type(e).__name__}: {e}). Check the "
                    "network connection, or run with --backend local."
                ) from None
            raise
        self._connected = True

    def _capabilities(self) -> Any:
        import warnings

        with warnings.catch_warnings():  # deprecated on ServiceClient, the same request
            warnings.simplefilter("ignore", FutureWarning)
            return _result(self._client.get_server_capabilities())

    def still_there(self, down_since: float | None) -> float | None:
        """One probe: None when the service answered, else since when it has not."""
        if self.probe is None or self.probe():
            return None
        return time.monotonic() if down_since is None else down_since

    def lost(self) -> TinkerUnreachable:
        return TinkerUnreachable(
            f"lost the Tinker service: no answer for {self.connect_timeout:g} s while a "
            "request was in flight. Check the connection (or that the server still runs); a "
            "rerun resumes from the last checkpoint."
        )

    async def _tokenizer(self, client: Any, base_model: str) -> Any:
        """The served local model's own tokenizer when there is one, else the SDK's."""
        local = await in_daemon_thread(lambda: local_tokenizer(base_model)) if base_model else None
        if local is not None:
            return local
        return await self._call(client.get_tokenizer, "load the tokenizer")

    async def _call(self, fn: Callable[[], T], what: str) -> T:
        await self.connect()
        return await with_retries(fn, what=what, sleep=self._sleep)

    # -- clients -----------------------------------------------------------------
    def _run_metadata(self, base_model: str) -> dict[str, str]:
        from engine.backends.renderers import renderer_name_for

        return {
            **self.metadata,
            "base_model": base_model,
            "renderer": renderer_name_for(base_model),
        }

    async def _training(
        self, make: Callable[[], Any], base_model: str, what: str
    ) -> TrainingClient:
        tc = await self._call(lambda: _result(make()), what)
        tokenizer = await self._tokenizer(tc, base_model or _base_model_of(tc))
        return TrainingClient(tc, tokenizer, self._run_metadata(base_model), self)

    def create_lora_training_client(
        self, base_model: str, rank: int = 32, seed: int | None = None, **kw: Any
    ) -> Awaitable[TrainingClient]:
        meta = {**self._run_metadata(base_model), **(kw.pop("user_metadata", None) or {})}
        return self._training(
            lambda: self._client.create_lora_training_client(
                base_model=base_model, rank=rank, seed=seed, user_metadata=meta, **kw
            ),
            base_model,
            f"create a LoRA training run on {base_model}",
        )

    async def _check_resume(self, path: str) -> str:
        """The base model of the run that saved ``path``; refuses another renderer."""
        from engine.backends.renderers import renderer_name_for

        rest = self._client.create_rest_client()
        run = await self._call(
            lambda: _result(rest.get_training_run_by_tinker_path(path)), f"resume from {path}"
        )
        base_model = str(getattr(run, "base_model", "") or "")
        saved = (getattr(run, "user_metadata", None) or {}).get("renderer")
        if base_model and saved and saved != renderer_name_for(base_model):
            raise CheckpointNotFound(
                f"{path} was trained with the {saved!r} renderer; this version renders "
                f"{base_model} with {renderer_name_for(base_model)!r}"
            )
        return base_model

    def create_training_client_from_state_with_optimizer(
        self, path: str, **kw: Any
    ) -> Awaitable[TrainingClient]:
        return self._from_state(path, True, kw)

    def create_training_client_from_state(self, path: str, **kw: Any) -> Awaitable[TrainingClient]:
        return self._from_state(path, False, kw)

    async def _from_state(self, path: str, optimizer: bool, kw: dict[str, Any]) -> TrainingClient:
        base_model = await self._check_resume(path)
        make = (
            self._client.create_training_client_from_state_with_optimizer
            if optimizer
            else self._client.create_training_client_from_state
        )
        meta = self._run_metadata(base_model) if base_model else dict(self.metadata)
        return await self._training(
            lambda: make(path, user_metadata=meta, **kw), base_model, f"resume from {path}"
        )

    def create_sampling_client(
        self, model_path: str | None = None, base_model: str | None = None, **kw: Any
    ) -> Awaitable[SamplingClient]:
        async def make() -> SamplingClient:
            sc = await self._call(
                lambda: _result(
                    self._client.create_sampling_client(
                        model_path=model_path, base_model=base_model, **kw
                    )
                ),
                f"open a sampler for {model_path or base_model}",
            )
            tokenizer = await self._tokenizer(sc, base_model or _base_model_of(sc))
            return SamplingClient(sc, tokenizer, self)

        return make()

    # -- end ---------------------------------------------------------------------
    def close(self, status: str = "success", detail: str | None = None) -> None:
        """Finish the session with the run's real outcome; never waits past connect_timeout."""
        self.closed_with = status
        done = threading.Event()

        def target() -> None:
            try:
                _result(self._client.close(status, detail))
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
            finally:
                done.set()

        threading.Thread(target=target, name="persona-tinker-close", daemon=True).start()
        if self._connected:  # a session to finish: give it a bounded wait
            done.wait(self.connect_timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)
