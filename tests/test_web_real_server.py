"""The web chat page in a real browser (Debian's chromium, Playwright) against the real server serving
SmolLM2-135M-Instruct: a streamed greedy reply equals the non-streaming one, Stop aborts the request and
frees its KV blocks, chats survive a reload, the context meter counts as /tokenize does, context errors."""
from __future__ import annotations

import os
import re

import pytest
import requests
from playwright import sync_api
from server_utils import live_server, metric, scrape
from web_utils import CHROMIUM, WATCH_REPLY, open_tab

import qwen_awq

expect = sync_api.expect
# CI sets QWEN_AWQ_REQUIRE_BROWSER=1 so a missing chromium fails there instead of skipping quietly.
if not CHROMIUM.exists() and not os.environ.get("QWEN_AWQ_REQUIRE_BROWSER"):
    pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)", allow_module_level=True)

MODEL = "smollm2"
MAX_MODEL_LEN = 512
SYSTEM = "You are a helpful assistant."  # the page's default system prompt
CHATS_KEY = "qwen-awq.chats.v1"  # where store.js keeps the conversations
CHAT_PATH = "/v1/chat/completions"
# Chromium logs every non-2xx fetch like this; the page shows those errors itself, so they are expected.
EXPECTED_CONSOLE = "Failed to load resource"


@pytest.fixture(scope="module")
def srv():
    # On the CPU (~60 ms a token on 2 cores) a reply streams slowly enough to watch its pieces and press Stop.
    model, tok = qwen_awq.load(None, device="cpu")
    # 64 MiB of KV cache holds a full 512-token context many times over, so nothing here is preempted.
    with live_server(model, tok, name=MODEL, kv_cache_memory=2**26, max_model_len=MAX_MODEL_LEN) as server:
        yield server


@pytest.fixture
def page(browser, srv):
    """A fresh browser profile (empty localStorage) on the served page; fails the test on any script error.
    Afterwards the engine must hold no request and no KV block, whatever the test did."""
    with open_tab(browser, srv.url, EXPECTED_CONSOLE) as tab:
        expect(tab.locator("#model-name")).to_have_text(MODEL)
        yield tab
    assert srv.wait_idle()


def greedy(page, max_tokens: int) -> None:
    """The Deterministic preset (temperature 0) and a Max tokens value, set through the page's controls."""
    page.locator("#preset").select_option("deterministic")
    page.locator("#max-tokens").fill(str(max_tokens))


def send(page, text: str) -> dict:
    """Type `text`, press Enter, and return the chat request body the page sent."""
    with page.expect_request(lambda r: r.url.endswith(CHAT_PATH) and r.method == "POST") as sent:
        page.locator("#prompt").fill(text)
        page.locator("#prompt").press("Enter")
    return sent.value.post_data_json


def wait_idle(page) -> None:
    """Until no reply is streaming (the Send button is enabled again)."""
    expect(page.locator("#send")).to_be_enabled(timeout=60_000)
    expect(page.locator(".msg-assistant[aria-busy]")).to_have_count(0)


def assistant_texts(page) -> list[str]:
    return page.locator("#messages .msg-assistant .msg-body").all_text_contents()


def stored_messages(page) -> list[dict]:
    """The current chat's turns exactly as the page saved them in localStorage (raw model text)."""
    saved = page.evaluate(f"JSON.parse(localStorage.getItem('{CHATS_KEY}'))")
    chat = next(c for c in saved["chats"] if c["id"] == saved["currentId"])
    return chat["messages"]


def non_streaming(srv, body: dict) -> requests.Response:
    """The same request the page made, asked of the server without streaming."""
    return requests.post(srv.url + CHAT_PATH, json=body | {"stream": False}, timeout=120)


def server_count(srv, messages: list[dict]) -> int:
    r = requests.post(srv.url + "/tokenize", json={"model": MODEL, "messages": messages}, timeout=30)
    r.raise_for_status()
    return r.json()["count"]


def test_greedy_reply_streams_in_and_equals_the_non_streaming_answer(page, srv):
    greedy(page, 48)
    page.evaluate(WATCH_REPLY)
    question = "What is the capital of France?"
    body = send(page, question)
    wait_idle(page)
    assert body == {"model": MODEL, "stream": True, "temperature": 0, "max_tokens": 48, "messages": [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]}
    reference = non_streaming(srv, body).json()["choices"][0]["message"]["content"]
    assert "Paris" in reference
    reply = stored_messages(page)[-1]
    assert (reply["role"], reply["content"], reply["finish"]) == ("assistant", reference, "stop")
    assert not reply["failed"]
    assert assistant_texts(page) == [reference]  # a plain sentence: the Markdown view shows it verbatim
    states = page.evaluate("window.__states")
    assert states[-1] == reference
    assert all(reference.startswith(s) for s in states), states
    assert len(states) >= 4, states  # at least three partial states before the whole sentence


def test_stop_aborts_the_request_on_the_server_and_frees_its_blocks(page, srv):
    max_tokens = 400  # a story this long takes many seconds on a CPU: Stop lands well before the end
    greedy(page, max_tokens)
    before = scrape(srv.url)
    body = send(page, "Write a long story about a dragon who learns to bake bread.")
    expect(page.locator(".msg-assistant[aria-busy=true] .msg-body")).to_have_text(re.compile(r"\w+\s+\w"))
    page.locator("#stop").click()
    wait_idle(page)
    expect(page.locator(".msg-assistant .msg-note")).to_have_text("Stopped.")
    assert srv.wait_idle()
    assert srv.core.scheduler.num_running == 0 and srv.core.scheduler.num_waiting == 0
    after = scrape(srv.url)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, MODEL, **labels) - metric(before, name, MODEL, **labels)

    assert delta("request_success_total", finished_reason="abort") == 1
    assert delta("request_success_total", finished_reason="length") == 0
    assert delta("request_success_total", finished_reason="stop") == 0
    generated = int(delta("generation_tokens_total"))
    assert 0 < generated < max_tokens
    kept = stored_messages(page)[-1]
    assert kept["stopped"] and kept["content"].strip()
    # What the page kept is the start of what the server had generated when the request was aborted.
    upto_abort = non_streaming(srv, body | {"max_tokens": generated}).json()["choices"][0]["message"]
    assert upto_abort["content"].startswith(kept["content"])
    page.wait_for_timeout(300)
    assert stored_messages(page)[-1] == kept  # nothing more arrives after Stop


def test_new_chat_and_reload_keep_the_conversation_list(page):
    greedy(page, 12)
    send(page, "What is the capital of France?")
    wait_idle(page)
    first = stored_messages(page)
    page.locator("#new-chat").click()
    expect(page.locator("#messages .msg")).to_have_count(0)
    expect(page.locator("#chat-title")).to_have_text("New chat")
    body = send(page, "Name a colour.")
    wait_idle(page)
    assert body["messages"] == [{"role": "system", "content": SYSTEM},
                                {"role": "user", "content": "Name a colour."}]
    page.reload()
    chats = page.locator("#chat-list .chat-open")
    expect(chats).to_have_text(["Name a colour.", "What is the capital of France?"])
    expect(page.locator("#chat-list [aria-current=page]")).to_have_text("Name a colour.")
    chats.nth(1).click()
    expect(page.locator("#messages .msg-body")).to_have_text([m["content"] for m in first])
    assert "Paris" in first[-1]["content"]


def test_context_meter_shows_the_servers_token_count(page, srv):
    system = {"role": "system", "content": SYSTEM}
    text = page.locator("#context-text")
    # Before anything is typed the next prompt is the system prompt and an empty user turn.
    empty = server_count(srv, [system, {"role": "user", "content": ""}])
    expect(text).to_have_text(f"{empty} / {MAX_MODEL_LEN} tokens")
    draft = "How many legs does a spider have? Answer with a number."
    page.locator("#prompt").fill(draft)
    typed = server_count(srv, [system, {"role": "user", "content": draft}])
    assert typed > empty
    expect(text).to_have_text(f"{typed} / {MAX_MODEL_LEN} tokens")
    greedy(page, 16)
    page.locator("#prompt").press("Enter")
    wait_idle(page)
    turns = [{"role": m["role"], "content": m["content"]} for m in stored_messages(page)]
    after = server_count(srv, [system, *turns, {"role": "user", "content": ""}])
    assert after > typed
    expect(text).to_have_text(f"{after} / {MAX_MODEL_LEN} tokens")
    assert page.evaluate("document.getElementById('context-meter').value") == after


def test_an_over_long_message_shows_the_servers_context_error(page, srv):
    greedy(page, 16)
    long_text = "apple banana cherry " * 200  # about 600 tokens: more than the 512-token context
    body = send(page, long_text)
    error = page.locator("#error")
    expect(error).to_have_attribute("data-kind", "context")
    said = non_streaming(srv, body)
    assert said.status_code == 400
    message = said.json()["error"]["message"]
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in message
    expect(error).to_contain_text("too long")
    expect(error).to_contain_text(message)
    expect(page.locator("#error-retry")).to_be_hidden()
    # The refused message goes back to the input box instead of staying in the history.
    expect(page.locator("#prompt")).to_have_value(long_text)
    expect(page.locator(".msg-user")).to_have_count(0)
    expect(page.locator("#send")).to_be_enabled()
