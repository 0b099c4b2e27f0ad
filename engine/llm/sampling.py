"""Sample a model on chat messages: prompt with the renderer, decode, clean.

Shared by every stage that samples (baseline, prompting, synthesis, SFT outputs).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, TypeVar

import tinker

from engine.llm.fixups import strip_chat_tokens, trim_repetition
from engine.run.context import StageContext
from engine.run.futures import as_completed_tasks, resolve

__all__ = ["Sampler", "as_completed_tasks", "open_sampler", "resolve"]
from engine.store.settings import SamplingConfig

T = TypeVar("T")


def message_text(message: Any) -> str:
    content = (
        message.get("content", "") if isinstance(message, dict) else getattr(message, "content", "")
    )
    if isinstance(content, str):
        return content
    parts = []
    for p in content or []:
        if isinstance(p, dict) and p.get("type", "text") == "text":
            parts.append(str(p.get("text", "")))
        elif isinstance(p, str):
            parts.append(p)
    return "".join(parts)


@dataclass
class Sampler:
    client: Any
    renderer: Any
    tokenizer: Any
    model: str

    def decode(self, tokens: Sequence[int]) -> str:
        try:
            message, _status = self.renderer.parse_response(list(tokens))
            text = message_text(message)
        except Exception:
            text = self.tokenizer.decode(list(tokens), skip_special_tokens=True)
        return strip_chat_tokens(text).strip()

    async def generate(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int = 160,
        temperature: float = 0.7,
        top_p: float = 0.95,
        seed: int | None = None,
        num_samples: int = 1,
        trim_repeats: bool = True,
    ) -> list[str]:
        counted = await self.generate_counted(
            messages,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            num_samples=num_samples,
            trim_repeats=trim_repeats,
        )
        return [text for text, _tokens in counted]

    async def generate_counted(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int = 160,
        temperature: float = 0.7,
        top_p: float = 0.95,
        seed: int | None = None,
        num_samples: int = 1,
        trim_repeats: bool = True,
    ) -> list[tuple[str, int]]:
        """Like :meth:`generate`, each text with the number of tokens the model sampled."""
        prompt = self.renderer.build_generation_prompt(messages)
        params = tinker.SamplingParams(
            max_tokens=int(max_tokens),
            temperature=float(temperature),
            top_p=float(top_p),
            seed=seed,
            stop=self.renderer.get_stop_sequences(),
        )
        result = await resolve(
            self.client.sample(prompt=prompt, num_samples=num_samples, sampling_params=params)
        )
        out = []
        for seq in result.sequences:
            text = self.decode(seq.tokens)
            out.append((trim_repetition(text) if trim_repeats else text, len(seq.tokens)))
        return out


async def open_sampler(
    ctx: StageContext, *, role: str = "policy", model_path: str | None = None
) -> Sampler:
    """A sampler for a role's base model, or for a saved checkpoint (``model_path``) of the policy."""
    from engine.backends.renderers import get_renderer_for

    model = ctx.model(role)
    svc = ctx.service_client()
    if model_path:
        client = await resolve(svc.create_sampling_client(model_path=model_path, base_model=model))
    else:
        client = await resolve(svc.create_sampling_client(base_model=model))
    tokenizer = client.get_tokenizer()
    return Sampler(
        client=client, renderer=get_renderer_for(model, tokenizer), tokenizer=tokenizer, model=model
    )


def sampling_kwargs(section: SamplingConfig) -> dict[str, Any]:
    return {
        "max_tokens": section.max_tokens,
        "temperature": section.temperature,
        "top_p": section.top_p,
        "trim_repeats": section.trim_repeats,
    }


async def generate_many(
    ctx: StageContext,
    sampler: Sampler,
    conversations: list[list[dict[str, str]]],
    *,
    concurrency: int = 16,
    seed: int = 0,
    **kwargs: Any,
) -> AsyncIterator[tuple[int, str]]:
    """Yield (index, text) as each conversation's sample completes, at most ``concurrency`` in flight.

    Stops early (cancelling what is queued) once the context is cancelled.
    """
    sem = asyncio.Semaphore(max(1, int(concurrency)))

    async def one(i: int, msgs: list[dict[str, str]]) -> tuple[int, str]:
        async with sem:
            ctx.check_cancel()
            texts = await sampler.generate(msgs, seed=seed + i, **kwargs)
            return i, texts[0] if texts else ""

    async with aclosing(as_completed_tasks(one(i, m) for i, m in enumerate(conversations))) as done:
        async for result in done:
            yield result
            ctx.check_cancel()
