"""TGI routes through `huggingface_hub.InferenceClient` (called exactly as the seed calls it) and vLLM's
legacy /generate through `requests`, against a real server on loopback; outputs equal the generation path."""
from __future__ import annotations

import json

import pytest
import requests
from huggingface_hub import InferenceClient
from huggingface_hub.errors import ValidationError
from server_utils import live_server

from qwen_awq.engine.sampling_params import SamplingParams
from qwen_awq.generation import TextStream
from qwen_awq.models.loader import load_model
from qwen_awq.tokenizer import load_tokenizer

SEED_CALL = dict(max_new_tokens=128, do_sample=True, temperature=0.7, top_p=0.95, top_k=40,
                 repetition_penalty=1.1)


@pytest.fixture(scope="module")
def tiny(qwen_dir):
    return load_model(qwen_dir, dtype="float32", device="cpu"), load_tokenizer(qwen_dir)


@pytest.fixture(scope="module")
def srv(tiny):
    with live_server(*tiny, kv_cache_memory=2**22, max_model_len=256) as server:
        yield server


def reference(tiny, prompt: str, **params):
    model, tok = tiny
    return TextStream(model, tok, tok.encode(prompt), SamplingParams(**params)).run()


def test_seed_call_returns_the_sampled_text_its_seed_reproduces(tiny, srv):
    client = InferenceClient(srv.url)
    out = client.text_generation("Write a poem", details=True, **SEED_CALL)
    d = out.details
    assert isinstance(d.seed, int) and d.generated_tokens == len(d.tokens) <= 128
    assert "".join(t.text for t in d.tokens) == out.generated_text
    ref = reference(tiny, "Write a poem", temperature=0.7, top_p=0.95, top_k=40, repetition_penalty=1.1,
                    seed=d.seed, max_tokens=128)
    assert out.generated_text == ref.text and [t.id for t in d.tokens] == ref.token_ids
    assert d.finish_reason == {"length": "length", "stop": "eos_token"}[ref.finish_reason]
    text = client.text_generation("Write a poem", seed=d.seed, **SEED_CALL)
    assert text == out.generated_text


def test_seed_call_streams_tokens_that_join_to_the_final_text(tiny, srv):
    client = InferenceClient(srv.url)
    pieces = list(client.text_generation("Write a poem", stream=True, **SEED_CALL))
    assert pieces and all(isinstance(p, str) for p in pieces)
    events = list(client.text_generation("Write a poem", stream=True, details=True, **SEED_CALL))
    final = events[-1]
    assert final.generated_text == "".join(e.token.text for e in events)
    assert all(e.generated_text is None for e in events[:-1])
    assert final.details.generated_tokens == len(events)
    again = client.text_generation("Write a poem", seed=final.details.seed, **SEED_CALL)
    assert again == final.generated_text


def test_generate_greedy_details_and_stop_sequence(tiny, srv):
    ref = reference(tiny, "Hello", temperature=0, max_tokens=12, ignore_eos=True)
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 12, "details": True, "top_n_tokens": 2}}
    r = requests.post(srv.url + "/generate", json=body, timeout=60).json()
    assert r["generated_text"] == ref.text
    assert [t["id"] for t in r["details"]["tokens"]] == ref.token_ids
    assert r["details"]["seed"] is None and len(r["details"]["top_tokens"][0]) == 2
    stop = ref.text[len(ref.text) // 2:len(ref.text) // 2 + 2]
    body["parameters"] |= {"stop": [stop], "return_full_text": True}
    r = requests.post(srv.url + "/generate", json=body, timeout=60).json()
    assert r["generated_text"] == "Hello" + ref.text[:ref.text.index(stop)]
    assert r["details"]["finish_reason"] == "stop_sequence"


def test_generate_stream_wire_format(tiny, srv):
    ref = reference(tiny, "Hello", temperature=0, max_tokens=5, ignore_eos=True)
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 5, "details": True}}
    raw = requests.post(srv.url + "/generate_stream", json=body, timeout=60)
    assert raw.headers["content-type"].startswith("text/event-stream")
    blocks = raw.text.split("\n\n")
    assert blocks[-1] == "" and all(b.startswith("data:{") for b in blocks[:-1])  # TGI: no [DONE]
    events = [json.loads(b[len("data:"):]) for b in blocks[:-1]]
    assert [e["index"] for e in events] == [1, 2, 3, 4, 5]
    assert [e["token"]["id"] for e in events] == ref.token_ids
    assert events[-1]["generated_text"] == ref.text and events[-1]["details"]["finish_reason"] == "length"
    assert events[-1]["details"]["input_length"] == len(tiny[1].encode("Hello"))


def test_info_and_tgi_tokenize(tiny, srv):
    info = requests.get(srv.url + "/info", timeout=10).json()
    assert info["max_total_tokens"] == 256 and info["max_stop_sequences"] == 4
    assert info["model_id"] == "tiny-qwen"
    text = "Hello, 世界!"
    toks = requests.post(srv.url + "/tokenize", json={"inputs": text}, timeout=10).json()
    assert [t["id"] for t in toks] == tiny[1].encode(text)
    assert "".join(t["text"] for t in toks) == text
    assert all(text[t["start"]:t["stop"]] == t["text"] for t in toks)


def test_tgi_validation_errors_reach_the_client_typed(srv):
    client = InferenceClient(srv.url)
    with pytest.raises(ValidationError, match=r"must be <= 256\. Given: \d+ `inputs` tokens and 300"):
        client.text_generation("Hello", max_new_tokens=300)
    r = requests.post(srv.url + "/generate", json={"inputs": "x", "parameters": {"stop": list("abcde")}},
                      timeout=10)
    assert r.status_code == 422 and r.json() == {
        "error": "Input validation error: `stop` supports up to 4 stop sequences. Given: 5",
        "error_type": "validation"}


def test_vllm_generate_echoes_the_prompt(tiny, srv):
    ref = reference(tiny, "Hello", temperature=0, max_tokens=6, ignore_eos=True)
    # vLLM's example api_client sends use_beam_search; false is the only value we accept
    body = {"prompt": "Hello", "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "use_beam_search": False}
    r = requests.post(srv.url + "/generate", json=body, timeout=60)
    assert r.json() == {"text": ["Hello" + ref.text]}
    two = requests.post(srv.url + "/generate", json=body | {"n": 2}, timeout=60).json()
    assert two == {"text": ["Hello" + ref.text] * 2}
    body = {"prompt": "Hi", "temperature": 0, "ignore_eos": True}  # vLLM's default max_tokens: 16
    default = requests.post(srv.url + "/generate", json=body, timeout=60).json()
    ref16 = reference(tiny, "Hi", temperature=0, max_tokens=16, ignore_eos=True)
    assert default["text"][0] == "Hi" + ref16.text


def test_vllm_generate_streams_cumulative_nul_delimited_json(tiny, srv):
    ref = reference(tiny, "Hello", temperature=0, max_tokens=6, ignore_eos=True)
    body = {"prompt": "Hello", "max_tokens": 6, "temperature": 0, "ignore_eos": True, "stream": True}
    with requests.post(srv.url + "/generate", json=body, stream=True, timeout=60) as r:
        chunks = [json.loads(c) for c in r.iter_lines(delimiter=b"\0") if c]
    texts = [c["text"][0] for c in chunks]
    assert len(texts) == 6 and texts[-1] == "Hello" + ref.text
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))


def test_vllm_tokenize_and_detokenize_round_trip(tiny, srv):
    tok = tiny[1]
    text = "Hello <|im_end|> world"
    r = requests.post(srv.url + "/tokenize", json={"prompt": text}, timeout=10).json()
    assert r["tokens"] == tok.encode(text, allowed_special="all") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 256
    back = requests.post(srv.url + "/detokenize", json={"tokens": r["tokens"]}, timeout=10).json()
    assert back == {"prompt": text}
    chat = requests.post(srv.url + "/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]},
                         timeout=10).json()
    raw = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
           "<|im_start|>assistant\n")
    assert chat["tokens"] == tok.encode(raw, allowed_special="all")
