"""A real uvicorn server on a free loopback port, run in a background thread, for the server tests; plus a
Prometheus scrape parser and hypothesis strategies built from the server's OpenAPI schema.

In-process so that tests can also look at the engine (running requests, free KV blocks) behind the HTTP API.
"""
from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import requests
import uvicorn
from hypothesis import strategies as st

from qwen_awq.engine.async_engine import AsyncEngine
from qwen_awq.engine.llm_engine import EngineConfig, LLMEngine
from qwen_awq.ports import free_port
from qwen_awq.server.app import create_app

START_TIMEOUT_S = 30.0


@dataclass
class LiveServer:
    url: str  # http://127.0.0.1:PORT, no trailing slash
    port: int
    engine: AsyncEngine

    @property
    def core(self) -> LLMEngine:
        return self.engine.engine

    def all_blocks_free(self) -> bool:
        bm = self.core.block_manager
        return (bm.num_free_blocks == bm.num_blocks and not self.core.requests
                and all(bm.ref_count(b) == 0 for b in range(bm.num_blocks)))

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until the engine holds no request (aborts are applied by its step thread)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.all_blocks_free():
                return True
            time.sleep(0.02)
        return self.all_blocks_free()


@contextmanager
def live_server(model: Any, tokenizer: Any, name: str = "tiny-qwen", api_key: str | None = None,
                max_body_bytes: int | None = None, special_tokens_in_prompts: bool = True,
                **engine_config: Any) -> Iterator[LiveServer]:
    """Serve `model` with an EngineConfig built from `engine_config`; stop the server and engine on exit."""
    engine = AsyncEngine(LLMEngine(model, tokenizer, EngineConfig(**engine_config)))
    app = create_app(engine, name, api_key=api_key, max_body_bytes=max_body_bytes,
                     special_tokens_in_prompts=special_tokens_in_prompts)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the test server on port {port} did not start")
        time.sleep(0.02)
    try:
        yield LiveServer(f"http://127.0.0.1:{port}", port, engine)
    finally:
        server.should_exit = True
        thread.join(timeout=START_TIMEOUT_S)


def scrape(url: str) -> dict[str, float]:
    """GET /metrics as {"name{labels}": value} for the vllm: series (vLLM's metric names)."""
    text = requests.get(url + "/metrics", timeout=10).text
    return {m[1]: float(m[2]) for m in re.finditer(r"^(vllm:\S+) (\S+)$", text, re.M)}


def metric(values: dict[str, float], name: str, model: str = "tiny-qwen", **labels: str) -> float:
    """One series of a scrape, selected by name and exact labels (0 when absent, as Prometheus reads it)."""
    want = {"model_name": model} | labels
    for key, value in values.items():
        series, _, rest = key.partition("{")
        if series == f"vllm:{name}" and dict(re.findall(r'(\w+)="([^"]*)"', rest)) == want:
            return value
    return 0.0


JSON_ANY = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.text(max_size=8)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6)
# Fields that scale the work of a request: kept small so that every fuzz example is quick.
SMALL_INTS = frozenset({"n", "best_of", "max_tokens", "max_new_tokens", "max_completion_tokens", "min_tokens",
                        "logprobs", "top_logprobs", "top_n_tokens", "truncate"})


def from_schema(schema: dict[str, Any], defs: dict[str, Any], name: str = "", depth: int = 0
                ) -> st.SearchStrategy:
    """JSON values for `schema` (the JSON-schema subset pydantic emits); each object field may also get
    any JSON value at all, so wrong types are tried too."""
    if depth > 8:
        return st.none()
    if "$ref" in schema:
        return from_schema(defs[schema["$ref"].rsplit("/", 1)[1]], defs, name, depth + 1)
    if "anyOf" in schema or "oneOf" in schema:
        options = schema.get("anyOf", schema.get("oneOf"))
        return st.one_of([from_schema(s, defs, name, depth + 1) for s in options])
    if "enum" in schema or "const" in schema:
        return st.sampled_from(schema.get("enum", [schema.get("const")]))
    kind = schema.get("type")
    if kind == "integer":
        low, high = schema.get("minimum"), schema.get("maximum")
        return st.integers(-2, 5) if name in SMALL_INTS else st.integers(low, high)
    if kind == "object" and "properties" in schema:
        props = {k: from_schema(v, defs, k, depth + 1) | JSON_ANY for k, v in schema["properties"].items()}
        required = set(schema.get("required", []))
        return st.fixed_dictionaries({k: v for k, v in props.items() if k in required},
                                     optional={k: v for k, v in props.items() if k not in required})
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {}), defs, name, depth + 1),
                        min_size=schema.get("minItems", 0), max_size=3)
    simple = {"number": st.floats(-3, 3) | st.sampled_from([0, 1, -1e30]), "string": st.text(max_size=12),
              "boolean": st.booleans(), "null": st.none()}
    return simple.get(kind, JSON_ANY)


def write_smollm2_tiny(folder: Any) -> Any:
    """A tiny random Llama folder with the bundled SmolLM2's tokenizer.json and Jinja chat template (49152 ids)."""
    import shutil

    from checkpoints import write_llama_checkpoint

    from qwen_awq.default_model import default_fp_dir

    write_llama_checkpoint(folder, vocab_size=49152, overrides={"bos_token_id": 1, "eos_token_id": 2})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_fp_dir() / name, folder / name)
    return folder
