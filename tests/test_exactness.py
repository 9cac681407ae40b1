"""Partial prefill is exact where it must be: on tiny random float32 models of every architecture.

Whenever every row that borrowing could get wrong is recomputed (all of them, or all
but an exact prefix), the logits and the whole K/V cache must equal a full prefill. The
full prefill itself must equal the transformers forward pass.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

from semshare_core.config import GenerationConfig, ReuseConfig
from semshare_core.engine import SemShareEngine
import semshare_core.forward as forward
from semshare_core.forward import BorrowPlan, TransformerRunner, causal_mask

from .conftest import ARCHITECTURES, tiny_engine, tiny_model

TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}
WINDOW = 8
SLIDING_WINDOW = {
    "mistral": {"sliding_window": WINDOW},
    "qwen2": {
        "use_sliding_window": True,
        "sliding_window": WINDOW,
        "layer_types": ["full_attention", "sliding_attention", "full_attention", "sliding_attention"],
    },
    "qwen3": {
        "use_sliding_window": True,
        "sliding_window": WINDOW,
        "layer_types": ["full_attention", "sliding_attention", "full_attention", "sliding_attention"],
    },
}
# (architecture, config overrides): every architecture as it comes, then with sliding windows.
MODELS = [(name, {}) for name in ARCHITECTURES] + list(SLIDING_WINDOW.items())
MODEL_IDS = list(ARCHITECTURES) + [f"{name}-sliding" for name in SLIDING_WINDOW]

# Four paragraphs of 16 distinct tokens with ids in 4..243. Fresh tokens for edits come from 300..499.
PARAGRAPHS = (torch.randperm(240, generator=torch.Generator().manual_seed(0))[:64] + 4).view(4, 16)
REFERENCE = PARAGRAPHS.flatten().tolist()


@pytest.fixture(autouse=True)
def small_attention_chunks(monkeypatch):
    """Split recomputed rows into chunks of 5, so that these short prompts run the chunked path."""
    monkeypatch.setattr(forward, "MIN_CHUNK_ROWS", 5)


def _fresh(count: int, seed: int) -> list[int]:
    return torch.randint(300, 500, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def _edited() -> list[int]:
    edited = PARAGRAPHS[1].tolist()
    edited[3:7] = _fresh(4, 1)
    return PARAGRAPHS[0].tolist() + edited + _fresh(8, 2) + PARAGRAPHS[3].tolist() + PARAGRAPHS[2].tolist()


# Targets that share tokens with REFERENCE but not its order. Without a common prefix every
# row runs through the plain causal kernel; with one, the scattered-row mask is used.
TARGETS = {
    "reordered": PARAGRAPHS[[2, 0, 3, 1]].flatten().tolist(),
    "reordered-after-prefix": PARAGRAPHS[[0, 2, 1, 3]].flatten().tolist(),
    "edited": _edited(),
}


def _all_recomputed(engine: SemShareEngine) -> ReuseConfig:
    return dataclasses.replace(engine.reuse, recompute_ratio=1.0, recompute_decay=1.0, min_recompute_ratio=1.0)


def _store(engine: SemShareEngine, ids: list[int], max_new_tokens: int = 0) -> str:
    result = engine.generate(ids, GenerationConfig(max_new_tokens=max_new_tokens))
    assert result.stored_reference_id is not None
    return result.stored_reference_id


def _record_prefill_stats(engine: SemShareEngine, monkeypatch) -> list:
    """Wrap the runner's prefill so that each call's ``PrefillStats`` is recorded."""
    recorded = []
    original = engine.runner.prefill

    def prefill(ids, cache, plan=None):
        logits, stats = original(ids, cache, plan)
        recorded.append(stats)
        return logits, stats

    monkeypatch.setattr(engine.runner, "prefill", prefill)
    return recorded


def _assert_equals_full_prefill(engine: SemShareEngine, ids: list[int], outcome) -> None:
    """Check logits and the whole cache of ``outcome`` against a full prefill and against transformers."""
    seq_len = len(ids)
    ids_tensor = torch.tensor(ids)
    full = engine.runner.new_cache(seq_len)
    # Called on the class, so that a recording wrapper on the instance does not count this prefill.
    full_logits, _ = TransformerRunner.prefill(engine.runner, ids_tensor, full)
    with torch.no_grad():
        expected = engine.loaded.model(ids_tensor[None]).logits[0, -1]

    torch.testing.assert_close(full_logits, expected, **TOLERANCE)
    torch.testing.assert_close(outcome.logits, expected, **TOLERANCE)
    torch.testing.assert_close(outcome.cache.k_pre[:, :, :seq_len], full.k_pre, **TOLERANCE)
    torch.testing.assert_close(outcome.cache.k[:, :, :seq_len], full.k, **TOLERANCE)
    torch.testing.assert_close(outcome.cache.v[:, :, :seq_len], full.v, **TOLERANCE)


@pytest.mark.parametrize("target_name", TARGETS)
@pytest.mark.parametrize(("architecture", "overrides"), MODELS, ids=MODEL_IDS)
def test_all_recomputed_equals_full_prefill(architecture, overrides, target_name):
    engine = tiny_engine(architecture, **overrides)
    reference_id = _store(engine, REFERENCE)
    target = TARGETS[target_name]

    outcome = engine.prefill(target, reuse=_all_recomputed(engine))

    assert outcome.fallback_reason is None
    assert outcome.reference_id == reference_id
    assert outcome.generation == 1, "the target must borrow more than an exact prefix"
    assert outcome.match.matched.any()
    _assert_equals_full_prefill(engine, target, outcome)


@pytest.mark.parametrize(("architecture", "overrides"), MODELS, ids=MODEL_IDS)
def test_suffix_only_recomputed_equals_full_prefill(architecture, overrides, monkeypatch):
    engine = tiny_engine(architecture, **overrides)
    reference_id = _store(engine, REFERENCE)
    suffix = _fresh(12, 3)
    target = REFERENCE + suffix
    recorded = _record_prefill_stats(engine, monkeypatch)

    outcome = engine.prefill(target)

    assert outcome.reference_id == reference_id
    assert outcome.prefix_tokens == len(REFERENCE)
    assert len(recorded) == 1
    assert recorded[0].rows_per_layer == [len(suffix)] * engine.runner.n_layers
    assert outcome.recomputed_share == pytest.approx(len(suffix) / len(target))
    _assert_equals_full_prefill(engine, target, outcome)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_suffix_sharing_token_equals_full_prefill(architecture, monkeypatch):
    engine = tiny_engine(architecture)
    _store(engine, REFERENCE)
    suffix = [REFERENCE[20]] + _fresh(11, 3)
    target = REFERENCE + suffix
    recorded = _record_prefill_stats(engine, monkeypatch)

    outcome = engine.prefill(target)

    assert outcome.prefix_tokens == len(REFERENCE)
    assert recorded[0].rows_per_layer == [len(suffix)] * engine.runner.n_layers
    _assert_equals_full_prefill(engine, target, outcome)


@pytest.mark.parametrize(("architecture", "overrides"), MODELS, ids=MODEL_IDS)
def test_next_chat_turn_equals_full_prefill(architecture, overrides, monkeypatch):
    engine = tiny_engine(architecture, **overrides)
    first = engine.generate(REFERENCE, GenerationConfig(max_new_tokens=6))
    stored = engine.store.get(first.stored_reference_id)
    assert stored is not None
    # The cache contains every generated token but the last, whose K/V the next step would write.
    assert len(stored) == len(REFERENCE) + max(len(first.token_ids) - 1, 0)

    history = REFERENCE + first.token_ids
    target = history + _fresh(10, 4)
    recorded = _record_prefill_stats(engine, monkeypatch)
    outcome = engine.prefill(target)

    assert outcome.reference_id == stored.id
    assert outcome.prefix_tokens == len(stored)
    assert recorded[0].rows_per_layer == [len(target) - len(stored)] * engine.runner.n_layers
    _assert_equals_full_prefill(engine, target, outcome)


@pytest.mark.parametrize("architecture", SLIDING_WINDOW)
def test_sliding_window_is_active(architecture):
    windowed = TransformerRunner(tiny_model(architecture, **SLIDING_WINDOW[architecture]))
    plain = tiny_model(architecture)
    ids = torch.tensor(REFERENCE)

    expected_windows = [WINDOW] * 4 if architecture == "mistral" else [None, WINDOW, None, WINDOW]
    assert windowed.windows == expected_windows
    with torch.no_grad():
        windowed_logits = windowed.model(ids[None]).logits[0, -1]
        plain_logits = plain(ids[None]).logits[0, -1]
    assert (windowed_logits - plain_logits).abs().max() > 1e-3, "the window must change the logits at this length"


@pytest.mark.parametrize("window", [None, 1, 5, 200])
def test_causal_mask_matches_transformers(window):
    kv_len = 40
    query_positions = torch.tensor([0, 3, 4, 17, 18, 25, 39])
    mask_function = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
    zero = torch.tensor(0)
    expected = mask_function(zero, zero, query_positions[:, None], torch.arange(kv_len)[None, :])

    mask = causal_mask(query_positions, kv_len, window, torch.device("cpu"))

    assert mask.dtype == torch.bool
    assert mask.shape == (query_positions.shape[0], kv_len)
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("window", [None, 6])
def test_scattered_rows_attention_exact(window):
    """Scattered query rows under ``causal_mask`` get the same attention output as in a full pass."""
    generator = torch.Generator().manual_seed(5)
    seq_len, n_heads, head_dim = 30, 2, 8
    q = torch.randn(n_heads, seq_len, head_dim, generator=generator)
    k = torch.randn(n_heads, seq_len, head_dim, generator=generator)
    v = torch.randn(n_heads, seq_len, head_dim, generator=generator)
    rows = torch.tensor([2, 9, 10, 11, 23, 29])

    full_mask = causal_mask(torch.arange(seq_len), seq_len, window, torch.device("cpu"))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=full_mask)[:, rows]
    mask = causal_mask(rows, seq_len, window, torch.device("cpu"))
    actual = torch.nn.functional.scaled_dot_product_attention(q[:, rows], k, v, attn_mask=mask)

    torch.testing.assert_close(actual, expected, **TOLERANCE)
    if window is None:
        reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)[:, rows]
        torch.testing.assert_close(actual, reference, **TOLERANCE)


@pytest.mark.parametrize("chunk_rows", [2, 5, 128])
@pytest.mark.parametrize("window", [None, 6])
def test_chunked_rows_attention_exact(window, chunk_rows, monkeypatch):
    """Rows attended in chunks, each over the keys up to its last row, equal one full causal pass."""
    monkeypatch.setattr(forward, "MIN_CHUNK_ROWS", chunk_rows)
    runner = TransformerRunner(tiny_model())
    generator = torch.Generator().manual_seed(6)
    seq_len = 40
    q = torch.randn(runner.n_heads, seq_len, runner.head_dim, generator=generator)
    k = torch.randn(runner.n_kv_heads, seq_len, runner.head_dim, generator=generator)
    v = torch.randn(runner.n_kv_heads, seq_len, runner.head_dim, generator=generator)
    rows = torch.tensor([0, 2, 9, 10, 11, 23, 24, 25, 26, 31, 39])

    full_mask = causal_mask(torch.arange(seq_len), seq_len, window, torch.device("cpu"))
    expected = runner.attend(q, k, v, full_mask, False)[:, rows]
    actual = runner.attend_rows(q[:, rows], k, v, rows, window)

    torch.testing.assert_close(actual, expected, **TOLERANCE)


@pytest.mark.parametrize("prefix_len", [0, 20])
@pytest.mark.parametrize(("architecture", "overrides"), MODELS, ids=MODEL_IDS)
def test_scattered_rows_over_exact_kv(architecture, overrides, prefix_len):
    """Recomputing randomly scattered rows over borrowed K/V that are already exact changes nothing.

    This runs the scattered-row mask inside the layer loop, which recomputing every row
    never does, because all rows after a prefix are one contiguous block.
    """
    runner = TransformerRunner(tiny_model(architecture, **overrides))
    ids = torch.tensor(TARGETS["edited"])
    seq_len = ids.shape[0]
    full = runner.new_cache(seq_len)
    expected, _ = runner.prefill(ids, full)

    n_new = seq_len - prefix_len
    forced = torch.zeros(n_new, dtype=torch.bool)
    forced[-1] = True
    ratios = [1.0, 0.6, 0.4, 0.2]
    plan = BorrowPlan(
        prefix_len,
        full.k_pre[:, :, :prefix_len].clone(),
        full.v[:, :, :prefix_len].clone(),
        full.k_pre[:, :, prefix_len:].clone(),
        full.v[:, :, prefix_len:].clone(),
        forced,
        ratios,
        selection="random",
        seed=3,
    )
    cache = runner.new_cache(seq_len)
    logits, stats = runner.prefill(ids, cache, plan)

    assert stats.rows_per_layer == [math.ceil(ratio * n_new) for ratio in ratios]
    torch.testing.assert_close(logits, expected, **TOLERANCE)
    torch.testing.assert_close(cache.k, full.k, **TOLERANCE)
    torch.testing.assert_close(cache.v, full.v, **TOLERANCE)


@pytest.mark.parametrize(("architecture", "overrides"), MODELS, ids=MODEL_IDS)
def test_decode_after_partial_prefill_matches_transformers(architecture, overrides):
    engine = tiny_engine(architecture, **overrides)
    _store(engine, REFERENCE)
    target = TARGETS["edited"]
    new_tokens = 12  # beyond WINDOW, so decoding slides the window too
    model = engine.loaded.model

    outcome = engine.prefill(target, reuse=_all_recomputed(engine), extra_capacity=new_tokens)
    assert outcome.generation == 1
    with torch.no_grad():
        expected = model.generate(
            torch.tensor([target]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
            output_logits=True, return_dict_in_generate=True,
        )
    expected_tokens = expected.sequences[0, len(target):].tolist()
    assert len(expected_tokens) == new_tokens

    logits = outcome.logits
    for step, token in enumerate(expected_tokens):
        torch.testing.assert_close(logits, expected.logits[step][0], **TOLERANCE)
        assert int(logits.argmax()) == token, f"greedy token {step} differs from transformers"
        if step + 1 < new_tokens:
            logits = engine.runner.decode_step(token, outcome.cache)

    # The engine's own generation loop (which stops at EOS) produces the same tokens.
    result = engine.generate(target, GenerationConfig(max_new_tokens=new_tokens), reuse=_all_recomputed(engine), store=False)
    assert result.generation == 1
    eos = 2
    expected_until_eos = expected_tokens[: expected_tokens.index(eos)] if eos in expected_tokens else expected_tokens
    assert result.token_ids == expected_until_eos
