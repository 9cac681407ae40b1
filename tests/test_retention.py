"""Retention compacts the prompt cache per layer without changing what decoding computes on what it keeps.

On tiny random float32 models: keeping every token reproduces decoding without
retention, and decoding from a compacted cache equals decoding from the full cache
with the dropped tokens masked out, computed here by plain matmul attention.
"""

from __future__ import annotations

import math

import pytest
import torch

from semshare_core.config import GenerationConfig, RetentionConfig, ReuseConfig
from semshare_core.forward import KVCache, TransformerRunner, apply_rope
from semshare_core.retention import compact_cache, pool_scores, retain, select_kept

from .conftest import ARCHITECTURES, tiny_engine, tiny_model

TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}
WINDOW = 40  # shorter than the 80-token prompt, longer than the kept tail
MODELS = [(name, {}) for name in ARCHITECTURES] + [
    ("mistral", {"sliding_window": WINDOW}),
    (
        "qwen2",
        {
            "use_sliding_window": True,
            "sliding_window": WINDOW,
            "layer_types": ["full_attention", "sliding_attention", "full_attention", "sliding_attention"],
        },
    ),
]
MODEL_IDS = list(ARCHITECTURES) + ["mistral-sliding", "qwen2-sliding"]


def _prompt(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 500, (length,), generator=torch.Generator().manual_seed(seed))


def _prefill(runner: TransformerRunner, ids: torch.Tensor, extra: int, observe: int):
    cache = runner.new_cache(ids.shape[0] + extra)
    logits, stats = runner.prefill(ids, cache, observe=observe)
    return logits, cache, stats


def _decode(runner: TransformerRunner, cache: KVCache, tokens: list[int]) -> list[torch.Tensor]:
    return [runner.decode_step(token, cache) for token in tokens]


# ----------------------------------------------------------------------------- config


def test_layer_shares_mean_equals_ratio():
    for ratio in (0.1, 0.3, 0.5, 0.8, 1.0):
        for depth_decay in (0.05, 0.25, 0.5, 1.0):
            shares = RetentionConfig(ratio=ratio, depth_decay=depth_decay).layer_shares(30)
            assert sum(shares) / 30 == pytest.approx(ratio, abs=1e-9)
            assert all(0 < share <= 1 for share in shares)
            assert all(a >= b for a, b in zip(shares, shares[1:]))


def test_layer_shares_decay_and_constant():
    shares = RetentionConfig(ratio=0.4, depth_decay=0.25).layer_shares(8)
    assert shares[-1] / shares[0] == pytest.approx(0.25)
    assert RetentionConfig(ratio=0.4, depth_decay=1.0).layer_shares(8) == pytest.approx([0.4] * 8)
    assert RetentionConfig(ratio=0.7).layer_shares(1) == pytest.approx([0.7])


@pytest.mark.parametrize(
    "settings",
    [
        {"ratio": 0.0},
        {"ratio": 1.5},
        {"depth_decay": 0.0},
        {"window": 0},
        {"sink_tokens": -1},
        {"pool_kernel": 4},
        {"pool_kernel": 0},
    ],
)
def test_retention_config_rejects_invalid(settings):
    with pytest.raises(ValueError):
        RetentionConfig(**settings)


def test_retention_config_rejects_wrong_types():
    with pytest.raises(TypeError):
        RetentionConfig(enabled="yes")
    with pytest.raises(TypeError):
        RetentionConfig(window=2.5)


def test_retention_off_by_default():
    assert RetentionConfig().enabled is False
    assert tiny_engine().retention.enabled is False


# ----------------------------------------------------------------------------- selection


def test_select_kept_sizes_sinks_and_window():
    n_layers, seq_len = 6, 200
    config = RetentionConfig(enabled=True, ratio=0.3, depth_decay=0.2, window=10, sink_tokens=3, pool_kernel=1)
    attention = torch.rand(n_layers, seq_len, generator=torch.Generator().manual_seed(0))
    kept = select_kept(attention, config)
    for layer, (index, share) in enumerate(zip(kept, config.layer_shares(n_layers))):
        assert index.shape[0] == max(math.ceil(share * seq_len), 13), layer
        assert torch.equal(index, index.sort().values)
        assert index.unique().shape[0] == index.shape[0]
        kept_set = set(index.tolist())
        assert set(range(3)) <= kept_set
        assert set(range(seq_len - 10, seq_len)) <= kept_set


def test_select_kept_prefers_high_attention():
    seq_len = 100
    config = RetentionConfig(enabled=True, ratio=0.2, depth_decay=1.0, window=4, sink_tokens=2, pool_kernel=1)
    attention = torch.zeros(2, seq_len)
    important = [10, 20, 30, 40, 50, 55, 60, 65, 70, 75, 80, 85, 90, 91]
    attention[:, important] = 1.0
    kept = select_kept(attention, config)
    for index in kept:
        assert index.shape[0] == 20
        assert set(important) <= set(index.tolist())


def test_pool_scores_spreads_to_neighbours():
    attention = torch.zeros(1, 20)
    attention[0, 10] = 1.0
    pooled = pool_scores(attention, 5)
    assert pooled[0, 8:13].tolist() == [1.0] * 5
    assert pooled[0, 7] == 0
    assert pooled[0, 13] == 0
    assert torch.equal(pool_scores(attention, 1), attention)


def test_select_kept_short_prompt_keeps_all():
    config = RetentionConfig(enabled=True, ratio=0.1, window=32, sink_tokens=4)
    kept = select_kept(torch.rand(3, 20), config)
    for index in kept:
        assert index.tolist() == list(range(20))


# ----------------------------------------------------------------------------- observed attention


@pytest.mark.parametrize("architecture", ["llama", "qwen3"])
def test_observed_attention_matches_transformers(architecture):
    model = tiny_model(architecture)
    model.set_attn_implementation("eager")
    runner = TransformerRunner(model)
    ids = _prompt(40)
    observe = 8
    _, _, stats = _prefill(runner, ids, 0, observe)
    with torch.no_grad():
        output = model(ids[None], output_attentions=True)
    for layer, weights in enumerate(output.attentions):
        # weights: (1, n_heads, seq_len, seq_len); sum over heads and the last `observe` queries
        expected = weights[0, :, -observe:, :].sum(dim=(0, 1))
        torch.testing.assert_close(stats.observed_attention[layer], expected, **TOLERANCE)
    assert stats.observed_attention.sum(dim=1).tolist() == pytest.approx([observe * model.config.num_attention_heads] * 4)


def test_observed_attention_same_with_partial_prefill():
    engine = tiny_engine("llama")
    ids = _prompt(64).tolist()
    engine.generate(ids, GenerationConfig(max_new_tokens=0))
    retention = RetentionConfig(enabled=True, window=8)
    everything = ReuseConfig(
        min_prompt_tokens=16, similarity_threshold=0.1, recompute_ratio=1.0, recompute_decay=1.0, min_recompute_ratio=1.0
    )
    edited = ids[:20] + _prompt(6, seed=5).tolist() + ids[26:]
    recorded = []
    original = engine.runner.prefill

    def recording_prefill(*args, **kwargs):
        logits, stats = original(*args, **kwargs)
        recorded.append(stats.observed_attention)
        return logits, stats

    engine.runner.prefill = recording_prefill
    outcome = engine.prefill(edited, reuse=everything, retention=retention)
    engine.prefill(edited, reuse=ReuseConfig(enabled=False), retention=retention)
    assert outcome.reference_id is not None
    torch.testing.assert_close(recorded[0], recorded[1], **TOLERANCE)


def test_partial_prefill_recomputes_observed_tokens():
    engine = tiny_engine("llama")
    ids = _prompt(96).tolist()
    engine.generate(ids, GenerationConfig(max_new_tokens=0))
    edited = ids[:40] + _prompt(8, seed=3).tolist() + ids[48:]
    reuse = ReuseConfig(min_prompt_tokens=16, similarity_threshold=0.1, recompute_ratio=0.1, min_recompute_ratio=0.05)
    outcome = engine.prefill(edited, reuse=reuse, retention=RetentionConfig(enabled=True, window=16))
    assert outcome.reference_id is not None
    assert outcome.cache.layer_lengths is not None
    assert outcome.recomputed_share < 1.0


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize(("architecture", "overrides"), MODELS, ids=MODEL_IDS)
def test_full_share_decoding_equals_no_retention(architecture, overrides):
    runner = TransformerRunner(tiny_model(architecture, **overrides))
    ids = _prompt(48)
    tokens = _prompt(10, seed=1).tolist()
    logits, cache, stats = _prefill(runner, ids, len(tokens), observe=8)
    config = RetentionConfig(enabled=True, ratio=1.0, window=8)
    compacted = retain(cache, stats.observed_attention, config)
    assert compacted.layer_lengths == [48] * runner.n_layers
    assert compacted.kv_bytes == cache.kv_bytes
    expected = _decode(runner, cache, tokens)
    actual = _decode(runner, compacted, tokens)
    for step, (want, got) in enumerate(zip(expected, actual)):
        torch.testing.assert_close(got, want, **TOLERANCE, msg=f"step {step}")
    assert compacted.length == cache.length == 58
    assert compacted.layer_lengths == [58] * runner.n_layers


def _masked_reference_decode(
    runner: TransformerRunner, cache: KVCache, kept: list[torch.Tensor], tokens: list[int]
) -> list[torch.Tensor]:
    """Decode from a full cache, masking every prompt position a layer dropped, with matmul attention."""
    prompt_len = cache.length
    group = runner.n_heads // runner.n_kv_heads
    all_logits = []
    for step, token in enumerate(tokens):
        pos = prompt_len + step
        cos, sin = runner.rope(torch.tensor([pos]))
        hidden = runner.embed_tokens(torch.tensor([token]))  # (1, hidden)
        for index, layer in enumerate(runner.layers):
            x = layer.input_layernorm(hidden)
            k_new, v_new = runner.project_kv(layer, x)  # (n_kv_heads, 1, head_dim)
            cache.k[index, :, pos : pos + 1] = apply_rope(k_new, cos, sin)
            cache.v[index, :, pos : pos + 1] = v_new
            visible = torch.zeros(pos + 1, dtype=torch.bool)
            visible[kept[index]] = True
            visible[prompt_len:] = True
            window = runner.windows[index]
            if window is not None:
                visible[: max(0, pos + 1 - window)] = False
            q = apply_rope(runner.project_q(layer, x), cos, sin)  # (n_heads, 1, head_dim)
            keys = cache.k[index, :, : pos + 1].repeat_interleave(group, dim=0)  # (n_heads, pos + 1, head_dim)
            values = cache.v[index, :, : pos + 1].repeat_interleave(group, dim=0)
            scores = (q @ keys.transpose(1, 2)) * runner.scaling  # (n_heads, 1, pos + 1)
            weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
            out = (weights @ values).transpose(0, 1).reshape(1, -1)  # (1, n_heads * head_dim)
            hidden = hidden + layer.self_attn.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        all_logits.append(runner.logits(hidden[0]))
    return all_logits


@pytest.mark.parametrize(("architecture", "overrides"), MODELS, ids=MODEL_IDS)
def test_compacted_decoding_equals_masked_reference(architecture, overrides):
    runner = TransformerRunner(tiny_model(architecture, **overrides))
    ids = _prompt(80, seed=2)
    tokens = _prompt(12, seed=3).tolist()
    _, cache, stats = _prefill(runner, ids, len(tokens), observe=8)
    config = RetentionConfig(enabled=True, ratio=0.4, depth_decay=0.3, window=8, sink_tokens=2, pool_kernel=3)
    kept = select_kept(stats.observed_attention, config)
    compacted = compact_cache(cache, kept)
    assert [int(i.shape[0]) for i in kept] == compacted.layer_lengths
    assert compacted.layer_lengths[0] > compacted.layer_lengths[-1]
    assert compacted.kv_bytes < cache.kv_bytes

    with torch.inference_mode():
        expected = _masked_reference_decode(runner, cache, kept, tokens)
    actual = _decode(runner, compacted, tokens)
    for step, (want, got) in enumerate(zip(expected, actual)):
        torch.testing.assert_close(got, want, **TOLERANCE, msg=f"step {step}")
    for layer, index in enumerate(kept):
        rows = int(index.shape[0])
        assert compacted.positions[layer][:rows].tolist() == index.tolist()
        assert compacted.positions[layer][rows : rows + len(tokens)].tolist() == list(range(80, 92))


def test_compacted_cache_keeps_rows_after_rope():
    runner = TransformerRunner(tiny_model("llama"))
    _, cache, stats = _prefill(runner, _prompt(50), 4, observe=6)
    kept = select_kept(stats.observed_attention, RetentionConfig(enabled=True, ratio=0.5, window=6))
    compacted = compact_cache(cache, kept)
    for layer, index in enumerate(kept):
        rows = int(index.shape[0])
        torch.testing.assert_close(compacted.k[layer][:, :rows], cache.k[layer][:, index], rtol=0, atol=0)
        torch.testing.assert_close(compacted.v[layer][:, :rows], cache.v[layer][:, index], rtol=0, atol=0)
        torch.testing.assert_close(compacted.k_pre[layer][:, :rows], cache.k_pre[layer][:, index], rtol=0, atol=0)
    assert compacted.capacity == 54


def test_compacted_cache_full_raises():
    runner = TransformerRunner(tiny_model("llama"))
    _, cache, stats = _prefill(runner, _prompt(40), 1, observe=4)
    compacted = retain(cache, stats.observed_attention, RetentionConfig(enabled=True, ratio=0.5, window=4))
    runner.decode_step(5, compacted)
    with pytest.raises(ValueError, match="full"):
        runner.decode_step(6, compacted)


def test_compact_rejects_bad_input():
    runner = TransformerRunner(tiny_model("llama"))
    _, cache, stats = _prefill(runner, _prompt(40), 0, observe=4)
    config = RetentionConfig(enabled=True, ratio=0.5, window=4)
    with pytest.raises(ValueError, match="observed attention"):
        retain(cache, None, config)
    with pytest.raises(ValueError, match="observed attention"):
        retain(cache, stats.observed_attention[:, :10], config)
    with pytest.raises(ValueError, match="index tensors"):
        compact_cache(cache, select_kept(stats.observed_attention, config)[:2])
    compacted = retain(cache, stats.observed_attention, config)
    with pytest.raises(ValueError, match="already compacted"):
        retain(compacted, stats.observed_attention, config)


# ----------------------------------------------------------------------------- engine


def test_engine_reports_kv_bytes_kept():
    engine = tiny_engine("llama")
    ids = _prompt(120).tolist()
    plain = engine.generate(ids, GenerationConfig(max_new_tokens=4), store=False)
    assert plain.kv_bytes == plain.full_kv_bytes > 0
    retention = RetentionConfig(enabled=True, ratio=0.4, window=8)
    result = engine.generate(ids, GenerationConfig(max_new_tokens=4), store=False, retention=retention)
    assert result.full_kv_bytes == plain.full_kv_bytes
    assert result.kv_bytes < 0.5 * result.full_kv_bytes
    assert result.completion_tokens == 4


def test_engine_stores_full_kv_before_compacting():
    engine = tiny_engine("llama")
    ids = _prompt(100).tolist()
    retention = RetentionConfig(enabled=True, ratio=0.3, window=8)
    result = engine.generate(ids, GenerationConfig(max_new_tokens=5), retention=retention)
    assert result.stored_reference_id is not None
    entry = engine.store.get(result.stored_reference_id)
    assert entry.token_ids.tolist() == ids
    _, full_cache, _ = engine.full_prefill(ids)
    torch.testing.assert_close(entry.k_pre, full_cache.k_pre, **TOLERANCE)
    torch.testing.assert_close(entry.v, full_cache.v, **TOLERANCE)


def test_engine_retention_with_reuse_decodes():
    engine = tiny_engine("qwen3")
    ids = _prompt(120).tolist()
    engine.generate(ids, GenerationConfig(max_new_tokens=0))
    edited = ids[:50] + _prompt(10, seed=9).tolist() + ids[60:]
    retention = RetentionConfig(enabled=True, ratio=0.5, window=8)
    result = engine.generate(edited, GenerationConfig(max_new_tokens=6), retention=retention, store=False)
    assert result.reference_id is not None
    assert result.kv_bytes < result.full_kv_bytes
    assert result.completion_tokens + (result.finish_reason == "stop") >= 1


def test_engine_retention_share_one_same_greedy_output():
    engine = tiny_engine("mistral")
    ids = _prompt(64).tolist()
    greedy = GenerationConfig(max_new_tokens=12)
    plain = engine.generate(ids, greedy, store=False)
    kept_all = engine.generate(ids, greedy, store=False, retention=RetentionConfig(enabled=True, ratio=1.0))
    assert kept_all.token_ids == plain.token_ids
    assert kept_all.kv_bytes == plain.kv_bytes


def test_engine_rejects_wrong_retention_type():
    engine = tiny_engine("llama")
    with pytest.raises(TypeError, match="retention"):
        engine.generate(_prompt(20).tolist(), retention={"enabled": True})
