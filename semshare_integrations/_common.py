"""The one generate path behind every adapter method: settings, prompt, generation, usage.

Both the LangChain and the LlamaIndex classes inherit ``SemShareSettings``, build a
``Prompt`` with ``chat_prompt`` or ``text_prompt``, and iterate ``generate_reply``
(``agenerate_reply`` from async code). Chat, completion, streaming and async methods
only translate the resulting ``ReplyDelta`` objects into their ecosystem's types.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from semshare_core.config import GenerationConfig, ReuseConfig
from semshare_core.engine import GenerationResult, SemShareEngine
from semshare_core.model import DEFAULT_MODEL, resolve_device

from ._tools import (
    AUTO,
    NONE,
    Message,
    ToolCall,
    ToolCallParser,
    forced_reply_prefix,
    normalize_tool_choice,
    to_native_format,
    to_prompt_format,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

# ReuseConfig fields that the adapters expose; None keeps the engine's value.
REUSE_FIELDS = ("similarity_threshold", "recompute_ratio", "recompute_decay", "min_recompute_ratio", "min_prompt_tokens")


class SemShareSettings(BaseModel):
    """Settings shared by every SemShare adapter class, each settable per call."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, protected_namespaces=())

    model: str = Field(default=DEFAULT_MODEL)
    """Model to run: the default SmolLM2-135M-Instruct, a local transformers folder or a .gguf file.

    All instances with the same ``model``, ``device``, ``dtype`` and ``store_dir``
    share one engine per process, so the weights load once."""

    device: str = Field(default="auto")
    """Torch device: "auto" (CUDA when available), "cpu" or "cuda"."""

    dtype: str = Field(default="auto")
    """Weight dtype: "auto" (float32 on CPU, bfloat16 or float16 on CUDA), "float32", "float16" or "bfloat16"."""

    temperature: float = Field(default=0.0, ge=0.0)
    """Sampling temperature; 0 decodes greedily."""

    max_tokens: int = Field(default=256, ge=1, le=1_000_000)
    """Maximum number of generated tokens."""

    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass in (0, 1]."""

    top_k: int = Field(default=0, ge=0)
    """Sample from the k most likely tokens; 0 disables the limit."""

    seed: int | None = Field(default=None)
    """Seed of the sampler; None draws from torch's global generator."""

    stop: list[str] | None = Field(default=None)
    """Strings that end generation; the returned text stops before the first one."""

    store_dir: str | None = Field(default=None, min_length=1)
    """Folder where references persist across processes, created when missing;
    None keeps them in memory for the life of the process."""

    namespace: str = Field(default="default", min_length=1)
    """Reference namespace: prompts only borrow caches stored in the same namespace.
    Give each tenant its own, because a borrowed cache carries the reference's content."""

    reuse: bool = Field(default=True)
    """Borrow the KV cache of a similar stored prompt when one is similar enough."""

    store: bool = Field(default=True)
    """Store each prompt and its completion as a reference for later prompts."""

    similarity_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    """Minimum prompt similarity to borrow from a reference; None keeps the engine's (0.4 by default)."""

    recompute_ratio: float | None = Field(default=None, ge=0.0, le=1.0)
    """Share of borrowed tokens recomputed in the second layer; None keeps the engine's."""

    recompute_decay: float | None = Field(default=None, gt=0.0, le=1.0)
    """Per-layer factor on the recomputed share from the second layer on; None keeps the engine's."""

    min_recompute_ratio: float | None = Field(default=None, ge=0.0, le=1.0)
    """Floor of the per-layer recomputed share; None keeps the engine's."""

    min_prompt_tokens: int | None = Field(default=None, ge=1)
    """Prompts shorter than this run a full prefill; None keeps the engine's (256 by default)."""

    engine: SemShareEngine | None = Field(default=None, exclude=True)
    """Engine to use instead of the shared engine of ``model``, for example one built
    with ``SemShareEngine.from_pretrained(..., reuse=ReuseConfig(...))``."""


# Settings that a single call may override.
CALL_OPTIONS = frozenset(SemShareSettings.model_fields) - {"device", "dtype", "store_dir", "engine"}


def call_settings(settings: SemShareSettings, overrides: dict[str, Any]) -> SemShareSettings:
    """Return the settings of one call: ``settings`` with ``overrides`` applied and validated.

    Raises:
        TypeError: An override is not a known setting.
        ValueError: An override has an invalid value.
    """
    unknown = sorted(set(overrides) - CALL_OPTIONS)
    if unknown:
        raise TypeError(f"unknown per-call option(s) {unknown}; the options are {sorted(CALL_OPTIONS)}")
    values = {name: getattr(settings, name) for name in SemShareSettings.model_fields}
    if "model" in overrides and overrides["model"] != settings.model:
        values["engine"] = None
    values.update(overrides)
    try:
        return SemShareSettings.model_validate(values)
    except ValidationError as e:
        raise ValueError(f"invalid per-call option(s) {overrides}: {e}") from e


def resolve_engine(settings: SemShareSettings) -> SemShareEngine:
    """Return ``settings.engine``, or the process-wide engine of the model and store, loading it on first use."""
    if settings.engine is not None:
        return settings.engine
    model = None if settings.model == DEFAULT_MODEL else settings.model
    # The shared engines are keyed by the literal arguments: resolve "auto" first so that
    # "auto" and the device it stands for share one engine.
    device = str(resolve_device(settings.device))
    return SemShareEngine.shared(model, device, settings.dtype, store_dir=settings.store_dir)


def generation_config(settings: SemShareSettings) -> GenerationConfig:
    return GenerationConfig(
        max_new_tokens=settings.max_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        seed=settings.seed,
        stop=tuple(settings.stop or ()),
    )


def reuse_config(engine: SemShareEngine, settings: SemShareSettings) -> ReuseConfig:
    """Return the engine's reuse settings with the adapter's overrides applied."""
    changes = {name: getattr(settings, name) for name in REUSE_FIELDS if getattr(settings, name) is not None}
    if not settings.reuse:
        changes["enabled"] = False
    if not changes:
        return engine.reuse
    return dataclasses.replace(engine.reuse, **changes)


# ----------------------------------------------------------------- prompts


@dataclass(frozen=True)
class Prompt:
    """Token ids to generate from, and how to read the reply.

    Attributes:
        ids: Prompt token ids, ending with the ids of ``reply_prefix``.
        reply_prefix: Text the reply is forced to start with (a required tool call or
            a JSON reply); it is part of the reply's text.
        parse_tool_calls: Split ``<tool_call>`` blocks out of the reply.
    """

    ids: list[int]
    reply_prefix: str = ""
    parse_tool_calls: bool = False


_TEMPLATE_RENDERS_TOOLS: dict[str, bool] = {}


def template_renders_tools(tokenizer: Any) -> bool:
    """Return whether the tokenizer's chat template renders the ``tools`` argument.

    The check renders one message with and without a probe tool; a template that
    ignores tools gives the same text twice. The result is cached per template.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return False
    key = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    if key not in _TEMPLATE_RENDERS_TOOLS:
        # transformers renders chat templates with jinja2, so it is installed wherever a template works.
        from jinja2 import TemplateError

        probe = [{"role": "user", "content": "Hello"}]
        tool = {
            "type": "function",
            "function": {
                "name": "semshare_probe_tool",
                "description": "Probe whether the template renders tools.",
                "parameters": {"type": "object", "properties": {}},
            },
        }
        without = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
        try:
            with_tools = tokenizer.apply_chat_template(probe, tools=[tool], tokenize=False, add_generation_prompt=True)
        except (TemplateError, TypeError, ValueError) as e:
            logger.info("Chat template fails with tools (%s); tools go into the system prompt", e)
            with_tools = without
        _TEMPLATE_RENDERS_TOOLS[key] = with_tools != without and "semshare_probe_tool" in with_tools
    return _TEMPLATE_RENDERS_TOOLS[key]


def chat_prompt(
    engine: SemShareEngine,
    messages: Sequence[Message],
    tools: Sequence[dict] | None = None,
    tool_choice: object = None,
) -> Prompt:
    """Render chat ``messages`` and ``tools`` (OpenAI function format) to prompt ids.

    A template that renders tools gets them as the ``tools`` argument. For one that
    ignores them, tools and tool turns are written into the prompt as text (see
    ``semshare_integrations._tools``), and a required tool call is enforced by
    starting the reply with the call's opening.

    Raises:
        ValueError: No messages, or an invalid ``tool_choice``.
    """
    if not messages:
        raise ValueError("messages is empty; pass at least one message")
    tools = list(tools or [])
    if not tools and tool_choice not in (None, "auto", "none"):
        raise ValueError(f"tool_choice={tool_choice!r} was given without tools; bind tools or drop tool_choice")
    choice = normalize_tool_choice(tool_choice, tools) if tools else AUTO
    if template_renders_tools(engine.tokenizer):
        # NOTE: a template that renders tools gets no forced reply prefix, because its
        # call format is only known to be <tool_call> blocks for Qwen2.5-style templates.
        ids = engine.apply_chat_template(to_native_format(list(messages)), tools if choice != NONE else None)
        return Prompt(ids, "", parse_tool_calls=bool(tools) and choice != NONE)
    ids = engine.apply_chat_template(to_prompt_format(list(messages), tools, choice))
    prefix = forced_reply_prefix(choice, tools)
    if prefix:
        ids = ids + engine.tokenizer.encode(prefix, add_special_tokens=False)
    return Prompt(ids, prefix, parse_tool_calls=bool(tools) and choice != NONE)


def text_prompt(engine: SemShareEngine, text: str) -> Prompt:
    """Tokenize a plain completion prompt, without a chat template."""
    return Prompt(engine.encode(text))


# ----------------------------------------------------------------- generation


@dataclass
class ReplyDelta:
    """One step of a reply: new text, one complete tool call, or, last, the result."""

    text: str = ""
    tool_call: ToolCall | None = None
    result: GenerationResult | None = None


def generate_reply(engine: SemShareEngine, prompt: Prompt, settings: SemShareSettings) -> Iterator[ReplyDelta]:
    """Generate the reply to ``prompt`` step by step; the last delta carries the result.

    Each ``next`` runs at most one model step (the prefill, or one decoded token),
    so async callers can run every step in a worker thread.
    """
    stream = engine.stream(
        prompt.ids,
        generation_config(settings),
        namespace=settings.namespace,
        reuse=reuse_config(engine, settings),
        store=settings.store,
    )
    parser = ToolCallParser() if prompt.parse_tool_calls else None
    if prompt.reply_prefix:
        if parser is None:
            yield ReplyDelta(text=prompt.reply_prefix)
        else:
            yield from _deltas(parser.feed(prompt.reply_prefix))
    for piece in stream:
        if parser is None:
            yield ReplyDelta(text=piece)
        else:
            yield from _deltas(parser.feed(piece))
    if parser is not None:
        yield from _deltas(parser.finish())
    if stream.result is None:
        raise RuntimeError("the engine's stream ended without a result; this is a bug in the engine")
    yield ReplyDelta(result=stream.result)


def _deltas(parts) -> Iterator[ReplyDelta]:
    for part in parts:
        if part.tool_call is not None:
            yield ReplyDelta(tool_call=part.tool_call)
        elif part.text:
            yield ReplyDelta(text=part.text)


async def iterate_in_thread(iterator: Iterator[T]) -> AsyncIterator[T]:
    """Iterate a blocking iterator from async code, each ``next`` in a worker thread.

    The event loop stays free while the model runs.
    """
    done = object()
    while True:
        item = await asyncio.to_thread(next, iterator, done)
        if item is done:
            return
        yield item


@dataclass
class Reply:
    """A complete reply, collected from its deltas."""

    text: str
    tool_calls: list[ToolCall]
    result: GenerationResult

    @property
    def valid_tool_calls(self) -> list[ToolCall]:
        return [call for call in self.tool_calls if call.error is None]

    @property
    def invalid_tool_calls(self) -> list[ToolCall]:
        return [call for call in self.tool_calls if call.error is not None]


class ReplyCollector:
    """Accumulates deltas into a ``Reply``."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.tool_calls: list[ToolCall] = []
        self.result: GenerationResult | None = None

    def add(self, delta: ReplyDelta) -> None:
        if delta.text:
            self.parts.append(delta.text)
        if delta.tool_call is not None:
            self.tool_calls.append(delta.tool_call)
        if delta.result is not None:
            self.result = delta.result

    def reply(self) -> Reply:
        if self.result is None:
            raise RuntimeError("the reply has no result yet; iterate the generation to its end first")
        return Reply("".join(self.parts), self.tool_calls, self.result)


def finish_reason(result: GenerationResult, tool_calls: Sequence[ToolCall]) -> str:
    """Return "tool_calls" when the reply made a valid call, else the engine's reason."""
    if any(call.error is None for call in tool_calls) and result.finish_reason == "stop":
        return "tool_calls"
    return result.finish_reason


def reuse_details(result: GenerationResult) -> dict[str, Any]:
    """Return what reuse did for one reply, for response metadata."""
    return result.reuse_info()
