"""`persona serve` driven by the real Tinker SDK over HTTP on 127.0.0.1: the
ServiceClient -> TrainingClient -> SamplingClient flow with the in-process service's numbers,
seq_id order, long polls, the key, bad bodies, checkpoint paths that stay under the root."""

from __future__ import annotations

import asyncio
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tinker
from conftest import TINY, needs_backend
from tinker import types

from engine.serve import paths
from engine.serve.futures import FutureTable, Outcome, SeqGate
from engine.serve.keys import KeyFileError, load_or_create_key
from engine.serve.server import ServerThread, is_loopback
from engine.serve.state import ServedState

pytestmark = needs_backend
KEY = "tml-" + "t" * 40


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    from engine.backends.local import LocalServiceClient

    svc = LocalServiceClient(checkpoint_dir=tmp_path_factory.mktemp("served"))
    yield svc
    svc.close()


@pytest.fixture
def server(service) -> Iterator[ServerThread]:
    srv = ServerThread(ServedState(service), KEY).start()
    yield srv
    srv.stop()


def sdk(srv: ServerThread, key: str = KEY) -> tinker.ServiceClient:
    return tinker.ServiceClient(base_url=srv.base_url, api_key=key)


def post(srv: ServerThread, route: str, key: str | None = KEY, proto: bool = False, **kw):
    headers = {"X-API-Key": key} if key else {}
    if proto:
        headers["Content-Type"] = "application/x-protobuf"
    return httpx.post(f"{srv.base_url}/api/v1/{route}", headers=headers, timeout=30, **kw)


def datum(tokens: list[int]) -> types.Datum:
    n = len(tokens) - 1
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": np.array(tokens[1:], dtype=np.int64),
            "weights": np.array([0.0] + [1.0] * (n - 1), dtype=np.float32),
        },
    )


BATCH = [datum([1, 5, 9, 13, 17, 21]), datum([2, 4, 8, 16, 32])]
ADAM = types.AdamParams(learning_rate=0.05)


def test_the_sdk_trains_samples_and_resumes_with_the_in_process_numbers(server, service):
    sc = sdk(server)
    tc = sc.create_lora_training_client(base_model=TINY, rank=4, seed=3).result()
    ref = service.create_lora_training_client(TINY, rank=4, seed=3).result()
    for _ in range(2):  # both submitted before either is awaited, as the stages do
        fb, opt = tc.forward_backward(BATCH, "cross_entropy"), tc.optim_step(ADAM)
        ref_fb, ref_opt = ref.forward_backward(BATCH, "cross_entropy"), ref.optim_step(ADAM)
        got, want = fb.result(), ref_fb.result()
        assert got.metrics["loss:sum"] == pytest.approx(want.metrics["loss:sum"], rel=1e-5)
        for g, w in zip(got.loss_fn_outputs, want.loss_fn_outputs, strict=True):
            assert g["logprobs"].tolist() == pytest.approx(w["logprobs"].tolist(), rel=1e-5)
        assert opt.result().metrics["grad_norm"] == pytest.approx(
            ref_opt.result().metrics["grad_norm"], rel=1e-4
        )
    state = tc.save_state("step-2").result()
    assert state.path.startswith("tinker://") and state.path.endswith("/weights/step-2")
    assert (paths.folder_for(service.checkpoint_dir, state.path) / "adapter_config.json").is_file()
    sampler_path = tc.save_weights_for_sampler("final").result().path
    ref_path = ref.save_weights_for_sampler("final").result().path

    sampling = sc.create_sampling_client(model_path=sampler_path).result()
    out = sampling.sample(
        types.ModelInput.from_ints([1, 5, 9]), 3, types.SamplingParams(max_tokens=4, seed=7)
    ).result()
    assert len(out.sequences) == 3 and len({s.sequence_id for s in out.sequences}) == 3
    assert all(len(s.tokens) == 4 and s.stop_reason == "length" for s in out.sequences)
    prompt = types.ModelInput.from_ints([1, 5, 9, 13, 17])
    local = service.create_sampling_client(model_path=ref_path).result()
    got_lp = sampling.compute_logprobs(prompt).result()
    assert got_lp[0] is None
    assert got_lp[1:] == pytest.approx(local.compute_logprobs(prompt).result()[1:], rel=1e-5)

    resumed = sc.create_training_client_from_state_with_optimizer(state.path).result()
    again = resumed.forward(BATCH, "cross_entropy").result().metrics["loss:sum"]
    assert again == pytest.approx(tc.forward(BATCH, "cross_entropy").result().metrics["loss:sum"])
    run = tinker.RestClient(base_url=server.base_url, api_key=KEY)
    info = run.get_training_run_by_tinker_path(state.path).result()
    assert info.base_model == TINY and info.lora_rank == 4
    sc.close("success").result()


def _create_model(srv: ServerThread) -> str:
    session = post(
        srv, "create_session", json={"tags": [], "user_metadata": {}, "sdk_version": "x"}
    )
    sid = session.json()["session_id"]
    body = {"session_id": sid, "model_seq_id": 0, "base_model": TINY, "lora_config": {"rank": 4}}
    rid = post(srv, "create_model", json=body).json()["request_id"]
    return _poll(srv, rid)["model_id"]


def _poll(srv: ServerThread, rid: str) -> dict:
    for _ in range(20):  # bounded: each poll is held until the result is ready
        reply = post(srv, "retrieve_future", json={"request_id": rid}).json()
        if reply.get("type") != "try_again":
            return reply
    raise AssertionError(f"{rid} never finished")


def test_training_calls_run_in_seq_id_order_and_a_retry_is_the_same_request(server):
    from tinker.proto.request_conv import forward_backward_request_to_proto

    model_id = _create_model(server)
    # seq_id 2 (the optimizer step) arrives first: it must wait for seq_id 1's gradients
    optim = {"model_id": model_id, "seq_id": 2, "adam_params": {"learning_rate": 0.01}}
    opt_rid = post(server, "optim_step", json=optim).json()["request_id"]
    fb = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=BATCH, loss_fn="cross_entropy"),
        model_id=model_id,
        seq_id=1,
    )
    body = forward_backward_request_to_proto(fb).SerializeToString()
    fb_rid = post(server, "forward_backward", content=body, proto=True).json()["request_id"]
    again = post(server, "forward_backward", content=body, proto=True)
    assert again.json()["request_id"] == fb_rid  # a resent seq_id is not run twice
    assert _poll(server, opt_rid)["metrics"]["grad_norm"] > 0  # ran after the backward pass


async def test_a_long_poll_waits_for_the_result_then_says_try_again():
    table = FutureTable()
    release = asyncio.Event()

    async def work() -> Outcome:
        await release.wait()
        return Outcome(b"{}", "application/json")

    rid = table.start(work())
    assert await table.wait(rid, timeout=0.05) is None  # not ready: the SDK polls again
    release.set()
    assert (await table.wait(rid, timeout=5)).body == b"{}"
    gate = SeqGate()
    order: list[int] = []

    async def call(seq: int) -> None:
        await gate.turn(seq)
        order.append(seq)
        await gate.passed(seq)

    await asyncio.gather(call(3), call(2), call(1))
    assert order == [1, 2, 3]


async def test_a_wrong_key_gets_the_tinker_paths_own_message(server):
    from engine.backends import make_service_client
    from engine.backends.tinker_service import TinkerAccountError

    env = {"TINKER_API_KEY": "tml-" + "w" * 40, "TINKER_BASE_URL": server.base_url}
    svc = make_service_client("tinker", env=env, connect_timeout=10)
    with pytest.raises(TinkerAccountError, match="Tinker refused the API key") as e:
        await svc.connect()
    assert KEY not in str(e.value) and "w" * 40 not in str(e.value)
    for key in (None, "tml-" + "w" * 40):
        r = httpx.get(
            f"{server.base_url}/api/v1/healthz", headers={"X-API-Key": key} if key else {}
        )
        assert r.status_code == 401 and "refused the key" in r.json()["error"]


def test_bad_bodies_get_a_4xx_with_a_body_and_the_server_keeps_serving(server, monkeypatch):
    model_id = _create_model(server)
    cases = [
        post(server, "forward_backward", content=b"\xff\x01garbage", proto=True),
        post(server, "create_model", content=b'{"session_id": '),
        post(server, "create_model", json={"session_id": 3}),
        post(server, "optim_step", json={"model_id": "nobody", "seq_id": 1, "adam_params": {}}),
        post(server, "retrieve_future", json={"request_id": "never-issued"}),
        post(
            server, "load_weights", json={"model_id": model_id, "path": "/etc", "optimizer": False}
        ),
    ]
    assert [r.status_code for r in cases] == [400, 400, 400, 404, 404, 400]
    for r in cases:
        assert r.headers["content-length"] != "0" and r.json()["error"], r.text
    assert "ForwardBackwardRequest" in cases[0].json()["error"]
    assert "session_id" in cases[2].json()["error"]

    unknown_loss = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=BATCH, loss_fn="nope"),
        model_id=model_id,
        seq_id=1,
    )
    from tinker.proto.request_conv import forward_backward_request_to_proto

    body = forward_backward_request_to_proto(unknown_loss).SerializeToString()
    r = post(server, "forward_backward", content=body, proto=True)
    assert r.status_code == 400 and "loss_fn 'nope'" in r.json()["error"]
    big = post(server, "telemetry", content=b"x" * (64 * 1024 * 1024 + 1))
    assert big.status_code == 413 and "limit" in big.json()["error"]
    # still serving: the refused seq_id 1 did not hold seq_id 2 back
    optim = {"model_id": model_id, "seq_id": 2, "adam_params": {"learning_rate": 0.01}}
    reply = _poll(server, post(server, "optim_step", json=optim).json()["request_id"])
    assert reply["metrics"]["grad_norm"] == 0.0  # no gradients: the bad request never ran
    assert post(server, "telemetry", json={}).status_code == 200


def test_checkpoint_paths_never_leave_the_root(tmp_path: Path):
    root = tmp_path / "root"
    (root / "run" / "weights" / "ok").mkdir(parents=True)
    assert paths.folder_for(root, "tinker://run/weights/ok") == (root / "run/weights/ok").resolve()
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link").symlink_to(outside)
    for bad in (
        "tinker://../weights/x",
        "tinker://run/weights/..",
        "tinker://run/../x",
        "tinker:///etc/weights/x",
        "tinker://run/weights/a/b",
        "/abs/path",
        "tinker://link/weights/x",
        "tinker://run/other/x",
    ):
        with pytest.raises(paths.PathRefused):
            paths.folder_for(root, bad)


def test_the_key_is_generated_once_private_and_checked(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PERSONA_CACHE_DIR", str(tmp_path))
    key, path, created = load_or_create_key(None)
    assert created and key.startswith("tml-") and len(key) > 40
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_or_create_key(None) == (key, path, False)
    bad = tmp_path / "bad.key"
    bad.write_text("sk-not-a-tinker-key\n")
    with pytest.raises(KeyFileError, match=str(bad)):
        load_or_create_key(bad)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and not is_loopback("0.0.0.0")


def test_concurrent_samples_from_many_clients_all_come_back(server):
    sc = sdk(server)
    sampling = sc.create_sampling_client(base_model=TINY).result()
    results: list = []

    def one(i: int) -> None:
        params = types.SamplingParams(max_tokens=3, seed=i)
        results.append(sampling.sample(types.ModelInput.from_ints([1, i + 2]), 1, params).result())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 8 and all(len(r.sequences[0].tokens) == 3 for r in results)
    sc.close("success").result()


def test_a_finished_or_silent_session_frees_its_models_and_samplers(server):
    import time

    from engine.serve.state import SESSION_TTL_S

    state = server.state
    done, silent = sdk(server), sdk(server)
    for client in (done, silent):
        tc = client.create_lora_training_client(base_model=TINY, rank=4).result()
        tc.save_weights_and_get_sampling_client().result()
    assert len(state.models) == 2 and len(state.samplers) == 2
    done.close("success").result()
    (session,) = [s for s in state.sessions.values() if s.finished]
    assert session.finished == "success" and len(state.models) == len(state.samplers) == 1
    state.expire_sessions(now=time.monotonic() + SESSION_TTL_S + 1)  # heartbeats stopped
    assert not state.models and not state.samplers
    assert {s.finished for s in state.sessions.values()} == {"success", "expired"}


def test_persona_serve_prints_the_key_once_and_warns_off_loopback(tmp_path, monkeypatch):
    from aiohttp import web

    from engine.serve import server as server_module

    monkeypatch.setenv("PERSONA_CACHE_DIR", str(tmp_path))
    bound: list[tuple[str, int]] = []
    monkeypatch.setattr(web, "run_app", lambda app, host, port, **kw: bound.append((host, port)))
    first: list[str] = []
    server_module.serve("127.0.0.1", 8765, None, tmp_path / "root", say=first.append)
    key = (tmp_path / "serve_api_key").read_text().strip()
    assert f"  export TINKER_API_KEY={key}" in first
    assert "  export TINKER_BASE_URL=http://127.0.0.1:8765" in first
    assert not any("Warning" in line for line in first)
    again: list[str] = []
    server_module.serve("0.0.0.0", 8765, None, tmp_path / "root", say=again.append)
    assert not any(key in line for line in again)  # printed once, when it was made
    assert any("plain HTTP" in line and "ssh -N -L 8765" in line for line in again)
    assert bound == [("127.0.0.1", 8765), ("0.0.0.0", 8765)]
