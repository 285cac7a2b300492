"""Structured output (engine/guided.py) on its own: 20 JSON schemas, a regex and a choice driving a plain decode loop
over the bundled model's logits (greedy and seeded sampling): every finished output parses and validates with
`jsonschema`. Masks are checked against the vocabulary's bytes for both tokenizer kinds; bad specs raise."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from assets import write_tiny_chatml_tokenizer
from reference import ContiguousKVCache

import qwen_awq
from qwen_awq.chat import encode_messages
from qwen_awq.engine.guided import GuidedDecoding, GuidedSpec, apply_guided_masks, unpack_bitmask
from qwen_awq.engine.output import eos_ids
from qwen_awq.errors import GrammarError
from qwen_awq.models.attention import ForwardBatch
from qwen_awq.tokenizer import HFTokenizer, QwenTokenizer

_INT = {"type": "integer", "minimum": -99, "maximum": 99}
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 9999}, "email": {"type": "string", "maxLength": 30}},
        "required": ["id"], "additionalProperties": False}}, "required": ["user"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"],
     "additionalProperties": False},
    {"type": "object", "properties": {"temperature": {"type": "number", "minimum": -50, "maximum": 50}},
     "required": ["temperature"], "additionalProperties": False},
    {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["zip"],
     "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {"type": "object", "properties": {"a": _INT, "b": {"type": "string", "maxLength": 10}}, "required": ["a"],
     "additionalProperties": False},
    {"type": "array", "items": {"type": "object", "properties": {"x": _INT, "y": _INT}, "required": ["x", "y"],
                                "additionalProperties": False}, "maxItems": 3},
    {"type": "object", "properties": {"version": {"const": 2}}, "required": ["version"], "additionalProperties": False},
    {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 1000}, {"type": "string", "maxLength": 8}]},
    {"type": "object", "properties": {"date": {"type": "string", "format": "date"}}, "required": ["date"],
     "additionalProperties": False},
    {"type": "object", "properties": {"note": {"type": ["string", "null"], "maxLength": 15}}, "required": ["note"],
     "additionalProperties": False},
    {"type": "integer", "enum": [1, 2, 3, 5, 8]},
    {"type": "object", "properties": {"matrix": {"type": "array", "items": {
        "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 2},
        "minItems": 2, "maxItems": 2}}, "required": ["matrix"], "additionalProperties": False},
    {"$defs": {"pt": {"type": "object", "properties": {"lat": _INT, "lon": _INT}, "required": ["lat", "lon"],
                      "additionalProperties": False}},
     "type": "object", "properties": {"start": {"$ref": "#/$defs/pt"}, "end": {"$ref": "#/$defs/pt"}},
     "required": ["start", "end"], "additionalProperties": False},
    {"type": "string", "minLength": 3, "maxLength": 12},
    {"type": "object", "properties": {"p": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}},
     "required": ["p"], "additionalProperties": False},
    {"type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                         "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}, "required": ["name", "arguments"],
     "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,8}$"},
                                               "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
]
PHONE = r"\+1 [0-9]{3}-[0-9]{4}"
CHOICES = ["yes", "no", "maybe not"]
MAX_NEW = 48


@pytest.fixture(scope="module")
def bundled():
    model, tok = qwen_awq.load(None)
    eos = eos_ids(tok, model.cfg.eos_token_ids)
    return model, tok, eos, GuidedDecoding(tok, model.cfg.vocab_size, eos)


def decode(model, prompt: list[int], matchers, eos, seed: int | None):
    """Greedy (seed None) or seeded temperature-0.8 sampling of every row from one prompt, each row masked by its
    matcher; a row ends at an end-of-sequence id or when its grammar is complete."""
    cfg, b = model.cfg, len(matchers)
    cache = ContiguousKVCache(cfg.num_layers, b, len(prompt) + MAX_NEW, cfg.num_kv_heads, cfg.head_dim,
                              model.dtype, model.device)
    ids, start = torch.tensor([prompt] * b).reshape(-1), 0
    outs, done = [[] for _ in range(b)], [False] * b
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        for _ in range(MAX_NEW):
            n = ids.numel() // b
            cache.step(n)
            fb = ForwardBatch(torch.arange(start, start + n).repeat(b), torch.ones(b * n), cache)
            hidden = model.forward_tokens(ids, fb).view(b, n, -1)[:, -1]  # (B, hidden)
            cache.advance()
            start += n
            logits = model.compute_logits(hidden)  # (B, V)
            live = [None if done[i] else m for i, m in enumerate(matchers)]
            apply_guided_masks(logits, live)
            tokens = logits.argmax(-1) if gen is None else \
                torch.multinomial(torch.softmax(logits / 0.8, -1), 1, generator=gen)[:, 0]
            for i, t in enumerate(tokens.tolist()):
                if live[i] is not None:
                    live[i].accept(t)
                    outs[i] += [] if t in eos else [t]
                    done[i] = t in eos or live[i].is_terminated()
            ids = tokens
            if all(done):
                break
    return ["stop" if d else "length" for d in done], outs


@pytest.mark.parametrize("seed", [None, 1234])
def test_schemas_regex_and_choice_always_parse(bundled, seed):
    model, tok, eos, guided = bundled
    specs = [GuidedSpec.json_schema(s) for s in SCHEMAS] + [GuidedSpec.regex(PHONE), GuidedSpec.choice(CHOICES)]
    prompt = encode_messages(tok, [{"role": "user", "content": "Give me an example as JSON."}])
    finish, outs = decode(model, prompt, [guided.matcher(s) for s in specs], eos, seed)
    texts = [tok.decode(o) for o in outs]
    for schema, why, text in zip(SCHEMAS, finish, texts, strict=False):
        if why == "stop":
            jsonschema.validate(json.loads(text), schema)
    assert finish.count("stop") >= 20, list(zip(finish, texts, strict=True))  # nearly all finish in 48 tokens
    assert finish[-2:] == ["stop", "stop"]
    assert re.fullmatch(PHONE, texts[-2]) and texts[-1] in CHOICES


def _accepts(guided, spec: GuidedSpec, tok, text: str) -> bool:
    m = guided.matcher(spec)
    for t in tok.encode(text, allowed_special=set()):
        if not m.allowed_mask()[t]:
            return False
        m.accept(t)
    return m.is_accepting()


def test_schema_details_are_enforced(bundled):
    _, tok, eos, guided = bundled
    spec = GuidedSpec.json_schema(SCHEMAS[0])
    assert _accepts(guided, spec, tok, '{"name": "Ann", "age": 7}')
    assert not _accepts(guided, spec, tok, '{"age": 7, "name": "Ann"}')  # properties in the schema's order
    assert not _accepts(guided, spec, tok, '{"name":"Ann","age":7}')  # json.dumps' separators, nothing else
    assert not _accepts(guided, spec, tok, '{"name": "Ann", "age": 700}')  # maximum 120
    assert not _accepts(guided, spec, tok, '{"name": "Ann", "age": 7, "x": 1}')  # no additional properties
    assert not _accepts(guided, spec, tok, '{"name": "Ann"}')  # age is required
    m = guided.matcher(GuidedSpec.json_schema(SCHEMAS[10]))  # an integer 0..1000 or a short string
    m.accept(tok.encode("5", allowed_special=set())[0])
    assert m.is_accepting() and not m.is_terminated()  # 5 is complete, but 50 would be too
    m = guided.matcher(GuidedSpec.json_schema(SCHEMAS[3]))
    for t in tok.encode('{"color": "red"}', allowed_special=set()):
        m.accept(t)
    assert m.is_terminated() and set(m.allowed_mask().nonzero().flatten().tolist()) == set(eos)


def _digit_ids(token_bytes) -> set[int]:
    return {i for i, b in token_bytes if b and len(b) <= 3 and all(48 <= c <= 57 for c in b)}


@pytest.fixture(scope="module")
def qwen_guided(qwen_vocab):
    tok = QwenTokenizer(qwen_vocab)
    return tok, GuidedDecoding(tok, 151936, tok.stop_token_ids)  # Qwen-7B's padded logits width


def test_qwen_tiktoken_masks_follow_the_bytes(qwen_guided):
    tok, guided = qwen_guided
    m = guided.matcher(GuidedSpec.regex("[0-9]{1,3}"))
    allowed = m.allowed_mask()
    assert allowed.shape == (151936,)
    want = _digit_ids((i, tok.id_to_token_bytes(i)) for i in range(151643))
    assert set(allowed.nonzero().flatten().tolist()) == want and len(want) >= 10
    for t in tok.encode("123", allowed_special=set()):
        m.accept(t)
    assert m.is_terminated()
    assert set(m.allowed_mask().nonzero().flatten().tolist()) == set(tok.stop_token_ids)
    start = guided.matcher(GuidedSpec.json_object()).allowed_mask()
    assert not start[151643:].any()  # specials (the end ids too: {} is not complete yet) and padding ids
    assert start[tok.token_to_id("{")]


def test_tokenizer_json_masks_with_vocab_padding(tmp_path):
    tok = HFTokenizer.from_folder(write_tiny_chatml_tokenizer(tmp_path))
    guided = GuidedDecoding(tok, 512, tok.stop_token_ids)  # logits wider than the 420-id vocabulary
    allowed = guided.matcher(GuidedSpec.regex("[0-9]{1,3}")).allowed_mask()
    assert allowed.shape == (512,) and not allowed[tok.vocab_size:].any()
    want = _digit_ids((i, tok.decode([i]).encode()) for i in range(tok.vocab_size) if i not in tok.special_ids)
    assert set(allowed.nonzero().flatten().tolist()) == want and len(want) >= 10
    m = guided.matcher(GuidedSpec.choice(["你好", "hello"]))
    for t in tok.encode("你好", allowed_special=set()):  # multi-byte characters span several byte-level tokens
        m.accept(t)
    assert m.is_terminated()


def test_apply_masks_touches_only_constrained_rows(qwen_guided):
    tok, guided = qwen_guided
    logits = torch.randn(4, 151936, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    matchers = [None, guided.matcher(GuidedSpec.regex("[0-9]+")), None, guided.matcher(GuidedSpec.choice(CHOICES))]
    apply_guided_masks(logits, matchers)
    for row in (0, 2):
        assert torch.equal(logits[row], before[row])
    for row in (1, 3):
        allowed = matchers[row].allowed_mask()
        assert torch.equal(logits[row][allowed], before[row][allowed])
        assert torch.isneginf(logits[row][~allowed]).all() and allowed.sum() >= 2
    guided.apply_masks(before, matchers)  # the parallel path writes the same masks
    assert torch.equal(before, logits)


def test_unpack_bitmask_by_hand():
    words = torch.tensor([[0b1011, -(2 ** 31)]], dtype=torch.int32)  # ids 0, 1, 3 and 63 (the sign bit)
    assert unpack_bitmask(words, 66).nonzero()[:, 1].tolist() == [0, 1, 3, 63]
    assert unpack_bitmask(words, 2).tolist() == [[True, True]]


@pytest.mark.parametrize("spec, message", [
    (lambda: GuidedSpec.json_schema({"type": "strin"}), "Invalid type: strin"),
    (lambda: GuidedSpec.json_schema({"type": "object", "properties": 5}), "properties must be an object"),
    (lambda: GuidedSpec.json_schema({"type": "integer", "minimum": "x"}), "minimum"),
    (lambda: GuidedSpec.json_schema({"not": {"type": "string"}}), "Unimplemented keys"),
    (lambda: GuidedSpec.json_schema('{"type": '), "not valid JSON"),
    (lambda: GuidedSpec.json_schema([1]), "must be an object or a boolean"),
    (lambda: GuidedSpec.regex("[0-9"), "unclosed character class"),
    (lambda: GuidedSpec.choice([]), "non-empty list"),
    (lambda: GuidedSpec("xml", "<a/>"), "unknown structured-output kind"),
])
def test_invalid_specs_raise_with_the_validators_message(qwen_guided, spec, message):
    _, guided = qwen_guided
    with pytest.raises(GrammarError, match=re.escape(message)):
        guided.compile(spec())


def test_compiled_once_per_spec_and_lru(qwen_vocab):
    tok = QwenTokenizer(qwen_vocab)
    guided = GuidedDecoding(tok, 151936, tok.stop_token_ids, cache_size=2)
    a, b, c = (GuidedSpec.regex(p) for p in ("a+", "b+", "c+"))
    first = guided.compile(a)
    assert guided.compile(GuidedSpec.regex("a+")) is first  # equal specs share one compiled grammar
    guided.compile(b)
    guided.compile(a)  # a is now the most recent
    guided.compile(c)  # evicts b
    assert guided.compile(a) is first and list(guided._compiled) == [c, a]
    m1, m2 = guided.matcher(a), guided.matcher(a)
    m1.accept(tok.token_to_id("a"))
    assert m2.allowed_mask()[tok.token_to_id("a")] and m1.is_accepting() and not m2.is_accepting()
