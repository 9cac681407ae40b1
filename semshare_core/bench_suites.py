"""Paper-grade benchmark suites: TTFT curves, KV memory, quality, sensitivity, ablations, lookup cost.

Every suite compares methods on the same prompts, one after the other in one process,
and reports ratios (full prefill's time over a method's time), so the load of a shared
machine affects both sides alike. TTFT is the time from token ids to the first token's
logits, lookup, matching, re-rotation and retention's compaction included and the
store write excluded. Fidelity to full prefill is teacher-forced next-token agreement
and the mean KL divergence of next-token distributions along full prefill's greedy
continuation (``quality``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .articles import ArticlePair
from .bench import timed
from .config import GenerationConfig, RetentionConfig, ReuseConfig
from .engine import SemShareEngine
from .forward import BorrowPlan, KVCache, apply_rope
from .matching import common_prefix_len, match_context
from .prompts import summarization_messages
from .quality import compare, greedy_continuation
from .retention import retain
from .store import ReferenceEntry, ReferenceStore

logger = logging.getLogger(__name__)

NO_REUSE = ReuseConfig(enabled=False)
FOLLOW_UP = "Which of these stories matters most to ordinary people, and why?"
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+|\n+")

Progress = Callable[[str], None]


def _no_progress(_: str) -> None:
    pass


# ----------------------------------------------------------------------------- prompts


def split_sentences(text: str) -> list[str]:
    """Split text into sentences at '.', '!' or '?' followed by white space, and at line breaks."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def _summary_ids(engine: SemShareEngine, articles: Sequence[str]) -> list[int]:
    return engine.apply_chat_template(summarization_messages(list(articles)))


def article_prompts(
    engine: SemShareEngine, pairs: Sequence[ArticlePair], max_tokens: int, offset: int
) -> tuple[list[str], list[str]]:
    """Choose articles for a summarization prompt pair of about ``max_tokens`` target tokens.

    The reference takes the advanced versions of consecutive articles from ``offset``
    on, and the target their intermediate rewrites, so the two carry the same content
    in other words. The last article is cut after the same share of sentences in both versions,
    so that the target prompt fits ``max_tokens``.

    Returns:
        (reference articles, target articles).

    Raises:
        ValueError: Not even one sentence of an article fits ``max_tokens``.
    """
    references: list[str] = []
    targets: list[str] = []
    for step in range(len(pairs)):
        pair = pairs[(offset + step) % len(pairs)]
        if len(_summary_ids(engine, targets + [pair.intermediate])) <= max_tokens:
            references.append(pair.advanced)
            targets.append(pair.intermediate)
            continue
        target_sentences = split_sentences(pair.intermediate)
        reference_sentences = split_sentences(pair.advanced)
        low, high = 0, len(target_sentences)
        while low < high:  # the largest sentence count whose target prompt still fits
            middle = (low + high + 1) // 2
            if len(_summary_ids(engine, targets + [" ".join(target_sentences[:middle])])) <= max_tokens:
                low = middle
            else:
                high = middle - 1
        if low:
            kept = math.ceil(len(reference_sentences) * low / len(target_sentences))
            references.append(" ".join(reference_sentences[:kept]))
            targets.append(" ".join(target_sentences[:low]))
        break
    if not targets:
        raise ValueError(f"no article sentence fits a prompt of {max_tokens} tokens; raise the length")
    return references, targets


def _perturbed(sentences: list[str], share: float, mode: str, donor: list[str], seed: int) -> list[str]:
    """Remove, or replace with ``donor`` sentences, a random ``share`` of ``sentences``."""
    rng = random.Random(seed)
    count = round(share * len(sentences))
    chosen = set(rng.sample(range(len(sentences)), count))
    if mode == "removed":
        return [s for i, s in enumerate(sentences) if i not in chosen]
    replacements = iter(rng.sample(donor, min(count, len(donor))) + rng.choices(donor, k=max(0, count - len(donor))))
    return [next(replacements) if i in chosen else s for i, s in enumerate(sentences)]


# ----------------------------------------------------------------------------- helpers


def clone_cache(cache: KVCache) -> KVCache:
    """Return a copy of ``cache`` that decoding can extend without changing the original."""

    def copy(tensors):
        return [t.clone() for t in tensors] if isinstance(tensors, list) else tensors.clone()

    return dataclasses.replace(
        cache,
        k_pre=copy(cache.k_pre),
        k=copy(cache.k),
        v=copy(cache.v),
        layer_lengths=list(cache.layer_lengths) if cache.layer_lengths is not None else None,
        positions=copy(cache.positions) if cache.positions is not None else None,
    )


@torch.inference_mode()
def extend_cache(engine: SemShareEngine, tokens: Sequence[int], cache: KVCache) -> torch.Tensor:
    """Append ``tokens`` to ``cache`` in one pass and return the next-token logits after each, (n, vocab).

    Equals ``decode_step`` on each token in turn, up to rounding, on full and compacted
    caches, but runs the layers once for all tokens, which makes teacher forcing as
    cheap as a short prefill.
    """
    runner = engine.runner
    n = len(tokens)
    start = cache.length
    if start + n > cache.capacity:
        raise ValueError(f"{n} tokens do not fit a cache of {cache.capacity} holding {start}")
    positions = torch.arange(start, start + n, device=runner.device)
    cos, sin = runner.rope(positions)  # (n, head_dim)
    with engine._lock:
        hidden = runner.embed_tokens(torch.as_tensor(list(tokens), device=runner.device))  # (n, hidden)
        for index, layer in enumerate(runner.layers):
            x = layer.input_layernorm(hidden)
            k_new, v_new = runner.project_kv(layer, x)  # (n_kv_heads, n, head_dim)
            row = cache.layer_length(index)
            cache.k_pre[index][:, row : row + n] = k_new
            cache.k[index][:, row : row + n] = apply_rope(k_new, cos, sin)
            cache.v[index][:, row : row + n] = v_new
            if cache.positions is not None:
                cache.positions[index][row : row + n] = positions
                key_positions = cache.positions[index][: row + n]
            else:
                key_positions = torch.arange(row + n, device=runner.device)
            mask = key_positions[None, :] <= positions[:, None]  # (n, n_keys)
            window = runner.windows[index]
            if window is not None:
                mask &= key_positions[None, :] > positions[:, None] - window
            q = apply_rope(runner.project_q(layer, x), cos, sin)  # (n_heads, n, head_dim)
            keys = cache.k[index][:, : row + n]
            values = cache.v[index][:, : row + n]
            hidden = runner.finish_layer(layer, hidden, runner.attend(q, keys, values, mask, False))
        cache.length = start + n
        if cache.layer_lengths is not None:
            cache.layer_lengths = [rows + n for rows in cache.layer_lengths]
        return runner.lm_head(runner.norm(hidden)).float()


def teacher_forced_logits(engine: SemShareEngine, logits: torch.Tensor, cache: KVCache, tokens: list[int]) -> list[torch.Tensor]:
    """Return the logits before each of ``tokens`` when they are fed after the prompt; extends ``cache``."""
    if len(tokens) <= 1:
        return [logits][: len(tokens)]
    return [logits] + list(extend_cache(engine, tokens[:-1], cache))


def perplexity(engine: SemShareEngine, logits: torch.Tensor, cache: KVCache, tokens: list[int]) -> float:
    """Return the perplexity of ``tokens`` fed teacher-forced after the prompt in ``cache``."""
    step_logits = teacher_forced_logits(engine, logits, cache, tokens)
    nll = [-float(torch.log_softmax(row.float(), dim=-1)[token]) for row, token in zip(step_logits, tokens)]
    return math.exp(sum(nll) / len(nll))


def prefix_cache_prefill(
    engine: SemShareEngine, ids: Sequence[int], namespace: str, extra_capacity: int = 0
) -> tuple[torch.Tensor, KVCache, float, int]:
    """Prefill as an exact-prefix cache does: reuse the longest stored token prefix, recompute the rest.

    This is the baseline that vLLM's automatic prefix caching and SGLang's radix cache
    represent, matched at token granularity (vLLM matches whole blocks of 16 tokens by
    default, so it reuses slightly less). At least the last token is recomputed.

    Returns:
        (logits, cache, seconds, reused prefix length).
    """
    ids_array = np.asarray(ids, dtype=np.int64)
    seq_len = ids_array.shape[0]
    runner = engine.runner
    with engine._lock:
        start = time.perf_counter()
        best, best_len = None, 0
        for entry in engine.store.entries(namespace):
            length = common_prefix_len(ids_array, entry.token_ids)
            if length > best_len:
                best, best_len = entry, length
        prefix_len = min(best_len, seq_len - 1)
        cache = runner.new_cache(seq_len + extra_capacity)
        ids_tensor = torch.from_numpy(ids_array)
        entry = engine.store.load(best) if prefix_len else None
        if entry is None:
            logits, _ = runner.prefill(ids_tensor, cache)
            return logits, cache, time.perf_counter() - start, 0
        n_new = seq_len - prefix_len
        plan = BorrowPlan(
            prefix_len,
            entry.k_pre[:, :, :prefix_len].to(runner.device),
            entry.v[:, :, :prefix_len].to(runner.device),
            None,
            None,
            torch.ones(n_new, dtype=torch.bool, device=runner.device),
            [1.0] * runner.n_layers,
        )
        logits, _ = runner.prefill(ids_tensor, cache, plan)
        return logits, cache, time.perf_counter() - start, prefix_len


def _store_reference(engine: SemShareEngine, ids: list[int], namespace: str, new_tokens: int = 0) -> str:
    """Prefill ``ids`` fully, generate ``new_tokens`` greedily, store it in ``namespace``; return the text."""
    result = engine.generate(ids, GenerationConfig(max_new_tokens=new_tokens), namespace=namespace, reuse=NO_REUSE)
    return result.text


# ----------------------------------------------------------------------------- TTFT curve


@dataclass
class CurvePoint:
    """Full prefill, exact-prefix reuse and SemShare on one target prompt.

    Attributes:
        scenario: "reworded" (the target rewrites the stored prompt's articles) or
            "exact-prefix" (the target is the next chat turn of the stored prompt).
        length: Requested target length in tokens.
        prompt_tokens: Actual target length.
        full_s, prefix_s, semshare_s, retention_s: Median TTFT in seconds of full
            prefill, exact-prefix reuse, SemShare, and SemShare with retention.
        prefix_reused: Tokens the exact-prefix baseline reused.
        recomputed_share, similarity, fallback_reason: From SemShare's prefill.
        agreement, mean_kl: SemShare against full prefill.
        retention_agreement, retention_kl: SemShare with retention against full prefill.
        kv_bytes_full, kv_bytes_retained: Prompt K/V bytes decoding reads without and
            with retention.
        identical_greedy: Exact-prefix scenario only: greedy tokens of SemShare equal
            those of full prefill.
    """

    scenario: str
    length: int
    prompt_tokens: int
    full_s: float
    prefix_s: float
    semshare_s: float
    retention_s: float | None = None
    prefix_reused: int = 0
    recomputed_share: float = 1.0
    similarity: float | None = None
    fallback_reason: str | None = None
    agreement: float | None = None
    mean_kl: float | None = None
    retention_agreement: float | None = None
    retention_kl: float | None = None
    kv_bytes_full: int = 0
    kv_bytes_retained: int = 0
    identical_greedy: bool | None = None

    @property
    def prefix_speedup(self) -> float:
        return self.full_s / self.prefix_s

    @property
    def semshare_speedup(self) -> float:
        return self.full_s / self.semshare_s

    @property
    def retention_speedup(self) -> float | None:
        return self.full_s / self.retention_s if self.retention_s else None


@dataclass
class SuiteSettings:
    """Sizes of the paper suites; the defaults are the measured run, ``quick()`` a smoke test."""

    lengths: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096, 5120])
    exact_prefix_lengths: list[int] = field(default_factory=lambda: [1024, 4096])
    runs: int = 1
    fidelity_tokens: int = 64
    retention: RetentionConfig = field(default_factory=lambda: RetentionConfig(enabled=True))
    retention_ratios: list[float] = field(default_factory=lambda: [1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2])
    constant_ratios: list[float] = field(default_factory=lambda: [0.6, 0.4])
    retention_tokens: int = 2048
    retention_prompts: int = 3
    continuation_tokens: int = 96
    multinews_samples: int = 3
    multinews_max_tokens: int = 3500
    summary_tokens: int = 96
    sensitivity_tokens: int = 1536
    sensitivity_shares: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    ablation_pairs: int = 2
    ablation_tokens: int = 2048
    lookup_counts: list[int] = field(default_factory=lambda: [10, 100, 1000, 10000])
    lookup_target_tokens: int = 4096
    seed: int = 0

    @classmethod
    def quick(cls) -> SuiteSettings:
        """Return settings for a smoke test of every suite in a minute or two: not a measurement."""
        return cls(
            lengths=[512],
            exact_prefix_lengths=[512],
            fidelity_tokens=4,
            retention_ratios=[1.0, 0.5],
            constant_ratios=[0.5],
            retention_tokens=400,
            retention_prompts=1,
            continuation_tokens=8,
            multinews_samples=1,
            multinews_max_tokens=1500,
            summary_tokens=8,
            sensitivity_tokens=400,
            sensitivity_shares=[0.5],
            ablation_pairs=1,
            ablation_tokens=400,
            lookup_counts=[10, 100],
            lookup_target_tokens=512,
        )


def _fidelity(engine: SemShareEngine, reference: tuple[list[int], list[torch.Tensor]], logits, cache):
    tokens, full_steps = reference
    return compare(full_steps, teacher_forced_logits(engine, logits, cache, tokens))


def ttft_curve(
    engine: SemShareEngine, pairs: Sequence[ArticlePair], settings: SuiteSettings, progress: Progress = _no_progress
) -> list[CurvePoint]:
    """Measure TTFT of full prefill, exact-prefix reuse and SemShare at each length of ``settings``."""
    points = []
    extra = settings.fidelity_tokens + 1
    engine.full_prefill(_summary_ids(engine, [pairs[0].advanced])[:256])  # warm-up
    for index, length in enumerate(settings.lengths):
        progress(f"TTFT curve, reworded, {length} tokens")
        namespace = f"curve-reworded-{length}"
        references, targets = article_prompts(engine, pairs, length, offset=index * 5 + settings.seed)
        target = _summary_ids(engine, targets)
        _store_reference(engine, _summary_ids(engine, references), namespace)
        points.append(_curve_point(engine, "reworded", length, target, namespace, settings, extra))
    for length in settings.exact_prefix_lengths:
        progress(f"TTFT curve, exact prefix, {length} tokens")
        points.append(_exact_prefix_point(engine, pairs, length, settings))
    return points


def _curve_point(engine, scenario, length, target, namespace, settings: SuiteSettings, extra) -> CurvePoint:
    (full_logits, full_cache, _), (full_s,) = timed(lambda: engine.full_prefill(target, extra), settings.runs, lambda r: r[2])
    (_, _, _, prefix_reused), (prefix_s,) = timed(
        lambda: prefix_cache_prefill(engine, target, namespace), settings.runs, lambda r: r[2]
    )
    (outcome,), (semshare_s,) = timed(
        lambda: (engine.prefill(target, namespace, extra_capacity=extra),), settings.runs, lambda r: r[0].ttft_s
    )
    (retained,), (retention_s,) = timed(
        lambda: (engine.prefill(target, namespace, extra_capacity=extra, retention=settings.retention),),
        settings.runs,
        lambda r: r[0].ttft_s,
    )
    reference = greedy_continuation(engine, full_logits, full_cache, settings.fidelity_tokens)
    fidelity = _fidelity(engine, reference, outcome.logits, outcome.cache)
    retained_fidelity = _fidelity(engine, reference, retained.logits, retained.cache)
    return CurvePoint(
        scenario=scenario,
        length=length,
        prompt_tokens=len(target),
        full_s=full_s,
        prefix_s=prefix_s,
        semshare_s=semshare_s,
        retention_s=retention_s,
        prefix_reused=prefix_reused,
        recomputed_share=outcome.recomputed_share,
        similarity=outcome.similarity,
        fallback_reason=outcome.fallback_reason,
        agreement=fidelity.agreement,
        mean_kl=fidelity.mean_kl,
        retention_agreement=retained_fidelity.agreement,
        retention_kl=retained_fidelity.mean_kl,
        kv_bytes_full=retained.full_kv_bytes,
        kv_bytes_retained=retained.kv_bytes,
    )


def _exact_prefix_point(engine, pairs, length, settings: SuiteSettings, new_tokens: int = 32) -> CurvePoint:
    """Store a summary turn of about ``length`` tokens, then time the follow-up turn that extends it."""
    namespace = f"curve-exact-{length}"
    articles, _ = article_prompts(engine, pairs, max(length - 64, 64), offset=7 + settings.seed)
    messages = summarization_messages(articles)
    summary = _store_reference(engine, engine.apply_chat_template(messages), namespace, new_tokens)
    follow_up = messages + [{"role": "assistant", "content": summary}, {"role": "user", "content": FOLLOW_UP}]
    target = engine.apply_chat_template(follow_up)
    extra = new_tokens + 1
    (full_logits, full_cache, _), (full_s,) = timed(lambda: engine.full_prefill(target, extra), settings.runs, lambda r: r[2])
    (_, _, _, prefix_reused), (prefix_s,) = timed(
        lambda: prefix_cache_prefill(engine, target, namespace), settings.runs, lambda r: r[2]
    )
    (outcome,), (semshare_s,) = timed(
        lambda: (engine.prefill(target, namespace, extra_capacity=extra),), settings.runs, lambda r: r[0].ttft_s
    )
    full_tokens, _ = greedy_continuation(engine, full_logits, full_cache, new_tokens)
    shared_tokens, _ = greedy_continuation(engine, outcome.logits, outcome.cache, new_tokens)
    return CurvePoint(
        scenario="exact-prefix",
        length=length,
        prompt_tokens=len(target),
        full_s=full_s,
        prefix_s=prefix_s,
        semshare_s=semshare_s,
        prefix_reused=prefix_reused,
        recomputed_share=outcome.recomputed_share,
        similarity=outcome.similarity,
        fallback_reason=outcome.fallback_reason,
        kv_bytes_full=outcome.full_kv_bytes,
        kv_bytes_retained=outcome.kv_bytes,
        identical_greedy=full_tokens == shared_tokens,
    )


# ----------------------------------------------------------------------------- retention


@dataclass
class RetentionPoint:
    """Quality of one retention setting against the uncompressed cache of the same prefill.

    Attributes:
        task: "summary" (fidelity to full prefill along its greedy continuation) or
            "continuation" (perplexity of the text that really follows the prompt).
        ratio, depth_decay: The ``RetentionConfig`` settings.
        prompt_tokens: Prompt length.
        kv_share: Prompt K/V bytes kept over the bytes of the full cache.
        agreement, mean_kl: Summary task only.
        perplexity, full_perplexity: Continuation task only: with this setting and
            with the full cache.
        prompt: Which of the sweep's prompts of this task.
    """

    task: str
    ratio: float
    depth_decay: float
    prompt_tokens: int
    kv_share: float
    agreement: float | None = None
    mean_kl: float | None = None
    perplexity: float | None = None
    full_perplexity: float | None = None
    prompt: int = 0


def retention_sweep(
    engine: SemShareEngine, pairs: Sequence[ArticlePair], settings: SuiteSettings, progress: Progress = _no_progress
) -> list[RetentionPoint]:
    """Measure quality against the retention ratio, for the decaying schedule and a constant one.

    Each of ``settings.retention_prompts`` rounds takes other articles for a
    summarization prompt and for a stretch of text whose real continuation is scored.
    """
    base = settings.retention
    configs = [dataclasses.replace(base, enabled=True, ratio=r) for r in settings.retention_ratios]
    configs += [dataclasses.replace(base, enabled=True, ratio=r, depth_decay=1.0) for r in settings.constant_ratios]
    points = []
    for prompt in range(settings.retention_prompts):
        offset = 40 + 13 * prompt + settings.seed
        _, targets = article_prompts(engine, pairs, settings.retention_tokens, offset=offset)
        text = "\n\n".join(pair.advanced for pair in [pairs[(offset + 6 + i) % len(pairs)] for i in range(12)])
        text_ids = engine.tokenizer.encode(text, add_special_tokens=False)
        prompt_len = min(settings.retention_tokens, len(text_ids) - settings.continuation_tokens)
        continuation = text_ids[prompt_len : prompt_len + settings.continuation_tokens]
        tasks = (("summary", _summary_ids(engine, targets)), ("continuation", text_ids[:prompt_len]))
        for task, ids in tasks:
            progress(f"retention, {task} {prompt + 1} of {settings.retention_prompts}, {len(ids)} tokens")
            points += _retention_points(engine, task, prompt, ids, continuation, configs, settings)
    return points


def _retention_points(engine, task, prompt, ids, continuation, configs, settings: SuiteSettings) -> list[RetentionPoint]:
    """Prefill ``ids`` once, then compact a copy of its cache with each config and score it."""
    extra = max(settings.fidelity_tokens, settings.continuation_tokens) + 1
    cache = engine.runner.new_cache(len(ids) + extra)
    with engine._lock:
        logits, stats = engine.runner.prefill(torch.tensor(ids), cache, observe=settings.retention.window)
    full_bytes = cache.kv_bytes
    if task == "summary":
        reference = greedy_continuation(engine, logits, clone_cache(cache), settings.fidelity_tokens)
    else:
        full_ppl = perplexity(engine, logits, clone_cache(cache), continuation)
    points = []
    for config in configs:
        compacted = retain(cache, stats.observed_attention, config)
        point = RetentionPoint(task, config.ratio, config.depth_decay, len(ids), compacted.kv_bytes / full_bytes, prompt=prompt)
        if task == "summary":
            fidelity = _fidelity(engine, reference, logits, compacted)
            point.agreement, point.mean_kl = fidelity.agreement, fidelity.mean_kl
        else:
            point.perplexity = perplexity(engine, logits, compacted, continuation)
            point.full_perplexity = full_ppl
        points.append(point)
    return points


# ----------------------------------------------------------------------------- MultiNews quality


@dataclass
class QualityPoint:
    """Gold-summary ROUGE-L and fidelity on one MultiNews sample.

    The stored reference summarizes the sample's passages in their order, and the
    target the same passages in reverse order.

    Attributes:
        speedup: Full prefill's TTFT over SemShare's, one run each.
        rouge_full, rouge_semshare, rouge_retention: ROUGE-L F1 against the gold
            summary of full prefill, SemShare, and SemShare with retention.
        agreement, mean_kl: SemShare against full prefill.
        retention_agreement, retention_kl: SemShare with retention against full prefill.
        kv_share: Prompt K/V bytes kept with retention over the full cache's.
    """

    sample: int
    passages: int
    prompt_tokens: int
    speedup: float
    recomputed_share: float
    similarity: float | None
    fallback_reason: str | None
    rouge_full: float
    rouge_semshare: float
    rouge_retention: float
    agreement: float
    mean_kl: float
    retention_agreement: float
    retention_kl: float
    kv_share: float


def multinews_quality(
    engine: SemShareEngine, samples: Sequence[dict], settings: SuiteSettings, progress: Progress = _no_progress
) -> list[QualityPoint]:
    """Score full prefill, SemShare and SemShare with retention against MultiNews gold summaries."""
    from rouge_score import rouge_scorer

    from .bench import multinews_passages

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    points = []
    extra = settings.summary_tokens + 1
    for index, sample in enumerate(samples):
        progress(f"MultiNews sample {index + 1} of {len(samples)}")
        namespace = f"multinews-{index}"
        passages = multinews_passages(sample)
        _store_reference(engine, _summary_ids(engine, passages), namespace)
        target = _summary_ids(engine, passages[::-1])
        gold = sample["answers"][0]

        def summary(logits, cache) -> str:
            tokens, _ = greedy_continuation(engine, logits, clone_cache(cache), settings.summary_tokens)
            return engine.tokenizer.decode(tokens, skip_special_tokens=True)

        def rouge(text: str) -> float:
            return scorer.score(gold, text)["rougeL"].fmeasure

        full_logits, full_cache, full_s = engine.full_prefill(target, extra)
        full_tokens, full_steps = greedy_continuation(engine, full_logits, clone_cache(full_cache), settings.summary_tokens)
        reference = (full_tokens[: settings.fidelity_tokens], full_steps[: settings.fidelity_tokens])
        outcome = engine.prefill(target, namespace, extra_capacity=extra)
        retained = engine.prefill(target, namespace, extra_capacity=extra, retention=settings.retention)
        rouge_semshare = rouge(summary(outcome.logits, outcome.cache))
        rouge_retention = rouge(summary(retained.logits, retained.cache))
        fidelity = _fidelity(engine, reference, outcome.logits, outcome.cache)
        retained_fidelity = _fidelity(engine, reference, retained.logits, retained.cache)
        points.append(
            QualityPoint(
                sample=index,
                passages=len(passages),
                prompt_tokens=len(target),
                speedup=full_s / outcome.ttft_s,
                recomputed_share=outcome.recomputed_share,
                similarity=outcome.similarity,
                fallback_reason=outcome.fallback_reason,
                rouge_full=rouge(engine.tokenizer.decode(full_tokens, skip_special_tokens=True)),
                rouge_semshare=rouge_semshare,
                rouge_retention=rouge_retention,
                agreement=fidelity.agreement,
                mean_kl=fidelity.mean_kl,
                retention_agreement=retained_fidelity.agreement,
                retention_kl=retained_fidelity.mean_kl,
                kv_share=retained.kv_bytes / retained.full_kv_bytes,
            )
        )
    return points


# ----------------------------------------------------------------------------- sensitivity


@dataclass
class SensitivityPoint:
    """Reuse and fidelity when a share of the stored document's sentences is removed or replaced.

    Attributes:
        mode: "removed" or "replaced" (by sentences of unrelated articles).
        share: Share of sentences changed.
        reused_share: Tokens whose final-layer K/V came from the reference, over the
            prompt length.
    """

    mode: str
    share: float
    prompt_tokens: int
    similarity: float | None
    reused_share: float
    recomputed_share: float
    speedup: float
    agreement: float
    mean_kl: float
    fallback_reason: str | None


def sensitivity(
    engine: SemShareEngine, pairs: Sequence[ArticlePair], settings: SuiteSettings, progress: Progress = _no_progress
) -> list[SensitivityPoint]:
    """Store a summarization prompt, then measure edited versions with a controlled share of new content."""
    offset = 60 + settings.seed
    articles, _ = article_prompts(engine, pairs, settings.sensitivity_tokens, offset=offset)
    donor = [s for i in range(30, 34) for s in split_sentences(pairs[(offset + i) % len(pairs)].advanced)]
    namespace = "sensitivity"
    _store_reference(engine, _summary_ids(engine, articles), namespace)
    extra = settings.fidelity_tokens + 1
    points = []
    for mode in ("removed", "replaced"):
        for share in settings.sensitivity_shares:
            progress(f"sensitivity, {share:.0%} of sentences {mode}")
            seed = settings.seed + round(share * 100)
            edited = [" ".join(_perturbed(split_sentences(a), share, mode, donor, seed + i)) for i, a in enumerate(articles)]
            target = _summary_ids(engine, edited)
            full_logits, full_cache, full_s = engine.full_prefill(target, extra)
            outcome = engine.prefill(target, namespace, extra_capacity=extra)
            reference = greedy_continuation(engine, full_logits, full_cache, settings.fidelity_tokens)
            fidelity = _fidelity(engine, reference, outcome.logits, outcome.cache)
            points.append(
                SensitivityPoint(
                    mode=mode,
                    share=share,
                    prompt_tokens=len(target),
                    similarity=outcome.similarity,
                    reused_share=outcome.reused_tokens / len(target),
                    recomputed_share=outcome.recomputed_share,
                    speedup=full_s / outcome.ttft_s,
                    agreement=fidelity.agreement,
                    mean_kl=fidelity.mean_kl,
                    fallback_reason=outcome.fallback_reason,
                )
            )
    return points


# ----------------------------------------------------------------------------- ablations


@dataclass
class AblationPoint:
    """One reuse variant on one reworded pair."""

    variant: str
    pair: int
    prompt_tokens: int
    speedup: float
    recomputed_share: float
    agreement: float
    mean_kl: float
    fallback_reason: str | None


def ablation_variants(base: ReuseConfig, n_layers: int) -> dict[str, ReuseConfig]:
    """Return the reuse settings compared by the ablation suite, each differing from ``base`` in one respect.

    The constant schedule recomputes the mean share of the decaying one in every
    layer, so that both cost about the same.
    """
    mean_ratio = statistics.mean(base.layer_ratio(layer) for layer in range(1, n_layers)) if n_layers > 1 else 1.0
    return {
        "default": base,
        "random selection": dataclasses.replace(base, selection="random"),
        "first-layer deviation": dataclasses.replace(base, deviation_layer=0),
        "no RoPE re-rotation": dataclasses.replace(base, rerotate_keys=False),
        "fuzzy LSH matching": dataclasses.replace(base, matcher="lsh"),
        "fuzzy cosine matching": dataclasses.replace(base, matcher="cosine"),
        "single-token matching": dataclasses.replace(base, max_context=1, min_context_tokens=1),
        "constant schedule": dataclasses.replace(
            base,
            recompute_ratio=mean_ratio,
            recompute_decay=1.0,
            min_recompute_ratio=min(base.min_recompute_ratio, mean_ratio),
        ),
    }


def ablations(
    engine: SemShareEngine, pairs: Sequence[ArticlePair], settings: SuiteSettings, progress: Progress = _no_progress
) -> list[AblationPoint]:
    """Compare each ablation variant with the default on reworded pairs."""
    variants = ablation_variants(engine.reuse, engine.runner.n_layers)
    extra = settings.fidelity_tokens + 1
    points = []
    for index in range(settings.ablation_pairs):
        progress(f"ablations, pair {index + 1} of {settings.ablation_pairs}")
        namespace = f"ablation-{index}"
        references, targets = article_prompts(engine, pairs, settings.ablation_tokens, offset=80 + 4 * index + settings.seed)
        _store_reference(engine, _summary_ids(engine, references), namespace)
        target = _summary_ids(engine, targets)
        full_logits, full_cache, full_s = engine.full_prefill(target, extra)
        reference = greedy_continuation(engine, full_logits, full_cache, settings.fidelity_tokens)
        engine.prefill(target, namespace)  # warm-up, so that the first variant is not timed cold
        for name, reuse in variants.items():
            outcome = engine.prefill(target, namespace, reuse=reuse, extra_capacity=extra)
            fidelity = _fidelity(engine, reference, outcome.logits, outcome.cache)
            points.append(
                AblationPoint(
                    variant=name,
                    pair=index,
                    prompt_tokens=len(target),
                    speedup=full_s / outcome.ttft_s,
                    recomputed_share=outcome.recomputed_share,
                    agreement=fidelity.agreement,
                    mean_kl=fidelity.mean_kl,
                    fallback_reason=outcome.fallback_reason,
                )
            )
    return points


# ----------------------------------------------------------------------------- lookup cost


@dataclass
class LookupPoint:
    """Cost of finding and matching a reference among ``references`` stored prompts.

    Attributes:
        ecache_s: E-cache and LSH codes of the target.
        index_update_s: The first ``find`` after the references were added, which
            indexes them all at once.
        find_s: ``ReferenceStore.find``, median of three after that.
        scan_s: Scoring every reference with ``lsh_similarity`` one by one, as a
            store without the index would; None above 1,000 references.
        match_s: Context matching against the best candidate.
        full_prefill_s: Full prefill of the target, measured in the same run.
    """

    references: int
    target_tokens: int
    ecache_s: float
    index_update_s: float
    find_s: float
    scan_s: float | None
    match_s: float
    full_prefill_s: float

    @property
    def share(self) -> float:
        """Lookup plus matching over full prefill."""
        return (self.ecache_s + self.find_s + self.match_s) / self.full_prefill_s


def lookup_scaling(
    engine: SemShareEngine,
    pairs: Sequence[ArticlePair],
    settings: SuiteSettings,
    progress: Progress = _no_progress,
    full_prefill_s: float | None = None,
) -> list[LookupPoint]:
    """Time lookup and matching with 10 to 10,000 stored references.

    Only the index is measured, so the synthetic references are windows of 500 to
    2,000 tokens of real article text with their real LSH codes, and K/V of one
    broadcast zero each. One reference is the reworded original of the target.
    ``full_prefill_s`` is a full prefill's time on a prompt of the target's length,
    measured in the same run; the target's own full prefill is timed when None.
    """
    from .ecache import lsh_similarity

    progress("lookup, building references")
    text = "\n\n".join(f"{pair.advanced}\n\n{pair.intermediate}" for pair in pairs)
    corpus = np.asarray(engine.tokenizer.encode(text, add_special_tokens=False), dtype=np.int64)
    chunks = [torch.from_numpy(corpus[i : i + 8192]) for i in range(0, corpus.shape[0], 8192)]
    corpus_codes = np.concatenate([engine.hasher.codes(engine.hasher.ecache(chunk)) for chunk in chunks])
    references, targets = article_prompts(engine, pairs, settings.lookup_target_tokens, offset=100 + settings.seed)
    target = np.asarray(_summary_ids(engine, targets), dtype=np.int64)
    original = np.asarray(_summary_ids(engine, references), dtype=np.int64)
    full_s = full_prefill_s if full_prefill_s is not None else engine.full_prefill(target.tolist())[2]

    store = ReferenceStore(max_bytes=1 << 62, fingerprint="lookup-benchmark")
    store.add(_index_only_entry(original, engine.hasher.codes(engine.hasher.ecache(torch.from_numpy(original)))))
    rng = np.random.default_rng(settings.seed)
    points = []
    for count in settings.lookup_counts:
        progress(f"lookup, {count} references")
        while len(store) < count:
            length = int(rng.integers(500, 2001))
            start = int(rng.integers(0, max(corpus.shape[0] - length, 1)))
            store.add(_index_only_entry(corpus[start : start + length], corpus_codes[start : start + length]))
        ecache_start = time.perf_counter()
        codes = engine.hasher.codes(engine.hasher.ecache(torch.from_numpy(target)))
        ecache_s = time.perf_counter() - ecache_start
        update_start = time.perf_counter()
        store.find("default", target, codes)
        index_update_s = time.perf_counter() - update_start
        find_times = []
        for _ in range(3):
            find_start = time.perf_counter()
            candidates = store.find("default", target, codes)
            find_times.append(time.perf_counter() - find_start)
        scan_s = None
        if count <= 1000:
            scan_start = time.perf_counter()
            for entry in store.entries("default"):
                lsh_similarity(codes, entry.code_sets)
            scan_s = time.perf_counter() - scan_start
        best = candidates[0]
        match_start = time.perf_counter()
        match_context(target, best.entry.token_ids, min(best.prefix_len, target.shape[0] - 1), engine.reuse.max_context)
        match_s = time.perf_counter() - match_start
        points.append(
            LookupPoint(
                references=len(store),
                target_tokens=int(target.shape[0]),
                ecache_s=ecache_s,
                index_update_s=index_update_s,
                find_s=statistics.median(find_times),
                scan_s=scan_s,
                match_s=match_s,
                full_prefill_s=full_s,
            )
        )
    return points


def _index_only_entry(token_ids: np.ndarray, codes: np.ndarray) -> ReferenceEntry:
    """Return an entry whose K/V and E-cache are one zero broadcast to the right length."""
    length = int(token_ids.shape[0])
    zero = torch.zeros(1, 1, 1, 1)
    return ReferenceEntry(
        token_ids=token_ids,
        k_pre=zero.expand(1, 1, length, 1),
        v=zero.expand(1, 1, length, 1),
        ecache=zero[0, 0].expand(length, 1),
        codes=codes,
    )


# ----------------------------------------------------------------------------- all suites

SUITES = ("curve", "retention", "quality", "sensitivity", "ablations", "lookup")


@dataclass
class PaperResults:
    """Everything one run of the paper suites measured."""

    curve: list[CurvePoint] = field(default_factory=list)
    retention: list[RetentionPoint] = field(default_factory=list)
    quality: list[QualityPoint] = field(default_factory=list)
    sensitivity: list[SensitivityPoint] = field(default_factory=list)
    ablations: list[AblationPoint] = field(default_factory=list)
    lookup: list[LookupPoint] = field(default_factory=list)
    settings: SuiteSettings | None = None
    suites: list[str] = field(default_factory=list)  # the suites that ran


def step_count(settings: SuiteSettings, suites: Sequence[str], multinews_samples: int) -> int:
    """Return the number of progress steps ``run_paper_suites`` reports."""
    counts = {
        "curve": len(settings.lengths) + len(settings.exact_prefix_lengths),
        "retention": 2 * settings.retention_prompts,
        "quality": multinews_samples,
        "sensitivity": 2 * len(settings.sensitivity_shares),
        "ablations": settings.ablation_pairs,
        "lookup": 1 + len(settings.lookup_counts),
    }
    return sum(counts[name] for name in suites)


def run_paper_suites(
    engine: SemShareEngine,
    pairs: Sequence[ArticlePair],
    multinews: Sequence[dict],
    settings: SuiteSettings,
    suites: Sequence[str] = SUITES,
    progress: Progress = _no_progress,
) -> PaperResults:
    """Run the chosen suites in order and collect their results.

    Raises:
        ValueError: An unknown suite name.
    """
    unknown = [name for name in suites if name not in SUITES]
    if unknown:
        raise ValueError(f"unknown suites {unknown}; choose from {SUITES}")
    results = PaperResults(settings=settings, suites=list(suites))
    if "curve" in suites:
        results.curve = ttft_curve(engine, pairs, settings, progress)
    if "retention" in suites:
        results.retention = retention_sweep(engine, pairs, settings, progress)
    if "quality" in suites:
        results.quality = multinews_quality(engine, multinews, settings, progress)
    if "sensitivity" in suites:
        results.sensitivity = sensitivity(engine, pairs, settings, progress)
    if "ablations" in suites:
        results.ablations = ablations(engine, pairs, settings, progress)
    if "lookup" in suites:
        # A full prefill of the target's length timed by the curve saves timing another one.
        same_length = [p.full_s for p in results.curve if p.scenario == "reworded" and p.length == settings.lookup_target_tokens]
        results.lookup = lookup_scaling(engine, pairs, settings, progress, same_length[0] if same_length else None)
    return results
