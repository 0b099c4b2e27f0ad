"""The local service's arithmetic: one base model, LoRA adapters, logprobs and generation.

Everything here runs on the service's worker thread; nothing here knows about futures.
"""

from __future__ import annotations

import contextvars
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import decode, mlp, norms, rotary
from .lora import LoraHost, LoraLinear
from .models import ComputePlan, choose_compute, ensure_model_dir

# Micro-batches for training are cut to about this many (padded) tokens, so memory stays
# flat however large the batch a caller sends.
TRAIN_TOKENS_PER_MICROBATCH = 2048

# Gradient checkpointing recomputes each layer's forward during backward: with a frozen
# base (LoRA) that is about a third of a training step. It is used only when a full
# micro-batch's activations would exceed this budget. Measured on SmolLM2-135M in bf16 at
# 2048 tokens: about 37 bytes of saved activations per token x layer x hidden unit (peak
# RSS 3.5 GB without checkpointing, 2.3 GB with it, step 1.5x faster without).
# PERSONA_GRADIENT_CHECKPOINTING=1/0 forces it on/off.
ACTIVATION_BUDGET_BYTES = 3 * 2**30
_ACTIVATION_BYTES_PER_UNIT = 20  # x dtype size, per token x layer x hidden unit


def _want_checkpointing(config, dtype: torch.dtype) -> bool:  # noqa: ANN001
    forced = os.environ.get("PERSONA_GRADIENT_CHECKPOINTING")
    if forced:
        return forced.lower() not in ("0", "false", "no", "off")
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    if not layers or not hidden:
        return True
    per_unit = _ACTIVATION_BYTES_PER_UNIT * torch.empty((), dtype=dtype).element_size()
    return TRAIN_TOKENS_PER_MICROBATCH * layers * hidden * per_unit > ACTIVATION_BUDGET_BYTES


def token_budget_packs(
    lengths: Sequence[int], budget: int = TRAIN_TOKENS_PER_MICROBATCH
) -> list[list[int]]:
    """Row indices cut, in order, into packs of at most ``budget`` tokens (no padding)."""
    packs: list[list[int]] = []
    total = 0
    for i, n in enumerate(lengths):
        if packs and total + n <= budget:
            packs[-1].append(i)
            total += n
        else:
            packs.append([i])
            total = n
    return packs


# Packed rows: the lengths of the sequences laid end to end in the one row being computed.
# The attention below runs causal attention within each, and never across them.
_SEGMENTS: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "persona_segments", default=None
)
PACKED_ATTENTION = "persona_packed_sdpa"


def _packed_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):  # noqa: ANN001, ANN003, ANN201, E501
    """transformers' SDPA attention, or per-segment causal SDPA for a packed row."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    segments = _SEGMENTS.get()
    if segments is None:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    gqa = key.shape[1] != query.shape[1]
    outs, start = [], 0
    for n in segments:
        part = slice(start, start + n)
        outs.append(
            torch.nn.functional.scaled_dot_product_attention(
                query[:, :, part],
                key[:, :, part],
                value[:, :, part],
                is_causal=True,
                scale=scaling,
                enable_gqa=gqa,
            )
        )
        start += n
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def _use_packed_attention(model) -> bool:  # noqa: ANN001
    """Route the model's attention through ``_packed_attention`` (same numbers when unpacked)."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(PACKED_ATTENTION, _packed_attention)
        AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)
        model.set_attn_implementation(PACKED_ATTENTION)
    except (ImportError, ValueError, AttributeError, KeyError, TypeError):
        return False
    return model.config._attn_implementation == PACKED_ATTENTION


def token_budget_batches(
    lengths: Sequence[int], budget: int = TRAIN_TOKENS_PER_MICROBATCH
) -> list[list[int]]:
    """Row indices, shortest first, cut so each padded batch holds about ``budget`` tokens."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda j: lengths[j]):
        if batches and lengths[i] * (len(batches[-1]) + 1) <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


class BaseRuntime:
    """A loaded base model with its LoRA slots, its tokenizer and where it computes."""

    def __init__(self, base_model: str, plan: ComputePlan | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_dir: Path = ensure_model_dir(base_model)
        self.plan = plan or choose_compute()
        self.device = torch.device(self.plan.device)
        self.dtype = getattr(torch, self.plan.dtype_name)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=self.dtype)
        model.to(self.device)
        model.eval()
        model.config.use_cache = True
        self.gradient_checkpointing = _want_checkpointing(model.config, self.dtype)
        if self.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        norms.install(model)
        rotary.install(model)
        mlp.install(model)
        self.model = model
        self.host = LoraHost(model)
        # Rows of different lengths are packed end to end (no padding) where the model's
        # attention can be told where each row starts; gradient checkpointing's recompute
        # would run outside that context, so it keeps the padded batches.
        self.packing = (
            not self.gradient_checkpointing
            and os.environ.get("PERSONA_PACKING", "1") != "0"
            and _use_packed_attention(model)
        )
        self.pad_id = self._pad_id()
        self.eos_id = self.tokenizer.eos_token_id
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
        self.decoder = (
            decode.SlotDecoder(model, self._decode_text)
            if decode.supports(model) and os.environ.get("PERSONA_FAST_DECODE", "1") != "0"
            else None
        )

    def _decode_text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=False)

    def _pad_id(self) -> int:
        for candidate in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, 0):
            if candidate is not None:
                return int(candidate)
        return 0

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    # ---- logprobs -------------------------------------------------------------------

    def token_logprobs(
        self,
        adapter: str | None,
        inputs: list[list[int]],
        targets: list[list[int]],
        *,
        grad: bool,
        live: list[list[bool]] | None = None,
    ) -> list[torch.Tensor]:
        """log p(targets[i][t] | inputs[i][:t+1]) for each row, float32, one tensor per row.

        The output layer runs a block of positions at a time (``_HeadTargetLogprob``), and its
        backward pass skips the positions no gradient reaches (weight or advantage 0: the
        prompt of an SFT row, all but the verdict of a judge's). With ``CHUNKED_HEAD`` off,
        ``live[i][t]`` False says that of a position ahead of time: its logits are computed
        outside the graph, so the output layer's backward skips it.
        """
        self.host.switch.active = adapter
        lengths = [len(row) for row in inputs]
        head = self.model.get_output_embeddings()
        chunked = head_weights(head) if CHUNKED_HEAD else None
        split = chunked is None and grad and live is not None and not all(all(row) for row in live)
        self.model.train(grad)  # gradient checkpointing is active only in train mode
        try:
            with torch.set_grad_enabled(grad):
                hidden, starts = self._hidden(inputs)
                tgt = torch.zeros(hidden.shape[0], dtype=torch.long)
                for start, row in zip(starts, targets, strict=True):
                    tgt[start : start + len(row)] = torch.tensor(row, dtype=torch.long)
                tgt = tgt.to(self.device)
                if chunked is not None:
                    logp = head_target_logprobs(chunked, hidden, tgt)
                elif split:
                    keep = torch.zeros(hidden.shape[0], dtype=torch.bool)
                    for start, row in zip(starts, live or [], strict=True):
                        keep[start : start + len(row)] = torch.tensor(row, dtype=torch.bool)
                    at = keep.nonzero().squeeze(1).to(self.device)
                    rest = (~keep).nonzero().squeeze(1).to(self.device)
                    with torch.no_grad():
                        fixed = _TargetLogprob.apply(head(hidden[rest]), tgt[rest])
                    picked = _TargetLogprob.apply(head(hidden[at]), tgt[at])
                    logp = torch.zeros(hidden.shape[0], device=self.device)
                    logp = logp.index_put((rest,), fixed).index_put((at,), picked)
                else:
                    logp = _TargetLogprob.apply(head(hidden), tgt)
        finally:
            self.model.eval()
        return [logp[s : s + n] for s, n in zip(starts, lengths, strict=True)]

    def _logits(self, inputs: list[list[int]]) -> tuple[torch.Tensor, list[int]]:
        """The model's logits for every position of every row, (positions, vocab), and where
        each row starts in it (see ``_hidden``)."""
        hidden, starts = self._hidden(inputs)
        return self.model.get_output_embeddings()(hidden), starts

    def _hidden(self, inputs: list[list[int]]) -> tuple[torch.Tensor, list[int]]:
        """The last hidden state for every position of every row, (positions, hidden), and
        where each row starts in it. Rows of different lengths are laid end to end in one row
        when the attention can be told where each starts (no padding); otherwise they are
        padded to the longest, and the padding's positions are in the tensor too."""
        decoder = self.model.get_decoder()
        lengths = [len(row) for row in inputs]
        if self.packing and len(set(lengths)) > 1:
            ids = torch.tensor([[t for row in inputs for t in row]], dtype=torch.long)
            positions = torch.cat([torch.arange(n) for n in lengths])[None]
            token = _SEGMENTS.set(lengths)
            try:
                out = decoder(
                    input_ids=ids.to(self.device),
                    position_ids=positions.to(self.device),
                    use_cache=False,
                )
            finally:
                _SEGMENTS.reset(token)
            starts = [0]
            for n in lengths[:-1]:
                starts.append(starts[-1] + n)
            return out.last_hidden_state[0], starts
        width = max(lengths)
        ids = torch.full((len(inputs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(inputs), width), dtype=torch.long)
        for i, row in enumerate(inputs):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        hidden = decoder(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False
        ).last_hidden_state
        return hidden.reshape(-1, hidden.shape[-1]), [i * width for i in range(len(inputs))]

    @torch.no_grad()
    def score_rows(self, adapter: str | None, rows: list[list[int]]) -> list[list[float | None]]:
        """[None, log p(t1 | t0), ...] for each row, in micro-batches of similar length.

        Rows that differ only in their last token (a judge scoring "[RESULT] A" against
        "[RESULT] B") share one forward pass: the last position's logits score each choice.
        """
        out: list[list[float | None]] = [[None] * len(r) for r in rows]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, row in enumerate(rows):
            if len(row) > 1:
                groups.setdefault(tuple(row[:-1]), []).append(i)
        keys = list(groups)
        self.host.switch.active = adapter
        cut = token_budget_packs if self.packing else token_budget_batches
        head = head_weights(self.model.get_output_embeddings()) if CHUNKED_HEAD else None
        for batch in cut([len(k) for k in keys]):
            if head is None:
                logits, starts = self._logits([list(keys[j]) for j in batch])
            else:
                hidden, starts = self._hidden([list(keys[j]) for j in batch])
            at: list[int] = []  # the logits row each value is read from
            tgt: list[int] = []
            for j, start in zip(batch, starts, strict=True):
                n = len(keys[j])
                members = groups[keys[j]]
                at.extend(range(start, start + n - 1))
                tgt.extend(rows[members[0]][1:-1])
                at.extend([start + n - 1] * len(members))
                tgt.extend(rows[i][-1] for i in members)
            at_t, tgt_t = torch.tensor(at), torch.tensor(tgt)
            if head is None:
                values = _picked_logprobs(logits, at_t, tgt_t).tolist()
            else:
                at_t, tgt_t = at_t.to(self.device), tgt_t.to(self.device)
                values = head_target_logprobs(head, hidden[at_t], tgt_t).tolist()
            k = 0
            for j in batch:
                n = len(keys[j])
                members = groups[keys[j]]
                shared = values[k : k + n - 1]
                last = values[k + n - 1 : k + n - 1 + len(members)]
                k += n - 1 + len(members)
                for i, lp in zip(members, last, strict=True):
                    out[i] = [None, *shared, lp]
        return out

    def microbatched_logprobs(
        self,
        adapter: str | None,
        inputs: list[list[int]],
        targets: list[list[int]],
        *,
        grad: bool,
        live: list[list[bool]] | None = None,
    ) -> Iterator[tuple[list[int], list[torch.Tensor]]]:
        """``token_logprobs`` in micro-batches of similar length: (row indices, their logprobs).

        A caller that trains can backpropagate each micro-batch before the next is computed.
        """
        lengths = [len(row) for row in inputs]
        cut = token_budget_packs if self.packing else token_budget_batches
        for batch in cut(lengths):
            yield (
                batch,
                self.token_logprobs(
                    adapter,
                    [inputs[i] for i in batch],
                    [targets[i] for i in batch],
                    grad=grad,
                    live=None if live is None else [live[i] for i in batch],
                ),
            )

    # ---- generation -----------------------------------------------------------------

    def generate(self, adapter: str | None, rows: list[GenRow]) -> list[GenResult]:
        """Sample every row in one batched pass; results aligned with ``rows``.

        Consecutive rows with the same prompt and generator are one request (prefilled once).
        Rows must share temperature, top_p and top_k.
        """
        if self.decoder is None:
            return self._generate_hf(adapter, rows)
        groups: list[list[GenRow]] = []
        for r in rows:
            if (
                groups
                and groups[-1][0].generator is r.generator
                and groups[-1][0].prompt == r.prompt
            ):
                groups[-1].append(r)
            else:
                groups.append([r])
        results: dict[int, list[GenResult]] = {}
        requests = [
            self._decode_request(g, lambda out, i=i: results.__setitem__(i, out))
            for i, g in enumerate(groups)
        ]
        self.host.switch.active = adapter
        self.decoder.run(requests, self._sampling_fn(rows[0]))
        return [res for i in range(len(groups)) for res in results[i]]

    def generate_stream(
        self,
        adapter: str | None,
        requests: list[tuple[list[GenRow], Callable[[list[GenResult]], None], Callable[[], bool]]],
        poll: Callable[[int], list[tuple[list[GenRow], Callable, Callable]]],
        max_rows: int,
    ) -> None:
        """Continuous batching: run ``requests`` (rows, on_done, cancelled); between decode steps
        ``poll(free_rows)`` hands in more. Each request's ``on_done`` is called as soon as its
        own rows finish; a request whose ``cancelled()`` turns true is dropped."""
        if self.decoder is None:
            while requests:
                live = [r for r in requests if not r[2]()]
                if live:
                    results = self._generate_hf(
                        adapter, [row for rows, _, _ in live for row in rows]
                    )
                    start = 0
                    for rows, on_done, _ in live:
                        on_done(results[start : start + len(rows)])
                        start += len(rows)
                requests = poll(max_rows)
            return
        self.host.switch.active = adapter
        self.decoder.run(
            [self._decode_request(*r) for r in requests],
            self._sampling_fn(requests[0][0][0]),
            poll=lambda room: [self._decode_request(*r) for r in poll(room)],
            max_slots=max_rows,
        )

    @staticmethod
    def _sampling_fn(row: GenRow) -> decode.SamplingSpec:
        return decode.SamplingSpec(row.temperature, row.top_p, row.top_k)

    @staticmethod
    def _decode_request(
        rows: list[GenRow],
        on_done: Callable[[list[GenResult]], None],
        cancelled: Callable[[], bool] = lambda: False,
    ) -> decode.DecodeRequest:
        first = rows[0]
        return decode.DecodeRequest(
            prompt=first.prompt,
            rows=len(rows),
            max_tokens=first.max_tokens,
            stop_ids=first.stop_ids,
            stop_strings=first.stop_strings,
            generator=first.generator,
            on_done=lambda out: on_done([GenResult(t, lp, reason) for t, lp, reason in out]),
            cancelled=cancelled,
        )

    @torch.no_grad()
    def _generate_hf(self, adapter: str | None, rows: list[GenRow]) -> list[GenResult]:
        """Sample every row in one batched, KV-cached pass (left-padded prompts).

        Rows may come from different requests; they must share temperature, top_p and top_k.
        Each row draws from its own request's generator, so a seeded request gives the same
        tokens whatever else shares the batch.
        """
        from transformers import DynamicCache

        self.host.switch.active = adapter
        spec = self._sampling_fn(rows[0])
        n = len(rows)
        width = max(len(r.prompt) for r in rows)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r.prompt) :] = torch.tensor(r.prompt, dtype=torch.long)
            mask[i, width - len(r.prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        out_tokens: list[list[int]] = [[] for _ in rows]
        out_logprobs: list[list[float]] = [[] for _ in rows]
        stop_reason = ["length"] * n
        done = [r.max_tokens <= 0 for r in rows]
        steps = max(r.max_tokens for r in rows)
        step_input, step_pos = ids, positions
        for _ in range(steps):
            if all(done):
                break
            logits = (
                self.model(
                    input_ids=step_input,
                    attention_mask=mask,
                    position_ids=step_pos,
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=1,  # the prefill needs the last position's logits only
                )
                .logits[:, -1, :]
                .float()
            )
            # The fast decoder's draw, on the rows still running: each draws from its own
            # request's generator, so a finished row takes nothing from a shared one.
            live = [i for i in range(n) if not done[i]]
            u = None
            if spec.temperature > 0:
                u = torch.cat([torch.rand(1, generator=rows[i].generator) for i in live])
                u = u.to(self.device)

            def more(idx: torch.Tensor, live: list[int] = live) -> torch.Tensor:
                return torch.cat(
                    [torch.rand(1, generator=rows[live[j]].generator) for j in idx.tolist()]
                )

            picked_ids, picked_logp = decode.draw(logits[live], u, spec, more)
            next_ids = torch.full((n,), self.pad_id, dtype=torch.long)
            chosen_logp = [0.0] * n
            # One device-to-host copy per step, not one per row (matters on a GPU).
            for i, tok, lp in zip(
                live, picked_ids.cpu().tolist(), picked_logp.cpu().tolist(), strict=True
            ):
                next_ids[i], chosen_logp[i] = tok, lp
            for i, r in enumerate(rows):
                if done[i]:
                    continue
                tok = int(next_ids[i])
                out_tokens[i].append(tok)
                out_logprobs[i].append(chosen_logp[i])
                if tok in r.stop_ids or self._hit_stop_string(out_tokens[i], r.stop_strings):
                    done[i], stop_reason[i] = True, "stop"
                elif len(out_tokens[i]) >= r.max_tokens:
                    done[i] = True
            step_input = next_ids.unsqueeze(1).to(self.device)
            step_pos = step_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=self.device)], 1)
        return [
            GenResult(tokens=out_tokens[i], logprobs=out_logprobs[i], stop_reason=stop_reason[i])
            for i in range(n)
        ]

    def _hit_stop_string(self, tokens: list[int], stops: tuple[str, ...]) -> bool:
        if not stops:
            return False
        span = max(len(s) for s in stops) + 1  # a string of c chars spans at most c tokens
        tail = self.tokenizer.decode(tokens[-span:], skip_special_tokens=False)
        return any(s in tail for s in stops)


# Rows of logits turned into float32 at a time by _TargetLogprob: small enough to stay in
# cache (16 x 49k vocab x 4 B = 3 MB), large enough to amortize the per-chunk dispatch.
LOGPROB_CHUNK_ROWS = 16

# True: the output layer and the log-softmax run a block of positions at a time, forward
# and backward (``_HeadTargetLogprob``): the (positions x vocab) logits and their gradient
# never exist whole (2,048 x 49,152 for SmolLM2: 200 MB each in bf16). Same numbers as the
# full logits (tests/test_chunked_head.py). Off: not shown faster yet. On the 2-core AMX
# Xeon, measured only while the machine was loaded, it was slower than the full logits (one
# more output-layer matmul in backward); the bench's training A/B measures both.
CHUNKED_HEAD = False
HEAD_CHUNK_ROWS = 256
# Within a block: the fused (log-)softmax kernels, this many rows at a time, instead of
# logsumexp's separate passes (False: the full-logits path's own arithmetic, for A/B).
FUSED_SOFTMAX = True
SOFTMAX_ROWS = 16
# Keep each block's logits for the backward pass instead of computing them again: the
# memory of the full logits, one output-layer matmul less.
HEAD_KEEP_LOGITS = False


def _wide(dtype: torch.dtype) -> torch.dtype:
    """Where the log-softmax is computed: float32 (float64 for float64 logits)."""
    return torch.promote_types(dtype, torch.float32)


def _logsumexp_rows(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp of each row in float32, a few rows at a time (no float32 copy of them all)."""
    wide = _wide(logits.dtype)
    lse = torch.empty(logits.shape[0], dtype=wide, device=logits.device)
    for start in range(0, logits.shape[0], LOGPROB_CHUNK_ROWS):
        rows = slice(start, start + LOGPROB_CHUNK_ROWS)
        lse[rows] = torch.logsumexp(logits[rows].to(wide), dim=-1)
    return lse


def _logit_grad(
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """grad[r] * d log_softmax(logits[r])[target[r]] / d logits[r], in the logits' dtype,
    computed in float32 a few rows at a time: grad * (onehot(target) - softmax(logits)).
    ``out`` may be ``logits`` itself: each block is read before it is written."""
    out = torch.empty_like(logits) if out is None else out
    for start in range(0, logits.shape[0], LOGPROB_CHUNK_ROWS):
        rows = slice(start, start + LOGPROB_CHUNK_ROWS)
        g = grad[rows].unsqueeze(-1)
        # The subtraction promotes the logits to float32 itself: no separate copy.
        part = torch.sub(logits[rows], lse[rows].unsqueeze(-1)).exp_().mul_(-g)
        part.scatter_add_(-1, target[rows].unsqueeze(-1), g)
        out[rows] = part
    return out


def _picked_log_softmax(
    logits: torch.Tensor, target: torch.Tensor, rows_at_once: int
) -> torch.Tensor:
    """log_softmax(logits[r])[target[r]] per row, in float32, by the fused log-softmax kernel a
    few rows at a time (one pass over the logits instead of logsumexp's five)."""
    out = torch.empty(logits.shape[0], dtype=_wide(logits.dtype), device=logits.device)
    for start in range(0, logits.shape[0], rows_at_once):
        rows = slice(start, start + rows_at_once)
        logp = torch.log_softmax(logits[rows], -1, dtype=out.dtype)
        out[rows] = logp.gather(-1, target[rows].unsqueeze(-1)).squeeze(-1)
    return out


def _softmax_grad(
    logits: torch.Tensor, target: torch.Tensor, grad: torch.Tensor, rows_at_once: int
) -> torch.Tensor:
    """``_logit_grad`` by the fused softmax kernel: grad * (onehot(target) - softmax)."""
    out = torch.empty_like(logits)
    for start in range(0, logits.shape[0], rows_at_once):
        rows = slice(start, start + rows_at_once)
        g = grad[rows].unsqueeze(-1)
        part = torch.softmax(logits[rows], -1, dtype=grad.dtype).mul_(-g)
        part.scatter_add_(-1, target[rows].unsqueeze(-1), g)
        out[rows] = part
    return out


def _picked_logprobs(logits: torch.Tensor, at: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits[at[k]])[target[k]] for each k, as _TargetLogprob computes it, reading
    only the rows asked for (a row may be asked for more than once)."""
    at, target = at.to(logits.device), target.to(logits.device)
    lse = torch.empty(at.shape[0], dtype=torch.float32, device=logits.device)
    for start in range(0, at.shape[0], LOGPROB_CHUNK_ROWS):
        part = slice(start, start + LOGPROB_CHUNK_ROWS)
        lse[part] = torch.logsumexp(logits[at[part]].float(), dim=-1)
    return logits[at, target].float() - lse


class _TargetLogprob(torch.autograd.Function):
    """log_softmax(logits)[target] per row, in float32, without a float32 copy of the logits.

    Same numbers as ``-cross_entropy(logits.float(), target, reduction="none")``, but the
    float32 log-softmax is computed a few rows at a time, forward and backward: only the
    model's (bf16) logits and one float per row are kept for the backward pass, instead of
    two full float32 (tokens x vocab) tensors.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        lse = _logsumexp_rows(logits)
        picked = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1).float()
        ctx.save_for_backward(logits, target, lse)
        return picked - lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        logits, target, lse = ctx.saved_tensors
        # The logits serve this backward only: their gradient overwrites them instead of
        # taking another (tokens x vocab) tensor (200 MB in bf16 at 2,048 tokens, and its page
        # faults).
        return _logit_grad(logits, target, lse, grad.float(), out=logits), None


@dataclass(frozen=True)
class HeadWeights:
    """The output layer as the active adapter applies it: x W^T + bias + scale (x A^T) B^T."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    lora_a: torch.Tensor | None = None
    lora_b: torch.Tensor | None = None
    scale: float = 1.0


def head_weights(head: torch.nn.Module) -> HeadWeights | None:
    """The output layer's weights (with the active adapter's, where it has some), or None for
    a layer that is not a plain (LoRA-wrapped) linear layer."""
    adapter = None
    if isinstance(head, LoraLinear):
        adapter, head = head, head.base
    if type(head) is not torch.nn.Linear:
        return None
    name = adapter.switch.active if adapter is not None else None
    if adapter is None or name is None or name not in adapter.lora_A:
        return HeadWeights(head.weight, head.bias)
    return HeadWeights(
        head.weight, head.bias, adapter.lora_A[name], adapter.lora_B[name], adapter.scales[name]
    )


def head_block_logits(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    z: torch.Tensor | None,
    b: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """One block of logits, x W^T + bias (+ scale z B^T with z = x A^T): the same products
    LoraLinear computes for these rows."""
    out = torch.nn.functional.linear(x, weight, bias)
    if z is not None:
        out.addmm_(z, b.t(), alpha=scale)
    return out


def head_target_logprobs(head: HeadWeights, hidden: torch.Tensor, target: torch.Tensor):  # noqa: ANN201
    """log_softmax(head(hidden[r]))[target[r]] per row, float32, a block of rows at a time
    (differentiable with respect to ``hidden`` and the adapter's A and B)."""
    return _HeadTargetLogprob.apply(
        hidden, head.weight, head.bias, head.lora_a, head.lora_b, head.scale, target
    )


class _HeadTargetLogprob(torch.autograd.Function):
    """The output layer followed by ``_TargetLogprob``, HEAD_CHUNK_ROWS positions at a time.

    Forward keeps one float per row (the log-normalizer); backward computes each block's
    logits again (one more output-layer matmul) and turns them into the gradients of the
    hidden states and of the adapter's A and B with the same products as ``_LoraLinearFn``.
    Rows whose incoming gradient is exactly 0 (zero weight or advantage, padding) add nothing
    to any gradient and are skipped.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, a, b, scale, target):  # noqa: ANN001, ANN205
        a_c = b_c = z = None
        if a is not None:
            a_c, b_c = a.to(hidden.dtype), b.to(hidden.dtype)
            z = hidden @ a_c.t()
        n = hidden.shape[0]
        wide = _wide(hidden.dtype)
        lse = torch.empty(n, dtype=wide, device=hidden.device)
        picked = torch.empty(n, dtype=wide, device=hidden.device)
        keep = [] if HEAD_KEEP_LOGITS and any(ctx.needs_input_grad) else None
        for start in range(0, n, HEAD_CHUNK_ROWS):
            rows = slice(start, start + HEAD_CHUNK_ROWS)
            zr = None if z is None else z[rows]
            logits = head_block_logits(hidden[rows], weight, bias, zr, b_c, scale)
            if FUSED_SOFTMAX:
                picked[rows] = _picked_log_softmax(logits, target[rows], SOFTMAX_ROWS)
            else:
                lse[rows] = _logsumexp_rows(logits)
                chosen = logits.gather(-1, target[rows].unsqueeze(-1)).squeeze(-1)
                picked[rows] = chosen.to(wide) - lse[rows]
            if keep is not None:
                keep.append(logits)
        ctx.save_for_backward(hidden, weight, bias, a_c, b_c, z, target, lse)
        ctx.kept, ctx.rows = keep, HEAD_CHUNK_ROWS
        ctx.fused = FUSED_SOFTMAX
        ctx.scale = scale
        ctx.lora_dtypes = (a.dtype, b.dtype) if a is not None else None
        return picked

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        hidden, weight, bias, a_c, b_c, z, target, lse = ctx.saved_tensors
        need_x, need_a, need_b = (ctx.needs_input_grad[i] for i in (0, 3, 4))
        scale = ctx.scale
        grad = grad.to(lse.dtype)
        live = (grad != 0).nonzero().squeeze(1)
        dx = torch.zeros_like(hidden) if need_x else None
        gz = None if a_c is None else hidden.new_zeros(hidden.shape[0], a_c.shape[0])
        db = None if not need_b else b_c.new_zeros(b_c.shape, dtype=lse.dtype)
        for idx, logits in _HeadTargetLogprob._blocks(ctx, live):
            zr = None if z is None else z[idx]
            if ctx.fused:
                g = _softmax_grad(logits, target[idx], grad[idx], SOFTMAX_ROWS)
            else:
                g = _logit_grad(logits, target[idx], lse[idx], grad[idx])
            gb = None if a_c is None else g @ b_c  # the gradient reaching z, before the scale
            if gb is not None:
                gz[idx] = gb
            if need_x:
                part = g @ weight
                if gb is not None:
                    part.addmm_(gb, a_c, alpha=scale)
                dx[idx] = part
            if need_b:
                db += (g.t() @ zr).to(db.dtype)
        da = (gz.t() @ hidden).mul_(scale).to(ctx.lora_dtypes[0]) if need_a else None
        if need_b:
            db = db.mul_(scale).to(ctx.lora_dtypes[1])
        return dx, None, None, da, db, None, None

    @staticmethod
    def _blocks(ctx, live: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # noqa: ANN001
        """(row indices, their logits) for the rows in ``live``: the forward's blocks where it
        kept them, else computed again, the live rows packed into full blocks."""
        hidden, weight, bias, _, b_c, z, _, _ = ctx.saved_tensors
        if ctx.kept is not None:
            for k, block in enumerate(ctx.kept):
                start = k * ctx.rows
                idx = live[(live >= start) & (live < start + block.shape[0])]
                if idx.numel():
                    yield idx, block if idx.numel() == block.shape[0] else block[idx - start]
            return
        for start in range(0, live.shape[0], ctx.rows):
            idx = live[start : start + ctx.rows]
            zr = None if z is None else z[idx]
            yield idx, head_block_logits(hidden[idx], weight, bias, zr, b_c, ctx.scale)


@dataclass
class GenRow:
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop_ids: frozenset[int]
    stop_strings: tuple[str, ...]
    generator: torch.Generator = field(repr=False, default_factory=torch.Generator)


@dataclass
class GenResult:
    tokens: list[int]
    logprobs: list[float]
    stop_reason: str


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else random.SystemRandom().randrange(2**63))
    return g
