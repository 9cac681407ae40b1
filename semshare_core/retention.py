"""Retention: compress a prompt's KV cache after prefill, keeping fewer tokens in deeper layers.

Each layer keeps the prompt tokens that the last ``window`` prompt tokens attend to
most (summed over heads and over those tokens, then max-pooled over neighbours, as
SnapKV scores them), plus the first ``sink_tokens`` and the last ``window`` tokens.
The share kept falls exponentially with depth (``RetentionConfig.layer_shares``).
Keys are kept after RoPE, so every kept token keeps its true position, and tokens
decoded later get their own true positions (``TransformerRunner.decode_step``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import RetentionConfig
from .forward import KVCache


def pool_scores(attention: torch.Tensor, kernel: int) -> torch.Tensor:
    """Max-pool (n_layers, seq_len) scores over ``kernel`` neighbouring positions (odd, centred)."""
    if kernel == 1:
        return attention
    return F.max_pool1d(attention[:, None, :], kernel, stride=1, padding=kernel // 2)[:, 0, :]


def select_kept(attention: torch.Tensor, config: RetentionConfig) -> list[torch.Tensor]:
    """Choose the prompt positions each layer keeps.

    Args:
        attention: (n_layers, seq_len) attention that the last ``config.window``
            prompt tokens paid to each position (``PrefillStats.observed_attention``).
        config: Shares, window, sinks and pooling.

    Returns:
        Per layer, the sorted int64 positions to keep. Layer l keeps
        ``ceil(share_l * seq_len)`` positions, or the always-kept sinks and window if
        those are more.
    """
    n_layers, seq_len = attention.shape
    scores = pool_scores(attention.float(), config.pool_kernel)
    protected = torch.zeros(seq_len, dtype=torch.bool, device=attention.device)
    protected[: config.sink_tokens] = True
    protected[max(seq_len - config.window, 0) :] = True
    n_protected = int(protected.sum())
    kept = []
    for layer, share in enumerate(config.layer_shares(n_layers)):
        budget = min(seq_len, max(math.ceil(share * seq_len), n_protected))
        layer_scores = scores[layer].masked_fill(protected, float("inf"))
        keep = torch.topk(layer_scores, budget, sorted=False).indices
        kept.append(keep.sort().values)
    return kept


def compact_cache(cache: KVCache, kept: list[torch.Tensor], extra_capacity: int | None = None) -> KVCache:
    """Return a new cache that holds only the ``kept`` rows of each layer of a full ``cache``.

    Args:
        cache: A full cache (one row per position) after prefill.
        kept: Per layer, sorted positions to keep, each below ``cache.length``.
        extra_capacity: Rows left free in every layer for decoded tokens; the
            room ``cache`` has left when None.

    Raises:
        ValueError: ``cache`` is already compacted, or ``kept`` does not give one
            index tensor per layer.
    """
    if cache.layer_lengths is not None:
        raise ValueError("cache is already compacted; compact the full cache that prefill returned")
    if len(kept) != cache.n_layers:
        raise ValueError(f"kept has {len(kept)} index tensors for a cache of {cache.n_layers} layers")
    if extra_capacity is None:
        extra_capacity = cache.capacity - cache.length
    k_pre, k, v, positions = [], [], [], []
    for layer, index in enumerate(kept):
        rows = int(index.shape[0])
        index = index.to(cache.k.device)
        for source, target in ((cache.k_pre, k_pre), (cache.k, k), (cache.v, v)):
            layer_rows = source[layer]  # (n_kv_heads, capacity, head_dim)
            compacted = layer_rows.new_empty(layer_rows.shape[0], rows + extra_capacity, layer_rows.shape[2])
            compacted[:, :rows] = layer_rows.index_select(1, index)
            target.append(compacted)
        layer_positions = torch.empty(rows + extra_capacity, dtype=torch.long, device=index.device)
        layer_positions[:rows] = index
        positions.append(layer_positions)
    return KVCache(
        k_pre, k, v, length=cache.length, layer_lengths=[int(i.shape[0]) for i in kept], positions=positions
    )


def retain(cache: KVCache, attention: torch.Tensor, config: RetentionConfig, extra_capacity: int | None = None) -> KVCache:
    """Compress a full prompt cache with ``config``; see ``select_kept`` and ``compact_cache``.

    Raises:
        ValueError: ``attention`` was not recorded over the whole prompt of ``cache``.
    """
    if attention is None or tuple(attention.shape) != (cache.n_layers, cache.length):
        shape = None if attention is None else tuple(attention.shape)
        raise ValueError(
            f"retention needs the observed attention of every layer over the {cache.length} prompt tokens, "
            f"shape ({cache.n_layers}, {cache.length}), got {shape}; prefill with observe=config.window"
        )
    return compact_cache(cache, select_kept(attention, config), extra_capacity)
