"""Tinker's HTTP interface (``/api/v1/...``) on ``aiohttp.web``, over a ``ServedState``.

Every request needs the server's ``X-API-Key``. Every error is answered with a JSON body in
the SDK's shape (``{"error": ..., "category": ...}``): a 4xx for bad input (malformed JSON
or protobuf, an unknown model or session, an oversize body, a call the backend cannot
serve), a 5xx only for the server's own faults. The key never appears in a log or a body.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pydantic
from aiohttp import web
from tinker import types

from . import codec
from .futures import RequestError
from .keys import key_matches
from .state import Refused, ServedState

log = logging.getLogger("persona.serve")

MAX_BODY_BYTES = 64 * 1024 * 1024
INLINE_LIMIT = 32 * 1024 * 1024  # larger results answer a metadata-only poll first
KEY_HEADER = "X-API-Key"
STATE: web.AppKey[ServedState] = web.AppKey("state", ServedState)
M = TypeVar("M", bound=pydantic.BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(status: int, message: str, category: str = "user") -> web.Response:
    return web.json_response({"error": message, "category": category}, status=status)


def _validation_message(e: pydantic.ValidationError, what: str) -> str:
    parts = []
    for err in e.errors()[:3]:
        loc = ".".join(str(x) for x in err.get("loc", ())) or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    more = f" (and {e.error_count() - 3} more)" if e.error_count() > 3 else ""
    return f"{what}: " + "; ".join(parts) + more


async def parse(request: web.Request, model: type[M]) -> M:
    what = request.path.rsplit("/", 1)[-1]
    body = await request.read()
    try:
        data = json.loads(body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Refused(400, f"{what}: the body is not JSON ({e})") from None
    if not isinstance(data, dict):
        raise Refused(400, f"{what}: the body must be a JSON object")
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as e:
        raise Refused(400, _validation_message(e, what)) from None


def dump(model: Any) -> web.Response:
    return web.json_response(model.model_dump(mode="json", exclude_none=True))


def future_response(request_id: str, model_id: str | None = None, **extra: Any) -> web.Response:
    return dump(types.UntypedAPIFuture(request_id=request_id, model_id=model_id, **extra))


def make_middlewares(key: str) -> list[Any]:
    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except Refused as e:
            log.info("%s %s -> %d: %s", request.method, request.path, e.status, e)
            return error_response(e.status, str(e), e.category)
        except web.HTTPRequestEntityTooLarge:
            return error_response(
                413,
                f"the request body is larger than this server's limit of {MAX_BODY_BYTES} bytes",
            )
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return error_response(e.status, e.reason or "error")
        except codec.WireError as e:
            return error_response(400, str(e))
        except Exception as e:  # noqa: BLE001 - the server keeps serving
            log.exception("%s %s failed", request.method, request.path)
            return error_response(500, f"internal error ({type(e).__name__})", "server")

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not key_matches(request.headers.get(KEY_HEADER), key):
            log.info("%s %s -> 401 (missing or wrong key)", request.method, request.path)
            return error_response(
                401, f"missing or wrong {KEY_HEADER}: this server refused the key"
            )
        return await handler(request)

    return [errors, auth]


# -- handlers ----------------------------------------------------------------------------


async def client_config(request: web.Request) -> web.Response:
    # API keys only (no JWT exchange); plain httpx transport over http; bodies uncompressed.
    config = types.ClientConfigResponse(
        pjwt_auth_enabled=False, use_pyqwest_transport=False, proto_compress_fwdbwd=False
    )
    return dump(config)


async def dynamic_config(request: web.Request) -> web.Response:
    return dump(types.ClientDynamicConfigResponse())


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def capabilities(request: web.Request) -> web.Response:
    models = [types.SupportedModel(model_name=m) for m in request.app[STATE].models_served]
    return dump(types.GetServerCapabilitiesResponse(supported_models=models))


async def telemetry(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"status": "accepted"})


async def create_session(request: web.Request) -> web.Response:
    req = await parse(request, types.CreateSessionRequest)
    return dump(request.app[STATE].create_session(req))


async def heartbeat(request: web.Request) -> web.Response:
    req = await parse(request, types.SessionHeartbeatRequest)
    state = request.app[STATE]
    state.expire_sessions()
    state.session(req.session_id)
    return web.json_response({"type": "session_heartbeat"})


async def finish_session(request: web.Request) -> web.Response:
    body = await request.read()
    try:
        reason = (json.loads(body or b"{}").get("reason") or {}).get("type", "")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        raise Refused(400, "finish: the body is not the JSON the SDK sends") from None
    request.app[STATE].finish_session(request.match_info["session_id"], str(reason))
    return web.json_response({})


async def create_model(request: web.Request) -> web.Response:
    req = await parse(request, types.CreateModelRequest)
    state = request.app[STATE]
    return future_response(state.create_model(req))


async def get_info(request: web.Request) -> web.Response:
    req = await parse(request, types.GetInfoRequest)
    return dump(request.app[STATE].get_info(req))


async def forward_backward(request: web.Request) -> web.Response:
    if codec.PROTO_CONTENT_TYPE not in request.headers.get("Content-Type", ""):
        raise Refused(400, f"forward_backward takes a protobuf body ({codec.PROTO_CONTENT_TYPE})")
    call = codec.decode_forward_backward(await request.read())
    return future_response(request.app[STATE].forward_backward(call), call.model_id)


async def optim_step(request: web.Request) -> web.Response:
    req = await parse(request, types.OptimStepRequest)
    return future_response(request.app[STATE].optim_step(req), req.model_id)


async def save_weights(request: web.Request) -> web.Response:
    req = await parse(request, types.SaveWeightsRequest)
    return future_response(request.app[STATE].save_weights(req), req.model_id)


async def save_weights_for_sampler(request: web.Request) -> web.Response:
    req = await parse(request, types.SaveWeightsForSamplerRequest)
    return future_response(request.app[STATE].save_weights_for_sampler(req), req.model_id)


async def load_weights(request: web.Request) -> web.Response:
    req = await parse(request, types.LoadWeightsRequest)
    return future_response(request.app[STATE].load_weights(req), req.model_id)


async def create_sampling_session(request: web.Request) -> web.Response:
    req = await parse(request, types.CreateSamplingSessionRequest)
    sid = await request.app[STATE].create_sampling_session(req)
    return dump(types.CreateSamplingSessionResponse(sampling_session_id=sid))


async def get_sampler(request: web.Request) -> web.Response:
    return dump(request.app[STATE].get_sampler(request.match_info["sampler_id"]))


async def asample(request: web.Request) -> web.Response:
    req = await parse(request, types.SampleRequest)
    rid, ids = request.app[STATE].sample(req)
    return future_response(rid, sample_sequence_ids=ids)


async def retrieve_future(request: web.Request) -> web.Response:
    req = await parse(request, types.FutureRetrieveRequest)
    state = request.app[STATE]
    if state.futures.get(req.request_id) is None:
        raise Refused(404, f"unknown request {req.request_id!r} (the server may have restarted)")
    try:
        outcome = await state.futures.wait(req.request_id)
    except RequestError as e:
        return web.json_response({"error": str(e), "category": e.category})
    if outcome is None:  # held for LONG_POLL_S: the SDK asks again at once
        return web.json_response(
            {"type": "try_again", "request_id": req.request_id, "queue_state": "active"}
        )
    if req.allow_metadata_only and len(outcome.body) > INLINE_LIMIT:
        return web.json_response(
            {"status": "complete_metadata", "response_payload_size": len(outcome.body)}
        )
    return web.Response(body=outcome.body, content_type=outcome.content_type)


async def cancel_future(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({})


async def training_runs(request: web.Request) -> web.Response:
    return dump(request.app[STATE].training_runs())


async def training_run(request: web.Request) -> web.Response:
    return dump(request.app[STATE].training_run(request.match_info["run_id"]))


async def checkpoints(request: web.Request) -> web.Response:
    return dump(request.app[STATE].list_checkpoints(request.match_info["run_id"]))


async def delete_checkpoint(request: web.Request) -> web.Response:
    m = request.match_info
    request.app[STATE].delete_checkpoint(m["run_id"], m["checkpoint_id"])
    return web.json_response({})


def build_app(state: ServedState, key: str) -> web.Application:
    app = web.Application(middlewares=make_middlewares(key), client_max_size=MAX_BODY_BYTES)
    app[STATE] = state
    v1 = "/api/v1"
    app.router.add_routes(
        [
            web.post(f"{v1}/client/config", client_config),
            web.post(f"{v1}/client/dynamic_config", dynamic_config),
            web.get(f"{v1}/healthz", healthz),
            web.get(f"{v1}/get_server_capabilities", capabilities),
            web.post(f"{v1}/telemetry", telemetry),
            web.post(f"{v1}/create_session", create_session),
            web.post(f"{v1}/session_heartbeat", heartbeat),
            web.post(f"{v1}/sessions/{{session_id}}/finish", finish_session),
            web.post(f"{v1}/create_model", create_model),
            web.post(f"{v1}/get_info", get_info),
            web.post(f"{v1}/forward_backward", forward_backward),
            web.post(f"{v1}/optim_step", optim_step),
            web.post(f"{v1}/save_weights", save_weights),
            web.post(f"{v1}/save_weights_for_sampler", save_weights_for_sampler),
            web.post(f"{v1}/load_weights", load_weights),
            web.post(f"{v1}/create_sampling_session", create_sampling_session),
            web.get(f"{v1}/samplers/{{sampler_id}}", get_sampler),
            web.post(f"{v1}/asample", asample),
            web.post(f"{v1}/retrieve_future", retrieve_future),
            web.post(f"{v1}/cancel_future", cancel_future),
            web.get(f"{v1}/training_runs", training_runs),
            web.get(f"{v1}/training_runs/{{run_id}}", training_run),
            web.get(f"{v1}/training_runs/{{run_id}}/checkpoints", checkpoints),
            web.delete(
                f"{v1}/training_runs/{{run_id}}/checkpoints/{{checkpoint_id:.+}}",
                delete_checkpoint,
            ),
        ]
    )
    return app
