"""Server robustness on a real loopback server: 64 concurrent streams with disconnects, overload answers,
a table of malformed requests per route with exact status and body, and a fuzz run over the OpenAPI schema."""
from __future__ import annotations

import asyncio
import json
import random
import threading
from contextlib import aclosing
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_utils import from_schema, live_server, metric, scrape

from qwen_awq import __version__
from qwen_awq.eval.bench_serve import run_level, summarize
from qwen_awq.eval.http_client import HTTPError, request_lines
from qwen_awq.models.loader import load_model
from qwen_awq.tokenizer import load_tokenizer

MODEL = "tiny-qwen"
GREEDY = {"temperature": 0, "ignore_eos": True, "repetition_penalty": 1.0, "top_p": 1.0}


@pytest.fixture(scope="module")
def tiny(qwen_dir):
    return load_model(qwen_dir, dtype="float32", device="cpu"), load_tokenizer(qwen_dir)


def test_64_streams_with_a_quarter_disconnecting(tiny):
    model, tok = tiny
    prompts = ["Once upon a time", "The weather today", "List three colors", "A short poem about the sea"]
    body = {"model": MODEL, "max_tokens": 12, "stream": True} | GREEDY
    quitters = set(random.Random(0).sample(range(64), 16))
    stop_after = {i: random.Random(i).randint(1, 6) for i in quitters}
    # Quitters ask for far more tokens than they read, so they are surely still generating when they leave.
    quitter_tokens = 200
    with live_server(model, tok, kv_cache_memory=2**23, max_model_len=256, max_num_seqs=64) as srv:
        lone = {p: requests.post(srv.url + "/v1/completions", json=body | {"prompt": p, "stream": False},
                                 timeout=60).json()["choices"][0]["text"] for p in prompts}
        before = scrape(srv.url)

        async def client(i: int) -> str | None:
            text, events = "", 0
            mine = body | {"prompt": prompts[i % 4]}
            if i in quitters:
                mine["max_tokens"] = quitter_tokens
            async with aclosing(request_lines(srv.url, "POST", "/v1/completions", mine)) as lines:
                async for line in lines:
                    if line.startswith("data: {"):
                        text += json.loads(line[len("data: "):])["choices"][0]["text"]
                        events += 1
                        if i in quitters and events >= stop_after[i]:
                            return None  # closing the iterator closes the connection mid-stream
            return text

        async def everyone():
            return await asyncio.gather(*(client(i) for i in range(64)))

        results = asyncio.run(everyone())
        assert all(results[i] == lone[prompts[i % 4]] for i in range(64) if i not in quitters)
        assert srv.wait_idle(), "every KV block is free once the streams are done or gone"
        after = scrape(srv.url)
    finished = {r: metric(after, "request_success_total", finished_reason=r)
                - metric(before, "request_success_total", finished_reason=r) for r in ("length", "abort")}
    assert finished == {"length": 48, "abort": 16}
    prompt_tokens = sum(len(tok.encode(prompts[i % 4])) for i in range(64))
    assert metric(after, "prompt_tokens_total") - metric(before, "prompt_tokens_total") == prompt_tokens
    generated = metric(after, "generation_tokens_total") - metric(before, "generation_tokens_total")
    assert 48 * 12 + 16 <= generated < 48 * 12 + 16 * quitter_tokens
    assert metric(after, "num_requests_running") == 0 and metric(after, "kv_cache_usage_perc") == 0


def test_overload_answers_503_or_429_with_retry_after_never_500(tiny):
    with live_server(*tiny, kv_cache_memory=2**22, max_model_len=128, max_num_seqs=1, max_waiting=1) as srv:
        calls = [("/v1/completions", {"prompt": "Hi", "max_tokens": 24} | GREEDY)] * 4 + [
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 24,
                                      "stream": True} | GREEDY)] * 2 + [
            ("/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": 24}})] * 2
        barrier, answers = threading.Barrier(len(calls)), [None] * len(calls)

        def call(i: int) -> None:
            path, payload = calls[i]
            barrier.wait()
            answers[i] = requests.post(srv.url + path, json=payload, timeout=60)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(calls))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=90)
        assert all(a is not None for a in answers), "a request hung"
        refused = [(path, a) for (path, _), a in zip(calls, answers, strict=True) if a.status_code != 200]
        assert refused and len(refused) < len(calls)
        for path, a in refused:
            tgi = path == "/generate"
            assert a.status_code == (429 if tgi else 503) and a.headers["retry-after"] == "1"
            body = a.json()
            if tgi:
                assert body["error_type"] == "overloaded" and "overloaded" in body["error"]
            else:
                assert body["error"]["type"] == "service_unavailable_error" and body["error"]["code"] == 503
        assert all("data: [DONE]" in a.text for (p, _), a in zip(calls, answers, strict=True)
                   if a.status_code == 200 and p == "/v1/chat/completions")
        assert requests.post(srv.url + "/v1/completions", json=calls[0][1], timeout=60).status_code == 200
        assert srv.wait_idle()


def test_a_client_leaving_a_non_streaming_request_aborts_it(tiny):
    with live_server(*tiny, kv_cache_memory=2**22, max_model_len=256) as srv:
        before = scrape(srv.url)

        async def leave_early():
            lines = request_lines(srv.url, "POST", CMPL, {"prompt": "Hi", "max_tokens": 250} | GREEDY)
            task = asyncio.ensure_future(lines.__anext__())
            while srv.core.scheduler.num_running == 0:  # generating: now hang up
                await asyncio.sleep(0.01)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await lines.aclose()

        asyncio.run(leave_early())
        assert srv.wait_idle()
        after = scrape(srv.url)
    aborted = metric(after, "request_success_total", finished_reason="abort")
    assert aborted - metric(before, "request_success_total", finished_reason="abort") == 1
    assert metric(after, "generation_tokens_total") < 250


def test_a_failing_request_never_takes_the_server_down(tiny, monkeypatch):
    with live_server(*tiny, kv_cache_memory=2**22, max_model_len=128) as srv:
        runner, real_step = srv.core.runner, srv.core.runner.step
        calls = []

        def failing_step(*args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("injected kernel failure")
            return real_step(*args, **kwargs)

        monkeypatch.setattr(runner, "step", failing_step)
        body = {"prompt": "Hi", "max_tokens": 3} | GREEDY
        r = requests.post(srv.url + CMPL, json=body, timeout=30)
        assert r.status_code == 500 and r.json()["error"]["type"] == "internal_server_error"
        assert "injected kernel failure" in r.json()["error"]["message"]
        assert requests.post(srv.url + CMPL, json=body, timeout=30).status_code == 200
        calls.clear()
        r = requests.post(srv.url + "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}},
                          timeout=30)
        assert r.status_code == 424 and r.json()["error_type"] == "generation"
        import qwen_awq.server.openai_api as openai_api

        def broken(*args, **kwargs):
            raise KeyError("bug")

        monkeypatch.setattr(openai_api, "completion_job", broken)
        r = requests.post(srv.url + CMPL, json=body, timeout=30)
        assert r.status_code == 500
        assert r.json()["error"]["message"].startswith("internal server error (KeyError)")
        monkeypatch.undo()
        assert requests.post(srv.url + CMPL, json=body, timeout=30).status_code == 200
        assert srv.wait_idle()


# --- malformed and out-of-range requests -------------------------------------------------------------------
CHAT, CMPL = "/v1/chat/completions", "/v1/completions"
MSGS = [{"role": "user", "content": "Hi"}]
# (route, body (dict, or raw text), status, message fragment, OpenAI `param` or None); 422 rows are TGI's.
CASES: list[tuple[str, Any, int, str, str | None]] = [
    (CHAT, "{not json", 400, "not valid JSON", None),
    (CHAT, "[1, 2]", 400, "must be a JSON object, got list", None),
    (CHAT, {"messages": []}, 400, "at least 1 item", "messages"),
    (CHAT, {"messages": [{"role": "robot", "content": "x"}]}, 400, "Input should be", "messages.0.role"),
    (CHAT, {"messages": MSGS, "temperature": "hot"}, 400, "valid number", "temperature"),
    (CHAT, {"messages": MSGS, "temperature": -1}, 400, "temperature must be >= 0", None),
    (CHAT, {"messages": MSGS, "top_p": 1.5}, 400, "top_p must be in (0, 1]", None),
    (CHAT, {"messages": MSGS, "n": 0}, 400, "greater than or equal to 1", "n"),
    (CHAT, {"messages": MSGS, "stop": ["x"] * 17}, 400, "at most 16 stop strings", None),
    (CHAT, {"messages": MSGS, "max_tokens": 500}, 400, "maximum context length is 128 tokens. However, you "
     "requested 520 tokens (20 in the prompt, 500 for the completion)", None),
    (CHAT, {"messages": MSGS, "model": "nope"}, 404, "The model `nope` does not exist", "model"),
    (CHAT, {"messages": [*MSGS, {"role": "assistant", "content": "x"}]}, 400, "last message must come", None),
    (CHAT, {"messages": [{"role": "tool", "content": "x"}]}, 400, "does not follow an assistant", None),
    (CHAT, {"messages": MSGS, "stream_options": {"include_usage": True}}, 400, "only allowed with stream",
     "stream_options"),
    (CHAT, {"messages": MSGS, "top_logprobs": 2}, 400, "requires logprobs=true", "top_logprobs"),
    (CHAT, {"messages": MSGS, "stop_token_ids": [10**9]}, 400, "outside [0, 151851)", "stop_token_ids"),
    (CHAT, {"messages": MSGS, "response_format": {"type": "xml"}}, 400, "Input should be",
     "response_format.type"),
    (CHAT, {"messages": MSGS, "x": "y" * 5000}, 413, "accepts at most 4096", None),
    (CMPL, {"max_tokens": 2}, 400, "Field required", "prompt"),
    (CMPL, {"prompt": []}, 400, "prompt must not be empty", "prompt"),
    (CMPL, {"prompt": [10**9]}, 400, "outside [0, 151851)", "prompt"),
    (CMPL, {"prompt": "x", "logprobs": 21}, 400, "less than or equal to 20", "logprobs"),
    (CMPL, {"prompt": "x", "echo": True, "logprobs": 1}, 400, "prompt logprobs are not computed", "echo"),
    (CMPL, {"prompt": "x", "suffix": "y"}, 400, "suffix", "suffix"),
    (CMPL, {"prompt": "x", "min_tokens": 5, "max_tokens": 2}, 400, "min_tokens must be in [0, max_tokens=2]",
     None),
    ("/", {"inputs": 5}, 422, "inputs: Input should be a valid string", None),
    ("/", "{bad", 422, "not valid JSON", None),
    ("/", {"inputs": "x", "parameters": {"max_new_tokens": 0}}, 422, "must be strictly positive", None),
    ("/", {"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "[0-9"}}}, 422,
     "grammar is not valid: invalid regex", None),
    ("/", {"inputs": "x", "parameters": {"grammar": {"type": "xml", "value": "<a/>"}}}, 422, "grammar.type", None),
    (CHAT, {"messages": MSGS, "response_format": {"type": "json_schema"}}, 400, "needs a `schema`",
     "response_format.json_schema"),
    (CHAT, {"messages": MSGS, "guided_json": {"type": "object"}, "guided_regex": "a"}, 400, "at most one",
     "guided_regex"),
    ("/", {"inputs": "", "parameters": {}}, 422, "`inputs` cannot be empty", None),
    ("/generate_stream", {"inputs": "x", "parameters": {"best_of": 2, "do_sample": True}}, 422,
     "not supported when streaming", None),
    ("/generate", {"inputs": "x", "parameters": {"top_p": 0}}, 422, "top_p must be in (0, 1]", None),
    ("/generate", {"inputs": "x", "parameters": {"stop": ["a"] * 5}}, 422, "up to 4 stop sequences", None),
    ("/generate", {"prompt": "x", "temperature": -1}, 400, "temperature must be >= 0", None),
    ("/generate", {"prompt": "x", "bogus": 1}, 400, "unknown sampling parameter 'bogus'", None),
    ("/generate", {"prompt": "x", "stop": 5}, 400, "invalid sampling parameters", None),
    ("/generate", {"prompt": "x", "use_beam_search": True}, 400, "beam search is not supported",
     "use_beam_search"),
    ("/generate", {"text": "x"}, 422, "needs `inputs` (TGI's /generate) or `prompt`", None),
    ("/tokenize", {}, 400, "exactly one of `prompt`", "prompt"),
    ("/detokenize", {"tokens": [-1]}, 400, "outside [0, 151851)", "tokens"),
    # strict types: no number from a string, no boolean from a number or a word
    (CHAT, {"messages": MSGS, "max_tokens": "10"}, 400, "valid integer", "max_tokens"),
    (CHAT, {"messages": MSGS, "max_tokens": True}, 400, "valid integer", "max_tokens"),
    (CMPL, {"prompt": "x", "max_tokens": "10"}, 400, "valid integer", "max_tokens"),
    (CHAT, {"messages": MSGS, "ignore_eos": "yes"}, 400, "valid boolean", "ignore_eos"),
    (CMPL, {"prompt": "x", "stream": 1}, 400, "valid boolean", "stream"),
    ("/generate", {"prompt": "x", "ignore_eos": "yes"}, 400, "ignore_eos: Input should be a valid boolean", None),
    ("/generate", {"prompt": "x", "max_tokens": "10"}, 400, "max_tokens: Input should be a valid integer", None),
    ("/generate", {"prompt": "x", "stop": {"a": 1}}, 400, "invalid sampling parameters: stop", None),
    ("/", {"inputs": "x", "parameters": {"best_of": 0}}, 422, "best_of: Input should be greater than or equal to 1",
     None),
    ("/", {"inputs": "x", "parameters": {"max_new_tokens": "5"}}, 422, "valid integer", None),
    # seeds above what a generator takes, on every route
    ("/generate", {"prompt": "x", "seed": 2**70}, 400, "seed: Input should be less than or equal to", None),
    (CHAT, {"messages": MSGS, "seed": 2**70}, 400, "less than or equal to 18446744073709551615", "seed"),
    (CMPL, {"prompt": "x", "seed": 2**70}, 400, "less than or equal to 18446744073709551615", "seed"),
    ("/", {"inputs": "x", "parameters": {"seed": 2**70}}, 422, "less than or equal to", None),
    # n and best_of
    ("/generate", {"prompt": "x", "n": 10**9}, 400, "n: Input should be less than or equal to 128", None),
    (CHAT, {"messages": MSGS, "n": 10**9}, 400, "less than or equal to 128", "n"),
    (CMPL, {"prompt": "x", "n": 2, "best_of": 1}, 400, "best_of must be >= n", "best_of"),
    (CMPL, {"prompt": "x", "best_of": 2, "stream": True}, 400, "not supported when streaming", "best_of"),
    # what no JSON parser should be asked to build
    (CHAT, '{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "lone UTF-16 surrogate", None),
    ("/", '{"inputs": "\\udfff"}', 422, "lone UTF-16 surrogate", None),
    (CMPL, '{"prompt": ' + "[" * 300 + "]" * 300 + "}", 400, "nests deeper than 200 levels", None),
    ("/generate_stream", "[" * 300, 422, "nests deeper than 200 levels", None),
    (CHAT, '{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400, "not valid JSON", None),
]


@pytest.fixture(scope="module")
def small_srv(tiny):
    with live_server(*tiny, kv_cache_memory=2**21, max_model_len=128, max_body_bytes=4096) as srv:
        yield srv


@pytest.mark.parametrize(("path", "payload", "status", "fragment", "param"), CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_request_gets_the_routes_error_body(small_srv, path, payload, status, fragment, param):
    data = payload if isinstance(payload, str) else json.dumps(payload)
    r = requests.post(small_srv.url + path, data=data, headers={"Content-Type": "application/json"},
                      timeout=30)
    assert r.status_code == status, r.text
    body = r.json()
    if status == 422:  # TGI's body
        assert set(body) == {"error", "error_type"} and body["error_type"] == "validation"
        assert body["error"].startswith("Input validation error: ") and fragment in body["error"]
    else:
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
        assert fragment in body["error"]["message"] and body["error"]["param"] == param
        assert body["error"]["code"] == ("model_not_found" if status == 404 else status)


def test_unknown_routes_and_methods(small_srv):
    r = requests.get(small_srv.url + "/nope", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["message"] == "no route GET /nope"
    r = requests.get(small_srv.url + CHAT, timeout=10)
    assert r.status_code == 405 and "method GET is not allowed" in r.json()["error"]["message"]
    assert requests.get(small_srv.url + "/v1/models/nope", timeout=10).status_code == 404
    assert requests.get(small_srv.url + "/version", timeout=10).json() == {"version": __version__}


def test_bench_serve_reports_throughput_against_the_server(small_srv):
    prompts = [[1000 + i, 2000, 3000] for i in range(4)]
    levels = asyncio.run(run_level(small_srv.url, MODEL, {}, prompts, 5, 2))
    assert levels["completed"] == 4 and levels["failed"] == 0
    assert levels["output_throughput"] == pytest.approx(4 * 5 / levels["duration_s"])
    assert 0 < levels["mean_ttft_ms"] <= levels["mean_e2el_ms"] and levels["p99_itl_ms"] > 0
    assert summarize([], 1.0)["completed"] == 0

    async def refused():
        async for _ in request_lines(small_srv.url, "POST", CMPL, {"prompt": []}):
            pass

    with pytest.raises(HTTPError, match="HTTP 400"):
        asyncio.run(refused())


# --- fuzz over the OpenAPI schema --------------------------------------------------------------------------
class Routes(dict):
    def __repr__(self) -> str:  # hypothesis prints fixtures of a failing example; the strategies are huge
        return f"Routes({sorted(self)})"


@pytest.fixture(scope="module")
def fuzz_routes(small_srv):
    doc = requests.get(small_srv.url + "/openapi.json", timeout=10).json()
    defs = doc["components"]["schemas"]
    routes = Routes({path: from_schema(op["requestBody"]["content"]["application/json"]["schema"], defs)
                     for path, ops in doc["paths"].items() for op in ops.values() if "requestBody" in op})
    assert set(routes) == {CHAT, CMPL, "/", "/generate", "/generate_stream", "/tokenize", "/detokenize"}
    return routes


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_fuzzed_bodies_never_get_a_5xx(small_srv, fuzz_routes, data):
    path = data.draw(st.sampled_from(sorted(fuzz_routes)))
    body = data.draw(fuzz_routes[path])
    r = requests.post(small_srv.url + path, json=body, timeout=60)
    assert r.status_code < 500, (path, body, r.text)
    assert "internal_server_error" not in r.text, (path, body, r.text)
    assert "incomplete_generation" not in r.text, (path, body, r.text)
    if r.status_code >= 400:
        error = r.json()["error"]
        assert isinstance(error, str if r.status_code in (422, 429) else dict)


def test_soak_reports_outcomes_drift_and_the_kv_blocks_left(small_srv):
    from qwen_awq.eval.soak import SoakPlan, kv_blocks_held, parse_metrics, soak

    plan = SoakPlan(small_srv.url, MODEL, {}, duration=4.0, rate=4.0, disconnect_frac=0.5, cancel_frac=0.5,
                    output_len=6, input_words=5, rng=random.Random(3))
    r = asyncio.run(soak(plan))
    assert r["requests"] == 16 and sum(r["outcomes"].values()) == 16 and r["errors_by_class"] == {}
    assert r["outcomes"].get("disconnect", 0) >= 1 and r["outcomes"].get("ok", 0) >= 1
    assert r["kv_blocks_held_at_end"] == 0 and small_srv.all_blocks_free()
    assert len(r["p99_latency_s_per_window"]) == 6 and all(m > 0 for m in r["rss_mib_per_window"])
    held = parse_metrics('vllm:kv_cache_usage_perc{model_name="m"} 0.25\n'
                         'vllm:cache_config_info{block_size="16",num_gpu_blocks="40"} 1.0\n')
    assert kv_blocks_held(held) == 10
