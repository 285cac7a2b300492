"""Chat: Qwen's `make_context`/`chat()` semantics (ChatML, piecewise injection-safe encoding, history window)
and, for folders whose tokenizer_config.json has a Jinja chat_template, that template; `ChatModel`, the decoder
with `generate`, `chat` and `chat_stream` as methods (what `qwen_awq.load` returns)."""
from __future__ import annotations

import re
import secrets
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from qwen_awq.engine.sampling_params import SamplingParams
from qwen_awq.errors import QwenAwqError, TokenizerError
from qwen_awq.generation import TextStream, generate, reply_params
from qwen_awq.models.decoder import Decoder
from qwen_awq.tokenizer import Tokenizer

DEFAULT_SYSTEM = "You are a helpful assistant."
DEFAULT_WINDOW = 6144  # Qwen-7B-Chat generation_config.json max_window_size
History = list[tuple[str, str]]


def _markers(tokenizer: Tokenizer) -> tuple[int, int]:
    if tokenizer.im_start_id is None or tokenizer.im_end_id is None:
        raise TokenizerError("this tokenizer has no <|im_start|>/<|im_end|> tokens, so it cannot use ChatML")
    return tokenizer.im_start_id, tokenizer.im_end_id


def _turn(tokenizer: Tokenizer, role: str, content: str) -> list[int]:
    """<|im_start|>{role}\\n{content}<|im_end|>, role and content encoded as plain text (no special parsing)."""
    start, end = _markers(tokenizer)
    newline = tokenizer.encode("\n", allowed_special=set())
    return [start, *tokenizer.encode(role, allowed_special=set()), *newline,
            *tokenizer.encode(content, allowed_special=set()), end]


def make_context(tokenizer: Tokenizer, query: str, history: History | None = None, system: str = DEFAULT_SYSTEM,
                 max_window_size: int = DEFAULT_WINDOW) -> tuple[str, list[int]]:
    """Qwen's prompt for `query` after `history`: (raw_text, token_ids), ending with the assistant's header.

    Past turns are kept newest first while system + kept turns + this turn < max_window_size; the first turn that
    does not fit drops it and everything older. The current query is always kept and not counted.
    """
    nl = tokenizer.encode("\n", allowed_special=set())
    system_ids = _turn(tokenizer, "system", system)
    kept: list[int] = []
    raw_turns = ""
    for past_query, past_response in reversed(history or []):
        turn = nl + _turn(tokenizer, "user", past_query) + nl + _turn(tokenizer, "assistant", past_response)
        if len(system_ids) + len(kept) + len(turn) >= max_window_size:
            break
        kept = turn + kept
        raw_turns = (f"\n<|im_start|>user\n{past_query}<|im_end|>"
                     f"\n<|im_start|>assistant\n{past_response}<|im_end|>") + raw_turns
    start, _ = _markers(tokenizer)
    header = [start, *tokenizer.encode("assistant", allowed_special=set()), *nl]
    ids = system_ids + kept + nl + _turn(tokenizer, "user", query) + nl + header
    raw = (f"<|im_start|>system\n{system}<|im_end|>{raw_turns}"
           f"\n<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n")
    return raw, ids


def messages_to_history(messages: Sequence[dict[str, Any]]) -> tuple[str, History, str]:
    """OpenAI-style messages -> (system, [(user, assistant), ...], final user query) for Qwen's layout."""
    system, history, pending = DEFAULT_SYSTEM, [], None
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content") or ""
        if role == "system" and i == 0:
            system = content
        elif role == "user" and pending is None:
            pending = content
        elif role == "assistant" and pending is not None:
            history.append((pending, content))
            pending = None
        else:
            raise QwenAwqError(f"messages[{i}] has role {role!r} where a "
                               f"{'user' if pending is None else 'assistant'} message was expected")
    if pending is None:
        raise QwenAwqError("the last message must come from the user")
    return system, history, pending


def render_template(tokenizer: Tokenizer, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True
                    ) -> str:
    """Render the folder's Jinja chat_template in a sandbox (templates are data, never code we execute)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str) -> None:
        raise TokenizerError(f"chat template: {message}")

    env.globals["raise_exception"] = raise_exception
    try:
        template = env.from_string(tokenizer.chat_template or "")
        return template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                               bos_token=_token_text(tokenizer, tokenizer.bos_token_id),
                               eos_token=_token_text(tokenizer, tokenizer.eos_token_id))
    except TemplateError as e:
        raise TokenizerError(f"the model's chat_template failed: {e}") from None


def _token_text(tokenizer: Tokenizer, token_id: int | None) -> str:
    return "" if token_id is None else tokenizer.decode([token_id])


def _hide_specials(value: Any, pattern: re.Pattern[str], hidden: list[str], nonce: str) -> Any:
    """A message's content (text, or a list of {"text": ...} parts) with special-token text swapped for
    sentinels that no template filter changes (private-use marks around digits)."""
    def hide(match: re.Match[str]) -> str:
        hidden.append(match.group())
        return f"\ue000{nonce}.{len(hidden) - 1}\ue001"

    if isinstance(value, str):
        return pattern.sub(hide, value)
    if isinstance(value, list):
        return [part | {"text": pattern.sub(hide, part["text"])}
                if isinstance(part, dict) and isinstance(part.get("text"), str) else part for part in value]
    return value


def encode_template(tokenizer: Tokenizer, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True
                    ) -> list[int]:
    """The folder's chat template as ids in which only the template's own markup makes special tokens.

    Special-token text inside message contents is hidden behind sentinels (with a random nonce, so a message
    cannot forge one) before rendering, so every special token left in the rendering is markup. The rendering
    is split at those; the text between is encoded as plain text with the sentinels put back. Encoding splits
    at special tokens anyway, so a conversation whose contents hold no special text gets exactly the ids of
    encoding the whole rendering (transformers' apply_chat_template).
    """
    by_text = {tokenizer.decode([i]): i for i in tokenizer.special_ids}
    pattern = re.compile("|".join(re.escape(t) for t in sorted(by_text, key=len, reverse=True)) or "(?!)")
    nonce, hidden = str(secrets.randbelow(10**12)), []
    safe = [m | {"content": _hide_specials(m.get("content"), pattern, hidden, nonce)} for m in messages]
    text = render_template(tokenizer, safe, add_generation_prompt)
    sentinel = re.compile(f"\ue000{nonce}\\.(\\d+)\ue001")
    auto = tokenizer.encode("", allowed_special=set())  # the BOS the tokenizer prepends to every encode, if any

    def plain(piece: str) -> list[int]:
        ids = tokenizer.encode(sentinel.sub(lambda m: hidden[int(m.group(1))], piece), allowed_special=set())
        return ids[len(auto):]

    ids: list[int] = []
    start = 0
    for match in pattern.finditer(text):
        ids += plain(text[start:match.start()]) if match.start() > start else []
        ids.append(by_text[match.group()])
        start = match.end()
    ids += plain(text[start:]) if start < len(text) else []
    return ids if ids[:len(auto)] == auto else auto + ids  # as encode: one BOS, the template's or the tokenizer's


def encode_messages(tokenizer: Tokenizer, messages: Sequence[dict[str, Any]],
                    max_window_size: int = DEFAULT_WINDOW) -> list[int]:
    """Prompt ids for a conversation: the folder's chat_template if it has one, else Qwen's ChatML layout.
    Either way message contents are plain text: special-token text in them never becomes a control token."""
    if tokenizer.chat_template:
        return encode_template(tokenizer, messages)
    system, history, query = messages_to_history(messages)
    return make_context(tokenizer, query, history, system, max_window_size)[1]


def window_size(model: Decoder) -> int:
    """The model's chat-history window in tokens (generation_config's max_window_size, else Qwen's default)."""
    return model.generation_config.max_window_size or DEFAULT_WINDOW


def chat_stream(model: Decoder, tokenizer: Tokenizer, query: str, history: History | None = None,
                system: str = DEFAULT_SYSTEM, **sampling: Any) -> Iterator[str]:
    """Yield the reply's text as it is generated; the turn ends at <|im_end|>/<|im_start|>/<|endoftext|>.

    Sampling settings default to the model's (see `reply_params`); keywords override them.
    """
    _, ids = make_context(tokenizer, query, history, system, window_size(model))
    yield from TextStream(model, tokenizer, ids, reply_params(model, tokenizer, len(ids), **sampling))


def chat(model: Decoder, tokenizer: Tokenizer, query: str, history: History | None = None,
         system: str = DEFAULT_SYSTEM, **sampling: Any) -> tuple[str, History]:
    """Qwen's `model.chat`: (stripped response, history + [(query, response)])."""
    response = "".join(chat_stream(model, tokenizer, query, history, system, **sampling)).strip()
    return response, [*(history or []), (query, response)]


class ChatModel(Decoder):
    """The decoder with HF's `generate` and Qwen's `chat` / `chat_stream` as methods."""

    def generate(self, input_ids: torch.Tensor | list[int], params: SamplingParams | None = None,
                 **kwargs: Any) -> torch.Tensor:
        return generate(self, input_ids, params, **kwargs)

    def chat(self, tokenizer: Tokenizer, query: str, history: History | None = None, system: str = DEFAULT_SYSTEM,
             **sampling: Any) -> tuple[str, History]:
        return chat(self, tokenizer, query, history, system, **sampling)

    def chat_stream(self, tokenizer: Tokenizer, query: str, history: History | None = None,
                    system: str = DEFAULT_SYSTEM, **sampling: Any) -> Iterator[str]:
        return chat_stream(self, tokenizer, query, history, system, **sampling)
