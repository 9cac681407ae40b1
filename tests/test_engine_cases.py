"""Engine cases users hit: repeats, reordering, fallbacks, store budget, namespaces, generations, self-check."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

import semshare_core.forward as forward
from semshare_core.config import GenerationConfig, ReuseConfig
from semshare_core.engine import SemShareEngine
from semshare_core.model import LoadedModel
from semshare_core.store import ReferenceStore

from .conftest import ARCHITECTURES, TINY_VOCAB, tiny_engine, tiny_model, tiny_tokenizer

REUSE = ReuseConfig(min_prompt_tokens=16, similarity_threshold=0.1)
NO_NEW_TOKENS = GenerationConfig(max_new_tokens=0)
# Four paragraphs of 16 distinct tokens with ids in 4..243.
PARAGRAPHS = (torch.randperm(240, generator=torch.Generator().manual_seed(0))[:64] + 4).view(4, 16)
DOCUMENT = PARAGRAPHS.flatten().tolist()
REORDERED = PARAGRAPHS[[2, 0, 3, 1]].flatten().tolist()


def _engine_with_store(store: ReferenceStore, reuse: ReuseConfig = REUSE) -> SemShareEngine:
    loaded = LoadedModel(tiny_model("llama"), tiny_tokenizer(), "tiny-llama", torch.device("cpu"), torch.float32, "llama")
    return SemShareEngine(loaded, reuse, store=store)


def _unrelated(count: int, seed: int) -> list[int]:
    """Return ``count`` distinct ids in 300..499, none of which occur in DOCUMENT."""
    return (torch.randperm(200, generator=torch.Generator().manual_seed(seed))[:count] + 300).tolist()


@contextlib.contextmanager
def _count_rows(engine: SemShareEngine):
    """Record how many rows each layer's MLP computes while the block runs."""
    rows: list[int] = []
    hooks = [
        layer.mlp.register_forward_hook(lambda module, inputs, output: rows.append(inputs[0].shape[0]))
        for layer in engine.runner.layers
    ]
    try:
        yield rows
    finally:
        for hook in hooks:
            hook.remove()


def _full_prefill_logits(engine: SemShareEngine, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return engine.loaded.model(torch.tensor([ids])).logits[0, -1]


# ----------------------------------------------------------------- repeats and reordering


def test_same_prompt_twice():
    engine = tiny_engine("llama", reuse=REUSE)
    generation = GenerationConfig(max_new_tokens=4)

    first = engine.generate(DOCUMENT, generation)
    second = engine.generate(DOCUMENT, generation)

    assert first.reference_id is None
    assert second.reference_id == first.stored_reference_id
    assert second.fallback_reason is None
    assert second.prefix_tokens == len(DOCUMENT) - 1, "the last prompt token is always recomputed"
    assert second.token_ids == first.token_ids
    assert second.text == first.text

    outcome = engine.prefill(DOCUMENT)
    assert outcome.logits.shape == (TINY_VOCAB,)
    assert outcome.logits.dtype == torch.float32
    torch.testing.assert_close(outcome.logits, _full_prefill_logits(engine, DOCUMENT), rtol=1e-5, atol=1e-5)


def test_same_prompt_stored_once():
    engine = tiny_engine("llama", reuse=REUSE)
    engine.generate(DOCUMENT, NO_NEW_TOKENS)
    engine.generate(DOCUMENT, NO_NEW_TOKENS)
    assert len(engine.store) == 1


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_reordered_paragraphs_reuse(architecture):
    engine = tiny_engine(architecture, reuse=REUSE)
    stored = engine.generate(DOCUMENT, NO_NEW_TOKENS).stored_reference_id

    result = engine.generate(REORDERED, GenerationConfig(max_new_tokens=3))

    assert result.fallback_reason is None
    assert result.reference_id == stored
    assert result.similarity >= REUSE.similarity_threshold
    assert result.prefix_tokens == 0
    assert 0 < result.reused_tokens < len(REORDERED)
    assert 0 < result.recomputed_share < 1
    assert result.prompt_tokens == len(REORDERED)
    assert result.completion_tokens == len(result.token_ids)
    assert result.generation == 1


# ----------------------------------------------------------------- fallbacks


def test_empty_store_falls_back():
    engine = tiny_engine("llama", reuse=REUSE)

    result = engine.generate(DOCUMENT, GenerationConfig(max_new_tokens=2))

    assert result.fallback_reason == "no stored reference in namespace 'default'"
    assert result.reference_id is None
    assert result.similarity is None
    assert result.reused_tokens == 0
    assert result.recomputed_share == 1.0
    assert result.stored_reference_id is not None


def test_short_prompt_falls_back():
    engine = tiny_engine("llama", reuse=REUSE)
    engine.generate(DOCUMENT, NO_NEW_TOKENS)
    short = DOCUMENT[:10]

    result = engine.generate(short, GenerationConfig(max_new_tokens=2))

    assert result.fallback_reason == "prompt of 10 tokens is below min_prompt_tokens=16"
    assert result.reference_id is None
    assert result.recomputed_share == 1.0


def test_dissimilar_prompt_falls_back():
    engine = tiny_engine("llama", reuse=REUSE)
    engine.generate(DOCUMENT, NO_NEW_TOKENS)

    result = engine.generate(_unrelated(40, 1), GenerationConfig(max_new_tokens=2))

    assert result.reference_id is None
    assert result.fallback_reason is not None
    assert "below similarity_threshold=0.1" in result.fallback_reason
    assert result.similarity is not None
    assert result.similarity < REUSE.similarity_threshold


def test_short_exact_prefix_not_lent():
    engine = tiny_engine("llama", reuse=REUSE)
    stored = engine.generate(DOCUMENT, NO_NEW_TOKENS).stored_reference_id
    short_prefix = DOCUMENT[:32] + _unrelated(200, 4)  # the prefix is 14% of the prompt
    long_prefix = DOCUMENT[:48] + _unrelated(200, 4)  # 19%

    skipped = engine.prefill(short_prefix)
    lent = engine.prefill(long_prefix)
    forced = engine.prefill(
        short_prefix, reuse=dataclasses.replace(REUSE, similarity_threshold=1.0), reference=engine.store.get(stored)
    )

    assert skipped.reference_id is None
    assert skipped.recomputed_share == 1.0
    assert lent.reference_id == stored
    assert lent.prefix_tokens == 48
    assert forced.reference_id is None
    assert forced.fallback_reason.startswith(f"reference {stored} may lend only its exact prefix of 32 tokens")


def test_reuse_disabled_falls_back():
    engine = tiny_engine("llama", reuse=REUSE)
    engine.generate(DOCUMENT, NO_NEW_TOKENS)

    result = engine.generate(DOCUMENT, NO_NEW_TOKENS, reuse=dataclasses.replace(REUSE, enabled=False))

    assert result.fallback_reason == "reuse is disabled"
    assert result.reference_id is None


# ----------------------------------------------------------------- store budget and namespaces


def test_store_evicts_least_recently_used():
    engine = tiny_engine("llama", reuse=REUSE)
    entry_bytes = engine.store.get(engine.generate(DOCUMENT, NO_NEW_TOKENS).stored_reference_id).nbytes
    store = ReferenceStore(max_bytes=int(2.5 * entry_bytes))
    engine = _engine_with_store(store)
    prompts = [PARAGRAPHS[list(order)].flatten().tolist() for order in ([0, 1, 2, 3], [1, 2, 3, 0], [2, 3, 0, 1])]

    first = engine.generate(prompts[0], NO_NEW_TOKENS, reuse=dataclasses.replace(REUSE, enabled=False))
    second = engine.generate(prompts[1], NO_NEW_TOKENS, reuse=dataclasses.replace(REUSE, enabled=False))
    assert len(store) == 2
    # Borrowing from the first entry makes it the most recently used one.
    assert engine.prefill(prompts[0] + _unrelated(4, 2)).reference_id == first.stored_reference_id
    third = engine.generate(prompts[2], NO_NEW_TOKENS, reuse=dataclasses.replace(REUSE, enabled=False))

    assert first.stored_reference_id in store
    assert second.stored_reference_id not in store
    assert third.stored_reference_id in store
    assert store.stats().evictions == 1
    assert store.nbytes <= store.max_bytes


def test_store_rejects_entry_over_budget(caplog):
    store = ReferenceStore(max_bytes=1024)
    engine = _engine_with_store(store)

    with caplog.at_level("DEBUG", logger="semshare_core.store"):
        first = engine.generate(DOCUMENT, NO_NEW_TOKENS)
        second = engine.generate(DOCUMENT, NO_NEW_TOKENS)

    assert first.stored_reference_id is None
    assert len(store) == 0
    assert store.stats().rejected == 2
    levels = [r.levelname for r in caplog.records if "exceeds the store budget" in r.getMessage()]
    assert levels == ["WARNING", "DEBUG"]
    assert second.fallback_reason == "no stored reference in namespace 'default'"


def test_unreadable_reference_gives_way_to_the_next(tmp_path, caplog):
    writer = _engine_with_store(ReferenceStore(directory=tmp_path))
    no_reuse = dataclasses.replace(REUSE, enabled=False)
    damaged_id = writer.generate(DOCUMENT, NO_NEW_TOKENS, reuse=no_reuse).stored_reference_id
    intact_id = writer.generate(REORDERED, NO_NEW_TOKENS, reuse=no_reuse).stored_reference_id
    writer.store.close()
    path = tmp_path / f"{damaged_id}.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    engine = SemShareEngine(writer.loaded, REUSE, store=ReferenceStore(directory=tmp_path), self_check=False)

    with caplog.at_level("WARNING", logger="semshare_core.store"):
        outcome = engine.prefill(DOCUMENT + _unrelated(4, 3))

    assert outcome.fallback_reason is None
    assert outcome.reference_id == intact_id
    assert damaged_id not in engine.store
    assert any(damaged_id in record.getMessage() for record in caplog.records)


def test_namespaces_isolate_references():
    engine = tiny_engine("llama", reuse=REUSE)
    stored = engine.generate(DOCUMENT, NO_NEW_TOKENS, namespace="tenant-a").stored_reference_id

    other = engine.generate(DOCUMENT, NO_NEW_TOKENS, namespace="tenant-b", store=False)
    same = engine.generate(DOCUMENT, NO_NEW_TOKENS, namespace="tenant-a", store=False)

    assert other.reference_id is None
    assert other.fallback_reason == "no stored reference in namespace 'tenant-b'"
    assert same.reference_id == stored
    assert same.fallback_reason is None
    with pytest.raises(ValueError, match="namespace"):
        engine.generate(DOCUMENT, NO_NEW_TOKENS, namespace="")


# ----------------------------------------------------------------- reported share and generations


@pytest.mark.parametrize("prompt_name", ["reordered", "edited-suffix"])
def test_reported_share_is_true_share(prompt_name):
    engine = tiny_engine("llama", reuse=REUSE)
    engine.generate(DOCUMENT, NO_NEW_TOKENS)
    prompt = REORDERED if prompt_name == "reordered" else DOCUMENT[:40] + _unrelated(6, 3) + DOCUMENT[40:]

    with _count_rows(engine) as rows:
        outcome = engine.prefill(prompt)

    seq_len = len(prompt)
    n_new = seq_len - outcome.prefix_tokens
    assert outcome.reference_id is not None
    assert len(rows) == engine.runner.n_layers
    assert rows[0] == n_new, "the first layer runs every token after the exact prefix"
    assert rows == sorted(rows, reverse=True), "recomputed sets are nested, so they cannot grow"
    assert rows[-1] < n_new, "some tokens must keep borrowed K/V"
    assert outcome.recomputed_share == pytest.approx(sum(rows) / (seq_len * engine.runner.n_layers))
    assert outcome.reused_tokens == seq_len - rows[-1]

    # generate reports the same share; one new token means no decode step runs through the MLPs.
    with _count_rows(engine) as rows_of_generate:
        result = engine.generate(prompt, GenerationConfig(max_new_tokens=1), store=False)
    assert rows_of_generate == rows
    assert result.recomputed_share == outcome.recomputed_share


def test_max_reference_generation_limits_fuzzy_reuse():
    engine = tiny_engine("llama", reuse=REUSE)
    original = engine.generate(DOCUMENT, NO_NEW_TOKENS)
    derived = engine.generate(REORDERED, NO_NEW_TOKENS)
    assert original.generation == 0
    assert derived.reference_id == original.stored_reference_id
    assert derived.generation == 1
    assert engine.store.get(derived.stored_reference_id).generation == 1

    # The derived prompt is extended by a paragraph that it already contains elsewhere. The
    # derived entry wins by its exact prefix, and the paragraph could be borrowed fuzzily from it.
    prompt = REORDERED + PARAGRAPHS[1].tolist()
    with _count_rows(engine) as rows:
        limited = engine.prefill(prompt)

    assert limited.reference_id == derived.stored_reference_id
    assert limited.prefix_tokens == len(REORDERED)
    assert limited.generation == 1, "a cache that borrowed only an exact prefix is as old as its reference"
    assert rows == [16] * engine.runner.n_layers, "everything after the exact prefix must be recomputed"
    assert limited.reused_tokens == len(REORDERED)

    with _count_rows(engine) as rows:
        allowed = engine.prefill(prompt, reuse=dataclasses.replace(REUSE, max_reference_generation=2))

    assert allowed.reference_id == derived.stored_reference_id
    assert allowed.generation == 2
    assert rows[-1] < 16
    assert allowed.reused_tokens > len(REORDERED)


def test_old_generation_without_prefix_gives_way():
    engine = tiny_engine("llama", reuse=REUSE)
    original = engine.generate(DOCUMENT, NO_NEW_TOKENS)
    derived = engine.generate(REORDERED, NO_NEW_TOKENS)
    assert derived.generation == 1
    # Closest to the derived entry, but sharing only two leading tokens with it.
    prompt = REORDERED[:2] + _unrelated(1, 5) + REORDERED[3:]

    outcome = engine.prefill(prompt)

    assert outcome.reference_id == original.stored_reference_id
    assert outcome.generation == 1
    assert outcome.fallback_reason is None


# ----------------------------------------------------------------- self-check


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_self_check_passes_healthy_models(architecture):
    engine = tiny_engine(architecture, reuse=REUSE)
    assert engine.disabled_reason is None
    assert engine.self_check() is None


def _drop_first_selected_row(monkeypatch) -> None:
    """Break partial prefill, so that the first row chosen for recomputation keeps its borrowed K/V."""
    select = forward._select
    monkeypatch.setattr(forward, "_select", lambda scores, budget, forced: select(scores, budget, forced)[1:])


def test_self_check_detects_broken_partial_prefill(monkeypatch):
    engine = tiny_engine("llama", reuse=REUSE)
    _drop_first_selected_row(monkeypatch)

    reason = engine.self_check()

    assert reason is not None
    assert "differ from the model's forward pass" in reason


def test_failed_self_check_disables_reuse(monkeypatch):
    _drop_first_selected_row(monkeypatch)
    engine = tiny_engine("llama", reuse=REUSE)
    engine.generate(DOCUMENT, NO_NEW_TOKENS)

    result = engine.generate(DOCUMENT, GenerationConfig(max_new_tokens=2))

    assert engine.disabled_reason is not None
    assert result.reference_id is None
    assert result.fallback_reason == f"reuse is disabled for this model: {engine.disabled_reason}"


def test_self_check_reports_exception(monkeypatch):
    engine = tiny_engine("llama", reuse=REUSE)

    def fail(*args, **kwargs):
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(forward, "_select", fail)
    reason = engine.self_check()

    assert reason == "self-check raised RuntimeError: kernel failed"


def test_self_check_detects_misaligned_mask(monkeypatch):
    engine = tiny_engine("llama", reuse=REUSE)
    causal_mask = forward.causal_mask

    def bottom_right_mask(query_positions, kv_len, window, device):
        """Build the mask as if the queries were the last rows of the sequence, a classic mistake."""
        aligned = torch.arange(kv_len - query_positions.shape[0], kv_len, device=device)
        return causal_mask(aligned, kv_len, window, device)

    monkeypatch.setattr(forward, "causal_mask", bottom_right_mask)

    assert engine.self_check() is not None
