"""Chat formatting through tinker-cookbook's renderers, so both services see the same tokens.

SmolLM2 (and the tiny test model, which shares its tokenizer) use ChatML like Qwen3's
instruct models, but SmolLM2's own chat template adds a default system message when a
conversation has none. ``SmolLM2Renderer`` is the cookbook's Qwen3 instruct renderer plus
that rule, so its tokens equal the model's own template.
"""

from __future__ import annotations

from typing import Any

from tinker_cookbook import renderers
from tinker_cookbook.renderers.qwen3 import Qwen3InstructRenderer

SMOLLM2_RENDERER = "persona/smollm2"
SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


class SmolLM2Renderer(Qwen3InstructRenderer):
    def _with_default_system(self, messages: list[Any]) -> list[Any]:
        if messages and messages[0]["role"] == "system":
            return messages
        return [{"role": "system", "content": SMOLLM2_DEFAULT_SYSTEM}, *messages]

    def build_generation_prompt(self, messages, *args: Any, **kwargs: Any):  # type: ignore[override]
        return super().build_generation_prompt(self._with_default_system(list(messages)), *args, **kwargs)

    def build_supervised_example(self, messages, *args: Any, **kwargs: Any):  # type: ignore[override]
        return super().build_supervised_example(self._with_default_system(list(messages)), *args, **kwargs)


if not renderers.is_renderer_registered(SMOLLM2_RENDERER):
    renderers.register_renderer(SMOLLM2_RENDERER, lambda tokenizer, image_processor=None: SmolLM2Renderer(tokenizer))


def renderer_name_for(model_name: str) -> str:
    """The cookbook renderer name for a policy/teacher/judge model name."""
    lowered = model_name.lower()
    if "qwen3" in lowered:
        return "qwen3_instruct" if "instruct" in lowered else "qwen3"
    if "llama-3" in lowered or "llama3" in lowered:
        return "llama3"
    # The local models (SmolLM2, the tiny test model, any ChatML folder).
    return SMOLLM2_RENDERER


def get_renderer_for(model_name: str, tokenizer: Any) -> renderers.Renderer:
    return renderers.get_renderer(renderer_name_for(model_name), tokenizer)
