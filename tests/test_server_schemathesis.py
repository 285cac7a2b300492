"""Schemathesis against the live server's own OpenAPI document: valid and invalid bodies for every documented
operation; the server must never answer 5xx. Bounded (examples per operation, a small context) to a couple
of minutes on a 2-core CPU."""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from server_utils import live_server

from qwen_awq.models.loader import load_model
from qwen_awq.tokenizer import load_tokenizer

EXAMPLES_PER_OPERATION = 20


@pytest.fixture(scope="module")
def srv(qwen_dir):
    model, tok = load_model(qwen_dir, dtype="float32", device="cpu"), load_tokenizer(qwen_dir)
    # A queue of 4 sequences and a 32-token context bound each request's work (n beyond the queue is a 400):
    # the sampler over Qwen's 151851 ids takes tens of ms per sequence and step on the CPU.
    with live_server(model, tok, kv_cache_memory=2**20, max_model_len=32, max_num_seqs=4, max_waiting=4,
                     max_body_bytes=1 << 16) as server:
        yield server


@pytest.fixture(scope="module")
def api_schema(srv):
    return schemathesis.openapi.from_url(srv.url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_server_error(case, srv):
    case.call_and_validate(base_url=srv.url, checks=[not_a_server_error])
