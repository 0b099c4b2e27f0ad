"""An in-process service that speaks Tinker's client interface.

``LocalServiceClient`` → ``LocalTrainingClient`` / ``LocalSamplingClient`` mirror
``tinker.ServiceClient`` → ``TrainingClient`` / ``SamplingClient`` (tinker 0.38.0): same
method names and arguments, tinker's own types, and every method returns tinker's
awaitable future at once while the work runs on the service's worker thread.
"""

from __future__ import annotations

import contextlib
import math
import os
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import tinker
import torch
from tinker import types
from tinker.lib.public_interfaces.api_future import AwaitableConcurrentFuture

from . import checkpoint_io, memory
from .compute import BaseRuntime, GenResult, GenRow, make_generator
from .hardware import configure_threads
from .lora import LoraSpec, targets_for
from .losses import REQUIRED_INPUTS, SUPPORTED_LOSSES, datum_loss, gradient_positions
from .models import ComputePlan, choose_compute, ensure_model_dir
from .worker import MAX_BATCH_ROWS, Worker, deliver

LORA_ALPHA = 32.0  # fixed alpha, so the scale is alpha / rank as in Tinker's LoRA
DEFAULT_MAX_TOKENS = 512
# AdamW over the adapter's tensors with torch's multi-tensor ("foreach") implementation: the
# same numbers as the per-tensor loop, bit for bit. False restores the loop (bench A/B).
ADAM_FOREACH = True


class ClientFuture(AwaitableConcurrentFuture):
    """A future of a client that can also stand in for the client, as tinker's
    ``Backcompat*ClientFuture`` does (tinker-cookbook's DPO loop relies on it)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.result(), name)


def _done(value: Any) -> AwaitableConcurrentFuture:
    future: Future = Future()
    future.set_result(value)
    return AwaitableConcurrentFuture(future)


def _deprecated_async(name: str, *, awaits: bool = False) -> Callable[..., Any]:
    """tinker's deprecated ``<name>_async`` form of a method: a coroutine returning the method's
    future (``awaits=False``, as for training requests) or that future's result."""

    async def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = getattr(self, name)(*args, **kwargs)
        return await result if awaits else result

    method.__name__ = method.__qualname__ = f"{name}_async"
    return method


def default_checkpoint_dir() -> Path:
    env = os.environ.get("PERSONA_CHECKPOINT_DIR")
    return Path(env) if env else Path.home() / ".cache" / "persona" / "checkpoints"


class LocalServiceClient:
    """``tinker.ServiceClient`` computed in this process (PyTorch + LoRA)."""

    def __init__(
        self,
        checkpoint_dir: str | Path | None = None,
        *,
        device: str | None = None,
        dtype: str | None = None,
        threads: int | None = None,
        **_ignored: Any,  # api_key, base_url, ... accepted for drop-in use
    ) -> None:
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else default_checkpoint_dir()
        self._plan: ComputePlan = choose_compute(device, dtype)
        # torch's thread count is per process: from the cores free now (or as asked).
        self.threads = configure_threads(threads)
        self._worker = Worker()
        self._worker.submit(lambda: torch.set_num_threads(self.threads))
        self._runtimes: dict[str, BaseRuntime] = {}

    # ---- lifecycle ------------------------------------------------------------------

    def __enter__(self) -> LocalServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(
        self, status: str = "success", detail: str | None = None
    ) -> AwaitableConcurrentFuture:
        """Finish queued work, then free the models; later calls fail with a clear error.
        The future resolves once the memory is freed: a caller that awaits it (the runner,
        between stages) starts the next model only then."""
        try:
            self._worker.submit(self._runtimes.clear)
            # After the models go: the allocator would keep their pages, and the next
            # stage's service does not take all of them back (memory.py).
            released = self._worker.submit(memory.release_free_memory)
        except RuntimeError:  # already closed
            return _done(None)
        self._worker.close()
        return AwaitableConcurrentFuture(released)

    def run_on_compute_thread(self, fn: Callable[[], Any]) -> AwaitableConcurrentFuture:
        """Run ``fn`` (other torch work of this process, e.g. an embedding model) on the
        service's own compute thread, in turn with its requests.

        Each thread that runs parallel torch work starts its own OpenMP team; with more team
        threads than cores every parallel operation of every team pays a wake-up (a second
        team cut one-sequence sampling from about 27 to 17 tokens/s on 2 cores).
        """
        return self._submit(fn)

    # ---- internals ------------------------------------------------------------------

    def _submit(self, fn: Callable[[], Any]) -> AwaitableConcurrentFuture:
        return AwaitableConcurrentFuture(self._worker.submit(fn))

    def _runtime(self, base_model: str) -> BaseRuntime:
        """Load (once) the base model; runs on the worker thread."""
        key = str(ensure_model_dir(base_model))
        if key not in self._runtimes:
            self._runtimes[key] = BaseRuntime(base_model, self._plan)
        return self._runtimes[key]

    # ---- training clients -----------------------------------------------------------

    def create_lora_training_client(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
        user_metadata: dict[str, str] | None = None,
        optimizer: Any = None,
    ) -> ClientFuture:
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}.")
        spec = LoraSpec(rank, LORA_ALPHA, targets_for(train_mlp, train_attn, train_unembed))

        def build() -> LocalTrainingClient:
            rt = self._runtime(base_model)
            generator = torch.Generator().manual_seed(seed) if seed is not None else None
            client = LocalTrainingClient(self, rt, base_model, spec)
            rt.host.add(client.model_id, spec, generator)
            return client

        return ClientFuture(self._worker.submit(build))

    def create_training_client_from_state(
        self, path: str, base_model: str | None = None, user_metadata: Any = None, **_: Any
    ) -> ClientFuture:
        return self._from_state(path, base_model, with_optimizer=False)

    def create_training_client_from_state_with_optimizer(
        self, path: str, base_model: str | None = None, user_metadata: Any = None, **_: Any
    ) -> ClientFuture:
        return self._from_state(path, base_model, with_optimizer=True)

    def _from_state(self, path: str, base_model: str | None, with_optimizer: bool) -> ClientFuture:
        meta = checkpoint_io.read_meta(path)  # fails at once on a missing checkpoint

        def build() -> LocalTrainingClient:
            rt = self._runtime(base_model or meta["base_model"])
            spec = checkpoint_io.spec_from_meta(meta)
            client = LocalTrainingClient(self, rt, meta["base_model"], spec)
            rt.host.add(client.model_id, spec)
            client._load(path, with_optimizer)
            return client

        return ClientFuture(self._worker.submit(build))

    # ---- sampling clients -----------------------------------------------------------

    def create_sampling_client(
        self, model_path: str | None = None, base_model: str | None = None, **_: Any
    ) -> ClientFuture:
        if model_path is None and base_model is None:
            raise ValueError("create_sampling_client needs model_path or base_model.")
        if model_path is not None:
            meta = checkpoint_io.read_meta(model_path)

            def from_path() -> LocalSamplingClient:
                rt = self._runtime(base_model or meta["base_model"])
                name = f"sampler-{uuid.uuid4().hex[:8]}"
                rt.host.load_state_dict(
                    name, checkpoint_io.spec_from_meta(meta), checkpoint_io.read_adapter(model_path)
                )
                return LocalSamplingClient(self, rt, meta["base_model"], name, model_path)

            return ClientFuture(self._worker.submit(from_path))

        def from_base() -> LocalSamplingClient:
            rt = self._runtime(base_model)  # type: ignore[arg-type]
            return LocalSamplingClient(self, rt, base_model, None, None)  # type: ignore[arg-type]

        return ClientFuture(self._worker.submit(from_base))

    # ---- the rest of tinker's surface -------------------------------------------------

    def get_server_capabilities(self) -> types.GetServerCapabilitiesResponse:
        from .models import REGISTERED_MODELS

        return types.GetServerCapabilitiesResponse(
            supported_models=[types.SupportedModel(model_name=m) for m in REGISTERED_MODELS]
        )

    def create_rest_client(self) -> Any:
        raise NotImplementedError(
            "The local backend has no REST API; checkpoints are folders under "
            f"{self.checkpoint_dir}."
        )

    create_lora_training_client_async = _deprecated_async(
        "create_lora_training_client", awaits=True
    )
    create_training_client_from_state_async = _deprecated_async(
        "create_training_client_from_state", awaits=True
    )
    create_training_client_from_state_with_optimizer_async = _deprecated_async(
        "create_training_client_from_state_with_optimizer", awaits=True
    )
    create_sampling_client_async = _deprecated_async("create_sampling_client", awaits=True)


def _release_adapter(worker: Worker, rt: BaseRuntime, name: str) -> None:
    with contextlib.suppress(RuntimeError):  # a closed service has nothing left to free
        worker.submit(lambda: rt.host.remove(name))


def _tensor(td: Any) -> torch.Tensor:
    return td.to_torch() if isinstance(td, types.TensorData) else torch.as_tensor(td)


class LocalTrainingClient:
    """``tinker.TrainingClient`` on one LoRA adapter of a shared base model."""

    def __init__(
        self, service: LocalServiceClient, rt: BaseRuntime, base_model: str, spec: LoraSpec
    ):
        self.service = service
        self.model_id = f"local-{uuid.uuid4().hex[:12]}"
        self.base_model = base_model
        self._rt = rt
        self._spec = spec
        self._optimizer: torch.optim.AdamW | None = None
        self._step = 0

    # ---- forward / backward ---------------------------------------------------------

    def forward(
        self, data: list[types.Datum], loss_fn: str, loss_fn_config: Mapping[str, Any] | None = None
    ) -> AwaitableConcurrentFuture:
        prepared = self._prepare(data, loss_fn)
        return self.service._submit(
            lambda: self._run_loss(prepared, loss_fn, loss_fn_config, False)
        )

    def forward_backward(
        self, data: list[types.Datum], loss_fn: str, loss_fn_config: Mapping[str, Any] | None = None
    ) -> AwaitableConcurrentFuture:
        prepared = self._prepare(data, loss_fn)
        return self.service._submit(lambda: self._run_loss(prepared, loss_fn, loss_fn_config, True))

    def forward_backward_custom(
        self, data: list[types.Datum], loss_fn: Callable, *, loss_type_input: Any = None
    ) -> AwaitableConcurrentFuture:
        prepared = self._prepare(data, None)
        return self.service._submit(lambda: self._run_custom(data, prepared, loss_fn))

    def _prepare(self, data: Sequence[types.Datum], loss_fn: str | None) -> list[dict[str, Any]]:
        """Check a batch before it is queued; errors name the datum and the field."""
        if loss_fn is not None and loss_fn not in SUPPORTED_LOSSES:
            raise ValueError(
                f"Unsupported loss_fn {loss_fn!r}: the local backend supports "
                f"{', '.join(SUPPORTED_LOSSES)} (and forward_backward_custom)."
            )
        if not data:
            raise ValueError("Empty batch: forward/backward needs at least one Datum.")
        vocab = self._rt.vocab_size
        prepared = []
        for i, datum in enumerate(data):
            tokens = datum.model_input.to_ints()
            if not tokens:
                raise ValueError(f"Datum {i}: model_input is empty.")
            inputs = {k: _tensor(v) for k, v in datum.loss_fn_inputs.items()}
            if "target_tokens" not in inputs:
                raise ValueError(f"Datum {i}: loss_fn_inputs has no 'target_tokens'.")
            needed = REQUIRED_INPUTS.get(loss_fn, ()) if loss_fn else ()
            for key in needed:
                if key not in inputs:
                    raise ValueError(
                        f"Datum {i}: loss_fn {loss_fn!r} needs loss_fn_inputs[{key!r}]."
                    )
            for key, value in inputs.items():
                if value.shape[0] != len(tokens):
                    raise ValueError(
                        f"Datum {i}: loss_fn_inputs[{key!r}] has length {value.shape[0]} but "
                        f"model_input has {len(tokens)} tokens; they must match (position t "
                        f"predicts target_tokens[t])."
                    )
            targets = inputs["target_tokens"].tolist()
            bad = [t for t in tokens + targets if not 0 <= t < vocab]
            if bad:
                raise ValueError(
                    f"Datum {i}: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})."
                )
            inputs = {
                k: (v.long() if k == "target_tokens" else v.float()).to(self._rt.device)
                for k, v in inputs.items()
            }
            prepared.append({"tokens": tokens, "targets": targets, "inputs": inputs})
        return prepared

    def _microbatches(self, prepared: list[dict[str, Any]], grad: bool, loss_fn: str | None = None):
        """Logprobs per micro-batch. With a built-in loss, positions it sends no gradient to
        are left out of the backward pass's output layer."""
        live = None
        if grad and loss_fn is not None:
            live = [gradient_positions(loss_fn, p["inputs"]) for p in prepared]
        return self._rt.microbatched_logprobs(
            self.model_id,
            [p["tokens"] for p in prepared],
            [p["targets"] for p in prepared],
            grad=grad,
            live=live,
        )

    def _run_loss(self, prepared, loss_fn, config, backward: bool) -> types.ForwardBackwardOutput:
        outputs: list[dict[str, types.TensorData] | None] = [None] * len(prepared)
        total = 0.0
        for batch, logps in self._microbatches(prepared, backward, loss_fn):
            loss = sum(
                datum_loss(loss_fn, lp, prepared[i]["inputs"], config)
                for i, lp in zip(batch, logps, strict=True)
            )
            if backward:
                loss.backward()  # before the next micro-batch: only one graph is alive
            total += float(loss.detach())
            for i, lp in zip(batch, logps, strict=True):
                outputs[i] = {"logprobs": types.TensorData.from_torch(lp.detach().float().cpu())}
        return types.ForwardBackwardOutput(
            loss_fn_output_type=loss_fn, loss_fn_outputs=outputs, metrics={"loss:sum": total}
        )

    def _run_custom(self, data, prepared, loss_fn: Callable) -> types.ForwardBackwardOutput:
        logps: list[torch.Tensor | None] = [None] * len(prepared)
        for batch, got in self._microbatches(prepared, True):
            for i, lp in zip(batch, got, strict=True):
                logps[i] = lp
        loss, metrics = loss_fn(list(data), logps)
        loss.backward()
        outputs = [
            {"logprobs": types.TensorData.from_torch(lp.detach().float().cpu())} for lp in logps
        ]
        metrics = {k: float(v) for k, v in dict(metrics).items()}
        metrics.setdefault("loss:sum", float(loss.detach()))
        return types.ForwardBackwardOutput(
            loss_fn_output_type="custom", loss_fn_outputs=outputs, metrics=metrics
        )

    # ---- optimizer ------------------------------------------------------------------

    def optim_step(
        self,
        optim_params: types.AdamParams | None = None,
        *,
        adam_params: types.AdamParams | None = None,
    ) -> AwaitableConcurrentFuture:
        params = optim_params or adam_params
        if params is None:
            raise ValueError("optim_step needs AdamParams.")
        if not isinstance(params, types.AdamParams):
            raise ValueError(
                f"The local backend supports AdamParams only, got {type(params).__name__}."
            )
        return self.service._submit(lambda: self._optim_step(params))

    def _make_optimizer(self) -> torch.optim.AdamW:
        return torch.optim.AdamW(self._rt.host.parameters(self.model_id), lr=1e-4)

    def _clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> float:
        """The total norm of the parameters' gradients, which are clipped to ``max_norm``.
        Without a limit, only the norm: clipping would multiply every gradient by exactly 1."""
        if not params:
            return 0.0
        if math.isinf(max_norm):
            return float(torch.nn.utils.get_total_norm([q.grad for q in params]))
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def _optim_step(self, p: types.AdamParams) -> types.OptimStepResponse:
        if self._optimizer is None:
            self._optimizer = self._make_optimizer()
        for group in self._optimizer.param_groups:
            group.update(
                lr=p.learning_rate,
                betas=(p.beta1, p.beta2),
                eps=p.eps,
                weight_decay=p.weight_decay,
                # the per-tensor loop's arithmetic (same bits) in a few hundred fewer calls
                foreach=ADAM_FOREACH,
            )
        params = self._rt.host.parameters(self.model_id)
        max_norm = p.grad_clip_norm if p.grad_clip_norm and p.grad_clip_norm > 0 else float("inf")
        grad_norm = self._clip_grad_norm([q for q in params if q.grad is not None], max_norm)
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        self._step += 1
        # No "step" key: the cookbook's loops merge these metrics into their own step's row.
        return types.OptimStepResponse(metrics={"grad_norm": grad_norm})

    # ---- checkpoints ----------------------------------------------------------------

    def _meta(self, kind: str) -> dict[str, Any]:
        return {
            "kind": kind,
            "base_model": self.base_model,
            "model_dir": str(self._rt.model_dir),
            "rank": self._spec.rank,
            "alpha": self._spec.alpha,
            "targets": list(self._spec.targets),
            "step": self._step,
            "model_id": self.model_id,
        }

    def _folder(self, kind: str, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"Checkpoint name {name!r} must be a plain, non-empty name.")
        return self.service.checkpoint_dir / self.model_id / kind / name

    def save_state(
        self,
        name: str,
        ttl_seconds: int | None = None,
        overwrite: bool = False,
        user_metadata: Any = None,
    ) -> AwaitableConcurrentFuture:
        folder = self._folder("weights", name)

        def save() -> types.SaveWeightsResponse:
            checkpoint_io.write(
                folder,
                meta=self._meta("state"),
                adapter=self._rt.host.state_dict(self.model_id),
                optimizer_state=self._optimizer.state_dict() if self._optimizer else None,
                overwrite=overwrite,
            )
            return types.SaveWeightsResponse(path=checkpoint_io.to_uri(folder))

        return self.service._submit(save)

    def save_weights_for_sampler(
        self, name: str, ttl_seconds: int | None = None, user_metadata: Any = None
    ) -> AwaitableConcurrentFuture:
        folder = self._folder("sampler_weights", name)

        def save() -> types.SaveWeightsForSamplerResponse:
            checkpoint_io.write(
                folder,
                meta=self._meta("sampler"),
                adapter=self._rt.host.state_dict(self.model_id),
                optimizer_state=None,
                overwrite=True,
            )
            return types.SaveWeightsForSamplerResponse(path=checkpoint_io.to_uri(folder))

        return self.service._submit(save)

    def load_state(self, path: str) -> AwaitableConcurrentFuture:
        checkpoint_io.resolve(path)
        return self.service._submit(lambda: self._load(path, with_optimizer=False))

    def load_state_with_optimizer(self, path: str) -> AwaitableConcurrentFuture:
        checkpoint_io.resolve(path)
        return self.service._submit(lambda: self._load(path, with_optimizer=True))

    def _load(self, path: str, with_optimizer: bool) -> types.LoadWeightsResponse:
        meta = checkpoint_io.read_meta(path)
        spec = checkpoint_io.spec_from_meta(meta)
        if spec != self._spec:
            raise ValueError(f"Checkpoint {path} has LoRA {spec}, this client has {self._spec}.")
        self._rt.host.load_state_dict(self.model_id, spec, checkpoint_io.read_adapter(path))
        self._optimizer = None
        if with_optimizer:
            state = checkpoint_io.read_optimizer(path)
            if state is not None:
                self._optimizer = self._make_optimizer()
                self._optimizer.load_state_dict(state)
            self._step = int(meta.get("step", 0))
        return types.LoadWeightsResponse(path=path, model_id=self.model_id)

    # ---- sampling from this client --------------------------------------------------

    def save_weights_and_get_sampling_client(
        self, name: str | None = None, **_: Any
    ) -> ClientFuture:
        def snapshot() -> LocalSamplingClient:
            snap = f"snapshot-{uuid.uuid4().hex[:8]}"
            self._rt.host.clone(self.model_id, snap)
            return LocalSamplingClient(self.service, self._rt, self.base_model, snap, None)

        return ClientFuture(self.service._worker.submit(snapshot))

    def create_sampling_client(self, model_path: str, **_: Any) -> ClientFuture:
        return self.service.create_sampling_client(model_path=model_path)

    # ---- info -----------------------------------------------------------------------

    def get_tokenizer(self) -> Any:
        return self._rt.tokenizer

    def get_info(self) -> types.GetInfoResponse:
        return types.GetInfoResponse(
            model_data=types.ModelData(
                arch=type(self._rt.model).__name__,
                model_name=self.base_model,
                tokenizer_id=str(self._rt.model_dir),
            ),
            model_id=self.model_id,
            optimizer_config=types.AdamOptimizerConfig(),
            is_lora=True,
            lora_rank=self._spec.rank,
            model_name=self.base_model,
        )

    # ---- the deprecated *_async forms tinker-cookbook still calls ---------------------
    # Training requests' forms return the future; the others return the result.

    forward_async = _deprecated_async("forward")
    forward_backward_async = _deprecated_async("forward_backward")
    forward_backward_custom_async = _deprecated_async("forward_backward_custom")
    optim_step_async = _deprecated_async("optim_step")
    save_state_async = _deprecated_async("save_state")
    save_weights_for_sampler_async = _deprecated_async("save_weights_for_sampler")
    load_state_async = _deprecated_async("load_state")
    load_state_with_optimizer_async = _deprecated_async("load_state_with_optimizer")
    save_weights_and_get_sampling_client_async = _deprecated_async(
        "save_weights_and_get_sampling_client", awaits=True
    )
    create_sampling_client_async = _deprecated_async("create_sampling_client", awaits=True)
    get_info_async = _deprecated_async("get_info")


def _stops(stop: Any, tokenizer: Any) -> tuple[frozenset[int], tuple[str, ...]]:
    if stop is None:
        return frozenset(), ()
    if isinstance(stop, str):
        return frozenset(), (stop,)
    items = list(stop)
    if all(isinstance(s, int) for s in items):
        return frozenset(items), ()
    if all(isinstance(s, str) for s in items):
        return frozenset(), tuple(items)
    raise ValueError(
        "SamplingParams.stop must be a string, a list of strings or a list of token ids."
    )


class LocalSamplingClient:
    """``tinker.SamplingClient`` over the base model or a frozen adapter."""

    def __init__(
        self,
        service: LocalServiceClient,
        rt: BaseRuntime,
        base_model: str,
        adapter: str | None,
        model_path: str | None,
    ) -> None:
        self.service = service
        self.base_model = base_model
        self.model_path = model_path
        self._rt = rt
        self._adapter = adapter
        if adapter is not None:
            weakref.finalize(self, _release_adapter, service._worker, rt, adapter)

    def sample(
        self,
        prompt: types.ModelInput,
        num_samples: int,
        sampling_params: types.SamplingParams,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
        **unsupported: Any,
    ) -> AwaitableConcurrentFuture:
        used = [k for k, v in unsupported.items() if v not in (None, 0, False)]
        if used or topk_prompt_logprobs:
            raise NotImplementedError(
                f"The local backend does not support {', '.join(used) or 'topk_prompt_logprobs'}."
            )
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}.")
        tokens = prompt.to_ints()
        if not tokens:
            raise ValueError("The prompt is empty.")
        p = sampling_params
        room = self._rt.max_positions - len(tokens)
        if room <= 0:
            raise ValueError(
                f"The prompt has {len(tokens)} tokens; this model reads at most {self._rt.max_positions}."
            )
        max_tokens = min(p.max_tokens if p.max_tokens is not None else DEFAULT_MAX_TOKENS, room)
        stop_ids, stop_strings = _stops(p.stop, self._rt.tokenizer)
        if self._rt.eos_id is not None:
            stop_ids = stop_ids | {int(self._rt.eos_id)}
        generator = make_generator(p.seed)
        rows = [
            GenRow(
                tokens,
                max_tokens,
                p.temperature,
                p.top_p,
                p.top_k,
                stop_ids,
                stop_strings,
                generator,
            )
            for _ in range(num_samples)
        ]
        key = (id(self._rt), self._adapter, p.temperature, p.top_p, p.top_k)
        adapter = self._adapter

        def finish(results: list[GenResult]) -> types.SampleResponse:
            prompt_logprobs = None
            if include_prompt_logprobs:
                prompt_logprobs = np.array(
                    [np.nan] + [x for x in self._logprobs(tokens)[1:]], dtype=np.float32
                )
            return types.SampleResponse(
                sequences=[
                    types.SampledSequence(
                        stop_reason=r.stop_reason,
                        sequence_id=uuid.uuid4().hex,
                        tokens_np=np.array(r.tokens, dtype=np.int64),
                        logprobs_np=np.array(r.logprobs, dtype=np.float32),
                    )
                    for r in results
                ],
                prompt_logprobs_np=prompt_logprobs,
            )

        rt = self._rt

        def stream(samples: list, poll: Callable[[int], list]) -> None:
            def request(s: Any) -> tuple:
                return (s.rows, lambda results: deliver(s, results), s.future.cancelled)

            rt.generate_stream(
                adapter,
                [request(s) for s in samples],
                lambda room: [request(s) for s in poll(room)],
                MAX_BATCH_ROWS,
            )

        future = self.service._worker.submit_sample(
            key, rows, lambda all_rows: rt.generate(adapter, all_rows), finish, stream
        )
        return AwaitableConcurrentFuture(future)

    def _logprobs(self, tokens: list[int]) -> list[float | None]:
        return self._batch_logprobs([tokens])[0]

    def _batch_logprobs(self, rows: list[list[int]]) -> list[list[float | None]]:
        """[None, log p(t1 | t0), ...] for each row (see ``BaseRuntime.score_rows``)."""
        return self._rt.score_rows(self._adapter, rows)

    def compute_logprobs(
        self, prompt: types.ModelInput, prompt_logprobs_last_n: int | None = None
    ) -> AwaitableConcurrentFuture:
        """Queued like a sample: concurrent requests on one model run as one batch."""
        tokens = prompt.to_ints()
        if not tokens:
            raise ValueError("The prompt is empty.")

        def finish(results: list[list[float | None]]) -> list[float | None]:
            values = results[0]
            if prompt_logprobs_last_n is not None:
                cut = len(values) - prompt_logprobs_last_n
                values = [None] * cut + values[cut:]
            return values

        key = ("logprobs", id(self._rt), self._adapter)
        future = self.service._worker.submit_sample(key, [tokens], self._batch_logprobs, finish)
        return AwaitableConcurrentFuture(future)

    def get_tokenizer(self) -> Any:
        return self._rt.tokenizer

    def get_base_model(self) -> str:
        return self.base_model

    sample_async = _deprecated_async("sample", awaits=True)
    compute_logprobs_async = _deprecated_async("compute_logprobs", awaits=True)


__all__ = ["LocalServiceClient", "LocalTrainingClient", "LocalSamplingClient", "tinker"]
