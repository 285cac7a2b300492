"""Sampler tests: masks on hand-made logits, penalties vs direct formulas and HF's processors, seeding,
and sample frequencies vs the softmax (chi-square)."""
from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from qwen_awq.engine.sampler import (
    SampleOutput,
    SamplingBatch,
    apply_min_p,
    apply_presence_frequency,
    apply_repetition_penalty,
    apply_top_k_top_p,
    fast_top_k_top_p,
    make_generator,
    sample,
)
from qwen_awq.engine.sampling_params import SamplingParams
from qwen_awq.errors import SamplingError

# Probabilities chosen so every top_p boundary below is far from a rounding tie.
PROBS = torch.tensor([0.05, 0.5, 0.1, 0.2, 0.15])  # ranked: id1 .5, id3 .2, id4 .15, id2 .1, id0 .05
LOGITS = PROBS.log()[None, :] + 2.0  # (1, 5); the offset checks that only ratios matter
# scipy.stats.chi2.ppf(1 - 1e-6, df=7): a correct sampler fails this bound once in a million runs.
CHI2_DF7_P1E6 = 40.52


def survivors(masked: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(masked[0])).flatten().tolist())


def make_batch(params: list[SamplingParams], vocab: int, prompts=None, outputs=None, **kw) -> SamplingBatch:
    prompts = prompts if prompts is not None else [[] for _ in params]
    outputs = outputs if outputs is not None else [[] for _ in params]
    return SamplingBatch.build(params, prompts, outputs, vocab, **kw)


def test_greedy_is_argmax_and_ignores_padded_columns():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 40, generator=gen) * 3  # (B, V_padded)
    logits[:, 32:] = 100.0  # padding columns must never win
    params = [SamplingParams(temperature=0.0, top_p=0.5, top_k=3) for _ in range(6)]
    out = sample(logits, make_batch(params, vocab=32))
    assert out.tokens.tolist() == logits[:, :32].argmax(-1).tolist()
    expected = logits[:, :32].log_softmax(-1).gather(-1, out.tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(out.logprobs, expected)


@pytest.mark.parametrize(("top_k", "top_p", "expected"), [
    (0, 1.0, {0, 1, 2, 3, 4}),
    (1, 1.0, {1}),
    (3, 1.0, {1, 3, 4}),
    (9, 1.0, {0, 1, 2, 3, 4}),   # k above the vocabulary keeps everything
    (0, 0.4, {1}),
    (0, 0.6, {1, 3}),            # mass before id3 is .5 < .6
    (0, 0.75, {1, 3, 4}),        # mass before id4 is .7 < .75
    (0, 0.9, {1, 3, 4, 2}),
    (3, 0.55, {1}),              # renormalized over top 3: .5/.85 = .588 >= .55 already
    (2, 0.75, {1, 3}),
])
def test_top_k_top_p_surviving_sets(top_k, top_p, expected):
    for fn in (apply_top_k_top_p, fast_top_k_top_p):
        masked = fn(LOGITS.clone(), torch.tensor([top_k]), torch.tensor([top_p]))
        assert survivors(masked) == expected, fn.__name__
        kept = sorted(expected)
        torch.testing.assert_close(masked[0, kept], LOGITS[0, kept])  # survivors keep their logits


@pytest.mark.parametrize(("min_p", "expected"), [
    (0.0, {0, 1, 2, 3, 4}), (0.09, {0, 1, 2, 3, 4}), (0.25, {1, 3, 4}), (0.35, {1, 3}), (1.0, {1})])
def test_min_p_surviving_sets(min_p, expected):
    # threshold = min_p * 0.5; 0.09 -> .045 keeps id0 (.05), 0.25 -> .125 drops id2 (.1)
    assert survivors(apply_min_p(LOGITS.clone(), torch.tensor([min_p]))) == expected


def test_truncation_matches_hf_warpers_per_row():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 64, generator=gen) * 2  # (B, V)
    top_k = torch.tensor([0, 5, 20, 1, 64])
    top_p = torch.tensor([0.3, 1.0, 0.8, 0.9, 0.95])
    min_p = torch.tensor([0.0, 0.2, 0.05, 0.0, 0.1])
    ours = apply_min_p(apply_top_k_top_p(logits.clone(), top_k, top_p), min_p)
    for row in range(5):
        ref = logits[row: row + 1].clone()
        if top_k[row] > 0:
            ref = TopKLogitsWarper(int(top_k[row]))(None, ref)
        if top_p[row] < 1:
            ref = TopPLogitsWarper(float(top_p[row]))(None, ref)
        if min_p[row] > 0:
            ref = MinPLogitsWarper(float(min_p[row]))(None, ref)
        assert survivors(ours[row: row + 1]) == survivors(ref), row


def test_fast_top_k_top_p_equals_full_sort():
    # V = 3000 > HEAD_CANDIDATES: rows 0-2 end inside the head, rows 3-5 need the full-sort fallback
    # (flat row with top_p .99, top_k beyond the head, flat row with top_k only), row 6 is untouched.
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(7, 3000, generator=gen)  # (B, V)
    logits[:3, :40] += 10.0  # peaked rows: the nucleus is tiny
    top_k = torch.tensor([0, 30, 500, 0, 2000, 1500, 0])
    top_p = torch.tensor([0.9, 0.99, 1.0, 0.99, 0.95, 1.0, 1.0])
    fast = fast_top_k_top_p(logits.clone(), top_k, top_p)
    full = apply_top_k_top_p(logits.clone(), top_k, top_p)
    assert torch.equal(torch.isfinite(fast), torch.isfinite(full))
    torch.testing.assert_close(fast[torch.isfinite(fast)], logits[torch.isfinite(fast)])
    kept = torch.isfinite(full).sum(-1).tolist()
    assert kept[2] == 500 and kept[4] > 1024 and kept[5] == 1500 and kept[6] == 3000 and kept[0] < 1024


def test_repetition_penalty_matches_loop_and_hf():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 20, generator=gen) * 4  # (B, V): both signs
    context = [[1, 2, 2, 7, 19], [0, 5], [3, 3, 3, 11, 12, 13]]
    penalty = torch.tensor([1.1, 1.5, 0.8])
    seen = torch.zeros(3, 20, dtype=torch.bool)
    for row, ids in enumerate(context):
        seen[row, ids] = True
    ours = apply_repetition_penalty(logits.clone(), seen, penalty)
    expected = logits.clone()
    for row, ids in enumerate(context):
        for t in set(ids):
            x = logits[row, t].item()
            expected[row, t] = x / penalty[row].item() if x > 0 else x * penalty[row].item()
        hf_proc = RepetitionPenaltyLogitsProcessor(float(penalty[row]))
        hf = hf_proc(torch.tensor([ids]), logits[row:row + 1].clone())
        torch.testing.assert_close(ours[row:row + 1], hf)
    torch.testing.assert_close(ours, expected)


def test_presence_frequency_match_formula():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 12, generator=gen)  # (B, V)
    outputs = [[4, 4, 4, 9], [0, 1, 1]]
    presence, frequency = [0.5, -0.3], [0.25, 1.5]
    batch = make_batch([SamplingParams(presence_penalty=p, frequency_penalty=f)
                        for p, f in zip(presence, frequency, strict=True)], 12, outputs=outputs)
    ours = apply_presence_frequency(logits.clone(), batch.output_counts, batch.presence_penalty,
                                    batch.frequency_penalty)
    expected = logits.clone()
    for row, ids in enumerate(outputs):
        for t in set(ids):
            expected[row, t] -= frequency[row] * ids.count(t) + presence[row]
    torch.testing.assert_close(ours, expected)


def test_penalties_applied_in_sample_prompt_vs_output():
    # id 2 is only in the prompt: repetition penalty hits it, presence penalty must not.
    logits = torch.tensor([[1.0, 0.5, 3.0, 2.95]])  # (1, 4)
    rep = SamplingParams(temperature=0, repetition_penalty=1.1)
    assert sample(logits, make_batch([rep], 4, prompts=[[2]])).tokens.tolist() == [3]
    pres = SamplingParams(temperature=0, presence_penalty=1.0)
    assert sample(logits, make_batch([pres], 4, prompts=[[2]])).tokens.tolist() == [2]
    assert sample(logits, make_batch([pres], 4, outputs=[[2]])).tokens.tolist() == [3]


def test_min_tokens_suppresses_stop_ids_until_reached():
    logits = torch.tensor([[0.0, 1.0, 9.0, 8.0, 2.0]]).repeat(2, 1)  # (2, 5): eos id 2 dominates
    params = [SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[3]),
              SamplingParams(temperature=0.7, seed=5, min_tokens=3, stop_token_ids=[3])]
    stops = [[2, 3], [2, 3]]
    batch = make_batch(params, 5, outputs=[[1, 1], [1, 1]], stop_ids_per_row=stops)
    gens = [None, make_generator(5)]
    for _ in range(50):
        assert not set(sample(logits, batch, gens).tokens.tolist()) & {2, 3}
    done = make_batch(params, 5, outputs=[[1, 1, 1], [1, 1, 1]], stop_ids_per_row=stops)
    assert sample(logits, done).tokens[0].item() == 2
    # without explicit stop ids the row's own stop_token_ids are banned, eos (2) is not
    default = make_batch(params[:1], 5, outputs=[[1]])
    assert default.suppress_mask[0].nonzero().flatten().tolist() == [3]


def draw_sequence(seed: int, logits: torch.Tensor, steps: int = 30) -> list[int]:
    gen = make_generator(seed)
    batch = make_batch([SamplingParams(temperature=1.0, seed=seed)], logits.shape[-1])
    return [sample(logits, batch, [gen]).tokens.item() for _ in range(steps)]


def test_seeded_sampling_reproducible_and_seed_dependent():
    logits = torch.zeros(1, 50) + torch.linspace(0, 1, 50)  # near-flat: sequences of 30 rarely collide
    assert draw_sequence(7, logits) == draw_sequence(7, logits)
    assert draw_sequence(7, logits) != draw_sequence(8, logits)


def test_seeded_row_same_alone_and_batched():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 100, generator=gen)  # (B, V)
    target = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=123)
    others = [SamplingParams(temperature=0), SamplingParams(temperature=1.3), SamplingParams(seed=9)]
    alone_gen, batched_gen = make_generator(123), make_generator(123)
    alone_batch = make_batch([target], 100)
    batched = make_batch([others[0], target, others[1], others[2]], 100)
    rows = torch.stack([logits[1], logits[0], logits[2], logits[3]])
    for _ in range(20):
        alone = sample(logits[:1], alone_batch, [alone_gen]).tokens.item()
        mixed = sample(rows, batched, [None, batched_gen, None, make_generator(9)]).tokens[1].item()
        assert alone == mixed


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    nonzero = expected > 0
    assert counts[~nonzero].sum() == 0  # ids with zero probability were never drawn
    return float(((counts[nonzero] - expected[nonzero]) ** 2 / expected[nonzero]).sum())


@pytest.mark.parametrize("seeded", [False, True])
def test_frequencies_match_softmax(seeded):
    draws, temperature = 20000, 0.7
    logits = torch.tensor([[0.3, -1.0, 2.0, 0.0, 1.2, -0.4, 0.8, 1.5]])  # (1, 8)
    batch = make_batch([SamplingParams(temperature=temperature)] * draws, 8)
    torch.manual_seed(11)
    gens = [make_generator(s) for s in range(draws)] if seeded else None
    tokens = sample(logits.expand(draws, 8), batch, gens).tokens
    probs = (logits[0] / temperature).softmax(-1)
    assert chi_square(torch.bincount(tokens, minlength=8).float(), probs) < CHI2_DF7_P1E6


def test_frequencies_match_truncated_distribution():
    draws = 20000
    batch = make_batch([SamplingParams(top_k=4, top_p=0.6)] * draws, 5)
    torch.manual_seed(12)
    tokens = sample(LOGITS.expand(draws, 5), batch).tokens
    probs = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.0]) / 0.7  # top_p 0.6 keeps ids 1 and 3
    assert chi_square(torch.bincount(tokens, minlength=5).float(), probs) < 23.93  # chi2.ppf(1-1e-6, 1)


def test_logprobs_are_raw_and_top_logprobs_sorted():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 30, generator=gen)  # (B, V_padded)
    params = [SamplingParams(temperature=0.5, logprobs=3, repetition_penalty=1.3), SamplingParams(logprobs=1)]
    out = sample(logits, make_batch(params, 25, prompts=[[1, 2], [3]]))
    raw = logits[:, :25].log_softmax(-1)
    torch.testing.assert_close(out.logprobs, raw.gather(-1, out.tokens[:, None]).squeeze(-1))
    ids, values = out.top_logprobs
    assert ids.tolist() == raw.argsort(-1, descending=True)[:, :3].tolist()
    torch.testing.assert_close(values, raw.gather(-1, ids))


@pytest.mark.parametrize("kwargs", [
    {"temperature": -0.1}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -2}, {"min_p": 1.2},
    {"min_p": -0.1}, {"repetition_penalty": 0.0}, {"presence_penalty": 2.5}, {"frequency_penalty": -3},
    {"max_tokens": 0}, {"min_tokens": 20, "max_tokens": 10}, {"min_tokens": -1}, {"n": 0},
    {"stop": ["x"] * 17}, {"stop": [""]}, {"logprobs": 21}, {"logprobs": -1}, {"temperature": math.nan},
    {"max_tokens": 2.5}, {"top_k": True}, {"seed": "abc"}, {"stop_token_ids": [-5]},
])
def test_validation_errors(kwargs):
    with pytest.raises(SamplingError):
        SamplingParams(**kwargs)


def test_normalization_and_greedy():
    p = SamplingParams(top_k=-1, stop="###", temperature=0.0)
    assert (p.top_k, p.stop, p.greedy) == (0, ["###"], True)
    assert not SamplingParams(temperature=0.01).greedy


def test_from_defaults():
    qwen = {"do_sample": True, "top_p": 0.8, "top_k": 0, "repetition_penalty": 1.1, "temperature": 1.0,
            "max_new_tokens": 512, "eos_token_id": 151643}
    p = SamplingParams.from_defaults(qwen, temperature=None, seed=3)
    assert (p.top_p, p.top_k, p.repetition_penalty, p.temperature, p.max_tokens, p.seed) == (
        0.8, 0, 1.1, 1.0, 512, 3)
    assert SamplingParams.from_defaults({"do_sample": False, "temperature": 0.7}).greedy
    assert SamplingParams.from_defaults({"do_sample": False}, temperature=0.5).temperature == 0.5
    assert SamplingParams.from_defaults(None, max_tokens=7).max_tokens == 7
    from transformers import GenerationConfig
    obj = SamplingParams.from_defaults(GenerationConfig(do_sample=True, top_p=0.9))
    assert (obj.top_p, obj.top_k, obj.max_tokens) == (0.9, 0, 16)
    with pytest.raises(SamplingError, match="unknown sampling parameter"):
        SamplingParams.from_defaults(qwen, tempreature=0.5)
    with pytest.raises(SamplingError, match="top_p"):
        SamplingParams.from_defaults({"top_p": 0})


def test_from_defaults_max_tokens_and_hf_names():
    gen = {"do_sample": False, "temperature": 0.7, "max_new_tokens": 300}
    assert SamplingParams.from_defaults(None).max_tokens == 16  # vLLM's default
    assert SamplingParams.from_defaults({}, default_max_tokens=512).max_tokens == 512
    assert SamplingParams.from_defaults(gen, default_max_tokens=512).max_tokens == 300  # the model's wins
    assert SamplingParams.from_defaults(gen, room=100).max_tokens == 100  # cut to the context left
    assert SamplingParams.from_defaults(gen, room=-5).max_tokens == 1  # admission then refuses with numbers
    assert SamplingParams.from_defaults(gen, room=100, max_tokens=200).max_tokens == 200  # asked: never cut
    assert SamplingParams.from_defaults(gen, max_new_tokens=7, min_new_tokens=2).max_tokens == 7
    assert SamplingParams.from_defaults(gen, max_new_tokens=7, min_new_tokens=2).min_tokens == 2
    assert SamplingParams.from_defaults(gen).greedy
    assert SamplingParams.from_defaults(gen, do_sample=True).temperature == 0.7
    assert SamplingParams.from_defaults({"temperature": 0.7}, do_sample=False).greedy
    assert SamplingParams.from_defaults(gen, temperature=0.4).temperature == 0.4  # a temperature means sampling
    with pytest.raises(SamplingError, match="unknown sampling parameter 'max_new_token'"):
        SamplingParams.from_defaults(gen, max_new_token=3)


def test_build_rejects_out_of_vocab_ids():
    with pytest.raises(SamplingError, match="outside the vocabulary"):
        make_batch([SamplingParams(repetition_penalty=1.2)], 10, prompts=[[3, 10]])


@pytest.mark.parametrize("k", [0, 3])
def test_to_host_packs_every_field_into_one_copy_exactly(k):
    """ids, fp32 log-probs and top log-probs come back unchanged through the one float64 device-to-host copy."""
    g = torch.Generator().manual_seed(k)
    tokens, logprobs = torch.randint(0, 151936, (5,), generator=g), torch.randn(5, generator=g) * 30
    top = (torch.randint(0, 151936, (5, k), generator=g), torch.randn(5, k, generator=g)) if k else None
    host = SampleOutput(tokens, logprobs, top).to_host()
    assert host.tokens == tokens.tolist() and host.logprobs == logprobs.tolist()
    assert host.top_ids == (top[0].tolist() if k else None)
    assert host.top_values == (top[1].tolist() if k else None)
