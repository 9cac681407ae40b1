"""ChatSemShare and SemShareLLM: settings, prompts, tool calls, streaming, async and reuse."""

from __future__ import annotations

import asyncio
import json

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel, Field, ValidationError

from semshare_core.engine import SemShareEngine
from semshare_integrations._common import resolve_engine, template_renders_tools
from semshare_integrations._tools import ToolCallParser, parse_reply
from semshare_integrations.langchain import ChatSemShare, SemShareLLM
from semshare_integrations.testing import ScriptedEngine, scripted_tool_responder

from .conftest import tiny_tokenizer

LONG_TEXT = " ".join(
    f"Paragraph {i}: the city council met again to discuss the new tram line, its cost and its route."
    for i in range(30)
)


@tool
def get_weather(location: str) -> str:
    """Return the weather at a location."""
    return f"It is sunny in {location}."


class Joke(BaseModel):
    """Joke to tell the user."""

    setup: str = Field(description="question to set up a joke")
    punchline: str = Field(description="answer to resolve the joke")


@pytest.fixture(scope="module")
def scripted(default_engine) -> ScriptedEngine:
    return ScriptedEngine(default_engine.loaded, scripted_tool_responder)


def real_model(**settings) -> ChatSemShare:
    return ChatSemShare(device="cpu", **{"max_tokens": 6, **settings})


# ----------------------------------------------------------------- settings


def test_instances_share_one_engine(default_engine, monkeypatch):
    loads = []
    monkeypatch.setattr(SemShareEngine, "from_pretrained", classmethod(lambda cls, *a, **k: loads.append(a)))
    models = [ChatSemShare(device="cpu") for _ in range(10)] + [SemShareLLM(device="cpu", dtype="auto")]
    engines = {id(resolve_engine(model)) for model in models}
    assert engines == {id(default_engine)}
    assert loads == []


def test_unknown_field_rejected():
    with pytest.raises(ValidationError, match="api_key"):
        ChatSemShare(api_key="secret")
    with pytest.raises(ValidationError, match="unknown_setting"):
        SemShareLLM(unknown_setting=1)


@pytest.mark.parametrize(
    "field, value",
    [("temperature", -0.1), ("max_tokens", 0), ("top_p", 0.0), ("similarity_threshold", 1.5), ("recompute_decay", 0.0), ("namespace", "")],
)
def test_invalid_field_value_rejected(field, value):
    with pytest.raises(ValidationError, match=field):
        ChatSemShare(**{field: value})


def test_unknown_per_call_option_rejected(scripted):
    model = ChatSemShare(engine=scripted)
    with pytest.raises(TypeError, match="unknown per-call option"):
        model.invoke("Hello", temprature=0.5)
    with pytest.raises(ValueError, match="max_tokens"):
        model.invoke("Hello", max_tokens=-1)


def test_per_call_options_honoured(scripted):
    model = ChatSemShare(engine=scripted, max_tokens=100)
    short = model.invoke("Hello", max_tokens=2)
    assert short.usage_metadata["output_tokens"] == 2
    assert short.response_metadata["finish_reason"] == "length"
    stopped = model.invoke("Hello", stop=["scripted"])
    assert stopped.content == "Hello! This reply is "


def test_token_counting_uses_model_tokenizer(default_engine, monkeypatch):
    import langchain_core.language_models.base as base

    monkeypatch.setattr(base, "_get_token_ids_default_method", lambda text: pytest.fail("GPT-2 tokenizer used"))
    model = real_model()
    text = "Prefill reuses the keys and values of a similar prompt."
    assert model.get_token_ids(text) == default_engine.tokenizer.encode(text, add_special_tokens=False)
    assert SemShareLLM(device="cpu").get_num_tokens(text) == len(model.get_token_ids(text))
    messages = [HumanMessage(text)]
    expected = len(default_engine.apply_chat_template([{"role": "user", "content": text}]))
    assert model.get_num_tokens_from_messages(messages) == expected


# ----------------------------------------------------------------- prompts and tools


def test_template_tool_support_detected(default_engine):
    assert not template_renders_tools(default_engine.tokenizer)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = (
        "{% if tools %}{% for t in tools %}{{ t['function']['name'] }} {% endfor %}{% endif %}"
        "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    )
    assert template_renders_tools(tokenizer)


def test_tools_rendered_into_system_prompt(scripted):
    model = ChatSemShare(engine=scripted).bind_tools([get_weather])
    model.invoke([SystemMessage("Be brief."), HumanMessage("Weather in 'Paris'?")])
    prompt = scripted.prompts[-1]
    assert prompt.startswith("<|im_start|>system\nBe brief.\n\nYou can call the tools")
    schema_line = prompt.split("<tools>\n")[1].split("\n</tools>")[0]
    assert json.loads(schema_line)["function"]["name"] == "get_weather"
    assert "You are a helpful AI assistant named SmolLM" not in prompt


def test_tool_call_parsed_into_message(scripted):
    result = ChatSemShare(engine=scripted).bind_tools([get_weather]).invoke("What is the weather in 'Oslo'?")
    assert result.content == ""
    assert len(result.tool_calls) == 1
    assert result.tool_calls[0]["name"] == "get_weather"
    assert result.tool_calls[0]["args"] == {"location": "Oslo"}
    assert result.tool_calls[0]["id"].startswith("call_")
    assert result.response_metadata["finish_reason"] == "tool_calls"


def test_tool_call_streamed_as_chunks(scripted):
    model = ChatSemShare(engine=scripted).bind_tools([get_weather])
    chunks = list(model.stream("What is the weather in 'Oslo'?"))
    with_calls = [chunk for chunk in chunks if chunk.tool_call_chunks]
    assert len(with_calls) == 1
    assert json.loads(with_calls[0].tool_call_chunks[0]["args"]) == {"location": "Oslo"}
    full = sum(chunks[1:], chunks[0])
    assert full.tool_calls[0]["args"] == {"location": "Oslo"}
    assert full.chunk_position == "last"


def test_forced_tool_choice_prefixes_reply(scripted):
    model = ChatSemShare(engine=scripted).bind_tools([get_weather], tool_choice="get_weather")
    result = model.invoke("Hello there")
    assert scripted.prompts[-1].endswith('<tool_call>\n{"name": "get_weather", "arguments": ')
    assert result.tool_calls[0]["name"] == "get_weather"


def test_unknown_tool_choice_rejected():
    with pytest.raises(ValueError, match="tool_choice='nope'"):
        ChatSemShare().bind_tools([get_weather], tool_choice="nope")


def test_tool_message_last_rendered(scripted):
    messages = [
        HumanMessage("Weather in Paris?"),
        AIMessage("", tool_calls=[{"name": "get_weather", "args": {"location": "Paris"}, "id": "call_1", "type": "tool_call"}]),
        ToolMessage("It is sunny in Paris.", tool_call_id="call_1"),
    ]
    result = ChatSemShare(engine=scripted).bind_tools([get_weather]).invoke(messages)
    prompt = scripted.prompts[-1]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris"}}\n</tool_call>' in prompt
    response = json.loads(prompt.split("<tool_response>\n")[1].split("\n</tool_response>")[0])
    assert response == {"name": "get_weather", "tool_call_id": "call_1", "content": "It is sunny in Paris."}
    assert result.content.startswith("The tool returned")


def test_tool_message_last_on_real_model():
    messages = [
        HumanMessage("Weather in Paris?"),
        AIMessage("", tool_calls=[{"name": "get_weather", "args": {"location": "Paris"}, "id": "call_1", "type": "tool_call"}]),
        ToolMessage("It is sunny in Paris.", tool_call_id="call_1"),
    ]
    result = real_model().bind_tools([get_weather]).invoke(messages)
    assert isinstance(result, AIMessage)
    assert result.usage_metadata["output_tokens"] > 0


def test_invalid_tool_call_kept_invalid(default_engine):
    def respond(prompt: str) -> str:
        return '<tool_call>\n{"name": "get_weather", "arguments": {"location": </tool_call>'

    model = ChatSemShare(engine=ScriptedEngine(default_engine.loaded, respond)).bind_tools([get_weather])
    result = model.invoke("Weather?")
    assert result.tool_calls == []
    assert result.invalid_tool_calls[0]["name"] == "get_weather"
    assert "invalid JSON" in result.invalid_tool_calls[0]["error"]
    streamed = None
    for chunk in model.stream("Weather?"):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed.tool_calls == []
    assert len(streamed.invalid_tool_calls) == 1


@pytest.mark.parametrize("method", ["function_calling", "json_schema", "json_mode"])
def test_structured_output_methods(scripted, method):
    structured = ChatSemShare(engine=scripted).with_structured_output(Joke, method=method)
    prompt = "Tell a joke with 'setup' and 'punchline'."
    joke = structured.invoke(prompt)
    assert isinstance(joke, Joke)
    if method == "json_schema":
        assert '"punchline"' in scripted.prompts[-1]
    if method != "function_calling":
        assert scripted.prompts[-1].endswith("<|im_start|>assistant\n{")


def test_image_content_rejected(scripted):
    message = HumanMessage([{"type": "image", "url": "file:///cat.png"}])
    with pytest.raises(ValueError, match="text only"):
        ChatSemShare(engine=scripted).invoke([message])


# ----------------------------------------------------------------- parsing


def test_parse_reply_text_and_calls():
    text = 'Let me check.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n<tool_call>{"name": "b", "arguments": "{\\"y\\": 2}"}</tool_call>\n'
    content, calls = parse_reply(text)
    assert content == "Let me check."
    assert [(call.name, call.arguments) for call in calls] == [("a", {"x": 1}), ("b", {"y": 2})]
    assert all(call.error is None for call in calls)


@pytest.mark.parametrize(
    "text, error",
    [
        ('<tool_call>{"name": "a", "arguments": 3}</tool_call>', "must be a JSON object"),
        ('<tool_call>{"arguments": {}}</tool_call>', 'no "name"'),
        ('<tool_call>{"name": "a", "arguments": {"x": </tool_call>', "invalid JSON"),
        ('<tool_call>{"name": "a", "arguments": {"x": ', "ended inside the block"),
        ('<tool_call>{"name": "a"} trailing</tool_call>', "text after the JSON object"),
    ],
)
def test_parse_reply_invalid_calls(text, error):
    content, calls = parse_reply(text)
    assert content == ""
    assert len(calls) == 1
    assert error in calls[0].error


def test_parse_reply_unterminated_complete_call():
    _, calls = parse_reply('<tool_call>\n{"name": "a", "arguments": {}}')
    assert calls[0].error is None


def test_streamed_parse_matches_whole():
    text = 'ab <tool_call>{"name": "x", "arguments": {}}</tool_call>\n tail <tool'
    parser = ToolCallParser()
    parts = [part for char in text for part in parser.feed(char)] + list(parser.finish())
    streamed_text = "".join(part.text for part in parts)
    content, calls = parse_reply(text)
    assert streamed_text == content
    assert content == "abtail <tool"
    assert [call.name for call in calls] == ["x"]


# ----------------------------------------------------------------- real model


def test_sync_async_stream_same_text():
    model = real_model(reuse=False, store=False)
    prompt = "Name a colour."
    invoked = model.invoke(prompt).content
    streamed = "".join(chunk.content for chunk in model.stream(prompt))
    assert streamed == invoked
    assert asyncio.run(model.ainvoke(prompt)).content == invoked

    async def astreamed() -> str:
        return "".join([chunk.content async for chunk in model.astream(prompt)])

    assert asyncio.run(astreamed()) == invoked


def test_async_does_not_block_event_loop():
    model = real_model(max_tokens=12, reuse=False, store=False)

    async def main() -> tuple[int, str]:
        ticks = 0
        done = asyncio.Event()

        async def tick() -> None:
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.005)

        ticker = asyncio.create_task(tick())
        message = await model.ainvoke("Tell me about trams.")
        done.set()
        await ticker
        return ticks, message.content

    ticks, content = asyncio.run(main())
    assert content
    assert ticks >= 10


def test_usage_and_reuse_metadata():
    model = real_model(namespace="lc-usage", min_prompt_tokens=64)
    first = model.invoke(LONG_TEXT + "\nSummarize the paragraphs.")
    second = model.invoke(LONG_TEXT + "\nWhat did the council discuss?")
    usage = second.usage_metadata
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert first.usage_metadata["input_token_details"]["cache_read"] == 0
    assert usage["input_token_details"]["cache_read"] > 0
    metadata = second.response_metadata
    assert metadata["model_name"] == "SmolLM2-135M-Instruct"
    assert metadata["reference_id"] is not None
    assert metadata["fallback_reason"] is None
    assert 0 < metadata["recomputed_share"] < 1
    for key in ("similarity", "ttft_s", "prefix_tokens", "finish_reason"):
        assert key in metadata


def test_next_turn_reuses_token_prefix():
    model = real_model(namespace="lc-turns", min_prompt_tokens=16)
    history = [HumanMessage(LONG_TEXT + "\nWhat is this about?")]
    first = model.invoke(history)
    first_prompt_tokens = first.usage_metadata["input_tokens"]
    second = model.invoke([*history, first, HumanMessage("And the cost?")])
    assert second.response_metadata["prefix_tokens"] >= first_prompt_tokens


def test_namespace_isolates_references():
    first = real_model(namespace="lc-tenant-a", min_prompt_tokens=64).invoke(LONG_TEXT)
    other = real_model(namespace="lc-tenant-b", min_prompt_tokens=64).invoke(LONG_TEXT)
    assert first.response_metadata["reference_id"] is None
    assert other.response_metadata["reference_id"] is None
    assert "no stored reference in namespace 'lc-tenant-b'" in other.response_metadata["fallback_reason"]


def test_store_dir_persists_references(tmp_path, monkeypatch):
    monkeypatch.setattr(SemShareEngine, "_shared", {})
    settings = {"store_dir": str(tmp_path), "namespace": "lc-persist", "min_prompt_tokens": 64}
    first = real_model(**settings).invoke(LONG_TEXT)
    assert list(tmp_path.glob("*.safetensors"))
    # With the engine cache cleared, the next model opens the folder as a new process would.
    SemShareEngine._shared.clear()

    second = real_model(**settings).invoke(LONG_TEXT)

    assert first.response_metadata["reference_id"] is None
    assert second.response_metadata["reference_id"] is not None
    assert second.response_metadata["prefix_tokens"] > 0
    with pytest.raises(TypeError, match="unknown per-call option"):
        real_model(**settings).invoke(LONG_TEXT, store_dir=str(tmp_path / "other"))


def test_llm_generation_info_and_stream():
    llm = SemShareLLM(device="cpu", max_tokens=5, reuse=False, store=False)
    prompt = "The capital of France is"
    text = llm.invoke(prompt)
    assert "".join(llm.stream(prompt)) == text
    result = llm.generate([prompt])
    info = result.generations[0][0].generation_info
    assert info["usage"]["output_tokens"] == 5
    assert info["finish_reason"] == "length"
    assert "fallback_reason" in info
    assert result.llm_output["token_usage"]["input_tokens"] == info["usage"]["input_tokens"]

    async def astreamed() -> str:
        return "".join([piece async for piece in llm.astream(prompt)])

    assert asyncio.run(astreamed()) == text
    assert asyncio.run(llm.ainvoke(prompt)) == text


def test_model_override_per_call(scripted):
    model = ChatSemShare(engine=scripted)
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        model.invoke("Hello", model="/nonexistent/does-not-exist")
    assert model._get_ls_params(model="other-model")["ls_model_name"] == "other-model"
