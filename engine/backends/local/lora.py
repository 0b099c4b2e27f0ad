"""LoRA slots on a shared frozen base model.

One base model serves every training and sampling client of the service. Each linear
layer that LoRA targets is wrapped once; the wrapper holds any number of named adapters
and applies the one the ``AdapterSwitch`` says is active (or none, for the base model).
A frozen snapshot is a new name holding clones of another adapter's tensors, so it costs
the adapter's size, not the model's.

Saved adapters use peft's layout (``adapter_config.json`` + ``adapter_model.safetensors``
with peft's key names), so ``peft.PeftModel.from_pretrained`` can load them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
UNEMBED_MODULES = ("lm_head",)
# One autograd node per LoRA layer (see _LoraLinearFn); False restores plain autograd (bench).
FUSED_BACKWARD = True
# bf16 forwards on a CPU through a copy of each base weight in oneDNN's own layout (see
# _packed_weight); False: F.linear, which lays the weight out again on every call (bench).
PACKED_FORWARD = True
# The number of rows the packed layout is tuned for: a training step's positions.
PACKED_ROWS_HINT = 2048
# Layers reading one input (q|k|v, gate|up) share one autograd node (see _SharedInputLoraFn);
# False: one node per layer (bench A/B).
SHARED_INPUT = True


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    targets: tuple[str, ...]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def targets_for(train_mlp: bool, train_attn: bool, train_unembed: bool) -> tuple[str, ...]:
    targets: tuple[str, ...] = ()
    if train_attn:
        targets += ATTN_MODULES
    if train_mlp:
        targets += MLP_MODULES
    if train_unembed:
        targets += UNEMBED_MODULES
    if not targets:
        raise ValueError("LoRA needs at least one of train_mlp, train_attn, train_unembed.")
    return targets


class OutputBuffer:
    """One output tensor a large layer (the vocabulary head) writes into again and again.

    A fresh (tokens x vocabulary) tensor is hundreds of MB: the allocator maps new pages
    for it on every call and the kernel zeroes each one as the matmul first touches it
    (SmolLM2, 2,048 positions, bf16: 98 ms for the head's matmul into fresh memory, 43 ms
    into memory written before). Reused only while nothing else holds it, on a CPU, and
    only up to MAX_BYTES, since it stays allocated between calls: a bf16 step's 200 MB, not
    a float32 step's 400 MB (whose step is slow enough that the pages matter less).
    """

    MIN_BYTES = 16 << 20
    MAX_BYTES = 256 << 20

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):  # noqa: ANN201
        """A tensor of ``shape`` to write into, or None (allocate as usual)."""
        numel = math.prod(shape)
        size = numel * dtype.itemsize
        if device.type != "cpu" or not self.MIN_BYTES <= size <= self.MAX_BYTES:
            return None
        buf = self._buf
        if buf is not None and _shared(buf):
            return None  # an earlier output is still in use (saved for a backward pass)
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            self._buf = buf = None  # let the old one go before the new one is made
            buf = self._buf = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel].view(shape)


def _shared(buf: torch.Tensor) -> bool:
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return True  # cannot tell: never reuse
    # The buffer's own reference, and the one the storage object made here holds.
    return use_count(buf.untyped_storage()._cdata) > 2


def _linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    buffer: OutputBuffer | None,
    packed: torch.Tensor | None = None,
) -> torch.Tensor:
    """F.linear(x, weight, bias): through ``packed`` (``weight`` in oneDNN's layout) when
    given, else written into ``buffer``'s tensor when it lends one."""
    if packed is not None and not (
        weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        if torch.is_grad_enabled() and x.requires_grad:
            return _PackedLinearFn.apply(x, weight, bias, packed)
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    out = None
    if buffer is not None:
        out = buffer.take((*x.shape[:-1], weight.shape[0]), x.dtype, x.device)
    if out is None:
        return F.linear(x, weight, bias)
    flat = x.reshape(-1, x.shape[-1])
    if bias is None:
        torch.mm(flat, weight.t(), out=out.view(-1, weight.shape[0]))
    else:
        torch.addmm(bias, flat, weight.t(), out=out.view(-1, weight.shape[0]))
    return out


class _PackedLinearFn(torch.autograd.Function):
    """x W^T + bias through W's packed copy, for an input that needs its gradient (a layer
    without an adapter between layers with one): oneDNN's packed linear has no backward of
    its own, so the gradient is the plain weight's, g W."""

    @staticmethod
    def forward(ctx, x, weight, bias, packed):  # noqa: ANN001, ANN205
        ctx.save_for_backward(weight)
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        (weight,) = ctx.saved_tensors
        return grad @ weight, None, None, None


def pack_weight(
    weight: torch.Tensor, bias: torch.Tensor | None, rows_hint: int = PACKED_ROWS_HINT
) -> torch.Tensor | None:
    """``weight`` reordered for oneDNN's linear, or None where this PyTorch cannot."""
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows_hint)
        probe = torch.zeros(1, weight.shape[1], dtype=weight.dtype)
        torch.ops.mkldnn._linear_pointwise(probe, packed, bias, "none", [], "")
    except (RuntimeError, AttributeError):
        return None
    return packed


class AdapterSwitch:
    """Which adapter the wrapped layers apply; shared by every wrapper of one base model."""

    def __init__(self) -> None:
        self.active: str | None = None


class LoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, switch: AdapterSwitch, kind: str) -> None:
        super().__init__()
        self.base = base
        self.switch = switch
        self.kind = kind  # e.g. "q_proj"
        self.lora_A: dict[str, torch.Tensor] = {}
        self.lora_B: dict[str, torch.Tensor] = {}
        self.scales: dict[str, float] = {}
        # name -> (A, B, (their versions, dtype), A and B cast): for forwards without grad
        self._cast: dict[str, tuple] = {}
        self.out_buffer: OutputBuffer | None = None  # set for the vocabulary head
        self._packed: tuple[tuple, torch.Tensor | None] | None = None

    def _packed_weight(self) -> torch.Tensor | None:
        """The base weight in oneDNN's blocked layout, for bf16 on a CPU.

        F.linear hands oneDNN the plain weight, and oneDNN lays it out again on every call:
        on the 2-core AMX Xeon a (2048 x 576) @ (576 x 1536) forward took 2.8 ms with a
        different weight each call (as a model's layers are) and 1.3 ms through the packed
        copy, the same numbers. The copy costs the weight's size once. Not for the
        vocabulary head, which writes into its OutputBuffer instead.
        """
        weight = self.base.weight
        if (
            not PACKED_FORWARD
            or self.out_buffer is not None
            or weight.device.type != "cpu"
            or weight.dtype != torch.bfloat16
        ):
            return None
        key = (weight.data_ptr(), weight._version, tuple(weight.shape))
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, pack_weight(weight.detach(), self.base.bias))
        return self._packed[1]

    def _weights(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.lora_A[name], self.lora_B[name]
        if a.dtype == dtype or torch.is_grad_enabled():
            return a.to(dtype), b.to(dtype)  # the cast stays in the autograd graph
        # Sampling: two casts per layer per token add up, so keep the cast copies until the
        # adapter changes (optimizer steps and loads bump the tensors' version counters).
        hit = self._cast.get(name)
        if not (
            hit is not None
            and hit[0] is a
            and hit[1] is b
            and hit[2] == (a._version, b._version, dtype)
        ):
            hit = (
                a,
                b,
                (a._version, b._version, dtype),
                a.detach().to(dtype),
                b.detach().to(dtype),
            )
            self._cast[name] = hit
        return hit[3], hit[4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.switch.active
        if (
            FUSED_BACKWARD
            and name in self.lora_A
            and torch.is_grad_enabled()
            and (x.requires_grad or self.lora_A[name].requires_grad)
        ):
            return _LoraLinearFn.apply(
                x, (self,), self.scales[name], self.lora_A[name], self.lora_B[name]
            )[0]
        packed = self._packed_weight()
        if name is None or name not in self.lora_A:
            return _linear(x, self.base.weight, self.base.bias, self.out_buffer, packed)
        out = _linear(x, self.base.weight, self.base.bias, self.out_buffer, packed)
        a, b = self._weights(name, x.dtype)
        # out += scale * (x A^T) B^T as one GEMM accumulating into the base output in place
        # (the base linear's backward does not read its output): no scale or add passes and
        # no copy of the (tokens x out_features) result, which matters for lm_head.
        h = F.linear(x, a).reshape(-1, a.shape[0])
        out.view(-1, out.shape[-1]).addmm_(h, b.t(), alpha=self.scales[name])
        return out


def _lora_forward(ctx, x, layers, scale, *ab):  # noqa: ANN001, ANN202
    """Each layer's x W^T + bias + scale (x A^T) B^T (``ab``: the layers' A's, then their
    B's), keeping what ``_lora_backward`` needs."""
    n = len(layers)
    flat = x.reshape(-1, x.shape[-1])
    a_cs = [a.to(x.dtype) for a in ab[:n]]
    b_cs = [b.to(x.dtype) for b in ab[n:]]
    outs, hs = [], []
    for layer, a_c, b_c in zip(layers, a_cs, b_cs, strict=True):
        base = layer.base
        out = _linear(x, base.weight, base.bias, layer.out_buffer, layer._packed_weight())
        h = flat @ a_c.t()
        out.view(-1, out.shape[-1]).addmm_(h, b_c.t(), alpha=scale)
        outs.append(out)
        hs.append(h)
    ctx.save_for_backward(flat, *[layer.base.weight for layer in layers], *a_cs, *b_cs, *hs)
    ctx.n, ctx.scale, ctx.shape = n, scale, x.shape
    ctx.dtypes = [t.dtype for t in ab]
    return tuple(outs)


def _lora_backward(ctx, *grads):  # noqa: ANN001, ANN202
    """The gradients of x, the A's and the B's (never W): the input's summed inside the
    matmuls, the A's as one matmul."""
    n, scale = ctx.n, ctx.scale
    flat, *rest = ctx.saved_tensors
    weights, a_cs, b_cs, hs = (rest[i * n : (i + 1) * n] for i in range(4))
    gs = [g.reshape(-1, g.shape[-1]) for g in grads]
    rank = a_cs[0].shape[0]
    # Each layer's g B side by side: the gradient reaching h, before the scale.
    gb = flat.new_empty(flat.shape[0], rank * n)
    for i in range(n):
        torch.mm(gs[i], b_cs[i], out=gb[:, i * rank : (i + 1) * rank])
    dx = None
    if ctx.needs_input_grad[0]:
        dx = gs[0] @ weights[0]
        for g, w in zip(gs[1:], weights[1:], strict=True):
            dx.addmm_(g, w)
        dx.addmm_(gb, a_cs[0] if n == 1 else torch.cat(a_cs), alpha=scale)
        dx = dx.view(ctx.shape)
    da: list = [None] * n
    if any(ctx.needs_input_grad[3 : 3 + n]):
        da_all = (gb.t() @ flat).mul_(scale)
        da = [da_all[i * rank : (i + 1) * rank].to(ctx.dtypes[i]) for i in range(n)]
    db = [
        (gs[i].t() @ hs[i]).mul_(scale).to(ctx.dtypes[n + i])
        if ctx.needs_input_grad[3 + n + i]
        else None
        for i in range(n)
    ]
    return (dx, None, None, *da, *db)


class _LoraLinearFn(torch.autograd.Function):
    """y = x W^T + bias + scale (x A^T) B^T with a frozen W, as one autograd node, for one
    layer: ``apply(x, (layer,), scale, A, B)``.

    Autograd over the plain expression records an in-place add on a view (a CopySlices
    node that clones the output gradient) and two casts per layer; this computes the same
    products and hands back exactly the gradients LoRA needs: x, A and B (never W).
    Measured on SmolLM2-135M bf16, 4 x 512 tokens: about 1 s less per training step.
    """

    forward = staticmethod(_lora_forward)
    backward = staticmethod(_lora_backward)


class _SharedInputLoraFn(torch.autograd.Function):
    """``_LoraLinearFn`` for several LoRA layers that read the same input (q, k and v; gate
    and up), as one autograd node: ``apply(x, layers, scale, *As, *Bs)``.

    The forward is each layer's own, op for op, so outputs are the same numbers as layer by
    layer. The backward sums the input's gradient inside the matmuls (``addmm_`` into one
    tensor) instead of autograd adding one (tokens x hidden) gradient per layer, and does the
    layers' A gradients and LoRA input terms as one matmul each. Measured on SmolLM2-135M
    bf16, 4 x 512 tokens, forward + backward of one layer's q|k|v: 7.4-12.3 ms layer by
    layer, 5.4-5.6 ms shared.
    """

    forward = staticmethod(_lora_forward)
    backward = staticmethod(_lora_backward)


def shared_input(x: torch.Tensor, layers: tuple[nn.Module, ...]) -> tuple[torch.Tensor, ...]:
    """``tuple(layer(x) for layer in layers)``: as one autograd node where every layer is a
    LoRA layer training the same active adapter at one scale, else layer by layer."""
    first = layers[0]
    name = getattr(getattr(first, "switch", None), "active", None)
    if (
        SHARED_INPUT
        and FUSED_BACKWARD
        and name is not None
        and torch.is_grad_enabled()
        and all(
            isinstance(layer, LoraLinear)
            and layer.switch is first.switch
            and layer.out_buffer is None
            and name in layer.lora_A
            and layer.scales[name] == first.scales[name]
            for layer in layers
        )
        and (x.requires_grad or first.lora_A[name].requires_grad)
    ):
        return _SharedInputLoraFn.apply(
            x,
            layers,
            first.scales[name],
            *[layer.lora_A[name] for layer in layers],
            *[layer.lora_B[name] for layer in layers],
        )
    return tuple(layer(x) for layer in layers)


class LoraHost:
    """Wraps a causal LM's target layers once and manages named adapters on them."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.switch = AdapterSwitch()
        self.layers: dict[str, LoraLinear] = {}  # peft-style module path -> wrapper
        self.specs: dict[str, LoraSpec] = {}
        for p in model.parameters():
            p.requires_grad_(False)
        self._wrap()

    def _wrap(self) -> None:
        wanted = set(ATTN_MODULES + MLP_MODULES + UNEMBED_MODULES)
        todo = [
            (name, module)
            for name, module in self.model.named_modules()
            if isinstance(module, nn.Linear) and name.split(".")[-1] in wanted
        ]
        for name, module in todo:
            parent_name, _, attr = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            wrapper = LoraLinear(module, self.switch, attr)
            if attr in UNEMBED_MODULES:
                wrapper.out_buffer = OutputBuffer()
            setattr(parent, attr, wrapper)
            self.layers[name] = wrapper

    def add(self, name: str, spec: LoraSpec, generator: torch.Generator | None = None) -> None:
        """A new adapter: A ~ Kaiming-uniform, B = 0, so it starts as the base model."""
        self.specs[name] = spec
        for wrapper in self.layers.values():
            if wrapper.kind not in spec.targets:
                continue
            base = wrapper.base
            a = torch.empty(
                spec.rank, base.in_features
            )  # drawn on the CPU: seeds mean the same everywhere
            bound = 1.0 / math.sqrt(base.in_features)
            a = a.uniform_(-bound, bound, generator=generator).to(base.weight.device)
            b = torch.zeros(base.out_features, spec.rank, device=base.weight.device)
            wrapper.lora_A[name] = a.requires_grad_(True)
            wrapper.lora_B[name] = b.requires_grad_(True)
            wrapper.scales[name] = spec.scale

    def clone(self, source: str, name: str) -> None:
        """A frozen copy of ``source``'s current weights."""
        self.specs[name] = self.specs[source]
        for wrapper in self.layers.values():
            if source in wrapper.lora_A:
                wrapper.lora_A[name] = wrapper.lora_A[source].detach().clone()
                wrapper.lora_B[name] = wrapper.lora_B[source].detach().clone()
                wrapper.scales[name] = wrapper.scales[source]

    def remove(self, name: str) -> None:
        self.specs.pop(name, None)
        for wrapper in self.layers.values():
            wrapper.lora_A.pop(name, None)
            wrapper.lora_B.pop(name, None)
            wrapper.scales.pop(name, None)
            wrapper._cast.pop(name, None)
        if self.switch.active == name:
            self.switch.active = None

    def parameters(self, name: str) -> list[torch.Tensor]:
        params: list[torch.Tensor] = []
        for wrapper in self.layers.values():
            if name in wrapper.lora_A:
                params += [wrapper.lora_A[name], wrapper.lora_B[name]]
        return params

    def state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """peft's key names, so the folder loads with ``PeftModel.from_pretrained``."""
        state = {}
        for path, wrapper in self.layers.items():
            if name in wrapper.lora_A:
                prefix = f"base_model.model.{path}"
                state[f"{prefix}.lora_A.weight"] = wrapper.lora_A[name].detach().contiguous()
                state[f"{prefix}.lora_B.weight"] = wrapper.lora_B[name].detach().contiguous()
        return state

    def load_state_dict(self, name: str, spec: LoraSpec, state: dict[str, torch.Tensor]) -> None:
        if name not in self.specs:
            self.add(name, spec)
        expected = set(self.state_dict(name))
        if set(state) != expected:
            missing = sorted(expected - set(state))[:3]
            extra = sorted(set(state) - expected)[:3]
            raise ValueError(
                f"adapter weights do not fit this model (missing {missing}, unexpected {extra})"
            )
        with torch.no_grad():
            for path, wrapper in self.layers.items():
                if name in wrapper.lora_A:
                    prefix = f"base_model.model.{path}"
                    wrapper.lora_A[name].copy_(state[f"{prefix}.lora_A.weight"])
                    wrapper.lora_B[name].copy_(state[f"{prefix}.lora_B.weight"])
