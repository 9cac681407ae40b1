"""The benchmark: TTFT of full prefill against SemShare, lookup cost and fidelity, in one run.

Every ratio compares runs made in the same process one after the other, so the noise of
a shared machine affects both sides alike. TTFT is the time from token ids to the first
token's logits, lookup, matching and re-rotation included and the store write excluded:
the median of ``runs`` runs after one warm-up.
"""

from __future__ import annotations

import json
import logging
import random
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

from rouge_score import rouge_scorer
from tqdm import tqdm

from .articles import ArticlePair
from .config import GenerationConfig, ReuseConfig
from .engine import SemShareEngine
from .prompts import summarization_messages
from .quality import compare, greedy_continuation, teacher_forced

logger = logging.getLogger(__name__)
T = TypeVar("T")

FOLLOW_UP = "Which of these stories matters most to ordinary people, and why?"


def timed(run: Callable[[], T], runs: int, *measures: Callable[[T], float]) -> tuple[T, list[float]]:
    """Call ``run`` ``runs`` times; return the last result and the median of each measure.

    Each result is dropped before the next run, so that at most one run's cache is alive.
    Holding every run's cache (330 MB each at 4.8k tokens) on top of the stored references
    once made single runs take twice as long while the new cache's memory was allocated.
    """
    values: list[list[float]] = [[] for _ in measures]
    for _ in range(runs):
        result = None
        result = run()
        for collected, measure in zip(values, measures):
            collected.append(measure(result))
    return result, [statistics.median(collected) for collected in values]


@dataclass
class PairResult:
    """One target prompt measured against full prefill."""

    kind: str  # "reworded", "exact-prefix" or "multinews"
    articles: int
    prompt_tokens: int
    full_ttft_s: float
    semshare_ttft_s: float
    recomputed_share: float
    similarity: float | None
    lookup_match_share: float
    agreement: float
    mean_kl: float
    fallback_reason: str | None
    prefix_tokens: int
    identical_greedy: bool | None = None
    rouge_full: float | None = None
    rouge_semshare: float | None = None

    @property
    def speedup(self) -> float:
        return self.full_ttft_s / self.semshare_ttft_s


class Benchmark:
    """Measures one engine on pairs of prompts; see the module docstring for the definitions."""

    def __init__(self, engine: SemShareEngine, runs: int = 3, fidelity_tokens: int = 64, reuse: ReuseConfig | None = None):
        self.engine = engine
        self.runs = runs
        self.fidelity_tokens = fidelity_tokens
        self.reuse = reuse

    def store_reference(self, ids: list[int], new_tokens: int = 0) -> str:
        """Prefill ``ids`` fully, generate ``new_tokens`` greedily and store the result; return its text."""
        no_reuse = ReuseConfig(enabled=False)
        return self.engine.generate(ids, GenerationConfig(max_new_tokens=new_tokens), reuse=no_reuse).text

    def measure(self, kind: str, articles: int, target: list[int]) -> PairResult:
        """Time full prefill and SemShare on ``target`` and compare their next-token predictions."""
        engine = self.engine
        extra = self.fidelity_tokens + 1
        engine.full_prefill(target)
        full_run, (full_ttft,) = timed(lambda: engine.full_prefill(target, extra), self.runs, lambda run: run[2])
        engine.prefill(target, reuse=self.reuse)
        outcome, (semshare_ttft, lookup_s) = timed(
            lambda: engine.prefill(target, reuse=self.reuse, extra_capacity=extra),
            self.runs,
            lambda outcome: outcome.ttft_s,
            lambda outcome: outcome.lookup_s + outcome.match_s,
        )

        full_logits, full_cache, _ = full_run
        tokens, full_steps = greedy_continuation(engine, full_logits, full_cache, self.fidelity_tokens)
        candidate_steps = teacher_forced(engine, outcome.logits, outcome.cache, tokens)
        fidelity = compare(full_steps, candidate_steps)
        return PairResult(
            kind=kind,
            articles=articles,
            prompt_tokens=len(target),
            full_ttft_s=full_ttft,
            semshare_ttft_s=semshare_ttft,
            recomputed_share=outcome.recomputed_share,
            similarity=outcome.similarity,
            lookup_match_share=lookup_s / full_ttft,
            agreement=fidelity.agreement,
            mean_kl=fidelity.mean_kl,
            fallback_reason=outcome.fallback_reason,
            prefix_tokens=outcome.prefix_tokens,
        )

    def reworded_pair(self, group: list[ArticlePair]) -> PairResult:
        """Store the intermediate rewrites of ``group``, then measure the longer advanced originals."""
        engine = self.engine
        self.store_reference(engine.apply_chat_template(summarization_messages([a.intermediate for a in group])))
        target = engine.apply_chat_template(summarization_messages([a.advanced for a in group]))
        return self.measure("reworded", len(group), target)

    def exact_prefix_pair(self, group: list[ArticlePair], new_tokens: int = 32) -> PairResult:
        """Store a summary turn, then measure the next chat turn, whose history is an exact prefix."""
        engine = self.engine
        messages = summarization_messages([a.advanced for a in group])
        summary = self.store_reference(engine.apply_chat_template(messages), new_tokens)
        follow_up = messages + [{"role": "assistant", "content": summary}, {"role": "user", "content": FOLLOW_UP}]
        target = engine.apply_chat_template(follow_up)
        result = self.measure("exact-prefix", len(group), target)
        greedy = GenerationConfig(max_new_tokens=new_tokens)
        full = engine.generate(target, greedy, reuse=ReuseConfig(enabled=False), store=False)
        shared = engine.generate(target, greedy, reuse=self.reuse, store=False)
        result.identical_greedy = full.token_ids == shared.token_ids
        return result

    def multinews_pair(self, sample: dict, new_tokens: int, scorer) -> PairResult:
        """Store a MultiNews prompt, then summarize its passages in reverse order, scoring both against gold."""
        engine = self.engine
        passages = multinews_passages(sample)
        self.store_reference(engine.apply_chat_template(summarization_messages(passages)))
        target = engine.apply_chat_template(summarization_messages(passages[::-1]))
        result = self.measure("multinews", len(passages), target)
        greedy = GenerationConfig(max_new_tokens=new_tokens)
        full = engine.generate(target, greedy, reuse=ReuseConfig(enabled=False), store=False)
        shared = engine.generate(target, greedy, reuse=self.reuse, store=False)
        gold = sample["answers"][0]
        result.rouge_full = scorer.score(gold, full.text)["rougeL"].fmeasure
        result.rouge_semshare = scorer.score(gold, shared.text)["rougeL"].fmeasure
        return result


def multinews_passages(sample: dict) -> list[str]:
    """Return the passages of a LongBench MultiNews sample ("Passage 1: ..." with NEWLINE_CHAR line breaks)."""
    passages = [p.strip() for p in sample["context"].replace("NEWLINE_CHAR", "\n").split("Passage ") if p.strip()]
    return [p.split(":", 1)[1].strip() if ":" in p[:6] else p for p in passages]


def article_groups(pairs: list[ArticlePair], size: int, count: int, seed: int = 0) -> list[list[ArticlePair]]:
    """Return ``count`` groups of ``size`` articles; groups are disjoint while the articles last."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    groups = []
    for index in range(count):
        start = index * size
        groups.append([pairs[order[(start + j) % len(order)]] for j in range(size)])
    return groups


def load_multinews(path: Path, engine: SemShareEngine, max_tokens: int, count: int) -> list[dict]:
    """Read up to ``count`` MultiNews samples whose context fits ``max_tokens``; [] when the file is absent."""
    if not path.is_file():
        logger.info("MultiNews file %s not found; skipping gold-summary ROUGE-L", path)
        return []
    samples = []
    for line in path.read_text(encoding="utf-8").splitlines():
        sample = json.loads(line)
        if engine.count_tokens(sample["context"]) <= max_tokens:
            samples.append(sample)
        if len(samples) == count:
            break
    return samples


def run_benchmark(
    engine: SemShareEngine,
    pairs: list[ArticlePair],
    sizes: list[int],
    pairs_per_size: int,
    exact_prefix_per_size: int,
    multinews: list[dict],
    runs: int = 3,
    summary_tokens: int = 96,
    progress: bool = True,
) -> list[PairResult]:
    """Run every measurement and return one result per target prompt."""
    bench = Benchmark(engine, runs=runs)
    total = len(sizes) * (pairs_per_size + exact_prefix_per_size) + len(multinews)
    bar = tqdm(total=total, desc="bench", unit="pair", disable=not progress)
    results = []
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for size in sizes:
        for group in article_groups(pairs, size, pairs_per_size, seed=size):
            bar.set_postfix_str(f"{size} article(s), reworded")
            results.append(bench.reworded_pair(group))
            bar.update()
        for group in article_groups(pairs, size, exact_prefix_per_size, seed=100 + size):
            bar.set_postfix_str(f"{size} article(s), exact prefix")
            results.append(bench.exact_prefix_pair(group))
            bar.update()
    for sample in multinews:
        bar.set_postfix_str("MultiNews")
        results.append(bench.multinews_pair(sample, summary_tokens, scorer))
        bar.update()
    bar.close()
    return results


def summarize(results: list[PairResult]) -> str:
    """Render the results as markdown tables: one row per kind and prompt size."""
    lines = [
        "| pairs | kind | articles | prompt tokens (median) | TTFT full/SemShare median | worst | recomputed | similarity "
        "| lookup+match / full | agreement mean | worst | KL mean | fallbacks |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(r.kind, r.articles) for r in results}, key=lambda k: (k[0] != "reworded", k[0], k[1]))
    for kind, articles in keys:
        rows = [r for r in results if r.kind == kind and r.articles == articles]
        sims = [r.similarity for r in rows if r.similarity is not None]
        lines.append(
            f"| {len(rows)} | {kind} | {articles} | {statistics.median(r.prompt_tokens for r in rows):.0f} "
            f"| {statistics.median(r.speedup for r in rows):.2f}x | {min(r.speedup for r in rows):.2f}x "
            f"| {statistics.mean(r.recomputed_share for r in rows):.1%} "
            f"| {statistics.mean(sims) if sims else float('nan'):.2f} "
            f"| {statistics.median(r.lookup_match_share for r in rows):.1%} (max {max(r.lookup_match_share for r in rows):.1%}) "
            f"| {statistics.mean(r.agreement for r in rows):.3f} | {min(r.agreement for r in rows):.3f} "
            f"| {statistics.mean(r.mean_kl for r in rows):.3f} | {sum(r.fallback_reason is not None for r in rows)} |"
        )
    exact = [r for r in results if r.identical_greedy is not None]
    if exact:
        same = sum(bool(r.identical_greedy) for r in exact)
        lines.append("")
        lines.append(f"Exact-prefix pairs with greedy output identical to full prefill: {same} of {len(exact)}.")
    scored = [r for r in results if r.rouge_full is not None]
    if scored:
        full = statistics.mean(r.rouge_full for r in scored)
        shared = statistics.mean(r.rouge_semshare for r in scored)
        ratio = shared / full if full else float("nan")
        lines.append("")
        lines.append(
            f"MultiNews gold ROUGE-L over {len(scored)} samples: full prefill {full:.3f}, SemShare {shared:.3f} "
            f"({ratio:.1%} of full)."
        )
    return "\n".join(lines)


def write_results(results: list[PairResult], path: Path) -> None:
    """Write every per-pair result as JSON, with the speedup of each."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [dict(asdict(r), speedup=r.speedup) for r in results]
    path.write_text(json.dumps(rows, indent=2))
