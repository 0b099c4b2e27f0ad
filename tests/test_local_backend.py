"""The local service against Tinker's interface, on the tiny random model (fp32, CPU)."""

from __future__ import annotations

import asyncio
import copy
import os
import threading

import pytest
import torch
from tinker import types
from transformers import AutoModelForCausalLM

from engine.backends import BackendConfigError, make_service_client
from engine.backends.local import TINY_MODEL, LocalServiceClient, ensure_model_dir
from engine.backends.local.checkpoint_io import CheckpointNotFoundError
from engine.backends.renderers import get_renderer_for

ADAM = types.AdamParams(learning_rate=1e-2)


@pytest.fixture(scope="module")
def service(tmp_path_factory) -> LocalServiceClient:
    # PERSONA_TEST_DEVICE=cuda runs the same checks on a GPU.
    device = os.environ.get("PERSONA_TEST_DEVICE", "cpu")
    svc = LocalServiceClient(tmp_path_factory.mktemp("ckpt"), device=device, dtype="float32")
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def reference_model():
    """The same tiny model loaded plainly by transformers, to check numbers by hand."""
    model = AutoModelForCausalLM.from_pretrained(ensure_model_dir(TINY_MODEL), dtype=torch.float32)
    return model.eval()


def datum(tokens: list[int], **inputs) -> types.Datum:
    """Input tokens[:-1] predicting tokens[1:], with extra per-position inputs."""
    n = len(tokens) - 1
    loss_inputs = {"target_tokens": types.TensorData.from_torch(torch.tensor(tokens[1:]))}
    for key, values in inputs.items():
        loss_inputs[key] = types.TensorData.from_torch(
            torch.tensor(values[:n], dtype=torch.float32)
        )
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=loss_inputs
    )


def hand_logprobs(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([tokens[:-1]])).logits[0]
    return torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0]


SEQ_A = [1, 4093, 198, 19556, 665, 2, 198, 1, 520, 9531]
SEQ_B = [1, 520, 9531, 198, 26843, 17, 1073]


async def test_losses_match_hand_computation(service, reference_model):
    tc = await service.create_lora_training_client(TINY_MODEL, rank=4, seed=0)
    lp_a, lp_b = hand_logprobs(reference_model, SEQ_A), hand_logprobs(reference_model, SEQ_B)
    w_a = [0, 0, 1, 1, 1, 0.5, 1, 1, 1]
    w_b = [1, 1, 0, 0, 1, 1]

    out = await tc.forward([datum(SEQ_A, weights=w_a), datum(SEQ_B, weights=w_b)], "cross_entropy")
    expected = -(lp_a * torch.tensor(w_a)).sum() - (lp_b * torch.tensor(w_b)).sum()
    assert out.metrics["loss:sum"] == pytest.approx(float(expected), rel=1e-4)
    assert torch.allclose(out.loss_fn_outputs[0]["logprobs"].to_torch(), lp_a, atol=1e-4)

    q_a, q_b = lp_a - 0.3, lp_b + 0.2  # the "sampler's" logprobs
    adv_a, adv_b = [1.0] * 9, [-2.0] * 6
    batch = [
        datum(SEQ_A, logprobs=q_a.tolist(), advantages=adv_a),
        datum(SEQ_B, logprobs=q_b.tolist(), advantages=adv_b),
    ]
    ratio_a, ratio_b = torch.exp(lp_a - q_a), torch.exp(lp_b - q_b)
    is_loss = -(ratio_a * 1.0).sum() - (ratio_b * -2.0).sum()
    out = await tc.forward(batch, "importance_sampling")
    assert out.metrics["loss:sum"] == pytest.approx(float(is_loss), rel=1e-4)

    ppo_a = -torch.minimum(ratio_a * 1.0, ratio_a.clamp(0.8, 1.2) * 1.0).sum()
    ppo_b = -torch.minimum(ratio_b * -2.0, ratio_b.clamp(0.8, 1.2) * -2.0).sum()
    out = await tc.forward(batch, "ppo")
    assert out.metrics["loss:sum"] == pytest.approx(float(ppo_a + ppo_b), rel=1e-4)
    assert float(ratio_a[0]) > 1.2  # the clip really bites in this example


async def test_optim_step_moves_only_lora_weights(service):
    tc = await service.create_lora_training_client(TINY_MODEL, rank=4, seed=0)
    rt = tc._rt
    base_before = {k: v.clone() for k, v in rt.model.state_dict().items() if "lora" not in k}
    lora_before = [p.clone() for p in rt.host.parameters(tc.model_id)]
    for _ in range(2):  # B starts at zero, so A first moves on the second step
        fb = tc.forward_backward([datum(SEQ_A, weights=[1.0] * 9)], "cross_entropy")
        step = tc.optim_step(ADAM)
        await fb
        response = await step
        assert response.metrics["grad_norm"] > 0
    for key, value in rt.model.state_dict().items():
        if key in base_before:
            assert torch.equal(value, base_before[key]), key
    moved = [
        not torch.equal(a, b)
        for a, b in zip(lora_before, rt.host.parameters(tc.model_id), strict=True)
    ]
    assert all(moved)


@pytest.mark.parametrize("clip", [0.0, 0.05])
async def test_optimizer_step_is_the_per_tensor_adamw_bit_for_bit(service, monkeypatch, clip):
    """The multi-tensor AdamW (and the norm-only path without clipping) moves the adapter to
    exactly the weights the per-tensor loop with clip_grad_norm_ gives, and reports the same
    grad_norm."""
    from engine.backends.local import service as service_module

    adam = types.AdamParams(learning_rate=1e-2, weight_decay=0.01, grad_clip_norm=clip)
    batch = [datum(SEQ_A, weights=[1.0] * 9), datum(SEQ_B, weights=[0.0, 0.0, 1, 1, 1, 1])]

    async def train(foreach: bool):
        monkeypatch.setattr(service_module, "ADAM_FOREACH", foreach)
        tc = await service.create_lora_training_client(TINY_MODEL, rank=4, seed=3)
        norms = []
        for _ in range(3):
            fb = tc.forward_backward(batch, "cross_entropy")
            if not foreach:  # the reference: torch's own clip_grad_norm_, even without a limit
                monkeypatch.setattr(
                    type(tc),
                    "_clip_grad_norm",
                    lambda _self, params, max_norm: float(
                        torch.nn.utils.clip_grad_norm_(params, max_norm)
                    ),
                )
            norms.append((await tc.optim_step(adam)).metrics["grad_norm"])
            assert (await fb).metrics["loss:sum"] > 0
        return norms, [p.detach().clone() for p in tc._rt.host.parameters(tc.model_id)]

    norms, weights = await train(True)
    ref_norms, ref_weights = await train(False)
    assert norms == ref_norms
    assert all(torch.equal(a, b) for a, b in zip(weights, ref_weights, strict=True))
    if clip:
        assert max(norms) > clip  # the clip really bites


async def test_training_lowers_the_loss(service):
    tc = await service.create_lora_training_client(TINY_MODEL, rank=8, seed=1)
    batch = [datum(SEQ_A, weights=[1.0] * 9), datum(SEQ_B, weights=[1.0] * 6)]
    losses = []
    for _ in range(6):
        fb = tc.forward_backward(batch, "cross_entropy")
        tc.optim_step(ADAM)
        losses.append((await fb).metrics["loss:sum"])
    assert losses[-1] < 0.7 * losses[0]


async def test_save_load_round_trips_weights_and_optimizer(service):
    tc = await service.create_lora_training_client(TINY_MODEL, rank=4, seed=0)
    batch = [datum(SEQ_A, weights=[1.0] * 9)]
    for _ in range(2):
        tc.forward_backward(batch, "cross_entropy")
        await tc.optim_step(ADAM)
    saved = await tc.save_state("two-steps")
    assert saved.path.startswith("local://")
    before = (await tc.forward(batch, "cross_entropy")).loss_fn_outputs[0]["logprobs"].to_torch()

    restored = await service.create_training_client_from_state_with_optimizer(saved.path)
    after = (
        (await restored.forward(batch, "cross_entropy")).loss_fn_outputs[0]["logprobs"].to_torch()
    )
    assert torch.allclose(before, after, atol=1e-6)
    original_state = tc._optimizer.state_dict()["state"]
    restored_state = restored._optimizer.state_dict()["state"]
    assert restored._step == 2
    assert all(
        torch.equal(original_state[k]["exp_avg"], restored_state[k]["exp_avg"])
        for k in original_state
    )

    # The next step from either client lands on the same weights.
    for client in (tc, restored):
        client.forward_backward(batch, "cross_entropy")
        await client.optim_step(ADAM)
    a = (await tc.forward(batch, "cross_entropy")).metrics["loss:sum"]
    b = (await restored.forward(batch, "cross_entropy")).metrics["loss:sum"]
    assert a == pytest.approx(b, rel=1e-5)

    weights_only = await service.create_training_client_from_state(saved.path)
    assert weights_only._optimizer is None


async def test_saved_sampler_weights_load_in_peft(service):
    from peft import PeftModel

    tc = await service.create_lora_training_client(TINY_MODEL, rank=4, seed=0, train_unembed=False)
    tc.forward_backward([datum(SEQ_A, weights=[1.0] * 9)], "cross_entropy")
    await tc.optim_step(types.AdamParams(learning_rate=5e-2))
    path = (await tc.save_weights_for_sampler("peft-check")).path
    sampler = await service.create_sampling_client(model_path=path)
    ours = await sampler.compute_logprobs(types.ModelInput.from_ints(SEQ_A))

    base = AutoModelForCausalLM.from_pretrained(ensure_model_dir(TINY_MODEL), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, path.removeprefix("local://")).eval()
    theirs = hand_logprobs(peft_model, SEQ_A)
    assert ours[0] is None
    assert torch.allclose(torch.tensor(ours[1:]), theirs, atol=1e-4)


async def test_sampling_honours_params(service):
    tc = await service.create_lora_training_client(TINY_MODEL, rank=4, seed=0)
    sampler = await tc.save_weights_and_get_sampling_client()
    tokenizer = sampler.get_tokenizer()
    prompt = types.ModelInput.from_ints(SEQ_A)

    params = types.SamplingParams(max_tokens=12, temperature=1.0, seed=7)
    result = await sampler.sample(prompt, 5, params)
    assert len(result.sequences) == 5
    assert all(len(s.tokens) <= 12 and len(s.logprobs) == len(s.tokens) for s in result.sequences)
    assert any(s.stop_reason == "length" for s in result.sequences)
    again = await sampler.sample(prompt, 5, params)
    assert [s.tokens for s in again.sequences] == [s.tokens for s in result.sequences]
    other = await sampler.sample(
        prompt, 5, types.SamplingParams(max_tokens=12, temperature=1.0, seed=8)
    )
    assert [s.tokens for s in other.sequences] != [s.tokens for s in result.sequences]

    # Stop on a string: pick a string the unconstrained sample contains, then ask to stop there.
    long = (
        await sampler.sample(prompt, 1, types.SamplingParams(max_tokens=30, temperature=0.0))
    ).sequences[0]
    text = tokenizer.decode(long.tokens)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip()
    cut = (
        await sampler.sample(
            prompt, 1, types.SamplingParams(max_tokens=30, temperature=0.0, stop=[stop])
        )
    ).sequences[0]
    assert cut.stop_reason == "stop"
    assert stop in tokenizer.decode(cut.tokens)
    assert stop not in tokenizer.decode(cut.tokens[:-1])  # the stop is included, nothing after it
    assert cut.tokens == long.tokens[: len(cut.tokens)]

    # Stop on a token id.
    stop_id = long.tokens[4]
    by_id = (
        await sampler.sample(
            prompt, 1, types.SamplingParams(max_tokens=30, temperature=0.0, stop=[stop_id])
        )
    ).sequences[0]
    assert by_id.tokens[-1] == stop_id and by_id.stop_reason == "stop"


async def test_sample_logprobs_match_compute_logprobs(service):
    tc = await service.create_lora_training_client(TINY_MODEL, rank=4, seed=0)
    tc.forward_backward([datum(SEQ_A, weights=[1.0] * 9)], "cross_entropy")
    await tc.optim_step(ADAM)
    sampler = await tc.save_weights_and_get_sampling_client()
    seqs = (
        await sampler.sample(
            types.ModelInput.from_ints(SEQ_B),
            3,
            types.SamplingParams(max_tokens=10, temperature=1.0, seed=3),
        )
    ).sequences
    for seq in seqs:
        full = await sampler.compute_logprobs(types.ModelInput.from_ints(SEQ_B + seq.tokens))
        assert full[0] is None
        assert torch.allclose(
            torch.tensor(full[-len(seq.tokens) :]), torch.tensor(seq.logprobs), atol=1e-4
        )


async def test_snapshot_is_frozen_while_training_continues(service):
    tc = await service.create_lora_training_client(TINY_MODEL, rank=4, seed=0)
    batch = [datum(SEQ_A, weights=[1.0] * 9)]
    tc.forward_backward(batch, "cross_entropy")
    await tc.optim_step(ADAM)
    snapshot = await tc.save_weights_and_get_sampling_client()
    probe = types.ModelInput.from_ints(SEQ_B)
    before = await snapshot.compute_logprobs(probe)
    for _ in range(3):
        tc.forward_backward(batch, "cross_entropy")
        await tc.optim_step(ADAM)
    assert await snapshot.compute_logprobs(probe) == before
    live = await tc.save_weights_and_get_sampling_client()
    assert await live.compute_logprobs(probe) != before
    base = await service.create_sampling_client(base_model=TINY_MODEL)
    assert await base.compute_logprobs(probe) != before


async def test_requests_run_in_submission_order(service):
    tc = await service.create_lora_training_client(TINY_MODEL, rank=4, seed=0)
    batch = [datum(SEQ_A, weights=[1.0] * 9)]
    futures = []
    for _ in range(3):  # submit everything before awaiting anything
        futures.append(tc.forward_backward(batch, "cross_entropy"))
        futures.append(tc.optim_step(ADAM))
    futures.append(tc.forward(batch, "cross_entropy"))
    results = [await f for f in futures]
    losses = [r.metrics["loss:sum"] for r in results[0:6:2]] + [results[6].metrics["loss:sum"]]
    assert losses == sorted(losses, reverse=True) and len(set(losses)) == 4
    assert tc._step == 3


async def test_event_loop_stays_responsive_while_training(service):
    """Training requests return futures at once and compute on the service's thread: the
    event loop runs other work while they are pending. The compute thread is held busy by
    a gate, so this is a state the test controls, not a race against the machine's speed."""
    tc = await service.create_lora_training_client(TINY_MODEL, rank=4, seed=0)
    long_batch = [datum(list(range(3, 400)), weights=[1.0] * 396)] * 2
    gate = threading.Event()
    busy = service.run_on_compute_thread(lambda: gate.wait(600))  # bound only if it hangs
    fb = tc.forward_backward(long_batch, "cross_entropy")
    step = tc.optim_step(ADAM)
    assert not fb.future().done() and not step.future().done()  # queued, not yet computed
    other = asyncio.create_task(asyncio.sleep(0, result="ran"))
    assert await other == "ran"  # the loop ran another task while training was pending
    assert not fb.future().done()
    gate.set()
    assert await busy is True
    out = await fb
    await step
    assert out.metrics["loss:sum"] > 0
    assert tc._step == 1


async def test_bad_input_is_reported_and_the_service_keeps_working(service):
    tc = await service.create_lora_training_client(TINY_MODEL, rank=4, seed=0)
    good = datum(SEQ_A, weights=[1.0] * 9)
    with pytest.raises(ValueError, match="Empty batch"):
        tc.forward_backward([], "cross_entropy")
    with pytest.raises(ValueError, match="Unsupported loss_fn 'dro'"):
        tc.forward_backward([good], "dro")
    mismatched = types.Datum(
        model_input=types.ModelInput.from_ints(SEQ_A[:-1]),
        loss_fn_inputs={"target_tokens": SEQ_A[1:4], "weights": [1.0, 1.0, 1.0]},
    )
    with pytest.raises(
        ValueError, match=r"Datum 1: loss_fn_inputs\['target_tokens'\] has length 3"
    ):
        tc.forward_backward([good, mismatched], "cross_entropy")
    with pytest.raises(ValueError, match="needs loss_fn_inputs\\['logprobs'\\]"):
        tc.forward_backward([good], "importance_sampling")
    with pytest.raises(CheckpointNotFoundError, match="No local checkpoint"):
        service.create_training_client_from_state("/nonexistent/checkpoint")
    with pytest.raises(CheckpointNotFoundError, match="Tinker checkpoint"):
        service.create_sampling_client(model_path="tinker://run/sampler_weights/x")
    with pytest.raises(ValueError, match="Unknown base_model 'no/such-model'"):
        await service.create_lora_training_client("no/such-model")
    out = await tc.forward_backward([good], "cross_entropy")  # still serving
    assert out.metrics["loss:sum"] > 0


async def test_cookbook_style_sync_use(service):
    """tinker-cookbook's DPO loop uses the creation future as the client, synchronously."""
    tc = service.create_lora_training_client(TINY_MODEL, rank=4)
    reference = tc.save_weights_and_get_sampling_client()
    logprobs = reference.compute_logprobs(types.ModelInput.from_ints(SEQ_B)).result()
    assert len(logprobs) == len(SEQ_B)
    assert (
        (await tc.forward_backward_async([datum(SEQ_A, weights=[1.0] * 9)], "cross_entropy"))
        .result()
        .metrics
    )


def test_renderer_matches_the_models_chat_template():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ensure_model_dir(TINY_MODEL))
    renderer = get_renderer_for(TINY_MODEL, tokenizer)
    for convo in (
        [{"role": "user", "content": "Write to Dr. Lee about my cleaning."}],
        [
            {"role": "system", "content": "You write like Sam: short, warm, signed '- S'."},
            {"role": "user", "content": "Decline the panel, politely.\nThanks!"},
            {"role": "assistant", "content": "Hi Ana,\n\nI can't make it this time.\n\n- S"},
            {"role": "user", "content": "Shorter?"},
        ],
    ):
        ours = renderer.build_generation_prompt(convo).to_ints()
        theirs = tokenizer.apply_chat_template(
            convo, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert ours == theirs
    full = [*convo, {"role": "assistant", "content": "Sure.\n\n- S"}]
    supervised, weights = renderer.build_supervised_example(full)
    template = tokenizer.apply_chat_template(full, tokenize=True, return_dict=False)
    assert supervised.to_ints() == template[: supervised.length]
    assert template[supervised.length :] == tokenizer.encode(
        "\n"
    )  # only the template's trailing newline
    assert (
        tokenizer.decode(
            [t for t, w in zip(supervised.to_ints(), weights.tolist(), strict=True) if w]
        )
        == "Sure.\n\n- S<|im_end|>"
    )
    assert renderer.get_stop_sequences() == [tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_tinker_backend_needs_a_key():
    with pytest.raises(BackendConfigError, match="TINKER_API_KEY"):
        make_service_client("tinker", env={})
    with pytest.raises(BackendConfigError, match="Unknown backend"):
        make_service_client("gpu-cluster", env={})


async def test_concurrent_compute_logprobs_batch_and_match_single(service):
    sampler = await service.create_sampling_client(base_model=TINY_MODEL)
    rows = [SEQ_A, SEQ_B, SEQ_A[:4], [5]]
    together = await asyncio.gather(
        *(sampler.compute_logprobs(types.ModelInput.from_ints(r)) for r in rows)
    )
    for row, values in zip(rows, together, strict=True):
        alone = await sampler.compute_logprobs(types.ModelInput.from_ints(row))
        assert len(values) == len(row) and values[0] is None
        assert torch.allclose(torch.tensor(values[1:]), torch.tensor(alone[1:]), atol=1e-5)
    last_two = await sampler.compute_logprobs(
        types.ModelInput.from_ints(SEQ_A), prompt_logprobs_last_n=2
    )
    assert last_two[:-2] == [None] * (len(SEQ_A) - 2) and last_two[-2:] == together[0][-2:]


def test_rows_that_differ_in_their_last_token_share_one_forward_pass(runtime):
    """A judge scores "[RESULT] A" and "[RESULT] B" after the same prompt: one forward pass
    serves both, and every value is the one the row gets scored alone."""
    prompt = SEQ_A[:-1]
    rows = [prompt + [17], prompt + [23], SEQ_B, prompt + [17]]
    forwarded: list[int] = []
    hook = runtime.model.register_forward_pre_hook(
        lambda _m, _a, kw: forwarded.append(kw["input_ids"].numel()), with_kwargs=True
    )
    try:
        together = runtime.score_rows(None, rows)
    finally:
        hook.remove()
    # The prompt once and SEQ_B's inputs once (padded to the prompt's length at most), not
    # four rows.
    assert sum(forwarded) <= 2 * len(prompt)
    for row, values in zip(rows, together, strict=True):
        alone = runtime.token_logprobs(None, [row[:-1]], [row[1:]], grad=False)[0]
        assert values[0] is None and len(values) == len(row)
        assert torch.allclose(torch.tensor(values[1:]), alone, atol=1e-6)
    assert together[0] == together[3] and together[0][-1] != together[1][-1]
    assert together[0][:-1] == together[1][:-1]


@pytest.mark.parametrize("same_length", [True, False])
def test_positions_without_gradient_leave_the_output_layers_backward(same_length, monkeypatch):
    """With the full-logits output layer (CHUNKED_HEAD off; tests/test_chunked_head.py covers
    the chunked one): positions whose weight is 0 (an SFT row's prompt, a judge prompt's all
    but the verdict) get their logits outside the graph: the same logprobs and the same LoRA
    gradients (the output layer's included), with only the weighted rows in its backward."""
    from engine.backends.local import compute
    from engine.backends.local.compute import BaseRuntime
    from engine.backends.local.lora import ATTN_MODULES, MLP_MODULES, UNEMBED_MODULES, LoraSpec
    from engine.backends.local.models import choose_compute

    monkeypatch.setattr(compute, "CHUNKED_HEAD", False)
    rt = BaseRuntime(TINY_MODEL, choose_compute("cpu", "fp32"))
    rt.host.add("a", LoraSpec(4, 8.0, ATTN_MODULES + MLP_MODULES + UNEMBED_MODULES), None)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in rt.host.parameters("a"):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    rows = [SEQ_A, SEQ_A[::-1]] if same_length else [SEQ_A, SEQ_B]
    inputs, targets = [r[:-1] for r in rows], [r[1:] for r in rows]
    weights = [[0.0] * (len(x) - 3) + [1.0, 0.5, 1.0] for x in inputs]
    live = [[w != 0 for w in row] for row in weights]

    def run(live_rows):
        for p in rt.host.parameters("a"):
            p.grad = None
        head_rows: list[int] = []
        hook = rt.model.get_output_embeddings().register_forward_hook(
            lambda _m, args, _out: (
                head_rows.append(args[0].shape[0]) if torch.is_grad_enabled() else None
            )
        )
        try:
            logps = rt.token_logprobs("a", inputs, targets, grad=True, live=live_rows)
            loss = -sum((lp * torch.tensor(w)).sum() for lp, w in zip(logps, weights, strict=True))
            loss.backward()
        finally:
            hook.remove()
        grads = [p.grad.clone() for p in rt.host.parameters("a")]
        return [lp.detach() for lp in logps], grads, head_rows

    split_lp, split_grads, split_rows = run(live)
    full_lp, full_grads, full_rows = run(None)
    assert split_rows == [3 * len(rows)]  # only the weighted positions, in the graph
    assert full_rows[0] >= sum(len(x) for x in inputs)
    for a, b in zip(split_lp, full_lp, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert any(g.abs().sum() > 0 for g in split_grads)
    for a, b in zip(split_grads, full_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


# ---- speed work: fast decoder, continuous batching, threads, dtype ----------


def _rows(rt, prompt, n, max_tokens, *, temperature=0.0, seed=0, stop_ids=frozenset()):
    from engine.backends.local.compute import GenRow, make_generator

    g = make_generator(seed)
    return [GenRow(prompt, max_tokens, temperature, 1.0, -1, stop_ids, (), g) for _ in range(n)]


@pytest.fixture(scope="module")
def runtime():
    from engine.backends.local.compute import BaseRuntime
    from engine.backends.local.models import choose_compute

    rt = BaseRuntime(TINY_MODEL, choose_compute("cpu", "fp32"))
    assert rt.decoder is not None  # the tiny Llama takes the fast path
    return rt


def test_fast_decoder_matches_transformers(runtime):
    rows = _rows(runtime, SEQ_A, 2, 20) + _rows(runtime, SEQ_B, 1, 7) + _rows(runtime, [5], 1, 12)
    fast = runtime.generate(None, rows)
    slow = runtime._generate_hf(None, rows)
    for f, s in zip(fast, slow, strict=True):
        assert f.tokens == s.tokens and f.stop_reason == s.stop_reason
        assert torch.allclose(torch.tensor(f.logprobs), torch.tensor(s.logprobs), atol=1e-4)


@pytest.mark.parametrize("pack", [True, False])
def test_fast_decoder_with_an_adapter_matches_transformers(monkeypatch, pack):
    """The fused step (prepacked or plain weights, as on a GPU) with a LoRA adapter on every
    layer, q|k|v stacked into one matmul pair: the same greedy tokens and logprobs as the
    model's own forward with the adapter."""
    from engine.backends.local import decode
    from engine.backends.local.compute import BaseRuntime
    from engine.backends.local.lora import ATTN_MODULES, MLP_MODULES, UNEMBED_MODULES, LoraSpec
    from engine.backends.local.models import choose_compute

    monkeypatch.setattr(decode, "PACK_WEIGHTS", pack)
    rt = BaseRuntime(TINY_MODEL, choose_compute("cpu", "fp32"))
    spec = LoraSpec(4, 8.0, ATTN_MODULES + MLP_MODULES + UNEMBED_MODULES)
    rt.host.add("a", spec, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in rt.host.parameters("a"):
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    rows = _rows(rt, SEQ_A, 2, 16) + _rows(rt, SEQ_B, 1, 9)
    fast = rt.generate("a", rows)
    slow = rt._generate_hf("a", rows)
    base = rt.generate(None, rows)
    assert [f.tokens for f in fast] != [b.tokens for b in base]  # the adapter is applied
    for f, s in zip(fast, slow, strict=True):
        assert f.tokens == s.tokens
        assert torch.allclose(torch.tensor(f.logprobs), torch.tensor(s.logprobs), atol=1e-4)
    # A changed adapter is picked up on the next batch (its stacked copy is rebuilt).
    with torch.no_grad():
        for p in rt.host.parameters("a"):
            p.mul_(-1.0)
    assert [r.tokens for r in rt.generate("a", rows)] == [
        r.tokens for r in rt._generate_hf("a", rows)
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoder_norm_and_rotation_are_the_models_own_numbers(runtime, dtype):
    """The decode step's RMSNorm and rotary embedding give the model's numbers bit for bit,
    and the norm leaves its input (the residual stream) as it was."""
    from engine.backends.local import norms

    norm = copy.deepcopy(runtime.model.model.norm).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, norm.weight.numel()))
    x = (torch.randn(7, norm.weight.numel(), generator=torch.Generator().manual_seed(0)) * 3).to(
        dtype
    )
    before = x.clone()
    with torch.no_grad():
        assert torch.equal(norms.rms_norm(x, norm), type(norm).forward(norm, x))
    assert torch.equal(x, before)

    dec = runtime.decoder
    cos, sin = (t.to(dtype) for t in dec._rope_table())
    signed = dec._signed_sin.to(dtype)
    pos = torch.tensor([0, 3, 17, 200])
    q = torch.randn(4, 5, dec.head_dim, generator=torch.Generator().manual_seed(1)).to(dtype)
    expected = dec._rotate(q, cos[pos][:, None], sin[pos][:, None])
    assert torch.equal(dec._rotate_signed(q, cos[pos][:, None], signed[pos][:, None]), expected)


def test_rows_sampled_from_one_prompt_report_the_models_logprobs(runtime):
    """Rows of one request stand at the same position every step (the decode step writes
    their keys and values with one slice, not a scatter): each row's sampled tokens carry
    the logprobs the model gives that row's own text, so no row sees another's cache."""
    out = runtime.generate(None, _rows(runtime, SEQ_A, 4, 24, temperature=1.0, seed=3))
    assert len({tuple(r.tokens) for r in out}) == 4  # the rows went their own ways
    inputs = [SEQ_A + r.tokens[:-1] for r in out]
    targets = [SEQ_A[1:] + r.tokens for r in out]
    scored = runtime.token_logprobs(None, inputs, targets, grad=False)
    for r, lp in zip(out, scored, strict=True):
        assert torch.allclose(torch.tensor(r.logprobs), lp[len(SEQ_A) - 1 :], atol=1e-4)


def test_seeded_sample_is_the_same_alone_or_in_a_batch(runtime):
    alone = runtime.generate(None, _rows(runtime, SEQ_A, 3, 15, temperature=1.0, seed=11))
    mixed = runtime.generate(
        None,
        _rows(runtime, SEQ_B, 2, 9, temperature=1.0, seed=5)
        + _rows(runtime, SEQ_A, 3, 15, temperature=1.0, seed=11),
    )
    assert [r.tokens for r in mixed[2:]] == [r.tokens for r in alone]


def test_one_row_on_the_plain_weights_draws_what_it_draws_among_packed_rows(runtime):
    """In float32 a step of one or two rows multiplies by the plain weights and a wider one by
    oneDNN's packed copy: a seeded row gets the same tokens either way."""
    from engine.backends.local import decode

    layer = runtime.decoder._fused()[0]["qkv"]
    if layer.packed is None:
        pytest.skip("oneDNN cannot pack weights here")
    assert layer.plain_rows == decode.PLAIN_MAX_ROWS_FP32 >= 1 and layer.weight is not None
    alone = runtime.generate(None, _rows(runtime, SEQ_A, 1, 15, temperature=1.0, seed=11))
    mixed = runtime.generate(
        None,
        _rows(runtime, SEQ_B, 3, 15, temperature=1.0, seed=5)
        + _rows(runtime, SEQ_A, 1, 15, temperature=1.0, seed=11),
    )
    assert mixed[3].tokens == alone[0].tokens
    assert torch.allclose(
        torch.tensor(mixed[3].logprobs), torch.tensor(alone[0].logprobs), atol=1e-5
    )


def test_requests_join_a_running_pass_and_finish_on_their_own(runtime):
    finished: list[str] = []
    results: dict[str, list] = {}

    def request(name, rows, cancelled=lambda: False):
        def done(out):
            finished.append(name)
            results[name] = out

        return (rows, done, cancelled)

    polls = 0
    cancel_now = False

    def poll(room):
        nonlocal polls, cancel_now
        polls += 1
        if polls == 3:  # arrives while "long" is mid-pass
            return [request("late", _rows(runtime, SEQ_B, 2, 4))]
        if polls == 5:
            cancel_now = True
        return []

    runtime.generate_stream(
        None,
        [
            request("long", _rows(runtime, SEQ_A, 2, 40)),
            request("doomed", _rows(runtime, [5, 6], 1, 500), lambda: cancel_now),
        ],
        poll,
        64,
    )
    assert finished == ["late", "long"]  # the late short request resolved first
    assert "doomed" not in results  # cancelled: dropped, never delivered
    assert polls < 60  # the cancelled 500-token row did not keep the pass going
    alone = runtime.generate(None, _rows(runtime, SEQ_B, 2, 4))
    assert [r.tokens for r in results["late"]] == [r.tokens for r in alone]


async def test_a_cancelled_sample_is_dropped(service):
    sampler = await service.create_sampling_client(base_model=TINY_MODEL)
    prompt = types.ModelInput.from_ints(SEQ_A)
    long = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=1500, temperature=1.0, seed=1))
    assert long.future().cancel()  # still pending while it generates: cancel works
    quick = await sampler.sample(prompt, 2, types.SamplingParams(max_tokens=3, temperature=1.0))
    assert len(quick.sequences) == 2
    assert long.future().cancelled()


def test_configure_threads(monkeypatch):
    from engine.backends.local import hardware

    before = torch.get_num_threads()
    try:
        assert hardware.configure_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("PERSONA_THREADS", "2")
        assert hardware.configure_threads(None) == 2 and torch.get_num_threads() == 2
        assert hardware.configure_threads(1) == 1  # an explicit count wins over the env
        monkeypatch.delenv("PERSONA_THREADS")
        monkeypatch.setattr(hardware, "usable_cpus", lambda: 2)
        monkeypatch.setattr(hardware, "load_average", lambda: 1.2)
        assert hardware.configure_threads(0) == 1  # one of two cores busy: one thread
        monkeypatch.setattr(hardware, "load_average", lambda: 0.1)
        assert hardware.configure_threads(0) == 2
    finally:
        torch.set_num_threads(before)
    assert hardware.auto_threads(cpus=2, load=0.1) == 2
    assert hardware.auto_threads(cpus=2, load=1.2) == 1
    assert hardware.auto_threads(cpus=2, load=5.0) == 1
    assert hardware.auto_threads(cpus=16, load=3.0) == 13


def test_dtype_names_and_override(monkeypatch):
    from engine.backends.local.models import choose_compute

    assert choose_compute("cpu", "bf16").dtype_name == "bfloat16"
    assert choose_compute("cpu", "fp32").dtype_name == "float32"
    monkeypatch.setenv("PERSONA_DTYPE", "fp32")
    assert choose_compute("cpu").dtype_name == "float32"
    with pytest.raises(ValueError, match="bf16 or fp32"):
        choose_compute("cpu", "int4")
