"""Giving a model's modules of one class a forward of ours, instance by instance (the class
and every other model keep theirs)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn


def route_forward(
    model: nn.Module, class_name: str, needs: str, forward: Callable, **attrs: Any
) -> int:
    """Make ``forward`` the forward of every module of ``model`` whose class is named
    ``class_name`` and that has attribute ``needs``, giving each ``attrs`` as attributes;
    the number routed."""
    count = 0
    for module in model.modules():
        if type(module).__name__ == class_name and hasattr(module, needs):
            for key, value in attrs.items():
                setattr(module, key, value)
            module.forward = forward.__get__(module)
            count += 1
    return count
