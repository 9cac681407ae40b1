"""Bad input: every case ends in a clear error or a correct result, never a crash, hang or damaged store."""

from __future__ import annotations

import errno
import logging
import math
import os
import threading

import numpy as np
import pytest
import torch

from semshare_core import persist
from semshare_core.config import GenerationConfig, ReuseConfig
from semshare_core.decoding import Sampler
from semshare_core.engine import SemShareEngine
from semshare_core.model import LoadedModel
from semshare_core.store import ReferenceStore

from .conftest import tiny_engine, tiny_model, tiny_tokenizer

CONTEXT_WINDOW = 64
SHORT = GenerationConfig(max_new_tokens=4)
TINY_REUSE = ReuseConfig(min_prompt_tokens=16, similarity_threshold=0.1)


def words(count: int, start: int = 10) -> str:
    return " ".join(f"w{start + i}" for i in range(count))


@pytest.fixture(scope="module")
def engine() -> SemShareEngine:
    return tiny_engine("llama", TINY_REUSE, max_position_embeddings=CONTEXT_WINDOW)


def engine_on(store: ReferenceStore) -> SemShareEngine:
    loaded = LoadedModel(tiny_model(), tiny_tokenizer(), "tiny-llama", torch.device("cpu"), torch.float32, "llama")
    return SemShareEngine(loaded, TINY_REUSE, store)


def store_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "semshare_core.store" and r.levelno >= logging.WARNING]


# ----------------------------------------------------------------- prompts


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t \r\n", "\u3000"])
def test_empty_or_whitespace_prompt(engine, prompt):
    with pytest.raises(ValueError, match="empty or whitespace"):
        engine.generate(prompt, SHORT)


def test_empty_token_list(engine):
    with pytest.raises(ValueError, match="no tokens"):
        engine.generate([], SHORT)


def test_prompt_longer_than_context(engine):
    with pytest.raises(ValueError) as raised:
        engine.generate(words(80), SHORT)
    message = str(raised.value)
    assert "80 tokens" in message
    assert f"context window of {CONTEXT_WINDOW}" in message
    assert "at least 17 tokens" in message


def test_prompt_filling_context_exactly(engine):
    with pytest.raises(ValueError, match=f"{CONTEXT_WINDOW} tokens does not fit"):
        engine.generate(words(CONTEXT_WINDOW), SHORT)


def test_completion_clipped_at_context_end(engine):
    result = engine.generate(words(CONTEXT_WINDOW - 2), GenerationConfig(max_new_tokens=1_000_000), store=False)
    assert result.completion_tokens <= 2
    assert result.prompt_tokens + result.completion_tokens <= CONTEXT_WINDOW


@pytest.mark.parametrize(
    "prompt, error",
    [
        (None, TypeError),
        (5, TypeError),
        (3.5, TypeError),
        (b"w1 w2", TypeError),
        ({"role": "user", "content": "w1"}, TypeError),
        ([1.5, 2], TypeError),
        ([True, 5], TypeError),
        (["w1", "w2"], TypeError),
        ([[1, 2], [3, 4]], TypeError),
        (np.array([1.0, 2.0]), TypeError),
        (np.array([[1, 2], [3, 4]]), ValueError),
        (torch.zeros(2, 2, dtype=torch.long), ValueError),
        ([-1, 5], ValueError),
        ([5, 10**9], ValueError),
        ("w1 \ud800 w2", ValueError),
    ],
)
def test_invalid_prompt_types(engine, prompt, error):
    with pytest.raises(error) as raised:
        engine.generate(prompt, SHORT)
    assert str(raised.value)


def test_token_id_arrays_accepted(engine):
    expected = engine.generate([5, 6, 7, 8], SHORT, store=False).text
    assert engine.generate(np.array([5, 6, 7, 8]), SHORT, store=False).text == expected
    assert engine.generate(torch.tensor([5, 6, 7, 8]), SHORT, store=False).text == expected
    assert engine.generate((5, 6, 7, 8), SHORT, store=False).text == expected


def test_unknown_words_and_control_characters(engine):
    result = engine.generate("zzz \x00 qqq", SHORT, store=False)
    assert result.prompt_tokens >= 1
    assert result.completion_tokens == SHORT.max_new_tokens or result.finish_reason == "stop"


@pytest.mark.parametrize(
    "arguments, error, name",
    [
        ({"generation": {"max_new_tokens": 4}}, TypeError, "generation"),
        ({"reuse": {"enabled": False}}, TypeError, "reuse"),
        ({"store": "yes"}, TypeError, "store"),
        ({"namespace": ""}, ValueError, "namespace"),
        ({"namespace": 5}, ValueError, "namespace"),
    ],
)
def test_invalid_call_arguments(engine, arguments, error, name):
    with pytest.raises(error, match=name):
        engine.generate(words(8), **arguments)


# ----------------------------------------------------------------- generation settings


def test_max_tokens_zero(engine):
    result = engine.generate(words(20), GenerationConfig(max_new_tokens=0), store=False)
    assert result.text == ""
    assert result.completion_tokens == 0
    assert result.token_ids == []
    stream = engine.stream(words(20), GenerationConfig(max_new_tokens=0), store=False)
    assert list(stream) == []
    assert stream.result.text == ""


def test_max_tokens_zero_still_stores_prompt():
    engine = tiny_engine("llama", TINY_REUSE)
    result = engine.generate(words(20), GenerationConfig(max_new_tokens=0))
    stored = engine.store.get(result.stored_reference_id)
    assert len(stored) == 20


@pytest.mark.parametrize(
    "settings, error, name",
    [
        ({"max_new_tokens": -1}, ValueError, "max_new_tokens"),
        ({"max_new_tokens": 10**7}, ValueError, "max_new_tokens"),
        ({"max_new_tokens": 2.5}, TypeError, "max_new_tokens"),
        ({"max_new_tokens": True}, TypeError, "max_new_tokens"),
        ({"top_k": -1}, ValueError, "top_k"),
        ({"temperature": -0.1}, ValueError, "temperature"),
        ({"temperature": math.nan}, ValueError, "temperature"),
        ({"temperature": math.inf}, ValueError, "temperature"),
        ({"temperature": "hot"}, ValueError, "temperature"),
        ({"top_p": 0.0}, ValueError, "top_p"),
        ({"top_p": 1.5}, ValueError, "top_p"),
        ({"top_p": -0.5}, ValueError, "top_p"),
        ({"top_p": math.nan}, ValueError, "top_p"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"stop": ("",)}, ValueError, "stop"),
        ({"stop": (None,)}, ValueError, "stop"),
    ],
)
def test_invalid_generation_settings(settings, error, name):
    with pytest.raises(error, match=name):
        GenerationConfig(**settings)


@pytest.mark.parametrize("settings", [{"temperature": True}, {"top_p": True}, {"seed": 2**70}])
def test_invalid_generation_settings_bool_and_huge_seed(settings):
    with pytest.raises((TypeError, ValueError)):
        GenerationConfig(**settings)


def test_huge_but_valid_settings(engine):
    settings = GenerationConfig(max_new_tokens=4, temperature=1e30, top_k=10**12, top_p=1e-9, seed=2**62)
    result = engine.generate(words(20), settings, store=False)
    assert result.completion_tokens == 4 or result.finish_reason == "stop"


def test_stop_string_never_occurs(engine):
    plain = engine.generate(words(20), SHORT, store=False)
    result = engine.generate(words(20), GenerationConfig(max_new_tokens=4, stop=("never-generated",)), store=False)
    assert result.text == plain.text
    assert result.finish_reason == plain.finish_reason


def test_stop_string_occurs_at_once(engine):
    plain = engine.generate(words(20), SHORT, store=False)
    first_word = plain.text.split()[0]
    result = engine.generate(words(20), GenerationConfig(max_new_tokens=4, stop=(first_word,)), store=False)
    assert result.text == ""
    assert result.finish_reason == "stop"
    assert result.completion_tokens == 1

    stream = engine.stream(words(20), GenerationConfig(max_new_tokens=4, stop=("w",)), store=False)
    assert "".join(stream) == ""
    assert stream.result.finish_reason == "stop"


# ----------------------------------------------------------------- files given to the command line


def test_invalid_utf8_file(tmp_path):
    cli = pytest.importorskip("semshare_core.cli")
    path = tmp_path / "prompt.txt"
    path.write_bytes("héllo ".encode() + b"\xff\xfe world")
    with pytest.raises(ValueError) as raised:
        cli.read_text_file(path)
    message = str(raised.value)
    assert "prompt.txt" in message
    assert "7" in message  # byte offset of the first invalid byte

    good = tmp_path / "good.txt"
    good.write_text("héllo world", encoding="utf-8")
    assert cli.read_text_file(good) == "héllo world"


# ----------------------------------------------------------------- store directory


def test_store_on_full_disk(tmp_path, monkeypatch, caplog):
    store = ReferenceStore(directory=tmp_path)
    engine = engine_on(store)
    engine.generate(words(30), SHORT)
    before = {path.name: path.read_bytes() for path in tmp_path.glob("*.safetensors")}
    assert len(before) == 1

    def disk_full(path, data):
        with open(path, "wb") as handle:
            handle.write(data[:100])
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(persist, "_write_file", disk_full)
    with caplog.at_level(logging.WARNING):
        result = engine.generate(words(30, start=200), SHORT)
    assert result.completion_tokens == SHORT.max_new_tokens or result.finish_reason == "stop"
    assert len(store_warnings(caplog)) == 1
    assert {path.name: path.read_bytes() for path in tmp_path.glob("*.safetensors")} == before
    assert not list(tmp_path.glob(".*.tmp"))
    assert store.stats().write_errors == 1


def test_store_on_read_only_filesystem(tmp_path, monkeypatch, caplog):
    def read_only(directory):
        raise OSError(errno.EROFS, "Read-only file system", str(directory))

    monkeypatch.setattr(persist, "acquire_writer_lock", read_only)
    with caplog.at_level(logging.WARNING):
        engine = engine_on(ReferenceStore(directory=tmp_path))
        result = engine.generate(words(30), SHORT)
    assert result.stored_reference_id is not None
    assert len(store_warnings(caplog)) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores directory permissions")
def test_store_in_read_only_directory(tmp_path, caplog):
    tmp_path.chmod(0o555)
    try:
        with caplog.at_level(logging.WARNING):
            engine = engine_on(ReferenceStore(directory=tmp_path))
            result = engine.generate(words(30), SHORT)
        assert result.completion_tokens > 0
        assert len(store_warnings(caplog)) == 1
        assert list(tmp_path.iterdir()) == []
    finally:
        tmp_path.chmod(0o755)


def test_store_directory_is_a_file(tmp_path):
    path = tmp_path / "store"
    path.write_text("")
    with pytest.raises(ValueError, match="not a folder"):
        engine_on(ReferenceStore(directory=path))


def test_store_of_another_model_rejected():
    store = ReferenceStore(fingerprint="another-model")
    with pytest.raises(ValueError, match="another-model"):
        engine_on(store)


# ----------------------------------------------------------------- model folders


def test_model_folder_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SemShareEngine.from_pretrained(str(tmp_path / "missing"), device="cpu")


def test_model_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match="not a transformers model folder"):
        SemShareEngine.from_pretrained(str(tmp_path), device="cpu")


def test_model_folder_not_causal_lm(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="'bert'.*not supported"):
        SemShareEngine.from_pretrained(str(tmp_path), device="cpu")


def test_model_folder_without_weights(tmp_path):
    tiny_model().config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="Could not load a causal LM"):
        SemShareEngine.from_pretrained(str(tmp_path), device="cpu")


def test_model_folder_with_invalid_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        SemShareEngine.from_pretrained(str(tmp_path), device="cpu")


def test_model_folder_without_tokenizer(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=str(tmp_path)):
        SemShareEngine.from_pretrained(str(tmp_path), device="cpu")


# ----------------------------------------------------------------- concurrency and eviction


def test_converted_gguf_shared_across_copies(tmp_path):
    from semshare_core.model import _content_key

    data = bytes(range(256)) * 20_000
    first, second, other = tmp_path / "a.gguf", tmp_path / "venv2" / "a.gguf", tmp_path / "b.gguf"
    second.parent.mkdir()
    first.write_bytes(data)
    second.write_bytes(data)
    other.write_bytes(data[:-1] + b"x")

    assert _content_key(first) == _content_key(second)
    assert _content_key(first) != _content_key(other)


def test_same_prompt_twice_at_once():
    engine = tiny_engine("llama", TINY_REUSE)
    prompt = words(40)
    barrier = threading.Barrier(2)
    results = [None, None]

    def run(index):
        barrier.wait()
        results[index] = engine.generate(prompt, SHORT)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    assert results[0].text == results[1].text
    assert len(engine.store) == 1
    stats = engine.store.stats()
    assert stats.added - stats.replaced == 1
    assert stats.hits + stats.misses == 2


def test_reference_evicted_during_stream():
    engine = tiny_engine("llama", TINY_REUSE)
    engine.generate(words(40), SHORT)
    prompt = words(40) + " w300 w301"
    expected = engine.generate(prompt, GenerationConfig(max_new_tokens=8), store=False)
    assert expected.reference_id is not None

    stream = engine.stream(prompt, GenerationConfig(max_new_tokens=8), store=False)
    pieces = [next(stream)]  # the prefill has borrowed the reference
    engine.store.clear()
    pieces.extend(stream)
    assert "".join(pieces) == expected.text
    assert stream.result.reference_id == expected.reference_id


def test_reference_evicted_before_load(tmp_path):
    store = ReferenceStore(directory=tmp_path)
    engine = engine_on(store)
    engine.generate(words(40), SHORT)
    store.close()

    reopened = ReferenceStore(directory=tmp_path)
    engine = engine_on(reopened)
    find = reopened.find

    def find_then_evict(*args, **kwargs):
        candidates = find(*args, **kwargs)
        for candidate in candidates:
            reopened.remove(candidate.entry.id)  # another request evicts it before the K/V load
        return candidates

    reopened.find = find_then_evict
    prompt = words(40) + " w300 w301"
    result = engine.generate(prompt, SHORT, store=False)
    assert result.reference_id is None
    assert "evicted" in result.fallback_reason
    assert result.completion_tokens == SHORT.max_new_tokens or result.finish_reason == "stop"
    assert engine.generate(prompt, SHORT, store=False).text == result.text


@pytest.mark.parametrize(
    "messages, error, match",
    [
        ([], ValueError, "messages is empty"),
        ("hello", TypeError, "messages must be a list of dicts"),
        (["hello"], TypeError, r"messages\[0\] must be a dict"),
        ([{"content": "hello"}], ValueError, r"messages\[0\] is missing a 'role'"),
        ([{"role": "user", "content": "hi"}, {"role": "user"}], ValueError, r"messages\[1\] \(user\) is missing 'content'"),
    ],
    ids=["empty", "string", "not-a-dict", "no-role", "no-content"],
)
def test_invalid_chat_messages(engine, messages, error, match):
    with pytest.raises(error, match=match):
        engine.apply_chat_template(messages)


def test_assistant_tool_call_without_content_accepted(default_engine):
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 1}}}
    messages = [{"role": "user", "content": "add"}, {"role": "assistant", "content": None, "tool_calls": [call]}]
    without_key = [messages[0], {"role": "assistant", "tool_calls": [call]}]
    empty = [messages[0], {"role": "assistant", "content": "", "tool_calls": [call]}]

    assert default_engine.apply_chat_template(messages) == default_engine.apply_chat_template(empty)
    assert default_engine.apply_chat_template(without_key) == default_engine.apply_chat_template(empty)


def test_tool_calls_on_user_message_rejected(engine):
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 1}}}
    with pytest.raises(ValueError, match=r"messages\[0\] \(user\) has tool_calls"):
        engine.apply_chat_template([{"role": "user", "content": None, "tool_calls": [call]}])


def test_stop_must_be_strings():
    with pytest.raises(TypeError, match="stop must be a string or a list of strings"):
        GenerationConfig(stop=5)


def test_reuse_flags_must_be_bool():
    with pytest.raises(TypeError, match="enabled must be True or False"):
        ReuseConfig(enabled="yes")


def test_tiny_temperature_samples_greedily():
    sampler = Sampler(GenerationConfig(temperature=1e-45, seed=1))
    assert sampler(torch.tensor([1.0, 3.0, 2.0])) == 1
