"""Tool calling on Qwen's ReAct template (spec qwen.md "Tool use"): OpenAI tools/functions and tool results
are folded into plain chat turns before encoding; the reply is held to the template by a grammar (a thought, then
a call whose arguments follow the tool's JSON schema, or unless a call is required a final answer) and parsed back
into tool calls or the answer, whole or as it streams, with no ReAct scaffolding left in the content.

Any chat model gets the same text protocol; Qwen-7B-Chat was trained on it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from qwen_awq.chat import encode_messages
from qwen_awq.errors import QwenAwqError
from qwen_awq.server.errors import APIError, Kind
from qwen_awq.server.protocol import ChatMessage, ChatRequest, FunctionCall
from qwen_awq.server.runner import json_rule

# The tool line and instruction of Qwen's published ReAct prompt (spec qwen.md "Tool use").
TOOL_LINE = ("{name}: Call this tool to interact with the {name} API. What is the {name} API useful for? "
             "{description} Parameters: {parameters}")
REACT_INSTRUCTION = """Answer the following questions as best you can. You have access to the following APIs:

{tools}

Use the following format:

Question: the input question you must answer
Thought: you should always think about what to do
Action: the action to take, should be one of [{names}]
Action Input: the input to the action
Observation: the result of the action
... (this Thought/Action/Action Input/Observation can be repeated zero or more times)
Thought: I now know the final answer
Final Answer: the final answer to the original input question

Begin!"""
# Generation pauses where the tool's result belongs; the caller runs the tool and sends it back. (Only needed
# without the reply grammar, which ends the reply after the call's arguments.)
STOP_WORDS = ("Observation:",)
TOOL_RESULT_ROLES = ("tool", "function")
# Template lines that never belong in content (dropped whole), and labels whose text may (the label dropped).
CALL_LINES = ("Action:", "Actions:", "Action Input:", "Observation:")
LABELS = ("Question:", "Thought:", "Final Answer:")
# A thought is one line; the cap keeps a model from spending its whole budget before the call it must make.
MAX_THOUGHT_CHARS = 256


@dataclass(frozen=True)
class Tool:
    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # the JSON text the model wrote (OpenAI passes arguments as a string)


@dataclass
class Turn:
    """A chat message reduced to what the prompt needs."""

    role: str  # system | user | assistant | tool | function
    content: str
    calls: list[ToolCall] = field(default_factory=list)


@dataclass(frozen=True)
class Reply:
    content: str | None
    calls: list[ToolCall]


@dataclass(frozen=True)
class Offer:
    """The tools of a chat request as the prompt and the grammar see them."""

    tools: list[Tool]
    legacy: bool  # the request used the legacy `functions` API
    forced: bool  # tool_choice "required" or a named function: the reply must be a call


def react_instruction(tools: list[Tool]) -> str:
    lines = [TOOL_LINE.format(name=t.name, description=t.description,
                              parameters=json.dumps(t.parameters, ensure_ascii=False)) for t in tools]
    return REACT_INSTRUCTION.format(tools="\n\n".join(lines), names=",".join(t.name for t in tools))


def _action(thought: str, call: ToolCall) -> str:
    return f"Thought: {thought}\nAction: {call.name}\nAction Input: {call.arguments}"


def _assistant_text(turn: Turn, react: bool) -> str:
    if turn.calls:
        thought = turn.content.strip().removeprefix("Thought:").strip()
        return _action(thought or f"I should use the {turn.calls[0].name} API.", turn.calls[0])
    if react:  # the format the model learned for an answer given while tools are on offer
        return f"Thought: I now know the final answer.\nFinal Answer: {turn.content}"
    return turn.content


def fold(turns: list[Turn], tools: list[Tool]) -> tuple[list[dict[str, str]], str]:
    """(plain system/user/assistant messages, assistant text the model should continue, or "").

    Tool calls become Thought/Action/Action Input lines and each result an "Observation:" line of the same
    assistant turn; a conversation that ends with a tool result is continued inside that turn.
    """
    out: list[dict[str, str]] = []
    pending: list[ToolCall] = []  # later calls of an assistant message, rendered after each result
    for i, turn in enumerate(turns):
        if turn.role in TOOL_RESULT_ROLES:
            if not out or out[-1]["role"] != "assistant":
                raise QwenAwqError(f"messages[{i}] is a {turn.role} result but does not follow an assistant "
                                   "message that called a tool")
            out[-1]["content"] += f"\nObservation: {turn.content}"
            if pending:
                call = pending.pop(0)
                out[-1]["content"] += "\n" + _action(f"I should use the {call.name} API.", call)
        elif turn.role == "assistant":
            text, pending = _assistant_text(turn, bool(tools)), turn.calls[1:]
            if out and out[-1]["role"] == "assistant":
                out[-1]["content"] += "\n" + text
            else:
                out.append({"role": "assistant", "content": text})
        else:
            out.append({"role": turn.role, "content": turn.content})
    continuation = ""
    if turns and turns[-1].role in TOOL_RESULT_ROLES:
        continuation = out.pop()["content"] + "\nThought:"
    if tools:
        _prefix_last_user(out, react_instruction(tools))
    return out, continuation


def _prefix_last_user(messages: list[dict[str, str]], instruction: str) -> None:
    """The instruction goes with the question being worked on: the latest user message."""
    for m in reversed(messages):
        if m["role"] == "user":
            m["content"] = f"{instruction}\n\nQuestion: {m['content']}"
            return


def _lark_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string literal is a Lark string literal


def reply_grammar(tools: list[Tool], forced: bool, continued: bool) -> str:
    """Lark grammar of a ReAct reply: a thought line (optional on a fresh turn; a continued turn's prompt already
    ends in "Thought:"), then "Action: {name}\nAction Input: {arguments}" for one of `tools`, the arguments following
    that tool's JSON schema, or, unless `forced`, "Final Answer: " and free text."""
    head = 'THOUGHT "\\n"' if continued else '("Thought: " THOUGHT "\\n")?'
    body = "call" if forced else 'call | "Final Answer: " /(?s:.*)/'
    names = " | ".join(f"{_lark_string(t.name + chr(10) + 'Action Input: ')} args{i}" for i, t in enumerate(tools))
    rules = [f"start: {head} ({body})", f'call: "Action: " ({names})', f"THOUGHT: /[^\\n]{{0,{MAX_THOUGHT_CHARS}}}/"]
    rules += [f"args{i}: {json_rule(t.parameters or {'type': 'object'})}" for i, t in enumerate(tools)]
    return "\n".join(rules)


@dataclass(frozen=True)
class Parts:
    """What a (possibly unfinished) reply says so far: content, and a call's name and arguments once begun."""

    content: str = ""
    name: str | None = None
    arguments: str = ""


def _thought(text: str) -> str:
    return text.strip().removeprefix("Thought:").strip()


def strip_scaffolding(text: str) -> str:
    """A reply that follows no part of the template well enough to parse, without the template's lines."""
    kept = "\n".join(line for line in text.split("\n") if not line.strip().startswith(CALL_LINES))
    for label in LABELS:
        kept = kept.replace(label, "")
    return kept.strip()


def split_reply(text: str, final: bool) -> Parts:
    """The reply's parts by the first marker: "Final Answer:" (content is the answer) or "Action:" with "Action
    Input:" (content is the thought). Unfinished (not `final`), text that is neither yet says nothing; finished, it
    is content without scaffolding. Content and arguments are stripped, so they only grow as the text does."""
    t = "\n" + text  # a reply that opens with "Action:" parses like one that opens with a thought
    answer, action = t.find("\nFinal Answer:"), t.find("\nAction:")
    if answer >= 0 and not 0 <= action < answer:
        return Parts(t[answer + len("\nFinal Answer:"):].strip())
    action_input = t.find("\nAction Input:", action) if action >= 0 else -1
    if action_input >= 0:
        arguments = t[action_input + len("\nAction Input:"):]
        end = arguments.find("\nObservation:")
        name = t[action + len("\nAction:"):action_input].strip()
        return Parts(_thought(t[:action]), name, (arguments[:end] if end >= 0 else arguments).strip())
    return Parts(strip_scaffolding(text)) if final else Parts()


def parse_reply(text: str) -> Reply:
    """A finished reply as a tool call (with its thought as content) or as the answer."""
    parts = split_reply(text, final=True)
    if parts.name:
        return Reply(parts.content or None, [ToolCall(parts.name, parts.arguments)])
    return Reply(parts.content, [])


class ReplyStream:
    """A growing reply as OpenAI stream pieces: ("content", text), ("call", name) once, then ("arguments", text)
    pieces; joined, they are what `parse_reply` gives for the finished text."""

    def __init__(self) -> None:
        self.sent = Parts()

    def feed(self, text: str, final: bool) -> list[tuple[str, str]]:
        parts, sent = split_reply(text, final), self.sent
        content = _growth(sent.content, parts.content)
        call = parts.name if parts.name and sent.name is None else ""
        arguments = _growth(sent.arguments, parts.arguments) if parts.name else ""
        self.sent = Parts(sent.content + content, sent.name or parts.name or None, sent.arguments + arguments)
        return [(kind, piece) for kind, piece in (("content", content), ("call", call), ("arguments", arguments))
                if piece]


def _growth(sent: str, now: str) -> str:
    """What `now` adds to the text already sent (nothing when it no longer extends it)."""
    return now[len(sent):] if now.startswith(sent) else ""


# --- from the OpenAI request ------------------------------------------------------------------------------
def _arguments(call: FunctionCall) -> str:
    args = call.arguments
    return args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


def _content(message: ChatMessage, i: int) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    parts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise APIError(Kind.INVALID, f"messages[{i}].content: only text parts are supported, got a "
                           f"{part.type!r} part", param="messages")
        parts.append(part.text)
    return "\n".join(parts)


def to_turns(messages: list[ChatMessage]) -> list[Turn]:
    turns = []
    for i, m in enumerate(messages):
        calls = [ToolCall(c.function.name, _arguments(c.function)) for c in m.tool_calls or []]
        if m.function_call is not None:
            calls.append(ToolCall(m.function_call.name, _arguments(m.function_call)))
        role = "system" if m.role == "developer" else m.role  # OpenAI's newer name for the system role
        turns.append(Turn(role, _content(m, i), calls))
    return turns


def offered_tools(req: ChatRequest) -> Offer:
    """The tools to describe in the prompt, whether the legacy `functions` API was used, and whether a call is
    required ("required", or one named tool: then only that one is offered)."""
    if req.tools and req.functions:
        raise APIError(Kind.INVALID, "send either `tools` or the legacy `functions`, not both", param="tools")
    legacy = bool(req.functions)
    defs = req.functions or [t.function for t in req.tools or []]
    choice = req.function_call if legacy else req.tool_choice
    if choice == "none":
        return Offer([], legacy, False)
    if choice == "required" and not defs:
        raise APIError(Kind.INVALID, 'tool_choice "required" needs `tools`', param="tool_choice")
    if choice is not None and not isinstance(choice, str):  # one named tool: offer only that one
        name = choice.name if isinstance(choice, FunctionCall) else choice.function.name
        defs = [d for d in defs if d.name == name]
        if not defs:
            raise APIError(Kind.INVALID, f"tool_choice names {name!r}, which is not among the tools",
                           param="tool_choice")
    tools = [Tool(d.name, d.description, d.parameters or {}) for d in defs]
    return Offer(tools, legacy, bool(tools) and choice is not None and choice != "auto")


def chat_prompt_ids(tokenizer, messages: list[ChatMessage], tools: list[Tool], window: int) -> tuple[list[int], bool]:
    """The prompt for a chat request: the model's chat format, with the ReAct protocol when tools are on; and
    whether it continues an assistant turn after a tool result (the reply then starts inside a thought)."""
    plain, continuation = fold(to_turns(messages), tools)
    ids = encode_messages(tokenizer, plain, window)
    # The reply continues an assistant turn after a tool result: plain text, never parsed as special tokens.
    return (ids + tokenizer.encode(continuation, allowed_special=set()), True) if continuation else (ids, False)
