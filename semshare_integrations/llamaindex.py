"""LlamaIndex LLM and embedding model on the SemShare engine, usable as ``Settings.llm``."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from llama_index.core import Settings
from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from llama_index.core.base.llms.types import (
    CachePoint,
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
)
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection
from pydantic import ConfigDict, Field

from semshare_core.engine import GenerationResult, SemShareEngine
from semshare_core.model import DEFAULT_MODEL

from ._common import (
    Prompt,
    Reply,
    ReplyCollector,
    SemShareSettings,
    call_settings,
    chat_prompt,
    finish_reason,
    generate_reply,
    iterate_in_thread,
    resolve_engine,
    reuse_details,
)
from ._tools import Message, ToolCall

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

logger = logging.getLogger(__name__)

_ROLES = {
    MessageRole.SYSTEM: "system",
    MessageRole.DEVELOPER: "system",
    MessageRole.USER: "user",
    MessageRole.ASSISTANT: "assistant",
    MessageRole.CHATBOT: "assistant",
    MessageRole.MODEL: "assistant",
    MessageRole.TOOL: "tool",
    MessageRole.FUNCTION: "tool",
}


def _tool_kwargs(value: dict | str) -> dict:
    if isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value) if value.strip() else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"tool call arguments {value[:80]!r} are not a JSON object: {e}") from e
    if not isinstance(parsed, dict):
        raise ValueError(f"tool call arguments {value[:80]!r} are not a JSON object")
    return parsed


def to_common_messages(messages: Sequence[ChatMessage]) -> list[Message]:
    """Convert LlamaIndex chat messages to the adapters' common message form.

    Tool calls are read from ``ToolCallBlock`` blocks, or from OpenAI-style
    ``additional_kwargs["tool_calls"]`` when a message has no such block.

    Raises:
        ValueError: A role or content block is not supported (images, audio, documents).
    """
    converted = []
    for message in messages:
        role = _ROLES.get(message.role)
        if role is None:
            raise ValueError(f"message role {message.role!r} is not supported; use one of {sorted(r.value for r in _ROLES)}")
        parts: list[str] = []
        calls: list[ToolCall] = []
        for block in message.blocks:
            if isinstance(block, TextBlock):
                parts.append(block.text)
            elif isinstance(block, ToolCallBlock):
                calls.append(ToolCall(block.tool_name, _tool_kwargs(block.tool_kwargs), id=block.tool_call_id or ""))
            elif isinstance(block, (ThinkingBlock, CachePoint)):
                continue
            else:
                raise ValueError(
                    f"{role} message has a {type(block).__name__}; SemShare models take text only, "
                    "so pass TextBlock content"
                )
        if not calls:
            for raw in message.additional_kwargs.get("tool_calls") or []:
                function = raw.get("function", raw) if isinstance(raw, dict) else raw.function
                name = function["name"] if isinstance(function, dict) else function.name
                arguments = function.get("arguments", {}) if isinstance(function, dict) else function.arguments
                call_id = raw.get("id") if isinstance(raw, dict) else raw.id
                calls.append(ToolCall(name, _tool_kwargs(arguments), id=call_id or ""))
        converted.append(
            Message(
                role,
                "".join(parts),
                tool_calls=calls,
                tool_call_id=message.additional_kwargs.get("tool_call_id"),
                name=message.additional_kwargs.get("name"),
            )
        )
    return converted


def usage(result: GenerationResult) -> dict[str, Any]:
    """Return token usage in the OpenAI layout that LlamaIndex's token counter reads.

    ``prompt_tokens_details.cached_tokens`` counts tokens served from a borrowed cache.
    """
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": result.reused_tokens},
    }


def _raw(engine: SemShareEngine, result: GenerationResult, calls: Sequence[ToolCall]) -> dict[str, Any]:
    return {
        "model_name": engine.model_name,
        "finish_reason": finish_reason(result, calls),
        "usage": usage(result),
        "reuse": reuse_details(result),
    }


def _assistant_message(text: str, calls: Sequence[ToolCall]) -> ChatMessage:
    blocks: list = [TextBlock(text=text)]
    blocks.extend(
        ToolCallBlock(tool_call_id=call.id, tool_name=call.name, tool_kwargs=call.arguments or {})
        for call in calls
        if call.error is None
    )
    invalid = [{"name": call.name, "raw": call.raw, "error": call.error} for call in calls if call.error is not None]
    return ChatMessage(
        role=MessageRole.ASSISTANT,
        blocks=blocks,
        additional_kwargs={"invalid_tool_calls": invalid} if invalid else {},
    )


class SemShare(SemShareSettings, FunctionCallingLLM):
    """LlamaIndex LLM on a local model that borrows the KV cache of similar earlier prompts.

    Use it as ``Settings.llm``: query engines over the same documents send prompts
    that share most of their context, and every prompt after the first borrows the
    keys and values of the most similar stored one. ``use_semshare()`` also sets a
    local embedding model and tokenizer, so that nothing reaches the network.

    ``complete`` wraps the prompt in the chat template as one user message;
    ``chat`` renders the messages with it. Every method takes the settings of
    ``SemShareSettings`` as per-call keyword arguments (``temperature``,
    ``max_tokens``, ``namespace``...). Responses carry ``raw["usage"]`` (token
    counts, ``prompt_tokens_details.cached_tokens`` for borrowed tokens) and
    ``raw["reuse"]`` (reference id, similarity, recomputed share, TTFT, fallback
    reason). Tool calls come back as ``ToolCallBlock`` blocks of the message.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, protected_namespaces=())

    @classmethod
    def class_name(cls) -> str:
        return "SemShare_LLM"

    @property
    def metadata(self) -> LLMMetadata:
        """Context window from the model config, ``num_output`` = ``max_tokens``; loads the engine."""
        engine = resolve_engine(self)
        return LLMMetadata(
            context_window=engine.context_window,
            num_output=self.max_tokens,
            is_chat_model=True,
            is_function_calling_model=True,
            model_name=engine.model_name,
        )

    # ------------------------------------------------------------- preparation

    def _prepare_chat(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]):
        kwargs = dict(kwargs)
        tools = kwargs.pop("tools", None)
        tool_choice = kwargs.pop("tool_choice", None)
        settings = call_settings(self, kwargs)
        engine = resolve_engine(settings)
        return engine, chat_prompt(engine, to_common_messages(messages), tools, tool_choice), settings

    def _prepare_complete(self, prompt: str, formatted: bool, kwargs: dict[str, Any]):
        if not formatted and self.completion_to_prompt is not None:
            prompt = self.completion_to_prompt(prompt)
        messages = [ChatMessage(role=MessageRole.USER, content=prompt)]
        if self.system_prompt:
            messages.insert(0, ChatMessage(role=MessageRole.SYSTEM, content=self.system_prompt))
        return self._prepare_chat(messages, kwargs)

    @staticmethod
    def _collect(engine: SemShareEngine, prompt: Prompt, settings: SemShareSettings) -> Reply:
        collector = ReplyCollector()
        for delta in generate_reply(engine, prompt, settings):
            collector.add(delta)
        return collector.reply()

    @staticmethod
    async def _acollect(engine: SemShareEngine, prompt: Prompt, settings: SemShareSettings) -> Reply:
        collector = ReplyCollector()
        async for delta in iterate_in_thread(generate_reply(engine, prompt, settings)):
            collector.add(delta)
        return collector.reply()

    # ------------------------------------------------------------- chat

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        engine, prompt, settings = self._prepare_chat(messages, kwargs)
        reply = self._collect(engine, prompt, settings)
        return ChatResponse(
            message=_assistant_message(reply.text, reply.tool_calls), raw=_raw(engine, reply.result, reply.tool_calls)
        )

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        engine, prompt, settings = await asyncio.to_thread(self._prepare_chat, messages, kwargs)
        reply = await self._acollect(engine, prompt, settings)
        return ChatResponse(
            message=_assistant_message(reply.text, reply.tool_calls), raw=_raw(engine, reply.result, reply.tool_calls)
        )

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        engine, prompt, settings = self._prepare_chat(messages, kwargs)

        def responses() -> ChatResponseGen:
            collector = ReplyCollector()
            for delta in generate_reply(engine, prompt, settings):
                collector.add(delta)
                yield self._chat_chunk(engine, collector, delta.text, delta.result)

        return responses()

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        engine, prompt, settings = await asyncio.to_thread(self._prepare_chat, messages, kwargs)

        async def responses() -> ChatResponseAsyncGen:
            collector = ReplyCollector()
            async for delta in iterate_in_thread(generate_reply(engine, prompt, settings)):
                collector.add(delta)
                yield self._chat_chunk(engine, collector, delta.text, delta.result)

        return responses()

    @staticmethod
    def _chat_chunk(
        engine: SemShareEngine, collector: ReplyCollector, delta: str, result: GenerationResult | None
    ) -> ChatResponse:
        message = _assistant_message("".join(collector.parts), collector.tool_calls)
        raw = _raw(engine, result, collector.tool_calls) if result is not None else None
        return ChatResponse(message=message, delta=delta, raw=raw)

    # ------------------------------------------------------------- completion

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        engine, prepared, settings = self._prepare_complete(prompt, formatted, kwargs)
        reply = self._collect(engine, prepared, settings)
        return CompletionResponse(text=reply.text, raw=_raw(engine, reply.result, []))

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        engine, prepared, settings = await asyncio.to_thread(self._prepare_complete, prompt, formatted, kwargs)
        reply = await self._acollect(engine, prepared, settings)
        return CompletionResponse(text=reply.text, raw=_raw(engine, reply.result, []))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        engine, prepared, settings = self._prepare_complete(prompt, formatted, kwargs)

        def responses() -> CompletionResponseGen:
            text = ""
            for delta in generate_reply(engine, prepared, settings):
                text += delta.text
                raw = _raw(engine, delta.result, []) if delta.result is not None else None
                yield CompletionResponse(text=text, delta=delta.text, raw=raw)

        return responses()

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        engine, prepared, settings = await asyncio.to_thread(self._prepare_complete, prompt, formatted, kwargs)

        async def responses() -> CompletionResponseAsyncGen:
            text = ""
            async for delta in iterate_in_thread(generate_reply(engine, prepared, settings)):
                text += delta.text
                raw = _raw(engine, delta.result, []) if delta.result is not None else None
                yield CompletionResponse(text=text, delta=delta.text, raw=raw)

        return responses()

    # ------------------------------------------------------------- tools

    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        tool_choice: str | dict | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Return the ``chat`` arguments for a call with ``tools``.

        ``tool_required`` makes the reply start with a tool call; ``tool_choice``
        (a tool name, "auto", "none" or "required") takes precedence over it.
        """
        messages = list(chat_history or [])
        if isinstance(user_msg, str):
            user_msg = ChatMessage(role=MessageRole.USER, content=user_msg)
        if user_msg is not None:
            messages.append(user_msg)
        specs = [tool.metadata.to_openai_tool(skip_length_check=True) for tool in tools]
        if tool_choice is None:
            tool_choice = "required" if tool_required else "auto"
        return {"messages": messages, "tools": specs or None, "tool_choice": tool_choice if specs else None, **kwargs}

    def _validate_chat_with_tools_response(
        self,
        response: ChatResponse,
        tools: Sequence[BaseTool],
        allow_parallel_tool_calls: bool = False,
        **kwargs: Any,
    ) -> ChatResponse:
        """Keep only the first tool call unless parallel calls are allowed."""
        if allow_parallel_tool_calls:
            return response
        calls = [block for block in response.message.blocks if isinstance(block, ToolCallBlock)]
        if len(calls) > 1:
            response.message.blocks = [
                block for block in response.message.blocks if not isinstance(block, ToolCallBlock)
            ] + calls[:1]
        return response

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        """Return the tool calls of ``response``.

        Raises:
            ValueError: The response has no tool call and ``error_on_no_tool_call`` is True.
        """
        selections = [
            ToolSelection(tool_id=block.tool_call_id or "", tool_name=block.tool_name, tool_kwargs=_tool_kwargs(block.tool_kwargs))
            for block in response.message.blocks
            if isinstance(block, ToolCallBlock)
        ]
        if not selections and error_on_no_tool_call:
            invalid = response.message.additional_kwargs.get("invalid_tool_calls")
            detail = f"; invalid calls: {invalid}" if invalid else ""
            raise ValueError(f"Expected at least one tool call, but got 0 tool calls{detail}")
        return selections


class SemShareEmbedding(BaseEmbedding):
    """Offline embedding model: the mean of the engine model's last hidden states, L2-normalized.

    It runs the same weights as the LLM, so it needs no other download. It is
    meant for retrieval over a few documents without network access; a dedicated
    sentence-embedding model ranks passages better.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, protected_namespaces=())

    model: str = Field(default=DEFAULT_MODEL)
    """Model whose hidden states are pooled (see ``SemShareSettings.model``)."""

    device: str = Field(default="auto")
    """Torch device: "auto", "cpu" or "cuda"."""

    dtype: str = Field(default="auto")
    """Weight dtype: "auto", "float32", "float16" or "bfloat16"."""

    max_length: int = Field(default=1024, ge=1)
    """Texts are cut to this many tokens before pooling."""

    engine: SemShareEngine | None = Field(default=None, exclude=True)
    """Engine whose model to use instead of the shared engine of ``model``."""

    @classmethod
    def class_name(cls) -> str:
        return "SemShareEmbedding"

    def _embed(self, text: str) -> Embedding:
        engine = resolve_engine(SemShareSettings(model=self.model, device=self.device, dtype=self.dtype, engine=self.engine))
        ids = engine.tokenizer.encode(text, add_special_tokens=False)[: self.max_length] or [engine.tokenizer.eos_token_id]
        decoder = engine.loaded.model.model
        with torch.no_grad():
            input_ids = torch.tensor([ids], device=engine.loaded.device)
            hidden = decoder(input_ids=input_ids).last_hidden_state[0]  # (seq_len, hidden_size)
            pooled = torch.nn.functional.normalize(hidden.float().mean(dim=0), dim=0)
        return pooled.cpu().tolist()

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._embed(query)

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return await asyncio.to_thread(self._embed, query)

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._embed(text)


def use_semshare(**settings: Any) -> SemShare:
    """Set LlamaIndex's global ``Settings`` to run offline on SemShare and return the LLM.

    Sets ``Settings.llm`` to ``SemShare(**settings)``, ``Settings.embed_model`` to a
    ``SemShareEmbedding`` on the same model, and ``Settings.tokenizer`` to the
    model's tokenizer. LlamaIndex's defaults would otherwise call OpenAI for
    embeddings and download a tiktoken encoding.

    Args:
        **settings: Fields of ``SemShare``, such as ``max_tokens`` or ``namespace``.
    """
    llm = SemShare(**settings)
    engine = resolve_engine(llm)
    Settings.llm = llm
    # The embedding model runs on the LLM's engine, so the weights load once.
    Settings.embed_model = SemShareEmbedding(model=llm.model, device=llm.device, dtype=llm.dtype, engine=engine)
    Settings.tokenizer = _tokenizer_function(engine)
    return llm


def _tokenizer_function(engine: SemShareEngine) -> Callable[[str], list[int]]:
    tokenizer = engine.tokenizer

    def tokenize(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    return tokenize
