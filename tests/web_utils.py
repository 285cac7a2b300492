"""Browser-test helpers: a scripted stand-in for the qwen-awq server's chat API, run on a loopback port.

The stub serves the real static page and implements only what the page calls (/v1/models, /info, /tokenize,
streaming /v1/chat/completions), replying per user message from a script so tests control timing and errors.
Also here: in-page watchers the tests install, and the Markdown cases with their hand-written HTML.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parents[1] / "qwen_awq" / "server" / "static"
MODEL_ID = "stub-model"
MAX_MODEL_LEN = 512
CHROMIUM = Path("/usr/bin/chromium")
# Flags from the issue: no sandbox (root in CI) and nothing that reaches the network on its own.
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def stub_token_count(messages: list[dict]) -> int:
    """The stub's tokenizer: whitespace words plus 4 template tokens per message (like ChatML's markers)."""
    return sum(len(m["content"].split()) + 4 for m in messages)


def turn_error(messages: list[dict]) -> str:
    """Why the real server's chat template would refuse `messages` (turns must alternate and end with the
    user's), or "" when it would take them."""
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            return f"messages[{i}] has role '{m['role']}' where a {expected} message was expected"
    return "" if turns and turns[-1]["role"] == "user" else "the last message must come from the user"


@dataclass
class Reply:
    """What the stub answers to one user message: streamed pieces, or an HTTP error."""

    pieces: list[str] = field(default_factory=list)
    delay_s: float = 0.0
    status: int = 200
    error: str = ""
    finish_reason: str = "stop"
    retry_after: str = ""

    def __post_init__(self) -> None:
        if (self.status == 200) == bool(self.error):
            raise ValueError("a Reply is either a stream (status 200) or an error with a message")
        if self.delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {self.delay_s}")


@dataclass
class StubServer:
    """Scripted replies keyed by the last user message; records every chat request and every cancel."""

    replies: dict[str, Reply] = field(default_factory=dict)
    requests: list[dict] = field(default_factory=list)
    tokenize_requests: list[dict] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    completed: int = 0

    def reset(self) -> None:
        self.replies.clear()
        self.requests.clear()
        self.tokenize_requests.clear()
        self.cancelled.clear()
        self.completed = 0

    def reply_for(self, body: dict) -> Reply:
        """The scripted reply, else an echo numbered by request, so a regenerated reply differs."""
        last = body["messages"][-1]["content"]
        return self.replies.get(last, Reply(pieces=["You said: ", last, f" (reply {len(self.requests)})"]))

    async def stream(self, reply: Reply) -> AsyncIterator[str]:
        finished = False
        try:
            yield sse_chunk({"role": "assistant"}, None)
            for piece in reply.pieces:
                await asyncio.sleep(reply.delay_s)
                yield sse_chunk({"content": piece}, None)
            yield sse_chunk({}, reply.finish_reason)
            yield "data: [DONE]\n\n"
            finished = True
            self.completed += 1
        finally:
            # Starlette cancels this generator when the client disconnects: that is the server-side abort.
            if not finished:
                self.cancelled.set()


def sse_chunk(delta: dict, finish_reason: str | None) -> str:
    chunk = {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 0, "model": MODEL_ID,
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
    return f"data: {json.dumps(chunk)}\n\n"


def error_response(status: int, message: str, retry_after: str = "") -> Response:
    kind = "invalid_request_error" if status == 400 else "server_error"
    headers = {"Retry-After": retry_after} if retry_after else None
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def build_stub_app(stub: StubServer) -> FastAPI:
    app = FastAPI()
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/")
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": MODEL_ID, "object": "model", "owned_by": "qwen-awq", "max_model_len": MAX_MODEL_LEN}
        return {"object": "list", "data": [card]}

    @app.get("/info")
    async def info() -> dict:
        return {"model_id": MODEL_ID, "max_total_tokens": MAX_MODEL_LEN,
                "max_input_tokens": MAX_MODEL_LEN - 1}

    @app.post("/tokenize", response_model=None)
    async def tokenize(request: Request) -> dict | Response:
        body = await request.json()
        stub.tokenize_requests.append(body)
        if problem := turn_error(body["messages"]):
            return error_response(400, problem)
        count = stub_token_count(body["messages"])
        return {"count": count, "tokens": list(range(count)), "max_model_len": MAX_MODEL_LEN}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await request.json()
        stub.requests.append(body)
        if problem := turn_error(body["messages"]):
            return error_response(400, problem)
        reply = stub.reply_for(body)
        if reply.status != 200:
            return error_response(reply.status, reply.error, reply.retry_after)
        return StreamingResponse(stub.stream(reply), media_type="text/event-stream")

    return app


class ServerThread:
    """Runs an ASGI app with uvicorn on an ephemeral loopback port in a daemon thread."""

    def __init__(self, app: FastAPI) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the stub server did not start within 10 s")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)


# Records each distinct text the newest reply shows while it streams, as the user would have seen it.
WATCH_REPLY = """() => {
  window.__states = [];
  new MutationObserver(() => {
    const bodies = document.querySelectorAll('#messages .msg-assistant .msg-body');
    const text = bodies.length ? bodies[bodies.length - 1].textContent : '';
    if (text && text !== window.__states.at(-1)) window.__states.push(text);
  }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
}"""

# Records every element with active content ever inserted into the message list, however briefly.
WATCH_ELEMENTS = """() => {
  window.__dangerous = [];
  new MutationObserver((records) => {
    for (const r of records) for (const n of r.addedNodes) {
      const found = n.nodeType === 1 ? [n, ...n.querySelectorAll('*')] : [];
      for (const e of found) {
        if (/^(IMG|SCRIPT|A|IFRAME|OBJECT|SVG|STYLE)$/i.test(e.tagName)) window.__dangerous.push(e.tagName);
      }
    }
  }).observe(document.getElementById('messages'), {childList: true, subtree: true});
}"""


def code_html(lang: str, code: str) -> str:
    return (f'<div class="code-block"><div class="code-head"><span class="code-lang">{lang}</span><button '
            f'class="copy" type="button" aria-label="Copy {lang} block">Copy</button></div><pre><code>{code}'
            '</code></pre></div>')


MARKDOWN_CASES = {
    "snake_case_name and 2 * 3 * 4": "<p>snake_case_name and 2 * 3 * 4</p>",
    "a\nb\n\nc": "<p>a\nb</p><p>c</p>",
    "- a\n  - b\n  - c\n- d": "<ul><li>a<ul><li>b</li><li>c</li></ul></li><li>d</li></ul>",
    "* item\n\n* loose": "<ul><li>item</li><li>loose</li></ul>",
    "3. three\n4. four": '<ol start="3"><li>three</li><li>four</li></ol>',
    "1. step\n   ```bash\n   ls -l\n   ```\n2. next":
        f"<ol><li>step{code_html('bash', 'ls -l')}</li><li>next</li></ol>",
    "```py\nprint(1)": code_html("py", "print(1)"),  # still streaming: the fence is not closed yet
    "> quote **b**": "<blockquote><p>quote <strong>b</strong></p></blockquote>",
    "**bold *it* in** `x` ~~s~~": "<p><strong>bold <em>it</em> in</strong> <code>x</code> <del>s</del></p>",
    "intro\n| h1 | h2 |\n|---|:-:|\n| `a` | b |": '<p>intro</p><div class="table-wrap"><table><thead><tr>'
        "<th>h1</th><th>h2</th></tr></thead><tbody><tr><td><code>a</code></td><td>b</td></tr></tbody></table></div>",
    "## Head\n---": "<h4>Head</h4><hr>",
    "![alt](http://x/y.png)": '<p><span class="link-text">alt<span class="link-url"> (http://x/y.png)</span></span></p>',
}


@contextmanager
def open_tab(browser, url: str, ignored_console: str) -> Iterator:
    """A fresh browser profile (empty localStorage) on `url`; fails the test on any script error."""
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    tab = context.new_page()
    problems: list[str] = []
    tab.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    tab.on("console", lambda msg: problems.append(f"console: {msg.text}")
           if msg.type == "error" and ignored_console not in msg.text else None)
    tab.goto(url)
    yield tab
    context.close()
    assert problems == []
