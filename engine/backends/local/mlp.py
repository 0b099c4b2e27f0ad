"""The MLP's gate and up projections, which read the same input, as one LoRA autograd node
(``lora.shared_input``); the rest is the model's own ``down(act(gate) * up)``."""

from __future__ import annotations

import torch
from torch import nn

from . import lora
from .routing import route_forward


def _mlp_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate, up = lora.shared_input(x, (module.gate_proj, module.up_proj))
    return module.down_proj(module.act_fn(gate) * up)


def install(model: nn.Module) -> int:
    """Route every LlamaMLP of ``model`` through ``_mlp_forward``; the number routed."""
    return route_forward(model, "LlamaMLP", "act_fn", _mlp_forward)
