"""Benchmark of `persona serve`: what the HTTP interface costs over the
in-process local backend, on the tiny model so that the overhead is what is measured.

- per-call overhead: the median latency of ``sample`` (1 sequence, 4 tokens),
  ``forward_backward`` (2 x 64 tokens) and ``optim_step`` through the real SDK against the
  server, minus the same call on an in-process ``LocalServiceClient``;
- an RLAIF-shaped step (4 prompts x 4 samples, then ``forward_backward`` + ``optim_step``
  submitted together, then a fresh sampler) with no added latency and through a proxy
  that delays each direction by 100 ms (200 ms round trip): the step's wall time, the HTTP
  requests it made, and how many round trips' worth of waiting the latency added;
- samples per second (4 tokens each) from 16 concurrent clients (threads, each with its
  own client, made before the clock starts), served and in process.

The server runs as a separate process (``persona serve``), as it would on another machine;
both share this machine's cores (``PERSONA_THREADS`` sets the same torch thread count on
both sides), so run it on an otherwise idle machine. The last line
printed is one JSON object.

    .venv/bin/python bench/serve.py            # about 1-2 minutes
    .venv/bin/python bench/serve.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the same torch thread count in process and in the server's process (else each picks its
# own from the load it sees, and the comparison measures that instead of the interface)
os.environ.setdefault("PERSONA_THREADS", str(min(4, os.cpu_count() or 1)))

MODEL = "persona/tiny-random"
KEY = "tml-bench-" + "k" * 32
CLIENTS = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    """`persona serve` in its own process; returns once it answers."""
    import httpx

    port = free_port()
    key_file = root / "key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    cmd = [sys.executable, "-m", "engine.cli", "serve", "--port", str(port)]
    cmd += ["--key-file", str(key_file), "--root", str(root / "served")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = open(root / "server.log", "w")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError((root / "server.log").read_text()[-2000:])
        try:
            httpx.get(url + "/api/v1/healthz", headers={"X-API-Key": KEY}, timeout=1)
            return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start within 120 s")


class DelayProxy:
    """A TCP proxy that holds each chunk ``delay`` seconds in each direction and counts the
    HTTP requests it forwards."""

    def __init__(self, target_port: int, delay: float) -> None:
        self.target_port, self.delay, self.requests = target_port, delay, 0
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        if not ready.wait(10):
            raise RuntimeError("the proxy did not start")

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: bool):
        try:
            while data := await reader.read(65536):
                if up:
                    self.requests += data.count(b"POST /api/v1/") + data.count(b"GET /api/v1/")
                await asyncio.sleep(self.delay)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _handle(self, client_r, client_w) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(
            self._pipe(client_r, server_w, True), self._pipe(server_r, client_w, False)
        )

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        ready.set()
        self._loop.run_forever()


def median_ms(fn: Callable[[], object], n: int) -> float:
    fn()  # warm
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1000, 2)


def datum(types, np, tokens: list[int], **inputs) -> object:
    n = len(tokens) - 1
    fields = {"target_tokens": np.array(tokens[1:], dtype=np.int64)}
    fields.update({k: np.full(n, v, dtype=np.float32) for k, v in inputs.items()})
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=fields)


def per_call(service, n: int) -> dict[str, float]:
    import numpy as np
    from tinker import types

    tc = service.create_lora_training_client(base_model=MODEL, rank=8, seed=0).result()
    sc = tc.save_weights_and_get_sampling_client().result()
    data = [
        datum(types, np, [(7 * i + r) % 4000 + 10 for i in range(65)], weights=1.0) for r in (0, 1)
    ]
    prompt = types.ModelInput.from_ints([1, 2, 3, 4, 5, 6, 7, 8])
    params = types.SamplingParams(max_tokens=4, seed=1)
    adam = types.AdamParams(learning_rate=1e-4)
    return {
        "sample": median_ms(lambda: sc.sample(prompt, 1, params).result(), n),
        "forward_backward": median_ms(
            lambda: tc.forward_backward(data, "cross_entropy").result(), n
        ),
        "optim_step": median_ms(lambda: tc.optim_step(adam).result(), n),
    }


def rlaif_step(service) -> float:
    """4 prompts x 4 samples, then forward_backward + optim_step together, then a sampler."""
    import numpy as np
    from tinker import types

    tc = service.create_lora_training_client(base_model=MODEL, rank=8, seed=0).result()
    sc = tc.save_weights_and_get_sampling_client().result()
    prompts = [types.ModelInput.from_ints([1, 2, 3, i + 4]) for i in range(4)]
    t = time.perf_counter()
    futures = [
        sc.sample(p, 4, types.SamplingParams(max_tokens=8, seed=i)) for i, p in enumerate(prompts)
    ]
    data = [
        datum(types, np, p.to_ints() + list(s.tokens), logprobs=0.0, advantages=0.1)
        for p, f in zip(prompts, futures, strict=True)
        for s in f.result().sequences
    ]
    fb = tc.forward_backward(data, "importance_sampling")
    opt = tc.optim_step(types.AdamParams(learning_rate=1e-4))
    fb.result(), opt.result()
    tc.save_weights_and_get_sampling_client().result()
    return time.perf_counter() - t


def samples_per_second(make_client: Callable[[], object], seconds: float) -> float:
    """Samples finished per second by CLIENTS threads, each with its own client."""
    from tinker import types

    clients = [make_client() for _ in range(CLIENTS)]
    count, lock = [0], threading.Lock()
    start, stop = threading.Barrier(CLIENTS + 1), [0.0]

    def worker(i: int) -> None:
        params = types.SamplingParams(max_tokens=4, seed=i)
        prompt = types.ModelInput.from_ints([1, 2, 3, i + 4])
        clients[i].sample(prompt, 1, params).result()  # warm
        start.wait()
        while time.monotonic() < stop[0]:
            clients[i].sample(prompt, 1, params).result()
            with lock:
                count[0] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    stop[0] = time.monotonic() + 3600
    start.wait()
    t0 = time.monotonic()
    stop[0] = t0 + seconds
    for t in threads:
        t.join()
    return round(count[0] / (time.monotonic() - t0), 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n, seconds = (5, 4.0) if args.quick else (20, 10.0)
    t0 = time.perf_counter()
    load_before = os.getloadavg()[0]

    import tinker

    from engine.backends.local import LocalServiceClient

    root = Path(tempfile.mkdtemp(prefix="persona-bench-serve-"))
    local = LocalServiceClient(checkpoint_dir=root / "local")
    proc, url = start_server(root)
    try:
        remote = tinker.ServiceClient(base_url=url, api_key=KEY)
        ours = per_call(local, n)
        served = per_call(remote, n)

        proxy = DelayProxy(int(url.rsplit(":", 1)[1]), 0.1)
        slow = tinker.ServiceClient(base_url=f"http://127.0.0.1:{proxy.port}", api_key=KEY)
        rlaif_step(remote)  # warm
        step_0 = rlaif_step(remote)
        rlaif_step(slow)  # warm: the client's own setup requests are not the step's
        before = proxy.requests
        step_200 = rlaif_step(slow)
        step_requests = proxy.requests - before

        def served_sampler() -> object:
            client = tinker.ServiceClient(base_url=url, api_key=KEY)
            return client.create_sampling_client(base_model=MODEL).result()

        sps_local = samples_per_second(
            lambda: local.create_sampling_client(base_model=MODEL).result(), seconds
        )
        sps_served = samples_per_second(served_sampler, seconds)
    finally:
        proc.terminate()
        proc.wait(10)
        local.close()

    result = {
        "model": MODEL,
        "calls_per_median": n,
        "threads": int(os.environ["PERSONA_THREADS"]),
        "in_process_ms": ours,
        "served_ms": served,
        "overhead_ms": {k: round(served[k] - ours[k], 2) for k in ours},
        "rlaif_step_s": {"no_added_latency": round(step_0, 2), "rtt_200ms": round(step_200, 2)},
        "rlaif_step_http_requests": step_requests,
        "rlaif_step_round_trips_waited": round((step_200 - step_0) / 0.2, 1),
        "samples_per_s_16_clients": {"in_process": sps_local, "served": sps_served},
        "load_avg_before": round(load_before, 2),
        "load_avg_after": round(os.getloadavg()[0], 2),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
