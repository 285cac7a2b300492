"""The plain random sampling tail: random_rows draws what sample() draws (same seed, same default-generator
stream) and reports the same raw log-probs; plain_random accepts only rows sample() treats that way."""
from __future__ import annotations

import torch

from qwen_awq.engine.sampler import SamplingBatch, plain_random, random_rows, sample
from qwen_awq.engine.sampling_params import SamplingParams


def test_random_rows_equal_sample_under_one_seed():
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(4)) * 3  # (B, V_padded)
    logits[:, 290:] = 50.0  # padding columns: never drawn
    temps = [1.0, 0.7, 1.3, 1.0, 0.2]
    params = [SamplingParams(temperature=t) for t in temps]
    torch.manual_seed(11)
    want = sample(logits, SamplingBatch.build(params, [[1]] * 5, [[]] * 5, vocab_size=290))
    torch.manual_seed(11)
    got = random_rows(logits, 290, torch.tensor(temps))  # (B, 2)
    assert got[:, 0].long().tolist() == want.tokens.tolist()
    assert torch.equal(got[:, 1].float(), want.logprobs)
    assert (got[:, 0] < 290).all()


def test_random_rows_distribution_and_cold_limit():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(20000, 1)  # (N, 4)
    torch.manual_seed(0)
    ids = random_rows(logits, 4, torch.full((20000,), 1.0))[:, 0].long()
    freq = torch.bincount(ids, minlength=4).double() / 20000
    assert torch.allclose(freq, logits[0].double().softmax(-1), atol=0.015)
    cold = random_rows(logits[:50], 4, torch.full((50,), 1e-4))[:, 0]
    assert (cold == 0).all()


def test_plain_random_predicate():
    assert plain_random(SamplingParams(temperature=1.0, top_p=1.0), 0, (), seeded=False)
    assert not plain_random(SamplingParams(temperature=1.0), 0, (), seeded=True)
    assert not plain_random(SamplingParams(temperature=0.0), 0, (), seeded=False)
    assert not plain_random(SamplingParams(temperature=1.0, top_p=0.9), 0, (), seeded=False)
    assert not plain_random(SamplingParams(temperature=1.0, top_k=5), 0, (), seeded=False)
    assert not plain_random(SamplingParams(temperature=1.0, min_p=0.1), 0, (), seeded=False)
    assert not plain_random(SamplingParams(temperature=1.0, logprobs=2), 0, (), seeded=False)
    assert not plain_random(SamplingParams(temperature=1.0, presence_penalty=0.5), 0, (), seeded=False)
    assert not plain_random(SamplingParams(temperature=1.0, min_tokens=2), 1, (5,), seeded=False)
