"""Layer-by-layer forward pass over a Hugging Face decoder: full, partial and one-token steps.

The engine runs the model's own modules (norms, projections, rotary embedding, MLP) in
its own loop, so it can recompute scattered rows with an exact causal mask and write
borrowed K/V into the cache. Keys are kept both before RoPE (what references store) and
after RoPE (what attention uses).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# Queries at scattered positions attend in up to this many chunks of rows, each over the
# keys up to its last row only, which skips most of the masked upper triangle.
ATTENTION_CHUNKS = 8
# Chunks have at least this many rows, so short row sets run as one call.
MIN_CHUNK_ROWS = 128


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the last dimension, the pair layout of HF Llama, Mistral and Qwen."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply rotary embedding; ``x`` is (..., seq_len, head_dim), cos and sin (seq_len, head_dim)."""
    return x * cos + rotate_half(x) * sin


def causal_mask(
    query_positions: torch.Tensor, kv_len: int, window: int | None, device: torch.device
) -> torch.Tensor:
    """Build the boolean attention mask of queries at arbitrary positions.

    Each query sees exactly the keys at or before its own position, and only the last
    ``window`` of them when the layer uses sliding-window attention.

    Returns:
        (n_queries, kv_len) bool tensor, True where attention is allowed.
    """
    kv_positions = torch.arange(kv_len, device=device)
    mask = kv_positions[None, :] <= query_positions[:, None]
    if window is not None:
        mask &= kv_positions[None, :] > query_positions[:, None] - window
    return mask


@dataclass
class KVCache:
    """Per-layer keys and values of one sequence, preallocated for prompt and completion.

    A full cache stores (n_layers, n_kv_heads, capacity, head_dim) tensors whose row i
    is position i. A compacted cache (see ``retention.compact_cache``) keeps different
    rows in each layer: ``k_pre``, ``k`` and ``v`` are then lists of per-layer
    (n_kv_heads, layer_capacity, head_dim) tensors, ``layer_lengths`` counts the
    filled rows of each layer and ``positions`` holds each row's true position.
    Indexing ``cache.k[layer]`` gives a layer's (n_kv_heads, rows, head_dim) tensor
    in both forms.
    """

    k_pre: torch.Tensor | list[torch.Tensor]  # keys before RoPE
    k: torch.Tensor | list[torch.Tensor]  # keys after RoPE
    v: torch.Tensor | list[torch.Tensor]
    length: int = 0  # tokens processed so far, so the position of the next token
    layer_lengths: list[int] | None = None  # filled rows per layer; None when every layer has ``length``
    positions: list[torch.Tensor] | None = None  # per layer (layer_capacity,) int64 positions of the rows

    @property
    def n_layers(self) -> int:
        return len(self.k)

    @property
    def capacity(self) -> int:
        """Maximum number of tokens, prompt and completion, that the cache can hold."""
        if self.layer_lengths is None:
            return self.k.shape[2]
        return self.length + min(k.shape[1] - rows for k, rows in zip(self.k, self.layer_lengths))

    def layer_length(self, layer: int) -> int:
        """Return the number of filled rows of ``layer``."""
        return self.length if self.layer_lengths is None else self.layer_lengths[layer]

    @property
    def kv_bytes(self) -> int:
        """Bytes of the filled key (after RoPE) and value rows that attention reads.

        The keys before RoPE that the cache also keeps, for the reference store, are
        not counted: they take as many bytes again as the keys.
        """
        total = 0
        for layer in range(self.n_layers):
            k, v = self.k[layer], self.v[layer]  # (n_kv_heads, rows, head_dim)
            row_bytes = k.shape[0] * k.shape[-1] * k.element_size() + v.shape[0] * v.shape[-1] * v.element_size()
            total += row_bytes * self.layer_length(layer)
        return total


@dataclass
class BorrowPlan:
    """The borrowed K/V of a partial prefill and the rows it must recompute.

    Positions ``[0, prefix_len)`` are an exact common prefix, served as they are. For
    the other ``n = seq_len - prefix_len`` tokens, ``k_pre`` and ``v`` hold the matched
    reference rows in target order, or, when ``source_index`` is set, the whole
    reference, whose rows ``source_index`` picks one layer at a time. Gathering per
    layer straight into the cache avoids one large strided copy of every layer.
    """

    prefix_len: int
    prefix_k_pre: torch.Tensor  # (n_layers, n_kv_heads, prefix_len, head_dim)
    prefix_v: torch.Tensor  # (n_layers, n_kv_heads, prefix_len, head_dim)
    k_pre: torch.Tensor | None  # (n_layers, n_kv_heads, n, head_dim); None borrows only the prefix
    v: torch.Tensor | None  # (n_layers, n_kv_heads, n, head_dim)
    forced: torch.Tensor  # (n,) bool, always recomputed
    layer_ratios: list[float]  # share of the n tokens recomputed per layer; layer 0 is always 1.0
    selection: str = "deviation"
    deviation_layer: int = 1
    reference_positions: torch.Tensor | None = None  # (n,) set only when keys are not re-rotated
    seed: int = 0
    source_index: torch.Tensor | None = None  # (n,) reference row of each target row

    def borrowed(self, layer: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the borrowed keys before RoPE and values of ``layer``, each (n_kv_heads, n, head_dim)."""
        if self.source_index is None:
            return self.k_pre[layer], self.v[layer]
        k_pre = self.k_pre[layer].index_select(1, self.source_index)
        v = self.v[layer].index_select(1, self.source_index)
        return k_pre.to(device, non_blocking=True), v.to(device, non_blocking=True)


@dataclass
class PrefillStats:
    """Rows computed per layer by one prefill."""

    rows_per_layer: list[int] = field(default_factory=list)
    seq_len: int = 0
    # (n_layers, seq_len) float32: attention the last observed prompt tokens paid to each position
    observed_attention: torch.Tensor | None = None

    @property
    def recomputed_share(self) -> float:
        """Share of the token-layer computations of a full prefill that actually ran."""
        total = self.seq_len * len(self.rows_per_layer)
        return sum(self.rows_per_layer) / total if total else 0.0


class TransformerRunner:
    """Runs a Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) layer by layer."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.config = model.config
        decoder = model.model
        self.embed_tokens = decoder.embed_tokens
        self.layers = decoder.layers
        self.norm = decoder.norm
        self.rotary_emb = decoder.rotary_emb
        self.lm_head = model.get_output_embeddings()
        attn = self.layers[0].self_attn
        self.n_layers = len(self.layers)
        self.n_heads = self.config.num_attention_heads
        self.n_kv_heads = self.config.num_key_value_heads
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.windows = [self._layer_window(i) for i in range(self.n_layers)]
        param = next(model.parameters())
        self.device = param.device
        self.dtype = param.dtype

    def _layer_window(self, index: int) -> int | None:
        if self.config.model_type == "mistral":
            return getattr(self.config, "sliding_window", None)
        return getattr(self.layers[index].self_attn, "sliding_window", None)

    def new_cache(self, capacity: int) -> KVCache:
        shape = (self.n_layers, self.n_kv_heads, capacity, self.head_dim)
        return KVCache(
            k_pre=torch.empty(shape, dtype=self.dtype, device=self.device),
            k=torch.empty(shape, dtype=self.dtype, device=self.device),
            v=torch.empty(shape, dtype=self.dtype, device=self.device),
        )

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the model's cos and sin at ``positions``, each (seq_len, head_dim)."""
        probe = torch.empty(1, dtype=self.dtype, device=self.device)
        cos, sin = self.rotary_emb(probe, positions[None, :].to(self.device))
        return cos[0].to(self.dtype), sin[0].to(self.dtype)

    def project_kv(self, layer: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return keys before RoPE and values of ``x`` (seq_len, hidden), each (n_kv_heads, seq_len, head_dim)."""
        attn = layer.self_attn
        seq_len = x.shape[0]
        k = attn.k_proj(x).view(seq_len, self.n_kv_heads, self.head_dim)
        if hasattr(attn, "k_norm"):
            k = attn.k_norm(k)
        v = attn.v_proj(x).view(seq_len, self.n_kv_heads, self.head_dim)
        return k.transpose(0, 1), v.transpose(0, 1)

    def project_q(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Return queries before RoPE, (n_heads, seq_len, head_dim)."""
        attn = layer.self_attn
        q = attn.q_proj(x).view(x.shape[0], self.n_heads, self.head_dim)
        if hasattr(attn, "q_norm"):
            q = attn.q_norm(q)
        return q.transpose(0, 1)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool
    ) -> torch.Tensor:
        """Return SDPA output (n_heads, n_rows, head_dim) of RoPE'd queries over keys and values."""
        # A batch dimension keeps SDPA on its fused CPU kernel; 3-D inputs fall back to the math path.
        return F.scaled_dot_product_attention(
            q[None], k[None], v[None], attn_mask=mask, is_causal=is_causal, scale=self.scaling, enable_gqa=True
        )[0]

    def attend_rows(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, window: int | None
    ) -> torch.Tensor:
        """Return the attention output of queries at sorted ``positions`` under an exact causal mask.

        Rows run in chunks, each over the keys from its window start to its last row,
        because a mask over all keys makes SDPA compute the whole square.
        """
        n_rows = positions.shape[0]
        size = max(MIN_CHUNK_ROWS, math.ceil(n_rows / ATTENTION_CHUNKS))
        bounds = positions.cpu().tolist()
        outputs = []
        for start in range(0, n_rows, size):
            rows = slice(start, min(start + size, n_rows))
            end = bounds[rows.stop - 1] + 1
            begin = 0 if window is None else max(0, bounds[start] - window + 1)
            mask = causal_mask(positions[rows], end, window, positions.device)[:, begin:]
            outputs.append(self.attend(q[:, rows], k[:, begin:end], v[:, begin:end], mask, False))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    def finish_layer(self, layer: torch.nn.Module, hidden: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """Apply the output projection, residuals and MLP to the rows of ``hidden`` (n_rows, hidden)."""
        out = attention.transpose(0, 1).reshape(hidden.shape[0], self.n_heads * self.head_dim)
        hidden = hidden + layer.self_attn.o_proj(out)
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    def logits(self, hidden_row: torch.Tensor) -> torch.Tensor:
        """Return float32 next-token logits (vocab,) of one final hidden state (hidden,)."""
        return self.lm_head(self.norm(hidden_row[None, :]))[0].float()

    @torch.inference_mode()
    def prefill(
        self, ids: torch.Tensor, cache: KVCache, plan: BorrowPlan | None = None, observe: int = 0
    ) -> tuple[torch.Tensor, PrefillStats]:
        """Fill ``cache`` with the prompt ``ids`` (seq_len,) and return the last token's logits.

        Without a plan every token runs through every layer. With a plan the prefix is
        copied and every other token runs through the first layer. Later layers
        recompute a nested, shrinking set of tokens chosen by KV deviation, and all
        other rows keep the borrowed K/V.

        With ``observe`` > 0, ``stats.observed_attention`` records per layer the
        attention that the last ``observe`` tokens pay to every position, summed over
        heads and over those tokens. A plan must then force those tokens in every layer.
        """
        seq_len = ids.shape[0]
        if seq_len > cache.capacity:
            raise ValueError(f"prompt of {seq_len} tokens does not fit a cache of {cache.capacity}")
        prefix_len = plan.prefix_len if plan is not None else 0
        n_new = seq_len - prefix_len
        assert n_new >= 1, "the last token is always recomputed"
        device = self.device
        positions = torch.arange(seq_len, device=device)
        cos, sin = self.rope(positions)  # (seq_len, head_dim)
        stats = PrefillStats(seq_len=seq_len)
        if observe:
            stats.observed_attention = torch.zeros(self.n_layers, seq_len, dtype=torch.float32, device=device)

        if plan is not None and prefix_len:
            cache.k_pre[:, :, :prefix_len] = plan.prefix_k_pre
            cache.v[:, :, :prefix_len] = plan.prefix_v
        borrowing = plan is not None and plan.k_pre is not None
        borrowed_cos_sin = None
        if borrowing and plan.reference_positions is not None:
            borrowed_cos_sin = self.rope(plan.reference_positions.to(device))

        active = positions[prefix_len:]  # positions of the rows computed at this layer
        hidden = self.embed_tokens(ids[prefix_len:].to(device))  # (n_active, hidden)
        ranking = torch.empty(0, device=device)
        generator = torch.Generator(device="cpu").manual_seed(plan.seed) if plan is not None else None
        for index, layer in enumerate(self.layers):
            x = layer.input_layernorm(hidden)
            k_new, v_new = self.project_kv(layer, x)  # (n_kv_heads, n_active, head_dim)
            if borrowing:
                borrowed_k_pre, borrowed_v = plan.borrowed(index, device)
                cache.k_pre[index, :, prefix_len:seq_len] = borrowed_k_pre
                cache.v[index, :, prefix_len:seq_len] = borrowed_v
            cache.k_pre[index, :, active] = k_new
            cache.v[index, :, active] = v_new

            fresh_rows = active
            if borrowing and (index == plan.deviation_layer or index >= 2):
                borrowed = (borrowed_k_pre, borrowed_v)
                ranking = self._score(plan, borrowed, active - prefix_len, k_new, v_new, generator)
            if borrowing and index >= 1:
                budget = math.ceil(plan.layer_ratios[index] * n_new)
                keep = _select(ranking, budget, plan.forced[active - prefix_len])
                active, hidden, x = active[keep], hidden[keep], x[keep]
                ranking = ranking[keep]

            stats.rows_per_layer.append(int(active.shape[0]))
            k_all = apply_rope(cache.k_pre[index, :, :seq_len], cos, sin)  # (n_kv_heads, seq_len, head_dim)
            if borrowed_cos_sin is not None:
                borrowed = apply_rope(borrowed_k_pre, *borrowed_cos_sin)
                fresh = k_all[:, prefix_len:].clone()
                k_all[:, prefix_len:] = borrowed
                k_all[:, fresh_rows] = fresh[:, fresh_rows - prefix_len]
            cache.k[index, :, :seq_len] = k_all
            q = apply_rope(self.project_q(layer, x), cos[active], sin[active])  # (n_heads, n_active, head_dim)
            if observe:
                stats.observed_attention[index] = self._observed_attention(index, q, active, k_all, observe)
            window = self.windows[index]
            values = cache.v[index, :, :seq_len]
            if prefix_len == 0 and active.shape[0] == seq_len and window is None:
                attention = self.attend(q, k_all, values, None, True)
            else:
                attention = self.attend_rows(q, k_all, values, active, window)
            hidden = self.finish_layer(layer, hidden, attention)

        cache.length = seq_len
        assert int(active[-1]) == seq_len - 1, "the last token must be recomputed in every layer"
        return self.logits(hidden[-1]), stats

    def _score(
        self, plan: BorrowPlan, borrowed: tuple[torch.Tensor, torch.Tensor], rows: torch.Tensor, k_new, v_new, generator
    ) -> torch.Tensor:
        """Rank rows for recomputation: larger scores are recomputed first."""
        if plan.selection == "random":
            return torch.rand(rows.shape[0], generator=generator).to(self.device)
        k_old = borrowed[0][:, rows]  # (n_kv_heads, n_rows, head_dim)
        v_old = borrowed[1][:, rows]
        dk = (k_new - k_old).float().pow(2).sum(dim=(0, 2)).sqrt()  # (n_rows,)
        dv = (v_new - v_old).float().pow(2).sum(dim=(0, 2)).sqrt()
        k_scale = k_new.float().pow(2).sum(dim=(0, 2)).sqrt().mean().clamp_min(1e-6)
        v_scale = v_new.float().pow(2).sum(dim=(0, 2)).sqrt().mean().clamp_min(1e-6)
        return dk / k_scale + dv / v_scale

    def _observed_attention(
        self, index: int, q: torch.Tensor, active: torch.Tensor, k_all: torch.Tensor, observe: int
    ) -> torch.Tensor:
        """Return the attention of the last ``observe`` tokens to each position, summed, (seq_len,) float32.

        ``q`` (n_heads, n_active, head_dim) holds the RoPE'd queries of the rows at
        ``active``, and ``k_all`` (n_kv_heads, seq_len, head_dim) the layer's keys.
        """
        seq_len = k_all.shape[1]
        rows = active >= seq_len - observe
        n_obs = min(observe, seq_len)
        assert int(rows.sum()) == n_obs, "the observed tokens must be computed in every layer"
        group = self.n_heads // self.n_kv_heads
        # Query head h reads key head h // group, so each key head serves `group` consecutive query heads.
        q_obs = q[:, rows].float().reshape(self.n_kv_heads, group * n_obs, self.head_dim)
        scores = q_obs @ k_all.float().transpose(1, 2) * self.scaling  # (n_kv_heads, group * n_obs, seq_len)
        mask = causal_mask(active[rows], seq_len, self.windows[index], q.device).repeat(group, 1)
        scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, dim=-1).sum(dim=(0, 1))

    @torch.inference_mode()
    def decode_step(self, token_id: int, cache: KVCache) -> torch.Tensor:
        """Append one token to ``cache`` and return its next-token logits (vocab,)."""
        pos = cache.length
        if pos >= cache.capacity:
            raise ValueError(f"cache of {cache.capacity} tokens is full")
        position = torch.tensor([pos], device=self.device)
        cos, sin = self.rope(position)
        hidden = self.embed_tokens(torch.tensor([token_id], device=self.device))  # (1, hidden)
        for index, layer in enumerate(self.layers):
            x = layer.input_layernorm(hidden)
            k_new, v_new = self.project_kv(layer, x)  # (n_kv_heads, 1, head_dim)
            row = cache.layer_length(index)  # equals pos unless retention dropped rows of this layer
            cache.k_pre[index][:, row : row + 1] = k_new
            cache.k[index][:, row : row + 1] = apply_rope(k_new, cos, sin)
            cache.v[index][:, row : row + 1] = v_new
            window = self.windows[index]
            start, mask = 0, None
            if cache.positions is not None:
                cache.positions[index][row] = pos
                if window is not None:
                    mask = cache.positions[index][None, : row + 1] > pos - window  # (1, rows)
            elif window is not None:
                start = max(0, pos + 1 - window)
            q = apply_rope(self.project_q(layer, x), cos, sin)  # (n_heads, 1, head_dim)
            keys = cache.k[index][:, start : row + 1]  # (n_kv_heads, n_keys, head_dim)
            values = cache.v[index][:, start : row + 1]
            hidden = self.finish_layer(layer, hidden, self.attend(q, keys, values, mask, False))
        cache.length = pos + 1
        if cache.layer_lengths is not None:
            cache.layer_lengths = [rows + 1 for rows in cache.layer_lengths]
        return self.logits(hidden[0])


def _select(scores: torch.Tensor, budget: int, forced: torch.Tensor) -> torch.Tensor:
    """Return sorted indices of the ``budget`` highest scores plus every forced row."""
    scores = scores.masked_fill(forced, float("inf"))
    count = min(scores.shape[0], max(budget, int(forced.sum())))
    keep = torch.topk(scores, count, sorted=False).indices
    return keep.sort().values
