"""The local backend: Tinker's client interface computed in-process with PyTorch + LoRA."""

from .hardware import configure_threads
from .models import DEFAULT_MODEL, TINY_MODEL, ensure_model_dir
from .service import LocalSamplingClient, LocalServiceClient, LocalTrainingClient

__all__ = [
    "DEFAULT_MODEL",
    "TINY_MODEL",
    "configure_threads",
    "LocalSamplingClient",
    "LocalServiceClient",
    "LocalTrainingClient",
    "ensure_model_dir",
]
