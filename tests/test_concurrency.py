"""Concurrent requests: same greedy outputs as one by one, and a consistent store while storing."""

from __future__ import annotations

import asyncio
import importlib.util
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from semshare_core.config import GenerationConfig, ReuseConfig
from semshare_core.engine import SemShareEngine
from semshare_core.model import LoadedModel
from semshare_core.store import ReferenceStore

from .conftest import tiny_model, tiny_tokenizer
from .test_store_persist import entry_files

N_REQUESTS = 16
GREEDY = GenerationConfig(max_new_tokens=8)
TINY_REUSE = ReuseConfig(min_prompt_tokens=16, similarity_threshold=0.1)


def words(ids) -> str:
    return " ".join(f"w{i}" for i in ids)


def reference_prompts() -> list[str]:
    return [words(range(start, start + 60)) for start in (10, 110, 210, 310)]


def target_prompts() -> list[str]:
    """Sixteen prompts that share long spans with the references, each edited differently."""
    prompts = []
    for index in range(N_REQUESTS):
        start = (10, 110, 210, 310)[index % 4]
        ids = list(range(start, start + 60))
        ids[20 + index : 24 + index] = [480 + index % 20] * 4
        prompts.append(words(ids) + f" w{400 + index}")
    return prompts


def tiny_engine_with(store: ReferenceStore | None = None) -> SemShareEngine:
    loaded = LoadedModel(tiny_model(), tiny_tokenizer(), "tiny-llama", torch.device("cpu"), torch.float32, "llama")
    return SemShareEngine(loaded, TINY_REUSE, store)


@pytest.fixture(scope="module")
def prefilled_engine() -> SemShareEngine:
    engine = tiny_engine_with()
    for prompt in reference_prompts():
        engine.generate(prompt, GREEDY)
    assert len(engine.store) == 4
    return engine


def outcome(result) -> tuple:
    return result.text, result.token_ids, result.reference_id, result.reused_tokens


def test_threads_match_sequential(prefilled_engine):
    engine = prefilled_engine
    prompts = target_prompts()
    before = engine.store.stats()
    sequential = [outcome(engine.generate(p, GREEDY, store=False)) for p in prompts]
    assert sum(1 for result in sequential if result[2] is not None) >= N_REQUESTS // 2

    with ThreadPoolExecutor(max_workers=N_REQUESTS) as pool:
        concurrent = list(pool.map(lambda p: outcome(engine.generate(p, GREEDY, store=False)), prompts))
    assert concurrent == sequential

    after = engine.store.stats()
    assert after.entries == before.entries
    assert after.added == before.added
    assert (after.hits + after.misses) - (before.hits + before.misses) == 2 * N_REQUESTS


def test_asyncio_matches_sequential(prefilled_engine):
    engine = prefilled_engine
    prompts = target_prompts()
    sequential = [outcome(engine.generate(p, GREEDY, store=False)) for p in prompts]

    async def run_all():
        tasks = [asyncio.to_thread(engine.generate, p, GREEDY, store=False) for p in prompts]
        return await asyncio.gather(*tasks)

    concurrent = [outcome(result) for result in asyncio.run(run_all())]
    assert concurrent == sequential


def test_streams_interleaved_match_sequential(prefilled_engine):
    engine = prefilled_engine
    prompts = target_prompts()[:4]
    sequential = [engine.generate(p, GREEDY, store=False).text for p in prompts]
    streams = [engine.stream(p, GREEDY, store=False) for p in prompts]
    pieces = [[] for _ in streams]
    active = set(range(len(streams)))
    while active:
        for index in sorted(active):
            try:
                pieces[index].append(next(streams[index]))
            except StopIteration:
                active.discard(index)
    assert ["".join(p) for p in pieces] == sequential
    assert [s.result.text for s in streams] == sequential


def test_threads_storing_keep_store_consistent(tmp_path):
    store = ReferenceStore(directory=tmp_path)
    engine = tiny_engine_with(store)
    prompts = reference_prompts() + target_prompts()
    prompts += prompts[:4]  # the same prompt twice, at the same time

    with ThreadPoolExecutor(max_workers=N_REQUESTS) as pool:
        results = list(pool.map(lambda p: engine.generate(p, GREEDY), prompts))

    stats = store.stats()
    assert stats.restored + stats.added - stats.replaced - stats.evictions - stats.removed == stats.entries
    assert stats.hits + stats.misses == len(prompts)
    assert stats.write_errors == 0
    stored_ids = {entry.id for entry in store.entries()}
    assert entry_files(tmp_path) == sorted(f"{entry_id}.safetensors" for entry_id in stored_ids)
    assert not list(tmp_path.glob(".*.tmp"))
    returned_ids = {r.stored_reference_id for r in results if r.stored_reference_id is not None}
    assert stored_ids <= returned_ids
    assert stats.added == len(returned_ids)

    # Both copies of a duplicated prompt complete, and the store keeps one entry per token sequence.
    assert all(result.completion_tokens > 0 for result in results)
    token_sets = [tuple(entry.token_ids.tolist()) for entry in store.entries()]
    assert len(token_sets) == len(set(token_sets))

    store.close()
    reopened = ReferenceStore(directory=tmp_path)
    tiny_engine_with(reopened)
    assert {entry.id for entry in reopened.entries()} == stored_ids
    assert reopened.skipped_files == []
    for entry in reopened.entries():
        assert reopened.get(entry.id) is not None


def test_threads_storing_under_small_budget(tmp_path):
    """Eviction races with lookups: every request still completes and the counters balance."""
    probe_engine = tiny_engine_with()
    probe_engine.generate(reference_prompts()[0], GREEDY)
    entry_size = probe_engine.store.stats().bytes
    store = ReferenceStore(max_bytes=entry_size * 3)
    engine = tiny_engine_with(store)
    prompts = reference_prompts() + target_prompts()

    with ThreadPoolExecutor(max_workers=N_REQUESTS) as pool:
        results = list(pool.map(lambda p: engine.generate(p, GREEDY), prompts))

    assert all(len(result.token_ids) == GREEDY.max_new_tokens or result.finish_reason == "stop" for result in results)
    stats = store.stats()
    assert stats.evictions > 0
    assert stats.bytes <= store.max_bytes
    assert stats.added - stats.replaced - stats.evictions - stats.removed == stats.entries
    assert stats.hits + stats.misses == len(prompts)


@pytest.mark.skipif(
    importlib.util.find_spec("semshare_integrations.langchain") is None, reason="LangChain adapter not installed"
)
def test_langchain_batch_matches_sequential(prefilled_engine):
    from semshare_integrations.langchain import SemShareLLM

    llm = SemShareLLM(engine=prefilled_engine, max_tokens=GREEDY.max_new_tokens, store=False, min_prompt_tokens=16)
    prompts = target_prompts()
    sequential = [llm.invoke(p) for p in prompts]
    batched = llm.batch(prompts, config={"max_concurrency": N_REQUESTS})
    assert batched == sequential


@pytest.mark.real_model
def test_default_model_concurrent_greedy(default_engine):
    engine = default_engine
    namespace = "concurrency-test"
    generation = GenerationConfig(max_new_tokens=3)
    reuse = ReuseConfig(min_prompt_tokens=32)
    base = (
        "The city council met on Tuesday to discuss the new budget for public transport. "
        "Members argued about bus routes, tram maintenance and the price of monthly passes. "
    ) * 2
    engine.generate(base + "Summarize the meeting in one sentence.", generation, namespace=namespace, reuse=reuse)
    prompts = [base + f"Question {index}: what did the members say about item {index}?" for index in range(N_REQUESTS)]

    def run_one(prompt):
        return engine.generate(prompt, generation, namespace=namespace, reuse=reuse, store=False)

    sequential = [outcome(run_one(p)) for p in prompts]
    assert all(result[2] is not None for result in sequential)
    with ThreadPoolExecutor(max_workers=N_REQUESTS) as pool:
        threaded = [outcome(result) for result in pool.map(run_one, prompts)]
    assert threaded == sequential

    async def run_all():
        return await asyncio.gather(*(asyncio.to_thread(run_one, p) for p in prompts))

    assert [outcome(result) for result in asyncio.run(run_all())] == sequential
