"""How fast the local service runs on this machine: measured once, cached, read by estimates.

``measure_profile(runtime)`` times the service's own code paths on a loaded
:class:`~engine.backends.local.compute.BaseRuntime` for a few seconds:

- prefill: ``token_logprobs(..., grad=False)`` (scoring, the judge's forced-choice verdicts,
  validation losses, reference log-probabilities);
- training: ``token_logprobs(..., grad=True)`` on a LoRA adapter, backward, then an AdamW
  step over the adapter's parameters (what ``LocalTrainingClient`` does), timed apart;
- decoding: ``BaseRuntime.generate`` at 1, 8 and 32 rows (temperature 1, top_p 0.95, as the
  stages sample), every row running to its ``max_tokens``;
- a checkpoint save (adapter + optimizer state, and the sampler weights), as
  a training stage does (engine.run.train_run).

``ensure_profile(base_model, plan)`` loads the runtime (timing the load), measures and saves
the profile as JSON under ``<cache>/speed/`` (``PERSONA_CACHE_DIR`` moves it), one file per
:class:`ProfileKey`: CPU, its flags, device, dtype, thread count, torch version, model and
``PROFILE_VERSION``. A file that cannot be read, or that was written for another key or
another version, is ignored and measured again.

Thread count: measured with the count the service would use (``configure_threads``, the same
call the service makes), never another one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from engine.store.atomic import atomic_write_json

from . import hardware
from .models import ComputePlan, cache_dir, choose_compute

# Bump when the service's speed code changes what these measurements mean (a new decoder,
# training path, batching rule, or a change to what is measured here): every cached profile
# of an older version is then ignored and measured again.
PROFILE_VERSION = 1

DECODE_BATCHES = (1, 8, 32)
DECODE_ROWS_PER_REQUEST = {1: 1, 8: 4, 32: 8}  # e.g. 32 rows: 4 prompts x 8 samples (RL groups)
DECODE_TOKENS = 12  # tokens each decode row runs to (no stop: every row runs to the end)
DECODE_PROMPT = 16  # prompt tokens of each request in the rate measurements
JOIN_REQUESTS = 4  # one-token requests: what a request costs to join a batch
CONTEXT_ROWS, CONTEXT_PROMPT = 8, 256  # rows sampling one longer prompt: the context's cost
PREFILL_ROWS, PREFILL_LEN = 2, 192
TRAIN_ROWS, TRAIN_LEN = 2, 128
TRAIN_RANK = 16  # sft's default LoRA rank, every target layer as stages train them


class MeasureStopped(Exception):
    """``should_stop()`` turned true while measuring (a stage started): nothing is saved."""


@dataclass(frozen=True)
class ProfileKey:
    """What a profile is valid for: a profile measured under another key is not used."""

    cpu: str
    cpu_flags: tuple[str, ...]
    device: str
    dtype: str
    threads: int
    torch: str
    model: str
    version: int = PROFILE_VERSION

    def machine(self) -> tuple:
        """Everything but the thread count (a busy machine changes it from run to run)."""
        return (self.cpu, self.cpu_flags, self.device, self.dtype, self.torch, self.model)

    def file_name(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return f"profile-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.json"

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["cpu_flags"] = list(self.cpu_flags)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProfileKey:
        return cls(
            cpu=str(data["cpu"]),
            cpu_flags=tuple(str(f) for f in data["cpu_flags"]),
            device=str(data["device"]),
            dtype=str(data["dtype"]),
            threads=int(data["threads"]),
            torch=str(data["torch"]),
            model=str(data["model"]),
            version=int(data["version"]),
        )


@dataclass(frozen=True)
class SpeedProfile:
    """The rates a stage's cost depends on, for one :class:`ProfileKey`."""

    key: ProfileKey
    prefill_tokens_per_s: float  # forward without grad (scoring, judging, validation)
    train_tokens_per_s: float  # forward + backward through a LoRA adapter
    optim_step_s: float  # one AdamW step over the adapter
    decode_tokens_per_s: dict[int, float]  # rows sampled together -> tokens/s of all rows
    request_s: float  # a sampling request joining a batch with a short prompt
    prompt_tokens_per_s: float  # ... and each further prompt token (the decoder's prefill)
    context_s_per_token: float  # per step, per row, per token of context (the KV cache read)
    load_s: float  # loading the base model (a stage pays it once per model)
    checkpoint_s: float  # saving training state + sampler weights
    measure_s: float = 0.0  # how long the measurement took (the load excluded)
    measured_at: str = ""
    details: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def dtype_label(self) -> str:
        return {"bfloat16": "bf16", "float32": "fp32"}.get(self.key.dtype, self.key.dtype)

    def decode_rate(self, rows: int) -> float:
        """Tokens/s of all rows together when ``rows`` are sampled at once (see
        ``_rate_at``)."""
        return _rate_at(self.decode_tokens_per_s, rows)

    def join_s(self, prompt_tokens: float) -> float:
        """What one sampling request costs before its first step: its prompt's prefill."""
        return self.request_s + max(0.0, prompt_tokens - DECODE_PROMPT) / self.prompt_tokens_per_s

    def step_s(self, rows: int, context: float) -> float:
        """One decode step of ``rows`` rows whose contexts average ``context`` tokens."""
        rows = max(1, int(rows))
        return rows / self.decode_rate(rows) + rows * max(0.0, context) * self.context_s_per_token

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key.to_dict(),
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "train_tokens_per_s": self.train_tokens_per_s,
            "optim_step_s": self.optim_step_s,
            "decode_tokens_per_s": {str(k): v for k, v in self.decode_tokens_per_s.items()},
            "request_s": self.request_s,
            "prompt_tokens_per_s": self.prompt_tokens_per_s,
            "context_s_per_token": self.context_s_per_token,
            "load_s": self.load_s,
            "checkpoint_s": self.checkpoint_s,
            "measure_s": self.measure_s,
            "measured_at": self.measured_at,
            "details": self.details,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpeedProfile:
        def rate(x: Any) -> float:
            v = float(x)
            if not math.isfinite(v) or v <= 0:
                raise ValueError(f"not a positive rate: {x!r}")
            return v

        def seconds(x: Any) -> float:
            v = float(x)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"not a duration: {x!r}")
            return v

        decode = {int(k): rate(v) for k, v in dict(data["decode_tokens_per_s"]).items()}
        if not decode:
            raise ValueError("no decode rates")
        return cls(
            key=ProfileKey.from_dict(data["key"]),
            prefill_tokens_per_s=rate(data["prefill_tokens_per_s"]),
            train_tokens_per_s=rate(data["train_tokens_per_s"]),
            optim_step_s=seconds(data["optim_step_s"]),
            decode_tokens_per_s=decode,
            request_s=seconds(data["request_s"]),
            prompt_tokens_per_s=rate(data["prompt_tokens_per_s"]),
            context_s_per_token=seconds(data["context_s_per_token"]),
            load_s=seconds(data["load_s"]),
            checkpoint_s=seconds(data["checkpoint_s"]),
            measure_s=seconds(data.get("measure_s", 0.0)),
            measured_at=str(data.get("measured_at", "")),
            details=dict(data.get("details") or {}),
        )

    def summary(self) -> str:
        d = self.decode_tokens_per_s
        return (
            f"{self.key.model} on {self.key.device} ({self.dtype_label}, {self.key.threads} "
            f"thread{'s' if self.key.threads != 1 else ''}): prefill "
            f"{self.prefill_tokens_per_s:.0f} tok/s, training {self.train_tokens_per_s:.0f} "
            f"tok/s + {self.optim_step_s:.2f} s/step, sampling "
            + " / ".join(f"{d[b]:.0f}" for b in sorted(d))
            + f" tok/s at {' / '.join(str(b) for b in sorted(d))} rows, load {self.load_s:.1f} s"
        )


# -- the key ------------------------------------------------------------------------------


def speed_dir() -> Path:
    """Where profiles are cached: beside the model cache (``PERSONA_CACHE_DIR`` moves both)."""
    return cache_dir().parent / "speed"


def _torch_version() -> str:
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        import torch

        return str(torch.__version__)


def expected_threads(requested: int | None = None) -> int:
    """The thread count the service would choose now, without setting it: as
    ``hardware.configure_threads`` decides (an explicit count, PERSONA_THREADS, else the cores
    free now); while a service is running in this process, the count it configured."""
    try:
        explicit = hardware.explicit_threads(requested)
    except ValueError:  # a malformed PERSONA_THREADS: the service will say so
        return hardware.auto_threads()
    return explicit or hardware.configured_threads() or hardware.auto_threads()


def profile_key(base_model: str, plan: ComputePlan, threads: int) -> ProfileKey:
    return ProfileKey(
        cpu=hardware.cpu_model_name(),
        cpu_flags=tuple(hardware.reported_cpu_flags()),
        device=plan.device,
        dtype=plan.dtype_name,
        threads=int(threads),
        torch=_torch_version(),
        model=str(base_model),
        version=PROFILE_VERSION,  # read now, not when the class was defined
    )


def current_key(
    base_model: str,
    *,
    threads: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> ProfileKey:
    """The key a service started now with these settings would measure under (nothing set)."""
    if dtype == "auto":
        dtype = None
    return profile_key(base_model, choose_compute(device, dtype), expected_threads(threads))


# -- the cache ----------------------------------------------------------------------------


def _read(path: Path) -> SpeedProfile | None:
    try:
        profile = SpeedProfile.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # unreadable or malformed: measured again
    return profile if profile.key.version == PROFILE_VERSION else None


def load_profile(key: ProfileKey) -> SpeedProfile | None:
    """The cached profile for exactly ``key``, or None (none, unreadable, stale)."""
    profile = _read(speed_dir() / key.file_name())
    return profile if profile is not None and profile.key == key else None


def nearest_profile(key: ProfileKey) -> SpeedProfile | None:
    """The cached profile for ``key``; failing that, one of the same machine, model, dtype
    and torch measured at another thread count (the closest count). None if neither."""
    exact = load_profile(key)
    if exact is not None:
        return exact
    folder = speed_dir()
    if not folder.is_dir():
        return None
    found = []
    for path in sorted(folder.glob("profile-*.json")):
        p = _read(path)
        if p is not None and p.key.machine() == key.machine():
            found.append(p)
    return min(found, key=lambda p: abs(p.key.threads - key.threads), default=None)


def save_profile(profile: SpeedProfile) -> Path:
    path = speed_dir() / profile.key.file_name()
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_json(path, profile.to_dict())


# -- measuring ----------------------------------------------------------------------------


def _tokens(n: int, vocab: int, salt: int) -> list[int]:
    """Deterministic token ids spread over the vocabulary (content does not change speed)."""
    return [(salt * 7919 + i * 104_729) % (vocab - 1) + 1 for i in range(n)]


def _rate_at(rates: dict[int, float], rows: int) -> float:
    """Tokens/s of all rows together at ``rows`` rows, from rates measured at some batch
    sizes: log-log between them, and beyond them along the last segment's slope."""
    pts = sorted((int(b), float(r)) for b, r in rates.items() if r > 0)
    if not pts:
        raise ValueError("the profile has no decode rate")
    rows = max(1, int(rows))
    if len(pts) == 1:
        return pts[0][1]
    if rows <= pts[0][0]:
        return pts[0][1] * rows / pts[0][0]
    lo, hi = pts[-2], pts[-1]
    for a, b in zip(pts, pts[1:], strict=False):
        if rows <= b[0]:
            lo, hi = a, b
            break
    slope = math.log(hi[1] / lo[1]) / math.log(hi[0] / lo[0])
    if rows > hi[0]:
        slope = min(max(slope, 0.0), 1.0)  # beyond what was measured: never superlinear
    return lo[1] * (rows / lo[0]) ** slope


def _interp_step(step_s: dict[int, float], rows: int) -> float:
    """A measured step time at ``rows`` rows (log-log between the measured batch sizes)."""
    return rows / _rate_at({b: b / s for b, s in step_s.items()}, rows)


def _time_checkpoint(rt: Any, spec: Any, name: str, opt: Any, model: str | None) -> float:
    """Seconds to save a checkpoint: state (adapter + optimizer) and sampler weights, as
    stages save them."""
    from . import checkpoint_io

    with tempfile.TemporaryDirectory(prefix="persona-speed-") as tmp:
        meta = {
            "kind": "state",
            "base_model": model or str(rt.model_dir),
            "model_dir": str(rt.model_dir),
            "rank": spec.rank,
            "alpha": spec.alpha,
            "targets": list(spec.targets),
            "step": 1,
            "model_id": name,
        }
        t0 = time.perf_counter()
        state = rt.host.state_dict(name)
        checkpoint_io.write(
            Path(tmp) / "state",
            meta=meta,
            adapter=state,
            optimizer_state=opt.state_dict(),
            overwrite=True,
        )
        checkpoint_io.write(
            Path(tmp) / "sampler",
            meta={**meta, "kind": "sampler"},
            adapter=state,
            optimizer_state=None,
            overwrite=True,
        )
        ckpt_s = time.perf_counter() - t0
    return ckpt_s


def _measure_decode(
    rt: Any, vocab: int, check: Callable[[str], None]
) -> tuple[float, float, dict[int, float], float]:
    """(seconds a request takes to join, prompt tokens/s, tokens/s per row count, seconds
    each token of context adds to a row's step)."""
    from .compute import GenRow, make_generator

    # decoding. A generate call costs, per request, a join (its prompt's prefill: measured
    # with short prompts), then per step (rows / rate(rows)) plus, per row, a cost that grows
    # with its context (the KV cache read): measured with a longer shared prompt.
    def gen(requests: int, per_request: int, max_tokens: int, salt: int, prompt: int) -> float:
        batch = []
        for q in range(requests):
            tokens, generator = _tokens(prompt, vocab, salt + q), make_generator(salt + q)
            batch += [
                GenRow(
                    prompt=tokens,
                    max_tokens=max_tokens,
                    temperature=1.0,
                    top_p=0.95,
                    top_k=0,
                    stop_ids=frozenset(),  # no stop: every row runs to max_tokens
                    stop_strings=(),
                    generator=generator,
                )
                for _ in range(per_request)
            ]
        t0 = time.perf_counter()
        rt.generate(None, batch)
        return time.perf_counter() - t0

    # warm-up: 32 slots of cache, the prefill and step shapes
    top = DECODE_BATCHES[-1]
    gen(top // DECODE_ROWS_PER_REQUEST[top], DECODE_ROWS_PER_REQUEST[top], 2, 100, DECODE_PROMPT)
    check("sample warm-up")
    # what a request costs to join a batch (its prefill), with a short and a longer prompt
    n = DECODE_TOKENS
    request_s = gen(JOIN_REQUESTS, 1, 1, 200, DECODE_PROMPT) / JOIN_REQUESTS
    join_long = gen(1, CONTEXT_ROWS, 1, 300, CONTEXT_PROMPT)
    prompt_rate = (CONTEXT_PROMPT - DECODE_PROMPT) / max(join_long - request_s, 1e-6)
    check("sample join")
    # steps at 1, 8 and 32 rows (short prompts); the first token comes with the prefill
    step_s: dict[int, float] = {}
    for rows in DECODE_BATCHES:
        per = DECODE_ROWS_PER_REQUEST[rows]
        requests = max(1, rows // per)
        elapsed = gen(requests, per, n, 1000 * rows, DECODE_PROMPT)
        step_s[rows] = max(elapsed - requests * request_s, 1e-6) / (n - 1)
        check(f"sample {rows}")
    decode = {rows: rows / step_s[rows] for rows in sorted(step_s)}
    # the same rows on a longer prompt: what each token of context adds to a step
    elapsed = gen(1, CONTEXT_ROWS, n, 5000, CONTEXT_PROMPT)
    long_step = max(elapsed - join_long, 1e-6) / (n - 1)
    extra = CONTEXT_ROWS * (CONTEXT_PROMPT - DECODE_PROMPT)
    context_s = max(0.0, (long_step - _interp_step(step_s, CONTEXT_ROWS)) / extra)
    check("sample context")

    return request_s, prompt_rate, decode, context_s


def measure_profile(
    runtime: Any,
    *,
    model: str | None = None,
    threads: int | None = None,
    load_s: float = 0.0,
    should_stop: Callable[[], bool] = lambda: False,
) -> SpeedProfile:
    """Time ``runtime``'s prefill, training, decoding and a checkpoint save (a few seconds).

    ``threads``: the count torch runs with (default: what it has now). ``should_stop``:
    checked between the parts; when it turns true, :class:`MeasureStopped` is raised."""
    import torch

    from .lora import LoraSpec, targets_for
    from .service import LORA_ALPHA

    parts: dict[str, float] = {}
    mark = [time.perf_counter()]

    def check(part: str) -> None:
        now = time.perf_counter()
        parts[part] = round(parts.get(part, 0.0) + now - mark[0], 3)
        mark[0] = now
        if should_stop():
            raise MeasureStopped()

    rt = runtime
    vocab = rt.vocab_size
    threads = int(threads or torch.get_num_threads())
    started = time.perf_counter()
    details: dict[str, Any] = {}

    # prefill (no grad), after one short warm-up
    rt.token_logprobs(None, [_tokens(32, vocab, 1)], [_tokens(32, vocab, 2)], grad=False)
    check("warm-up")
    rows = [_tokens(PREFILL_LEN, vocab, 10 + i) for i in range(PREFILL_ROWS)]
    t0 = time.perf_counter()
    rt.token_logprobs(None, rows, [r[1:] + r[:1] for r in rows], grad=False)
    prefill = PREFILL_ROWS * PREFILL_LEN / max(time.perf_counter() - t0, 1e-9)
    check("prefill")

    # training: forward + backward through a fresh adapter, then an AdamW step
    name = f"speed-{os.getpid()}-{time.monotonic_ns()}"
    spec = LoraSpec(TRAIN_RANK, LORA_ALPHA, targets_for(True, True, True))
    rt.host.add(name, spec, torch.Generator().manual_seed(0))
    try:
        params = rt.host.parameters(name)
        opt = torch.optim.AdamW(params, lr=1e-4)

        def fb(batch: list[list[int]]) -> None:
            logps = rt.token_logprobs(name, batch, [r[1:] + r[:1] for r in batch], grad=True)
            loss = -sum(lp.sum() for lp in logps)
            loss.backward()

        fb([_tokens(32, vocab, 3)])  # warm-up
        opt.step()
        opt.zero_grad(set_to_none=True)
        check("train warm-up")
        batch = [_tokens(TRAIN_LEN, vocab, 20 + i) for i in range(TRAIN_ROWS)]
        t0 = time.perf_counter()
        fb(batch)
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        train = TRAIN_ROWS * TRAIN_LEN / max(t1 - t0, 1e-9)
        optim_s = t2 - t1
        check("train")

        ckpt_s = _time_checkpoint(rt, spec, name, opt, model)
    finally:
        rt.host.remove(name)
    check("checkpoint")

    request_s, prompt_rate, decode, context_s = _measure_decode(rt, vocab, check)

    details.update(
        prefill_rows=f"{PREFILL_ROWS} x {PREFILL_LEN}",
        train_rows=f"{TRAIN_ROWS} x {TRAIN_LEN}, LoRA r{TRAIN_RANK}",
        decode=(
            f"{DECODE_TOKENS} tokens per row after a {DECODE_PROMPT}-token prompt; "
            f"context: {CONTEXT_ROWS} rows on a {CONTEXT_PROMPT}-token prompt"
        ),
        fast_decode=getattr(rt, "decoder", None) is not None,
        packing=bool(getattr(rt, "packing", False)),
        gradient_checkpointing=bool(getattr(rt, "gradient_checkpointing", False)),
        parts_s=parts,
    )
    return SpeedProfile(
        key=profile_key(model or str(rt.model_dir), rt.plan, threads),
        prefill_tokens_per_s=prefill,
        train_tokens_per_s=train,
        optim_step_s=optim_s,
        decode_tokens_per_s=decode,
        request_s=request_s,
        prompt_tokens_per_s=prompt_rate,
        context_s_per_token=context_s,
        load_s=load_s,
        checkpoint_s=ckpt_s,
        measure_s=time.perf_counter() - started,
        measured_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
        details=details,
    )


def ensure_profile(
    base_model: str,
    plan: ComputePlan | None = None,
    *,
    threads: int | None = None,
    remeasure: bool = False,
    should_stop: Callable[[], bool] = lambda: False,
) -> SpeedProfile:
    """The cached profile for ``base_model`` on this machine, else measure it and save it.

    Sets torch's thread count as the service does (``configure_threads(threads)``), loads the
    base model (timed: the profile's ``load_s``), measures, saves. Raises
    :class:`MeasureStopped` if ``should_stop()`` turns true first (nothing is saved)."""
    from .compute import BaseRuntime
    from .models import ensure_model_dir

    plan = plan or choose_compute()
    used = hardware.configure_threads(threads)
    key = profile_key(base_model, plan, used)
    if not remeasure:
        cached = load_profile(key)
        if cached is not None:
            return cached
    ensure_model_dir(base_model)  # a first materialization is not the load a stage pays
    import transformers  # noqa: F401 - imported once per process; not part of the load

    if should_stop():
        raise MeasureStopped()

    def load_and_measure() -> SpeedProfile:
        t0 = time.perf_counter()
        runtime = BaseRuntime(base_model, plan)
        load_s = time.perf_counter() - t0
        try:
            return measure_profile(
                runtime, model=base_model, threads=used, load_s=load_s, should_stop=should_stop
            )
        finally:
            del runtime

    profile = _on_a_thread_of_its_own(load_and_measure)
    save_profile(profile)
    return profile


def _on_a_thread_of_its_own(fn: Callable[[], SpeedProfile]) -> SpeedProfile:
    """``fn()`` on a new thread that ends with it.

    Parallel torch work starts an OpenMP thread team for the thread that runs it, and the
    team lives as long as that thread. A team left in a pool thread (the app's thread
    workers) makes every later parallel operation of the service wait for wake-ups
    (one-sequence sampling: 35 tok/s after a measurement on a thread that ended, 21 after
    one on a pool thread that lives on).
    """
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    thread = threading.Thread(target=run, name="persona-speed-profile", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


__all__ = [
    "PROFILE_VERSION",
    "MeasureStopped",
    "ProfileKey",
    "SpeedProfile",
    "current_key",
    "ensure_profile",
    "expected_threads",
    "load_profile",
    "measure_profile",
    "nearest_profile",
    "profile_key",
    "save_profile",
    "speed_dir",
]
