"""Fast batched sampling for Llama-shaped models: a slot KV cache and a lean decode step.

``transformers`` ``generate`` spends most of a CPU decode step outside the matmuls: a
growing cache re-concatenated every step, a 4-D attention mask rebuilt every step, and
per-row Python work around sampling. Here:

- the KV cache is preallocated per *slot* (one slot = one sequence) and written in place;
- a decode step is one pass over the layers, on the model's own weights and adapters (q|k|v
  and gate|up fused), with attention over the cache as one fused call per layer;
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

from . import rotary
from .lora import pack_weight
from .norms import rms_norm

# The first cache allocation holds at least this many positions; later growth doubles.
MIN_CACHE_POSITIONS = 256
# Decode with q|k|v and gate|up fused and (bf16 on CPU) oneDNN-prepacked weights. False: the
# model's own modules (bench A/B).
FUSED_STEP = True
PACK_WEIGHTS = True
# In float32, oneDNN's packed weights lose to a plain matmul at one or two rows (SmolLM2 on 2
# cores, one row: 27.6 against 34.0 tokens/s) and win from four (32 rows: 407 against 378);
# in bf16 they win at every size. Up to this many rows a float32 step uses the plain weight.
PLAIN_MAX_ROWS_FP32 = 2
# Adapters whose stacked LoRA matrices each fused layer keeps (sampling switches between a
# few: the policy, its reference, a judge); RL makes a new snapshot every step.
LORA_CACHE_ADAPTERS = 2
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


@dataclass(frozen=True)
class SamplingSpec:
    """How every row of a batch draws its tokens (temperature 0: greedy)."""

    temperature: float
    top_p: float = 1.0
    top_k: int = 0


# A row whose nucleus rejection loop runs this long is finished by a full sort.
NUCLEUS_MAX_TRIES = 32
# The inverse-CDF draw over the whole vocabulary: block sums first, then a cumulative sum
# inside the one block the draw falls in (two short scans instead of one over 49k entries).
CDF_BLOCK = 1024


def draw(
    logits: torch.Tensor,
    u: torch.Tensor | None,
    spec: SamplingSpec,
    more: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of float ``logits`` and its logprob under the model's distribution.

    ``u`` holds one uniform draw in [0, 1) per row (None when greedy); ``more(rows)`` gives
    fresh uniforms for those row indices (a top-p draw may need them). The token is drawn
    from softmax(logits / temperature), restricted to the ``top_k`` most likely tokens and
    then to the smallest set of most likely tokens whose mass reaches ``top_p``; the logprob
    is the untempered, unrestricted one (what ``compute_logprobs`` gives for the token).
    """
    if spec.temperature <= 0 or u is None:
        chosen = logits.argmax(-1)
        return chosen, logits.gather(-1, chosen[:, None])[:, 0] - torch.logsumexp(logits, -1)
    scaled = logits if spec.temperature == 1 else logits / spec.temperature
    if spec.top_k and 0 < spec.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, spec.top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if 0 < spec.top_p < 1:
        chosen = _nucleus_draw(probs, u, spec.top_p, more)
    else:
        chosen = _inverse_cdf(probs, u)
    if scaled is logits:  # the model's own distribution: its log is the logprob
        return chosen, probs.gather(-1, chosen[:, None])[:, 0].log()
    return chosen, logits.gather(-1, chosen[:, None])[:, 0] - torch.logsumexp(logits, -1)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The token where each row's cumulative mass first exceeds u x its total mass."""
    rows, vocab = probs.shape
    blocks = -(-vocab // CDF_BLOCK)
    padded = probs if blocks * CDF_BLOCK == vocab else F.pad(probs, (0, blocks * CDF_BLOCK - vocab))
    grid = padded.view(rows, blocks, CDF_BLOCK)
    block_mass = grid.sum(-1)
    block_cdf = block_mass.cumsum(-1)
    target = (u * block_cdf[:, -1]).unsqueeze(-1)
    block = torch.searchsorted(block_cdf, target, right=True).clamp_(max=blocks - 1)
    before = block_cdf.gather(-1, block) - block_mass.gather(-1, block)
    inside = grid[torch.arange(rows, device=probs.device), block[:, 0]].cumsum(-1)
    # Rounding may put the remainder at or past the block's own sum: take its last token
    # with mass then, never one past it.
    rest = torch.minimum(target - before, inside[:, -1:] * (1 - 1e-6))
    offset = torch.searchsorted(inside, rest, right=True).clamp_(max=CDF_BLOCK - 1)
    return (block * CDF_BLOCK + offset)[:, 0]


def _nucleus_draw(
    probs: torch.Tensor,
    u: torch.Tensor,
    top_p: float,
    more: Callable[[torch.Tensor], torch.Tensor] | None,
) -> torch.Tensor:
    """A draw from ``probs`` restricted to its top-p nucleus, without sorting the vocabulary.

    The nucleus keeps a token when the mass of the tokens more likely than it is at most
    ``top_p``. Each row draws from its whole distribution and accepts a token inside the
    nucleus; a token outside it shows that every token at most as likely is outside too, so
    those are removed and the row draws again (rejection sampling: the accepted token
    follows the nucleus exactly). The nucleus holds at least ``top_p`` of the mass, so a
    draw is rejected with probability at most 1 - top_p: almost every row is settled by one
    draw and one pass over its probabilities, with no top-k and no sort (SmolLM2, 32 rows
    of its own text: 7.4 ms a step down to 2.5).
    """
    if more is None:  # no fresh uniforms for a second draw: sort
        return _sorted_nucleus_draw(probs, u, top_p)
    chosen = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    left = torch.arange(probs.shape[0], device=probs.device)
    part, ticket, tries = probs, u, 0
    while True:
        token = _inverse_cdf(part, ticket)
        p = part.gather(-1, token[:, None])
        above = torch.where(part > p, part, 0.0).sum(-1)
        accept = above <= top_p
        chosen[left[accept]] = token[accept]
        reject = ~accept
        if not bool(reject.any()):
            return chosen
        tries += 1
        left, part = left[reject], part[reject]
        part = part.masked_fill(part <= p[reject], 0.0)
        ticket = more(left).to(probs.device, torch.float32)
        if tries >= NUCLEUS_MAX_TRIES:
            chosen[left] = _sorted_nucleus_draw(part, ticket, top_p)
            return chosen


def _sorted_nucleus_draw(probs: torch.Tensor, u: torch.Tensor, top_p: float) -> torch.Tensor:
    """The nucleus by a full sort: only for rows the rejection loop did not settle."""
    values, order = torch.sort(probs, dim=-1, descending=True)
    # Removed tokens were less likely than every token left, so the mass before each token
    # left is the same as in the whole distribution.
    kept = values.masked_fill(values.cumsum(-1) - values > top_p, 0.0).cumsum(-1)
    at = torch.searchsorted(kept, (u * kept[:, -1]).unsqueeze(-1), right=True)
    return order.gather(-1, at.clamp_(max=probs.shape[-1] - 1))[:, 0]


def _gated(gate: _Linear, up: _Linear, h: torch.Tensor) -> torch.Tensor:
    """silu(h Wg) * (h Wu), the activation and the product fused into the matmuls when no
    adapter adds onto them."""
    if gate.lora is None and up.lora is None:
        return up.mul(h, gate.silu(h))
    return F.silu(gate(h)) * up(h)


class _Linear:
    """One or more of the model's linear layers (q|k|v concatenated) for the decode step:
    the base weight, prepacked for oneDNN on a CPU when that works, and the active adapter's
    LoRA as one matmul pair (its A matrices stacked, its B matrices block-diagonal)."""

    def __init__(self, modules: list[nn.Module], pack: bool) -> None:
        bases = [getattr(m, "base", m) for m in modules]
        weight = torch.cat([b.weight.detach() for b in bases]) if len(bases) > 1 else None
        self.weight = bases[0].weight.detach() if weight is None else weight
        biases = [b.bias for b in bases]
        self.bias = None
        if any(x is not None for x in biases):
            self.bias = torch.cat(
                [
                    x.detach() if x is not None else torch.zeros_like(b.weight[:, 0])
                    for x, b in zip(biases, bases, strict=True)
                ]
            )
        self.out_features = sum(b.out_features for b in bases)
        self.parts: list[tuple[nn.Module, int, int]] = []
        lo = 0
        for m, b in zip(modules, bases, strict=True):
            if hasattr(m, "lora_A"):
                self.parts.append((m, lo, lo + b.out_features))
            lo += b.out_features
        self.packed = None
        shared = getattr(modules[0], "_packed_weight", None) if pack and weight is None else None
        if shared is not None:
            # The training forward's copy of the same weight (same layout, as fast here).
            self.packed = shared()
        if pack and self.packed is None:
            self.packed = pack_weight(self.weight, self.bias, rows_hint=32)
        self.plain_rows = 0  # up to this many rows, the plain weight
        if self.packed is not None and self.weight.dtype == torch.float32:
            self.plain_rows = PLAIN_MAX_ROWS_FP32
        elif self.packed is not None and weight is not None:
            self.weight = None  # the packed copy replaces the concatenation
        self.lora: tuple[torch.Tensor, torch.Tensor, float] | None = None
        self._lora_cache: dict[str, tuple[tuple, tuple[torch.Tensor, torch.Tensor, float]]] = {}

    def use(self, name: str | None, dtype: torch.dtype) -> None:
        """Make adapter ``name`` (None: the base model) the one this layer adds."""
        owned = [(m, lo, hi) for m, lo, hi in self.parts if name is not None and name in m.lora_A]
        if not owned:
            self.lora = None
            return
        key = tuple(
            (id(m.lora_A[name]), m.lora_A[name]._version, m.lora_B[name]._version, dtype)
            for m, _, _ in owned
        )
        hit = self._lora_cache.get(name)
        if hit is None or hit[0] != key:
            scales = [m.scales[name] for m, _, _ in owned]
            # One adapter has one scale: it stays the matmul's alpha, as in the model's own
            # LoRA forward; only mixed scales are folded into their blocks.
            uniform = len(set(scales)) == 1
            alpha = scales[0] if uniform else 1.0
            a = torch.cat([m.lora_A[name].detach() for m, _, _ in owned]).to(dtype)
            bd = torch.zeros(self.out_features, a.shape[0], device=a.device)
            col = 0
            for (m, lo, hi), scale in zip(owned, scales, strict=True):
                block = m.lora_B[name].detach().float()
                rank = block.shape[1]
                bd[lo:hi, col : col + rank] = block if uniform else block * scale
                col += rank
            hit = (key, (a, bd.to(dtype).t().contiguous(), alpha))
            self._lora_cache.pop(name, None)
            self._lora_cache[name] = hit
            while len(self._lora_cache) > LORA_CACHE_ADAPTERS:  # oldest first
                self._lora_cache.pop(next(iter(self._lora_cache)))
        self.lora = hit[1]

    def _packed_for(self, x: torch.Tensor) -> bool:
        return self.packed is not None and x.numel() > self.plain_rows * x.shape[-1]

    def _base(self, x: torch.Tensor, attr: str = "none") -> torch.Tensor:
        if self._packed_for(x):
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, attr, [], "")
        out = F.linear(x, self.weight, self.bias)
        return F.silu(out) if attr == "swish" else out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self._base(x)
        if self.lora is not None:
            a, bt, alpha = self.lora
            out.addmm_(x @ a.t(), bt, alpha=alpha)
        return out

    def silu(self, x: torch.Tensor) -> torch.Tensor:
        """silu(x W) (no adapter)."""
        return self._base(x, "swish")

    def mul(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """(x W) * other (no adapter)."""
        if self._packed_for(x):
            return torch.ops.mkldnn._linear_pointwise.binary(
                x, other, self.packed, self.bias, "mul"
            )
        return self._base(x).mul_(other)

    def add(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """x W (+ the adapter's term) + other: the residual add fused into the matmul."""
        if self.lora is not None:
            a, bt, alpha = self.lora
            other = torch.addmm(other, x @ a.t(), bt, alpha=alpha)
        if self._packed_for(x):
            return torch.ops.mkldnn._linear_pointwise.binary(
                x, other, self.packed, self.bias, "add"
            )
        return self._base(x).add_(other)


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
        self._signed_sin: torch.Tensor | None = None
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._slots = 0
        self._positions = 0
        self._fused_layers: list[dict[str, _Linear]] | None = None
        self._fused_head: _Linear | None = None

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
            self._signed_sin = rotary.signed_sin(self._rope[1])
        return self._rope

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    # ``_rotate`` with the rotation's sign moved into the table: the same numbers (a negation
    # is exact) in four operations instead of six.
    _rotate_signed = staticmethod(rotary.rotate)

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

    def _fused(self) -> list[dict[str, _Linear]]:
        """Per layer: q|k|v as one weight (one wider matmul), o, gate, up and down, in
        oneDNN's prepacked layout on a CPU (bf16: about 1.3x at one row and 1.2x at 32; fp32:
        see PLAIN_MAX_ROWS_FP32), with the LoRA wrappers whose adapters add onto each slice of
        the output."""
        if self._fused_layers is not None:
            return self._fused_layers
        packed = PACK_WEIGHTS and self.device.type == "cpu"
        layers = []
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            layers.append(
                {
                    "qkv": _Linear([attn.q_proj, attn.k_proj, attn.v_proj], packed),
                    "o": _Linear([attn.o_proj], packed),
                    "gate": _Linear([mlp.gate_proj], packed),
                    "up": _Linear([mlp.up_proj], packed),
                    "down": _Linear([mlp.down_proj], packed),
                }
            )
        self._fused_head = _Linear([self.model.lm_head], packed)
        self._fused_layers = layers
        return layers

    def _use_adapter(self) -> None:
        """Point every fused weight at the active adapter's LoRA (checked once per batch:
        adapters change only between the worker's calls, never during a decode pass)."""
        name = getattr(getattr(self.model.lm_head, "switch", None), "active", None)
        for w in [*(e for layer in self._fused() for e in layer.values()), self._fused_head]:
            w.use(name, self.dtype)

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
            h = rms_norm(x, layer.input_layernorm)
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
            h = rms_norm(x, layer.post_attention_layernorm)
            mlp = layer.mlp
            x = x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
        x = rms_norm(x[:, -1], self.inner.norm)
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
            h = rms_norm(x, layer.input_layernorm)
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
            h = rms_norm(x, layer.post_attention_layernorm)
            mlp = layer.mlp
            x = x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
        x = rms_norm(x, self.inner.norm)
        return self.model.lm_head(x)

    def _step_fused(
        self, tokens: torch.Tensor, positions: torch.Tensor, width: int, mask: torch.Tensor
    ) -> torch.Tensor:
        """``_step`` on the fused weights: the same arithmetic in fewer, wider operations.

        About 30 operations a layer instead of 70. ``mask`` here is (slots, width), in the
        model's dtype, or None when every slot may attend to all ``width`` positions.
        """
        b = tokens.shape[0]
        layers = self._fused()
        cos, _ = self._rope_table()
        cos, sin = cos[positions][:, None], self._signed_sin[positions][:, None]
        # Without a mask every live slot writes at width - 1: a plain slice, not a scatter.
        # (Free slots among them compute rows nobody reads, wherever they write them.)
        at: tuple = (slice(0, b), slice(None), width - 1)
        if mask is not None:  # one row per slot, broadcast over its heads
            mask = mask[:, None, None]
            at = (torch.arange(b, device=self.device), slice(None), positions)
        nq, nkv, d, groups = self.n_heads, self.n_kv, self.head_dim, self.groups
        x = self.inner.embed_tokens(tokens)
        for layer, w, (kc, vc) in zip(self.layers, layers, self._cache, strict=True):
            h = rms_norm(x, layer.input_layernorm)
            qkv = w["qkv"](h).view(b, nq + 2 * nkv, d)
            qk = self._rotate_signed(qkv[:, : nq + nkv], cos, sin)
            kc[at] = qk[:, nq:]
            vc[at] = qkv[:, nq + nkv :]
            # A kv head's query heads as its "positions" (one token each, none masked from
            # another): one fused attention call, about 4x faster than matmuls and a softmax
            # for one row and 2x for 32.
            o = F.scaled_dot_product_attention(
                qk[:, :nq].view(b, nkv, groups, d),
                kc[:b, :, :width],
                vc[:b, :, :width],
                attn_mask=mask,
                scale=self.scale,
            ).reshape(b, nq * d)
            x = w["o"].add(o, x)
            h = rms_norm(x, layer.post_attention_layernorm)
            x = w["down"].add(_gated(w["gate"], w["up"], h), x)
        x = rms_norm(x, self.inner.norm)
        return self._fused_head(x)

    # ---- the batch ------------------------------------------------------------------

    @torch.no_grad()
    def run(
        self,
        requests: list[DecodeRequest],
        sampling: SamplingSpec,
        poll: Callable[[int], list[DecodeRequest]] | None = None,
        max_slots: int = 64,
    ) -> None:
        """Decode until every request (and every request ``poll`` hands in) is done.

        ``sampling`` says how tokens are drawn (temperature 0: greedy). ``poll(free)``
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
        sampling: SamplingSpec,
        poll: Callable[[int], list[DecodeRequest]] | None,
        max_slots: int,
    ) -> None:
        if FUSED_STEP:
            self._use_adapter()
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
            # Lists first (an item assignment into a tensor costs microseconds a slot); a free
            # slot feeds token 0 at position 0.
            feeding, at_pos = [0] * used, [0] * used
            for slot in active:
                feeding[slot], at_pos[slot] = feed[slot], pos[slot]
            tokens = torch.tensor(feeding, dtype=torch.long)
            positions = torch.tensor(at_pos, dtype=torch.long)
            width = max(at_pos) + 1
            self._ensure_cache(used, width)
            # Free slots among the used ones compute rows nobody reads; only the live slots
            # need a mask, and none when they all stand at the same position.
            live_pos = positions[active]
            mask = None
            if not FUSED_STEP or bool((live_pos != width - 1).any()):
                mask = torch.full((used, width), float("-inf"))
                keep = torch.arange(width)[None, :] <= positions[:, None]
                mask = mask.masked_fill_(keep, 0.0).to(self.device)
            if FUSED_STEP:
                logits = self._step_fused(
                    tokens.to(self.device),
                    positions.to(self.device),
                    width,
                    None if mask is None else mask.to(self.dtype),
                )
            else:
                logits = self._step(
                    tokens.to(self.device), positions.to(self.device), width, mask[:, None, None]
                )
            reqs = [req for req in live if any(req.reason[r] is None for r in range(req.rows))]
            picks = [[r for r in range(req.rows) if req.reason[r] is None] for req in reqs]
            index = [req.slots[r] for req, rows in zip(reqs, picks, strict=True) for r in rows]
            if index != list(range(logits.shape[0])):  # not every row, or not in order
                logits = logits[torch.tensor(index, dtype=torch.long, device=self.device)]
            chosen = self._choose(
                logits.float(),  # after the selection: one pass over the rows drawn from
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
        spec: SamplingSpec,
        reqs: list[DecodeRequest],
        picks: list[list[int]],
    ) -> tuple[list[int], list[float]]:
        """Draw one token per row (rows grouped by request, in order): tokens, logprobs."""
        u = None
        owners = [req for req, rows in zip(reqs, picks, strict=True) for _ in rows]
        if spec.temperature > 0:
            draws = [
                torch.rand(len(rows), generator=req.generator)
                for req, rows in zip(reqs, picks, strict=True)
            ]
            u = torch.cat(draws).to(logits.device, torch.float32)

        def more(rows: torch.Tensor) -> torch.Tensor:
            # Fresh uniforms for rows that draw again, each from its own request's generator
            # in row order, so a seeded request gives the same tokens whatever shares the batch.
            return torch.cat([torch.rand(1, generator=owners[i].generator) for i in rows.tolist()])

        chosen, picked = draw(logits, u, spec, more)
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
