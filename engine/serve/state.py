"""What the server holds: sessions, training models, samplers, futures, over one local service.

Each method takes a request already parsed into the SDK's own type and either answers at
once or starts the work and returns a request id for ``retrieve_future``. Bad input raises
``Refused`` (an HTTP status and a message) before any work starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tinker import types

from engine.backends.local import checkpoint_io
from engine.backends.local.losses import SUPPORTED_LOSSES
from engine.backends.local.models import REGISTERED_MODELS
from engine.errors import PersonaError

from . import codec, paths
from .futures import FutureTable, Outcome, RequestError, SeqGate

RUN_FILE = "persona_run.json"
SESSION_TTL_S = 300.0  # the SDK heartbeats every 10 s: a session silent this long is gone
UNSUPPORTED_SAMPLE_FIELDS = (
    "topk_prompt_logprobs",
    "topk_sample_logprobs",
    "target_prompt_logprobs",
    "prompt_alt_tokens_k",
)


USER_ERRORS = (
    ValueError,
    TypeError,
    NotImplementedError,
    FileNotFoundError,
    FileExistsError,
    PersonaError,
)


class Refused(Exception):
    """A request answered with ``status`` and an error body, before any work starts."""

    def __init__(self, status: int, message: str, category: str = "user") -> None:
        super().__init__(message)
        self.status = status
        self.category = category


@dataclass
class Session:
    session_id: str
    user_metadata: dict[str, str]
    display_name: str = ""
    created: float = field(default_factory=time.time)
    finished: str | None = None
    last_seen: float = field(default_factory=time.monotonic)


@dataclass
class Model:
    model_id: str  # the id the SDK uses: <session>:train:<n>
    client: Any  # LocalTrainingClient
    base_model: str
    session_id: str
    gate: SeqGate = field(default_factory=SeqGate)
    seen: dict[int, str] = field(default_factory=dict)  # seq_id -> request id

    @property
    def run_id(self) -> str:  # the folder its checkpoints go to
        return str(self.client.model_id)


@dataclass
class Sampler:
    sampler_id: str
    client: Any  # LocalSamplingClient
    base_model: str
    model_path: str | None
    session_id: str


def json_outcome(model: Any) -> Outcome:
    data = model.model_dump(mode="json", exclude_none=True)
    return Outcome(json.dumps(data).encode(), "application/json")


def _as_request_error(e: BaseException) -> RequestError:
    if isinstance(e, RequestError):
        return e
    user = isinstance(e, USER_ERRORS)
    message = str(e) if user else f"{type(e).__name__}: {e}"
    return RequestError(message or type(e).__name__, "user" if user else "server")


async def _backend(future: Any) -> Any:
    """The value of a local-service future, awaited on the server's loop."""
    return await asyncio.wrap_future(future.future())


class ServedState:
    def __init__(self, service: Any, models: tuple[str, ...] = REGISTERED_MODELS) -> None:
        self.service = service  # LocalServiceClient; its checkpoint_dir is the root
        self.root = Path(service.checkpoint_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.models_served = models
        self.futures = FutureTable()
        self.sessions: dict[str, Session] = {}
        self.models: dict[str, Model] = {}
        self.samplers: dict[str, Sampler] = {}
        self._creations: dict[str, str] = {}  # model id -> request id (a retried create)

    # -- lookups ------------------------------------------------------------------------
    def session(self, session_id: str | None) -> Session:
        s = self.sessions.get(session_id or "")
        if s is None:
            raise Refused(404, f"unknown session {session_id!r} (the server may have restarted)")
        if s.finished:
            raise Refused(410, f"session {session_id} has finished ({s.finished})")
        s.last_seen = time.monotonic()
        return s

    def model(self, model_id: str | None) -> Model:
        m = self.models.get(model_id or "")
        if m is None:
            raise Refused(404, f"unknown model {model_id!r} (the server may have restarted)")
        return m

    def sampler(self, sampler_id: str | None) -> Sampler:
        s = self.samplers.get(sampler_id or "")
        if s is None:
            raise Refused(404, f"unknown sampler {sampler_id!r} (the server may have restarted)")
        return s

    def check_base_model(self, base_model: str | None) -> str:
        if not base_model or base_model not in self.models_served:
            raise Refused(
                400,
                f"base model {base_model!r} is not served here; this server serves "
                f"{', '.join(self.models_served)}",
            )
        return base_model

    def checkpoint_folder(self, path: str | None, *, must_exist: bool = True) -> Path:
        try:
            folder = paths.folder_for(self.root, path or "")
        except paths.PathRefused as e:
            raise Refused(400, str(e)) from None
        if must_exist and not (folder / checkpoint_io.META_FILE).is_file():
            raise Refused(404, f"no checkpoint at {path} on this server")
        return folder

    def _tinker_path(self, local_uri: str) -> str:
        return paths.path_for(self.root, checkpoint_io.resolve(local_uri))

    # -- sessions -----------------------------------------------------------------------
    def create_session(self, req: types.CreateSessionRequest) -> types.CreateSessionResponse:
        self.expire_sessions()
        sid = f"session-{uuid.uuid4().hex[:16]}"
        meta = {str(k): str(v) for k, v in (req.user_metadata or {}).items()}
        self.sessions[sid] = Session(sid, meta, req.display_name or "")
        return types.CreateSessionResponse(session_id=sid)

    def finish_session(self, session_id: str, reason: str) -> None:
        s = self.sessions.get(session_id)
        if s is None:
            raise Refused(404, f"unknown session {session_id!r}")
        s.finished = s.finished or reason or "finished"
        self._release(session_id)

    def expire_sessions(self, now: float | None = None) -> None:
        """Finish the sessions whose client stopped heartbeating (killed, disconnected)."""
        now = time.monotonic() if now is None else now
        for s in list(self.sessions.values()):
            if not s.finished and now - s.last_seen > SESSION_TTL_S:
                s.finished = "expired"
                self._release(s.session_id)

    def _release(self, session_id: str) -> None:
        """Free a finished session's adapters (its checkpoints stay on disk)."""
        for sid, sampler in list(self.samplers.items()):
            if sampler.session_id == session_id:
                del self.samplers[sid]  # its adapter goes with the last reference
        for mid, m in list(self.models.items()):
            if m.session_id == session_id:
                del self.models[mid]
                client = m.client
                with contextlib.suppress(Exception):  # a closed service has nothing to free
                    self.service.run_on_compute_thread(
                        lambda c=client: c._rt.host.remove(c.model_id)
                    )

    # -- work ---------------------------------------------------------------------------
    def _start(self, work: Callable[[], Any], model_id: str | None = None, **kw: Any) -> str:
        async def run() -> Outcome:
            try:
                return await work()
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # noqa: BLE001 - every failure becomes the poll's error
                raise _as_request_error(e) from e

        return self.futures.start(run(), model_id, **kw)

    def _in_order(
        self, m: Model, seq_id: int | None, submit: Callable[[], Any], convert: Callable
    ) -> str:
        """Start a training call of ``m``: handed to the backend when its seq_id's turn comes."""
        if seq_id is not None and seq_id in m.seen:
            return m.seen[seq_id]  # the SDK retried a request whose answer was lost

        async def work() -> Outcome:
            if seq_id is not None:
                await m.gate.turn(seq_id)
            try:
                future = submit()
            finally:
                if seq_id is not None:
                    await m.gate.passed(seq_id)
            return convert(await _backend(future))

        rid = self._start(work, m.model_id)
        if seq_id is not None:
            m.seen[seq_id] = rid
        return rid

    def _refuse_in_order(self, m: Model, seq_id: int | None, status: int, message: str) -> None:
        """A refused training call still uses up its seq_id, so later ones are not held."""
        if seq_id is not None and seq_id not in m.seen:
            asyncio.ensure_future(m.gate.passed(seq_id))
        raise Refused(status, message)

    def _register(
        self, model_id: str, session_id: str, client: Any, user_metadata: dict[str, Any] | None
    ) -> None:
        m = Model(model_id, client, client.base_model, session_id)
        self.models[model_id] = m
        run = paths.run_folder(self.root, m.run_id)
        run.mkdir(parents=True, exist_ok=True)
        record = {
            "training_run_id": m.run_id,
            "model_id": model_id,
            "base_model": m.base_model,
            "lora_rank": client._spec.rank,
            "user_metadata": dict(user_metadata or {}),
            "created": time.time(),
        }
        (run / RUN_FILE).write_text(json.dumps(record, indent=2))

    def create_model(self, req: types.CreateModelRequest) -> str:
        self.session(req.session_id)
        base = self.check_base_model(req.base_model)
        model_id = f"{req.session_id}:train:{req.model_seq_id}"
        if model_id in self._creations:
            return self._creations[model_id]
        lora = req.lora_config or types.LoraConfig(rank=32)

        async def work() -> Outcome:
            client = await _backend(
                self.service.create_lora_training_client(
                    base,
                    rank=lora.rank,
                    seed=lora.seed,
                    train_mlp=lora.train_mlp,
                    train_attn=lora.train_attn,
                    train_unembed=lora.train_unembed,
                )
            )
            self._register(model_id, req.session_id, client, req.user_metadata)
            return json_outcome(types.CreateModelResponse(model_id=model_id))

        rid = self._creations[model_id] = self._start(work, model_id)
        return rid

    def get_info(self, req: types.GetInfoRequest) -> types.GetInfoResponse:
        m = self.model(req.model_id)
        info = m.client.get_info()
        return info.model_copy(update={"model_id": m.model_id})

    def forward_backward(self, call: codec.ForwardBackwardCall) -> str:
        m = self.model(call.model_id)
        if call.loss_fn not in SUPPORTED_LOSSES:
            self._refuse_in_order(
                m,
                call.seq_id,
                400,
                f"loss_fn {call.loss_fn!r} is not served here; use one of "
                f"{', '.join(SUPPORTED_LOSSES)} (custom losses run on the client)",
            )
        if not call.data:
            self._refuse_in_order(m, call.seq_id, 400, "forward_backward: no data")
        method = m.client.forward if call.forward_only else m.client.forward_backward

        def convert(out: types.ForwardBackwardOutput) -> Outcome:
            return Outcome(codec.encode_forward_backward(out), codec.PROTO_CONTENT_TYPE)

        return self._in_order(
            m,
            call.seq_id,
            lambda: method(call.data, call.loss_fn, call.loss_fn_config),
            convert,
        )

    def optim_step(self, req: types.OptimStepRequest) -> str:
        m = self.model(req.model_id)
        if not isinstance(req.optim_params, types.AdamParams):
            self._refuse_in_order(m, req.seq_id, 400, "only AdamParams are served here")
        return self._in_order(
            m, req.seq_id, lambda: m.client.optim_step(req.optim_params), json_outcome
        )

    def save_weights(self, req: types.SaveWeightsRequest) -> str:
        m = self.model(req.model_id)
        if not req.path:
            self._refuse_in_order(m, req.seq_id, 400, "save_weights needs a checkpoint name")

        def convert(resp: types.SaveWeightsResponse) -> Outcome:
            return json_outcome(types.SaveWeightsResponse(path=self._tinker_path(resp.path)))

        return self._in_order(
            m,
            req.seq_id,
            lambda: m.client.save_state(req.path, overwrite=bool(req.overwrite)),
            convert,
        )

    def save_weights_for_sampler(self, req: types.SaveWeightsForSamplerRequest) -> str:
        m = self.model(req.model_id)
        if req.path:

            def named(resp: Any) -> Outcome:
                path = self._tinker_path(resp.path)
                return json_outcome(types.SaveWeightsForSamplerResponseInternal(path=path))

            return self._in_order(
                m, req.seq_id, lambda: m.client.save_weights_for_sampler(req.path), named
            )

        def snapshot(client: Any) -> Outcome:
            sid = f"sampler-{uuid.uuid4().hex[:16]}"
            self.samplers[sid] = Sampler(sid, client, m.base_model, None, m.session_id)
            return json_outcome(
                types.SaveWeightsForSamplerResponseInternal(sampling_session_id=sid)
            )

        return self._in_order(
            m, req.seq_id, m.client.save_weights_and_get_sampling_client, snapshot
        )

    def load_weights(self, req: types.LoadWeightsRequest) -> str:
        folder = self.checkpoint_folder(req.path)
        local = checkpoint_io.SCHEME + str(folder)
        if req.model_id:  # into an existing model, in its order
            m = self.model(req.model_id)
            load = m.client.load_state_with_optimizer if req.optimizer else m.client.load_state

            def loaded(_: Any) -> Outcome:
                resp = types.LoadWeightsResponse(path=req.path, model_id=m.model_id)
                return json_outcome(resp)

            return self._in_order(m, req.seq_id, lambda: load(local), loaded)
        self.session(req.session_id)
        model_id = f"{req.session_id}:train:{req.model_seq_id}"
        if model_id in self._creations:
            return self._creations[model_id]
        make = (
            self.service.create_training_client_from_state_with_optimizer
            if req.optimizer
            else self.service.create_training_client_from_state
        )

        async def work() -> Outcome:
            client = await _backend(make(local))
            self._register(model_id, str(req.session_id), client, req.user_metadata)
            return json_outcome(types.LoadWeightsResponse(path=req.path, model_id=model_id))

        rid = self._creations[model_id] = self._start(work, model_id)
        return rid

    # -- sampling -----------------------------------------------------------------------
    async def create_sampling_session(self, req: types.CreateSamplingSessionRequest) -> str:
        self.session(req.session_id)
        if req.model_path:
            folder = self.checkpoint_folder(req.model_path)
            make = self.service.create_sampling_client(
                model_path=checkpoint_io.SCHEME + str(folder)
            )
        else:
            make = self.service.create_sampling_client(
                base_model=self.check_base_model(req.base_model)
            )
        try:
            client = await _backend(make)
        except Exception as e:  # noqa: BLE001 - answered as an error body
            err = _as_request_error(e)
            raise Refused(400 if err.category == "user" else 500, str(err), err.category) from e
        sid = f"sampler-{uuid.uuid4().hex[:16]}"
        self.samplers[sid] = Sampler(sid, client, client.base_model, req.model_path, req.session_id)
        return sid

    def get_sampler(self, sampler_id: str) -> types.GetSamplerResponse:
        s = self.sampler(sampler_id)
        return types.GetSamplerResponse(
            sampler_id=s.sampler_id, base_model=s.base_model, model_path=s.model_path
        )

    def sample(self, req: types.SampleRequest) -> tuple[str, list[str]]:
        s = self.sampler(req.sampling_session_id)
        used = [f for f in UNSUPPORTED_SAMPLE_FIELDS if getattr(req, f, None)]
        if used:
            raise Refused(400, f"not served here: {', '.join(used)}")
        n = int(req.num_samples)
        try:
            future = s.client.sample(
                req.prompt,
                n,
                req.sampling_params,
                include_prompt_logprobs=bool(req.prompt_logprobs),
            )
        except (ValueError, NotImplementedError) as e:
            raise Refused(400, str(e)) from None
        last_n = req.prompt_logprobs_last_n

        async def work() -> Outcome:
            resp = await _backend(future)
            return Outcome(codec.encode_sample(resp, last_n), codec.PROTO_CONTENT_TYPE)

        ids = [uuid.uuid4().hex for _ in range(n)]
        return self._start(work, sample_sequence_ids=ids), ids

    # -- training runs (the REST client) ------------------------------------------------
    def _run_folder(self, run_id: str) -> Path:
        if run_id in self.models:
            run_id = self.models[run_id].run_id
        try:
            folder = paths.run_folder(self.root, run_id)
        except paths.PathRefused as e:
            raise Refused(400, str(e)) from None
        if not (folder / RUN_FILE).is_file():
            raise Refused(404, f"no training run {run_id!r} on this server")
        return folder

    def _checkpoints(self, folder: Path) -> list[types.Checkpoint]:
        found = []
        for kind, ctype in (("weights", "training"), ("sampler_weights", "sampler")):
            for ck in sorted((folder / kind).glob(f"*/{checkpoint_io.META_FILE}")):
                d = ck.parent
                if d.name.startswith(".") or d.is_symlink():
                    continue
                found.append(
                    types.Checkpoint(
                        checkpoint_id=f"{kind}/{d.name}",
                        checkpoint_type=ctype,  # type: ignore[arg-type]
                        time=datetime.fromtimestamp(ck.stat().st_mtime, UTC),
                        tinker_path=paths.path_for(self.root, d),
                        size_bytes=sum(f.stat().st_size for f in d.iterdir() if f.is_file()),
                    )
                )
        return sorted(found, key=lambda c: c.time)

    def training_run(self, run_id: str) -> types.TrainingRun:
        folder = self._run_folder(run_id)
        record = json.loads((folder / RUN_FILE).read_text())
        cks = self._checkpoints(folder)
        training = [c for c in cks if c.checkpoint_type == "training"]
        sampler = [c for c in cks if c.checkpoint_type == "sampler"]
        return types.TrainingRun(
            training_run_id=folder.name,
            base_model=record["base_model"],
            model_owner="local",
            is_lora=True,
            lora_rank=record.get("lora_rank"),
            last_request_time=datetime.fromtimestamp((folder / RUN_FILE).stat().st_mtime, UTC),
            last_checkpoint=training[-1] if training else None,
            last_sampler_checkpoint=sampler[-1] if sampler else None,
            user_metadata=record.get("user_metadata") or None,
        )

    def training_runs(self) -> types.TrainingRunsResponse:
        runs = []
        for f in sorted(self.root.glob(f"*/{RUN_FILE}")):
            if not f.parent.is_symlink():
                runs.append(self.training_run(f.parent.name))
        cursor = types.Cursor(offset=0, limit=len(runs), total_count=len(runs))
        return types.TrainingRunsResponse(training_runs=runs, cursor=cursor)

    def list_checkpoints(self, run_id: str) -> types.CheckpointsListResponse:
        return types.CheckpointsListResponse(
            checkpoints=self._checkpoints(self._run_folder(run_id))
        )

    def delete_checkpoint(self, run_id: str, checkpoint_id: str) -> None:
        folder = self._run_folder(run_id)
        target = self.checkpoint_folder(f"{paths.SCHEME}{folder.name}/{checkpoint_id}")
        shutil.rmtree(target)
