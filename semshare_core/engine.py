"""The engine: looks up a similar reference, borrows its KV cache, prefills, decodes and stores."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .config import GenerationConfig, RetentionConfig, ReuseConfig
from .decoding import Sampler, TextAssembler
from .ecache import EmbeddingHasher, lsh_similarity
from .forward import BorrowPlan, KVCache, PrefillStats, TransformerRunner
from .matching import MatchResult, common_prefix_len, match_context, match_cosine, match_lsh, ngram_overlap
from .model import DEFAULT_MODEL, LoadedModel, load_model, resolve_device, resolve_dtype
from .retention import retain
from .store import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_DISK_BYTES,
    DEFAULT_MAX_GPU_BYTES,
    Candidate,
    ReferenceEntry,
    ReferenceStore,
    encoding_key,
)

logger = logging.getLogger(__name__)

# Prefix reuse is exact, so below the similarity threshold a reference still lends its
# exact prefix when that has MIN_EXACT_PREFIX tokens and MIN_PREFIX_SHARE of the prompt.
# A shorter prefix costs more than it saves, because the other rows need masked
# attention: lending 5-10% of a 4,000-token prompt made prefill 5-7% slower on CPU.
MIN_EXACT_PREFIX = 32
MIN_PREFIX_SHARE = 0.15


@dataclass
class PrefillOutcome:
    """The result of one prefill, with how it was computed.

    Attributes:
        logits: (vocab,) float32 next-token logits of the last prompt token.
        cache: K/V of the prompt, with room for the completion.
        ttft_s: Seconds from token ids to logits: lookup, matching, gathering and
            re-rotation of borrowed K/V, and the prefill itself.
        similarity: LSH similarity to the chosen reference, or to the best one found
            when reuse was declined; None when no reference was compared.
        reference_id: The reference borrowed from, None for a full prefill.
        reused_tokens: Tokens whose final-layer K/V came from the reference.
        prefix_tokens: Length of the exact common prefix served as it is.
        recomputed_share: Share of a full prefill's token-layer work that ran.
        fallback_reason: Why a full prefill ran, None when a reference was used.
        generation: Generation of the resulting cache (see ``ReferenceEntry``).
        lookup_s: Seconds spent on the E-cache and the reference lookup.
        match_s: Seconds spent on token matching.
        match: The token alignment, None for a full prefill.
        kv_bytes: Bytes of prompt keys and values that decoding reads from ``cache``
            (``KVCache.kv_bytes``), after retention when it applied.
        full_kv_bytes: The same without retention, for comparison.
        retention_s: Seconds spent compacting the cache; part of ``ttft_s``.
        full_kv: The prompt's keys before RoPE and values before compaction, each
            (n_layers, n_kv_heads, seq_len, head_dim) on the CPU, kept for the
            reference store when retention applied and ``keep_full_kv`` was set.
    """

    logits: torch.Tensor
    cache: KVCache
    ttft_s: float
    similarity: float | None = None
    reference_id: str | None = None
    reused_tokens: int = 0
    prefix_tokens: int = 0
    recomputed_share: float = 1.0
    fallback_reason: str | None = None
    generation: int = 0
    lookup_s: float = 0.0
    match_s: float = 0.0
    match: MatchResult | None = None
    ecache: torch.Tensor | None = None
    codes: np.ndarray | None = None
    kv_bytes: int = 0
    full_kv_bytes: int = 0
    retention_s: float = 0.0
    full_kv: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class GenerationResult:
    """The completion of one prompt, with what reuse did for it."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    reused_tokens: int
    prefix_tokens: int
    recomputed_share: float
    similarity: float | None
    reference_id: str | None
    ttft_s: float
    fallback_reason: str | None
    token_ids: list[int] = field(default_factory=list)
    stored_reference_id: str | None = None
    generation: int = 0
    lookup_s: float = 0.0
    match_s: float = 0.0
    total_s: float = 0.0
    kv_bytes: int = 0  # prompt K/V bytes decoding read, after retention when it applied
    full_kv_bytes: int = 0  # the same without retention

    def reuse_info(self) -> dict:
        """Return the reuse details as a plain dict, for logs and response metadata."""
        return {
            "reference_id": self.reference_id,
            "similarity": self.similarity,
            "reused_tokens": self.reused_tokens,
            "prefix_tokens": self.prefix_tokens,
            "recomputed_share": self.recomputed_share,
            "ttft_s": self.ttft_s,
            "fallback_reason": self.fallback_reason,
        }


class GenerationStream:
    """Iterator over the text pieces of one completion; ``result`` is set once it is exhausted."""

    def __init__(self, pieces: Iterator[str]):
        self._pieces = pieces
        self.result: GenerationResult | None = None

    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)


class SemShareEngine:
    """Serves prompts with KV caches borrowed from semantically similar stored prompts.

    One engine holds one model, its reference store and its settings. Calls from
    several threads are safe: model computation runs under one lock, one step at a
    time, so concurrent streams interleave.

    Args:
        loaded: The model, from ``load_model``.
        reuse: Reuse settings; per-call overrides go to ``generate``.
        store: The reference store; a new in-memory store when None. The engine
            binds it to its model, which opens a persistent store's directory.
        self_check: Verify before enabling reuse that reuse with every token
            recomputed reproduces full prefill's logits.
        retention: KV compression after prefill; off when None. Per-call
            overrides go to ``generate``.
    """

    _shared: dict[tuple, SemShareEngine] = {}
    _shared_lock = threading.Lock()

    def __init__(
        self,
        loaded: LoadedModel,
        reuse: ReuseConfig | None = None,
        store: ReferenceStore | None = None,
        self_check: bool = True,
        retention: RetentionConfig | None = None,
    ):
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.model_name = loaded.name
        self.reuse = reuse or ReuseConfig()
        if retention is not None and not isinstance(retention, RetentionConfig):
            raise TypeError(f"retention must be a RetentionConfig or None, got {type(retention).__name__}")
        self.retention = retention or RetentionConfig()
        self.store = store if store is not None else ReferenceStore(DEFAULT_MAX_BYTES)
        self.runner = TransformerRunner(loaded.model)
        self.hasher = EmbeddingHasher(self.runner, self.reuse)
        gpu_device = self.runner.device if self.runner.device.type == "cuda" else None
        self.store.bind(loaded.fingerprint, encoding_key(self.reuse), gpu_device)
        self._lock = threading.RLock()
        eos = loaded.model.config.eos_token_id
        if isinstance(eos, (list, tuple)):
            self.eos_ids = set(eos)
        else:
            self.eos_ids = set() if eos is None else {eos}
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self.disabled_reason: str | None = None
        if self_check:
            self.disabled_reason = self.self_check()
            if self.disabled_reason:
                logger.warning("Reuse disabled for %s: %s", self.model_name, self.disabled_reason)

    @classmethod
    def from_pretrained(
        cls,
        model: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        reuse: ReuseConfig | None = None,
        max_store_bytes: int = DEFAULT_MAX_BYTES,
        self_check: bool = True,
        store_dir: str | os.PathLike | None = None,
        max_gpu_store_bytes: int = DEFAULT_MAX_GPU_BYTES,
        max_disk_store_bytes: int = DEFAULT_MAX_DISK_BYTES,
        retention: RetentionConfig | None = None,
    ) -> SemShareEngine:
        """Load ``model`` (None for the default SmolLM2-135M-Instruct) and build an engine on it.

        ``store_dir`` persists references there; ``max_store_bytes``,
        ``max_gpu_store_bytes`` and ``max_disk_store_bytes`` are the store's CPU, GPU
        and disk budgets in bytes (see ``ReferenceStore``). ``retention`` sets KV
        compression after prefill (off when None).
        """
        store = ReferenceStore(max_store_bytes, store_dir, max_gpu_store_bytes, max_disk_store_bytes)
        return cls(load_model(model, device, dtype), reuse, store, self_check, retention)

    @classmethod
    def shared(
        cls,
        model: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        store_dir: str | os.PathLike | None = None,
    ) -> SemShareEngine:
        """Return the process-wide engine of a model and store directory, loading it on first use."""
        store_key = os.path.abspath(os.path.expanduser(store_dir)) if store_dir is not None else None
        torch_device = resolve_device(device)
        model_key = None if model in (None, DEFAULT_MODEL) else os.path.abspath(os.path.expanduser(model))
        key = (model_key, str(torch_device), str(resolve_dtype(dtype, torch_device)), store_key)
        with cls._shared_lock:
            engine = cls._shared.get(key)
            if engine is None:
                engine = cls.from_pretrained(model, device, dtype, store_dir=store_dir)
                cls._shared[key] = engine
            return engine

    @property
    def context_window(self) -> int:
        return int(getattr(self.loaded.model.config, "max_position_embeddings", 2048))

    # ----------------------------------------------------------------- prompts

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Tokenize ``prompt`` (text, or token ids passed through) and validate it."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("prompt is empty or whitespace only; pass some text")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(
                    f"prompt contains {prompt[e.start]!r} at index {e.start}, which is not valid Unicode "
                    "(a lone surrogate); decode the input with errors='replace' before passing it"
                ) from e
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        elif isinstance(prompt, (list, tuple, np.ndarray, torch.Tensor)):
            if isinstance(prompt, (np.ndarray, torch.Tensor)) and prompt.ndim != 1:
                raise ValueError(f"token ids must be 1-D, got shape {tuple(prompt.shape)}")
            ids = prompt.tolist() if hasattr(prompt, "tolist") else list(prompt)
            for index, value in enumerate(ids):
                if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                    raise TypeError(f"token ids must be ints; item {index} is {type(value).__name__} {value!r}")
            ids = [int(i) for i in ids]
            vocab = len(self.tokenizer)
            bad = [i for i in ids if not 0 <= i < max(vocab, self.runner.config.vocab_size)]
            if bad:
                raise ValueError(f"token ids out of the vocabulary of {vocab}: {bad[:5]}")
        else:
            raise TypeError(f"prompt must be a str or a sequence of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("prompt has no tokens; pass some text")
        if len(ids) >= self.context_window:
            raise ValueError(
                f"prompt of {len(ids)} tokens does not fit the context window of {self.context_window} tokens "
                f"of {self.model_name}; shorten it by at least {len(ids) - self.context_window + 1} tokens"
            )
        return ids

    def apply_chat_template(self, messages: Sequence[Mapping], tools: list[dict] | None = None) -> list[int]:
        """Render chat ``messages`` with the tokenizer's template and return the token ids.

        Raises:
            ValueError: No messages, or a message without a ``role`` string or without
                ``content`` (an assistant message may carry ``tool_calls`` instead, and only
                an assistant message may carry them).
            TypeError: ``messages`` is not a list of dicts.
        """
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
        if not messages:
            raise ValueError("messages is empty; pass at least one message")
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise TypeError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
            role = message.get("role")
            if not isinstance(role, str) or not role:
                raise ValueError(f"messages[{i}] is missing a 'role' string (got {role!r}); use 'system', 'user' or 'assistant'")
            if message.get("tool_calls") and role != "assistant":
                raise ValueError(f"messages[{i}] ({role}) has tool_calls, which only assistant messages may carry")
            if message.get("content") is None and not message.get("tool_calls"):
                raise ValueError(f"messages[{i}] ({role}) is missing 'content'; pass its text, or '' for an empty turn")
        # Templates read the content of every message, tool-call turns included.
        messages = [m if m.get("content") is not None else {**m, "content": ""} for m in messages]
        kwargs = {"tools": tools} if tools else {}
        rendered = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, **kwargs
        )
        return list(rendered["input_ids"])

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    # ----------------------------------------------------------------- prefill

    def prefill(
        self,
        ids: Sequence[int],
        namespace: str = "default",
        reuse: ReuseConfig | None = None,
        extra_capacity: int = 0,
        reference: ReferenceEntry | None = None,
        retention: RetentionConfig | None = None,
        keep_full_kv: bool = False,
    ) -> PrefillOutcome:
        """Prefill ``ids``, borrowing from the best reference when reuse applies.

        Args:
            ids: Prompt token ids.
            namespace: Only references of this namespace are considered.
            reuse: Settings for this call; the engine's when None.
            extra_capacity: Cache room to leave for generated tokens.
            reference: Borrow from this entry instead of looking one up (benchmarks).
            retention: KV compression for this call; the engine's when None. When it
                applies, the returned cache is compacted after the logits are computed.
            keep_full_kv: With retention, copy the uncompacted prompt K/V to
                ``outcome.full_kv`` for the reference store before compacting.
        """
        reuse = reuse or self.reuse
        retention = retention or self.retention
        observe = retention.window if retention.enabled else 0
        ids_array = np.asarray(ids, dtype=np.int64)
        ids_tensor = torch.from_numpy(ids_array)
        seq_len = ids_array.shape[0]
        with self._lock:
            start = time.perf_counter()
            cache = self.runner.new_cache(seq_len + extra_capacity)
            ecache = self.hasher.ecache(ids_tensor)
            codes = self.hasher.codes(ecache)
            reason, candidate = self._choose_reference(ids_array, codes, namespace, reuse, reference)
            lookup_s = time.perf_counter() - start
            plan = None
            if candidate is not None:
                match_start = time.perf_counter()
                match = self._match(ids_array, ecache, codes, candidate, reuse)
                match_s = time.perf_counter() - match_start
                # A reference chosen below the threshold only for its exact prefix lends
                # only that prefix, and so does one whose prefix leaves a short tail:
                # recomputing that tail costs little and keeps the output exact.
                tail = len(ids_array) - match.prefix_len
                prefix_only = (
                    candidate.similarity < reuse.similarity_threshold
                    or candidate.overlap < reuse.min_ngram_overlap
                    or tail < reuse.min_prompt_tokens
                )
                plan, fuzzy = self._plan(match, candidate.entry, reuse, observe, prefix_only)
                if not fuzzy and match.prefix_len < MIN_PREFIX_SHARE * seq_len:
                    reason = (
                        f"reference {candidate.entry.id} may lend only its exact prefix of {match.prefix_len} tokens, "
                        f"under {MIN_PREFIX_SHARE:.0%} of the prompt, which saves less than it costs",
                        candidate.similarity,
                    )
                    candidate, plan = None, None
            if plan is None:
                logits, stats = self._run_prefill(ids_tensor, cache, None, observe)
                outcome = PrefillOutcome(
                    logits, cache, time.perf_counter() - start,
                    similarity=reason[1] if reason else None,
                    fallback_reason=reason[0] if reason else None,
                    lookup_s=lookup_s, ecache=ecache, codes=codes,
                )
                self._apply_retention(outcome, stats, retention, keep_full_kv)
            else:
                logits, stats = self._run_prefill(ids_tensor, cache, plan, observe)
                entry = candidate.entry
                outcome = PrefillOutcome(
                    logits, cache, time.perf_counter() - start,
                    similarity=candidate.similarity,
                    reference_id=entry.id,
                    reused_tokens=seq_len - stats.rows_per_layer[-1],  # rows the last layer did not recompute
                    prefix_tokens=match.prefix_len,
                    recomputed_share=stats.recomputed_share,
                    generation=entry.generation + 1 if fuzzy else entry.generation,
                    lookup_s=lookup_s, match_s=match_s, match=match, ecache=ecache, codes=codes,
                )
                self._apply_retention(outcome, stats, retention, keep_full_kv)
        self.store.record_use(candidate.entry if candidate is not None else None)
        if outcome.fallback_reason is None:
            logger.info(
                "Prefill of %d tokens borrowed from reference %s (similarity %.2f, exact prefix %d): "
                "%.1f%% recomputed, TTFT %.3fs",
                seq_len, outcome.reference_id, outcome.similarity, outcome.prefix_tokens,
                100 * outcome.recomputed_share, outcome.ttft_s,
            )
        else:
            logger.info("Full prefill of %d tokens in %.3fs: %s", seq_len, outcome.ttft_s, outcome.fallback_reason)
        return outcome

    def _run_prefill(self, ids: torch.Tensor, cache: KVCache, plan: BorrowPlan | None, observe: int):
        if observe:
            return self.runner.prefill(ids, cache, plan, observe=observe)
        return self.runner.prefill(ids, cache, plan)

    def _apply_retention(
        self, outcome: PrefillOutcome, stats: PrefillStats, retention: RetentionConfig, keep_full_kv: bool
    ) -> None:
        """Compact ``outcome.cache`` when retention is enabled, and record the K/V bytes either way."""
        cache = outcome.cache
        outcome.full_kv_bytes = outcome.kv_bytes = cache.kv_bytes
        if not retention.enabled:
            return
        seq_len = cache.length
        if keep_full_kv:
            # The store keeps the uncompacted K/V; this copy replaces the one it would make later.
            outcome.full_kv = (
                cache.k_pre[:, :, :seq_len].to("cpu", copy=True),
                cache.v[:, :, :seq_len].to("cpu", copy=True),
            )
        start = time.perf_counter()
        outcome.cache = retain(cache, stats.observed_attention, retention)
        outcome.retention_s = time.perf_counter() - start
        outcome.ttft_s += outcome.retention_s
        outcome.kv_bytes = outcome.cache.kv_bytes

    def full_prefill(self, ids: Sequence[int], extra_capacity: int = 0) -> tuple[torch.Tensor, KVCache, float]:
        """Run a plain full prefill; return logits, cache and seconds taken (the baseline)."""
        ids_tensor = torch.as_tensor(list(ids), dtype=torch.long)
        with self._lock:
            start = time.perf_counter()
            cache = self.runner.new_cache(len(ids) + extra_capacity)
            logits, _ = self.runner.prefill(ids_tensor, cache)
            return logits, cache, time.perf_counter() - start

    def _choose_reference(self, ids, codes, namespace, reuse, reference):
        """Return ``(fallback, candidate)``: exactly one of them is None.

        ``fallback`` is ``(reason, best_similarity)``.
        """
        seq_len = ids.shape[0]
        if not reuse.enabled:
            return ("reuse is disabled", None), None
        if self.disabled_reason:
            return (f"reuse is disabled for this model: {self.disabled_reason}", None), None
        if seq_len < reuse.min_prompt_tokens:
            return (f"prompt of {seq_len} tokens is below min_prompt_tokens={reuse.min_prompt_tokens}", None), None
        if reference is not None:
            if not reference.is_loaded:
                loaded = self.store.load(reference)
                if loaded is None:
                    return (f"reference {reference.id} is no longer stored", None), None
                reference = loaded
            sim = lsh_similarity(codes, reference.code_sets)
            return None, Candidate(reference, sim, common_prefix_len(ids, reference.token_ids))
        candidates = self.store.find(namespace, ids, codes)
        if not candidates:
            return (f"no stored reference in namespace {namespace!r}", None), None
        candidates = [dataclasses.replace(c, overlap=ngram_overlap(ids, c.entry.token_ids)) for c in candidates]
        # Each choice is ranked by the share of the prompt it can serve. A reference below
        # the thresholds, or too many generations old, lends only its exact prefix, and the
        # new cache inherits the lender's generation, so among equal shares the oldest lends.
        min_prefix = max(MIN_EXACT_PREFIX, MIN_PREFIX_SHARE * seq_len)
        ranked = []
        for c in candidates:
            similar = c.similarity >= reuse.similarity_threshold and c.overlap >= reuse.min_ngram_overlap
            lends_fuzzily = similar and c.entry.generation < reuse.max_reference_generation
            if lends_fuzzily or (similar and c.prefix_len >= min_prefix):
                ranked.append((c.overlap + c.prefix_len / seq_len, -c.entry.generation, c))
            elif c.prefix_len >= min_prefix:
                ranked.append((c.prefix_len / seq_len, -c.entry.generation, c))
        ranked.sort(key=lambda choice: choice[:2], reverse=True)
        # An entry evicted or unreadable before its K/V loads gives way to the next choice.
        unavailable = []
        for _, _, choice in ranked:
            # The loaded entry keeps its K/V even if the store evicts it during this request.
            entry = self.store.load(choice.entry)
            if entry is not None:
                return None, dataclasses.replace(choice, entry=entry)
            unavailable.append(choice)
        if unavailable:
            ids_text = ", ".join(c.entry.id for c in unavailable)
            return (
                f"references {ids_text} were evicted or unreadable before their K/V loaded",
                max(c.similarity for c in unavailable),
            ), None
        best = max(candidates, key=lambda c: c.similarity)
        failed = []
        if best.similarity < reuse.similarity_threshold:
            failed.append(f"similarity {best.similarity:.2f} is below similarity_threshold={reuse.similarity_threshold}")
        if best.overlap < reuse.min_ngram_overlap:
            failed.append(f"4-token overlap {best.overlap:.2f} is below min_ngram_overlap={reuse.min_ngram_overlap}")
        if best.entry.generation >= reuse.max_reference_generation:
            failed.append(
                f"generation {best.entry.generation} is not below max_reference_generation={reuse.max_reference_generation}"
            )
        failed.append(f"its exact prefix of {best.prefix_len} tokens is under {min_prefix:.0f}")
        return (f"best reference {best.entry.id}: " + ", and ".join(failed), best.similarity), None

    def _match(self, ids, ecache, codes, candidate: Candidate, reuse: ReuseConfig) -> MatchResult:
        entry = candidate.entry
        prefix_len = min(candidate.prefix_len, ids.shape[0] - 1)
        if reuse.matcher == "context":
            return match_context(ids, entry.token_ids, prefix_len, reuse.max_context)
        if reuse.matcher == "cosine":
            return match_cosine(ecache, entry.ecache, prefix_len, reuse.min_match_similarity)
        return match_lsh(ecache, codes, entry.ecache, entry.codes, prefix_len, reuse.min_match_similarity)

    def _plan(
        self, match: MatchResult, entry: ReferenceEntry, reuse: ReuseConfig, observe: int = 0, prefix_only: bool = False
    ) -> tuple[BorrowPlan, bool]:
        """Build the borrow plan; the flag is True when more than the exact prefix is borrowed.

        The last ``observe`` tokens are recomputed in every layer, so that their
        attention can score the cache for retention.
        """
        prefix_len = match.prefix_len
        n_new = match.ref_index.shape[0]
        forced = forced_rows(match, reuse.span_head_tokens, reuse.min_context_tokens)
        if observe:
            forced[-observe:] = True
        fuzzy = not prefix_only and entry.generation < reuse.max_reference_generation and not forced.all()
        device = self.runner.device
        prefix_k_pre = entry.k_pre[:, :, :prefix_len].to(device)
        prefix_v = entry.v[:, :, :prefix_len].to(device)
        if not fuzzy:
            return BorrowPlan(
                prefix_len, prefix_k_pre, prefix_v, None, None,
                torch.ones(n_new, dtype=torch.bool, device=device), [1.0] * self.runner.n_layers,
            ), False
        index = torch.from_numpy(match.ref_index).to(entry.k_pre.device)
        ratios = [reuse.layer_ratio(layer) for layer in range(self.runner.n_layers)]
        reference_positions = None if reuse.rerotate_keys else index
        plan = BorrowPlan(
            prefix_len, prefix_k_pre, prefix_v, entry.k_pre, entry.v,
            torch.from_numpy(forced).to(device), ratios,
            selection=reuse.selection, deviation_layer=reuse.deviation_layer,
            reference_positions=reference_positions, seed=reuse.seed, source_index=index,
        )
        return plan, True

    # ----------------------------------------------------------------- generation

    def generate(
        self,
        prompt: str | Sequence[int],
        generation: GenerationConfig | None = None,
        namespace: str = "default",
        reuse: ReuseConfig | None = None,
        store: bool = True,
        retention: RetentionConfig | None = None,
    ) -> GenerationResult:
        """Complete ``prompt`` and return the text with the reuse details.

        Args:
            prompt: Text (tokenized without special tokens) or token ids.
            generation: Decoding settings; greedy with 128 new tokens when None.
            namespace: References are only borrowed within one namespace.
            reuse: Reuse settings for this call; the engine's when None.
            store: Store the prompt and its completion as a reference afterwards.
                With retention the completion's K/V were computed against the
                compacted cache, so only the prompt, with its full K/V, is stored.
            retention: KV compression for this call; the engine's when None.

        Raises:
            ValueError: Empty prompt, prompt longer than the context window, invalid ids.
            TypeError: ``prompt`` is neither text nor ids.
        """
        stream = self.stream(prompt, generation, namespace, reuse, store, retention)
        for _ in stream:
            pass
        assert stream.result is not None
        return stream.result

    def stream(
        self,
        prompt: str | Sequence[int],
        generation: GenerationConfig | None = None,
        namespace: str = "default",
        reuse: ReuseConfig | None = None,
        store: bool = True,
        retention: RetentionConfig | None = None,
    ) -> GenerationStream:
        """Like ``generate``, but return an iterator of text pieces as they are decoded.

        The prompt is validated before this returns; the prefill runs on the first
        ``next``.
        """
        generation = generation if generation is not None else GenerationConfig()
        if not isinstance(generation, GenerationConfig):
            raise TypeError(f"generation must be a GenerationConfig or None, got {type(generation).__name__}")
        if reuse is not None and not isinstance(reuse, ReuseConfig):
            raise TypeError(f"reuse must be a ReuseConfig or None, got {type(reuse).__name__}")
        if retention is not None and not isinstance(retention, RetentionConfig):
            raise TypeError(f"retention must be a RetentionConfig or None, got {type(retention).__name__}")
        if not isinstance(store, bool):
            raise TypeError(f"store must be True or False, got {store!r}")
        if not isinstance(namespace, str) or not namespace:
            raise ValueError(f"namespace must be a non-empty string, got {namespace!r}")
        ids = self.encode(prompt)
        stream = GenerationStream(iter(()))
        stream._pieces = self._generate_pieces(stream, ids, generation, namespace, reuse, store, retention)
        return stream

    def _generate_pieces(self, stream, ids, generation, namespace, reuse, store, retention=None) -> Iterator[str]:
        start = time.perf_counter()
        max_new = min(generation.max_new_tokens, self.context_window - len(ids))
        outcome = self.prefill(ids, namespace, reuse, extra_capacity=max_new, retention=retention, keep_full_kv=store)
        sampler = Sampler(generation)
        assembler = TextAssembler(self.tokenizer, generation.stop)
        logits, cache = outcome.logits, outcome.cache
        finish_reason = "length"
        generated: list[int] = []
        for step in range(max_new):
            token = sampler(logits)
            if token in self.eos_ids:
                finish_reason = "stop"
                break
            generated.append(token)
            piece = assembler.add(token)
            if piece:
                yield piece
            if assembler.stopped:
                finish_reason = "stop"
                break
            if step + 1 < max_new:
                with self._lock:
                    logits = self.runner.decode_step(token, cache)
        tail = assembler.finish()
        if tail:
            yield tail

        stored_id = None
        if store:
            stored_id = self._store(ids, generated, outcome, namespace)
        stream.result = GenerationResult(
            text=assembler.text,
            prompt_tokens=len(ids),
            completion_tokens=len(generated),
            finish_reason=finish_reason,
            reused_tokens=outcome.reused_tokens,
            prefix_tokens=outcome.prefix_tokens,
            recomputed_share=outcome.recomputed_share,
            similarity=outcome.similarity,
            reference_id=outcome.reference_id,
            ttft_s=outcome.ttft_s,
            fallback_reason=outcome.fallback_reason,
            token_ids=generated,
            stored_reference_id=stored_id,
            generation=outcome.generation,
            lookup_s=outcome.lookup_s,
            match_s=outcome.match_s,
            total_s=time.perf_counter() - start,
            kv_bytes=outcome.kv_bytes,
            full_kv_bytes=outcome.full_kv_bytes,
        )

    def _store(self, ids: list[int], generated: list[int], outcome: PrefillOutcome, namespace: str) -> str | None:
        """Store the prompt and the generated tokens whose K/V are in the cache.

        After retention only the prompt is stored, from ``outcome.full_kv``: the
        generated tokens' K/V were computed against the compacted cache, and an exact
        prefix is served as it is, so storing them would pass the approximation on.
        """
        cache = outcome.cache
        if cache.layer_lengths is not None:
            if outcome.full_kv is None:
                return None
            generated = []
            length = len(ids)
            k_pre, v = outcome.full_kv
        else:
            length = cache.length
            k_pre = cache.k_pre[:, :, :length].to("cpu", copy=True)
            v = cache.v[:, :, :length].to("cpu", copy=True)
        token_ids = np.asarray((ids + generated)[:length], dtype=np.int64)
        ecache = outcome.ecache
        codes = outcome.codes
        if length > len(ids):
            extra = self.hasher.ecache(torch.from_numpy(token_ids[len(ids):]), start=len(ids))
            ecache = torch.cat([ecache, extra])
            codes = np.concatenate([codes, self.hasher.codes(extra)])
        entry = ReferenceEntry(
            token_ids=token_ids,
            k_pre=k_pre,
            v=v,
            ecache=ecache,
            codes=codes,
            namespace=namespace,
            generation=outcome.generation,
        )
        return entry.id if self.store.add(entry) else None

    # ----------------------------------------------------------------- checks

    def self_check(self, seq_len: int = 48) -> str | None:
        """Check reuse against the model's own forward pass before enabling it.

        Two prefills must reproduce the logits of ``model(ids)``. The first borrows
        every token of an edited prompt but recomputes them all. The second borrows
        the prompt's own exact K/V after a prefix and recomputes scattered rows, so it
        exercises the gather, the re-rotation and the scattered-row mask.

        Returns:
            None when both match, else the reason reuse must stay off.
        """
        generator = torch.Generator().manual_seed(1234)
        vocab = min(self.runner.config.vocab_size, len(self.tokenizer))
        reference_ids = torch.randint(3, vocab, (seq_len,), generator=generator)
        edited_ids = reference_ids.clone()
        edited_ids[seq_len // 3 : seq_len // 2] = torch.randint(3, vocab, (seq_len // 2 - seq_len // 3,), generator=generator)
        edited_ids[: seq_len // 4] = reference_ids[seq_len // 4 : seq_len // 2].clone()
        everything = dataclasses.replace(self.reuse, recompute_ratio=1.0, recompute_decay=1.0, min_recompute_ratio=1.0)
        scattered = dataclasses.replace(self.reuse, recompute_ratio=0.5, recompute_decay=0.7, selection="random")
        prefix_len = seq_len // 4
        try:
            with self._lock, torch.inference_mode():
                ref_cache = self.runner.new_cache(seq_len)
                self.runner.prefill(reference_ids, ref_cache)
                ecache = self.hasher.ecache(reference_ids)
                entry = ReferenceEntry(
                    reference_ids.numpy(), ref_cache.k_pre.cpu(), ref_cache.v.cpu(), ecache, self.hasher.codes(ecache)
                )
                checks = []
                match = match_context(edited_ids.numpy(), entry.token_ids, 0, 4)
                checks.append(("every token recomputed", edited_ids, self._plan(match, entry, everything)[0]))
                rows = np.arange(prefix_len, seq_len)
                exact = MatchResult(
                    prefix_len, rows, np.ones(rows.shape, dtype=bool), np.full(rows.shape, 16), np.zeros(rows.shape, dtype=bool)
                )
                checks.append(("scattered rows over exact K/V", reference_ids, self._plan(exact, entry, scattered)[0]))
                for name, ids, plan in checks:
                    expected = self.loaded.model(ids[None].to(self.runner.device)).logits[0, -1].float()
                    actual, _ = self.runner.prefill(ids, self.runner.new_cache(seq_len), plan)
                    scale = expected.abs().max().item()
                    error = (actual - expected).abs().max().item()
                    tolerance = (1e-4 if self.runner.dtype == torch.float32 else 3e-2) * max(scale, 1.0)
                    if not math.isfinite(error) or error > tolerance:
                        return f"{name}: logits differ from the model's forward pass by {error:.3g} (tolerance {tolerance:.3g})"
        except Exception as e:  # noqa: BLE001 - any failure here means reuse must stay off
            return f"self-check raised {type(e).__name__}: {e}"
        return None


def forced_rows(match: MatchResult, span_head_tokens: int, min_context_tokens: int = 0) -> np.ndarray:
    """Return the rows after the prefix that must be recomputed whatever their deviation.

    These are unmatched tokens, the last token, everything after the last matched
    span, the first ``span_head_tokens`` of every reused span, and context matches
    shorter than ``min_context_tokens`` (fuzzy matches carry no context length).
    """
    matched = match.matched
    forced = ~matched
    if min_context_tokens and match.context_len.any():
        forced |= match.context_len < min_context_tokens
    if forced.shape[0]:
        forced[-1] = True
        matched_rows = np.nonzero(matched)[0]
        last = int(matched_rows[-1]) if matched_rows.size else -1
        forced[last + 1 :] = True
    if span_head_tokens:
        starts = np.nonzero(match.span_start)[0]
        for offset in range(span_head_tokens):
            rows = starts + offset
            rows = rows[rows < forced.shape[0]]
            forced[rows] |= matched[rows]
    return forced

