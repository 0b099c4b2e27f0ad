"""The local backend: Tinker's client interface computed in-process with PyTorch + LoRA."""

from .models import DEFAULT_MODEL, TINY_MODEL, ensure_model_dir
from .service import LocalSamplingClient, LocalServiceClient, LocalTrainingClient

__all__ = [
    "DEFAULT_MODEL",
    "TINY_MODEL",
    "LocalSamplingClient",
    "LocalServiceClient",
    "LocalTrainingClient",
    "ensure_model_dir",
]
