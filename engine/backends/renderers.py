"""Chat formatting through tinker-cookbook's renderers, so both services see the same tokens.

Which renderer a model gets (``renderer_name_for``):

- every model Tinker serves: the cookbook's own registry
  (``tinker_cookbook.model_info.get_recommended_renderer_name``), so base models get the
  base renderer and newer families (Llama, DeepSeek, gpt-oss, Kimi, GLM, Nemotron...) their own;
- the local default (SmolLM2), the tiny test model and local model folders: ``SmolLM2Renderer``;
- any other name: a ``RendererError`` that says so, never SmolLM's prompt by accident.

SmolLM2 (and the tiny test model, which shares its tokenizer) use ChatML like Qwen3's
instruct models, but SmolLM2's own chat template adds a default system message when a
conversation has none. ``SmolLM2Renderer`` is the cookbook's Qwen3 instruct renderer plus
that rule, so its tokens equal the model's own template.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tinker_cookbook import renderers
from tinker_cookbook.renderers.qwen3 import Qwen3InstructRenderer

from engine.errors import PersonaError

SMOLLM2_RENDERER = "persona/smollm2"
SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# Names the local backend builds or downloads itself (engine/backends/local/models.py).
LOCAL_MODEL_PREFIXES = ("HuggingFaceTB/SmolLM2", "persona/tiny-random")


class RendererError(PersonaError):
    """No renderer is known for a model name; the message says what to do."""


class SmolLM2Renderer(Qwen3InstructRenderer):
    def _with_default_system(self, messages: list[Any]) -> list[Any]:
        if messages and messages[0]["role"] == "system":
            return messages
        return [{"role": "system", "content": SMOLLM2_DEFAULT_SYSTEM}, *messages]

    def build_generation_prompt(self, messages, *args: Any, **kwargs: Any):  # type: ignore[override]
        return super().build_generation_prompt(
            self._with_default_system(list(messages)), *args, **kwargs
        )

    def build_supervised_example(self, messages, *args: Any, **kwargs: Any):  # type: ignore[override]
        return super().build_supervised_example(
            self._with_default_system(list(messages)), *args, **kwargs
        )


if not renderers.is_renderer_registered(SMOLLM2_RENDERER):
    renderers.register_renderer(
        SMOLLM2_RENDERER, lambda tokenizer, image_processor=None: SmolLM2Renderer(tokenizer)
    )


def is_local_model(model_name: str) -> bool:
    """The local default, the tiny test model, or a model folder on disk."""
    if model_name.startswith(LOCAL_MODEL_PREFIXES):
        return True
    if model_name.startswith(("/", "./", "../", "~")):
        return True
    try:
        return Path(model_name).expanduser().is_dir()
    except OSError:
        return False


def renderer_name_for(model_name: str) -> str:
    """The cookbook renderer name for a policy/teacher/judge model name."""
    if is_local_model(model_name):
        return SMOLLM2_RENDERER
    from tinker_cookbook.model_info import get_recommended_renderer_name

    try:
        return get_recommended_renderer_name(model_name)
    except Exception as e:  # ConfigurationError, KeyError, ValueError: not a model it knows
        raise RendererError(
            f"No chat renderer is known for model {model_name!r} ({type(e).__name__}: {e}). "
            "Use a model Tinker serves (e.g. Qwen/Qwen3-4B-Instruct-2507), the local default "
            "HuggingFaceTB/SmolLM2-135M-Instruct, or the path of a local ChatML model folder."
        ) from None


def get_renderer_for(model_name: str, tokenizer: Any) -> renderers.Renderer:
    return renderers.get_renderer(renderer_name_for(model_name), tokenizer)
