"""SemShare as a LlamaIndex LLM: chat, completion, streaming, async, events, tools and a query engine."""

from __future__ import annotations

import asyncio
import socket

import pytest
from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.base.llms.types import ChatMessage, MessageRole, ToolCallBlock
from llama_index.core.callbacks import CallbackManager, CBEventType
from llama_index.core.callbacks.base_handler import BaseCallbackHandler
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.llm import LLMChatEndEvent, LLMCompletionEndEvent
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.tools import FunctionTool
from pydantic import ValidationError

from semshare_core.articles import article_pairs
from semshare_integrations.llamaindex import SemShare, SemShareEmbedding, use_semshare
from semshare_integrations.testing import ScriptedEngine, scripted_tool_responder

class RecordingEventHandler(BaseEventHandler):
    """Keeps the LLM end events that the instrumentation dispatcher sends."""

    events: list = []

    @classmethod
    def class_name(cls) -> str:
        return "RecordingEventHandler"

    def handle(self, event, **kwargs) -> None:
        if isinstance(event, (LLMChatEndEvent, LLMCompletionEndEvent)):
            self.events.append(event)


class RecordingCallbackHandler(BaseCallbackHandler):
    """Keeps the LLM events of the legacy callback manager."""

    def __init__(self) -> None:
        super().__init__(event_starts_to_ignore=[], event_ends_to_ignore=[])
        self.ends: list = []

    def on_event_start(self, event_type, payload=None, event_id="", parent_id="", **kwargs) -> str:
        return event_id

    def on_event_end(self, event_type, payload=None, event_id="", **kwargs) -> None:
        if event_type == CBEventType.LLM:
            self.ends.append(payload)

    def start_trace(self, trace_id=None) -> None:
        pass

    def end_trace(self, trace_id=None, trace_map=None) -> None:
        pass


@pytest.fixture(scope="module")
def event_handler():
    handler = RecordingEventHandler()
    dispatcher = get_dispatcher()
    dispatcher.add_event_handler(handler)
    yield handler
    dispatcher.event_handlers.remove(handler)


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def real_llm(**settings) -> SemShare:
    return SemShare(device="cpu", **{"max_tokens": 6, **settings})


def test_llm_metadata(default_engine):
    llm = real_llm(max_tokens=42)
    assert isinstance(llm, FunctionCallingLLM)
    metadata = llm.metadata
    assert metadata.context_window == default_engine.loaded.model.config.max_position_embeddings
    assert metadata.num_output == 42
    assert metadata.is_chat_model
    assert metadata.is_function_calling_model
    assert metadata.model_name == "SmolLM2-135M-Instruct"


def test_unknown_field_and_option_rejected():
    with pytest.raises(ValidationError, match="api_base"):
        SemShare(api_base="http://localhost")
    with pytest.raises(TypeError, match="unknown per-call option"):
        real_llm().complete("Hello", max_new_tokens=3)


def test_sync_async_stream_same_text():
    llm = real_llm(reuse=False, store=False)
    prompt = "Name a fruit."
    completed = llm.complete(prompt).text
    assert completed
    assert "".join(r.delta for r in llm.stream_complete(prompt)) == completed
    assert asyncio.run(llm.acomplete(prompt)).text == completed

    messages = [ChatMessage(role=MessageRole.USER, content=prompt)]
    assert llm.chat(messages).message.content == completed
    assert "".join(r.delta for r in llm.stream_chat(messages)) == completed
    assert asyncio.run(llm.achat(messages)).message.content == completed

    async def astreamed() -> tuple[str, str]:
        completion = "".join([r.delta async for r in await llm.astream_complete(prompt)])
        chat = "".join([r.delta async for r in await llm.astream_chat(messages)])
        return completion, chat

    assert asyncio.run(astreamed()) == (completed, completed)


def test_per_call_kwargs_honoured():
    llm = real_llm(max_tokens=8, reuse=False, store=False)
    response = llm.complete("Tell me a story.", max_tokens=2)
    assert response.raw["usage"]["completion_tokens"] == 2
    messages = [ChatMessage(role=MessageRole.USER, content="Tell me a story.")]
    assert llm.chat(messages, max_tokens=3).raw["usage"]["completion_tokens"] == 3


def test_usage_in_raw_response():
    response = real_llm(reuse=False, store=False).complete("Hello")
    usage = response.raw["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0
    assert response.raw["reuse"]["fallback_reason"] == "reuse is disabled"
    assert response.raw["model_name"] == "SmolLM2-135M-Instruct"


def test_callback_and_instrumentation_events(event_handler):
    callbacks = RecordingCallbackHandler()
    llm = real_llm(reuse=False, store=False)
    llm.callback_manager = CallbackManager([callbacks])
    before = len(event_handler.events)
    llm.complete("Hello")
    llm.chat([ChatMessage(role=MessageRole.USER, content="Hello")])
    list(llm.stream_chat([ChatMessage(role=MessageRole.USER, content="Hello")]))
    asyncio.run(llm.acomplete("Hello"))
    events = event_handler.events[before:]
    assert [type(event).__name__ for event in events] == [
        "LLMCompletionEndEvent",
        "LLMChatEndEvent",
        "LLMChatEndEvent",
        "LLMCompletionEndEvent",
    ]
    assert events[1].response.raw["usage"]["completion_tokens"] > 0
    assert len(callbacks.ends) == 4


def test_chat_with_tools_scripted(default_engine):
    tool = FunctionTool.from_defaults(fn=add)
    llm = SemShare(engine=ScriptedEngine(default_engine.loaded, scripted_tool_responder))
    response = llm.chat_with_tools([tool], user_msg="What is add of 3 and 3?", tool_required=True)
    calls = llm.get_tool_calls_from_response(response)
    assert [(call.tool_name, call.tool_kwargs) for call in calls] == [("add", {"a": 3, "b": 3})]
    assert response.raw["finish_reason"] == "tool_calls"

    history = [
        ChatMessage(role=MessageRole.USER, content="What is add of 3 and 3?"),
        response.message,
        ChatMessage(role=MessageRole.TOOL, content="6", additional_kwargs={"tool_call_id": calls[0].tool_id, "name": "add"}),
    ]
    final = llm.chat_with_tools([tool], chat_history=history)
    assert final.message.content.startswith("The tool returned")
    assert llm.get_tool_calls_from_response(final, error_on_no_tool_call=False) == []
    with pytest.raises(ValueError, match="Expected at least one tool call"):
        llm.get_tool_calls_from_response(final)


def test_predict_and_call_scripted(default_engine):
    tool = FunctionTool.from_defaults(fn=add)
    llm = SemShare(engine=ScriptedEngine(default_engine.loaded, scripted_tool_responder))
    result = llm.predict_and_call([tool], user_msg="Please add 5 and 5.")
    assert result.response == "10"


def test_stream_chat_tool_call_blocks(default_engine):
    tool = FunctionTool.from_defaults(fn=add)
    llm = SemShare(engine=ScriptedEngine(default_engine.loaded, scripted_tool_responder))
    responses = list(llm.stream_chat_with_tools([tool], user_msg="add 2 and 2", tool_required=True))
    final = responses[-1]
    blocks = [block for block in final.message.blocks if isinstance(block, ToolCallBlock)]
    assert [(block.tool_name, block.tool_kwargs) for block in blocks] == [("add", {"a": 2, "b": 2})]
    assert final.raw["usage"]["completion_tokens"] > 0


def test_embedding_is_normalized_and_ranks(default_engine):
    embedding = SemShareEmbedding(device="cpu")
    query = embedding.get_query_embedding("trams and buses in the city")
    near = embedding.get_text_embedding("The city council discussed the new tram line and bus routes.")
    far = embedding.get_text_embedding("def add(a, b): return a + b")
    assert len(query) == default_engine.loaded.model.config.hidden_size
    assert abs(sum(value * value for value in query) - 1.0) < 1e-4
    assert embedding.similarity(query, near) > embedding.similarity(query, far)


def articles(count: int, words: int) -> list[Document]:
    """The advanced versions of the first ``count`` shipped articles, cut to ``words`` words."""
    return [
        Document(text=" ".join(pair.advanced.split()[:words]), metadata={"title": pair.name})
        for pair in article_pairs()[:count]
    ]


def test_query_engine_offline_reuse(event_handler, monkeypatch):
    previous = (Settings._llm, Settings._embed_model, Settings._tokenizer)

    def no_network(*args, **kwargs):
        raise AssertionError("a network connection was attempted; the query engine must run offline")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    try:
        use_semshare(device="cpu", max_tokens=6, namespace="li-query", min_prompt_tokens=64)
        index = VectorStoreIndex.from_documents(articles(3, 250))
        engine = index.as_query_engine(similarity_top_k=1)
        before = len(event_handler.events)
        first = engine.query("What is the article about Amazon about?")
        second = engine.query("What is the Amazon article about?")
    finally:
        Settings._llm, Settings._embed_model, Settings._tokenizer = previous
    assert str(first)
    assert str(second)
    raws = [event.response.raw for event in event_handler.events[before:]]
    assert len(raws) == 2
    assert raws[1]["reuse"]["reference_id"] is not None
    assert raws[1]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
