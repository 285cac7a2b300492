"""Tool calling on Qwen's ReAct template (spec qwen.md "Tool use"): OpenAI tools/functions and tool results
are folded into plain chat turns before encoding, and the reply is parsed back into tool calls.

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
# Generation pauses where the tool's result belongs; the caller runs the tool and sends it back.
STOP_WORDS = ("Observation:",)
TOOL_RESULT_ROLES = ("tool", "function")


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


def parse_reply(text: str) -> Reply:
    """A tool call (the last "Action:" / "Action Input:" pair) or the final answer, from the model's reply."""
    t = "\n" + text  # a reply that opens with "Action:" parses like one that opens with a thought
    action, action_input = t.rfind("\nAction:"), t.rfind("\nAction Input:")
    if 0 <= action < action_input:
        name = t[action + len("\nAction:"):action_input].strip()
        arguments = t[action_input + len("\nAction Input:"):]
        end = arguments.find("\nObservation:")
        arguments = (arguments[:end] if end >= 0 else arguments).strip()
        thought = t[:action].strip().removeprefix("Thought:").strip()
        if name:
            return Reply(thought or None, [ToolCall(name, arguments)])
    answer = t.rfind("\nFinal Answer:")
    if answer >= 0:
        return Reply(t[answer + len("\nFinal Answer:"):].strip(), [])
    return Reply(text, [])


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


def offered_tools(req: ChatRequest) -> tuple[list[Tool], bool]:
    """(tools to describe in the prompt, whether the request used the legacy `functions` API)."""
    if req.tools and req.functions:
        raise APIError(Kind.INVALID, "send either `tools` or the legacy `functions`, not both", param="tools")
    legacy = bool(req.functions)
    defs = req.functions or [t.function for t in req.tools or []]
    choice = req.function_call if legacy else req.tool_choice
    if choice == "none":
        return [], legacy
    if choice is not None and not isinstance(choice, str):  # one named tool: offer only that one
        name = choice.name if isinstance(choice, FunctionCall) else choice.function.name
        defs = [d for d in defs if d.name == name]
        if not defs:
            raise APIError(Kind.INVALID, f"tool_choice names {name!r}, which is not among the tools",
                           param="tool_choice")
    return [Tool(d.name, d.description, d.parameters or {}) for d in defs], legacy


def chat_prompt_ids(tokenizer, messages: list[ChatMessage], tools: list[Tool], window: int) -> list[int]:
    """The prompt for a chat request: the model's chat format, with the ReAct protocol when tools are on."""
    plain, continuation = fold(to_turns(messages), tools)
    ids = encode_messages(tokenizer, plain, window)
    # The reply continues an assistant turn after a tool result: plain text, never parsed as special tokens.
    return ids + tokenizer.encode(continuation, allowed_special=set()) if continuation else ids
