"""langchain-tests standard suites for ChatSemShare: unit, the default model, and scripted tool calls."""

from __future__ import annotations

import functools

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from semshare_core.engine import SemShareEngine
from semshare_integrations.langchain import ChatSemShare
from semshare_integrations.testing import ScriptedEngine, scripted_tool_responder

# The standard suites leave their async tests unmarked (they expect asyncio_mode=auto),
# so the module marks every test and silences pytest-asyncio's warning on the sync ones.
pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.filterwarnings("ignore:The test <Function .* is marked with '@pytest.mark.asyncio':pytest.PytestWarning"),
]

# A 135M model does not follow the tool-call format reliably, even when the reply is
# forced to open a call; TestChatSemShareScripted runs these tests with a scripted engine.
NO_TOOL_CALLS = pytest.mark.xfail(
    reason="SmolLM2-135M-Instruct rarely writes valid tool-call or schema JSON; "
    "TestChatSemShareScripted runs this test on scripted replies",
    strict=False,
)


@functools.cache
def scripted_engine() -> ScriptedEngine:
    return ScriptedEngine(SemShareEngine.shared(device="cpu").loaded, scripted_tool_responder)


class TestChatSemShareUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return ChatSemShare

    @property
    def chat_model_params(self) -> dict:
        return {"device": "cpu"}

    @property
    def standard_chat_model_params(self) -> dict:
        # A local model has no API key, no network timeout and no retries, and
        # unknown fields are rejected, so only the generation parameters remain.
        return {"temperature": 0, "max_tokens": 100, "stop": []}


class TestChatSemShareIntegration(ChatModelIntegrationTests):
    """The standard integration suite on the default model, with short replies."""

    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return ChatSemShare

    @property
    def chat_model_params(self) -> dict:
        return {"device": "cpu", "max_tokens": 16}

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def supported_usage_metadata_details(self) -> dict:
        return {"invoke": ["cache_read_input"], "stream": ["cache_read_input"]}

    def invoke_with_cache_read_input(self, *, stream: bool = False):
        # The same long prompt twice: the second call borrows the first one's cache.
        llm = ChatSemShare(device="cpu", max_tokens=4, namespace="cache-read-test")
        prompt = "Repeat after me. " + " ".join(f"Sentence {i} is about caching keys and values." for i in range(40))
        llm.invoke(prompt)
        if stream:
            full = None
            for chunk in llm.stream(prompt):
                full = chunk if full is None else full + chunk
            message = full
        else:
            message = llm.invoke(prompt)
        assert message.usage_metadata["input_token_details"]["cache_read"] > 0
        return message

    @NO_TOOL_CALLS
    def test_tool_calling(self, model):
        super().test_tool_calling(model)

    @NO_TOOL_CALLS
    async def test_tool_calling_async(self, model):
        await super().test_tool_calling_async(model)

    @NO_TOOL_CALLS
    def test_bind_runnables_as_tools(self, model):
        super().test_bind_runnables_as_tools(model)

    @NO_TOOL_CALLS
    def test_tool_choice(self, model):
        super().test_tool_choice(model)

    @NO_TOOL_CALLS
    def test_tool_calling_with_no_arguments(self, model):
        super().test_tool_calling_with_no_arguments(model)

    @NO_TOOL_CALLS
    def test_agent_loop(self, model):
        super().test_agent_loop(model)

    @NO_TOOL_CALLS
    def test_unicode_tool_call_integration(self, model, *, tool_choice=None, force_tool_call=True):
        super().test_unicode_tool_call_integration(model, tool_choice=tool_choice, force_tool_call=force_tool_call)

    @NO_TOOL_CALLS
    @pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
    def test_structured_output(self, model, schema_type):
        super().test_structured_output(model, schema_type)

    @NO_TOOL_CALLS
    @pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
    async def test_structured_output_async(self, model, schema_type):
        await super().test_structured_output_async(model, schema_type)

    @NO_TOOL_CALLS
    def test_structured_output_pydantic_2_v1(self, model):
        super().test_structured_output_pydantic_2_v1(model)

    @NO_TOOL_CALLS
    def test_structured_output_optional_param(self, model):
        super().test_structured_output_optional_param(model)

    @NO_TOOL_CALLS
    def test_json_mode(self, model):
        super().test_json_mode(model)


class TestChatSemShareScripted(ChatModelIntegrationTests):
    """The standard integration suite on scripted replies that call tools and write JSON.

    The replies come from ``scripted_tool_responder`` instead of the model, and go
    through the same prompt rendering, streaming and tool-call parsing.
    """

    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return ChatSemShare

    @property
    def chat_model_params(self) -> dict:
        return {"engine": scripted_engine(), "max_tokens": 200}

    @property
    def supports_json_mode(self) -> bool:
        return True
