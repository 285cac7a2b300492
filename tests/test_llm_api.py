"""The vLLM-style offline API on the real small model and on the tiny Qwen checkpoint."""
from __future__ import annotations

import math

import pytest
import torch
from assets import DEVICE
from reference import dense_greedy

from qwen_awq import LLM, SamplingParams
from qwen_awq.errors import ConfigError, ContextLengthError


@pytest.fixture(scope="module")
def llm(qwen_dir):
    return LLM(model=str(qwen_dir), dtype="float32", device=DEVICE, kv_cache_memory=2**24, max_model_len=512)


def test_generate_returns_vllm_shaped_results(llm):
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = llm.generate(["Hello world", [9707, 1879, 11]], params)
    assert [o.prompt for o in outs] == ["Hello world", None]
    assert outs[0].prompt_token_ids == [9707, 1879] and outs[1].prompt_token_ids == [9707, 1879, 11]
    tok = llm.tokenizer
    for out in outs:
        ref = dense_greedy(llm.model, out.prompt_token_ids, 6, vocab=tok.vocab_size)
        text = tok.decode([t for t in ref if t not in tok.special_ids])
        assert out.outputs[0].token_ids == ref and out.outputs[0].text == text
        assert out.outputs[0].finish_reason == "length" and out.finished


def test_n_samples_logprobs_and_per_prompt_params(llm):
    params = [SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=5, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)]
    outs = llm.generate(["a", "b"], params)
    samples = outs[0].outputs
    assert [s.index for s in samples] == [0, 1, 2] and len({tuple(s.token_ids) for s in samples}) > 1
    again = llm.generate(["a"], params[0])[0].outputs
    assert [s.token_ids for s in again] == [s.token_ids for s in samples]  # seeded: reproducible
    logits = llm.model(torch.tensor([llm.tokenizer.encode("a")], device=DEVICE))[0, -1, :151851].cpu()
    first = samples[0]
    expected = logits.log_softmax(-1)[first.token_ids[0]].item()
    assert math.isclose(first.logprobs[0][first.token_ids[0]], expected, rel_tol=1e-4)
    assert len(first.logprobs[0]) in (2, 3) and len(first.logprobs) == 5
    assert len(outs[1].outputs) == 1 and len(outs[1].outputs[0].token_ids) == 3


def test_chat_uses_qwen_chat_format(llm):
    from qwen_awq.chat import make_context

    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    conv = [{"role": "system", "content": "S"}, {"role": "user", "content": "你好"}]
    outs = llm.chat([conv, conv], params)
    assert outs[0].prompt_token_ids == make_context(llm.tokenizer, "你好", system="S")[1]
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids


def test_errors(llm, qwen_dir):
    with pytest.raises(ConfigError, match="not an AWQ checkpoint"):
        LLM(model=str(qwen_dir), quantization="awq", device=DEVICE, kv_cache_memory=2**22, max_model_len=64)
    with pytest.raises(ContextLengthError, match="maximum context length is 512"):
        llm.generate([[1] * 510], SamplingParams(max_tokens=10))


def test_default_model_answers_paris(bundled_model):
    llm = LLM(device=DEVICE, max_model_len=512, kv_cache_memory=2**26)  # the default model
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=24))[0]
    assert "Paris" in out.outputs[0].text and out.outputs[0].finish_reason == "stop"
