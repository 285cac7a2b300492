"""The web chat page in a real browser (Debian's chromium driven by Playwright) against a scripted server."""
from __future__ import annotations

import os

import pytest
from playwright import sync_api
from web_utils import (
    CHROMIUM,
    MARKDOWN_CASES,
    MAX_MODEL_LEN,
    MODEL_ID,
    WATCH_ELEMENTS,
    WATCH_REPLY,
    Reply,
    ServerThread,
    StubServer,
    build_stub_app,
    open_tab,
    stub_token_count,
)

expect = sync_api.expect
# CI sets QWEN_AWQ_REQUIRE_BROWSER=1 so a missing chromium fails there instead of skipping quietly.
if not CHROMIUM.exists() and not os.environ.get("QWEN_AWQ_REQUIRE_BROWSER"):
    pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)", allow_module_level=True)

SYSTEM = "You are a helpful assistant."
# Chromium logs every non-2xx fetch like this; the page shows those errors itself, so they are expected.
EXPECTED_CONSOLE = "Failed to load resource"


@pytest.fixture(scope="module")
def stub_server():
    stub = StubServer()
    with ServerThread(build_stub_app(stub)) as url:
        yield stub, url


@pytest.fixture
def stub(stub_server) -> StubServer:
    stub_server[0].reset()
    return stub_server[0]


@pytest.fixture
def page(browser, stub_server, stub):
    """A fresh browser profile (empty localStorage) on the page; fails the test on any script error."""
    with open_tab(browser, stub_server[1], EXPECTED_CONSOLE) as tab:
        expect(tab.locator("#model-name")).to_have_text(MODEL_ID)
        yield tab


def send(page, text: str) -> None:
    page.locator("#prompt").fill(text)
    page.locator("#prompt").press("Enter")


def wait_idle(page) -> None:
    """Until no reply is streaming (the Send button is enabled again)."""
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator(".msg-assistant[aria-busy]")).to_have_count(0)


def assistant_texts(page) -> list[str]:
    return page.locator("#messages .msg-assistant .msg-body").all_text_contents()


def test_reply_streams_in_piece_by_piece(page, stub):
    pieces = ["The ", "quick ", "brown ", "fox ", "jumps."]
    stub.replies["Tell me a sentence"] = Reply(pieces=pieces, delay_s=0.25)
    page.evaluate(WATCH_REPLY)
    send(page, "Tell me a sentence")
    expect(page.locator("#stop")).to_be_visible()
    expect(page.locator(".msg-assistant[aria-busy=true] .msg-body")).to_contain_text("The quick")
    wait_idle(page)
    final = "".join(pieces)
    assert assistant_texts(page) == [final]
    states = page.evaluate("window.__states")
    partial = [s for s in states if s != final]
    assert all(final.startswith(s) for s in states)
    assert len(partial) >= 3, states
    assert states[-1] == final
    assert stub.requests == [{"model": MODEL_ID, "stream": True, "messages": [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": "Tell me a sentence"}]}]
    expect(page.locator("#chat-list .chat-open")).to_have_text(["Tell me a sentence"])
    expect(page.locator("#stop")).to_be_hidden()


def test_markdown_becomes_elements(page, stub):
    text = ("# Title\nSome `inline <b>x</b>` and **bold** and *it* text.\n\n"
            "```python\nprint('<b>hi</b>')\n```\n\n1. first\n2. second\n\n- dot\n\nSee [docs](https://example.com/x).")
    stub.replies["md"] = Reply(pieces=[text[:40], text[40:]])
    send(page, "md")
    wait_idle(page)
    reply = page.locator("#messages .msg-assistant .msg-body")
    expect(reply.locator("h3")).to_have_text("Title")
    expect(reply.locator("p code")).to_have_text("inline <b>x</b>")
    expect(reply.locator("strong")).to_have_text("bold")
    expect(reply.locator("em")).to_have_text("it")
    expect(reply.locator("pre code")).to_have_text("print('<b>hi</b>')")
    expect(reply.locator(".code-lang")).to_have_text("python")
    expect(reply.locator("ol li")).to_have_text(["first", "second"])
    expect(reply.locator("ul li")).to_have_text(["dot"])
    expect(reply.locator(".link-text")).to_have_text("docs (https://example.com/x)")
    assert reply.locator("a, b").count() == 0


def test_markdown_edge_cases_render_exactly(page):
    render = """async (texts) => {
      const { renderMarkdown } = await import('./static/markdown.js');
      return texts.map((t) => { const d = document.createElement('div'); d.append(renderMarkdown(t));
                                return d.innerHTML; });
    }"""
    rendered = page.evaluate(render, list(MARKDOWN_CASES))
    assert dict(zip(MARKDOWN_CASES, rendered, strict=True)) == MARKDOWN_CASES


def test_model_html_is_shown_as_text_and_never_runs(page, stub):
    evil = ["Look: <img src=x onerror=window.__pwned=1>", " and <script>window.__pwned=2</script>",
            " [click](javascript:window.__pwned=3)", "\n\n```html\n<img src=y onerror=window.__pwned=4>\n```"]
    user = "<img src=z onerror=window.__pwned=5>"
    stub.replies[user] = Reply(pieces=evil, delay_s=0.05)
    page.evaluate(WATCH_ELEMENTS)
    send(page, user)
    wait_idle(page)
    assert page.evaluate("window.__dangerous") == []  # not even for a moment while the reply streamed
    for _ in range(2):  # as streamed, then as re-rendered from localStorage after a reload
        page.wait_for_timeout(300)  # an injected <img> would fire onerror by now
        assert page.evaluate("window.__pwned") is None
        messages = page.locator("#messages")
        assert messages.locator("img, script, a, iframe").count() == 0
        shown = messages.inner_text()
        for literal in ["<img src=x onerror=window.__pwned=1>", "<script>window.__pwned=2</script>",
                        "click (javascript:window.__pwned=3)", "<img src=y onerror=window.__pwned=4>", user]:
            assert literal in shown
        page.reload()
        expect(page.locator("#model-name")).to_have_text(MODEL_ID)


def test_stop_cancels_the_request_on_the_server(page, stub):
    words = [f"w{i} " for i in range(100)]
    stub.replies["long story"] = Reply(pieces=words, delay_s=0.1)
    send(page, "long story")
    expect(page.locator(".msg-assistant .msg-body")).to_contain_text("w3 ")
    page.locator("#stop").click()
    assert stub.cancelled.wait(5), "the server never saw the request cancelled"
    assert stub.completed == 0
    wait_idle(page)
    expect(page.locator("#stop")).to_be_hidden()
    kept = assistant_texts(page)[0]
    assert "".join(words).startswith(kept) and "w3 " in kept and "w99" not in kept
    expect(page.locator(".msg-assistant .msg-note")).to_have_text("Stopped.")
    page.wait_for_timeout(300)
    assert assistant_texts(page)[0] == kept  # nothing more arrives after Stop
    send(page, "again")
    expect(page.locator(".msg-assistant .msg-body").last).to_have_text("You said: again (reply 2)")


def test_stop_before_the_first_token_keeps_turns_alternating(page, stub):
    stub.replies["slow start"] = Reply(pieces=["late"], delay_s=5)
    send(page, "slow start")
    expect(page.locator("#stop")).to_be_visible()
    page.keyboard.press("Escape")  # the keyboard way to press Stop
    assert stub.cancelled.wait(5)
    wait_idle(page)
    expect(page.locator(".msg-assistant .msg-note")).to_have_text("Stopped.")
    send(page, "next")  # the stub, like the real server, refuses two user turns in a row
    expect(page.locator(".msg-assistant .msg-body").last).to_have_text("You said: next (reply 2)")
    assert [m["role"] for m in stub.requests[1]["messages"]] == ["system", "user", "assistant", "user"]
    expect(page.locator("#error")).to_be_hidden()


def test_new_chat_and_reload_keep_the_conversation_list(page, stub):
    page.locator("#system-box summary").click()
    page.locator("#system-prompt").fill("Answer in French.")
    send(page, "first question")
    expect(page.locator(".msg-assistant .msg-body")).to_have_text("You said: first question (reply 1)")
    page.locator("#new-chat").click()
    expect(page.locator("#messages .msg")).to_have_count(0)
    expect(page.locator("#chat-title")).to_have_text("New chat")
    page.locator("#system-prompt").fill(SYSTEM)
    send(page, "second question")
    wait_idle(page)
    assert stub.requests[1]["messages"] == [{"role": "system", "content": SYSTEM},
                                            {"role": "user", "content": "second question"}]
    page.reload()
    chats = page.locator("#chat-list .chat-open")
    expect(chats).to_have_text(["second question", "first question"])
    expect(page.locator("#chat-list [aria-current=page]")).to_have_text("second question")
    chats.nth(1).click()
    expect(page.locator("#messages .msg-body")).to_have_text(
        ["first question", "You said: first question (reply 1)"])
    expect(page.locator("#system-prompt")).to_have_value("Answer in French.")
    assert stub.requests[0]["messages"][0] == {"role": "system", "content": "Answer in French."}


def test_leaving_a_streaming_chat_stops_it_and_delete_removes_a_chat(page, stub):
    stub.replies["slow one"] = Reply(pieces=[f"p{i} " for i in range(100)], delay_s=0.1)
    send(page, "slow one")
    expect(page.locator(".msg-assistant .msg-body")).to_contain_text("p2 ")
    page.locator("#new-chat").click()
    assert stub.cancelled.wait(5)
    expect(page.locator("#stop")).to_be_hidden()
    expect(page.locator("#send")).to_be_enabled()
    send(page, "other")
    wait_idle(page)
    page.locator("#chat-list .chat-open", has_text="slow one").click()
    expect(page.locator(".msg-assistant .msg-note")).to_have_text("Stopped.")
    page.get_by_role("button", name="Delete chat “other”").click()
    page.reload()
    expect(page.locator("#chat-list .chat-open")).to_have_text(["slow one"])


def test_regenerate_replaces_the_last_reply(page, stub):
    send(page, "pick a number")
    expect(page.locator(".msg-assistant .msg-body")).to_have_text("You said: pick a number (reply 1)")
    page.locator("#regenerate").click()
    expect(page.locator(".msg-assistant .msg-body")).to_have_text("You said: pick a number (reply 2)")
    wait_idle(page)
    assert stub.requests[1] == stub.requests[0]
    page.reload()
    expect(page.locator("#messages .msg-body")).to_have_text(
        ["pick a number", "You said: pick a number (reply 2)"])


def sampling_fields(body: dict) -> dict:
    return {k: body[k] for k in ("temperature", "top_p", "max_tokens") if k in body}


def test_presets_and_controls_set_the_sampling_fields(page, stub):
    steps = [("deterministic", "", {"temperature": 0}),
             ("creative", "64", {"temperature": 1, "top_p": 0.95, "max_tokens": 64}),
             ("defaults", "", {})]
    for preset, max_tokens, expected in steps:
        page.locator("#preset").select_option(preset)
        page.locator("#max-tokens").fill(max_tokens)
        send(page, f"preset {preset}")
        wait_idle(page)
        assert sampling_fields(stub.requests[-1]) == expected
    page.locator("#temperature").fill("0.7")
    expect(page.locator("#preset")).to_have_value("custom")
    send(page, "custom")
    wait_idle(page)
    assert sampling_fields(stub.requests[-1]) == {"temperature": 0.7}
    page.locator("#temperature").fill("5")  # out of range: the browser flags it and nothing is sent
    send(page, "too hot")
    page.wait_for_timeout(200)
    assert len(stub.requests) == 4
    assert page.evaluate("document.getElementById('temperature').validity.rangeOverflow")
    page.reload()  # settings survive a reload
    expect(page.locator("#temperature")).to_have_value("5")
    expect(page.locator("#preset")).to_have_value("custom")


def test_errors_are_explained(page, stub):
    stub.replies["hello"] = Reply(status=503, error="64 requests are waiting", retry_after="2")
    send(page, "hello")
    error = page.locator("#error")
    expect(error).to_be_visible()
    expect(error).to_have_attribute("data-kind", "busy")
    expect(error).to_contain_text("busy")
    expect(error).to_contain_text("in 2 s")
    expect(error).to_contain_text("64 requests are waiting")
    # The unanswered message goes back to the input box instead of staying in the history.
    expect(page.locator("#prompt")).to_have_value("hello")
    expect(page.locator(".msg-user")).to_have_count(0)
    stub.replies.pop("hello")  # the server is free again: Retry resends the same message
    page.locator("#error-retry").click()
    expect(page.locator(".msg-assistant .msg-body")).to_have_text("You said: hello (reply 2)")
    expect(error).to_be_hidden()

    too_long = (f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you requested 900 "
                "tokens (388 in the messages, 512 in the completion).")
    stub.replies["long"] = Reply(status=400, error=too_long)
    send(page, "long")
    expect(error).to_have_attribute("data-kind", "context")
    expect(error).to_contain_text("too long")
    expect(error).to_contain_text(too_long)
    expect(error).to_contain_text("Start a new chat")
    expect(page.locator("#error-retry")).to_be_hidden()
    expect(page.locator("#prompt")).to_have_value("long")
    expect(page.locator(".msg-user .msg-body")).to_have_text(["hello"])

    stub.replies["again"] = Reply(status=429, error="queue full")
    send(page, "again")
    expect(error).to_have_attribute("data-kind", "busy")
    expect(error).to_contain_text("queue full")


def test_context_usage_counts_conversation_and_draft(page, stub):
    # The system prompt (5 words + 4) and the empty user turn the next message goes in (0 + 4).
    expect(page.locator("#context-text")).to_have_text(f"13 / {MAX_MODEL_LEN} tokens")
    page.locator("#prompt").fill("one two three")
    expect(page.locator("#context-text")).to_have_text(f"16 / {MAX_MODEL_LEN} tokens")
    page.locator("#prompt").press("Enter")
    wait_idle(page)
    turns = [{"role": "assistant", "content": "You said: one two three (reply 1)"},
             {"role": "user", "content": ""}]
    expected = stub_token_count([*stub.requests[0]["messages"], *turns])
    expect(page.locator("#context-text")).to_have_text(f"{expected} / {MAX_MODEL_LEN} tokens")
    assert page.evaluate("document.getElementById('context-meter').value") == expected
    assert stub.tokenize_requests[-1]["model"] == MODEL_ID


def test_enter_sends_and_shift_enter_adds_a_line(page, stub):
    prompt = page.locator("#prompt")
    prompt.click()
    page.keyboard.type("line one")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("line two")
    assert stub.requests == []
    page.keyboard.press("Enter")
    wait_idle(page)
    assert stub.requests[0]["messages"][-1] == {"role": "user", "content": "line one\nline two"}
    expect(page.locator(".msg-user .msg-body")).to_have_text("line one\nline two")
    expect(prompt).to_have_value("")
