"""SamplingBatch's packed upload (one host-to-device copy) against per-row tensors built directly, the greedy fast
path that builds no columns, and the chosen token's log-prob (logit - logsumexp) against torch.log_softmax."""
from __future__ import annotations

import random

import pytest
import torch

from qwen_awq.engine.sampler import SamplingBatch, sample
from qwen_awq.engine.sampling_params import SamplingParams


def _random_params(rng: random.Random) -> SamplingParams:
    return SamplingParams(temperature=rng.choice([0.0, 0.3, 1.7]), top_k=rng.choice([0, 1, 5, 10**6]),
                          top_p=rng.choice([1.0, 0.37]), min_p=rng.choice([0.0, 0.05]),
                          repetition_penalty=rng.choice([1.0, 1.13]), presence_penalty=rng.choice([0.0, -0.4]),
                          frequency_penalty=rng.choice([0.0, 0.7]), seed=rng.randrange(100))


@pytest.mark.parametrize("seed", range(5))
def test_packed_columns_equal_per_row_tensors(seed):
    rng = random.Random(seed)
    params = [_random_params(rng) for _ in range(rng.randint(1, 9))]
    if all(p.greedy for p in params):
        params.append(SamplingParams(temperature=0.9))
    batch = SamplingBatch.build(params, [[1, 2]] * len(params), [[3]] * len(params), vocab_size=16)
    f32 = torch.float32
    expected = {
        "temperature": torch.tensor([1.0 if p.greedy else p.temperature for p in params], dtype=f32),
        "top_k": torch.tensor([p.top_k for p in params]), "top_p": torch.tensor([p.top_p for p in params], dtype=f32),
        "min_p": torch.tensor([p.min_p for p in params], dtype=f32),
        "repetition_penalty": torch.tensor([p.repetition_penalty for p in params], dtype=f32),
        "presence_penalty": torch.tensor([p.presence_penalty for p in params], dtype=f32),
        "frequency_penalty": torch.tensor([p.frequency_penalty for p in params], dtype=f32),
        "sample_rows": torch.tensor([i for i, p in enumerate(params) if not p.greedy], dtype=torch.long)}
    for name, want in expected.items():
        got = getattr(batch, name)
        assert got.dtype == want.dtype and torch.equal(got, want), name
    assert batch.sampled == expected["sample_rows"].tolist() and batch.batch_size == len(params)


def test_plain_greedy_batch_builds_no_columns_and_still_honours_min_tokens():
    params = [SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[3]), SamplingParams(temperature=0.0)]
    batch = SamplingBatch.build(params, [[1], [2]], [[], []], vocab_size=8)
    assert batch.temperature is None and batch.sample_rows is None and batch.sampled == []
    logits = torch.zeros(2, 8)
    logits[:, 3] = 5.0  # the best id, banned for row 0 only
    logits[:, 6] = 4.0
    assert sample(logits, batch).tokens.tolist() == [6, 3]


@pytest.mark.parametrize("top", [None, 3])  # None: logit - logsumexp; 3: the top-logprobs path (log_softmax)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_chosen_logprob_equals_log_softmax(dtype, top):
    gen = torch.Generator().manual_seed(7)
    logits = (torch.randn(5, 1000, generator=gen) * 6).to(dtype)  # (B, V_padded); vocab 987
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, seed=1),
              SamplingParams(temperature=0.0, repetition_penalty=1.3), SamplingParams(temperature=1.2, top_p=0.5),
              SamplingParams(temperature=0.0, logprobs=top)]
    out = sample(logits, SamplingBatch.build(params, [[4, 9]] * 5, [[2]] * 5, vocab_size=987))
    reference = logits[:, :987].float().log_softmax(-1).gather(-1, out.tokens[:, None]).squeeze(-1)  # (B,)
    torch.testing.assert_close(out.logprobs, reference, rtol=0, atol=2e-6)
    assert out.logprobs.dtype == torch.float32 and bool((out.logprobs < 0).all())
