"""A test double of the engine whose replies come from a script instead of the model.

Small default models rarely follow the tool-call format, so tests of tool calling
and structured output cannot rely on them. ``ScriptedEngine`` runs the real
tokenizer and chat template and streams a scripted reply token by token through
the same decoding (stop strings, ``max_tokens``), so the adapters' parsing, streaming
and metadata paths run exactly as with the model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence

from semshare_core.config import GenerationConfig, ReuseConfig
from semshare_core.decoding import TextAssembler
from semshare_core.engine import GenerationResult, GenerationStream, SemShareEngine
from semshare_core.model import LoadedModel

SCRIPTED_FALLBACK_REASON = "scripted reply: the model did not run"


class ScriptedEngine(SemShareEngine):
    """Engine whose ``stream`` and ``generate`` return ``respond(prompt_text)``.

    Args:
        loaded: The model whose tokenizer and chat template are used; its weights
            are shared, not copied, and never run.
        respond: Maps the decoded prompt (chat template included) to the reply. A
            prompt that ends with a forced reply prefix gets the rest of the reply.

    Attributes:
        prompts: Every decoded prompt, in call order.
    """

    def __init__(self, loaded: LoadedModel, respond: Callable[[str], str]):
        super().__init__(loaded, self_check=False)
        self.respond = respond
        self.prompts: list[str] = []

    def stream(
        self,
        prompt: str | Sequence[int],
        generation: GenerationConfig | None = None,
        namespace: str = "default",
        reuse: ReuseConfig | None = None,
        store: bool = True,
    ) -> GenerationStream:
        """Return the scripted reply as a stream of text pieces, one per token.

        Nothing is stored and no cache is borrowed: the result's ``fallback_reason``
        states that the reply was scripted.
        """
        generation = generation or GenerationConfig()
        if not isinstance(namespace, str) or not namespace:
            raise ValueError(f"namespace must be a non-empty string, got {namespace!r}")
        ids = self.encode(prompt)
        text = self.tokenizer.decode(ids)
        self.prompts.append(text)
        reply_ids = self.tokenizer.encode(self.respond(text), add_special_tokens=False)

        def pieces() -> Iterator[str]:
            assembler = TextAssembler(self.tokenizer, generation.stop)
            generated: list[int] = []
            finish_reason = "stop"
            for token in reply_ids:
                if len(generated) == generation.max_new_tokens:
                    finish_reason = "length"
                    break
                generated.append(token)
                piece = assembler.add(token)
                if piece:
                    yield piece
                if assembler.stopped:
                    break
            tail = assembler.finish()
            if tail:
                yield tail
            stream.result = GenerationResult(
                text=assembler.text,
                prompt_tokens=len(ids),
                completion_tokens=len(generated),
                finish_reason=finish_reason,
                reused_tokens=0,
                prefix_tokens=0,
                recomputed_share=1.0,
                similarity=None,
                reference_id=None,
                ttft_s=0.0,
                fallback_reason=SCRIPTED_FALLBACK_REASON,
                token_ids=generated,
            )

        stream = GenerationStream(pieces())
        return stream


def scripted_tool_responder(prompt: str) -> str:
    """Reply like an instruction-following model that uses the prompt-format tools.

    Reads a ChatML prompt (the format of SmolLM2's and Qwen's templates) built by the
    adapters. With tools in the system prompt, it calls the tool named in the last
    user message (or the first tool). It takes the arguments from that message:
    integers from its first number, strings from its first quoted text (or the
    whole message). A forced reply prefix is continued, a JSON reply (prefix "{")
    gets the schema's properties or the quoted keys of the message, a tool result
    is acknowledged, and anything else gets a fixed greeting.
    """
    head, _, tail = prompt.rpartition("<|im_start|>assistant\n")
    users = re.findall(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", head, re.S)
    last_user = users[-1] if users else ""
    tools = _tools_in_prompt(head)

    if tail == "{":
        return json.dumps(_json_reply(head, last_user), ensure_ascii=False)[1:]
    if last_user.startswith("<tool_response>") and not tail:
        return "The tool returned " + last_user.split("\n")[1][:200]
    if not tools:
        return "Hello! This reply is scripted."

    tool = _chosen_tool(tools, last_user, tail)
    arguments = json.dumps(_arguments(tool, last_user), ensure_ascii=False)
    call = json.dumps({"name": tool["function"]["name"], "arguments": {}}, ensure_ascii=False)
    call = call[: -len("{}}")] + arguments + "}"
    block = "<tool_call>\n" + call + "\n</tool_call>"
    if tail and not block.startswith(tail):
        raise ValueError(f"the forced reply prefix {tail!r} does not start the scripted call {block!r}")
    return block[len(tail) :]


def _tools_in_prompt(text: str) -> list[dict]:
    section = re.search(r"<tools>\n(.*?)\n</tools>", text, re.S)
    if section is None:
        return []
    return [json.loads(line) for line in section.group(1).splitlines()]


def _chosen_tool(tools: list[dict], user_text: str, tail: str) -> dict:
    named = re.search(r'"name": "([^"]+)"', tail)
    for tool in tools:
        if named and tool["function"]["name"] == named.group(1):
            return tool
    for tool in tools:
        if tool["function"]["name"] in user_text:
            return tool
    return tools[0]


def _arguments(tool: dict, user_text: str) -> dict:
    properties = (tool["function"].get("parameters") or {}).get("properties") or {}
    return {name: _value(schema, user_text) for name, schema in properties.items()}


def _value(schema: dict, user_text: str) -> object:
    kind = schema.get("type") or next((item.get("type") for item in schema.get("anyOf", []) if "type" in item), None)
    if kind in ("integer", "number"):
        number = re.search(r"-?\d+", user_text)
        return int(number.group()) if number else 0
    if kind == "boolean":
        return True
    quoted = re.search(r"'([^']+)'|\"([^\"]+)\"", user_text)
    if quoted:
        return quoted.group(1) or quoted.group(2)
    return user_text.strip() or "text"


def _json_reply(system_text: str, user_text: str) -> dict:
    schema_line = re.search(r"follows this JSON schema, and nothing else:\n(.*?)<\|im_end\|>", system_text, re.S)
    if schema_line:
        schema = json.loads(schema_line.group(1))
        tool = {"function": {"name": "reply", "parameters": schema}}
        return _arguments(tool, user_text)
    keys = re.findall(r"'([A-Za-z_]+)'", user_text)
    return {key: user_text.strip() for key in keys}
