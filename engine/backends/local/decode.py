"""Fast batched sampling for Llama-shaped models: a slot KV cache and a lean decode step.

``transformers`` ``generate`` spends most of a CPU decode step outside the matmuls: a
growing cache re-concatenated every step, a 4-D attention mask rebuilt every step, and
per-row Python work around sampling. Here:

- the KV cache is preallocated per *slot* (one slot = one sequence) and written in place;
- a decode step is one pass over the layers, calling the model's own modules (so LoRA
  wrappers apply unchanged) with grouped-query attention done as two small matmuls;
- a prompt is prefilled once and its keys/values copied into every slot that samples it
  (prefix sharing for ``num_samples > 1``);
- sampling is vectorized over the batch (inverse-CDF draws, one uniform per row from its
  request's own generator, so a seeded request gives the same tokens whatever shares the
  batch), with one host copy of the chosen tokens per step;
- requests join the running batch between steps (continuous batching), finish (their
  futures resolve) as soon as their own rows are done, and are dropped at the next step
  once cancelled.

Only plain Llama decoders are taken (SmolLM2 and the tiny test model are); anything else
uses ``transformers`` (see ``BaseRuntime.generate``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# The first cache allocation holds at least this many positions; later growth doubles.
MIN_CACHE_POSITIONS = 256
# Decode with q|k|v and gate|up fused and (bf16 on CPU) oneDNN-prepacked weights. False: the
# model's own modules (bench A/B).
FUSED_STEP = True
PACK_WEIGHTS = True
# Positions reserved past a prompt when it joins; more are added as sequences run on.
FIRST_STRETCH = 128
# A cache up to this size is kept for the next batch; a larger one is freed after its batch
# (training needs the memory more than sampling needs the allocation time).
KEEP_CACHE_BYTES = 256 * 2**20


def supports(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    if cfg is None or type(model).__name__ != "LlamaForCausalLM":
        return False
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return False
    if int(getattr(cfg, "pretraining_tp", 1) or 1) != 1:
        return False
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return False
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    return rope.get("rope_type", "default") in ("default", "llama3", "linear")


@dataclass
class DecodeRequest:
    """One sampling request: ``rows`` sequences sampled from one prompt."""

    prompt: list[int]
    rows: int
    max_tokens: int
    stop_ids: frozenset[int]
    stop_strings: tuple[str, ...]
    generator: torch.Generator | None  # None: greedy
    on_done: Callable[[list[tuple[list[int], list[float], str]]], None]
    cancelled: Callable[[], bool] = lambda: False
    # filled while running
    slots: list[int] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)
    logprobs: list[list[float]] = field(default_factory=list)
    reason: list[str | None] = field(default_factory=list)


class SlotDecoder:
    """Runs batches of ``DecodeRequest`` on one Llama model (its weights, its LoRA switch)."""

    def __init__(self, model: nn.Module, decode_text: Callable[[list[int]], str]) -> None:
        self.model = model
        cfg = model.config
        self.inner = model.model
        self.layers = list(self.inner.layers)
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(cfg.num_key_value_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads)
        self.groups = self.n_heads // self.n_kv
        self.scale = self.head_dim**-0.5
        self.max_positions = int(getattr(cfg, "max_position_embeddings", 2048) or 2048)
        self.decode_text = decode_text
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._slots = 0
        self._positions = 0
        self._fused_layers: list[dict] | None = None
        self._fused_head: dict | None = None
        self._active: str | None = None

    # ---- pieces ---------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.inner.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.embed_tokens.weight.dtype

    def _rope_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for every position, computed once by the model's own rotary module."""
        if self._rope is None:
            pos = torch.arange(self.max_positions, device=self.device)[None]
            probe = torch.empty((), dtype=self.dtype, device=self.device)
            cos, sin = self.inner.rotary_emb(probe, pos)
            self._rope = (cos[0].contiguous(), sin[0].contiguous())
        return self._rope

    @staticmethod
    def _norm(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
        # LlamaRMSNorm: float32 statistics, cast back, then the weight in the model's dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
        return module.weight * xf.to(x.dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _ensure_cache(self, slots: int, positions: int) -> None:
        """Room for ``slots`` sequences of ``positions`` tokens, keeping what is cached."""
        if slots <= self._slots and positions <= self._positions:
            return
        new_slots = max(slots, self._slots)
        if self._slots and slots > self._slots:  # requests join one by one: grow in steps
            new_slots = max(slots, min(2 * self._slots, 64))
        new_pos = max(positions, self._positions, MIN_CACHE_POSITIONS)
        if self._positions and positions > self._positions:
            new_pos = max(new_pos, min(self.max_positions, 2 * self._positions))
        new_pos = min(new_pos, self.max_positions)
        shape = (new_slots, self.n_kv, new_pos, self.head_dim)
        cache = []
        for old in self._cache or [None] * len(self.layers):
            k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            v = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if old is not None:
                k[: self._slots, :, : self._positions] = old[0]
                v[: self._slots, :, : self._positions] = old[1]
            cache.append((k, v))
        self._cache, self._slots, self._positions = cache, new_slots, new_pos

    def release(self) -> None:
        self._cache, self._slots, self._positions = [], 0, 0

    def cache_bytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self._cache)

    # ---- fused, prepacked weights for the decode step ------------------------------------

    def _fused(self) -> list[dict]:
        """Per layer: q|k|v and gate|up as one weight each (fewer, wider matmuls), in oneDNN's
        prepacked layout when the weights are bf16 on a CPU (about 2x on a 1-row matmul),
        with the LoRA wrappers whose adapters add onto each slice of the output."""
        if self._fused_layers is not None:
            return self._fused_layers
        packed = PACK_WEIGHTS and self.dtype == torch.bfloat16 and self.device.type == "cpu"

        def prep(modules: list[nn.Module]) -> dict:
            bases = [getattr(m, "base", m) for m in modules]
            weight = (
                torch.cat([b.weight.detach() for b in bases])
                if len(bases) > 1
                else bases[0].weight.detach()
            )
            biases = [b.bias for b in bases]
            bias = None
            if any(x is not None for x in biases):
                bias = torch.cat(
                    [
                        (
                            x.detach()
                            if x is not None
                            else torch.zeros(b.out_features, dtype=self.dtype)
                        )
                        for x, b in zip(biases, bases, strict=True)
                    ]
                )
            parts, lo = [], 0
            for m, b in zip(modules, bases, strict=True):
                if hasattr(m, "lora_A"):
                    parts.append((m, lo, lo + b.out_features))
                lo += b.out_features
            entry = {"weight": weight, "bias": bias, "parts": parts, "packed": None}
            if packed:
                try:
                    entry["packed"] = torch.ops.mkldnn._reorder_linear_weight(weight, 32)
                    x = torch.zeros(1, weight.shape[1], dtype=self.dtype)
                    torch.ops.mkldnn._linear_pointwise(x, entry["packed"], bias, "none", [], "")
                    entry["weight"] = None  # the packed copy replaces the concatenation
                    if len(bases) == 1:
                        entry["weight"] = weight
                except (RuntimeError, AttributeError):
                    entry["packed"] = None
                    entry["weight"] = weight
            return entry

        layers = []
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            layers.append(
                {
                    "qkv": prep([attn.q_proj, attn.k_proj, attn.v_proj]),
                    "o": prep([attn.o_proj]),
                    "gate_up": prep([mlp.gate_proj, mlp.up_proj]),
                    "down": prep([mlp.down_proj]),
                }
            )
        self._fused_head = prep([self.model.lm_head])
        self._fused_layers = layers
        return layers

    def _linear(self, x: torch.Tensor, entry: dict) -> torch.Tensor:
        if entry["packed"] is not None:
            out = torch.ops.mkldnn._linear_pointwise(
                x, entry["packed"], entry["bias"], "none", [], ""
            )
        else:
            out = F.linear(x, entry["weight"], entry["bias"])
        name = self._active
        if name is not None:
            for module, lo, hi in entry["parts"]:
                if name in module.lora_A:
                    a, b = module._weights(name, x.dtype)
                    out[:, lo:hi].addmm_(x @ a.t(), b.t(), alpha=module.scales[name])
        return out

    # ---- forward passes ---------------------------------------------------------------

    def _prefill(self, prompt: list[int], slots: list[int]) -> torch.Tensor:
        """Run the prompt once, copy its keys/values into each slot; last position's logits."""
        n = len(prompt)
        cos, sin = self._rope_table()
        cos, sin = cos[:n][None, None], sin[:n][None, None]
        ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
        x = self.inner.embed_tokens(ids)
        index = torch.tensor(slots, dtype=torch.long, device=self.device)
        for layer, (kc, vc) in zip(self.layers, self._cache, strict=True):
            attn = layer.self_attn
            h = self._norm(x, layer.input_layernorm)
            q = attn.q_proj(h).view(1, n, self.n_heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(1, n, self.n_kv, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(1, n, self.n_kv, self.head_dim).transpose(1, 2)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            kc[index, :, :n] = k
            vc[index, :, :n] = v
            o = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self.scale, enable_gqa=self.groups > 1
            )
            x = x + attn.o_proj(o.transpose(1, 2).reshape(1, n, -1))
            h = self._norm(x, layer.post_attention_layernorm)
            mlp = layer.mlp
            x = x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
        x = self._norm(x[:, -1], self.inner.norm)
        return self.model.lm_head(x)[0].float()

    def _step(
        self, tokens: torch.Tensor, positions: torch.Tensor, width: int, mask: torch.Tensor
    ) -> torch.Tensor:
        """One token for each of the first ``len(tokens)`` slots; (slots, vocab) float logits.

        ``positions[i]`` is where slot i's token goes; ``mask`` (slots, 1, 1, width) is 0 on
        the cached positions each slot may attend to and -inf elsewhere.
        """
        b = tokens.shape[0]
        cos, sin = self._rope_table()
        cos, sin = cos[positions][:, None], sin[positions][:, None]
        rows = torch.arange(b, device=self.device)
        x = self.inner.embed_tokens(tokens)
        for layer, (kc, vc) in zip(self.layers, self._cache, strict=True):
            attn = layer.self_attn
            h = self._norm(x, layer.input_layernorm)
            q = attn.q_proj(h).view(b, self.n_heads, self.head_dim)
            k = attn.k_proj(h).view(b, self.n_kv, self.head_dim)
            v = attn.v_proj(h).view(b, self.n_kv, self.head_dim)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            kc[rows, :, positions] = k
            vc[rows, :, positions] = v
            keys, values = kc[:b, :, :width], vc[:b, :, :width]
            scores = torch.matmul(
                q.view(b, self.n_kv, self.groups, self.head_dim), keys.transpose(-1, -2)
            )
            scores = scores.float().mul_(self.scale).add_(mask)
            probs = torch.softmax(scores, dim=-1).to(values.dtype)
            o = torch.matmul(probs, values).reshape(b, -1)
            x = x + attn.o_proj(o)
            h = self._norm(x, layer.post_attention_layernorm)
            mlp = layer.mlp
            x = x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
        x = self._norm(x, self.inner.norm)
        return self.model.lm_head(x).float()

    def _step_fused(
        self, tokens: torch.Tensor, positions: torch.Tensor, width: int, mask: torch.Tensor
    ) -> torch.Tensor:
        """``_step`` on the fused weights: the same arithmetic in fewer, wider operations."""
        b = tokens.shape[0]
        layers = self._fused()
        self._active = getattr(getattr(self.model.lm_head, "switch", None), "active", None)
        cos, sin = self._rope_table()
        cos, sin = cos[positions][:, None], sin[positions][:, None]
        rows = torch.arange(b, device=self.device)
        nq, nkv, d = self.n_heads, self.n_kv, self.head_dim
        x = self.inner.embed_tokens(tokens)
        for layer, w, (kc, vc) in zip(self.layers, layers, self._cache, strict=True):
            h = self._norm(x, layer.input_layernorm)
            qkv = self._linear(h, w["qkv"]).view(b, nq + 2 * nkv, d)
            qk = self._rotate(qkv[:, : nq + nkv], cos, sin)
            kc[rows, :, positions] = qk[:, nq:]
            vc[rows, :, positions] = qkv[:, nq + nkv :]
            scores = torch.matmul(
                qk[:, :nq].reshape(b, nkv, self.groups, d), kc[:b, :, :width].transpose(-1, -2)
            )
            scores = scores.float().mul_(self.scale).add_(mask)
            probs = torch.softmax(scores, dim=-1).to(x.dtype)
            o = torch.matmul(probs, vc[:b, :, :width]).reshape(b, -1)
            x = x + self._linear(o, w["o"])
            h = self._norm(x, layer.post_attention_layernorm)
            gate_up = self._linear(h, w["gate_up"])
            half = gate_up.shape[-1] // 2
            x = x + self._linear(F.silu(gate_up[:, :half]) * gate_up[:, half:], w["down"])
        x = self._norm(x, self.inner.norm)
        return self._linear(x, self._fused_head).float()

    # ---- the batch ------------------------------------------------------------------

    @torch.no_grad()
    def run(
        self,
        requests: list[DecodeRequest],
        sampling: Callable[[torch.Tensor], torch.Tensor | None],
        poll: Callable[[int], list[DecodeRequest]] | None = None,
        max_slots: int = 64,
    ) -> None:
        """Decode until every request (and every request ``poll`` hands in) is done.

        ``sampling(logits)`` gives the distribution to draw from (None: greedy). ``poll(free)``
        is asked between steps for new requests of at most ``free`` rows in all.
        """
        try:
            self._run(requests, sampling, poll, max_slots)
        finally:
            if self.cache_bytes() > KEEP_CACHE_BYTES:
                self.release()

    def _run(
        self,
        requests: list[DecodeRequest],
        sampling: Callable[[torch.Tensor], torch.Tensor | None],
        poll: Callable[[int], list[DecodeRequest]] | None,
        max_slots: int,
    ) -> None:
        free: list[int] = []  # slots below `used` that no row holds
        used = 0
        slot_req: dict[int, tuple[DecodeRequest, int]] = {}  # slot -> (request, row)
        pos: dict[int, int] = {}  # slot -> position of the token it feeds next
        feed: dict[int, int] = {}  # slot -> the token it feeds next
        live: list[DecodeRequest] = []

        def add(req: DecodeRequest) -> None:
            nonlocal used
            req.tokens = [[] for _ in range(req.rows)]
            req.logprobs = [[] for _ in range(req.rows)]
            req.reason = [None] * req.rows
            if req.max_tokens <= 0 or req.rows == 0:
                req.on_done(
                    [(t, lp, "length") for t, lp in zip(req.tokens, req.logprobs, strict=True)]
                )
                return
            slots = []
            for _ in range(req.rows):
                if free:
                    slots.append(free.pop())
                else:
                    slots.append(used)
                    used += 1
            req.slots = slots
            # Room for the prompt and a first stretch of tokens; the cache grows (doubling)
            # only for sequences that run on, since most stop well before max_tokens.
            self._ensure_cache(used, len(req.prompt) + min(req.max_tokens, FIRST_STRETCH))
            logits = self._prefill(req.prompt, slots)
            first = self._choose(
                logits[None].expand(req.rows, -1), sampling, [req], [list(range(req.rows))]
            )
            live.append(req)
            for r, slot in enumerate(slots):
                slot_req[slot] = (req, r)
                pos[slot] = len(req.prompt)
            self._record(req, first)
            for r, slot in enumerate(slots):
                if req.reason[r] is None:
                    feed[slot] = req.tokens[r][-1]

        def finish_done() -> None:
            for req in list(live):
                if req.cancelled():
                    self._drop(req, slot_req, free, live)
                elif all(reason is not None for reason in req.reason):
                    self._drop(req, slot_req, free, live)
                    req.on_done(list(zip(req.tokens, req.logprobs, req.reason, strict=True)))
                else:
                    for r, slot in enumerate(req.slots):
                        if req.reason[r] is not None and slot in slot_req:
                            del slot_req[slot]
                            free.append(slot)

        for req in requests:
            add(req)
        finish_done()
        while True:
            if poll is not None:
                room = max_slots - len(slot_req)
                if room > 0:
                    for req in poll(room):
                        add(req)
                    finish_done()
            if not slot_req:
                if poll is None:
                    break
                more = poll(max_slots)
                if not more:
                    break
                for req in more:
                    add(req)
                finish_done()
                continue
            # Compact: keep the batch as small as the highest slot in use.
            while used and (used - 1) not in slot_req:
                used -= 1
                if used in free:
                    free.remove(used)
            active = sorted(slot_req)
            tokens = torch.full((used,), 0, dtype=torch.long)
            positions = torch.zeros(used, dtype=torch.long)
            for slot in active:
                tokens[slot] = feed[slot]
                positions[slot] = pos[slot]
            width = int(positions.max()) + 1
            self._ensure_cache(used, width)
            mask = torch.full((used, width), float("-inf"))
            keep = torch.arange(width)[None, :] <= positions[:, None]
            mask.masked_fill_(keep, 0.0)
            logits = (self._step_fused if FUSED_STEP else self._step)(
                tokens.to(self.device),
                positions.to(self.device),
                width,
                mask.to(self.device)[:, None, None, :],
            )
            reqs = [req for req in live if any(req.reason[r] is None for r in range(req.rows))]
            picks = [[r for r in range(req.rows) if req.reason[r] is None] for req in reqs]
            index = [req.slots[r] for req, rows in zip(reqs, picks, strict=True) for r in rows]
            chosen = self._choose(
                logits[torch.tensor(index, dtype=torch.long, device=self.device)],
                sampling,
                reqs,
                picks,
            )
            for slot in active:
                pos[slot] += 1
            offset = 0
            for req, rows in zip(reqs, picks, strict=True):
                part = (
                    chosen[0][offset : offset + len(rows)],
                    chosen[1][offset : offset + len(rows)],
                )
                offset += len(rows)
                self._record(req, part, rows)
                for r in rows:
                    if req.reason[r] is None:
                        feed[req.slots[r]] = req.tokens[r][-1]
            finish_done()

    def _drop(self, req: DecodeRequest, slot_req: dict, free: list[int], live: list) -> None:
        for slot in req.slots:
            if slot in slot_req and slot_req[slot][0] is req:
                del slot_req[slot]
                free.append(slot)
        live.remove(req)

    def _choose(
        self,
        logits: torch.Tensor,
        sampling: Callable[[torch.Tensor], torch.Tensor | None],
        reqs: list[DecodeRequest],
        picks: list[list[int]],
    ) -> tuple[list[int], list[float]]:
        """Draw one token per row (rows grouped by request, in order): tokens, logprobs."""
        probs = sampling(logits)
        if probs is None:
            chosen = logits.argmax(-1)
        else:
            draws = [
                torch.rand(len(rows), generator=req.generator)
                for req, rows in zip(reqs, picks, strict=True)
            ]
            u = torch.cat(draws).to(logits.device, torch.float32)
            cdf = probs.cumsum(-1)
            chosen = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
            chosen = chosen.clamp_(max=logits.shape[-1] - 1)
        picked = logits.gather(-1, chosen[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
        return chosen.cpu().tolist(), picked.cpu().tolist()

    def _record(
        self,
        req: DecodeRequest,
        chosen: tuple[list[int], list[float]],
        rows: list[int] | None = None,
    ) -> None:
        rows = list(range(req.rows)) if rows is None else rows
        for j, r in enumerate(rows):
            tok = int(chosen[0][j])
            req.tokens[r].append(tok)
            req.logprobs[r].append(float(chosen[1][j]))
            if tok in req.stop_ids or self._hit_stop_string(req.tokens[r], req.stop_strings):
                req.reason[r] = "stop"
            elif len(req.tokens[r]) >= req.max_tokens:
                req.reason[r] = "length"

    def _hit_stop_string(self, tokens: list[int], stops: tuple[str, ...]) -> bool:
        if not stops:
            return False
        span = max(len(s) for s in stops) + 1  # a string of c chars spans at most c tokens
        tail = self.decode_text(tokens[-span:])
        return any(s in tail for s in stops)
