"""Structured output in the engine (SamplingParams.guided through LLM / LLMEngine) on the bundled model: finished
samples validate with `jsonschema`, greedy constrained rows equal a plain masked greedy loop (dense recompute, no
engine code), unconstrained rows of the same batch are untouched, and preemption by recompute keeps every
matcher in step with its output. Bad specs are refused before anything is queued."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from reference import dense_greedy

from qwen_awq import LLM, GuidedSpec, SamplingParams
from qwen_awq.chat import encode_messages
from qwen_awq.engine.kv_cache import bytes_per_block
from qwen_awq.engine.llm_engine import EngineConfig, LLMEngine
from qwen_awq.errors import GrammarError, SamplingError
from qwen_awq.models.attention import DenseAttention, ForwardBatch

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
POINTS = {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "integer"}},
                                     "required": ["x"], "additionalProperties": False}, "maxItems": 2}
DATE = r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]"


@pytest.fixture(scope="module")
def llm(bundled_model):
    return LLM(None, max_model_len=256, kv_cache_memory=2**26)


def chat_ids(tok, text: str) -> list[int]:
    return encode_messages(tok, [{"role": "user", "content": text}])


@torch.inference_mode()
def masked_greedy(model, guided, prompt: list[int], spec: GuidedSpec, eos: frozenset[int], steps: int) -> list[int]:
    """Greedy decoding under a fresh matcher, recomputing the whole sequence every step (no cache, scheduler,
    runner, sampler or tracker), ending at an end id or when the grammar is complete."""
    matcher, ids, new = guided.matcher(spec), list(prompt), []
    alpha = model.prefill_alpha(len(prompt))
    for _ in range(steps):
        fb = ForwardBatch(torch.arange(len(ids)), torch.full((len(ids),), alpha), DenseAttention(1, len(ids)))
        logits = model.compute_logits(model.forward_tokens(torch.tensor(ids), fb)[-1])  # (V,)
        token = int(logits.masked_fill(~matcher.allowed_mask(), float("-inf")).argmax())
        matcher.accept(token)
        ids.append(token)
        new.append(token)
        if token in eos or matcher.is_terminated():
            break
    return new


def test_greedy_constrained_rows_equal_a_masked_loop_and_free_rows_are_untouched(llm):
    engine, tok = llm.engine, llm.tokenizer
    prompts = [chat_ids(tok, "Describe a person as JSON."), chat_ids(tok, "Name a day in a date format."),
               chat_ids(tok, "What is the capital of France?")]
    specs = [GuidedSpec.json_schema(PERSON), GuidedSpec.regex(DATE), None]
    params = [SamplingParams(temperature=0, max_tokens=40, guided=s) for s in specs]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    guided = engine.guided_decoding()
    for prompt, spec, out in zip(prompts[:2], specs[:2], outs[:2], strict=True):
        assert out.outputs[0].token_ids == masked_greedy(llm.model, guided, prompt, spec, engine.eos, 40)
        assert out.outputs[0].finish_reason == "stop"
    jsonschema.validate(json.loads(outs[0].outputs[0].text), PERSON)
    assert re.fullmatch(DATE, outs[1].outputs[0].text)
    free = dense_greedy(llm.model, prompts[2], 40, vocab=tok.vocab_size, stop_ids=engine.eos)
    assert outs[2].outputs[0].token_ids == free  # the unconstrained row of the same batches
    assert "Paris" in outs[2].outputs[0].text


@pytest.mark.parametrize("greedy", [True, False])
def test_n_samples_each_follow_their_own_matcher_even_with_ignore_eos(llm, greedy):
    params = SamplingParams(n=3, temperature=0 if greedy else 0.9, seed=11, max_tokens=48, ignore_eos=True,
                            min_tokens=4, guided=GuidedSpec.json_schema(POINTS))
    out = llm.chat([{"role": "user", "content": "Give me a list of points as JSON."}], params)[0]
    finished = [o for o in out.outputs if o.finish_reason == "stop"]
    assert len(finished) >= 2, [(o.text, o.finish_reason) for o in out.outputs]
    for o in finished:  # the grammar ends them: ignore_eos does not keep a complete JSON value going
        jsonschema.validate(json.loads(o.text), POINTS)
    if not greedy:
        assert len({o.text for o in out.outputs}) > 1  # three independent samples


def test_choice_and_a_cut_by_max_tokens(llm):
    choice = SamplingParams(temperature=0.7, seed=5, max_tokens=10, guided=GuidedSpec.choice(["red", "green", "blue"]))
    cut = SamplingParams(temperature=0, max_tokens=3, guided=GuidedSpec.json_schema(PERSON))
    a, b = llm.chat([[{"role": "user", "content": "Pick a color."}], [{"role": "user", "content": "A person?"}]],
                    [choice, cut])
    assert a.outputs[0].text in ("red", "green", "blue") and a.outputs[0].finish_reason == "stop"
    assert b.outputs[0].finish_reason == "length" and len(b.outputs[0].token_ids) == 3
    assert b.outputs[0].text.startswith('{"name"')  # an incomplete prefix of the grammar


def test_preemption_by_recompute_keeps_each_matcher_with_its_output(llm):
    model, tok = llm.model, llm.tokenizer
    per_block = bytes_per_block(model.cfg, 16, model.dtype, False)
    engine = LLMEngine(model, tok, EngineConfig(block_size=16, max_model_len=128, max_num_seqs=4,
                                                kv_cache_memory=9 * per_block))
    assert engine.block_manager.num_blocks == 9
    prompts = [chat_ids(tok, f"Person number {i} as JSON, please.") for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, guided=GuidedSpec.json_schema(PERSON))
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    done = {}
    while engine.has_unfinished():
        done |= {o.request_id: o.outputs[0] for o in engine.step() if o.finished}
    assert engine.scheduler.num_preemptions > 0
    before = llm.engine.scheduler.num_preemptions
    alone = llm.generate([{"prompt_token_ids": p} for p in prompts], params)  # a pool that never preempts
    assert llm.engine.scheduler.num_preemptions == before
    # (that engine's constrained greedy rows equal the plain masked loop: the first test)
    assert [done[str(i)].token_ids for i in range(4)] == [o.outputs[0].token_ids for o in alone]
    for out in done.values():
        if out.finish_reason == "stop":
            jsonschema.validate(json.loads(out.text), PERSON)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_follow_rolls_back_and_catches_up(llm):
    guided, tok = llm.engine.guided_decoding(), llm.tokenizer
    ids = tok.encode('{"name": "Al", "age": 3', allowed_special=set())
    ahead = guided.matcher(GuidedSpec.json_schema(PERSON))
    ahead.follow(ids)
    ahead.follow(ids[:3])  # three tokens kept: the rest rolled back
    fresh = guided.matcher(GuidedSpec.json_schema(PERSON))
    for t in ids[:3]:
        fresh.accept(t)
    assert ahead.num_accepted == 3 and torch.equal(ahead.allowed_mask(), fresh.allowed_mask())
    ahead.follow(ids)
    assert ahead.num_accepted == len(ids) and ahead.is_accepting() is fresh.is_accepting() is False


def test_prefetched_masks_are_used_only_for_their_own_rows(llm):
    guided = llm.engine.guided_decoding()
    a, b = guided.matcher(GuidedSpec.regex("[0-9]+")), guided.matcher(GuidedSpec.choice(["yes", "no"]))
    logits = torch.randn(3, guided.vocab_size, generator=torch.Generator().manual_seed(1))
    want = logits.clone()
    want[1][~a.allowed_mask()] = float("-inf")
    want[2][~b.allowed_mask()] = float("-inf")
    got = logits.clone()
    guided.prefetch([None, a, b])
    guided.apply_masks(got, [None, a, b])
    assert torch.equal(got, want)
    guided.prefetch([None, b, a])  # stale: started for other rows, so computed again
    got = logits.clone()
    guided.apply_masks(got, [None, a, b])
    assert torch.equal(got, want)


def test_bad_specs_are_refused_before_queueing(llm):
    engine = llm.engine
    with pytest.raises(GrammarError, match="Invalid type: strin"):
        engine.add_request("bad", [1, 2, 3], SamplingParams(guided=GuidedSpec.json_schema({"type": "strin"})))
    assert engine.scheduler.num_waiting == 0 and "bad" not in engine.requests
    with pytest.raises(SamplingError, match="guided must be a GuidedSpec"):
        SamplingParams(guided={"type": "object"})
    with pytest.raises(GrammarError, match="needs a tokenizer"):
        LLMEngine(llm.model, None, EngineConfig(max_model_len=64, kv_cache_memory=2**24)).add_request(
            "x", [1, 2], SamplingParams(guided=GuidedSpec.json_object()))


def test_generate_and_chat_take_the_spec_as_a_keyword(llm):
    model, tok = llm.model, llm.tokenizer
    response, history = model.chat(tok, "Is water wet?", guided=GuidedSpec.choice(["yes", "no"]), max_new_tokens=6)
    assert response in ("yes", "no") and history == [("Is water wet?", response)]
    prompt = chat_ids(tok, "Describe a person as JSON.")
    out = model.generate([prompt], tokenizer=tok, guided=GuidedSpec.json_schema(PERSON), max_new_tokens=40,
                         do_sample=False)
    text = tok.decode([t for t in out[0, len(prompt):].tolist() if t not in llm.engine.eos])
    jsonschema.validate(json.loads(text), PERSON)
