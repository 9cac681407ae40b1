"""Tool calling for chat templates that ignore tools: the prompt format and the output parser.

Many small chat models (SmolLM2 among them) have a chat template that drops the
``tools`` argument. For those, the adapters render the tools into the system
prompt and parse the model's reply themselves, in this format:

The system prompt gets, after its own text::

    You can call the tools listed below. Each line between <tools> and </tools> is the
    JSON schema of one tool, in the OpenAI function format.
    <tools>
    {"type": "function", "function": {"name": "get_weather", ...}}
    </tools>
    To call a tool, reply with a <tool_call> block that contains a JSON object with the
    tool's "name" and its "arguments", one block per call:
    <tool_call>
    {"name": "get_weather", "arguments": {"location": "Paris"}}
    </tool_call>
    Tool results come back in <tool_response> blocks. Reply in plain text when no tool
    is needed.

An assistant turn that called tools is rendered as its text followed by one
``<tool_call>`` block per call. Tool results are rendered as a user turn of
``<tool_response>`` blocks, each a JSON object with "name", "tool_call_id" and
"content". Qwen2.5's own chat template lists tools and asks for calls with the same
``<tools>`` and ``<tool_call>`` tags, so the same parser also reads the calls of
models whose template renders tools that way.

A required tool call (``tool_choice`` "required" or a tool name) is enforced by
ending the prompt with the opening of the block, so the model only writes the rest.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOL_RESPONSE_OPEN = "<tool_response>"
TOOL_RESPONSE_CLOSE = "</tool_response>"

# tool_choice values after normalization: "auto", "none", "required" or a tool name.
AUTO, NONE, REQUIRED = "auto", "none", "required"


@dataclass
class ToolCall:
    """One tool call of an assistant turn, parsed or to be rendered.

    Attributes:
        name: Tool name; empty when the block had none.
        arguments: Parsed arguments, None when they could not be parsed.
        id: Call id, generated when the model gives none.
        raw: The JSON text between the tags, as the model wrote it.
        error: Why the block is invalid, None for a valid call.
    """

    name: str
    arguments: dict | None
    id: str = field(default_factory=lambda: new_call_id())
    raw: str = ""
    error: str | None = None


@dataclass
class Message:
    """A chat message in the adapters' common form, before templating.

    Attributes:
        role: "system", "user", "assistant" or "tool".
        content: Text content.
        tool_calls: Calls made by an assistant message.
        tool_call_id: Id of the call that a tool message responds to.
        name: Tool name of a tool message.
    """

    role: str
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_id: str | None = None
    name: str | None = None


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# ----------------------------------------------------------------- tool choice


def tool_names(tools: Iterable[dict]) -> list[str]:
    return [tool["function"]["name"] for tool in tools]


def normalize_tool_choice(tool_choice: object, tools: list[dict]) -> str:
    """Map LangChain, LlamaIndex and OpenAI spellings of ``tool_choice`` to one value.

    Returns:
        "auto", "none", "required" or the name of the tool to call.

    Raises:
        ValueError: The value is not a known choice or names a tool that is not bound.
    """
    names = tool_names(tools)
    if tool_choice is None or tool_choice == "auto":
        return AUTO
    if tool_choice == "none" or tool_choice is False:
        return NONE
    if tool_choice in ("any", "required") or tool_choice is True:
        return REQUIRED
    name = tool_choice
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
    if isinstance(name, str) and name in names:
        return name
    raise ValueError(
        f"tool_choice={tool_choice!r} is not valid; use 'auto', 'none', 'any', 'required' "
        f"or the name of a bound tool: {names}"
    )


def forced_reply_prefix(tool_choice: str, tools: list[dict]) -> str:
    """Return the text that the reply must start with to honour ``tool_choice``.

    A required call opens the block and the name key. A named tool (or the only
    bound tool) also gets its name and the arguments key, so the model writes only
    the arguments.
    """
    if not tools or tool_choice in (AUTO, NONE):
        return ""
    if tool_choice == REQUIRED:
        if len(tools) == 1:
            return _named_call_prefix(tool_names(tools)[0])
        return TOOL_CALL_OPEN + '\n{"name": "'
    return _named_call_prefix(tool_choice)


def _named_call_prefix(name: str) -> str:
    return TOOL_CALL_OPEN + "\n" + json.dumps({"name": name})[:-1] + ', "arguments": '


# ----------------------------------------------------------------- rendering


def tools_system_text(tools: list[dict], tool_choice: str) -> str:
    """Render ``tools`` (OpenAI function format) as the system prompt's tool section."""
    lines = [
        "You can call the tools listed below. Each line between <tools> and </tools> is the",
        "JSON schema of one tool, in the OpenAI function format.",
        "<tools>",
        *(json.dumps(tool, ensure_ascii=False) for tool in tools),
        "</tools>",
        "To call a tool, reply with a <tool_call> block that contains a JSON object with the",
        'tool\'s "name" and its "arguments", one block per call:',
        TOOL_CALL_OPEN,
        json.dumps({"name": tool_names(tools)[0], "arguments": _example_arguments(tools[0])}, ensure_ascii=False),
        TOOL_CALL_CLOSE,
        "Tool results come back in <tool_response> blocks. Reply in plain text when no tool",
        "is needed.",
    ]
    if tool_choice == REQUIRED:
        lines.append("You must call one of the tools now.")
    elif tool_choice not in (AUTO, NONE):
        lines.append(f"You must call the tool {tool_choice} now.")
    return "\n".join(lines)


def _example_arguments(tool: dict) -> dict:
    properties = (tool["function"].get("parameters") or {}).get("properties") or {}
    return {name: f"<{name}>" for name in properties}


def render_tool_call(call: ToolCall) -> str:
    body = json.dumps({"name": call.name, "arguments": call.arguments or {}}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def render_tool_response(message: Message) -> str:
    body = json.dumps(
        {"name": message.name, "tool_call_id": message.tool_call_id, "content": message.content},
        ensure_ascii=False,
    )
    return f"{TOOL_RESPONSE_OPEN}\n{body}\n{TOOL_RESPONSE_CLOSE}"


def to_prompt_format(messages: list[Message], tools: list[dict], tool_choice: str) -> list[dict]:
    """Convert ``messages`` to template dicts with tools and tool turns written as text.

    The tool section goes after the text of the first system message, or into a new
    system message at the start. Consecutive tool results merge into one user turn.
    """
    chat: list[dict] = []
    for message in messages:
        if message.role == "tool":
            block = render_tool_response(message)
            if chat and chat[-1].get("_tool_results"):
                chat[-1]["content"] += "\n" + block
            else:
                chat.append({"role": "user", "content": block, "_tool_results": True})
        elif message.role == "assistant" and message.tool_calls:
            parts = [message.content] if message.content else []
            parts.extend(render_tool_call(call) for call in message.tool_calls)
            chat.append({"role": "assistant", "content": "\n".join(parts)})
        else:
            chat.append({"role": message.role, "content": message.content})
    for entry in chat:
        entry.pop("_tool_results", None)

    if tools and tool_choice != NONE:
        section = tools_system_text(tools, tool_choice)
        if chat and chat[0]["role"] == "system":
            chat[0]["content"] = f"{chat[0]['content']}\n\n{section}" if chat[0]["content"] else section
        else:
            chat.insert(0, {"role": "system", "content": section})
    return chat


def to_native_format(messages: list[Message]) -> list[dict]:
    """Convert ``messages`` to the OpenAI-style dicts that tool-aware templates read."""
    chat = []
    for message in messages:
        entry: dict = {"role": message.role, "content": message.content}
        if message.tool_calls:
            entry["tool_calls"] = [
                {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments or {}}}
                for call in message.tool_calls
            ]
        if message.role == "tool":
            entry["tool_call_id"] = message.tool_call_id
            if message.name:
                entry["name"] = message.name
        chat.append(entry)
    return chat


# ----------------------------------------------------------------- parsing


@dataclass
class ReplyPart:
    """A piece of a parsed reply: text, or one complete tool call."""

    text: str = ""
    tool_call: ToolCall | None = None


class ToolCallParser:
    """Split a streamed reply into text and ``<tool_call>`` blocks.

    Text is released as soon as it cannot be the start of a block. Whitespace-only
    text is held back and dropped when it only separates tool calls, so a reply
    made of calls has empty content.
    """

    def __init__(self) -> None:
        self._buffer = ""
        self._in_call = False
        self._pending_space = ""
        self._after_call = False
        self._calls = 0

    def feed(self, piece: str) -> Iterator[ReplyPart]:
        """Consume ``piece`` and yield the parts it completes."""
        self._buffer += piece
        while self._buffer:
            if self._in_call:
                end = self._buffer.find(TOOL_CALL_CLOSE)
                if end < 0:
                    return
                call_text = self._buffer[:end]
                self._buffer = self._buffer[end + len(TOOL_CALL_CLOSE) :]
                self._in_call = False
                yield ReplyPart(tool_call=self._finish_call(call_text, closed=True))
                continue
            start = self._buffer.find(TOOL_CALL_OPEN)
            if start >= 0:
                yield from self._text(self._buffer[:start], before_call=True)
                self._buffer = self._buffer[start + len(TOOL_CALL_OPEN) :]
                self._in_call = True
                continue
            keep = _partial_tag_length(self._buffer, TOOL_CALL_OPEN)
            yield from self._text(self._buffer[: len(self._buffer) - keep])
            self._buffer = self._buffer[len(self._buffer) - keep :]
            return

    def finish(self) -> Iterator[ReplyPart]:
        """Yield what is left at the end of the reply, such as an unterminated block."""
        if self._in_call:
            self._in_call = False
            call_text, self._buffer = self._buffer, ""
            yield ReplyPart(tool_call=self._finish_call(call_text, closed=False))
            return
        text, self._buffer = self._buffer, ""
        yield from self._text(text)
        if self._pending_space and not self._calls:
            yield ReplyPart(text=self._pending_space)
        self._pending_space = ""

    def _text(self, text: str, before_call: bool = False) -> Iterator[ReplyPart]:
        combined = self._pending_space + text
        if before_call:
            combined = combined.rstrip()
        elif not combined.strip():
            self._pending_space = combined
            return
        self._pending_space = ""
        if self._after_call:
            combined = combined.lstrip()
        if combined:
            self._after_call = False
            yield ReplyPart(text=combined)

    def _finish_call(self, text: str, closed: bool) -> ToolCall:
        self._calls += 1
        self._after_call = True
        return parse_tool_call(text, closed)


def _partial_tag_length(text: str, tag: str) -> int:
    """Return the length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:length]):
            return length
    return 0


def parse_tool_call(text: str, closed: bool = True) -> ToolCall:
    """Parse the JSON inside one ``<tool_call>`` block.

    An unterminated block (the reply ended before ``</tool_call>``, for example at a
    stop string) is accepted when it holds one complete JSON object.
    """
    raw = text.strip()
    try:
        payload, end = json.JSONDecoder().raw_decode(raw)
    except json.JSONDecodeError as e:
        reason = "the reply ended inside the block" if not closed else f"invalid JSON: {e}"
        return ToolCall(name=_guess_name(raw), arguments=None, raw=raw, error=f"tool call not parsed: {reason}")
    if raw[end:].strip():
        return ToolCall(
            name=_guess_name(raw), arguments=None, raw=raw,
            error=f"tool call not parsed: text after the JSON object: {raw[end:].strip()[:40]!r}",
        )
    if not isinstance(payload, dict) or not isinstance(payload.get("name"), str) or not payload["name"]:
        return ToolCall(name="", arguments=None, raw=raw, error='tool call not parsed: no "name" string in the JSON object')
    arguments = payload.get("arguments", payload.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            return ToolCall(name=payload["name"], arguments=None, raw=raw, error=f"tool call arguments are not JSON: {e}")
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return ToolCall(
            name=payload["name"], arguments=None, raw=raw,
            error=f"tool call arguments must be a JSON object, got {type(arguments).__name__}",
        )
    call_id = payload.get("id") if isinstance(payload.get("id"), str) and payload.get("id") else new_call_id()
    return ToolCall(name=payload["name"], arguments=arguments, id=call_id, raw=raw)


def _guess_name(raw: str) -> str:
    marker = '"name"'
    start = raw.find(marker)
    if start < 0:
        return ""
    rest = raw[start + len(marker) :].lstrip(" :")
    if not rest.startswith('"'):
        return ""
    end = rest.find('"', 1)
    return rest[1:end] if end > 0 else ""


def parse_reply(text: str) -> tuple[str, list[ToolCall]]:
    """Split a complete reply into its text and its tool calls (valid or not)."""
    parser = ToolCallParser()
    parts = [*parser.feed(text), *parser.finish()]
    content = "".join(part.text for part in parts)
    calls = [part.tool_call for part in parts if part.tool_call is not None]
    return content, calls
